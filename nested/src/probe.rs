//! Up-front check that `/dev/kvm` can run an ordinary (non-paravirtual) guest.
//!
//! A paravirtual-only KVM (kvm-pvm) accepts every ioctl a VMM uses and even runs a plain
//! 64-bit guest correctly, but it does so by emulating the guest instruction by instruction
//! (measured here: about 0.4 million instructions per second), so a Linux guest appears to
//! hang in its decompressor. The probe therefore runs a short counted loop in long mode and
//! requires both the expected port-I/O exit and a run time that only hardware-assisted
//! execution achieves (real KVM, even nested under QEMU TCG, is hundreds of times faster).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};

/// Probe VM memory layout: three page-table pages identity-mapping the first 2 MiB, then code.
const PML4_ADDR: u64 = 0x0;
const PDPT_ADDR: u64 = 0x1000;
const PD_ADDR: u64 = 0x2000;
const CODE_ADDR: u64 = 0x3000;
/// The port and byte the probe code writes when its loop is done.
const PROBE_PORT: u16 = 0x80;
const PROBE_BYTE: u8 = 0x5a;
/// Loop iterations (two instructions each) before the port write.
const LOOP_ITERATIONS: u32 = 1_000_000;
/// `mov ecx, LOOP_ITERATIONS; 1: dec ecx; jnz 1b; mov al, PROBE_BYTE; out PROBE_PORT, al; hlt`
const PROBE_CODE: [u8; 14] = {
    let n = LOOP_ITERATIONS.to_le_bytes();
    [
        0xb9,
        n[0],
        n[1],
        n[2],
        n[3],
        0xff,
        0xc9,
        0x75,
        0xfc,
        0xb0,
        PROBE_BYTE,
        0xe6,
        PROBE_PORT as u8,
        0xf4,
    ]
};
/// Hardware-assisted execution runs the loop in about a millisecond natively and in tens of
/// milliseconds nested under QEMU TCG (21 ms measured in L1 on an idle host, 241 ms with the
/// fuzzer busy beside it, which a 200 ms bound took for emulation); instruction emulation
/// (kvm-pvm) needs 1.1-5 s (1.8-0.4 million instructions per second measured, depending on
/// host load).
const MAX_LOOP_TIME: Duration = Duration::from_millis(600);
/// Even emulated, the probe finishes in a few seconds; a wedged vCPU must not stall the caller.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `/dev/kvm` cannot run an ordinary guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmUnusable {
    #[error("/dev/kvm cannot be opened: {0}")]
    Unavailable(String),
    #[error("KVM refused to set up a plain VM ({step}): {reason}")]
    SetupRefused { step: &'static str, reason: String },
    #[error("KVM_RUN of the probe guest failed: {0} (paravirtual-only KVM such as kvm-pvm?)")]
    RunFailed(String),
    #[error("the probe guest ended with an unexpected exit: {0}")]
    UnexpectedExit(String),
    #[error("the probe guest produced no exit within {0:?}")]
    Hung(Duration),
    #[error(
        "KVM emulates guest code instead of running it ({instructions} instructions took {elapsed:?}; \
         paravirtual-only KVM such as kvm-pvm): a Linux guest would crawl"
    )]
    Emulated { instructions: u32, elapsed: Duration },
}

/// Where an "emulated" verdict is kept until the host reboots (a tmpfs), so that the commands
/// after the first one skip the half second the probe costs where KVM emulates.
const VERDICT_FILE: &str = "/run/termlab/kvm-probe";

/// What the verdict holds for: this boot of the host and this `/dev/kvm` node (a KVM module
/// loaded anew gives the node another inode and change time).
fn verdict_key() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let kvm = std::fs::metadata("/dev/kvm").ok()?;
    let node = format!("{} {} {}.{:09}", kvm.rdev(), kvm.ino(), kvm.ctime(), kvm.ctime_nsec());
    Some(format!("{} {node}", boot_id.trim()))
}

