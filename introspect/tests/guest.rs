//! Boots the real guest kernel under the termlab VMM and introspects it from outside at
//! breakpoints: `__x64_sys_getppid` (its `endbr64`, stepped over by skipping it),
//! `__x64_sys_getppid+4` (a `nopl`, stepped over by single-stepping the original) and the
//! one-byte pushes of its callee `__task_pid_nr_ns` (two single-steps each; the registers
//! and stack between them show each stepped instruction ran exactly once), each hit once per
//! call of tests/guest/init.c's two getppid calls, which proves resuming neither loses nor
//! repeats a hit while all stay armed; then `handle_irq_event` (inside an
//! interrupt, to follow `__irq_regs`). At the hits it checks the page walk against known
//! bytes (linux_banner as the console printed it, kernel text through two mappings against
//! guest-physical memory), per-CPU data, the syscall stack and the user frame at its top,
//! then disarms and lets the guest reboot.
//!
//! The kernel is the vmlinux (as termlab boots it) and System.map in $TERMLAB_KERNEL_DIR or
//! in the current default build (`guest-kernel/build --print-dir`). Where /dev/kvm cannot
//! run Linux (kvm-pvm) the test re-runs itself inside an L1 VM via termlab-nested.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use termlab_introspect::context::{task_stack_top, KernelCpu, PtRegs, PT_REGS_SIZE, THREAD_SIZE};
use termlab_introspect::paging::PageTables;
use termlab_introspect::symbols::SymbolTable;
use termlab_nested::cpio::CpioWriter;
use termlab_nested::L1Options;
use termlab_vmm::{ConsoleWait, ExitReason, Vm, VmConfig};

/// The boot's informational lines stay on: check_banner compares the kernel's banner, a
/// KERN_NOTICE line, with what the page walk reads.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr";
/// Everything runs in software emulation inside L1 here; be generous.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Start of the kernel image mapping (arch/x86/include/asm/page_64_types.h).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// `struct pcpu_hot` fields (arch/x86/include/asm/current.h, no call-depth tracking).
const PCPU_HOT_CPU_NUMBER: u64 = 12;
const PCPU_HOT_TOP_OF_STACK: u64 = 16;
const SYS_GETPPID: u64 = 110;
const USER_CS: u64 = 0x33;
const KERNEL_CS: u64 = 0x10;
const RFLAGS_IF: u64 = 1 << 9;

/// $TERMLAB_KERNEL_DIR, else the build of the current sources, else the last default build:
/// any recent guest kernel serves here, so sources edited since their last build need not fail
/// this test.
fn kernel_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TERMLAB_KERNEL_DIR") {
        return dir.into();
    }
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-kernel/build");
    let out = Command::new(&build)
        .args(["--print-dir", "--quiet"])
        .output()
        .expect("run guest-kernel/build");
    if out.status.success() {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let cache = std::env::var_os("TERMLAB_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/termlab"), PathBuf::from);
    let last = cache.join("kernel/default-current");
    eprintln!("the current kernel sources are not built; using {}", last.display());
    last
}

/// The test initramfs, built on the host before any re-execution (compiling inside the
/// emulated L1 VM would be slow) in cargo's per-target scratch dir, which L1 sees over 9p.
fn test_initramfs() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("termlab-introspect");
    let path = dir.join("initramfs.cpio");
    if termlab_nested::is_nested() {
        return path;
    }
    std::fs::create_dir_all(&dir).expect("create initramfs dir");
    let init = dir.join("init");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/init.c");
    let status = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .args([&init, &source])
        .status()
        .expect("run cc (apt-get install build-essential)");
    assert!(status.success(), "compiling {} failed", source.display());
    let mut cpio = CpioWriter::new(Vec::new());
    cpio.dir("/dev").and_then(|_| cpio.dir("/proc")).expect("cpio dirs");
    cpio.char_device("/dev/console", 5, 1).expect("cpio dev");
    cpio.file("/init", 0o755, &std::fs::read(&init).expect("read init")).expect("cpio init");
    std::fs::write(&path, cpio.finish().expect("cpio finish")).expect("write initramfs");
    path
}

/// True when this process has real KVM; otherwise this test ran, and passed, inside L1.
fn have_real_kvm(test_name: &str) -> bool {
    let options =
        L1Options { mem_mib: 2048, timeout: Duration::from_secs(900), ..L1Options::default() };
    termlab_nested::run_test_where_kvm_works(test_name, &options)
}

struct Guest {
    vm: Vm,
    symbols: SymbolTable,
}

