//! The scenario file format (`scenarios/*.toml`).
//!
//! Every table rejects unknown keys, and every value with a range is a
//! newtype that checks it while deserializing, so toml reports the exact
//! position of the offending value. Cross references (step labels, program
//! names, metric names) are checked afterwards by [`super::validate`], which
//! uses the `Spanned` positions kept here.
//!
//! Steps and expectations are externally tagged enums (`trigger = { ... }`)
//! rather than `action = "trigger"` tables: serde buffers internally tagged
//! enums, which would lose toml's positions inside the step.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// In which repetitions the VMM proves the stack rewrite (`verify_stack`). Its traps stop
/// the vCPU at the handler for tens of milliseconds under nesting, and the guest's clock runs
/// on: the repetitions without them measure the mechanism itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyStack {
    /// `false`: never.
    Off,
    /// `true`: in every repetition.
    Every,
    /// `"alternate"`: in the even repetitions (0, 2, ...); the odd ones run untouched.
    Alternate,
}

impl VerifyStack {
    /// Whether the VMM proves the stack rewrite in repetition `index`.
    pub fn in_repetition(self, index: u32) -> bool {
        match self {
            VerifyStack::Off => false,
            VerifyStack::Every => true,
            VerifyStack::Alternate => index.is_multiple_of(2),
        }
    }
}

impl<'de> Deserialize<'de> for VerifyStack {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Value;
        impl serde::de::Visitor<'_> for Value {
            type Value = VerifyStack;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"alternate\"")
            }
            fn visit_bool<E: serde::de::Error>(self, every: bool) -> Result<VerifyStack, E> {
                Ok(if every { VerifyStack::Every } else { VerifyStack::Off })
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<VerifyStack, E> {
                match text {
                    "alternate" => Ok(VerifyStack::Alternate),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
                }
            }
        }
        deserializer.deserialize_any(Value)
    }
}

impl Serialize for VerifyStack {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            VerifyStack::Off => serializer.serialize_bool(false),
            VerifyStack::Every => serializer.serialize_bool(true),
            VerifyStack::Alternate => serializer.serialize_str("alternate"),
        }
    }
}

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// One line shown by `termlab list`.
    pub description: String,
    /// How many times the steps run in the same booted VM.
    #[serde(default)]
    pub repetitions: Repetitions,
    /// Capture the interrupted stack from the VMM around every terminate
    /// and check the kernel's rewrite of it (issue 6): adds one expectation
    /// per terminate step. `true` in every repetition, `"alternate"` in
    /// every other one (see [`VerifyStack`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_stack: Option<Spanned<VerifyStack>>,
    pub vm: VmSpec,
    /// `/proc/sys` settings applied once after boot, e.g.
    /// `"kernel.bpf_termination_demo_delay_ms" = 500`.
    #[serde(default)]
    pub sysctl: BTreeMap<SysctlName, SysctlValue>,
    /// Resident BPF loaders started once after boot, before the first repetition.
    #[serde(default, rename = "program")]
    pub programs: Vec<ProgramSpec>,
    /// Executed in order, once per repetition.
    #[serde(rename = "step")]
    pub steps: Vec<Step>,
    /// Durations computed per repetition from two step timestamps.
    #[serde(default, rename = "metric")]
    pub metrics: Vec<MetricSpec>,
    /// Checks that decide the exit status of `termlab run`.
    #[serde(default, rename = "expect")]
    pub expectations: Vec<Expectation>,
}

impl Scenario {
    /// In which repetitions the VMM proves the stack rewrite (off when not set).
    pub fn stack_proof(&self) -> VerifyStack {
        self.verify_stack.as_ref().map_or(VerifyStack::Off, |v| *v.get_ref())
    }
}

/// The guest machine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub kernel: KernelVariant,
    #[serde(default)]
    pub vcpus: Vcpus,
    #[serde(default)]
    pub memory_mib: MemoryMib,
    /// Extra files for the guest, added to the initramfs:
    /// `files = [{ host = "bin/tool", guest = "/bin/tool" }]`.
    #[serde(default)]
    pub files: Vec<GuestFileSpec>,
    /// Appended to the guest kernel's command line (see [`super::check_kernel_args`]).
    #[serde(default)]
    pub kernel_args: Option<Spanned<String>>,
    /// What the kernel must have that the steps and sysctls do not show, e.g. a loader or
    /// trigger of the scenario's own that calls BPF_PROG_TERMINATE: `requires =
    /// ["termination"]`. Checked before booting like what is inferred
    /// ([`super::termination_series_use`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<KernelFeature>,
}

