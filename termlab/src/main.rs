//! `termlab`: run scenarios in the guest VM, build the kernel, boot an
//! interactive guest, list scenarios, regenerate and compare reports.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use termlab::bench::BenchOptions;
use termlab::engine::{self, BootSpec, Guest, RunOptions};
use termlab::exec;
use termlab::guest_image::{self, repository_root, KernelChoice};
use termlab::report;
use termlab::results::RunResult;
use termlab::scenario::{self, KernelVariant, LoadedScenario};
use termlab::ui::Ui;
use termlab_nested::{KvmPlan, L1Options, NestedMode};

#[derive(Parser)]
#[command(
    name = "termlab",
    version,
    about = "Stop running eBPF programs on demand in a Linux 6.12 guest, and prove it from outside"
)]
struct Cli {
    /// No progress output; only results and errors.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios: boot the guest, execute the steps, measure, write results/.
    /// Exits 0 only if every expectation of every scenario holds.
    Run {
        /// Scenario files (scenarios/*.toml).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// Repetitions per scenario, instead of the file's `repetitions`.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        repeat: Option<u32>,
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
        /// scenario's `kernel` variant from guest-kernel/build.
        #[arg(long, env = "TERMLAB_KERNEL_DIR")]
        kernel_dir: Option<PathBuf>,
        #[command(flatten)]
        kernel: KernelArg,
    },
    /// Guest kernel commands.
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// Boot the guest with its console on this terminal (`reboot -f` in the guest ends it;
    /// `poweroff -f` only halts the guest, which the VMM does not see with an in-kernel LAPIC).
    Boot {
        #[arg(long, value_enum, default_value_t = Variant::Default)]
        variant: Variant,
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
    /// Regenerate the reports of result directories; with several, also compare them side by side.
    Report {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where the comparison (report.md, report.html, plots) goes when several runs are given.
        #[arg(long, default_value = "results/comparison")]
        out: PathBuf,
    },
    /// List scenarios with their one-line descriptions.
    List {
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
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

/// `--kernel PATH|VARIANT`, shared by `run`, `exec` and `boot`.
#[derive(clap::Args, Clone)]
struct KernelArg {
    /// The kernel to boot: a bzImage (System.map and bpftool beside it or in its build tree
    /// are used when present), a kernel build tree (arch/x86/boot/bzImage), a
    /// guest-kernel/build output directory, or a variant name: default, debug, noterm.
    #[arg(long = "kernel", value_name = "PATH|VARIANT")]
    choice: Option<KernelChoice>,
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Build (or reuse) the guest kernel with guest-kernel/build.
    Build {
        #[arg(long, value_enum, default_value_t = Variant::Default)]
        variant: Variant,
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

#[derive(Clone, Copy, ValueEnum)]
enum Variant {
    Default,
    Debug,
    Noterm,
}

impl From<Variant> for KernelVariant {
    fn from(variant: Variant) -> KernelVariant {
        match variant {
            Variant::Default => KernelVariant::Default,
            Variant::Debug => KernelVariant::Debug,
            Variant::Noterm => KernelVariant::Noterm,
        }
    }
}

/// A failure already explained to the user, with the exit code to use.
struct Failed(u8);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ui = Ui::new(cli.quiet);
    let outcome = match cli.command {
        Command::Run { scenarios, repeat, json, keep_vm, nested, results, kernel_dir, kernel } => {
            let options = RunOptions {
                repeat,
                keep_vm,
                results_root: results,
                nested: false,
                kernel_dir,
                kernel: kernel.choice,
            };
            run(ui, &scenarios, options, json, nested.into())
        }
        Command::Kernel { command: KernelCommand::Build { variant } } => {
            kernel_build(ui, variant.into())
        }
        Command::Boot { variant, kernel, vcpus, memory_mib, nested } => {
            let choice = kernel.choice.unwrap_or(KernelChoice::Variant(variant.into()));
            boot(ui, &choice, vcpus, memory_mib, nested.into())
        }
        Command::Exec { kernel, vcpus, memory_mib, nested, config, filter, timings, command } => {
            let options = ExecOptions { vcpus, memory_mib, mode: nested.into(), timings };
            match config {
                Some(config) => exec_vmtest(ui, &config, filter.as_deref(), &options),
                None => exec_command(ui, kernel.choice, &command, &options),
            }
        }
        Command::Report { dirs, out } => report_command(ui, &dirs, &out),
        Command::List { dir } => list(ui, &dir),
        Command::Bench { iterations, rounds, load_sizes, quick, nested, results } => {
            let options = if quick {
                BenchOptions {
                    iterations: 20,
                    rounds: 2,
                    load_sizes: vec![10, 1000],
                    results_root: results,
                    nested: false,
                }
            } else {
                BenchOptions {
                    iterations,
                    rounds,
                    load_sizes,
                    results_root: results,
                    nested: false,
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

fn fail(ui: Ui, message: impl std::fmt::Display) -> Failed {
    ui.error(&message.to_string());
    Failed(1)
}

/// Where the VM will run: here, or (after re-running this very command
/// inside a nested L1 VM) nowhere, with the exit code it had there.
fn kvm_plan(ui: Ui, mode: NestedMode) -> Result<KvmPlan, Failed> {
    kvm_plan_with(ui, mode, &L1Options::default())
}

/// [`kvm_plan`] with the L1 VM's options (`interactive` for a console on this terminal).
fn kvm_plan_with(ui: Ui, mode: NestedMode, l1: &L1Options) -> Result<KvmPlan, Failed> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    // Inside L1 the same binary is reached through the shared root filesystem.
    if let (Some(first), Ok(exe)) = (argv.first_mut(), std::env::current_exe()) {
        *first = exe.into_os_string();
    }
    termlab_nested::ensure_real_kvm_or_reexec_with(mode, &argv, l1).map_err(|error| {
        if let termlab_nested::NestedError::Interrupted(_) = error {
            ui.error(&format!("interrupted: {error}"));
            return Failed(EXIT_INTERRUPTED);
        }
        fail(ui, format!("{error}\nhint: this host's /dev/kvm cannot run a Linux guest; use `--nested auto` (the default) or `--nested always` to run inside a nested L1 VM"))
    })
}

fn run(
    ui: Ui,
    paths: &[PathBuf],
    mut options: RunOptions,
    json: bool,
    mode: NestedMode,
) -> Result<(), Failed> {
    // Every scenario is checked, and every kernel it needs found, before
    // anything boots (or nests).
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
        return Err(fail(ui, format!("{invalid} scenario file(s) are invalid; nothing was run")));
    }
    let root = repository_root().map_err(|e| fail(ui, e))?;
    for scenario in &loaded {
        let kernel = guest_image::resolve_kernel(
            &root,
            scenario.scenario.vm.kernel,
            options.kernel.as_ref(),
            options.kernel_dir.as_deref(),
        )
        .map_err(|e| fail(ui, e))?;
        engine::check_kernel_for(&scenario.scenario, &kernel)
            .map_err(|e| fail(ui, format!("{}: {e}", scenario.path.display())))?;
        // Built here, before any nesting: compiling inside the emulated L1
        // VM takes minutes, finding the cached image there takes seconds.
        prepare_initramfs(ui, &root, &kernel)?;
    }

    // --keep-vm ends at a shell on the guest console: give L1 this terminal.
    let l1 = L1Options { interactive: options.keep_vm, ..L1Options::default() };
    options.nested = match kvm_plan_with(ui, mode, &l1)? {
        KvmPlan::RunHere { nested } => nested,
        KvmPlan::RanInL1 { exit_code } => {
            return if exit_code == 0 {
                Ok(())
            } else {
                Err(Failed(u8::try_from(exit_code).unwrap_or(1)))
            }
        }
    };
    engine::install_interrupt_handler();
    let mut all_passed = true;
    for scenario in &loaded {
        all_passed &= run_one(ui, &root, scenario, &options, json);
        if engine::interrupted() {
            break;
        }
    }
    if engine::interrupted() {
        Err(Failed(EXIT_INTERRUPTED))
    } else if all_passed {
        Ok(())
    } else {
        Err(Failed(1))
    }
}

/// Exit status after Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// Runs one scenario and prints its verdicts; true when everything held.
fn run_one(
    ui: Ui,
    root: &Path,
    scenario: &LoadedScenario,
    options: &RunOptions,
    json: bool,
) -> bool {
    ui.say(&format!("== {}: {}", scenario.name, scenario.scenario.description));
    match engine::run_scenario(root, scenario, options, ui) {
        Ok((result, dir)) => {
            print_outcome(ui, &result, &dir, json);
            result.all_expectations_passed()
        }
        Err(error) => {
            ui.error(&format!("{}: {error}", scenario.name));
            false
        }
    }
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
    let root = repository_root().map_err(|e| fail(ui, e))?;
    let mut command = std::process::Command::new(root.join("guest-kernel/build"));
    command.args(["--variant", variant.as_str()]);
    if ui.is_quiet() {
        command.arg("--quiet");
    }
    // The build script prints its own progress on stderr and the output directory on stdout.
    let status =
        command.status().map_err(|e| fail(ui, format!("cannot run guest-kernel/build: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(
            ui,
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
    let root = repository_root().map_err(|e| fail(ui, e))?;
    let kernel = guest_image::kernel_from_choice(&root, choice).map_err(|e| fail(ui, e))?;
    let initramfs = prepare_initramfs(ui, &root, &kernel)?;
    let interactive = L1Options { interactive: true, ..L1Options::default() };
    if let KvmPlan::RanInL1 { exit_code } = kvm_plan_with(ui, mode, &interactive)? {
        return if exit_code == 0 {
            Ok(())
        } else {
            Err(Failed(u8::try_from(exit_code).unwrap_or(1)))
        };
    }
    engine::install_interrupt_handler();
    let console = tempfile::Builder::new()
        .prefix("termlab-console.")
        .tempfile()
        .map_err(|e| fail(ui, format!("cannot create a console log: {e}")))?;
    let guest = Guest::boot(BootSpec {
        kernel: &kernel.bzimage,
        initramfs: &initramfs,
        vcpus,
        memory_mib,
        console_log: console.path().to_owned(),
        console_stdin: true,
        extra_cmdline: None,
    })
    .map_err(|e| fail(ui, e))?;
    engine::interactive_console(guest, console.path(), ui);
    Ok(())
}

fn bench(ui: Ui, mut options: BenchOptions, mode: NestedMode) -> Result<(), Failed> {
    let root = repository_root().map_err(|e| fail(ui, e))?;
    let patched =
        guest_image::find_kernel(&root, KernelVariant::Default).map_err(|e| fail(ui, e))?;
    let baseline = guest_image::find_kernel(&root, KernelVariant::Noterm).map_err(|e| {
        fail(ui, format!("{e}\nhint: the baseline is `termlab kernel build --variant noterm`"))
    })?;
    let patched_image = prepare_initramfs(ui, &root, &patched)?;
    let baseline_image = prepare_initramfs(ui, &root, &baseline)?;
    options.nested = match kvm_plan(ui, mode)? {
        KvmPlan::RunHere { nested } => nested,
        KvmPlan::RanInL1 { exit_code } => {
            return if exit_code == 0 {
                Ok(())
            } else {
                Err(Failed(u8::try_from(exit_code).unwrap_or(1)))
            }
        }
    };
    engine::install_interrupt_handler();
    let (_, dir) = termlab::bench::run(
        termlab::bench::BenchKernel { build: &patched, initramfs: &patched_image },
        termlab::bench::BenchKernel { build: &baseline, initramfs: &baseline_image },
        &options,
        ui,
    )
    .map_err(|e| fail(ui, e))?;
    if let Ok(markdown) = std::fs::read_to_string(dir.join(report::MARKDOWN_FILE)) {
        print!("{markdown}");
    }
    ui.say(&format!("benchmark written to {}", dir.display()));
    Ok(())
}

fn prepare_initramfs(
    ui: Ui,
    root: &Path,
    kernel: &guest_image::KernelBuild,
) -> Result<PathBuf, Failed> {
    let spinner = ui.spinner("preparing the initramfs");
    let image = guest_image::initramfs(root, kernel);
    spinner.finish_and_clear();
    image.map_err(|e| fail(ui, e))
}

fn report_command(ui: Ui, dirs: &[PathBuf], out: &Path) -> Result<(), Failed> {
    let runs = report::regenerate(dirs).map_err(|e| fail(ui, e))?;
    for dir in dirs {
        ui.say(&format!("regenerated {}", dir.join(report::HTML_FILE).display()));
    }
    if runs.len() > 1 {
        std::fs::create_dir_all(out)
            .map_err(|e| fail(ui, format!("cannot create {}: {e}", out.display())))?;
        let document = report::comparison_document(&runs).map_err(|e| fail(ui, e))?;
        report::write_document(&document, out).map_err(|e| fail(ui, e))?;
        print!("{}", document.to_markdown());
        ui.say(&format!("comparison written to {}", out.join(report::HTML_FILE).display()));
    }
    Ok(())
}

fn list(ui: Ui, dir: &Path) -> Result<(), Failed> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| fail(ui, format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut invalid = 0;
    for path in &paths {
        match scenario::load(path) {
            Ok(loaded) => println!("{:<16} {}", loaded.name, loaded.scenario.description),
            Err(error) => {
                ui.error(&error.to_string());
                invalid += 1;
            }
        }
    }
    if invalid == 0 {
        Ok(())
    } else {
        Err(Failed(1))
    }
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
    let plan = kvm_plan(ui, mode).map_err(|Failed(code)| {
        Failed(if code == EXIT_INTERRUPTED { code } else { exec::EXIT_GUEST_UNAVAILABLE })
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
    engine::install_interrupt_handler();
    let spec = exec::ExecSpec {
        kernel: &bzimage,
        initramfs: &initramfs,
        vcpus: options.vcpus,
        memory_mib: options.memory_mib,
        kernel_args: None,
        argv,
        cwd: None,
        upload: None,
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
    engine::install_interrupt_handler();
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
        };
        let code = run_exec(ui, &spec, options.timings, started);
        verdicts.push((target.name.as_str(), code));
        if engine::interrupted() {
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

/// The bzImage and initramfs each `--kernel` value resolved to, handed from
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

    /// The bzImage and initramfs for `choice`: handed over, or resolved and built here.
    fn prepare(
        &mut self,
        ui: Ui,
        root: &Path,
        choice: &KernelChoice,
    ) -> Result<(PathBuf, PathBuf), Failed> {
        let key = format!("{choice:?}");
        if let Some((bzimage, initramfs)) = self.0.get(&key) {
            if bzimage.is_file() && initramfs.is_file() {
                return Ok((bzimage.clone(), initramfs.clone()));
            }
        }
        let kernel = guest_image::kernel_from_choice(root, choice).map_err(|e| {
            ui.error(&e.to_string());
            Failed(exec::EXIT_EXEC_FAILED)
        })?;
        let initramfs = prepare_initramfs(ui, root, &kernel)
            .map_err(|Failed(_)| Failed(exec::EXIT_EXEC_FAILED))?;
        self.0.insert(key, (kernel.bzimage.clone(), initramfs.clone()));
        Ok((kernel.bzimage, initramfs))
    }

    /// Puts them in the environment for a re-run inside L1.
    fn hand_over(&self) {
        if let Ok(text) = serde_json::to_string(self) {
            // Single-threaded here: nothing else reads the environment concurrently.
            std::env::set_var(PREPARED_ENV, text);
        }
    }
}