/// The line an "emulated" verdict is kept as: `key instructions elapsed_ns`.
fn verdict_line(key: &str, instructions: u32, elapsed: Duration) -> String {
    format!("{key}\t{instructions}\t{}\n", elapsed.as_nanos())
}

/// The verdict `text` holds for `key`, if it is one.
fn verdict_from(text: &str, key: &str) -> Option<KvmUnusable> {
    let mut fields = text.strip_suffix('\n')?.split('\t');
    if fields.next()? != key {
        return None;
    }
    let instructions = fields.next()?.parse().ok()?;
    let elapsed = Duration::from_nanos(fields.next()?.parse().ok()?);
    fields.next().is_none().then_some(KvmUnusable::Emulated { instructions, elapsed })
}

/// Whether `/dev/kvm` behaves like real KVM ([`probe_kvm_now`]); an "emulated" verdict is
/// remembered for this boot of the host ([`VERDICT_FILE`]), KVM found fast is probed again
/// each time (a millisecond).
pub fn probe_kvm() -> Result<Duration, KvmUnusable> {
    let key = verdict_key();
    let text = std::fs::read_to_string(VERDICT_FILE).ok();
    match key.as_deref().zip(text).and_then(|(key, text)| verdict_from(&text, key)) {
        Some(verdict) => Err(verdict),
        None => probe_and_keep(key.as_deref()),
    }
}

/// Runs the probe guest in a fresh VM and reports whether `/dev/kvm` behaves like real KVM;
/// on success, how long the probe loop took. An "emulated" verdict is kept for
/// [`probe_kvm`].
pub fn probe_kvm_now() -> Result<Duration, KvmUnusable> {
    probe_and_keep(verdict_key().as_deref())
}

/// The probe's outcome, an "emulated" one kept under `key`.
fn probe_and_keep(key: Option<&str>) -> Result<Duration, KvmUnusable> {
    let outcome = probe_in_fresh_vm();
    if let (Some(key), Err(KvmUnusable::Emulated { instructions, elapsed })) = (key, &outcome) {
        remember(&verdict_line(key, *instructions, *elapsed));
    }
    outcome
}

/// Keeps `line` as the verdict, atomically; a host where that fails probes every time.
fn remember(line: &str) {
    let path = std::path::Path::new(VERDICT_FILE);
    let temp = path.with_extension(format!("tmp-{}", std::process::id()));
    let kept = path.parent().is_some_and(|dir| std::fs::create_dir_all(dir).is_ok())
        && std::fs::write(&temp, line).is_ok()
        && std::fs::rename(&temp, path).is_ok();
    if !kept {
        let _ = std::fs::remove_file(&temp);
    }
}

fn probe_in_fresh_vm() -> Result<Duration, KvmUnusable> {
    let (tx, rx) = mpsc::channel();
    // The probe runs on its own thread so a vCPU that never returns cannot hang the caller.
    // Such a thread is abandoned (detached) only in that pathological case; it owns nothing but
    // the probe VM's file descriptors.
    std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(run_probe_guest());
        })
        .map_err(|e| KvmUnusable::Unavailable(format!("cannot spawn probe thread: {e}")))?;
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(result) => result,
        Err(_) => Err(KvmUnusable::Hung(PROBE_TIMEOUT)),
    }
}