/// A kernel feature a scenario can require in `[vm] requires`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFeature {
    /// The termination series (guest-kernel/patches): BPF_PROG_TERMINATE, runtime budgets,
    /// their trace events, counters and sysctls.
    Termination,
}

/// One `[vm] files` entry. `host` is relative to the scenario file's directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFileSpec {
    pub host: Spanned<String>,
    /// Absolute guest path, e.g. `/bin/tool`.
    pub guest: Spanned<String>,
}

/// Which guest kernel build to boot: the variants of `guest-kernel/build --variant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KernelVariant {
    /// The termination series applied (CONFIG_BPF_TERMINATION=y).
    Default,
    /// The patched kernel with KASAN/LOCKDEP/KMEMLEAK (stress tests).
    Debug,
    /// The same source and config with CONFIG_BPF_TERMINATION=n: the baseline.
    Noterm,
    /// The patched kernel with BTF, fprobe, BPF LSM, INET, veth, XDP/tc,
    /// cgroup BPF and sched_ext: CO-RE programs and every program type.
    Full,
    /// The patched kernel made fully preemptible (CONFIG_PREEMPT=y): runs that
    /// only disable migration can be switched out in the middle.
    Preempt,
}

impl KernelVariant {
    /// The name `guest-kernel/build --variant` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelVariant::Default => "default",
            KernelVariant::Debug => "debug",
            KernelVariant::Noterm => "noterm",
            KernelVariant::Full => "full",
            KernelVariant::Preempt => "preempt",
        }
    }
}

/// A BPF program the steps act on, loaded once after boot by a resident
/// loader that prints `prog_id=N` and holds the program until killed.
///
/// Either a user's own program, loaded by the generic guest loader
/// (`guest-samples/bpf/bpf_loader.c`):
///
/// ```toml
/// [[program]]
/// name = "spin"                 # what steps call it
/// source = "spin.bpf.c"         # or object = "spin.bpf.o"; relative to the scenario file
/// function = "spin"             # which program of the object (optional if it holds one)
/// trigger = ["sync"]            # any guest command, or test_run = { data_hex = "..." }
/// ```
///
/// or a loader command of its own (`loader`, with `bpf_name` and `trigger`), or a
/// `source` with the C source of its own libbpf skeleton loader (`loader_source`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramSpec {
    /// Name the steps use to refer to this program.
    pub name: Spanned<Label>,
    /// A compiled BPF object (ELF), relative to the scenario file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<Spanned<String>>,
    /// BPF C source, compiled on the host with clang (see `crate::user_programs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Spanned<String>>,
    /// With `source`: the clang that compiles it, `clang` (the default) or `clang-N` from
    /// the host's PATH, e.g. `clang-19` for a program whose kptr fields need BTF type tags,
    /// which Debian 12's clang 14 does not emit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clang: Option<Spanned<String>>,
    /// The program's C function name in the object; needed when it holds several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<Spanned<String>>,
    /// Attach by section name after loading (default true); `false` for a
    /// program that is only run through `test_run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Spanned<bool>>,
    /// A cgroup program's cgroup v2 directory in the guest (under
    /// /sys/fs/cgroup/, created if missing): the loader attaches it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Spanned<String>>,
    /// An XDP program's guest network interface: the loader attaches it to
    /// that interface's XDP hook (native mode). An interface the guest lacks
    /// is created as one end of a veth pair whose other end is
    /// `<interface>_peer`, both up: frames sent out of the peer arrive there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp: Option<Spanned<String>>,
    /// A tc program's guest network interface: the loader attaches it at that
    /// interface's ingress (a clsact qdisc); a missing interface is made as
    /// for `xdp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc: Option<Spanned<String>>,
    /// The program whose loader loads this one from its object beside it:
    /// the target of its tail calls, unattached (`bpf_loader load --also
    /// FUNCTION`), or another callback of the struct_ops map its own loader
    /// (`loader_source`) attaches, which prints `also.FUNCTION=ID`. It runs
    /// only through that program. Needs `function`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_by: Option<Spanned<Label>>,
    /// Guest argv of a loader of its own (e.g. `["term_stress", "hold"]`),
    /// which prints `prog_id=N` once the program is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<Spanned<Argv>>,
    /// With `source`: the C source of the program's own user-space loader, written the
    /// usual libbpf way around the object's skeleton (`#include "x.skel.h"` for a source
    /// `x.bpf.c`, whose functions are `x_bpf__open()` ...), compiled here, static, against
    /// the kernel's libbpf (see `crate::user_programs`). Like `loader` it prints
    /// `prog_id=N` and holds the program until killed; needs `bpf_name` and `trigger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_source: Option<Spanned<String>>,
    /// With `loader` or `loader_source`: the kernel-side BPF program name (for `by = "name"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_name: Option<Spanned<BpfProgName>>,
    /// Guest argv a trigger step runs to make the program run (e.g.
    /// `["trigger_loops"]`, or any command that fires its attach point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Spanned<Argv>>,
    /// Instead of `trigger`: run the program with BPF_PROG_TEST_RUN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_run: Option<Spanned<TestRunSpec>>,
    /// The first word of the line in which the trigger command prints its
    /// `key=value` fields (default [`DEFAULT_SUMMARY_LINE`]): a tool with a
    /// summary line of its own (`term_stress` prints `stress ...`) is read
    /// as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_line: Option<Spanned<String>>,
}

