//! vCPU threads and the control that pauses, resumes and stops them together.
//!
//! Each vCPU runs `KVM_RUN` on its own thread while holding its `VcpuFd` lock. To pause or
//! stop, the controller sets the requested state and kicks every thread out of `KVM_RUN`
//! with a signal; a thread that sees the request parks (releasing its `VcpuFd`, so register
//! accessors can use it) or exits. Exits that need the whole VM to react (reset, triple
//! fault, a debug trap) are reported through [`VmExitSink`].

use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::debug::{self, DebugError, Resume, TRAP_PORT};
use crate::devices::{lock, DeviceBus, PioEffect};
use crate::ExitReason;

/// Signal used only to interrupt `KVM_RUN`; its handler does nothing.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

static KICK_HANDLER: Once = Once::new();

fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| result = register_signal_handler(kick_signal(), noop));
    result
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    request: Request,
    /// Threads currently parked (paused) or gone.
    parked: usize,
    /// vCPU threads that have started, for kicking them out of `KVM_RUN`.
    threads: Vec<libc::pthread_t>,
}

/// Shared by the VM and its vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    count: usize,
}

impl VcpuControl {
    fn set_request(&self, request: Request) {
        let mut state = lock(&self.state);
        if state.request != Request::Stop {
            state.request = request;
        }
        self.changed.notify_all();
    }

    fn all_parked(&self) -> bool {
        lock(&self.state).parked == self.count
    }

