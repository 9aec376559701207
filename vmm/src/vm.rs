//! Assembling a VM from a [`VmConfig`] and driving its lifetime.

use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootError, MpTableError};
use crate::cpu::{self, CpuSetupError};
use crate::debug::{Breakpoint, DebugError, DebugEvent, DebugTraps};
use crate::devices::console::{ConsoleLog, ConsoleSink};
use crate::devices::{lock, DeviceBus, SerialDevice};
use crate::layout::*;
use crate::vcpu::{self, VcpuHandle, Vcpus, VmExitSink};
use crate::virtio::vsock::{BackendError, Vsock, VsockConfig};
use crate::virtio::{Interrupt, MmioRegion, MmioTransport};

/// A virtio-mmio slot holding the vsock device, shared by vCPUs and the event loop.
type VsockSlot = Arc<Mutex<MmioTransport<Vsock>>>;

/// The console line Linux prints when it panics.
const PANIC_MARKER: &str = "Kernel panic";
/// How much console output a panic report carries.
const PANIC_TAIL_CHARS: usize = 4096;

/// Where the guest serial console goes.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// Append console output to this file.
    pub file: Option<PathBuf>,
    /// Echo console output to stdout.
    pub stdout: bool,
    /// Feed stdin to the guest console (interactive use).
    pub stdin: bool,
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends the `virtio_mmio.device=` entries itself.
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub console: ConsoleConfig,
    pub vsock: Option<VsockConfig>,
}

impl VmConfig {
    /// 2 vCPUs, 512 MiB, console kept in memory only, no vsock.
    pub fn new(kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String) -> Self {
        Self {
            kernel,
            initrd,
            cmdline,
            vcpus: 2,
            mem_mib: 512,
            console: ConsoleConfig::default(),
            vsock: None,
        }
    }
}