/// The line a trigger's `key=value` fields are read from unless its program
/// names another (`summary_line`).
pub const DEFAULT_SUMMARY_LINE: &str = "trigger";
/// The clang a program's `source` is compiled with unless it names another.
pub const DEFAULT_CLANG: &str = "clang";

impl ProgramSpec {
    /// The first word of the line holding its trigger's fields.
    pub fn summary_line(&self) -> &str {
        self.summary_line.as_ref().map_or(DEFAULT_SUMMARY_LINE, |line| line.get_ref().as_str())
    }

    /// The program whose loader loads this one (`loaded_by`).
    pub fn loaded_by(&self) -> Option<&Label> {
        self.loaded_by.as_ref().map(Spanned::get_ref)
    }

    /// The clang that compiles its `source`.
    pub fn clang(&self) -> &str {
        self.clang.as_ref().map_or(DEFAULT_CLANG, |clang| clang.get_ref().as_str())
    }

    /// Whether the generic loader loads it (`object`, or `source` without `loader_source`).
    pub fn is_user_object(&self) -> bool {
        (self.object.is_some() || self.source.is_some()) && self.loader_source.is_none()
    }

    /// Whether to attach after loading.
    pub fn attaches(&self) -> bool {
        self.attach.as_ref().is_none_or(|attach| *attach.get_ref())
    }
}

/// `test_run = { data_hex = "00ff...", repeat = 10 }`: what a trigger step
/// passes to BPF_PROG_TEST_RUN. `data_file` (relative to the scenario file)
/// is copied into the guest; without data the run gets no packet (raw_tp).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestRunSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hex: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<Spanned<String>>,
    #[serde(default)]
    pub repeat: TestRunRepeat,
}

/// One step of a repetition.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Run the program's trigger command once.
    Trigger(TriggerStep),
    /// Sleep; see [`SleepStep`].
    Sleep(SleepStep),
    /// Wait until a background trigger has finished.
    Wait(WaitStep),
    /// Wait until a background trigger's program wrote a line to the trace buffer.
    WaitTrace(WaitTraceStep),
    /// Call BPF_PROG_TERMINATE.
    Terminate(TerminateStep),
    /// Set a program's runtime budget (`bpftool prog budget`).
    Budget(BudgetStep),
    /// Read a program's termination counters (`bpftool prog show`).
    ProgInfo(ProgInfoStep),
    /// Run a guest command through the agent; see [`ExecStep`].
    Exec(ExecStep),
    /// Ask the guest kernel's kmemleak for leaked memory; see [`KmemleakStep`].
    Kmemleak(KmemleakStep),
}