impl Guest {
    fn sym(&self, name: &str) -> u64 {
        self.symbols.addr(name).unwrap_or_else(|| panic!("{name} not in System.map"))
    }

    fn console(&self) -> String {
        self.vm.console().text()
    }

    /// Arms breakpoints at `addrs` (paused: by the caller or at a hit).
    fn arm(&self, addrs: &[u64]) {
        let tables = PageTables::from_sregs(&self.vm.sregs(0).expect("sregs")).expect("paging");
        let bps: Vec<_> = addrs
            .iter()
            .map(|&a| tables.breakpoint(self.vm.memory(), a).expect("breakpoint"))
            .collect();
        self.vm.set_breakpoints(&bps).expect("set breakpoints");
    }

    /// Waits for the next hit and checks it is at `symbol`+`offset` and the vCPU is there.
    fn expect_hit(&self, symbol: &str, offset: u64) -> (usize, KernelCpu) {
        let hit = self.vm.wait_debug_event(Some(STEP_TIMEOUT)).unwrap_or_else(|| {
            let end = self.vm.wait_exit(Some(Duration::ZERO));
            termlab_nested::fail_guest_test(
                end == Some(ExitReason::TripleFault),
                &format!(
                    "no breakpoint hit at {symbol} (within {STEP_TIMEOUT:?}, or before the VM \
                     ended: {end:?}); console:\n{}",
                    self.console()
                ),
            )
        });
        eprintln!(
            "hit {hit:?} ({})",
            self.symbols.symbolize(hit.pc).map_or("?".into(), |l| l.to_string())
        );
        assert_eq!(hit.pc, self.sym(symbol) + offset, "{hit:?}");
        assert_eq!(self.vm.regs(hit.vcpu).expect("regs").rip, hit.pc);
        // Every other vCPU is parked too, so its state can be read.
        for other in (0..self.vm.vcpu_count()).filter(|&v| v != hit.vcpu) {
            self.vm.regs(other).expect("other vCPUs are paused at a hit");
        }
        (hit.vcpu, KernelCpu::of_vcpu(&self.vm, hit.vcpu).expect("kernel-mode vCPU"))
    }

    /// The page walk reads linux_banner exactly as the kernel printed it at boot.
    fn check_banner(&self, tables: &PageTables) {
        let mut raw = [0u8; 256];
        tables
            .read(self.vm.memory(), self.sym("linux_banner"), &mut raw)
            .expect("read linux_banner");
        let len = raw.iter().position(|&b| b == 0).expect("banner NUL");
        let banner = std::str::from_utf8(&raw[..len]).expect("banner text").trim_end();
        assert!(banner.starts_with("Linux version 6.12"), "{banner:?}");
        assert!(self.console().contains(banner), "banner {banner:?} not on the console");
    }

    /// Kernel text read through the kernel-image mapping, through the direct map and straight
    /// from guest-physical memory is the same, across several pages.
    fn check_two_mappings(&self, tables: &PageTables) {
        let mem = self.vm.memory();
        let phys_base = tables.read_u64(mem, self.sym("phys_base")).expect("phys_base");
        let page_offset_base =
            tables.read_u64(mem, self.sym("page_offset_base")).expect("page_offset_base");
        let virt = self.sym("_text") + 0x1800;
        let phys = virt - START_KERNEL_MAP + phys_base;
        let translated = tables.translate(mem, virt).expect("translate kernel text");
        assert_eq!(translated.gpa, phys);
        eprintln!(
            "{}-level paging; _text+0x1800 -> {phys:#x} in a {} KiB page; direct map at {page_offset_base:#x}",
            tables.levels(),
            translated.page_size >> 10
        );
        let (mut via_text, mut via_direct, mut direct) =
            (vec![0u8; 3 * 4096 + 100], vec![0u8; 3 * 4096 + 100], vec![0u8; 3 * 4096 + 100]);
        tables.read(mem, virt, &mut via_text).expect("read via text mapping");
        tables.read(mem, page_offset_base + phys, &mut via_direct).expect("read via direct map");
        self.vm.read_memory(phys, &mut direct).expect("read physical");
        assert!(via_text == direct && via_direct == direct, "the mappings disagree");
        assert!(direct.iter().any(|&b| b != 0), "kernel text is all zeroes");
    }

    /// Reads `len` bytes of kernel code at `addr`.
    fn code(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        PageTables::from_sregs(&self.vm.sregs(0).expect("sregs"))
            .expect("paging")
            .read(self.vm.memory(), addr, &mut bytes)
            .expect("read kernel code");
        bytes
    }