    /// Interrupts `KVM_RUN` on every vCPU thread so it looks at the request.
    fn kick_all(&self) {
        for &thread in &lock(&self.state).threads {
            // SAFETY: the ids belong to vCPU threads that are joined only after the last
            // kick (see `Vcpus::stop`); the handler for this signal does nothing.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// Where vCPU threads report what the whole VM must react to.
pub trait VmExitSink: Send + Sync {
    fn vm_exited(&self, reason: ExitReason);
    /// vCPU `vcpu` wrote to the breakpoint trap port at `rip`; true if that was an armed
    /// breakpoint, which the run loop answers by parking every vCPU.
    fn debug_trap(&self, vcpu: usize, rip: u64) -> bool;
}

/// A started vCPU.
pub struct VcpuHandle {
    pub fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

/// The set of vCPU threads of one VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    handles: Vec<VcpuHandle>,
}

impl Vcpus {
    /// Spawns one thread per vCPU; they start running immediately.
    pub fn start(
        fds: Vec<VcpuFd>,
        bus: Arc<DeviceBus>,
        sink: Arc<dyn VmExitSink>,
    ) -> std::io::Result<Self> {
        install_kick_handler().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let control = Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                request: Request::Run,
                parked: 0,
                threads: Vec::new(),
            }),
            changed: Condvar::new(),
            count: fds.len(),
        });
        let mut vcpus = Self { control: control.clone(), handles: Vec::new() };
        for (index, fd) in fds.into_iter().enumerate() {
            let fd = Arc::new(Mutex::new(fd));
            let (control, bus, sink, thread_fd) =
                (control.clone(), bus.clone(), sink.clone(), fd.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_vcpu(index as u8, &thread_fd, &control, &bus, &*sink));
            match spawned {
                Ok(thread) => vcpus.handles.push(VcpuHandle { fd, thread: Some(thread) }),
                Err(e) => {
                    // `vcpus` drops here and stops the threads already started.
                    return Err(e);
                }
            }
        }
        Ok(vcpus)
    }

    pub fn handles(&self) -> &[VcpuHandle] {
        &self.handles
    }

    /// Parks every vCPU outside `KVM_RUN`; returns once all are parked or gone (the VM may
    /// end meanwhile: see [`Vcpus::ended`]).
    pub fn pause(&self) {
        self.control.set_request(Request::Pause);
        self.kick_until(|| self.control.all_parked());
    }

    pub fn resume(&self) {
        self.control.set_request(Request::Run);
    }

    pub fn is_paused(&self) -> bool {
        let state = lock(&self.control.state);
        state.request == Request::Pause && state.parked == self.control.count
    }

    /// True once a vCPU exit or [`Vcpus::stop`] ended the VM; no vCPU runs again.
    pub fn ended(&self) -> bool {
        lock(&self.control.state).request == Request::Stop
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        self.control.set_request(Request::Stop);
        self.kick_until(|| {
            self.handles.iter().all(|h| h.thread.as_ref().is_none_or(|t| t.is_finished()))
        });
        for handle in &mut self.handles {
            if let Some(thread) = handle.thread.take() {
                if thread.join().is_err() {
                    log::error!("a vCPU thread panicked");
                }
            }
        }
    }

    /// A kick can land just before a thread enters `KVM_RUN` and be lost, so keep kicking
    /// until the condition holds.
    fn kick_until(&self, done: impl Fn() -> bool) {
        while !done() {
            self.control.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a vCPU exit asks the run loop to do.
enum Action {
    Continue,
    /// An `out` to the breakpoint trap port: a breakpoint if the RIP is one.
    TrapPort,
    /// Park every vCPU (a breakpoint hit) until the controller resumes them.
    PauseAll,
    Exit(ExitReason),
}

fn run_vcpu(
    index: u8,
    fd: &Mutex<VcpuFd>,
    control: &VcpuControl,
    bus: &DeviceBus,
    sink: &dyn VmExitSink,
) {
    // SAFETY: pthread_self has no preconditions.
    lock(&control.state).threads.push(unsafe { libc::pthread_self() });
    loop {
        if !wait_until_runnable(control) {
            return;
        }
        let action = {
            let mut vcpu = lock(fd);
            match handle_exit(index, vcpu.run(), bus) {
                Action::TrapPort => match vcpu.get_regs() {
                    Ok(regs) if sink.debug_trap(usize::from(index), regs.rip) => Action::PauseAll,
                    Ok(_) => Action::Continue,
                    Err(e) => Action::Exit(ExitReason::VcpuError {
                        vcpu: index,
                        message: format!("KVM_GET_REGS: {e}"),
                    }),
                },
                other => other,
            }
        };
        // One kick per request gets the other vCPUs out of guest mode at once; a kick lost
        // in the instant before a thread enters KVM_RUN only delays that thread until its
        // next exit, and `Vcpus::pause`/`stop` keep kicking until they are sure.
        match action {
            Action::Continue | Action::TrapPort => {}
            Action::PauseAll => {
                control.set_request(Request::Pause);
                control.kick_all();
            }
            Action::Exit(reason) => {
                sink.vm_exited(reason);
                control.set_request(Request::Stop);
                control.kick_all();
            }
        }
    }
}

/// Blocks while paused. Returns false when the thread must exit.
fn wait_until_runnable(control: &VcpuControl) -> bool {
    let mut state = lock(&control.state);
    let mut parked = false;
    loop {
        match state.request {
            Request::Run => {
                if parked {
                    state.parked -= 1;
                }
                return true;
            }
            Request::Stop => {
                if !parked {
                    state.parked += 1;
                }
                control.changed.notify_all();
                return false;
            }
            Request::Pause => {
                if !parked {
                    parked = true;
                    state.parked += 1;
                    control.changed.notify_all();
                }
                state = control.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn handle_exit(
    index: u8,
    exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    bus: &DeviceBus,
) -> Action {
    match exit {
        Ok(VcpuExit::IoIn(port, data)) => {
            bus.pio_read(port, data);
            Action::Continue
        }
        Ok(VcpuExit::IoOut(port, _)) if port == u16::from(TRAP_PORT) => Action::TrapPort,
        Ok(VcpuExit::IoOut(port, data)) => match bus.pio_write(port, data) {
            PioEffect::None => Action::Continue,
            PioEffect::Reset => Action::Exit(ExitReason::Reset),
        },
        Ok(VcpuExit::MmioRead(addr, data)) => {
            bus.mmio_read(addr, data);
            Action::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            bus.mmio_write(addr, data);
            Action::Continue
        }
        Ok(VcpuExit::Shutdown) => Action::Exit(ExitReason::TripleFault),
        Ok(VcpuExit::Intr) => Action::Continue,
        Ok(VcpuExit::Hlt) => Action::Exit(ExitReason::Halted),
        Ok(VcpuExit::SystemEvent(kind, _)) if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
            Action::Exit(ExitReason::Reset)
        }
        Ok(VcpuExit::SystemEvent(kind, _)) if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
            Action::Exit(ExitReason::Halted)
        }
        Ok(other) => Action::Exit(ExitReason::VcpuError {
            vcpu: index,
            message: format!("unhandled exit {other:?}"),
        }),
        // EINTR/EAGAIN: kicked out of KVM_RUN by the controller; it decides what happens next.
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Continue,
        Err(e) => Action::Exit(ExitReason::VcpuError {
            vcpu: index,
            message: format!("KVM_RUN failed: {e}"),
        }),
    }
}

/// Makes a vCPU parked on a breakpoint trap ready to run again, as `resume` says (see the
/// `debug` module for why breakpoints are traps patched into guest code). Every vCPU must be
/// parked: the guest code may be unpatched for a moment.
pub(crate) fn leave_trap(
    index: u8,
    fd: &mut VcpuFd,
    resume: Resume,
    mem: &GuestMemoryMmap,
    bus: &DeviceBus,
) -> Result<(), DebugError> {
    let (pc, next_rip) = match resume {
        Resume::Retrap { pc } | Resume::Run { pc } | Resume::Step { pc, .. } => (pc, pc),
        Resume::Skip { pc, len } => (pc, pc + len),
    };
    let kvm = |step: &'static str| {
        move |source| DebugError::Kvm { vcpu: usize::from(index), addr: pc, step, source }
    };
    // KVM finishes the trap's `out` (moving RIP past it) on the next KVM_RUN; do that now,
    // without entering the guest, so RIP can then be set freely.
    fd.set_kvm_immediate_exit(1);
    let completed = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match completed {
        Err(e) if e.errno() == libc::EINTR => {}
        other => other.map_err(kvm("KVM_RUN (complete the trap)"))?,
    }
    let mut regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    regs.rip = next_rip;
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    if let Resume::Step { bp, original, .. } = resume {
        debug::write(mem, bp, &original)?;
        let stepped = step_off_trap(index, fd, bus, pc);
        debug::patch(mem, bp)?;
        stepped?;
    }
    Ok(())
}

/// Single-steps until RIP is off the bytes the trap covers: one step, or two when the
/// original instruction is a one-byte one, after which RIP would be on the trap's second byte.
fn step_off_trap(index: u8, fd: &mut VcpuFd, bus: &DeviceBus, pc: u64) -> Result<(), DebugError> {
    for _ in 0..debug::TRAP_LEN {
        single_step(index, fd, bus, pc)?;
        let rip = fd
            .get_regs()
            .map_err(|source| DebugError::Kvm {
                vcpu: usize::from(index),
                addr: pc,
                step: "KVM_GET_REGS",
                source,
            })?
            .rip;
        if !(pc + 1..pc + debug::TRAP_LEN).contains(&rip) {
            break;
        }
    }
    Ok(())
}

/// Runs exactly one guest instruction with KVM's single-step (#DB after it), interrupts held
/// back so the step is not spent entering a handler.
fn single_step(index: u8, fd: &mut VcpuFd, bus: &DeviceBus, pc: u64) -> Result<(), DebugError> {
    let vcpu = usize::from(index);
    let step = |control| kvm_guest_debug { control, ..Default::default() };
    let kvm = |step: &'static str| move |source| DebugError::Kvm { vcpu, addr: pc, step, source };
    fd.set_guest_debug(&step(
        KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ,
    ))
    .map_err(kvm("KVM_SET_GUEST_DEBUG (single-step)"))?;
    let outcome = loop {
        match fd.run() {
            Ok(VcpuExit::Debug(_)) => break Ok(()),
            exit => match handle_exit(index, exit, bus) {
                Action::Continue | Action::TrapPort | Action::PauseAll => {}
                Action::Exit(reason) => {
                    break Err(DebugError::StepExit {
                        vcpu,
                        addr: pc,
                        reason: format!("{reason:?}"),
                    })
                }
            },
        }
    };
    fd.set_guest_debug(&step(0)).map_err(kvm("KVM_SET_GUEST_DEBUG (off)"))?;
    outcome
}