impl Step {
    /// The label under which this step's timestamps are recorded, if any.
    pub fn label(&self) -> Option<&Spanned<Label>> {
        match self {
            Step::Trigger(t) => Some(&t.label),
            Step::Terminate(t) => Some(&t.label),
            Step::Budget(b) => Some(&b.label),
            Step::ProgInfo(p) => Some(&p.label),
            Step::Exec(e) => Some(&e.label),
            Step::Kmemleak(k) => Some(&k.label),
            Step::Sleep(_) | Step::Wait(_) | Step::WaitTrace(_) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerStep {
    pub label: Spanned<Label>,
    pub program: Spanned<Label>,
    /// Arguments appended to the program's trigger command.
    #[serde(default)]
    pub args: Vec<String>,
    /// Do not wait for it; a later `wait` step collects it.
    #[serde(default)]
    pub background: bool,
    /// Pin the trigger (and so the BPF program run) to this vCPU.
    #[serde(default)]
    pub cpu: Option<Spanned<u32>>,
    #[serde(default)]
    pub timeout_ms: TimeoutMs,
}

/// Run `argv` in the guest (the agent's `run` op) and wait for it, e.g. to
/// prepare the guest or, in the harness's own tests, to make the guest fail
/// (`termlab/tests/faults/`). A non-zero exit or a timeout stops the run.
/// Its `start`/`end` points are when the agent started it and saw it end.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStep {
    pub label: Spanned<Label>,
    pub argv: Argv,
    #[serde(default)]
    pub timeout_ms: TimeoutMs,
}

/// Sleep `ms` milliseconds, or, with `after`, until `ms` milliseconds after
/// the start of that (background) step.
///
/// `after` counts from when the agent reported the process started, on the
/// host clock; the program itself runs later, once the trigger process has
/// set itself up, which under nested emulation can take hundreds of
/// milliseconds. To act while a program is inside a helper, use
/// `wait_trace`, which observes the program instead.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SleepStep {
    pub ms: DurationMs,
    #[serde(default)]
    pub after: Option<Spanned<Label>>,
}

/// Wait until the kernel trace buffer holds `count` lines containing `line`
/// (a substring) written after background trigger `step` started: the
/// program's own `bpf_printk` lines, or the kernel's events, e.g.
/// `bpf_termination_demo_delay_begin`, which the demo's slow helper traces
/// once the run is inside it. (A line the program prints right before a
/// call does not say that: the run can still be in `bpf_trace_printk`.)
///
/// The agent reads /sys/kernel/tracing/trace_pipe without blocking, again
/// and again, from its own thread: nothing has to be started in the guest
/// while the program runs. (Starting processes then does not work: a CPU
/// busy in a long helper delays the RCU grace periods exec needs, so a probe
/// process polling the program's state stalled until the helper returned;
/// and a blocked reader of trace_pipe was only woken after the run.) Only
/// lines written after `step` started count.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WaitTraceStep {
    pub step: Spanned<Label>,
    pub line: String,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub timeout_ms: TimeoutMs,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WaitStep {
    pub step: Spanned<Label>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateStep {
    pub label: Spanned<Label>,
    /// What to terminate: a declared program (its id is looked up after
    /// loading) or a raw id (for the "unknown id" error case).
    #[serde(default)]
    pub program: Option<Spanned<Label>>,
    #[serde(default)]
    pub prog_id: Option<Spanned<u32>>,
    /// `agent` calls bpf() directly and timestamps the call; `bpftool`
    /// runs `bpftool prog terminate` (the user-facing path).
    #[serde(default)]
    pub via: TerminateVia,
    /// With `via = "bpftool"`: name the program by id or by name.
    #[serde(default)]
    pub by: TerminateBy,
    /// Named flags (`["detach"]`).
    #[serde(default)]
    pub flags: Vec<TerminateFlag>,
    /// Raw flags word instead of `flags`, for the invalid-flags case.
    #[serde(default)]
    pub raw_flags: Option<Spanned<u32>>,
    /// Make the call as this uid without capabilities (the EPERM case).
    #[serde(default)]
    pub as_uid: Option<Spanned<u32>>,
    /// The VMM parks every vCPU this long as the call sends its first stop interrupt (a
    /// breakpoint on `smp_call_function_single_async`), the way a host that deschedules its
    /// guest would: the guest's clock runs on meanwhile.
    #[serde(default)]
    pub host_stall_ms: Option<Spanned<u32>>,
}

/// `kmemleak = { label = "leaks" }`: has the guest kernel's kmemleak
/// (CONFIG_DEBUG_KMEMLEAK: the `debug` variant, and the `full` one booted
/// with `kmemleak=on`) scan twice, 5 s apart (its minimum age of a reported
/// object), records the unreferenced objects it reports, then clears them,
/// so that the next kmemleak step reports only what leaked after this one.
/// A kernel without kmemleak, or with it off, fails the step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmemleakStep {
    pub label: Spanned<Label>,
    /// How long the scans may take (a debug kernel under emulation: seconds).
    #[serde(default)]
    pub timeout_ms: TimeoutMs,
}

/// `budget = { label = "set", program = "spin", ms = 300 }`: runs
/// `bpftool prog budget id ID MS`. The value goes to the kernel unchecked, so
/// that a scenario can expect its errno (EINVAL above 60000 ms).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetStep {
    pub label: Spanned<Label>,
    /// A declared program, or a raw id (the "unknown id" case).
    #[serde(default)]
    pub program: Option<Spanned<Label>>,
    #[serde(default)]
    pub prog_id: Option<Spanned<u32>>,
    /// The budget in ms; 0 = the system-wide `kernel.bpf_max_runtime_ms`.
    pub ms: Spanned<u32>,
    /// Run bpftool as this uid without capabilities (the EPERM case).
    #[serde(default)]
    pub as_uid: Option<Spanned<u32>>,
}