    /// At a function entry (before any push) inside getppid: the return address on top of the
    /// stack is in one of `callers`, the stack top is where this CPU's pcpu_hot says, and the
    /// user frame sits right below it. Returns that frame.
    fn check_syscall_stack(&self, vcpu: usize, cpu: &KernelCpu, callers: &[&str]) -> PtRegs {
        let mem = self.vm.memory();
        let sp = self.vm.regs(vcpu).expect("regs").rsp;
        let top = task_stack_top(sp);
        let pcpu_hot = self.sym("pcpu_hot");
        assert_eq!(
            cpu.read_percpu_u64(mem, pcpu_hot + PCPU_HOT_TOP_OF_STACK).expect("top_of_stack"),
            top
        );
        let cpu_number =
            cpu.read_percpu_u64(mem, pcpu_hot + PCPU_HOT_CPU_NUMBER).expect("cpu_number") as u32;
        assert_eq!(cpu_number as usize, vcpu, "per-CPU area of the wrong CPU");
        let stack =
            termlab_introspect::context::read_stack(mem, &cpu.tables, sp, top).expect("read stack");
        assert!(stack.words.len() * 8 < THREAD_SIZE as usize);
        let ret = self.symbols.symbolize_text(stack.words[0]).expect("return address symbol");
        assert!(
            callers.contains(&ret.symbol.name.as_str()),
            "returns to {ret}, expected one of {callers:?}"
        );
        for (addr, word) in stack.iter().take(8) {
            eprintln!(
                "  {addr:#x}: {word:#018x} {}",
                self.symbols.symbolize_text(word).map_or(String::new(), |l| l.to_string())
            );
        }
        let user = PtRegs::read(mem, &cpu.tables, top - PT_REGS_SIZE as u64).expect("user frame");
        assert!(user.from_user() && user.cs == USER_CS, "{user:x?}");
        assert_eq!(user.orig_ax, SYS_GETPPID);
        assert!(user.ip < 1 << 47, "{user:x?}");
        user
    }
}

