//! `termlab`: run scenarios in the guest VM, build the kernel, boot an
//! interactive guest, list scenarios, regenerate and compare reports.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use regex::Regex;
use termlab::bench::BenchOptions;
use termlab::cancel::Cancel;
use termlab::engine::{self, BootSpec, EngineError, Guest, RunOptions, ScenarioRun};
use termlab::exec;
use termlab::exit::{Classify, ExitClass, EXIT_CODES_HELP};
use termlab::guest_image::{self, repository_root, KernelChoice};
use termlab::junit::{self, RunError, ScenarioReport};
use termlab::report;
use termlab::results::RunResult;
use termlab::scenario::{self, KernelVariant, LoadedScenario};
use termlab::selection::{self, Shard};
use termlab::ui::{ProgressPrinter, Ui};
use termlab_nested::{KvmPlan, L1Options, NestedError, NestedMode};

#[derive(Parser)]
#[command(
    name = "termlab",
    version,
    about = "Stop running eBPF programs on demand in a Linux 6.12 guest, and prove it from outside",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// No progress output; only results and errors.
    #[arg(long, global = true)]
    quiet: bool,
    /// Progress as events on stderr, one JSON object per line
    /// (`{"event":"booting",...}`, `repetition_done`, `step_slow`, with --console
    /// `console_line`, `bench`, ...), instead of bars and status lines; errors stay
    /// `error: ...` lines.
    #[arg(long, global = true)]
    events: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios: boot the guest, execute the steps, measure, write results/.
    /// Exits 0 only if every expectation of every scenario holds.
    #[command(after_help = EXIT_CODES_HELP)]
    Run {
        /// Scenario files (scenarios/*.toml).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        #[command(flatten)]
        selection: Selection,
        /// Also write the run as JUnit XML to FILE: one testsuite per scenario, one testcase
        /// per expectation (failures with what was observed), the guest console's end as
        /// system-out, and a `run` testcase with an error when a scenario stopped early.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Stream the guest serial console to stderr while it runs, each line prefixed
        /// `console| `.
        #[arg(long)]
        console: bool,
        /// Repetitions per scenario, instead of the file's `repetitions`.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        repeat: Option<u32>,
        /// Print where each scenario's time went (prepare, boot, setup, repetitions,
        /// teardown; also in result.json as `timings`) and the host's share (finding kernels
        /// and images, the nested L1) on stderr.
        #[arg(long)]
        timings: bool,
        /// Print each run's result.json to stdout.
        #[arg(long)]
        json: bool,
        /// After a failure, keep the VM running with a shell on its console.
        #[arg(long)]
        keep_vm: bool,
        /// Where KVM comes from: this host's, or a nested L1 VM's when this host's cannot run Linux.
        #[arg(long, value_enum, default_value_t = Nested::Auto)]
        nested: Nested,
        /// Directory that receives <scenario>/<timestamp>/.
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Boot this kernel build directory (bzImage, bpftool, build-info.json) instead of the
        /// current guest-kernel/build of the variant it was built as; scenarios of other
        /// variants boot their own (`--kernel` boots one kernel for all).
        #[arg(long, env = "TERMLAB_KERNEL_DIR")]
        kernel_dir: Option<PathBuf>,
        #[command(flatten)]
        kernels: RunKernels,
    },
    /// Guest kernel commands.
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// Boot the guest with its console on this terminal (`reboot -f` in the guest ends it;
    /// `poweroff -f` only halts the guest, which the VMM does not see with an in-kernel LAPIC).
    Boot {
        #[arg(long, value_enum, default_value_t = KernelVariant::Default)]
        variant: KernelVariant,
        #[command(flatten)]
        kernel: KernelArg,
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
        vcpus: u8,
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
        #[arg(long, value_enum, default_value_t = Nested::Auto)]
        nested: Nested,
    },
    /// Boot a kernel and run one command in the guest (or the targets of a vmtest.toml), its
    /// stdout and stderr streamed live. Exits with the command's exit code (128+N when killed
    /// by signal N, 126/127 when it cannot be executed / is not found); 69 when the guest did
    /// not come up, 70 when the guest kernel panicked or the guest hung under the command (with
    /// the console's last lines), 125 for termlab's own errors, 130 on Ctrl-C. With --config
    /// and several targets: the number of failed targets.
    Exec {
        #[command(flatten)]
        kernel: KernelArg,
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
        vcpus: u8,
        /// Guest memory in MiB.
        #[arg(long = "memory", value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
        memory_mib: u32,
        #[arg(long, value_enum, default_value_t = Nested::Auto)]
        nested: Nested,
        /// Run the `[[target]]` entries of a vmtest configuration file instead of CMD.
        #[arg(long, short = 'c', value_name = "VMTEST_TOML", conflicts_with_all = ["command", "choice"])]
        config: Option<PathBuf>,
        /// With --config: only the targets whose name matches this regex.
        #[arg(long, short = 'f', value_name = "REGEX", requires = "config")]
        filter: Option<String>,
        /// Print where the time went (initramfs, nested L1, boot, command, power-off) on stderr.
        #[arg(long)]
        timings: bool,
        /// The command and its arguments, passed to the guest as they are (no shell).
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Regenerate the reports of result directories (`termlab run`'s result.json or `termlab
    /// bench`'s bench.json; older schema versions are migrated); with several runs, also
    /// compare them side by side.
    Report {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where the comparison (report.md, report.html, plots) goes when several runs are given.
        #[arg(long, default_value = "results/comparison")]
        out: PathBuf,
        /// Also rewrite a result.json or bench.json of an older schema version in today's.
        #[arg(long)]
        migrate: bool,
    },
    /// Judge run NEW against run BASE: per metric, the p50 and p99 change with a bootstrap
    /// confidence interval and a verdict (regressed, improved, unchanged); expectations that
    /// passed in BASE and fail in NEW are regressions. Writes report.md, report.html (CDFs
    /// overlaid) and compare.json, and prints the Markdown.
    ///
    /// Exit status: 0 no regression, 1 a metric or expectation regressed, 2 bad input (a
    /// missing directory, an unreadable result.json, nothing in common).
    Compare {
        /// The reference run's directory (holding result.json).
        base: PathBuf,
        /// The run under judgement.
        new: PathBuf,
        /// A percentile regressed when its whole 95% interval lies above +PCT% (improved:
        /// below -PCT%).
        #[arg(long, value_name = "PCT", default_value_t = termlab::compare::DEFAULT_THRESHOLD_PCT)]
        threshold: f64,
        /// Judge only this metric (repeatable); default: every metric measured in both runs.
        #[arg(long = "metric", value_name = "NAME")]
        metrics: Vec<String>,
        /// Output directory [default: results/compare/<UTC time>].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List scenarios with their one-line descriptions.
    #[command(after_help = EXIT_CODES_HELP)]
    List {
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
        #[command(flatten)]
        selection: Selection,
        /// A JSON array on stdout: name, path, description, repetitions, kernel, vcpus.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark: termination latency (per case, depth, CPUs) as ratios to a bare IPI,
    /// fast-path overhead and load cost against the kernel built without the feature;
    /// writes results/bench/<time>/ (bench.json with raw samples, report.md, report.html).
    Bench {
        /// Terminations per latency configuration.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        iterations: u32,
        /// Alternating boots of the patched and the baseline kernel for fast path and load cost.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
        /// Program sizes (instructions) for the load cost. Loading 100000 instructions takes
        /// about 44 s under nested emulation, too long for every round; on real KVM add it.
        #[arg(long, value_delimiter = ',', default_values_t = [10, 1000, 10000], value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
        load_sizes: Vec<u32>,
        /// A short run (20 iterations, 2 rounds, small programs) that checks the benchmark works.
        #[arg(long)]
        quick: bool,
        #[arg(long, value_enum, default_value_t = Nested::Auto)]
        nested: Nested,
        #[arg(long, default_value = "results")]
        results: PathBuf,
    },
}

/// Which of the given scenarios to work on (for CI matrices).
#[derive(Args)]
struct Selection {
    /// Only scenarios whose name (file stem) matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    filter: Option<Regex>,
    /// Only the I-th of N shards (1-based): the scenarios, most steps x repetitions first, each
    /// go to the shard with the least so far, so N jobs given the same files run each scenario
    /// exactly once, in shards of about the same length.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
}

impl Selection {
    fn apply(&self, scenarios: Vec<LoadedScenario>) -> Result<Vec<LoadedScenario>, String> {
        selection::select(scenarios, self.filter.as_ref(), self.shard).map_err(|e| e.to_string())
    }
}

/// `termlab run --kernel PATH|VARIANT`, repeatable: the kernels every scenario runs on.
#[derive(clap::Args)]
struct RunKernels {
    /// The kernel to boot: a bzImage (System.map and bpftool beside it or in its build tree
    /// are used when present), a kernel build tree (arch/x86/boot/bzImage), a
    /// guest-kernel/build output directory, or a variant name: default, debug, noterm, full, preempt.
    /// Repeat it (at most 4 times) to run each scenario on each kernel, side by side.
    ///
    /// With several kernels each scenario runs on each kernel in turn, with the same
    /// repetitions. The runs go to <RESULTS>/<scenario>/<time>/<kernel label>/ (each an
    /// ordinary run directory: result.json, reports, console), and
    /// <RESULTS>/<scenario>/<time>/report.md and report.html show them side by side. A
    /// kernel's label is its variant, or for a path the name of what holds the image (the
    /// build tree, the directory of a bzImage, else the file); a repeated one gets -2, -3.
    /// result.json records it as environment.kernel.label. The exit status is the most
    /// telling over all scenarios and kernels (see below).
    ///
    /// What a scenario needs from a kernel is inferred from what it uses: `verify_stack`
    /// needs System.map; terminate, budget and prog_info steps and the termination series'
    /// sysctls (kernel.bpf_max_runtime_ms, kernel.bpf_termination_*) need the series, which
    /// System.map shows by its trace events; `[vm] requires = ["termination"]` declares what
    /// no step shows (a loader of the scenario's own that terminates). Every scenario is checked against every kernel before anything boots. If a
    /// kernel lacks what a scenario needs, the run stops there with status 2, naming each
    /// scenario and kernel, and nothing boots or is written, just as with one kernel: a
    /// side-by-side comparison with a column missing is not the one asked for, and the
    /// kernels are the caller's choice (leave the scenario out with --filter, or drop the
    /// kernel). What System.map cannot show (a kernel without one, a series with another
    /// uapi number) shows in the guest instead: a refused sysctl or step, status 1.
    #[arg(long = "kernel", value_name = "PATH|VARIANT")]
    choices: Vec<KernelChoice>,
}

/// The most kernels one `termlab run` compares.
const MAX_KERNELS: usize = 4;

/// `--kernel PATH|VARIANT`, shared by `exec` and `boot`.
#[derive(clap::Args, Clone)]
struct KernelArg {
    /// The kernel to boot: a bzImage (System.map and bpftool beside it or in its build tree
    /// are used when present), a kernel build tree (arch/x86/boot/bzImage), a
    /// guest-kernel/build output directory, or a variant name: default, debug, noterm, full, preempt.
    #[arg(long = "kernel", value_name = "PATH|VARIANT")]
    choice: Option<KernelChoice>,
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Build (or reuse) the guest kernel with guest-kernel/build.
    Build {
        #[arg(long, value_enum, default_value_t = KernelVariant::Default)]
        variant: KernelVariant,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Nested {
    Auto,
    Always,
    Never,
}

impl From<Nested> for NestedMode {
    fn from(mode: Nested) -> NestedMode {
        match mode {
            Nested::Auto => NestedMode::Auto,
            Nested::Always => NestedMode::Always,
            Nested::Never => NestedMode::Never,
        }
    }
}

/// A failure already explained to the user, with the exit code: an [`ExitClass`]'s, or for
/// `exec` the guest command's own (or one of exec's codes, see [`exec`]).
struct Failed(u8);

impl From<ExitClass> for Failed {
    fn from(class: ExitClass) -> Failed {
        Failed(class.code())
    }
}

/// What `termlab run` does besides running: output and selection.
struct RunOutputs {
    json: bool,
    junit: Option<PathBuf>,
    selection: Selection,
    /// `--timings`: each scenario's phases and the host's share on stderr.
    timings: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ui = Ui::new(cli.quiet, cli.events);
    let outcome = match cli.command {
        Command::Run {
            scenarios,
            selection,
            junit,
            console,
            repeat,
            json,
            timings,
            keep_vm,
            nested,
            results,
            kernel_dir,
            kernels,
        } => {
            let options = RunOptions {
                repeat,
                keep_vm,
                results_root: results,
                nested: false,
                kernel_dir,
                stream_console: console,
                kernel: None,
                kernel_label: None,
                run_dir: None,
                cancel: Cancel::new(),
            };
            let outputs = RunOutputs { json, junit, selection, timings };
            run(ui, &scenarios, options, &kernels.choices, outputs, nested.into())
        }
        Command::Kernel { command: KernelCommand::Build { variant } } => kernel_build(ui, variant),
        Command::Boot { variant, kernel, vcpus, memory_mib, nested } => {
            let choice = kernel.choice.unwrap_or(KernelChoice::Variant(variant));
            boot(ui, &choice, vcpus, memory_mib, nested.into())
        }
        Command::Exec { kernel, vcpus, memory_mib, nested, config, filter, timings, command } => {
            let options = ExecOptions { vcpus, memory_mib, mode: nested.into(), timings };
            match config {
                Some(config) => exec_vmtest(ui, &config, filter.as_deref(), &options),
                None => exec_command(ui, kernel.choice, &command, &options),
            }
        }
        Command::Report { dirs, out, migrate } => report_command(ui, &dirs, &out, migrate),
        Command::Compare { base, new, threshold, metrics, out } => {
            compare_command(ui, &base, &new, threshold, &metrics, out)
        }
        Command::List { dir, selection, json } => list(ui, &dir, &selection, json),
        Command::Bench { iterations, rounds, load_sizes, quick, nested, results } => {
            let options = if quick {
                BenchOptions {
                    iterations: 20,
                    rounds: 2,
                    load_sizes: vec![10, 1000],
                    results_root: results,
                    nested: false,
                    fastpath_instructions: None,
                    cancel: Cancel::new(),
                }
            } else {
                BenchOptions {
                    iterations,
                    rounds,
                    load_sizes,
                    results_root: results,
                    nested: false,
                    fastpath_instructions: None,
                    cancel: Cancel::new(),
                }
            };
            bench(ui, options, nested.into())
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed(code)) => ExitCode::from(code),
    }
}

/// Shows `message` as an error and fails with `class`.
fn fail(ui: Ui, class: ExitClass, message: impl std::fmt::Display) -> Failed {
    ui.error(&message.to_string());
    Failed::from(class)
}

/// Shows `error` and fails with its own class.
fn fail_with<E: Classify + std::fmt::Display>(ui: Ui, error: E) -> Failed {
    fail(ui, error.exit_class(), error)
}

/// Where the VM will run: here, or (after re-running this very command
/// inside a nested L1 VM, where the host is read-only except `writable` and
/// the initramfs cache, and `readable` is visible also under /tmp) nowhere,
/// with the exit code it had there.
/// `interactive`: the command inside L1 gets our stdin and stdout as its terminal (a shell on
/// the guest console: `boot`, `run --keep-vm`).
fn kvm_plan(
    ui: Ui,
    mode: NestedMode,
    writable: &[&Path],
    readable: &[&Path],
    interactive: bool,
) -> Result<KvmPlan, Failed> {
    // Inside L1 the command's stderr is L1's serial console, a terminal: colour only when
    // ours is one (a CI log must not get escape codes).
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        std::env::set_var("NO_COLOR", "1");
    }
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    // Inside L1 the same binary is reached through the shared root filesystem.
    if let (Some(first), Ok(exe)) = (argv.first_mut(), std::env::current_exe()) {
        *first = exe.into_os_string();
    }
    // The engine finds (or builds) the guest initramfs again inside L1; the
    // rest of the cache (kernels, the L1 image) stays read-only there.
    let initramfs_cache = guest_image::cache_root().join("harness");
    // Kernels and images found here need not be looked up again under emulation.
    std::env::set_var(guest_image::LOOKUPS_ENV, guest_image::lookups_json());
    let l1 = L1Options {
        writable: writable
            .iter()
            .copied()
            .chain([initramfs_cache.as_path()])
            .map(Path::to_path_buf)
            .collect(),
        readable: readable.iter().map(|path| path.to_path_buf()).collect(),
        interactive,
        extra_env: vec![guest_image::LOOKUPS_ENV.to_owned(), FASTPATH_COUNT_ENV.to_owned()],
        ..L1Options::default()
    };
    termlab_nested::ensure_real_kvm_or_reexec_with(mode, &argv, &l1).map_err(|error| match error {
        NestedError::Interrupted(_) => {
            fail(ui, ExitClass::Interrupted, format!("interrupted: {error}"))
        }
        NestedError::KvmUnusable(_) => fail(ui, error.exit_class(), format!("{error}\nhint: this host's /dev/kvm cannot run a Linux guest; use `--nested auto` (the default) or `--nested always` to run inside a nested L1 VM")),
        // The launcher's error names the cause (a directory L1 cannot share or enter,
        // the end of L1's console, ...).
        other => fail_with(ui, other),
    })
}

/// The outcome of the same command run inside the L1 VM, by its exit code.
fn ran_in_l1(ui: Ui, exit_code: i32) -> Result<(), Failed> {
    let class = ExitClass::from_code(exit_code);
    if i32::from(class.code()) != exit_code {
        ui.error(&format!(
            "the command inside the L1 VM ended with status {exit_code}, which termlab never gives: treated as an infrastructure failure"
        ));
    }
    match class {
        ExitClass::Pass => Ok(()),
        class => Err(Failed::from(class)),
    }
}

/// One kernel a `termlab run` boots: what `--kernel` said (none: the
/// scenario's variant or `--kernel-dir`) and what the run calls it.
struct KernelSlot {
    choice: Option<KernelChoice>,
    label: Option<String>,
}

/// The kernels of `--kernel` (none given: the scenario's own), with their labels.
fn kernel_slots(ui: Ui, choices: &[KernelChoice]) -> Result<Vec<KernelSlot>, Failed> {
    if choices.len() > MAX_KERNELS {
        return Err(fail(
            ui,
            ExitClass::Usage,
            format!(
                "--kernel given {} times: a run compares at most {MAX_KERNELS} kernels",
                choices.len()
            ),
        ));
    }
    if choices.is_empty() {
        return Ok(vec![KernelSlot { choice: None, label: None }]);
    }
    Ok(choices
        .iter()
        .zip(guest_image::kernel_labels(choices))
        .map(|(choice, label)| KernelSlot { choice: Some(choice.clone()), label: Some(label) })
        .collect())
}

/// One scenario run on one kernel, as far as it got.
struct Finished<'a> {
    scenario: &'a LoadedScenario,
    /// The JUnit suite's name: the scenario's, with the kernel's label when there are several.
    suite: String,
    run: Result<ScenarioRun, EngineError>,
    seconds: f64,
}

fn run(
    ui: Ui,
    paths: &[PathBuf],
    mut options: RunOptions,
    kernel_choices: &[KernelChoice],
    outputs: RunOutputs,
    mode: NestedMode,
) -> Result<(), Failed> {
    let started = std::time::Instant::now();
    // Every scenario is checked, every path and kernel it needs found,
    // before anything boots (or nests).
    let loaded = load_scenarios(ui, paths)?;
    let slots = kernel_slots(ui, kernel_choices)?;
    check_output_paths(ui, &options, &outputs)?;
    let selected = outputs.selection.apply(loaded).map_err(|e| fail(ui, ExitClass::Usage, e))?;
    if selected.is_empty() {
        // A CI matrix may have more shards than scenarios.
        ui.say("no scenario is in this shard; nothing to run");
        return write_junit(ui, outputs.junit.as_deref(), &[]);
    }
    let root = repository_root().map_err(|e| fail_with(ui, e))?;
    let kernels = kernels_for(ui, &root, &selected, &slots, options.kernel_dir.as_deref())?;
    prepare_initramfs_images(ui, &root, &kernels)?;
    let prepared = started.elapsed();

    let nesting_began = SystemTime::now();
    options.nested = match kvm_plan_for_run(ui, mode, &options, &slots, &outputs)? {
        KvmPlan::RunHere { nested } => nested,
        KvmPlan::RanInL1 { exit_code } => {
            if outputs.timings {
                eprintln!(
                    "timings (host): scenarios, kernels and guest images {prepared:.2?}, the run in the L1 VM (with its start) {:.2?}, total {:.2?}",
                    started.elapsed() - prepared,
                    started.elapsed()
                );
            }
            return ran_run_in_l1(ui, exit_code, outputs.junit.as_deref(), nesting_began);
        }
    };
    options.cancel = Cancel::on_interrupt_signals();
    let (mut class, finished) = run_selected(ui, &root, &selected, &slots, &options, &outputs);
    if outputs.timings {
        eprintln!(
            "timings: scenarios, kernels and guest images {prepared:.2?}, total {:.2?}",
            started.elapsed()
        );
    }
    let reports: Vec<ScenarioReport<'_>> = finished.iter().map(scenario_report).collect();
    if let Err(Failed(junit_code)) = write_junit(ui, outputs.junit.as_deref(), &reports) {
        class = class.combine(ExitClass::from_code(junit_code.into()));
    }
    if options.cancel.is_cancelled() {
        class = class.combine(ExitClass::Interrupted);
    }
    match class {
        ExitClass::Pass => Ok(()),
        class => Err(Failed::from(class)),
    }
}

/// `--kernel-dir` must exist and `--junit`'s directory too: a usage error
/// before anything is built.
fn check_output_paths(ui: Ui, options: &RunOptions, outputs: &RunOutputs) -> Result<(), Failed> {
    if let Some(dir) = &options.kernel_dir {
        if !dir.is_dir() {
            return Err(fail(
                ui,
                ExitClass::Usage,
                format!("--kernel-dir {}: no such directory", dir.display()),
            ));
        }
    }
    if let Some(file) = &outputs.junit {
        let parent = junit_dir(file);
        if !parent.is_dir() {
            return Err(fail(
                ui,
                ExitClass::Usage,
                format!(
                    "--junit {}: the directory {} does not exist",
                    file.display(),
                    parent.display()
                ),
            ));
        }
    }
    Ok(())
}

fn junit_dir(file: &Path) -> &Path {
    file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Each selected scenario with each kernel it runs on, found and checked:
/// one message names every pair that cannot run, and then nothing runs.
fn kernels_for<'a>(
    ui: Ui,
    root: &Path,
    selected: &'a [LoadedScenario],
    slots: &[KernelSlot],
    kernel_dir: Option<&Path>,
) -> Result<Vec<(&'a LoadedScenario, guest_image::KernelBuild)>, Failed> {
    let several = slots.len() > 1;
    let mut kernels = Vec::new();
    let mut refused = ExitClass::Pass;
    for scenario in selected {
        for slot in slots {
            let kernel = guest_image::resolve_kernel(
                root,
                scenario.scenario.vm.kernel,
                slot.choice.as_ref(),
                kernel_dir,
            )
            .map_err(|e| fail_with(ui, e))?;
            if let Err(e) = engine::check_kernel_for(&scenario.scenario, &kernel) {
                let on = match (several, &slot.label) {
                    (true, Some(label)) => format!(" on kernel {label}"),
                    _ => String::new(),
                };
                ui.error(&format!("{}{on}: {e}", scenario.path.display()));
                refused = refused.combine(e.exit_class());
            }
            kernels.push((scenario, kernel));
        }
    }
    if refused == ExitClass::Pass {
        return Ok(kernels);
    }
    let hint =
        if several { " (leave such a scenario out with --filter, or drop the kernel)" } else { "" };
    Err(fail(ui, refused, format!("a kernel lacks what a scenario needs: nothing was run{hint}")))
}

/// Built here, before any nesting: compiling inside the emulated L1 VM takes
/// minutes, finding the cached image there takes seconds.
fn prepare_initramfs_images(
    ui: Ui,
    root: &Path,
    kernels: &[(&LoadedScenario, guest_image::KernelBuild)],
) -> Result<(), Failed> {
    for (scenario, kernel) in kernels {
        let spinner = ui.spinner("preparing the initramfs");
        let image = engine::scenario_initramfs(root, scenario, kernel);
        spinner.finish_and_clear();
        image.map_err(|e| fail_with(ui, e))?;
    }
    Ok(())
}

/// Where the run gets KVM. Inside L1 the host is read-only but for the
/// results and the JUnit file's directory; kernels given by path (or
/// `--kernel-dir`) must be visible there also under /tmp.
fn kvm_plan_for_run(
    ui: Ui,
    mode: NestedMode,
    options: &RunOptions,
    slots: &[KernelSlot],
    outputs: &RunOutputs,
) -> Result<KvmPlan, Failed> {
    let writable: Vec<&Path> = std::iter::once(options.results_root.as_path())
        .chain(outputs.junit.as_deref().map(junit_dir))
        .collect();
    let kernel_paths = slots.iter().filter_map(|slot| match &slot.choice {
        Some(KernelChoice::Path(path)) => Some(path.as_path()),
        _ => None,
    });
    let readable: Vec<&Path> =
        options.kernel_dir.as_deref().into_iter().chain(kernel_paths).collect();
    kvm_plan(ui, mode, &writable, &readable, options.keep_vm)
}

/// The run happened inside L1: its exit code, unless it could not write
/// `--junit` where the host sees it.
fn ran_run_in_l1(
    ui: Ui,
    exit_code: i32,
    junit: Option<&Path>,
    nesting_began: SystemTime,
) -> Result<(), Failed> {
    let outcome = ran_in_l1(ui, exit_code);
    match junit {
        Some(file) if !written_since(file, nesting_began) => {
            let class =
                outcome.err().map_or(ExitClass::Pass, |Failed(c)| ExitClass::from_code(c.into()));
            Err(fail(
                ui,
                class.combine(ExitClass::Infrastructure),
                format!("the run in the L1 VM did not write --junit {}: L1 sees the host's files except /tmp, which is its own; give a path outside /tmp", file.display()),
            ))
        }
        _ => outcome,
    }
}

/// Runs every selected scenario on every kernel (stopping at Ctrl-C), each
/// reported as it ends; with several kernels, also side by side.
fn run_selected<'a>(
    ui: Ui,
    root: &Path,
    selected: &'a [LoadedScenario],
    slots: &[KernelSlot],
    options: &RunOptions,
    outputs: &RunOutputs,
) -> (ExitClass, Vec<Finished<'a>>) {
    let printer = ProgressPrinter::new(ui, options.stream_console);
    let mut class = ExitClass::Pass;
    let mut finished: Vec<Finished<'_>> = Vec::new();
    for scenario in selected {
        ui.say(&format!("== {}: {}", scenario.name, scenario.scenario.description));
        // With several kernels: <results>/<scenario>/<time>/, a directory per kernel in it.
        let group = if slots.len() > 1 {
            match termlab::results::create_run_dir(
                &options.results_root,
                &scenario.name,
                SystemTime::now(),
            ) {
                Ok(dir) => Some(dir),
                Err(error) => {
                    ui.error(&format!("{}: {error}", scenario.name));
                    class = class.combine(error.exit_class());
                    continue;
                }
            }
        } else {
            None
        };
        let first = finished.len();
        for slot in slots {
            let run = run_on_kernel(ui, root, scenario, slot, group.as_deref(), options, &printer);
            class = class.combine(report_run(ui, scenario, &run.run, outputs));
            finished.push(run);
            if options.cancel.is_cancelled() {
                break;
            }
        }
        if let Some(group) = &group {
            let of_scenario = &finished[first..];
            class = class.combine(side_by_side(ui, group, slots, of_scenario, outputs.json));
        }
        if options.cancel.is_cancelled() {
            break;
        }
    }
    (class, finished)
}

/// One scenario on one kernel; with several kernels its results go to the
/// kernel's directory in `group`.
fn run_on_kernel<'a>(
    ui: Ui,
    root: &Path,
    scenario: &'a LoadedScenario,
    slot: &KernelSlot,
    group: Option<&Path>,
    options: &RunOptions,
    printer: &ProgressPrinter,
) -> Finished<'a> {
    let mut on_kernel = options.clone();
    on_kernel.kernel = slot.choice.clone();
    on_kernel.kernel_label = slot.label.clone();
    on_kernel.run_dir = group.zip(slot.label.as_ref()).map(|(g, l)| g.join(l));
    let suite = match (group, &slot.label) {
        (Some(_), Some(label)) => {
            ui.say(&format!("-- {} on kernel {label}", scenario.name));
            format!("{}[{label}]", scenario.name)
        }
        _ => scenario.name.clone(),
    };
    let began = Instant::now();
    // The engine returns the records; the reports are written here.
    let run = match engine::run_scenario(root, scenario, &on_kernel, printer) {
        Ok(run) => match report::write_run_report(&run.result, &run.dir) {
            Ok(()) => Ok(run),
            Err(error) => Err(EngineError::from(error)),
        },
        Err(error) => Err(error),
    };
    printer.clear();
    Finished { scenario, suite, run, seconds: began.elapsed().as_secs_f64() }
}