/// `prog_info = { label = "after", program = "spin" }`: records the
/// program's runtime budget and how many of its runs were terminated on
/// demand and by budget (`bpftool --json prog show`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProgInfoStep {
    pub label: Spanned<Label>,
    pub program: Spanned<Label>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminateVia {
    #[default]
    Agent,
    Bpftool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminateBy {
    #[default]
    Id,
    Name,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminateFlag {
    /// BPF_F_TERMINATE_DETACH: also detach the program's links.
    Detach,
}

impl TerminateFlag {
    pub fn bits(self) -> u32 {
        match self {
            TerminateFlag::Detach => 1 << 0,
        }
    }
}

/// A duration between two step timestamps on the guest clock.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub name: Spanned<Label>,
    pub from: Spanned<EventRef>,
    pub to: Spanned<EventRef>,
}

/// `"<step label>.<point>"`: a moment of a step, on the guest's CLOCK_MONOTONIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventRef {
    pub step: Label,
    pub point: EventPoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventPoint {
    /// Trigger: the run began. Terminate: bpf() was called (user space).
    Start,
    /// Trigger: the run returned. Terminate: bpf() returned (user space).
    End,
    /// Terminate, kernel trace: BPF_PROG_TERMINATE entered.
    Request,
    /// Terminate, kernel trace: the IPI round that reached the last handler was sent.
    IpiSent,
    /// Kernel trace: the last CPU's handler began (for a trigger: the budget's tick).
    HandlerEntry,
    /// Kernel trace: the handler finished on the last CPU. For a trigger:
    /// the kernel stopped its run for exceeding the runtime budget.
    Stopped,
    /// Terminate, kernel trace: BPF_PROG_TERMINATE about to return.
    Done,
    /// Kernel trace: the last terminated run returned.
    Returned,
    /// Kernel trace: the interrupted slow helper returned (case 1).
    HelperReturned,
}

impl EventPoint {
    const NAMES: [(&'static str, EventPoint); 9] = [
        ("start", EventPoint::Start),
        ("end", EventPoint::End),
        ("request", EventPoint::Request),
        ("ipi_sent", EventPoint::IpiSent),
        ("handler_entry", EventPoint::HandlerEntry),
        ("stopped", EventPoint::Stopped),
        ("done", EventPoint::Done),
        ("returned", EventPoint::Returned),
        ("helper_returned", EventPoint::HelperReturned),
    ];

    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, point)| *point == self).map_or("?", |(name, _)| name)
    }

    /// Points from the kernel's trace of a termination: a terminate step's,
    /// or a trigger's whose run the kernel stopped for its budget.
    pub fn is_kernel_trace(self) -> bool {
        !matches!(self, EventPoint::Start | EventPoint::End)
    }

    /// Points of the BPF_PROG_TERMINATE call itself: only terminate steps.
    pub fn is_request(self) -> bool {
        matches!(self, EventPoint::Request | EventPoint::IpiSent | EventPoint::Done)
    }
}

impl TryFrom<String> for EventRef {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let names: Vec<&str> = EventPoint::NAMES.iter().map(|(name, _)| *name).collect();
        let bad = || {
            format!("`{text}` is not `<step label>.<point>` with point one of {}", names.join(", "))
        };
        let (step, point) = text.rsplit_once('.').ok_or_else(bad)?;
        let point = EventPoint::NAMES
            .iter()
            .find(|(name, _)| *name == point)
            .map(|(_, p)| *p)
            .ok_or_else(bad)?;
        Ok(EventRef { step: Label::try_from(step.to_owned())?, point })
    }
}

impl From<EventRef> for String {
    fn from(event: EventRef) -> String {
        event.to_string()
    }
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.step, self.point.name())
    }
}