/// What [`Vm::wait_for_console`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleWait {
    /// The marker is on the console.
    Found,
    /// The VM ended, this way, before the marker appeared.
    Ended(ExitReason),
    /// Neither within the timeout.
    TimedOut,
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, e.g. `reboot -f` with `reboot=k`).
    Reset,
    /// The guest kernel panicked (and then reset itself because of `panic=-1`).
    Panic { console_tail: String },
    /// A vCPU triple-faulted.
    TripleFault,
    /// A vCPU halted or the guest powered off without an irqchip to wake it.
    Halted,
    /// The host asked the VM to stop.
    Stopped,
    /// KVM reported an error or an exit this VMM does not handle.
    VcpuError { vcpu: u8, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM ioctl {step} failed: {source}")]
    Kvm { step: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory of {0} MiB is not supported (1 MiB to {max} MiB)", max = MAX_RAM_BYTES >> 20)]
    MemorySize(u32),
    #[error("cannot allocate guest memory: {0}")]
    AllocateMemory(vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    CpuSetup(#[from] CpuSetupError),
    #[error("cannot open console file {path}: {source}")]
    ConsoleFile { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Vsock(#[from] BackendError),
    #[error("cannot create {what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error("the VM is not running")]
    NotRunning,
    #[error("vCPU registers are only accessible while the VM is paused")]
    NotPaused,
    /// The guest reset, powered off, faulted or was stopped; `Vm::wait_exit` says which.
    #[error("the VM has ended")]
    Ended,
    #[error("no vCPU {0}")]
    NoSuchVcpu(usize),
    #[error("guest memory access at {addr:#x} failed: {source}")]
    GuestMemory { addr: u64, source: vm_memory::GuestMemoryError },
    #[error(transparent)]
    Debug(#[from] DebugError),
}

fn kvm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { step, source }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}

/// The first exit reason wins; waiters are woken when it is set.
struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    set: Condvar,
    console: Arc<ConsoleLog>,
    debug: DebugTraps,
}

impl ExitState {
    fn record(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
            self.set.notify_all();
        }
        drop(slot);
        self.debug.vm_ended();
    }
}

impl VmExitSink for ExitState {
    fn vm_exited(&self, reason: ExitReason) {
        // With panic=-1 a panic shows up as a reset (or a triple fault if the reset path
        // fails); the console tells them apart.
        let reason = match reason {
            ExitReason::Reset | ExitReason::TripleFault => {
                let text = self.console.text();
                match text.rfind(PANIC_MARKER) {
                    Some(at) => {
                        let start = text[..at]
                            .char_indices()
                            .rev()
                            .nth(PANIC_TAIL_CHARS)
                            .map_or(0, |(i, _)| i);
                        ExitReason::Panic { console_tail: text[start..].to_owned() }
                    }
                    None => reason,
                }
            }
            other => other,
        };
        self.record(reason);
    }

    fn debug_trap(&self, vcpu: usize, rip: u64) -> bool {
        self.debug.trap(vcpu, rip)
    }
}

/// Waits for a VM's end from any thread; see [`Vm::exit_watch`].
#[derive(Clone)]
pub struct ExitWatch(Arc<ExitState>);

impl ExitWatch {
    /// Why the VM ended, once it has (or `None` when `timeout` passes first).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut reason = lock(&self.0.reason);
        loop {
            if let Some(r) = reason.as_ref() {
                return Some(r.clone());
            }
            reason = match deadline {
                None => self.0.set.wait(reason).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.0.set.wait_timeout(reason, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }
}

/// A virtual machine. Dropping it stops it and releases every thread, fd and socket file.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    bus: Arc<DeviceBus>,
    exit: Arc<ExitState>,
    console: Arc<ConsoleLog>,
    vsock: Option<VsockSlot>,
    vsock_kick: Option<EventFd>,
    stdin_console: bool,
    unstarted_vcpus: Vec<VcpuFd>,
    vcpus: Option<Vcpus>,
    event_loop: Option<(JoinHandle<()>, EventFd)>,
}

impl Vm {
    /// Builds the VM: memory, irqchip, devices, kernel loaded, vCPUs configured (not running).
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        let mem_bytes = u64::from(config.mem_mib) << 20;
        if config.mem_mib == 0 || mem_bytes > MAX_RAM_BYTES {
            return Err(Error::MemorySize(config.mem_mib));
        }
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_step("KVM_CREATE_VM"))?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes as usize)])
            .map_err(Error::AllocateMemory)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps alive
            // for as long as `vm_fd` (fields drop after the vCPUs are joined).
            unsafe { vm_fd.set_user_memory_region(region_desc) }
                .map_err(kvm_step("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm_fd.set_tss_address(KVM_TSS_ADDR).map_err(kvm_step("KVM_SET_TSS_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm_step("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm_step("KVM_CREATE_PIT2"))?;

        let console = Arc::new(ConsoleLog::default());
        let console_file = match &config.console.file {
            Some(path) => Some(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::ConsoleFile { path: path.clone(), source })?,
            ),
            None => None,
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os("serial irqfd"))?;
        vm_fd.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_step("KVM_IRQFD (serial)"))?;
        let serial = SerialDevice::new(
            crate::devices::IrqTrigger(serial_irq),
            ConsoleSink::new(console_file, config.console.stdout, console.clone()),
        );

        let mut cmdline = config.cmdline.clone();
        let mut virtio: Vec<Arc<Mutex<dyn MmioRegion>>> = Vec::new();
        let (vsock, vsock_kick) = match &config.vsock {
            Some(vsock_config) => {
                let (transport, kick) = Self::create_vsock(&vm_fd, &mem, vsock_config, 0)?;
                cmdline.push_str(&format!(
                    " virtio_mmio.device={}K@{:#x}:{}",
                    VIRTIO_MMIO_SIZE >> 10,
                    MMIO_START,
                    VIRTIO_IRQ_BASE
                ));
                virtio.push(transport.clone());
                (Some(transport), Some(kick))
            }
            None => (None, None),
        };

        let entry = boot::load_linux(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
        boot::write_mptable(&mem, GuestAddress(MPTABLE_ADDR), config.vcpus)?;
        cpu::write_boot_structures(&mem)?;
        let cpuid = cpu::supported_cpuid(&kvm)?;
        let mut unstarted_vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = vm_fd.create_vcpu(u64::from(index)).map_err(kvm_step("KVM_CREATE_VCPU"))?;
            cpu::configure_vcpu(&vcpu, index, &cpuid, &entry)?;
            unstarted_vcpus.push(vcpu);
        }

        Ok(Self {
            _kvm: kvm,
            vm_fd,
            mem,
            bus: Arc::new(DeviceBus::new(serial, virtio)),
            exit: Arc::new(ExitState {
                reason: Mutex::new(None),
                set: Condvar::new(),
                console: console.clone(),
                debug: DebugTraps::default(),
            }),
            console,
            vsock,
            vsock_kick,
            stdin_console: config.console.stdin,
            unstarted_vcpus,
            vcpus: None,
            event_loop: None,
        })
    }

    fn create_vsock(
        vm_fd: &VmFd,
        mem: &GuestMemoryMmap,
        config: &VsockConfig,
        slot: u64,
    ) -> Result<(VsockSlot, EventFd), Error> {
        let base = MMIO_START + slot * VIRTIO_MMIO_SIZE;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(os("virtio irqfd"))?;
        vm_fd
            .register_irqfd(&irq, VIRTIO_IRQ_BASE + slot as u32)
            .map_err(kvm_step("KVM_IRQFD (virtio)"))?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(os("virtio queue eventfd"))?;
        const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
        vm_fd
            .register_ioevent(&kick, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), NoDatamatch)
            .map_err(kvm_step("KVM_IOEVENTFD (virtio)"))?;
        let interrupt = Arc::new(Interrupt::new(irq));
        let device = Vsock::new(config, interrupt.clone())?;
        let transport_kick = kick.try_clone().map_err(os("virtio queue eventfd"))?;
        let transport = MmioTransport::new(device, mem.clone(), interrupt, transport_kick);
        Ok((Arc::new(Mutex::new(transport)), kick))
    }

    /// Starts the device event loop and all vCPU threads.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.vcpus.is_some() || self.unstarted_vcpus.is_empty() {
            return Err(Error::AlreadyStarted);
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(os("stop eventfd"))?;
        let event_loop = EventLoop::new(
            stop.try_clone().map_err(os("stop eventfd"))?,
            self.vsock.clone(),
            self.vsock_kick.take(),
            self.stdin_console.then_some(self.bus.clone()),
        )?;
        let thread = std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || event_loop.run())
            .map_err(os("event loop thread"))?;
        self.event_loop = Some((thread, stop));
        let sink: Arc<dyn VmExitSink> = self.exit.clone();
        let vcpus = Vcpus::start(std::mem::take(&mut self.unstarted_vcpus), self.bus.clone(), sink)
            .map_err(os("vCPU thread"))?;
        self.vcpus = Some(vcpus);
        Ok(())
    }

    /// Ok while every vCPU is parked by a pause; which of the two it is not, otherwise.
    fn paused(vcpus: &Vcpus) -> Result<(), Error> {
        if vcpus.ended() {
            Err(Error::Ended)
        } else if vcpus.is_paused() {
            Ok(())
        } else {
            Err(Error::NotPaused)
        }
    }

    fn running_vcpus(&self) -> Result<&Vcpus, Error> {
        self.vcpus.as_ref().ok_or(Error::NotRunning)
    }

    /// Parks all vCPUs outside guest mode; returns when all are parked. [`Error::Ended`]
    /// when the VM ended first, also while this call waited (a guest may reset at any time).
    pub fn pause(&self) -> Result<(), Error> {
        let vcpus = self.running_vcpus()?;
        vcpus.pause();
        Self::paused(vcpus)
    }

    /// Lets every vCPU run again (nothing to do once the VM has ended). A vCPU whose
    /// breakpoint hit [`Vm::wait_debug_event`] returned in this pause first executes the
    /// instruction it stopped at, while the breakpoint stays armed for the others (its RIP
    /// goes back to the breakpoint; other register changes a caller made stand). A hit not yet returned is dropped: its vCPU is
    /// left on the breakpoint and hits it again right away, unless it was disarmed meanwhile.
    pub fn resume(&self) -> Result<(), Error> {
        let vcpus = self.running_vcpus()?;
        let trapped = self.exit.debug.take_trapped();
        if !trapped.is_empty() {
            // Guest code is rewritten below; no vCPU may be running it.
            vcpus.pause();
        }
        for (index, resume) in trapped {
            let handle = vcpus.handles().get(index).ok_or(Error::NoSuchVcpu(index))?;
            let id = u8::try_from(index).map_err(|_| Error::NoSuchVcpu(index))?;
            vcpu::leave_trap(id, &mut lock(&handle.fd), resume, &self.mem, &self.bus)?;
        }
        vcpus.resume();
        Ok(())
    }

    /// Arms instruction breakpoints in guest kernel code for every vCPU, replacing those armed
    /// before (an empty list disarms all). The VM must be started and paused. How they work
    /// and where they may go: see [`Breakpoint`] and the `debug` module (in short: at kernel
    /// instructions of two bytes or more, ideally an `endbr64`, in code the guest does not
    /// rewrite while armed). A hit parks the whole VM until [`Vm::resume`], whether or not
    /// anybody waits for it.
    pub fn set_breakpoints(&self, breakpoints: &[Breakpoint]) -> Result<(), Error> {
        Self::paused(self.running_vcpus()?)?;
        Ok(self.exit.debug.arm(&self.mem, breakpoints)?)
    }

    /// Waits up to `timeout` (forever with `None`) for a vCPU to hit an armed breakpoint and
    /// returns that hit once every vCPU is parked, so registers and memory of all of them can be
    /// read as they were at the hit. Hits are returned oldest first; two vCPUs hitting at once
    /// give two events in the same pause. `None` on timeout or when the VM has ended.
    pub fn wait_debug_event(&self, timeout: Option<Duration>) -> Option<DebugEvent> {
        let event = self.exit.debug.wait(timeout)?;
        // The trapping vCPU asked the others to park; make sure they have before returning.
        if let Some(vcpus) = &self.vcpus {
            vcpus.pause();
        }
        Some(event)
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.as_ref().map_or(self.unstarted_vcpus.len(), |v| v.handles().len())
    }

    /// Runs `f` on vCPU `index`'s fd (for registers, `KVM_SET_GUEST_DEBUG`, ...). Only while
    /// paused (or before start), so it never waits on a running `KVM_RUN`.
    pub fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Result<R, Error> {
        match &self.vcpus {
            None => self.unstarted_vcpus.get(index).map(f).ok_or(Error::NoSuchVcpu(index)),
            Some(vcpus) => {
                Self::paused(vcpus)?;
                let handle: &VcpuHandle =
                    vcpus.handles().get(index).ok_or(Error::NoSuchVcpu(index))?;
                Ok(f(&lock(&handle.fd)))
            }
        }
    }

    pub fn regs(&self, vcpu: usize) -> Result<kvm_regs, Error> {
        self.with_vcpu(vcpu, |fd| fd.get_regs())?.map_err(kvm_step("KVM_GET_REGS"))
    }

    pub fn set_regs(&self, vcpu: usize, regs: &kvm_regs) -> Result<(), Error> {
        self.with_vcpu(vcpu, |fd| fd.set_regs(regs))?.map_err(kvm_step("KVM_SET_REGS"))
    }

    pub fn sregs(&self, vcpu: usize) -> Result<kvm_sregs, Error> {
        self.with_vcpu(vcpu, |fd| fd.get_sregs())?.map_err(kvm_step("KVM_GET_SREGS"))
    }

    pub fn set_sregs(&self, vcpu: usize, sregs: &kvm_sregs) -> Result<(), Error> {
        self.with_vcpu(vcpu, |fd| fd.set_sregs(sregs))?.map_err(kvm_step("KVM_SET_SREGS"))
    }

    /// Reads guest-physical memory.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| Error::GuestMemory { addr: gpa, source })
    }

    /// Guest RAM, for readers that work on `vm_memory` traits (e.g. a guest page-table walk).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Writes guest-physical memory.
    pub fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), Error> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| Error::GuestMemory { addr: gpa, source })
    }

    /// The guest console's retained output (also usable to wait for markers).
    pub fn console(&self) -> Arc<ConsoleLog> {
        self.console.clone()
    }

    /// The VM fd, for VM-wide KVM calls a caller may need (e.g. dirty logging).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Waits up to `timeout` for `marker` on the console, or for the VM to end before it
    /// appears (a guest that printed the marker and then ended counts as found): a caller
    /// learns at once, and how, when the guest it waits on is gone.
    pub fn wait_for_console(&self, marker: &str, timeout: Duration) -> ConsoleWait {
        const SLICE: Duration = Duration::from_millis(50);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.console.wait_for(marker, left.min(SLICE)) {
                return ConsoleWait::Found;
            }
            if let Some(reason) = self.wait_exit(Some(Duration::ZERO)) {
                return if self.console.wait_for(marker, Duration::ZERO) {
                    ConsoleWait::Found
                } else {
                    ConsoleWait::Ended(reason)
                };
            }
            if left.is_zero() {
                return ConsoleWait::TimedOut;
            }
        }
    }

    /// Waits until the guest ends the VM (or `timeout` passes: `None`).
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        self.exit_watch().wait(timeout)
    }

    /// A handle another thread can wait on for the VM's end (e.g. to close a
    /// connection to the guest that would otherwise wait for a reply forever).
    /// Every exit path, `stop` and drop included, wakes it.
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch(self.exit.clone())
    }

    /// Stops everything and returns why the VM ended (`Stopped` if the guest was still up).
    pub fn stop(mut self) -> ExitReason {
        self.shutdown()
    }

    fn shutdown(&mut self) -> ExitReason {
        self.exit.record(ExitReason::Stopped);
        if let Some(mut vcpus) = self.vcpus.take() {
            vcpus.stop();
        }
        if let Some((thread, stop)) = self.event_loop.take() {
            if let Err(e) = stop.write(1) {
                log::error!("cannot signal the event loop to stop: {e}");
            }
            if thread.join().is_err() {
                log::error!("the VM event loop panicked");
            }
        }
        lock(&self.exit.reason).clone().unwrap_or(ExitReason::Stopped)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread that serves host-side events: vsock queue kicks and sockets, console input.
struct EventLoop {
    epoll: Epoll,
    /// Registered in `epoll`; kept open for as long as the loop runs.
    _stop: EventFd,
    vsock: Option<(VsockSlot, EventFd)>,
    stdin_bus: Option<Arc<DeviceBus>>,
}

const TOKEN_STOP: u64 = 0;
const TOKEN_VSOCK_KICK: u64 = 1;
const TOKEN_VSOCK_BACKEND: u64 = 2;
const TOKEN_STDIN: u64 = 3;

impl EventLoop {
    fn new(
        stop: EventFd,
        vsock: Option<VsockSlot>,
        kick: Option<EventFd>,
        stdin_bus: Option<Arc<DeviceBus>>,
    ) -> Result<Self, Error> {
        let epoll = Epoll::new().map_err(os("epoll"))?;
        let add = |fd, token| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(os("epoll registration"))
        };
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        let vsock = match (vsock, kick) {
            (Some(transport), Some(kick)) => {
                add(kick.as_raw_fd(), TOKEN_VSOCK_KICK)?;
                add(lock(&transport).device_mut().backend_fd(), TOKEN_VSOCK_BACKEND)?;
                Some((transport, kick))
            }
            _ => None,
        };
        // A regular file or /dev/null on stdin cannot be polled (EPERM): no console input then.
        let stdin_bus =
            stdin_bus.filter(|_| match add(std::io::stdin().as_raw_fd(), TOKEN_STDIN) {
                Ok(()) => true,
                Err(e) => {
                    log::info!("console input disabled: {e}");
                    false
                }
            });
        Ok(Self { epoll, _stop: stop, vsock, stdin_bus })
    }

    fn run(self) {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("VM event loop failed: {e}");
                    return;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_VSOCK_KICK => {
                        if let Some((transport, kick)) = &self.vsock {
                            let _ = kick.read();
                            lock(transport).device_mut().process_queues();
                        }
                    }
                    TOKEN_VSOCK_BACKEND => {
                        if let Some((transport, _)) = &self.vsock {
                            lock(transport).device_mut().process_backend();
                        }
                    }
                    TOKEN_STDIN => self.forward_stdin(),
                    _ => {}
                }
            }
        }
    }

    fn forward_stdin(&self) {
        let Some(bus) = &self.stdin_bus else { return };
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or error: stop watching stdin rather than spinning on it.
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    std::io::stdin().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            Ok(n) => {
                if let Err(e) = lock(bus.serial()).enqueue_raw_bytes(&buf[..n]) {
                    log::debug!("console input dropped: {e}");
                }
            }
        }
    }
}