/// One scenario's runs on several kernels: their report side by side in
/// `group` (`termlab report`'s comparison) and a line saying each kernel's
/// verdict. Returns the class of failing to write the report.
fn side_by_side(
    ui: Ui,
    group: &Path,
    slots: &[KernelSlot],
    runs: &[Finished<'_>],
    json: bool,
) -> ExitClass {
    let verdicts: Vec<String> = slots
        .iter()
        .zip(runs)
        .map(|(slot, finished)| {
            let label = slot.label.as_deref().unwrap_or("?");
            let verdict = match &finished.run {
                Ok(ScenarioRun { result, outcome: Ok(()), .. }) => {
                    ui.verdict(result.all_expectations_passed())
                }
                Ok(ScenarioRun { outcome: Err(error), .. }) | Err(error) => {
                    format!("stopped ({})", error.exit_class().name())
                }
            };
            format!("{label} {verdict}")
        })
        .collect();
    let results: Vec<RunResult> = runs
        .iter()
        .filter_map(|finished| finished.run.as_ref().ok().map(|run| run.result.clone()))
        .collect();
    let written = report::comparison_document(&results)
        .and_then(|document| report::write_document(&document, group));
    let name = runs.first().map_or("", |finished| finished.scenario.name.as_str());
    let summary = format!(
        "  {name} on {} kernels: {}; side by side in {}",
        slots.len(),
        verdicts.join(", "),
        group.join(report::HTML_FILE).display()
    );
    if json {
        ui.say(&summary);
    } else {
        println!("{summary}");
    }
    match written {
        Ok(()) => ExitClass::Pass,
        Err(error) => {
            ui.error(&format!("{name}: cannot write the side-by-side report: {error}"));
            ExitClass::Infrastructure
        }
    }
}

/// Loads every file (each error shown); any invalid one is a usage error.
fn load_scenarios(ui: Ui, paths: &[PathBuf]) -> Result<Vec<LoadedScenario>, Failed> {
    let mut loaded = Vec::new();
    let mut invalid = 0;
    for path in paths {
        match scenario::load(path) {
            Ok(scenario) => loaded.push(scenario),
            Err(error) => {
                ui.error(&error.to_string());
                invalid += 1;
            }
        }
    }
    if invalid > 0 {
        return Err(fail(
            ui,
            ExitClass::Usage,
            format!("{invalid} scenario file(s) are invalid; nothing was run"),
        ));
    }
    Ok(loaded)
}

/// Prints one scenario's verdicts or error; returns its class.
fn report_run(
    ui: Ui,
    scenario: &LoadedScenario,
    run: &Result<ScenarioRun, EngineError>,
    outputs: &RunOutputs,
) -> ExitClass {
    let error = match run {
        Ok(ScenarioRun { result, dir, outcome }) => {
            if let Some(timings) = result.timings.as_ref().filter(|_| outputs.timings) {
                eprintln!("timings [{}]: {}", scenario.name, timings.line());
            }
            if outcome.is_ok() {
                print_outcome(ui, result, dir, outputs.json);
                return if result.all_expectations_passed() {
                    ExitClass::Pass
                } else {
                    ExitClass::Finding
                };
            }
            outcome.as_ref().err()
        }
        Err(error) => Some(error),
    };
    match error {
        Some(error) => {
            let class = error.exit_class();
            ui.error(&format!("{}: {error}", scenario.name));
            // Shown under --quiet too: a CI script tells the emulated host's
            // failures (infrastructure) from the kernel's by it.
            eprintln!("  ({}: exit class {})", scenario.name, class.name());
            class
        }
        None => ExitClass::Pass,
    }
}

fn scenario_report<'a>(finished: &'a Finished<'a>) -> ScenarioReport<'a> {
    let (result, dir, error) = match &finished.run {
        Ok(ScenarioRun { result, dir, outcome }) => {
            (Some(result), Some(dir.as_path()), outcome.as_ref().err())
        }
        Err(error) => (None, None, Some(error)),
    };
    ScenarioReport {
        name: &finished.suite,
        path: &finished.scenario.path,
        result,
        dir,
        seconds: finished.seconds,
        console_tail: dir.map_or_else(Vec::new, |dir| {
            engine::console_last_lines(
                &dir.join(termlab::results::CONSOLE_FILE),
                junit::CONSOLE_TAIL_LINES,
            )
        }),
        error: error.map(|e| RunError { class: e.exit_class(), message: e.to_string() }),
    }
}

/// Whether `file` was written at or after `since`.
fn written_since(file: &Path, since: SystemTime) -> bool {
    std::fs::metadata(file).and_then(|m| m.modified()).is_ok_and(|modified| modified >= since)
}

/// Writes the JUnit file when asked for; failing to is infrastructure.
fn write_junit(ui: Ui, file: Option<&Path>, reports: &[ScenarioReport<'_>]) -> Result<(), Failed> {
    let Some(file) = file else { return Ok(()) };
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let hostname = termlab::environment::host_info().hostname;
    let xml = junit::junit_xml(reports, &now, &hostname);
    junit::write_junit(file, &xml).map_err(|e| fail_with(ui, e))?;
    ui.say(&format!("JUnit report written to {}", file.display()));
    Ok(())
}

fn print_outcome(ui: Ui, result: &RunResult, dir: &Path, json: bool) {
    if json {
        match serde_json::to_string_pretty(result) {
            Ok(text) => println!("{text}"),
            Err(error) => ui.error(&format!("cannot print the result as JSON: {error}")),
        }
        return;
    }
    for expectation in &result.expectations {
        println!(
            "  {} {} — {}",
            ui.verdict(expectation.passed),
            expectation.name,
            expectation.detail
        );
    }
    let measured = result.measured_repetitions().count();
    if measured < result.repetitions.len() && !result.summary.is_empty() {
        println!(
            "  timings from the {measured} of {} repetitions without the VMM's stack stops:",
            result.repetitions.len()
        );
    }
    for metric in &result.summary {
        let unit = report::plot::Unit::for_max_ns(metric.summary.max_ns);
        let ratio = metric
            .ratio_to_ipi
            .as_ref()
            .map_or(String::new(), |r| format!("  ({:.1}× IPI at p50)", r.p50));
        println!(
            "  {:<20} n={:<4} p50 {}  p90 {}  p99 {}  max {}{ratio}",
            metric.metric,
            metric.summary.n,
            unit.format(metric.summary.p50_ns),
            unit.format(metric.summary.p90_ns),
            unit.format(metric.summary.p99_ns),
            unit.format(metric.summary.max_ns)
        );
    }
    let failed: Vec<&str> =
        result.expectations.iter().filter(|e| !e.passed).map(|e| e.name.as_str()).collect();
    if failed.is_empty() {
        println!(
            "  {}: all {} expectations hold; results in {}",
            ui.verdict(true),
            result.expectations.len(),
            dir.display()
        );
    } else {
        println!(
            "  {}: failed: {}; results in {}",
            ui.verdict(false),
            failed.join("; "),
            dir.display()
        );
    }
}

fn kernel_build(ui: Ui, variant: KernelVariant) -> Result<(), Failed> {
    let root = repository_root().map_err(|e| fail_with(ui, e))?;
    let mut command = std::process::Command::new(root.join("guest-kernel/build"));
    command.args(["--variant", variant.as_str()]);
    if ui.is_quiet() {
        command.arg("--quiet");
    }
    // The build script prints its own progress on stderr and the output directory on stdout.
    let status = command.status().map_err(|e| {
        fail(ui, ExitClass::Infrastructure, format!("cannot run guest-kernel/build: {e}"))
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(
            ui,
            ExitClass::Infrastructure,
            format!(
                "guest-kernel/build --variant {} failed ({status}); its log is named above",
                variant.as_str()
            ),
        ))
    }
}

fn boot(
    ui: Ui,
    choice: &KernelChoice,
    vcpus: u8,
    memory_mib: u32,
    mode: NestedMode,
) -> Result<(), Failed> {
    let root = repository_root().map_err(|e| fail_with(ui, e))?;
    let kernel = guest_image::kernel_from_choice(&root, choice).map_err(|e| fail_with(ui, e))?;
    let initramfs = prepare_initramfs(ui, &root, &kernel)?;
    if let KvmPlan::RanInL1 { exit_code } = kvm_plan(ui, mode, &[], &[&kernel.dir], true)? {
        return ran_in_l1(ui, exit_code);
    }
    let cancel = Cancel::on_interrupt_signals();
    let console = tempfile::Builder::new().prefix("termlab-console.").tempfile().map_err(|e| {
        fail(ui, ExitClass::Infrastructure, format!("cannot create a console log: {e}"))
    })?;
    let guest = Guest::boot(BootSpec {
        kernel: kernel.boot_image(),
        initramfs: &initramfs,
        vcpus,
        memory_mib,
        console_log: console.path().to_owned(),
        console_stdin: true,
        kernel_args: None,
        cancel: &cancel,
        system_map: kernel.system_map.as_deref(),
    })
    .map_err(|e| fail_with(ui, e))?;
    engine::interactive_console(guest, console.path(), &ProgressPrinter::new(ui, false));
    Ok(())
}

fn bench(ui: Ui, mut options: BenchOptions, mode: NestedMode) -> Result<(), Failed> {
    let root = repository_root().map_err(|e| fail_with(ui, e))?;
    let patched =
        guest_image::find_kernel(&root, KernelVariant::Default).map_err(|e| fail_with(ui, e))?;
    let baseline = guest_image::find_kernel(&root, KernelVariant::Noterm).map_err(|e| {
        fail(
            ui,
            e.exit_class(),
            format!("{e}\nhint: the baseline is `termlab kernel build --variant noterm`"),
        )
    })?;
    let patched_image = prepare_initramfs(ui, &root, &patched)?;
    let baseline_image = prepare_initramfs(ui, &root, &baseline)?;
    options.fastpath_instructions =
        Some(fastpath_instructions(ui, &root, &patched.dir, &baseline.dir)?);
    options.nested = match kvm_plan(ui, mode, &[&options.results_root], &[], false)? {
        KvmPlan::RunHere { nested } => nested,
        KvmPlan::RanInL1 { exit_code } => return ran_in_l1(ui, exit_code),
    };
    options.cancel = Cancel::on_interrupt_signals();
    let (result, dir) = termlab::bench::run(
        termlab::bench::BenchKernel { build: &patched, initramfs: &patched_image },
        termlab::bench::BenchKernel { build: &baseline, initramfs: &baseline_image },
        &options,
        &ProgressPrinter::new(ui, false),
    )
    .map_err(|e| fail_with(ui, e))?;
    report::write_bench_report(&result, &dir).map_err(|e| fail_with(ui, EngineError::from(e)))?;
    if let Ok(markdown) = std::fs::read_to_string(dir.join(report::MARKDOWN_FILE)) {
        print!("{markdown}");
    }
    ui.say(&format!("benchmark written to {}", dir.display()));
    Ok(())
}

/// The fast path in instructions: counted here (it needs no KVM), or, inside the nested L1
/// VM, taken from the count the host made before it entered ([`FASTPATH_COUNT_ENV`]).
fn fastpath_instructions(
    ui: Ui,
    root: &Path,
    patched: &Path,
    baseline: &Path,
) -> Result<termlab::results::bench::FastpathInstructions, Failed> {
    if let Ok(json) = std::env::var(FASTPATH_COUNT_ENV) {
        return serde_json::from_str(&json).map_err(|e| {
            fail(ui, ExitClass::Infrastructure, format!("{FASTPATH_COUNT_ENV} does not parse: {e}"))
        });
    }
    ui.say("counting the fast path in instructions (guest-kernel/fastpath-count --icount)");
    let counted = termlab::bench::count_fastpath_instructions(root, patched, baseline)
        .map_err(|e| fail_with(ui, e))?;
    let json = serde_json::to_string(&counted).map_err(|e| {
        fail(ui, ExitClass::Infrastructure, format!("cannot encode the instruction count: {e}"))
    })?;
    std::env::set_var(FASTPATH_COUNT_ENV, json);
    Ok(counted)
}

/// Carries `termlab bench`'s instruction count, made on the host, into its nested L1 run.
const FASTPATH_COUNT_ENV: &str = "TERMLAB_BENCH_FASTPATH_COUNT";

fn prepare_initramfs(
    ui: Ui,
    root: &Path,
    kernel: &guest_image::KernelBuild,
) -> Result<PathBuf, Failed> {
    let spinner = ui.spinner("preparing the initramfs");
    let image = guest_image::initramfs(root, kernel);
    spinner.finish_and_clear();
    image.map_err(|e| fail_with(ui, e))
}

fn report_command(ui: Ui, dirs: &[PathBuf], out: &Path, migrate: bool) -> Result<(), Failed> {
    if let Some(missing) = dirs.iter().find(|dir| !dir.is_dir()) {
        return Err(fail(
            ui,
            ExitClass::Usage,
            format!("{}: no such directory", missing.display()),
        ));
    }
    // A result directory that exists but cannot be read back (a schema no migration reaches,
    // a damaged file) is still the caller's input: usage.
    let regenerated =
        report::regenerate(dirs, migrate).map_err(|e| fail(ui, ExitClass::Usage, e))?;
    for dir in dirs {
        ui.say(&format!("regenerated {}", dir.join(report::HTML_FILE).display()));
    }
    let runs: Vec<RunResult> = regenerated
        .into_iter()
        .filter_map(|r| match r {
            report::Regenerated::Run(run) => Some(*run),
            report::Regenerated::Bench => None,
        })
        .collect();
    if runs.len() > 1 {
        std::fs::create_dir_all(out).map_err(|e| {
            fail(ui, ExitClass::Infrastructure, format!("cannot create {}: {e}", out.display()))
        })?;
        let document = report::comparison_document(&runs)
            .map_err(|e| fail(ui, ExitClass::Infrastructure, e))?;
        report::write_document(&document, out)
            .map_err(|e| fail(ui, ExitClass::Infrastructure, e))?;
        print!("{}", document.to_markdown());
        ui.say(&format!("comparison written to {}", out.join(report::HTML_FILE).display()));
    }
    Ok(())
}

fn compare_command(
    ui: Ui,
    base_dir: &Path,
    new_dir: &Path,
    threshold_pct: f64,
    metrics: &[String],
    out: Option<PathBuf>,
) -> Result<(), Failed> {
    let bad_input = |message: String| fail(ui, ExitClass::Usage, message);
    let base = RunResult::load(base_dir).map_err(|e| bad_input(format!("base: {e}")))?;
    let new = RunResult::load(new_dir).map_err(|e| bad_input(format!("new: {e}")))?;
    let comparison = termlab::compare::compare(&base, &new, threshold_pct, metrics)
        .map_err(|e| bad_input(e.to_string()))?;
    let document = report::compare_document((&base, base_dir), (&new, new_dir), &comparison)
        .map_err(|e| bad_input(e.to_string()))?;
    let out = match out {
        Some(dir) => std::fs::create_dir_all(&dir)
            .map(|()| dir.clone())
            .map_err(|e| bad_input(format!("cannot create {}: {e}", dir.display()))),
        None => termlab::results::create_run_dir(
            Path::new("results"),
            "compare",
            std::time::SystemTime::now(),
        )
        .map_err(|e| bad_input(e.to_string())),
    }?;
    let json = serde_json::to_vec_pretty(&comparison)
        .map_err(|e| bad_input(format!("cannot serialise the comparison: {e}")))?;
    termlab::results::write_atomically(&out.join(termlab::compare::COMPARE_FILE), &json)
        .map_err(|e| bad_input(e.to_string()))?;
    report::write_document(&document, &out).map_err(|e| bad_input(e.to_string()))?;
    print!("{}", document.to_markdown());
    ui.say(&format!("comparison written to {}", out.join(report::HTML_FILE).display()));
    if comparison.regressed() {
        Err(Failed::from(ExitClass::Finding))
    } else {
        Ok(())
    }
}

/// One scenario as `termlab list --json` prints it.
#[derive(serde::Serialize)]
struct ListedScenario<'a> {
    name: &'a str,
    path: String,
    description: &'a str,
    repetitions: u32,
    kernel: &'static str,
    vcpus: u32,
}

fn list(ui: Ui, dir: &Path, selection: &Selection, json: bool) -> Result<(), Failed> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| fail(ui, ExitClass::Usage, format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let loaded = load_scenarios(ui, &paths)?;
    let selected = selection.apply(loaded).map_err(|e| fail(ui, ExitClass::Usage, e))?;
    if json {
        let listed: Vec<ListedScenario<'_>> = selected
            .iter()
            .map(|s| ListedScenario {
                name: &s.name,
                path: s.path.display().to_string(),
                description: &s.scenario.description,
                repetitions: s.scenario.repetitions.get(),
                kernel: s.scenario.vm.kernel.as_str(),
                vcpus: s.scenario.vm.vcpus.get(),
            })
            .collect();
        let text = serde_json::to_string_pretty(&listed).map_err(|e| {
            fail(ui, ExitClass::Infrastructure, format!("cannot print the list as JSON: {e}"))
        })?;
        println!("{text}");
    } else {
        for scenario in &selected {
            println!("{:<16} {}", scenario.name, scenario.scenario.description);
        }
    }
    Ok(())
}

/// `termlab exec` options shared by a command and a vmtest.toml.
struct ExecOptions {
    vcpus: u8,
    memory_mib: u32,
    mode: NestedMode,
    timings: bool,
}

/// `termlab exec` exit status for a usage error (as clap's own).
const EXIT_USAGE: u8 = 2;

/// Where `exec` runs: here, or (re-executed in the nested L1 VM) nowhere,
/// with its exit code there. L1 failing to start is the guest not coming up.
fn exec_plan(ui: Ui, mode: NestedMode) -> Result<Option<Failed>, Failed> {
    let plan = kvm_plan(ui, mode, &[], &[], false).map_err(|Failed(code)| {
        let interrupted = ExitClass::Interrupted.code();
        Failed(if code == interrupted { code } else { exec::EXIT_GUEST_UNAVAILABLE })
    })?;
    Ok(match plan {
        KvmPlan::RunHere { .. } => None,
        KvmPlan::RanInL1 { exit_code } => Some(Failed(u8::try_from(exit_code).unwrap_or(1))),
    })
}

fn exit_with(code: u8) -> Result<(), Failed> {
    if code == 0 {
        Ok(())
    } else {
        Err(Failed(code))
    }
}

fn exec_command(
    ui: Ui,
    choice: Option<KernelChoice>,
    argv: &[String],
    options: &ExecOptions,
) -> Result<(), Failed> {
    let started = std::time::Instant::now();
    if argv.is_empty() {
        ui.error("exec needs a command after `--` (termlab exec -- CMD ARGS...) or --config");
        return Err(Failed(EXIT_USAGE));
    }
    let own_error = |e: &dyn std::fmt::Display| {
        ui.error(&e.to_string());
        Failed(exec::EXIT_EXEC_FAILED)
    };
    let root = repository_root().map_err(|e| own_error(&e))?;
    let choice = choice.unwrap_or(KernelChoice::Variant(KernelVariant::Default));
    let mut handed_over = PreparedImages::from_env();
    let (bzimage, initramfs) = handed_over.prepare(ui, &root, &choice)?;
    handed_over.hand_over();
    let prepared = started.elapsed();
    if options.timings {
        eprintln!("timings: kernel and initramfs ready after {prepared:.2?}");
    }
    if let Some(Failed(code)) = exec_plan(ui, options.mode)? {
        if options.timings {
            eprintln!("timings (host): prepare {prepared:.2?}, total {:.2?}", started.elapsed());
        }
        return exit_with(code);
    }
    let cancel = Cancel::on_interrupt_signals();
    let spec = exec::ExecSpec {
        kernel: &bzimage,
        initramfs: &initramfs,
        vcpus: options.vcpus,
        memory_mib: options.memory_mib,
        kernel_args: None,
        argv,
        cwd: None,
        upload: None,
        cancel: &cancel,
    };
    let code = run_exec(ui, &spec, options.timings, started);
    exit_with(code)
}

/// Runs one exec spec here and returns the exit code, with errors shown.
fn run_exec(ui: Ui, spec: &exec::ExecSpec<'_>, timings: bool, started: std::time::Instant) -> u8 {
    let mut phases = exec::ExecTimings::default();
    let outcome =
        exec::exec_in_guest(spec, &mut std::io::stdout(), &mut std::io::stderr(), &mut phases);
    if timings {
        eprintln!(
            "timings: boot {:.2?} (VMM start to agent hello), command {:.2?}, power-off {:.2?}, this process {:.2?}",
            phases.boot, phases.command, phases.power_off, started.elapsed()
        );
    }
    match outcome {
        Ok(status) => exec::shell_exit_code(&status),
        Err(error) => {
            ui.error(&error.to_string());
            error.exit_code()
        }
    }
}

/// `termlab exec --config vmtest.toml`: every selected target in turn.
fn exec_vmtest(
    ui: Ui,
    path: &Path,
    filter: Option<&str>,
    options: &ExecOptions,
) -> Result<(), Failed> {
    let started = std::time::Instant::now();
    let usage = |e: &dyn std::fmt::Display| {
        ui.error(&e.to_string());
        Failed(EXIT_USAGE)
    };
    let config = termlab::vmtest::load(path).map_err(|e| usage(&e))?;
    let targets = config.select(filter).map_err(|e| usage(&e))?;
    let own_error = |e: &dyn std::fmt::Display| {
        ui.error(&e.to_string());
        Failed(exec::EXIT_EXEC_FAILED)
    };
    let root = repository_root().map_err(|e| own_error(&e))?;
    // Every kernel and the directory's files are checked before anything boots (or nests).
    let mut handed_over = PreparedImages::from_env();
    let mut prepared = Vec::new();
    for target in &targets {
        let choice = KernelChoice::Path(target.kernel.clone());
        prepared.push(
            handed_over
                .prepare(ui, &root, &choice)
                .inspect_err(|_| ui.error(&format!("(in target {})", target.name)))?,
        );
    }
    handed_over.hand_over();
    let upload = exec::Upload::collect(&config.dir, termlab::vmtest::GUEST_DIR)
        .map_err(|e| own_error(&e))?;
    if let Some(Failed(code)) = exec_plan(ui, options.mode)? {
        return exit_with(code);
    }
    let cancel = Cancel::on_interrupt_signals();
    let mut verdicts = Vec::new();
    for (target, (bzimage, initramfs)) in targets.iter().zip(&prepared) {
        ui.say(&format!("=> {}", target.name));
        let argv = ["sh".to_owned(), "-c".to_owned(), target.command.clone()];
        let spec = exec::ExecSpec {
            kernel: bzimage,
            initramfs,
            vcpus: target.vcpus,
            memory_mib: target.memory_mib,
            kernel_args: target.kernel_args.as_deref(),
            argv: &argv,
            cwd: Some(termlab::vmtest::GUEST_DIR),
            upload: Some(&upload),
            cancel: &cancel,
        };
        let code = run_exec(ui, &spec, options.timings, started);
        verdicts.push((target.name.as_str(), code));
        if cancel.is_cancelled() {
            return Err(Failed(exec::EXIT_INTERRUPTED));
        }
    }
    if let [(_, code)] = verdicts.as_slice() {
        return exit_with(*code);
    }
    let mut failed = 0u8;
    for (name, code) in &verdicts {
        if *code == 0 {
            println!("PASS {name}");
        } else {
            println!("FAILED {name} (exit {code})");
            failed = failed.saturating_add(1);
        }
    }
    exit_with(failed)
}

/// The kernel image that boots (KernelBuild::boot_image) and initramfs each `--kernel`
/// value resolved to, handed from
/// the host to the same command re-run inside the nested L1 VM (through the
/// environment, which the launcher passes on for TERMLAB_* names): under
/// emulation, resolving a variant and checking the initramfs cache again
/// takes tens of seconds.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct PreparedImages(std::collections::BTreeMap<String, (PathBuf, PathBuf)>);

/// Holds [`PreparedImages`] as JSON.
const PREPARED_ENV: &str = "TERMLAB_EXEC_PREPARED";

impl PreparedImages {
    /// What the host prepared, when this is the re-run inside L1.
    fn from_env() -> PreparedImages {
        std::env::var(PREPARED_ENV)
            .ok()
            .filter(|_| termlab_nested::is_nested())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// The kernel image and initramfs for `choice`: handed over, or resolved and built here.
    fn prepare(
        &mut self,
        ui: Ui,
        root: &Path,
        choice: &KernelChoice,
    ) -> Result<(PathBuf, PathBuf), Failed> {
        let key = format!("{choice:?}");
        if let Some((image, initramfs)) = self.0.get(&key) {
            if image.is_file() && initramfs.is_file() {
                return Ok((image.clone(), initramfs.clone()));
            }
        }
        let kernel = guest_image::kernel_from_choice(root, choice).map_err(|e| {
            ui.error(&e.to_string());
            Failed(exec::EXIT_EXEC_FAILED)
        })?;
        let initramfs = prepare_initramfs(ui, root, &kernel)
            .map_err(|Failed(_)| Failed(exec::EXIT_EXEC_FAILED))?;
        let image = kernel.boot_image().to_owned();
        self.0.insert(key, (image.clone(), initramfs.clone()));
        Ok((image, initramfs))
    }

    /// Puts them in the environment for a re-run inside L1.
    fn hand_over(&self) {
        if let Ok(text) = serde_json::to_string(self) {
            // Single-threaded here: nothing else reads the environment concurrently.
            std::env::set_var(PREPARED_ENV, text);
        }
    }
}