/// A named check; its name is what a failure message shows. In the file it
/// is `name` plus exactly one of the check keys:
///
/// ```toml
/// [[expect]]
/// name = "run ended soon after terminate"
/// metric = { metric = "end_to_end", at_most_ms = 100 }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "ExpectationTable", into = "ExpectationTable")]
pub struct Expectation {
    pub name: String,
    pub check: Check,
    /// `premise = true`: the check is what the repetition must have set up to test anything
    /// (a request that came while the run still had its work ahead, say). A repetition where
    /// it fails tested nothing and runs again, as often as one whose terminate came too late;
    /// if the last try fails it too, the expectation fails the run like any other.
    pub premise: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Check {
    /// Every repetition's value of a metric lies within bounds.
    Metric(MetricBound),
    /// A terminate step returned this errno or signalled this many CPUs.
    TerminateResult(TerminateResultCheck),
    /// A trigger step exited 0 and reported its timing.
    TriggerOk(TriggerOkCheck),
    /// A `key=value` field of a trigger's output line has this value, e.g.
    /// `second_done = 0`: the second slow helper did not run.
    TriggerField(TriggerFieldCheck),
    /// No WARN/BUG/oops/KASAN/lockdep report appeared in the guest's dmesg.
    DmesgClean(DmesgCheck),
    /// The kernel's trace of a terminate step, or of a trigger whose run it
    /// stopped for its budget, shows the intended path: every stopped CPU in
    /// this case, enough frames rewritten, none lost.
    KernelCase(KernelCaseCheck),
    /// A budget step succeeded or failed with this errno.
    BudgetResult(BudgetResultCheck),
    /// Between two prog_info steps, this many more runs were terminated.
    Terminations(TerminationsCheck),
    /// A kmemleak step found no unreferenced object.
    KmemleakClean(KmemleakCleanCheck),
}

/// The file form of [`Expectation`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectationTable {
    name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    premise: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metric: Option<MetricBound>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    terminate_result: Option<TerminateResultCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trigger_ok: Option<TriggerOkCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trigger_field: Option<TriggerFieldCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dmesg_clean: Option<DmesgCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel_case: Option<KernelCaseCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget_result: Option<BudgetResultCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    terminations: Option<TerminationsCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kmemleak_clean: Option<KmemleakCleanCheck>,
}

impl TryFrom<ExpectationTable> for Expectation {
    type Error = String;
    fn try_from(table: ExpectationTable) -> Result<Self, String> {
        let mut checks = Vec::new();
        checks.extend(table.metric.map(Check::Metric));
        checks.extend(table.terminate_result.map(Check::TerminateResult));
        checks.extend(table.trigger_ok.map(Check::TriggerOk));
        checks.extend(table.trigger_field.map(Check::TriggerField));
        checks.extend(table.dmesg_clean.map(Check::DmesgClean));
        checks.extend(table.kernel_case.map(Check::KernelCase));
        checks.extend(table.budget_result.map(Check::BudgetResult));
        checks.extend(table.terminations.map(Check::Terminations));
        checks.extend(table.kmemleak_clean.map(Check::KmemleakClean));
        if table.premise && matches!(checks.as_slice(), [Check::DmesgClean(_)]) {
            return Err(format!(
                "expectation `{}`: `premise` needs a check of one repetition's records, and dmesg_clean reads the kernel log at the end of the run",
                table.name
            ));
        }
        match (checks.pop(), checks.is_empty()) {
            (Some(check), true) => {
                Ok(Expectation { name: table.name, check, premise: table.premise })
            }
            _ => Err(format!(
                "expectation `{}` needs exactly one of `metric`, `terminate_result`, `trigger_ok`, `trigger_field`, `dmesg_clean`, `kernel_case`, `budget_result`, `terminations`, `kmemleak_clean`",
                table.name
            )),
        }
    }
}