fn refused(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmUnusable {
    move |e| KvmUnusable::SetupRefused { step, reason: e.to_string() }
}

fn run_probe_guest() -> Result<Duration, KvmUnusable> {
    let kvm = Kvm::new().map_err(|e| KvmUnusable::Unavailable(e.to_string()))?;
    let vm = kvm.create_vm().map_err(refused("KVM_CREATE_VM"))?;
    let mem = GuestPage::new().map_err(|e| KvmUnusable::Unavailable(e.to_string()))?;
    mem.write(CODE_ADDR as usize, &PROBE_CODE);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: GuestPage::SIZE as u64,
        userspace_addr: mem.host_addr(),
    };
    // SAFETY: `mem` is a live anonymous mapping of `memory_size` bytes that outlives `vm`
    // (it is dropped after `vm` at the end of this function).
    unsafe { vm.set_user_memory_region(region) }.map_err(refused("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(refused("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(refused("KVM_GET_SREGS"))?;
    enter_long_mode(&mem, &mut sregs);
    vcpu.set_sregs(&sregs).map_err(refused("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(refused("KVM_GET_REGS"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(refused("KVM_SET_REGS"))?;
    let started = Instant::now();
    let exit = vcpu.run();
    let elapsed = started.elapsed();
    let outcome = match exit {
        Ok(VcpuExit::IoOut(PROBE_PORT, data)) if data == [PROBE_BYTE] => {
            if elapsed > MAX_LOOP_TIME {
                Err(KvmUnusable::Emulated { instructions: 2 * LOOP_ITERATIONS, elapsed })
            } else {
                Ok(elapsed)
            }
        }
        Ok(other) => Err(KvmUnusable::UnexpectedExit(format!("{other:?}"))),
        Err(e) => Err(KvmUnusable::RunFailed(e.to_string())),
    };
    drop(vcpu);
    drop(vm);
    outcome
}

/// Puts the vCPU straight into 64-bit mode with paging, the state a Linux guest is started in
/// by a VMM and the state a paravirtual-only KVM cannot provide.
fn enter_long_mode(mem: &GuestPage, sregs: &mut kvm_bindings::kvm_sregs) {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    mem.write(PML4_ADDR as usize, &(PDPT_ADDR | PRESENT_WRITABLE).to_le_bytes());
    mem.write(PDPT_ADDR as usize, &(PD_ADDR | PRESENT_WRITABLE).to_le_bytes());
    mem.write(PD_ADDR as usize, &(PRESENT_WRITABLE | HUGE_PAGE).to_le_bytes());
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_bindings::kvm_segment { selector: 0x10, type_: 0x3, l: 0, db: 1, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= (1 << 0) | (1 << 31); // PE | PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME | LMA
}

/// One anonymous page-aligned mapping used as the probe VM's RAM.
struct GuestPage {
    addr: *mut libc::c_void,
}

impl GuestPage {
    const SIZE: usize = 0x4000;

    fn new() -> std::io::Result<Self> {
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { addr })
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= Self::SIZE, "probe code must fit in the probe page");
        // SAFETY: bounds checked above; the mapping is writable and owned by `self`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.addr.cast::<u8>().add(offset),
                bytes.len(),
            )
        };
    }

    fn host_addr(&self) -> u64 {
        self.addr as u64
    }
}

impl Drop for GuestPage {
    fn drop(&mut self) {
        // SAFETY: `addr` came from a successful mmap of SIZE bytes and is unmapped once.
        unsafe { libc::munmap(self.addr, Self::SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emulated_verdict_holds_for_its_key_only() {
        let line = verdict_line("boot-1 2600 17 99", 2_000_000, Duration::from_millis(483));
        let verdict = verdict_from(&line, "boot-1 2600 17 99");
        assert_eq!(
            verdict,
            Some(KvmUnusable::Emulated {
                instructions: 2_000_000,
                elapsed: Duration::from_millis(483)
            })
        );
        // Another boot, or /dev/kvm made anew by a module load: probe again.
        assert_eq!(verdict_from(&line, "boot-2 2600 17 99"), None);
        assert_eq!(verdict_from(&line, "boot-1 2600 18 99"), None);
        // A torn or foreign file is no verdict.
        assert_eq!(verdict_from(&line[..line.len() - 3], "boot-1 2600 17 99"), None);
        assert_eq!(verdict_from("boot-1 2600 17 99\t1\t2\t3\n", "boot-1 2600 17 99"), None);
        assert_eq!(verdict_from("", "boot-1 2600 17 99"), None);
    }
}
