//! The run engine: boot the guest, load the programs, execute the steps of
//! every repetition, measure, judge the expectations and write the results.
//!
//! result.json exists from the start with `complete: false` and is
//! rewritten (atomically) after every repetition, so a run that dies keeps
//! what it measured and says why it stopped.

mod guest;
mod premise;
mod stack_probe;
mod steps;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use termlab_protocol::client::{Client, ClientError};
use termlab_protocol::{ErrorKind, ExitStatus, RunRequest, SpawnRequest, WaitOutputRequest};
use thiserror::Error;

use crate::cancel::Cancel;
use crate::evaluate::{
    compute_metrics, evaluate, evaluate_host_stall, evaluate_stack_proofs, KernelLog,
};
use crate::guest_image::{self, GuestImageError, KernelBuild, KernelChoice, IPI_RTT_GUEST_PATH};
use crate::kernel_trace;
use crate::progress::{ConsoleEvent, ConsoleLines, Progress, ProgressSink, SLOW_STEP};
use crate::report::ReportError;
use crate::results::{
    self, Environment, PhaseTimings, Repetition, ResultsError, RunResult, ScenarioRecord, VmInfo,
    VmmInfo, VoidRepetition, AGENT_RTT_METRIC, IPI_RTT_METRIC,
};
use crate::scenario::{LoadedScenario, ProgramSpec, Scenario, Step};
use crate::stack_proof::TermMap;
pub use guest::{
    cmdline, console_last_lines, console_tail, describe_exit, BootSpec, Guest, CMDLINE,
};
use stack_probe::{RepetitionProbe, StackProbe};
pub use steps::parse_fields;
use steps::{run_repetition, LoadedProgram, TraceReader};
use termlab_vmm::Vm;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Image(#[from] GuestImageError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Programs(#[from] crate::user_programs::UserProgramError),
    #[error("the VMM could not start the guest: {0}")]
    Vm(#[from] termlab_vmm::Error),
    /// The guest never answered the agent's handshake: how far its boot
    /// got (the console's end) and where its vCPUs sat then.
    #[error("the guest agent did not answer within {waited:?} ({detail}); the VM was killed. Guest console, last lines ({}):\n{tail}\nIts vCPUs then (three samples 300 ms apart):\n{vcpus}", console.display())]
    NoAgent { waited: Duration, detail: String, console: PathBuf, vcpus: String, tail: String },
    #[error("the VM ended early: {}; the guest console is in {}", describe_exit(exit), console.display())]
    VmExited { exit: termlab_vmm::ExitReason, console: PathBuf },
    #[error("guest agent request failed ({what}): {source}")]
    Agent {
        what: String,
        #[source]
        source: ClientError,
    },
    /// A guest command ran past its limit: `what` is the step (trigger
    /// `x`, exec `y`).
    #[error("{what} ran longer than {limit_ms} ms")]
    TimedOut { what: String, limit_ms: u64 },
    /// An `exec` step's command failed.
    #[error("exec `{label}` ({argv:?}) failed ({status:?}): {stderr}")]
    ExecFailed { label: String, argv: Vec<String>, status: ExitStatus, stderr: String },
    /// A guest tool that must succeed (ipi_rtt, bench's term_bench) failed
    /// or ran past its limit.
    #[error("`{}` failed ({status:?}{}): {stderr}", argv.join(" "), if *timed_out { ", timed out" } else { "" })]
    CommandFailed { argv: Vec<String>, status: ExitStatus, timed_out: bool, stderr: String },
    /// A guest tool's output lacks what termlab reads from it: `missing`
    /// names it, `output` is what the tool printed (may be empty).
    #[error("{tool} printed no {missing}{}", if output.is_empty() { String::new() } else { format!(": {output}") })]
    UnexpectedOutput { tool: String, missing: String, output: String },
    /// A program's loader did not print its `prog_id=` line in time.
    #[error("loader {argv:?} did not print its program id ({source}); its stderr: {stderr}")]
    LoaderSilent {
        argv: Vec<String>,
        #[source]
        source: ClientError,
        stderr: String,
    },
    /// `wait_trace`: the trace buffer did not show `needle` `wanted` times in time.
    #[error("the trace buffer showed `{needle}` {found} time(s), not {wanted}, in time")]
    TraceLinesMissing { needle: String, found: usize, wanted: u32 },
    /// A guest file is larger than termlab reads (`hint`: what to change).
    #[error("{path} is larger than {limit} bytes: {hint}")]
    GuestFileTooLarge { path: String, limit: u64, hint: &'static str },
    /// `prog_info`: bpftool could not show the program.
    #[error("prog_info `{label}`: bpftool prog show id {prog_id} failed: {errno}")]
    ProgInfoFailed { label: String, prog_id: u32, errno: String },
    /// A program the scenario triggers has neither a trigger command nor a test run.
    #[error("program `{program}` has no trigger")]
    NoTrigger { program: String },
    /// verify_stack or host_stall_ms on a kernel without System.map (check_kernel_for
    /// refuses one before booting).
    #[error("verify_stack and host_stall_ms need the kernel's System.map, and it has none")]
    NoSystemMap,
    /// The VMM's watch of a terminate call (verify_stack, host_stall_ms) failed (for the
    /// terminate step `terminate`, or while it was prepared).
    #[error("the VMM's probe{}: {source}", terminate.as_ref().map(|label| format!(", terminate `{label}`")).unwrap_or_default())]
    StackProbe {
        terminate: Option<String>,
        #[source]
        source: stack_probe::StackProbeError,
    },
    /// A tool of this repository that termlab runs on the host failed (`tool` names it,
    /// `detail` is its exit status and stderr).
    #[error("{tool} failed: {detail}")]
    HostTool { tool: String, detail: String },
    /// This host could not do its part (a socket directory, System.map).
    #[error("cannot {what} {}: {source}", path.display())]
    Host {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A broken invariant of termlab itself (validation should prevent it).
    #[error("internal error: {0}")]
    Internal(#[from] Invariant),
    /// The agent stopped answering (hung guest or agent).
    #[error("the guest hung: no answer from the guest agent to {what} within {waited:?}; the VM was killed. Guest console, last lines ({}):\n{tail}\nIts vCPUs then (three samples 300 ms apart):\n{vcpus}", console.display())]
    Hung { what: String, waited: Duration, vcpus: String, console: PathBuf, tail: String },
    /// A guest process that outlived its time limit and then SIGKILL: the kernel holds it
    /// (`detail`: the agent's account of where, from /proc).
    #[error("the guest kernel holds a process of {what}: {detail}. Guest console, last lines ({}):\n{tail}\nIts vCPUs then (three samples 300 ms apart):\n{vcpus}", console.display())]
    Unkillable { what: String, detail: String, vcpus: String, console: PathBuf, tail: String },
    /// The agent's vsock connection closed under a pending request.
    #[error("the guest agent's vsock connection closed during {what} ({detail}); {after}. Guest console, last lines ({}):\n{tail}", console.display())]
    AgentGone { what: String, detail: String, after: String, console: PathBuf, tail: String },
    #[error("interrupted (Ctrl-C or SIGTERM): the VM was stopped and the partial result kept")]
    Interrupted,
}

/// What scenario validation guarantees and the engine found broken all the same.
#[derive(Debug, thiserror::Error)]
pub enum Invariant {
    #[error("{step} `{label}`: its program is not loaded")]
    ProgramNotLoaded { step: &'static str, label: String },
    #[error("`{0}` was not started in the background")]
    NotInBackground(String),
    #[error("background trigger `{0}` was never waited for")]
    NeverWaited(String),
}

impl EngineError {
    /// Whether the agent can no longer be asked to power the guest off.
    fn agent_unusable(&self) -> bool {
        matches!(
            self,
            EngineError::Hung { .. }
                | EngineError::AgentGone { .. }
                | EngineError::VmExited { .. }
                | EngineError::Interrupted
        )
    }
}

/// Console lines shown with a hang or a lost agent.
pub(crate) const CONSOLE_TAIL_LINES: usize = 12;

#[derive(Clone)]
pub struct RunOptions {
    /// Overrides the scenario's repetitions.
    pub repeat: Option<u32>,
    /// On a failure, leave the VM running with a shell on its console.
    pub keep_vm: bool,
    pub results_root: PathBuf,
    /// Whether this process runs inside the nested L1 VM.
    pub nested: bool,
    /// Boot this kernel build directory instead of the scenario's variant.
    pub kernel_dir: Option<PathBuf>,
    /// Send each guest console line as a [`Progress::ConsoleLine`] while it runs.
    pub stream_console: bool,
    /// `--kernel`: boot this kernel (a variant or a path); wins over `kernel_dir`.
    pub kernel: Option<KernelChoice>,
    /// What result.json calls the kernel (see [`results::KernelInfo::label`]);
    /// default: its variant.
    pub kernel_label: Option<String>,
    /// Write the results into this new directory (its parent must exist)
    /// instead of `<results_root>/<scenario>/<time>/`.
    pub run_dir: Option<PathBuf>,
    /// Stops the run at the next step boundary (Ctrl-C: see
    /// [`Cancel::on_interrupt_signals`]), with the partial result kept.
    pub cancel: Cancel,
}

/// One scenario's run that got as far as its results directory: its result
/// (also in `dir`), and why it stopped early if it did (then `result` is
/// marked incomplete with the same reason).
pub struct ScenarioRun {
    pub result: RunResult,
    pub dir: PathBuf,
    pub outcome: Result<(), EngineError>,
}

/// The tracepoint every termination trace event of the series has in
/// System.map (guest-kernel/patches/0006).
const TERMINATION_TRACEPOINT: &str = "__tracepoint_bpf_prog_terminate_request";

/// Checks, before anything boots, that `kernel` has what `scenario` needs
/// from it, as far as the host can tell. Needs are inferred from what the
/// scenario uses: `verify_stack` and `host_stall_ms` need System.map; terminate, budget and
/// prog_info steps, the series' sysctls and `[vm] requires = ["termination"]`
/// need the termination series, whose trace events System.map shows. A kernel without System.map cannot
/// be checked for the series: what it lacks then shows in the guest (a
/// refused sysctl or step, a finding). So does a series of another
/// revision (another uapi number): System.map does not tell.
pub fn check_kernel_for(scenario: &Scenario, kernel: &KernelBuild) -> Result<(), GuestImageError> {
    if scenario.stack_proof() != crate::scenario::VerifyStack::Off {
        kernel.require_system_map("verify_stack")?;
    }
    if crate::scenario::stalled_terminates(scenario).next().is_some() {
        kernel.require_system_map("host_stall_ms")?;
    }
    let Some(map) = &kernel.system_map else { return Ok(()) };
    let needs_series = crate::scenario::termination_series_use(scenario);
    let needs_kmemleak = scenario.steps.iter().any(|step| matches!(step, Step::Kmemleak(_)));
    if needs_series.is_none() && !needs_kmemleak {
        return Ok(());
    }
    let text = std::fs::read_to_string(map)
        .map_err(|source| GuestImageError::Io { path: map.clone(), source })?;
    let has =
        |symbol: &str| text.lines().any(|line| line.split_whitespace().nth(2) == Some(symbol));
    let missing =
        |detail: String| GuestImageError::MissingFeature { image: kernel.bzimage.clone(), detail };
    if let Some(why) = needs_series.filter(|_| !has(TERMINATION_TRACEPOINT)) {
        return Err(missing(format!("this scenario {why}, which needs the termination series (BPF_PROG_TERMINATE, its bpf: trace events and sysctls), and this kernel lacks it ({} has no {TERMINATION_TRACEPOINT}): boot a kernel with guest-kernel/patches applied", map.display())));
    }
    if needs_kmemleak && !has(KMEMLEAK_SYMBOL) {
        return Err(missing(format!("this scenario has a `kmemleak` step, which needs CONFIG_DEBUG_KMEMLEAK, and this kernel lacks it ({} has no {KMEMLEAK_SYMBOL}): the debug variant has it, and the full variant booted with kmemleak=on", map.display())));
    }
    Ok(())
}

/// A function of kmemleak's, in System.map when the kernel has it.
const KMEMLEAK_SYMBOL: &str = "kmemleak_scan";

/// How many clock requests make one agent round-trip sample (the median is kept).
const AGENT_RTT_PROBES: usize = 5;
/// One IPI round-trip sample: the median of this many membarrier calls from
/// vCPU 0 to vCPU 1, within [`IPI_SAMPLE_TIMEOUT_MS`]. Each repetition of a
/// scenario on 2+ vCPUs takes one (its `ipi_rtt` metric); bench takes
/// several per VM, of the same kind.
const IPI_CALLS_PER_SAMPLE: u32 = 21;
const IPI_SAMPLE_TIMEOUT_MS: u64 = 30_000;
/// How long a loader may take to print its program id.
const LOADER_READY_MS: u64 = 30_000;

/// Runs one scenario and returns its result (also written to its results
/// directory as result.json; the caller writes the reports from it),
/// reporting progress to `progress`. An error
/// before the results directory exists is `Err`; a later one is the run's
/// `outcome`, with a result.json marked incomplete.
pub fn run_scenario(
    root: &Path,
    loaded: &LoadedScenario,
    options: &RunOptions,
    progress: &dyn ProgressSink,
) -> Result<ScenarioRun, EngineError> {
    let began = Instant::now();
    let scenario = &loaded.scenario;
    let kernel = guest_image::resolve_kernel(
        root,
        scenario.vm.kernel,
        options.kernel.as_ref(),
        options.kernel_dir.as_deref(),
    )?;
    check_kernel_for(scenario, &kernel)?;
    // Cached: main prepared it before any nesting.
    let initramfs = scenario_initramfs(root, loaded, &kernel)?;

    let started = SystemTime::now();
    let dir = match &options.run_dir {
        Some(dir) => results::create_new_dir(dir)?,
        None => results::create_run_dir(&options.results_root, &loaded.name, started)?,
    };
    let mut kernel_info = kernel.info.clone();
    kernel_info.label =
        Some(options.kernel_label.clone().unwrap_or_else(|| kernel_info.variant.clone()));
    let repetitions = options.repeat.unwrap_or(scenario.repetitions.get());
    let mut result = RunResult {
        schema_version: results::SCHEMA_VERSION,
        complete: false,
        incomplete_reason: Some("the run is still in progress".into()),
        scenario: ScenarioRecord {
            name: loaded.name.clone(),
            path: loaded.path.display().to_string(),
            description: scenario.description.clone(),
            source: std::fs::read_to_string(&loaded.path).unwrap_or_default(),
            repetitions,
        },
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: None,
        environment: Environment {
            termlab_version: env!("CARGO_PKG_VERSION").to_owned(),
            host: crate::environment::host_info(),
            nested: options.nested,
            vmm: VmmInfo { name: "termlab-vmm".into(), version: termlab_vmm::VERSION.to_owned() },
            kernel: kernel_info,
            vm: VmInfo {
                vcpus: scenario.vm.vcpus.get(),
                memory_mib: scenario.vm.memory_mib.get(),
                cmdline: cmdline(kernel_args(scenario)),
            },
        },
        repetitions: Vec::new(),
        void_repetitions: Vec::new(),
        summary: Vec::new(),
        expectations: Vec::new(),
        timings: Some(PhaseTimings {
            prepare_s: began.elapsed().as_secs_f64(),
            ..PhaseTimings::default()
        }),
    };
    result.save(&dir)?;

    let console_log = dir.join(results::CONSOLE_FILE);
    let run = Run { loaded, repetitions, options, progress, began, dir: &dir };
    let files = GuestFiles {
        kernel: kernel.boot_image(),
        system_map: kernel.system_map.as_deref(),
        initramfs: &initramfs,
        console_log: &console_log,
    };
    let outcome = boot_and_measure(&run, &files, &mut result);
    // Ctrl-C during a request surfaces as that request's error (EINTR):
    // name the real cause.
    let outcome = match outcome {
        Err(error)
            if options.cancel.is_cancelled() && !matches!(error, EngineError::Interrupted) =>
        {
            Err(EngineError::Interrupted)
        }
        other => other,
    };
    result.finished_at = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    let timings = phase_timings(&mut result);
    timings.total_s = began.elapsed().as_secs_f64();
    let accounted = timings.prepare_s
        + timings.boot_s
        + timings.setup_s
        + timings.repetitions_s.iter().sum::<f64>();
    // Whatever came after the last phase that began: a run cut short keeps it here too.
    timings.teardown_s = (timings.total_s - accounted).max(0.0);
    match &outcome {
        Ok(()) => {
            result.complete = true;
            result.incomplete_reason = None;
        }
        Err(error) => result.incomplete_reason = Some(error.to_string()),
    }
    result.summarize();
    result.save(&dir)?;
    Ok(ScenarioRun { result, dir, outcome })
}

/// The run's phase timings, begun in [`run_scenario`].
fn phase_timings(result: &mut RunResult) -> &mut PhaseTimings {
    result.timings.get_or_insert_with(PhaseTimings::default)
}

/// The scenario's `[vm] kernel_args`, if any.
fn kernel_args(scenario: &crate::scenario::Scenario) -> Option<&str> {
    scenario.vm.kernel_args.as_ref().map(|args| args.get_ref().as_str())
}

/// The guest image for a scenario: the harness's initramfs plus the
/// scenario's program objects (sources compiled here, cached), test data
/// and `[vm] files`. Cached by content: call it before nesting so the L1
/// VM only finds it.
pub fn scenario_initramfs(
    root: &Path,
    loaded: &LoadedScenario,
    kernel: &guest_image::KernelBuild,
) -> Result<PathBuf, EngineError> {
    let files = crate::user_programs::guest_files(root, loaded, kernel)?;
    Ok(guest_image::initramfs_with(root, kernel, &files)?)
}

/// What every stage of one scenario's run needs to know.
struct Run<'a> {
    loaded: &'a LoadedScenario,
    repetitions: u32,
    options: &'a RunOptions,
    progress: &'a dyn ProgressSink,
    /// When `run_scenario` was called: progress reports time since then.
    began: Instant,
    dir: &'a Path,
}

/// The host files of one guest: what it boots, and where its console goes.
#[derive(Clone, Copy)]
struct GuestFiles<'a> {
    kernel: &'a Path,
    system_map: Option<&'a Path>,
    initramfs: &'a Path,
    console_log: &'a Path,
}

/// Boots, measures and stops the VM; with `stream_console`, a thread
/// follows the console log meanwhile (from the first boot message on).
fn boot_and_measure(
    run: &Run<'_>,
    files: &GuestFiles<'_>,
    result: &mut RunResult,
) -> Result<(), EngineError> {
    let console_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        if run.options.stream_console {
            let name = run.loaded.name.as_str();
            let console_log = files.console_log;
            scope.spawn(|| follow_console(console_log, &console_done, name, run.progress));
        }
        let outcome = boot_measure_and_stop(run, files, result, &console_done);
        console_done.store(true, Ordering::Relaxed);
        outcome
    })
}

/// Sends the lines the guest writes to `console_log` as progress events
/// until `done` is set, then what is left.
fn follow_console(console_log: &Path, done: &AtomicBool, scenario: &str, sink: &dyn ProgressSink) {
    use std::io::Read;
    let mut lines = ConsoleLines::default();
    let mut file = None;
    let mut buffer = [0u8; 8192];
    loop {
        // Read after checking: what was written before `done` is not lost.
        let finished = done.load(Ordering::Relaxed);
        if file.is_none() {
            file = std::fs::File::open(console_log).ok();
        }
        if let Some(file) = file.as_mut() {
            while let Ok(n @ 1..) = file.read(&mut buffer) {
                for line in lines.push(&buffer[..n]) {
                    sink.event(&Progress::ConsoleLine { scenario, line: &line });
                }
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(line) = lines.finish() {
        sink.event(&Progress::ConsoleLine { scenario, line: &line });
    }
}

fn boot_measure_and_stop(
    run: &Run<'_>,
    files: &GuestFiles<'_>,
    result: &mut RunResult,
    console_done: &AtomicBool,
) -> Result<(), EngineError> {
    let (loaded, options) = (run.loaded, run.options);
    let GuestFiles { kernel, system_map, initramfs, console_log } = *files;
    let scenario = &loaded.scenario;
    let booting = Instant::now();
    run.progress.event(&Progress::Booting {
        scenario: &loaded.name,
        kernel: scenario.vm.kernel.as_str(),
        vcpus: scenario.vm.vcpus.get(),
    });
    let guest = Guest::boot(BootSpec {
        kernel,
        initramfs,
        // Vcpus is at most 8 by construction.
        vcpus: scenario.vm.vcpus.get() as u8,
        memory_mib: scenario.vm.memory_mib.get(),
        console_log: console_log.to_owned(),
        console_stdin: options.keep_vm,
        kernel_args: kernel_args(scenario),
        cancel: &options.cancel,
        system_map,
    });
    let mut guest = guest?;
    phase_timings(result).boot_s = booting.elapsed().as_secs_f64();
    run.progress.event(&Progress::Booted {
        scenario: &loaded.name,
        took: booting.elapsed(),
        repetitions: run.repetitions,
    });

    let (vm, client) = guest.parts();
    let measured = measure(run, client, vm, system_map, result)
        .map_err(|error| explain_with_vm_state(error, &guest, console_log, system_map));
    let failed = match &measured {
        Ok(()) => !result.expectations.iter().all(|e| e.passed),
        Err(_) => true,
    };
    if measured.as_ref().err().is_some_and(EngineError::agent_unusable)
        || options.cancel.is_cancelled()
    {
        // Nothing to ask the agent any more (and no shell for --keep-vm).
        guest.kill();
    } else if failed && options.keep_vm && guest.exited().is_none() {
        run.progress.event(&Progress::KeptForInspection { scenario: &loaded.name });
        // The interactive console shows it from now on.
        console_done.store(true, Ordering::Relaxed);
        interactive_console(guest, console_log, run.progress);
    } else {
        let reason = guest.power_off();
        if measured.is_ok()
            && !matches!(reason, termlab_vmm::ExitReason::Reset | termlab_vmm::ExitReason::Stopped)
        {
            return Err(EngineError::VmExited { exit: reason, console: console_log.to_owned() });
        }
    }
    measured
}

/// An agent that stops answering usually means the guest died: say so,
/// with the panic, rather than "no response"; a hang or a lost connection
/// is named as such, with the end of the guest console.
pub(crate) fn explain_with_vm_state(
    error: EngineError,
    guest: &Guest,
    console_log: &Path,
    system_map: Option<&Path>,
) -> EngineError {
    let EngineError::Agent { what, source } = error else { return error };
    if guest.cancel().is_cancelled() {
        return EngineError::Interrupted;
    }
    let tail = || guest::console_tail(console_log, CONSOLE_TAIL_LINES);
    match source {
        ClientError::Agent { error, .. } if error.kind == ErrorKind::Unkillable => {
            let vcpus = guest.vcpu_positions(system_map);
            EngineError::Unkillable {
                what,
                detail: error.message,
                vcpus,
                console: console_log.to_owned(),
                tail: tail(),
            }
        }
        ClientError::Timeout { waited, .. } => {
            // A guest that panicked or rebooted has also stopped answering.
            if let Some(reason) = guest.exited() {
                return EngineError::VmExited { exit: reason, console: console_log.to_owned() };
            }
            let vcpus = guest.vcpu_positions(system_map);
            EngineError::Hung { what, waited, vcpus, console: console_log.to_owned(), tail: tail() }
        }
        source @ (ClientError::Closed { .. }
        | ClientError::Receive { .. }
        | ClientError::Send { .. }) => {
            // A panicking guest resets itself (panic=-1), and init reboots
            // the guest when the agent exits: give the VMM a moment to see it.
            let deadline = Instant::now() + Duration::from_secs(5);
            let exit = loop {
                if let Some(reason) = guest.exited() {
                    break Some(reason);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let after = match exit {
                Some(reason @ termlab_vmm::ExitReason::Panic { .. }) => {
                    return EngineError::VmExited { exit: reason, console: console_log.to_owned() };
                }
                Some(termlab_vmm::ExitReason::Reset) => "then the guest rebooted (its init reboots when the agent exits: the agent died)".to_owned(),
                Some(reason) => format!("then the VM ended: {}", describe_exit(&reason)),
                None => "the guest is still running without its agent connection; the VM was killed".to_owned(),
            };
            EngineError::AgentGone {
                what,
                detail: source.to_string(),
                after,
                console: console_log.to_owned(),
                tail: tail(),
            }
        }
        source => EngineError::Agent { what, source },
    }
}

/// Applies sysctls, starts the loaders, runs the repetitions, reads dmesg
/// and judges the expectations.
fn measure(
    run: &Run<'_>,
    client: &mut Client<UnixStream>,
    vm: &Vm,
    system_map: Option<&Path>,
    result: &mut RunResult,
) -> Result<(), EngineError> {
    let scenario = &run.loaded.scenario;
    let setting_up = Instant::now();
    let dmesg_after_boot = read_dmesg(client);
    apply_sysctls(client, scenario)?;
    let programs = start_loaders(client, &scenario.programs)?;
    // Each repetition reads the events back for its records (run_repetition).
    if crate::scenario::traces_terminations(scenario) {
        client.write_file(kernel_trace::ENABLE_PATH, b"1\n".to_vec()).map_err(|source| {
            EngineError::Agent {
                what: "enabling the bpf: trace events (is this a termlab kernel?)".into(),
                source,
            }
        })?;
    }
    let verify_stack = scenario.stack_proof() != crate::scenario::VerifyStack::Off;
    let host_stalls = crate::scenario::stalled_terminates(scenario).next().is_some();
    let probe = match verify_stack || host_stalls {
        true => Some(stack_probe(client, vm, system_map, &programs)?),
        false => None,
    };
    let mut trace = TraceReader::default();
    phase_timings(result).setup_s = setting_up.elapsed().as_secs_f64();
    for index in 0..run.repetitions {
        let stacks = scenario.stack_proof().in_repetition(index);
        // The VMM stops the guest in this repetition only if it reads the stacks or stalls.
        let probe = probe
            .as_ref()
            .filter(|_| stacks || host_stalls)
            .map(|probe| RepetitionProbe { probe, stacks });
        repeat_once(run, client, &programs, &mut trace, probe, index, result)?;
    }

    let log = match (dmesg_after_boot, read_dmesg(client)) {
        (Some(after_boot), Some(at_end)) => {
            results::write_atomically(&run.dir.join(DMESG_FILE), at_end.as_bytes())?;
            Some(KernelLog { after_boot, at_end })
        }
        _ => None,
    };
    result.expectations = evaluate(&scenario.expectations, &result.repetitions, log.as_ref());
    for (_, terminate) in crate::scenario::stalled_terminates(scenario) {
        let label = terminate.label.get_ref().as_str();
        result.expectations.push(evaluate_host_stall(label, &result.repetitions));
    }
    if verify_stack {
        result.expectations.extend(evaluate_stack_proofs(
            &crate::scenario::terminate_labels(scenario),
            &result.repetitions,
        ));
    }
    Ok(())
}

fn apply_sysctls(client: &mut Client<UnixStream>, scenario: &Scenario) -> Result<(), EngineError> {
    for (name, value) in &scenario.sysctl {
        client.write_file(&name.proc_path(), format!("{value}\n").into_bytes()).map_err(
            |source| EngineError::Agent {
                what: format!("setting sysctl {name} (does this kernel have it?)"),
                source,
            },
        )?;
    }
    Ok(())
}

/// Loads the scenario's programs, in order: each loader, with the programs `loaded_by` it.
fn start_loaders<'s>(
    client: &mut Client<UnixStream>,
    specs: &'s [ProgramSpec],
) -> Result<Vec<LoadedProgram<'s>>, EngineError> {
    let mut programs = Vec::with_capacity(specs.len());
    for spec in specs.iter().filter(|spec| spec.loaded_by.is_none()) {
        // Validation gave each of them a function.
        let targets: Vec<(&ProgramSpec, &str)> = specs
            .iter()
            .filter(|p| p.loaded_by() == Some(spec.name.get_ref()))
            .filter_map(|p| Some((p, p.function.as_ref()?.get_ref().as_str())))
            .collect();
        let functions: Vec<&str> = targets.iter().map(|&(_, function)| function).collect();
        let (loaded, fields) = start_loader(client, spec, &functions)?;
        for (target, function) in targets {
            let prog_id = fields.get(&format!("also.{function}")).and_then(|id| id.parse().ok());
            let prog_id = prog_id.ok_or_else(|| EngineError::UnexpectedOutput {
                tool: format!("loader of `{}`", spec.name.get_ref()),
                missing: format!("also.{function}=ID"),
                output: format!("{fields:?}"),
            })?;
            // The kernel's name of a program is its function's, cut to 15 bytes.
            let kernel_name = function.chars().take(15).collect();
            programs.push(LoadedProgram { spec: target, prog_id, kernel_name: Some(kernel_name) });
        }
        programs.push(loaded);
    }
    Ok(programs)
}

/// Starts one program's loader and waits for its `prog_id=` line: the program is loaded
/// (and attached, unless the scenario says not to), with the functions in `also`.
/// Returns the program and the line's fields.
fn start_loader<'s>(
    client: &mut Client<UnixStream>,
    spec: &'s ProgramSpec,
    also: &[&str],
) -> Result<(LoadedProgram<'s>, BTreeMap<String, String>), EngineError> {
    let argv = steps::loader_argv(spec, also);
    let spawned = client.spawn(SpawnRequest::command(argv.clone())).map_err(|source| {
        EngineError::Agent { what: format!("starting loader {argv:?}"), source }
    })?;
    let ready = client.wait_output(WaitOutputRequest {
        handle: spawned.handle,
        pattern: "prog_id=".into(),
        stream: Default::default(),
        timeout_ms: LOADER_READY_MS,
        from_offset: 0,
    });
    let line = match ready {
        Ok(found) => found.line.to_string_lossy().into_owned(),
        // The agent itself stopped answering, not the loader: the guest died or hung, which
        // explain_with_vm_state() tells apart (a triple fault, a panic, a hang), as for any
        // other request.
        Err(
            source @ (ClientError::Send { .. }
            | ClientError::Receive { .. }
            | ClientError::Timeout { .. }
            | ClientError::Closed { .. }),
        ) => {
            return Err(EngineError::Agent {
                what: format!("waiting for loader {argv:?} to print its program id"),
                source,
            });
        }
        Err(source) => {
            let stderr = client
                .read_output(spawned.handle)
                .map(|o| o.stderr.data.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(EngineError::LoaderSilent {
                argv,
                source,
                stderr: stderr.trim().to_owned(),
            });
        }
    };
    let fields =
        parse_fields(&line, line.split_whitespace().next().unwrap_or_default()).unwrap_or_default();
    let prog_id = fields.get("prog_id").and_then(|id| id.parse().ok()).ok_or_else(|| {
        EngineError::UnexpectedOutput {
            tool: format!("loader {argv:?}"),
            missing: "numeric prog_id".into(),
            output: line.trim().to_owned(),
        }
    })?;
    let kernel_name = fields.get("prog_name").cloned();
    Ok((LoadedProgram { spec, prog_id, kernel_name }, fields))
}

/// How many times one repetition may be run again because it tested nothing
/// (`premise::untested_terminate`, `premise::failed_premise`); the last try is judged as it is.
const MAX_VOID_TRIES: usize = 2;

/// Repetition `index`: its steps, its metrics with the agent's and the IPI's round trips,
/// saved to result.json at once (a run cut off later keeps it).
fn repeat_once(
    run: &Run<'_>,
    client: &mut Client<UnixStream>,
    programs: &[LoadedProgram<'_>],
    trace: &mut TraceReader,
    probe: Option<RepetitionProbe<'_, '_>>,
    index: u32,
    result: &mut RunResult,
) -> Result<(), EngineError> {
    let (loaded, repetitions) = (run.loaded, run.repetitions);
    let scenario = &loaded.scenario;
    let repetition_began = Instant::now();
    let step_done = |step: &str, took: Duration| {
        if took >= SLOW_STEP {
            run.progress.event(&Progress::StepSlow {
                scenario: &loaded.name,
                repetition: index + 1,
                of: repetitions,
                step,
                took,
                elapsed: run.began.elapsed(),
            });
        }
    };
    let mut steps =
        run_repetition(client, scenario, programs, trace, probe, &step_done, &run.options.cancel)?;
    // A repetition that tested nothing runs again, a few times at most (each is recorded).
    for _ in 0..MAX_VOID_TRIES {
        let untested = premise::untested_terminate(scenario, &steps)
            .or_else(|| premise::failed_premise(scenario, &steps));
        let Some(reason) = untested else { break };
        run.progress.event(&Progress::RepetitionVoid {
            scenario: &loaded.name,
            number: index + 1,
            of: repetitions,
            reason: &reason,
        });
        result.void_repetitions.push(VoidRepetition { index, reason });
        steps = run_repetition(
            client,
            scenario,
            programs,
            trace,
            probe,
            &step_done,
            &run.options.cancel,
        )?;
    }
    let mut metrics = compute_metrics(&scenario.metrics, &steps);
    metrics.insert(AGENT_RTT_METRIC.to_owned(), agent_round_trip(client)?);
    if scenario.vm.vcpus.get() >= 2 {
        metrics.insert(IPI_RTT_METRIC.to_owned(), ipi_round_trip(client)?);
    }
    result.repetitions.push(Repetition { index, steps, metrics, vmm_stops: probe.is_some() });
    phase_timings(result).repetitions_s.push(repetition_began.elapsed().as_secs_f64());
    result.summarize();
    result.save(run.dir)?;
    run.progress.event(&Progress::RepetitionDone {
        scenario: &loaded.name,
        number: index + 1,
        of: repetitions,
        took: repetition_began.elapsed(),
        elapsed: run.began.elapsed(),
    });
    Ok(())
}

/// Everything the VMM-side stack check needs from the host and the guest:
/// the kernel's System.map, the guest's kallsyms (BPF image names) and the
/// kernel's instruction map of each loaded program that has a termination copy
/// (`prog_term_map`; one without, which a scenario may load to show that it is refused,
/// cannot be stopped, so no stop of it is ever checked).
fn stack_probe<'vm>(
    client: &mut Client<UnixStream>,
    vm: &'vm Vm,
    system_map: Option<&Path>,
    programs: &[LoadedProgram<'_>],
) -> Result<StackProbe<'vm>, EngineError> {
    // check_kernel_for refused a kernel without one before booting.
    let system_map = system_map.ok_or(EngineError::NoSystemMap)?;
    let map_text = std::fs::read_to_string(system_map).map_err(|e| EngineError::Host {
        what: "read the kernel's System.map (verify_stack, host_stall_ms)",
        path: system_map.to_owned(),
        source: e,
    })?;
    let kallsyms = client
        .read_file("/proc/kallsyms", KALLSYMS_MAX_BYTES)
        .map_err(|source| EngineError::Agent { what: "reading /proc/kallsyms".into(), source })?;
    let mut maps = BTreeMap::new();
    for program in programs {
        let argv = vec!["prog_term_map".to_owned(), program.prog_id.to_string()];
        let output = client
            .run(RunRequest::command(argv, 10_000))
            .map_err(|source| EngineError::Agent { what: "prog_term_map".into(), source })?;
        if matches!(output.status, ExitStatus::Exited { code: PROG_TERM_MAP_NO_COPY }) {
            continue;
        }
        let stdout = output.stdout.data.to_string_lossy();
        let map: TermMap =
            serde_json::from_str(stdout.trim()).map_err(|e| EngineError::UnexpectedOutput {
                tool: format!("prog_term_map {}", program.prog_id),
                missing: format!("map ({e})"),
                output: both_streams(&output),
            })?;
        maps.insert(program.prog_id, map);
    }
    StackProbe::new(vm, &map_text, &kallsyms.data.to_string_lossy(), maps)
        .map_err(|source| EngineError::StackProbe { terminate: None, source })
}

/// prog_term_map's exit status for a program without a termination copy.
const PROG_TERM_MAP_NO_COPY: i32 = 3;

/// More than a guest's /proc/kallsyms holds (about 1.5 MB for this config).
const KALLSYMS_MAX_BYTES: u64 = 16 << 20;

/// The guest kernel log at the end of the run, kept next to result.json.
pub const DMESG_FILE: &str = "dmesg.txt";

/// The guest's kernel log; `None` when it cannot be read (then no
/// dmesg expectation can pass).
fn read_dmesg(client: &mut Client<UnixStream>) -> Option<String> {
    let output = client.run(RunRequest::command(vec!["dmesg".into()], 10_000)).ok()?;
    matches!(output.status, termlab_protocol::ExitStatus::Exited { code: 0 })
        .then(|| output.stdout.data.to_string_lossy().into_owned())
}

/// Median host-measured round trip of `clock` requests, in ns: the
/// harness's own overhead per request.
fn agent_round_trip(client: &mut Client<UnixStream>) -> Result<f64, EngineError> {
    let mut samples = Vec::with_capacity(AGENT_RTT_PROBES);
    for _ in 0..AGENT_RTT_PROBES {
        let begin = Instant::now();
        client.clock().map_err(|source| EngineError::Agent { what: "clock".into(), source })?;
        samples.push(begin.elapsed().as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// The guest's median membarrier IPI round trip between vCPU 0 and 1 over
/// [`IPI_CALLS_PER_SAMPLE`] calls, in ns: the one IPI measurement, for the
/// scenarios' `ipi_rtt` metric and bench's latency ratios.
pub fn ipi_round_trip(client: &mut Client<UnixStream>) -> Result<f64, EngineError> {
    let argv =
        vec![IPI_RTT_GUEST_PATH.to_owned(), "--count".into(), IPI_CALLS_PER_SAMPLE.to_string()];
    let output = guest_output(client, argv, IPI_SAMPLE_TIMEOUT_MS)?;
    parse_fields(&output.stdout, "ipi_rtt")
        .and_then(|fields| fields.get("median_ns").and_then(|v| v.parse::<f64>().ok()))
        .ok_or_else(|| EngineError::UnexpectedOutput {
            tool: "ipi_rtt".into(),
            missing: "median_ns".into(),
            output: format!("{} {}", output.stdout.trim(), output.stderr.trim()),
        })
}

/// What a guest tool that exited 0 printed.
pub struct ToolOutput {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` in the guest; what it printed, or an error when it failed
/// or ran longer than `timeout_ms`.
pub fn guest_output(
    client: &mut Client<UnixStream>,
    argv: Vec<String>,
    timeout_ms: u64,
) -> Result<ToolOutput, EngineError> {
    let what = argv.join(" ");
    let output = client
        .run(RunRequest::command(argv.clone(), timeout_ms))
        .map_err(|source| EngineError::Agent { what, source })?;
    let stderr = output.stderr.data.to_string_lossy().into_owned();
    if output.timed_out || !matches!(output.status, ExitStatus::Exited { code: 0 }) {
        return Err(EngineError::CommandFailed {
            argv,
            status: output.status,
            timed_out: output.timed_out,
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(ToolOutput { stdout: output.stdout.data.to_string_lossy().into_owned(), stderr })
}

/// A command's stdout and stderr, trimmed, for an error message.
fn both_streams(output: &termlab_protocol::RunOutput) -> String {
    format!(
        "{} {}",
        output.stdout.data.to_string_lossy().trim(),
        output.stderr.data.to_string_lossy().trim()
    )
}

/// A shell on the guest console (started through the agent: init runs the
/// agent, not a getty), the console shown on stdout and stdin forwarded by
/// the VMM, until the guest powers off or Ctrl-C. For `termlab boot` and
/// `--keep-vm`.
pub fn interactive_console(mut guest: Guest, console_log: &Path, progress: &dyn ProgressSink) {
    let shell = "setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'";
    let started =
        guest.client.spawn(SpawnRequest::command(vec!["sh".into(), "-c".into(), shell.into()]));
    if let Err(error) = started {
        let error = error.to_string();
        progress.event(&Progress::InteractiveConsole(ConsoleEvent::ShellFailed { error: &error }));
        guest.power_off();
        return;
    }
    progress.event(&Progress::InteractiveConsole(ConsoleEvent::ShellReady));
    let follower = console_follower(console_log.to_owned());
    let reason = {
        let _keys = KeysToGuest::on_stdin();
        guest.wait_until_exit()
    };
    follower.store(true, Ordering::Relaxed);
    let reason = describe_exit(&reason);
    progress.event(&Progress::InteractiveConsole(ConsoleEvent::VmEnded { reason: &reason }));
}

/// While it lives, a terminal on stdin hands each key to the guest as typed, unechoed: the
/// guest's shell edits and echoes the line (else every line shows twice and the guest never
/// sees a Tab). Ctrl-C stays a signal to termlab, which ends the VM. Restores the terminal
/// on drop.
struct KeysToGuest {
    saved: Option<libc::termios>,
}

impl KeysToGuest {
    fn on_stdin() -> Self {
        // SAFETY: tcgetattr fills the local termios; it fails (ENOTTY) on a non-terminal.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Self { saved: None };
        }
        let mut keys = saved;
        keys.c_lflag &= !(libc::ICANON | libc::ECHO);
        keys.c_cc[libc::VMIN] = 1;
        keys.c_cc[libc::VTIME] = 0;
        // SAFETY: sets stdin's attributes from a termios tcgetattr filled and we edited.
        let set = unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &keys) } == 0;
        Self { saved: set.then_some(saved) }
    }
}

impl Drop for KeysToGuest {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the attributes read in on_stdin.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Prints what the guest writes to its console log until the flag is set.
fn console_follower(path: PathBuf) -> std::sync::Arc<AtomicBool> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stop_seen = stop.clone();
    std::thread::spawn(move || {
        let Ok(mut file) = std::fs::File::open(&path) else { return };
        // Show the last part of what happened before, then follow.
        let length = file.seek(SeekFrom::End(0)).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(2000)));
        let mut buffer = [0u8; 4096];
        while !stop_seen.load(Ordering::Relaxed) {
            match file.read(&mut buffer) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(50)),
                Ok(n) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buffer[..n]);
                    let _ = out.flush();
                }
            }
        }
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_with_map(map: Option<&str>) -> (tempfile::TempDir, KernelBuild) {
        let dir = tempfile::tempdir().expect("temp dir");
        let system_map = map.map(|text| {
            let path = dir.path().join("System.map");
            std::fs::write(&path, text).expect("write");
            path
        });
        let info = crate::results::KernelInfo {
            variant: "path".into(),
            label: None,
            dir: String::new(),
            source_version: None,
            patch_series_sha256: None,
            config_sha256: None,
            build_info: serde_json::Value::Null,
            image: None,
            image_sha256: None,
            image_version: None,
            booted_vmlinux: None,
            system_map: None,
        };
        let build = KernelBuild {
            dir: dir.path().to_owned(),
            bzimage: dir.path().join("bzImage"),
            vmlinux: None,
            system_map,
            bpftool: None,
            libbpf: None,
            vmlinux_h: None,
            info,
        };
        (dir, build)
    }

    fn scenario(name: &str) -> Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name);
        crate::scenario::load(&path).expect("scenario loads").scenario
    }

    #[test]
    fn typed_guest_errors_read_as_the_messages_they_replaced() {
        let timed_out = EngineError::TimedOut { what: "trigger `run`".into(), limit_ms: 5000 };
        assert_eq!(timed_out.to_string(), "trigger `run` ran longer than 5000 ms");
        let failed = EngineError::CommandFailed {
            argv: vec!["term_bench".into(), "load".into()],
            status: ExitStatus::Exited { code: 1 },
            timed_out: true,
            stderr: "EPERM".into(),
        };
        assert_eq!(
            failed.to_string(),
            "`term_bench load` failed (Exited { code: 1 }, timed out): EPERM"
        );
        let no_number = EngineError::UnexpectedOutput {
            tool: "term_bench".into(),
            missing: "numeric `prog_id`".into(),
            output: String::new(),
        };
        assert_eq!(no_number.to_string(), "term_bench printed no numeric `prog_id`");
        let no_median = EngineError::UnexpectedOutput {
            tool: "ipi_rtt".into(),
            missing: "median_ns".into(),
            output: "oops".into(),
        };
        assert_eq!(no_median.to_string(), "ipi_rtt printed no median_ns: oops");
        let probe = EngineError::StackProbe {
            terminate: Some("stop".into()),
            source: stack_probe::StackProbeError::NoInstructionMap(7),
        };
        assert_eq!(
            probe.to_string(),
            "the VMM's probe, terminate `stop`: no instruction map of program 7: prog_term_map did not run for it"
        );
        let preparing = EngineError::StackProbe {
            terminate: None,
            source: stack_probe::StackProbeError::MissingSymbol("bpf_die"),
        };
        assert!(
            preparing.to_string().starts_with("the VMM's probe: `bpf_die` is not in"),
            "{preparing}"
        );
        assert_eq!(crate::exit::Classify::exit_class(&timed_out), crate::exit::ExitClass::Finding);
        assert_eq!(
            crate::exit::Classify::exit_class(&probe),
            crate::exit::ExitClass::Infrastructure
        );
    }

    #[test]
    fn what_a_scenario_needs_from_the_kernel_is_checked_before_booting() {
        let stack = scenario("two-cpus.toml");
        let (_dir, no_map) = kernel_with_map(None);
        let error = check_kernel_for(&stack, &no_map).expect_err("verify_stack needs a map");
        assert!(error.to_string().starts_with("verify_stack needs System.map for "), "{error}");

        let plain = "ffffffff81000000 T _text\n";
        let (_dir, not_ours) = kernel_with_map(Some(plain));
        let error = check_kernel_for(&scenario("loops.toml"), &not_ours).expect_err("no events");
        assert!(error.to_string().contains(TERMINATION_TRACEPOINT), "{error}");

        let ours = format!("{plain}ffffffff82000000 D {TERMINATION_TRACEPOINT}\n");
        let (_dir, patched) = kernel_with_map(Some(&ours));
        check_kernel_for(&stack, &patched).expect("a termlab kernel has both");
        // Setting one of the series' sysctls (control: the demo delay) needs the series too.
        let control = scenario("control.toml");
        let error = check_kernel_for(&control, &not_ours).expect_err("no series");
        assert!(
            error.to_string().contains(
                "this scenario sets the sysctl kernel.bpf_termination_demo_delay_ms, which needs the termination series"
            ),
            "{error}"
        );
        check_kernel_for(&control, &patched).expect("a termlab kernel has the sysctl");
        // A loader of its own that terminates (term_stress): declared in `[vm] requires`.
        let stress = scenario("campaigns/stress.toml");
        let error = check_kernel_for(&stress, &not_ours).expect_err("declared");
        assert!(
            error.to_string().contains("declares `[vm] requires = [\"termination\"]`"),
            "{error}"
        );
        let mut undeclared = stress.clone();
        undeclared.vm.requires.clear();
        check_kernel_for(&undeclared, &not_ours).expect("nothing else shows the need");
        check_kernel_for(&stress, &patched).expect("a termlab kernel has the series");
        // Without a map the events cannot be checked before booting: not refused.
        check_kernel_for(&scenario("budget.toml"), &no_map).expect("unknown is not refused");
    }
}