impl From<Expectation> for ExpectationTable {
    fn from(expectation: Expectation) -> Self {
        let mut table = ExpectationTable {
            name: expectation.name,
            premise: expectation.premise,
            ..Default::default()
        };
        match expectation.check {
            Check::Metric(c) => table.metric = Some(c),
            Check::TerminateResult(c) => table.terminate_result = Some(c),
            Check::TriggerOk(c) => table.trigger_ok = Some(c),
            Check::TriggerField(c) => table.trigger_field = Some(c),
            Check::DmesgClean(c) => table.dmesg_clean = Some(c),
            Check::KernelCase(c) => table.kernel_case = Some(c),
            Check::BudgetResult(c) => table.budget_result = Some(c),
            Check::Terminations(c) => table.terminations = Some(c),
            Check::KmemleakClean(c) => table.kmemleak_clean = Some(c),
        }
        table
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricBound {
    pub metric: Spanned<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_most_ms: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateResultCheck {
    pub step: Spanned<Label>,
    /// Expected failure, e.g. `"ENOENT"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<Errno>,
    /// Expected success with exactly this many CPUs signalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
}

/// `kernel_case = { step = "term", case = 1, min_frames = 1 }`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KernelCaseCheck {
    pub step: Spanned<Label>,
    /// 1: stopped inside a helper; 2: stopped in BPF text; absent: either
    /// (a budget stop lands wherever the tick finds the run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<Spanned<u32>>,
    /// At least this many stack words redirected on each CPU (default 0).
    #[serde(default)]
    pub min_frames: u32,
}

/// `budget_result = { step = "too-big", errno = "EINVAL" }`; without
/// `errno`, the budget step must have succeeded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetResultCheck {
    pub step: Spanned<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<Errno>,
}

/// `kmemleak_clean = { step = "leaks" }`: that kmemleak step found no
/// unreferenced object, in every repetition.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmemleakCleanCheck {
    pub step: Spanned<Label>,
}

/// `terminations = { from = "before", to = "after", budget = 2, on_demand = 0 }`:
/// the counters of two prog_info steps of the same program differ by this
/// much in every repetition; an absent count is not checked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TerminationsCheck {
    pub from: Spanned<Label>,
    pub to: Spanned<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerOkCheck {
    pub step: Spanned<Label>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerFieldCheck {
    pub step: Spanned<Label>,
    /// A field name of the `trigger ...` line, e.g. `second_done`.
    pub field: String,
    pub equals: i64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DmesgCheck {}

/// The errnos BPF_PROG_TERMINATE documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Errno {
    ENOENT,
    ESRCH,
    /// The program's only runs were stopped by an earlier call and are finishing.
    EALREADY,
    /// The program runs only where no interrupt can reach it now (started with
    /// interrupts off: NMI, hardirq, int3 kprobe); nothing was stopped.
    EBUSY,
    /// A run was entering or leaving the program on each of the kernel's tries (between
    /// its running marker and its first or after its last instruction); nothing was stopped.
    EAGAIN,
    EINVAL,
    EPERM,
    EOPNOTSUPP,
}

impl Errno {
    pub const ALL: [Errno; 8] = [
        Errno::ENOENT,
        Errno::ESRCH,
        Errno::EALREADY,
        Errno::EBUSY,
        Errno::EAGAIN,
        Errno::EINVAL,
        Errno::EPERM,
        Errno::EOPNOTSUPP,
    ];

    pub fn code(self) -> i32 {
        match self {
            Errno::ENOENT => libc::ENOENT,
            Errno::ESRCH => libc::ESRCH,
            Errno::EALREADY => libc::EALREADY,
            Errno::EBUSY => libc::EBUSY,
            Errno::EAGAIN => libc::EAGAIN,
            Errno::EINVAL => libc::EINVAL,
            Errno::EPERM => libc::EPERM,
            Errno::EOPNOTSUPP => libc::EOPNOTSUPP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Errno::ENOENT => "ENOENT",
            Errno::ESRCH => "ESRCH",
            Errno::EALREADY => "EALREADY",
            Errno::EBUSY => "EBUSY",
            Errno::EAGAIN => "EAGAIN",
            Errno::EINVAL => "EINVAL",
            Errno::EPERM => "EPERM",
            Errno::EOPNOTSUPP => "EOPNOTSUPP",
        }
    }
}

/// Declares a `u32` newtype whose range is checked while deserializing.
macro_rules! bounded_u32 {
    ($(#[$doc:meta])* $name:ident, $what:literal, $min:expr, $max:expr, $default:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
        #[serde(try_from = "i64", into = "u32")]
        pub struct $name(u32);

        impl $name {
            pub const MIN: u32 = $min;
            pub const MAX: u32 = $max;
            pub fn get(self) -> u32 {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name($default)
            }
        }

        impl TryFrom<i64> for $name {
            type Error = String;
            fn try_from(value: i64) -> Result<Self, String> {
                if (i64::from($min)..=i64::from($max)).contains(&value) {
                    // In range, so it fits.
                    Ok($name(value as u32))
                } else {
                    Err(format!(concat!($what, " must be between {} and {}, not {}"), $min, $max, value))
                }
            }
        }

        impl From<$name> for u32 {
            fn from(value: $name) -> u32 {
                value.0
            }
        }
    };
}

bounded_u32!(
    /// Number of guest vCPUs (the guest kernel is built with NR_CPUS=8).
    Vcpus, "vcpus", 1, 8, 2
);
bounded_u32!(
    /// Guest memory; the initramfs needs some room, the host has limits.
    MemoryMib, "memory_mib", 64, 16384, 256
);
bounded_u32!(
    /// Repetitions of the steps in one boot.
    Repetitions, "repetitions", 1, 100_000, 10
);
bounded_u32!(
    /// A sleep; longer than ten minutes is surely a typo.
    DurationMs, "ms", 0, 600_000, 0
);
bounded_u32!(
    /// BPF_PROG_TEST_RUN's repeat count.
    TestRunRepeat, "repeat", 1, 10_000_000, 1
);
bounded_u32!(
    /// How long a trigger may run before the run is declared hung.
    TimeoutMs, "timeout_ms", 1, 600_000, 60_000
);

/// A name used for cross references: `[a-z][a-z0-9_-]*`, at most 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Label {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let mut chars = text.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if first_ok && rest_ok && text.len() <= 32 {
            Ok(Label(text))
        } else {
            Err(format!(
                "`{text}` is not a valid name: use a lowercase letter then lowercase letters, digits, `_` or `-` (at most 32)"
            ))
        }
    }
}