#[test]
fn breakpoints_stop_the_guest_where_introspection_reads_it() {
    let name = "breakpoints_stop_the_guest_where_introspection_reads_it";
    let kernel_dir = kernel_dir();
    let initramfs = test_initramfs();
    if !have_real_kvm(name) {
        return;
    }
    let map = std::fs::read_to_string(kernel_dir.join("System.map")).expect("read System.map");
    let symbols = SymbolTable::parse(&map).expect("parse System.map");
    let mut config = VmConfig::new(kernel_dir.join("vmlinux"), Some(initramfs), CMDLINE.into());
    config.mem_mib = 256;
    let mut guest = Guest { vm: Vm::new(config).expect("create VM"), symbols };
    guest.vm.start().expect("start VM");
    match guest.vm.wait_for_console("INTROSPECT-READY", STEP_TIMEOUT) {
        ConsoleWait::Found => {}
        other => termlab_nested::fail_guest_test(
            other == ConsoleWait::Ended(ExitReason::TripleFault),
            &format!("init did not get ready ({other:?}); console:\n{}", guest.console()),
        ),
    }
    // init waits two seconds before its first getppid call; it is the only caller.
    guest.vm.pause().expect("pause");
    let getppid = guest.sym("__x64_sys_getppid");
    let task_pid = guest.sym("__task_pid_nr_ns");
    // endbr64, then the 5-byte nop of a patchable function entry: two kinds of step-over.
    const ENTRY: [u8; 9] = [0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00];
    assert_eq!(guest.code(getppid, 9), ENTRY, "getppid's first instructions");
    // ... and in the callee `push %rbp; mov %esi,%ebp; push %rbx` right after them: a trap on
    // a one-byte push covers the next instruction's first byte too, so stepping over takes two
    // steps, which end on the next breakpoint.
    const PUSHES: [u8; 4] = [0x55, 0x89, 0xf5, 0x53];
    assert_eq!(
        guest.code(task_pid, 13),
        [&ENTRY[..], &PUSHES].concat(),
        "__task_pid_nr_ns's first instructions"
    );
    guest.arm(&[getppid, getppid + 4, task_pid + 9, task_pid + 12]);
    guest.vm.resume().expect("resume");
    const SYSCALL: &[&str] = &["x64_sys_call", "do_syscall_64"];
    const GETPPID: &[&str] = &["__do_sys_getppid", "__x64_sys_getppid"];

    for call in 1..=2 {
        let (vcpu, cpu) = guest.expect_hit("__x64_sys_getppid", 0);
        if call == 1 {
            guest.check_banner(&cpu.tables);
            guest.check_two_mappings(&cpu.tables);
        }
        let user = guest.check_syscall_stack(vcpu, &cpu, SYSCALL);
        assert_eq!(user.di, call, "call {call} passes {call}");
        guest.vm.resume().expect("resume");
        // Skipping the endbr64 leads the same call straight to the next breakpoint.
        let (vcpu, cpu) = guest.expect_hit("__x64_sys_getppid", 4);
        assert_eq!(guest.check_syscall_stack(vcpu, &cpu, SYSCALL).di, call, "still call {call}");
        guest.vm.resume().expect("resume");
        let (vcpu, cpu) = guest.expect_hit("__task_pid_nr_ns", 9);
        assert_eq!(
            guest.check_syscall_stack(vcpu, &cpu, GETPPID).di,
            call,
            "getppid's callee in call {call}"
        );
        let before = guest.vm.regs(vcpu).expect("regs");
        guest.vm.resume().expect("resume");
        let (vcpu, cpu) = guest.expect_hit("__task_pid_nr_ns", 12);
        let after = guest.vm.regs(vcpu).expect("regs");
        // `push %rbp` ran once, `mov %esi,%ebp` ran once.
        assert_eq!(after.rsp, before.rsp - 8);
        assert_eq!(
            cpu.tables.read_u64(guest.vm.memory(), after.rsp).expect("pushed word"),
            before.rbp
        );
        assert_eq!(after.rbp, before.rsi & 0xffff_ffff);
        guest.vm.resume().expect("resume");
    }

    // Re-arm on an interrupt path: handle_irq_event runs inside common_interrupt, after
    // set_irq_regs() published the interrupted frame.
    guest.vm.pause().expect("pause");
    guest.arm(&[guest.sym("handle_irq_event")]);
    guest.vm.resume().expect("resume");
    let (_, cpu) = guest.expect_hit("handle_irq_event", 0);
    let mem = guest.vm.memory();
    let interrupted = cpu
        .interrupted(mem, guest.sym("__irq_regs"))
        .expect("read __irq_regs")
        .expect("__irq_regs set");
    let regs = interrupted.regs;
    eprintln!(
        "interrupted at {:#x} ({:?}), frame at {:#x}",
        regs.ip,
        guest.symbols.symbolize(regs.ip).map(|l| l.to_string()),
        interrupted.regs_addr
    );
    assert!(regs.flags & RFLAGS_IF != 0 && regs.flags & 2 != 0, "{regs:x?}");
    match regs.cs {
        USER_CS => assert!(regs.ip < 1 << 47 && interrupted.stack.is_none(), "{regs:x?}"),
        KERNEL_CS => {
            guest
                .symbols
                .symbolize_text(regs.ip)
                .expect("interrupted kernel code has a text symbol");
            let stack = interrupted.stack.expect("kernel context has a stack");
            // The frame was pushed on the interrupted stack, just below its sp.
            assert!(
                interrupted.regs_addr + PT_REGS_SIZE as u64 <= stack.sp && stack.sp < stack.top,
                "{stack:x?}"
            );
        }
        other => panic!("interrupted CS {other:#x}"),
    }

    // Disarmed, the guest runs to its end.
    guest.vm.set_breakpoints(&[]).expect("disarm");
    guest.vm.resume().expect("resume");
    let end = guest.vm.wait_exit(Some(STEP_TIMEOUT));
    if end != Some(ExitReason::Reset) {
        termlab_nested::fail_guest_test(
            end == Some(ExitReason::TripleFault),
            &format!("the guest ended {end:?}, not by its reset; console:\n{}", guest.console()),
        );
    }
    assert_eq!(guest.vm.wait_debug_event(Some(Duration::from_secs(1))), None);
    let console = guest.console();
    for marker in ["GETPPID-1", "GETPPID-2", "INTROSPECT-DONE"] {
        assert!(console.contains(marker), "no {marker}; console:\n{console}");
    }
    // The guest's own kallsyms agrees with System.map (nokaslr).
    let line = console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("KALLSYMS="))
        .expect("KALLSYMS line");
    let kallsyms = SymbolTable::parse(line).expect("parse kallsyms line");
    assert_eq!(kallsyms.addr("__x64_sys_getppid"), Some(guest.sym("__x64_sys_getppid")));
}