impl From<Label> for String {
    fn from(label: Label) -> String {
        label.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A kernel BPF object name: at most 15 bytes (BPF_OBJ_NAME_LEN - 1) of
/// `[A-Za-z0-9_.]`, which is what the kernel accepts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct BpfProgName(String);

impl BpfProgName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BpfProgName {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let chars_ok = text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !text.is_empty() && text.len() <= 15 && chars_ok {
            Ok(BpfProgName(text))
        } else {
            Err(format!(
                "`{text}` is not a BPF program name: 1 to 15 characters of A-Z a-z 0-9 _ ."
            ))
        }
    }
}

impl From<BpfProgName> for String {
    fn from(name: BpfProgName) -> String {
        name.0
    }
}

/// A guest argv: the program (looked up in the guest's PATH by the agent)
/// and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Argv(Vec<String>);

impl Argv {
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl TryFrom<Vec<String>> for Argv {
    type Error = String;
    fn try_from(argv: Vec<String>) -> Result<Self, String> {
        if argv.iter().any(|arg| arg.contains('\0')) {
            return Err("a command argument contains a NUL byte".to_owned());
        }
        match argv.first() {
            Some(program) if !program.is_empty() => Ok(Argv(argv)),
            _ => Err("a command needs at least a non-empty program name".to_owned()),
        }
    }
}

impl From<Argv> for Vec<String> {
    fn from(argv: Argv) -> Vec<String> {
        argv.0
    }
}

/// A sysctl name in dotted form (`kernel.bpf_termination_demo_delay_ms`,
/// `debug.kprobes-optimization`): lowercase letters, digits, `_` and `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct SysctlName(String);

impl SysctlName {
    /// The file under /proc/sys that holds it.
    pub fn proc_path(&self) -> String {
        format!("/proc/sys/{}", self.0.replace('.', "/"))
    }
}

impl TryFrom<String> for SysctlName {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let parts_ok = text.split('.').all(|p| {
            !p.is_empty()
                && !p.starts_with('-')
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
        });
        if parts_ok && text.contains('.') {
            Ok(SysctlName(text))
        } else {
            Err(format!(
                "`{text}` is not a sysctl name like `kernel.bpf_termination_demo_delay_ms`"
            ))
        }
    }
}

impl From<SysctlName> for String {
    fn from(name: SysctlName) -> String {
        name.0
    }
}

impl fmt::Display for SysctlName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sysctl value: an integer or a string, written as text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SysctlValue {
    Integer(i64),
    Text(String),
}

impl fmt::Display for SysctlValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SysctlValue::Integer(n) => write!(f, "{n}"),
            SysctlValue::Text(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names_are_dotted_lowercase_words_with_dashes_allowed() {
        for good in ["kernel.bpf_termination_demo_delay_ms", "debug.kprobes-optimization", "a.b2"] {
            let name = SysctlName::try_from(good.to_owned()).expect(good);
            assert_eq!(name.proc_path(), format!("/proc/sys/{}", good.replace('.', "/")));
        }
        for bad in ["kernel", "Kernel.x", "kernel..x", "kernel.-x", "../etc.x", "kernel.x/y", ""] {
            assert!(SysctlName::try_from(bad.to_owned()).is_err(), "{bad} accepted");
        }
    }
}
