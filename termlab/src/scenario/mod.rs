//! Loading and checking scenario files. Nothing is booted for a scenario
//! that does not pass [`load`]: every error names `file:line:col` and the
//! offending key.

pub(crate) mod elf;
mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;
use toml::Spanned;

pub use elf::{dynamic_needs, DynamicNeeds};
pub use model::*;

#[derive(Debug, Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: `{key}`: {message}", path.display())]
    Invalid { path: PathBuf, line: usize, column: usize, key: String, message: String },
}

/// A parsed and cross-checked scenario with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedScenario {
    /// The file stem, e.g. `loops` for `scenarios/loops.toml`.
    pub name: String,
    pub path: PathBuf,
    /// The absolute directory of the file: host paths in it are relative to this.
    pub dir: PathBuf,
    pub scenario: Scenario,
}

impl LoadedScenario {
    /// A host path written in the scenario (`object`, `source`, `files`...).
    pub fn host_path(&self, written: &str) -> PathBuf {
        self.dir.join(written)
    }
}

/// Reads, parses and validates one scenario file, including the host files
/// it names (programs, test data, `[vm] files`).
pub fn load(path: &Path) -> Result<LoadedScenario, ScenarioError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
    let scenario = parse(&text).map_err(|e| e.locate(path, &text))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::path::absolute(parent)
        .map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
    check_host_files(&scenario, &dir).map_err(|e| e.locate(path, &text))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(LoadedScenario { name, path: path.to_owned(), dir, scenario })
}

/// An error with a byte span, before it is turned into line and column.
#[derive(Debug)]
pub struct SpannedError {
    span: Range<usize>,
    key: String,
    message: String,
}

impl SpannedError {
    fn new(span: Range<usize>, key: impl Into<String>, message: impl Into<String>) -> Self {
        SpannedError { span, key: key.into(), message: message.into() }
    }

    fn locate(self, path: &Path, text: &str) -> ScenarioError {
        let (line, column) = line_column(text, self.span.start);
        ScenarioError::Invalid {
            path: path.to_owned(),
            line,
            column,
            key: self.key,
            message: self.message,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Parses and validates scenario text.
pub fn parse(text: &str) -> Result<Scenario, SpannedError> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| toml_error(&e, "(syntax)".to_owned()))?;
    let scenario: Scenario = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        // toml's `Spanned` wrapper shows up as a private path segment; drop it.
        let key = e.path().to_string().replace(".$__serde_spanned_private_value", "");
        toml_error(e.inner(), key)
    })?;
    validate(&scenario)?;
    Ok(scenario)
}

fn toml_error(error: &toml::de::Error, key: String) -> SpannedError {
    let key = if key == "." { "(top level)".to_owned() } else { key };
    SpannedError::new(error.span().unwrap_or(0..0), key, error.message().trim_end().to_owned())
}

fn invalid<T>(
    spanned: &Spanned<T>,
    key: impl Into<String>,
    message: impl Into<String>,
) -> SpannedError {
    SpannedError::new(spanned.span(), key, message)
}

/// What a step label names, for checking references to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LabelKind {
    ForegroundTrigger,
    BackgroundTrigger,
    Terminate,
    Budget,
    ProgInfo,
    Exec,
    Kmemleak,
}

const TRIGGERS: [LabelKind; 2] = [LabelKind::ForegroundTrigger, LabelKind::BackgroundTrigger];

/// Whether any step reads the kernel trace buffer.
pub fn uses_trace(scenario: &Scenario) -> bool {
    scenario.steps.iter().any(|step| matches!(step, Step::WaitTrace(_)))
}

/// Whether the scenario terminates anything (then the kernel's termination
/// events are traced and matched to its terminate steps).
pub fn terminates(scenario: &Scenario) -> bool {
    scenario.steps.iter().any(|step| matches!(step, Step::Terminate(_)))
}

/// The sysctl of the system-wide runtime budget (0: off).
pub const MAX_RUNTIME_SYSCTL: &str = "kernel.bpf_max_runtime_ms";

/// Whether the kernel may terminate runs in this scenario, on request or
/// for their runtime budget: then its termination events are traced and
/// matched to the steps.
pub fn traces_terminations(scenario: &Scenario) -> bool {
    let global_budget = scenario
        .sysctl
        .iter()
        .any(|(name, value)| name.to_string() == MAX_RUNTIME_SYSCTL && value.to_string() != "0");
    global_budget
        || scenario.steps.iter().any(|step| matches!(step, Step::Terminate(_) | Step::Budget(_)))
}

/// The sysctls the termination series adds (guest-kernel/patches): a kernel
/// without the series has no /proc/sys file for them.
pub const TERMINATION_SERIES_SYSCTLS: [&str; 5] = [
    MAX_RUNTIME_SYSCTL,
    "kernel.bpf_termination_demo_delay_ms",
    "kernel.bpf_termination_demo_delay_idle",
    "kernel.bpf_termination_fault_skip_rewrite",
    "kernel.bpf_termination_fault_entry_delay_ms",
];

/// What in the scenario needs the kernel's termination series
/// (BPF_PROG_TERMINATE, runtime budgets, their trace events, counters and
/// sysctls), said for an error message; `None` when nothing does. Needs are
/// inferred from what the scenario uses (steps and sysctls: a declaration
/// could disagree with them, they cannot); `[vm] requires` adds what they do
/// not show, a program or loader of the scenario's own that uses the series.
pub fn termination_series_use(scenario: &Scenario) -> Option<String> {
    let step = scenario.steps.iter().find_map(|step| match step {
        Step::Terminate(_) => Some("terminates programs (a `terminate` step)"),
        Step::Budget(_) => Some("sets a runtime budget (a `budget` step)"),
        Step::ProgInfo(_) => Some("reads termination counters (a `prog_info` step)"),
        _ => None,
    });
    if let Some(step) = step {
        return Some(step.to_owned());
    }
    scenario
        .sysctl
        .keys()
        .map(ToString::to_string)
        .find(|name| TERMINATION_SERIES_SYSCTLS.contains(&name.as_str()))
        .map(|name| format!("sets the sysctl {name}"))
        .or_else(|| {
            scenario
                .vm
                .requires
                .contains(&KernelFeature::Termination)
                .then(|| "declares `[vm] requires = [\"termination\"]`".to_owned())
        })
}

/// Labels of the terminate steps, in order.
pub fn terminate_labels(scenario: &Scenario) -> Vec<String> {
    scenario
        .steps
        .iter()
        .filter_map(|step| match step {
            Step::Terminate(terminate) => Some(terminate.label.get_ref().to_string()),
            _ => None,
        })
        .collect()
}

/// The terminate steps that ask for a host stall, with their index among the steps.
pub fn stalled_terminates(scenario: &Scenario) -> impl Iterator<Item = (usize, &TerminateStep)> {
    scenario.steps.iter().enumerate().filter_map(|(i, step)| match step {
        Step::Terminate(terminate) if terminate.host_stall_ms.is_some() => Some((i, terminate)),
        _ => None,
    })
}

/// Cross-reference checks that serde cannot express.
fn validate(scenario: &Scenario) -> Result<(), SpannedError> {
    if let Some(verify_stack) =
        scenario.verify_stack.as_ref().filter(|v| *v.get_ref() != VerifyStack::Off)
    {
        if !terminates(scenario) {
            return Err(invalid(verify_stack, "verify_stack", "verify_stack checks the stack rewrite of terminate steps, and this scenario has none"));
        }
    }
    if let Some((i, stall)) = stalled_terminates(scenario)
        .find_map(|(i, t)| t.host_stall_ms.as_ref().map(|ms| (i, ms)))
        .filter(|_| scenario.stack_proof() == VerifyStack::Alternate)
    {
        return Err(invalid(stall, format!("step[{i}].terminate.host_stall_ms"), "a host stall stops the VMM in every repetition, and `verify_stack = \"alternate\"` keeps every other one untouched: use `verify_stack = true` or `false`"));
    }
    if let Some(args) = &scenario.vm.kernel_args {
        check_kernel_args(args.get_ref())
            .map_err(|message| invalid(args, "vm.kernel_args", message))?;
    }
    validate_guest_files(&scenario.vm.files)?;

    let programs = validate_programs(scenario)?;
    let labels = validate_steps(scenario, &programs)?;
    let metrics = validate_metrics(scenario, &labels.kinds)?;
    for (i, expectation) in scenario.expectations.iter().enumerate() {
        validate_expectation(scenario, i, expectation, &labels, &metrics)?;
    }
    Ok(())
}

/// The names of the scenario's programs, each declared once.
fn validate_programs(scenario: &Scenario) -> Result<BTreeSet<Label>, SpannedError> {
    let mut programs = BTreeSet::new();
    for (i, program) in scenario.programs.iter().enumerate() {
        let key = |field: &str| format!("program[{i}].{field}");
        match &program.loaded_by {
            Some(parent) => validate_loaded_by(program, parent, &scenario.programs[..i], &key)?,
            None => validate_program(program, &key)?,
        }
        if !programs.insert(program.name.get_ref().clone()) {
            return Err(invalid(
                &program.name,
                format!("program[{i}].name"),
                format!("program `{}` is declared twice", program.name.get_ref()),
            ));
        }
    }
    Ok(programs)
}

/// What the steps declared, for the checks of metrics and expectations.
struct StepLabels {
    kinds: BTreeMap<Label, LabelKind>,
    /// The program each prog_info step reads.
    prog_info_programs: BTreeMap<Label, Label>,
}

/// Each step's program, label and references to earlier steps; every background trigger
/// waited for.
fn validate_steps(
    scenario: &Scenario,
    programs: &BTreeSet<Label>,
) -> Result<StepLabels, SpannedError> {
    if scenario.steps.is_empty() {
        return Err(SpannedError::new(0..0, "step", "a scenario needs at least one [[step]]"));
    }
    let mut checker = StepChecker {
        programs,
        loaded_by_parent: scenario
            .programs
            .iter()
            .filter_map(|p| p.loaded_by().map(|parent| (p.name.get_ref().clone(), parent.clone())))
            .collect(),
        vcpus: scenario.vm.vcpus.get(),
        labels: BTreeMap::new(),
        prog_info_programs: BTreeMap::new(),
        waited: BTreeSet::new(),
    };
    for (i, step) in scenario.steps.iter().enumerate() {
        checker.check(step, &|field: &str| format!("step[{i}].{field}"))?;
    }
    for (i, step) in scenario.steps.iter().enumerate() {
        if let Step::Trigger(trigger) = step {
            if trigger.background && !checker.waited.contains(trigger.label.get_ref()) {
                return Err(invalid(&trigger.label, format!("step[{i}].trigger.background"), format!("background trigger `{}` is never waited for: add a `wait = {{ step = \"{}\" }}` step", trigger.label.get_ref(), trigger.label.get_ref())));
            }
        }
    }
    Ok(StepLabels { kinds: checker.labels, prog_info_programs: checker.prog_info_programs })
}

/// What the steps checked so far declared; `key` names a field of the step being checked.
struct StepChecker<'a> {
    programs: &'a BTreeSet<Label>,
    /// Programs loaded by another's loader, each with that program: they run only through it.
    loaded_by_parent: BTreeMap<Label, Label>,
    vcpus: u32,
    labels: BTreeMap<Label, LabelKind>,
    prog_info_programs: BTreeMap<Label, Label>,
    /// Background triggers a `wait` step has waited for.
    waited: BTreeSet<Label>,
}

type StepKey<'k> = dyn Fn(&str) -> String + 'k;

impl StepChecker<'_> {
    fn check(&mut self, step: &Step, key: &StepKey<'_>) -> Result<(), SpannedError> {
        match step {
            Step::Trigger(trigger) => self.trigger(trigger, key),
            Step::Sleep(sleep) => match &sleep.after {
                Some(after) => {
                    expect_label(
                        &self.labels,
                        after,
                        &[LabelKind::BackgroundTrigger, LabelKind::Terminate],
                        key("sleep.after"),
                        "an earlier background trigger or terminate",
                    )?;
                    self.not_waited_yet(after, key("sleep.after"))
                }
                None => Ok(()),
            },
            Step::WaitTrace(trace) => {
                self.earlier_background_trigger(&trace.step, key("wait_trace.step"))?;
                self.not_waited_yet(&trace.step, key("wait_trace.step"))?;
                if trace.line.is_empty() || trace.line.contains('\n') || trace.count == 0 {
                    return Err(invalid(
                        &trace.step,
                        key("wait_trace.line"),
                        "`line` must be a non-empty single line and `count` at least 1",
                    ));
                }
                Ok(())
            }
            Step::Wait(wait) => {
                self.earlier_background_trigger(&wait.step, key("wait.step"))?;
                if !self.waited.insert(wait.step.get_ref().clone()) {
                    return Err(invalid(
                        &wait.step,
                        key("wait.step"),
                        format!("`{}` is waited for twice", wait.step.get_ref()),
                    ));
                }
                Ok(())
            }
            Step::Terminate(terminate) => {
                validate_terminate(terminate, self.programs, key)?;
                self.declare(&terminate.label, LabelKind::Terminate, key("terminate.label"))
            }
            Step::Budget(budget) => {
                check_target(
                    &budget.label,
                    budget.program.as_ref(),
                    budget.prog_id.as_ref(),
                    self.programs,
                    "budget",
                    key,
                )?;
                self.declare(&budget.label, LabelKind::Budget, key("budget.label"))
            }
            Step::ProgInfo(info) => {
                check_program(self.programs, &info.program, key("prog_info.program"))?;
                self.prog_info_programs
                    .insert(info.label.get_ref().clone(), info.program.get_ref().clone());
                self.declare(&info.label, LabelKind::ProgInfo, key("prog_info.label"))
            }
            Step::Exec(exec) => self.declare(&exec.label, LabelKind::Exec, key("exec.label")),
            Step::Kmemleak(scan) => {
                self.declare(&scan.label, LabelKind::Kmemleak, key("kmemleak.label"))
            }
        }
    }

    fn trigger(&mut self, trigger: &TriggerStep, key: &StepKey<'_>) -> Result<(), SpannedError> {
        check_program(self.programs, &trigger.program, key("trigger.program"))?;
        if let Some(parent) = self.loaded_by_parent.get(trigger.program.get_ref()) {
            return Err(invalid(
                &trigger.program,
                key("trigger.program"),
                format!(
                    "`{}` runs only through `{parent}`, whose loader loads it (`loaded_by`): trigger `{parent}`",
                    trigger.program.get_ref()
                ),
            ));
        }
        if let Some(cpu) = trigger.cpu.as_ref().filter(|cpu| *cpu.get_ref() >= self.vcpus) {
            return Err(invalid(
                cpu,
                key("trigger.cpu"),
                format!(
                    "cpu {} does not exist: the VM has {} vCPUs (0..{})",
                    cpu.get_ref(),
                    self.vcpus,
                    self.vcpus - 1
                ),
            ));
        }
        let kind = if trigger.background {
            LabelKind::BackgroundTrigger
        } else {
            LabelKind::ForegroundTrigger
        };
        self.declare(&trigger.label, kind, key("trigger.label"))
    }

    fn declare(
        &mut self,
        label: &Spanned<Label>,
        kind: LabelKind,
        key: String,
    ) -> Result<(), SpannedError> {
        declare_label(&mut self.labels, label, kind, key)
    }

    fn earlier_background_trigger(
        &self,
        label: &Spanned<Label>,
        key: String,
    ) -> Result<(), SpannedError> {
        expect_label(
            &self.labels,
            label,
            &[LabelKind::BackgroundTrigger],
            key,
            "an earlier background trigger",
        )
    }

    fn not_waited_yet(&self, label: &Spanned<Label>, key: String) -> Result<(), SpannedError> {
        if self.waited.contains(label.get_ref()) {
            return Err(invalid(
                label,
                key,
                format!("`{}` has already been waited for", label.get_ref()),
            ));
        }
        Ok(())
    }
}

/// Each metric's end points name steps that have them; names declared once.
fn validate_metrics(
    scenario: &Scenario,
    labels: &BTreeMap<Label, LabelKind>,
) -> Result<BTreeSet<Label>, SpannedError> {
    let mut metrics = BTreeSet::new();
    for (i, metric) in scenario.metrics.iter().enumerate() {
        let key = |field: &str| format!("metric[{i}].{field}");
        for (event, field) in [(&metric.from, "from"), (&metric.to, "to")] {
            let point = event.get_ref().point;
            match labels.get(&event.get_ref().step) {
                None => {
                    return Err(invalid(
                        event,
                        key(field),
                        format!("no step is labelled `{}`", event.get_ref().step),
                    ))
                }
                Some(kind) if point.is_request() && *kind != LabelKind::Terminate => {
                    return Err(invalid(
                        event,
                        key(field),
                        format!(
                            "`{}`: only terminate steps have the request's trace points",
                            event.get_ref()
                        ),
                    ))
                }
                Some(kind)
                    if point.is_kernel_trace()
                        && *kind != LabelKind::Terminate
                        && !TRIGGERS.contains(kind) =>
                {
                    return Err(invalid(
                        event,
                        key(field),
                        format!(
                            "`{}`: only terminate and trigger steps have kernel trace points",
                            event.get_ref()
                        ),
                    ))
                }
                Some(LabelKind::Budget | LabelKind::ProgInfo) => {
                    return Err(invalid(
                        event,
                        key(field),
                        format!(
                            "`{}`: budget and prog_info steps have no time points",
                            event.get_ref()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        if !metrics.insert(metric.name.get_ref().clone()) {
            return Err(invalid(
                &metric.name,
                key("name"),
                format!("metric `{}` is declared twice", metric.name.get_ref()),
            ));
        }
    }
    Ok(metrics)
}

/// One expectation's references (steps of the right kind, declared metrics) and values.
fn validate_expectation(
    scenario: &Scenario,
    i: usize,
    expectation: &Expectation,
    step_labels: &StepLabels,
    metrics: &BTreeSet<Label>,
) -> Result<(), SpannedError> {
    let vcpus = scenario.vm.vcpus.get();
    let labels = &step_labels.kinds;
    let key = |field: &str| format!("expect[{i}].{field}");
    match &expectation.check {
        Check::Metric(bound) => validate_metric_bound(bound, metrics, &key)?,
        Check::TerminateResult(result) => validate_terminate_result(result, labels, vcpus, &key)?,
        Check::TriggerOk(ok) => {
            expect_label(
                labels,
                &ok.step,
                &[LabelKind::ForegroundTrigger, LabelKind::BackgroundTrigger],
                key("trigger_ok.step"),
                "a trigger step",
            )?;
        }
        Check::TriggerField(field) => {
            expect_label(
                labels,
                &field.step,
                &[LabelKind::ForegroundTrigger, LabelKind::BackgroundTrigger],
                key("trigger_field.step"),
                "a trigger step",
            )?;
        }
        Check::DmesgClean(_) => {}
        Check::KernelCase(want) => validate_kernel_case(want, labels, &key)?,
        Check::BudgetResult(result) => {
            expect_label(
                labels,
                &result.step,
                &[LabelKind::Budget],
                key("budget_result.step"),
                "a budget step",
            )?;
        }
        Check::Terminations(delta) => validate_terminations(delta, step_labels, &key)?,
        Check::KmemleakClean(clean) => {
            expect_label(
                labels,
                &clean.step,
                &[LabelKind::Kmemleak],
                key("kmemleak_clean.step"),
                "a kmemleak step",
            )?;
        }
    }
    Ok(())
}

/// Bounds that name a declared metric and can both hold.
fn validate_metric_bound(
    bound: &MetricBound,
    metrics: &BTreeSet<Label>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    if !metrics.contains(bound.metric.get_ref()) {
        return Err(invalid(
            &bound.metric,
            key("metric.metric"),
            format!("no [[metric]] is named `{}`", bound.metric.get_ref()),
        ));
    }
    match (bound.at_least_ms, bound.at_most_ms) {
        (None, None) => {
            return Err(invalid(
                &bound.metric,
                key("metric"),
                "give `at_least_ms`, `at_most_ms` or both",
            ))
        }
        (Some(low), Some(high)) if low > high => {
            return Err(invalid(
                &bound.metric,
                key("metric"),
                format!("at_least_ms {low} is above at_most_ms {high}"),
            ))
        }
        _ => {}
    }
    Ok(())
}

/// A terminate step, and exactly one of an errno and a CPU count the VM can have.
fn validate_terminate_result(
    result: &TerminateResultCheck,
    labels: &BTreeMap<Label, LabelKind>,
    vcpus: u32,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    expect_label(
        labels,
        &result.step,
        &[LabelKind::Terminate],
        key("terminate_result.step"),
        "a terminate step",
    )?;
    match (result.errno, result.cpus) {
        (Some(_), None) => {}
        (None, Some(cpus)) if (1..=vcpus).contains(&cpus) => {}
        (None, Some(cpus)) => {
            return Err(invalid(
                &result.step,
                key("terminate_result.cpus"),
                format!("cpus must be between 1 and the VM's {vcpus} vCPUs, not {cpus}"),
            ))
        }
        _ => {
            return Err(invalid(
                &result.step,
                key("terminate_result"),
                "give exactly one of `errno` and `cpus`",
            ))
        }
    }
    Ok(())
}

/// A terminate or trigger step, and a case the kernel traces (1 or 2).
fn validate_kernel_case(
    want: &KernelCaseCheck,
    labels: &BTreeMap<Label, LabelKind>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let kinds = [LabelKind::Terminate, LabelKind::ForegroundTrigger, LabelKind::BackgroundTrigger];
    expect_label(
        labels,
        &want.step,
        &kinds,
        key("kernel_case.step"),
        "a terminate or trigger step",
    )?;
    if let Some(case) = want.case.as_ref().filter(|case| !(1..=2).contains(case.get_ref())) {
        return Err(invalid(
            case,
            key("kernel_case.case"),
            format!("case is 1 (in a helper) or 2 (in BPF text), not {}", case.get_ref()),
        ));
    }
    Ok(())
}

/// Two prog_info steps of one program, and at least one counter to compare.
fn validate_terminations(
    delta: &TerminationsCheck,
    step_labels: &StepLabels,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let labels = &step_labels.kinds;
    let prog_info_programs = &step_labels.prog_info_programs;
    expect_label(
        labels,
        &delta.from,
        &[LabelKind::ProgInfo],
        key("terminations.from"),
        "a prog_info step",
    )?;
    expect_label(
        labels,
        &delta.to,
        &[LabelKind::ProgInfo],
        key("terminations.to"),
        "a prog_info step",
    )?;
    if prog_info_programs.get(delta.from.get_ref()) != prog_info_programs.get(delta.to.get_ref()) {
        return Err(invalid(
            &delta.to,
            key("terminations.to"),
            format!(
                "`{}` and `{}` read different programs",
                delta.from.get_ref(),
                delta.to.get_ref()
            ),
        ));
    }
    if delta.on_demand.is_none() && delta.budget.is_none() {
        return Err(invalid(
            &delta.from,
            key("terminations"),
            "give `on_demand`, `budget` or both",
        ));
    }
    Ok(())
}

/// Where the generic loader finds a user's program object in the guest.
pub fn guest_object_path(program: &Label) -> String {
    format!("{GUEST_PROGRAM_DIR}/{program}.bpf.o")
}

/// Where a program's loader built from its `loader_source` is in the guest.
pub fn guest_loader_path(program: &Label) -> String {
    format!("{GUEST_PROGRAM_DIR}/{program}.loader")
}

/// Where a `test_run.data_file` is copied in the guest.
pub fn guest_test_data_path(program: &Label) -> String {
    format!("{GUEST_PROGRAM_DIR}/{program}.data")
}

/// The guest directory of users' program objects and test data.
pub const GUEST_PROGRAM_DIR: &str = "/lib/termlab/programs";

/// The guest loader of users' objects (guest-samples/bpf/bpf_loader.c).
pub const GUEST_LOADER: &str = "/bin/bpf_loader";

/// Largest `test_run` packet (the loader's MAX_DATA_BYTES).
pub const MAX_TEST_DATA_BYTES: usize = 64 * 1024;

/// `cgroup`: a directory under /sys/fs/cgroup/, for a program that is attached.
fn validate_cgroup(
    program: &ProgramSpec,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let Some(cgroup) = &program.cgroup else { return Ok(()) };
    let dir = cgroup.get_ref();
    let below_root = dir.strip_prefix("/sys/fs/cgroup/").is_some_and(|rest| {
        !rest.is_empty() && rest.split('/').all(|part| !part.is_empty() && part != "..")
    });
    if !below_root {
        return Err(invalid(
            cgroup,
            key("cgroup"),
            format!(
                "`{dir}` is not a directory below /sys/fs/cgroup/ (the guest's cgroup v2 root)"
            ),
        ));
    }
    if !program.attaches() {
        return Err(invalid(
            cgroup,
            key("cgroup"),
            "`cgroup` attaches the program: not with `attach = false`",
        ));
    }
    Ok(())
}

/// Longest `xdp`/`tc` interface name: its veth peer's name, `<name>_peer`, must fit the
/// kernel's 15 bytes.
const MAX_INTERFACE_LEN: usize = 10;

/// `xdp` or `tc`: a network interface name (a veth pair made if missing), for a program that
/// is attached, there only.
fn validate_interface(
    program: &ProgramSpec,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let given = [(&program.xdp, "xdp"), (&program.tc, "tc")];
    let Some((interface, field)) =
        given.iter().find_map(|(value, field)| Some(((*value).as_ref()?, *field)))
    else {
        return Ok(());
    };
    let name = interface.get_ref();
    let valid = (1..=MAX_INTERFACE_LEN).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if !valid {
        return Err(invalid(
            interface,
            key(field),
            format!(
                "`{name}` is not an interface name of 1 to {MAX_INTERFACE_LEN} letters, digits, `_` or `-` (its veth peer is `{name}_peer`)"
            ),
        ));
    }
    let elsewhere = !program.attaches()
        || program.cgroup.is_some()
        || (program.xdp.is_some() && program.tc.is_some());
    if elsewhere {
        return Err(invalid(
            interface,
            key(field),
            format!("`{field}` attaches the program to an interface: not with `attach = false`, `cgroup` or another interface key"),
        ));
    }
    Ok(())
}

/// `summary_line`: one word, naming a line of the program's `trigger` command.
fn validate_summary_line(
    program: &ProgramSpec,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let Some(line) = &program.summary_line else { return Ok(()) };
    let word = line.get_ref();
    if word.is_empty() || !word.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
        return Err(invalid(
            line,
            key("summary_line"),
            format!("`{word}` is not one word: the first word of the line that holds the trigger's key=value fields"),
        ));
    }
    if program.trigger.is_none() {
        return Err(invalid(
            line,
            key("summary_line"),
            "`summary_line` names a line that the program's `trigger` command prints; this program has no `trigger`",
        ));
    }
    Ok(())
}

/// A `[[program]]` is one of two forms, with the keys of that form only.
fn validate_program(
    program: &ProgramSpec,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let name = &program.name;
    let forms = [program.object.is_some(), program.source.is_some(), program.loader.is_some()];
    if forms.iter().filter(|&&given| given).count() != 1 {
        return Err(invalid(
            name,
            key("name"),
            format!(
                "program `{}` needs exactly one of `object` (a compiled BPF object), `source` (BPF C, compiled here with clang) or `loader` (a guest command that loads it and prints prog_id=N)",
                name.get_ref()
            ),
        ));
    }
    for (path, field) in [
        (&program.object, "object"),
        (&program.source, "source"),
        (&program.loader_source, "loader_source"),
    ] {
        if let Some(path) = path.as_ref().filter(|p| p.get_ref().is_empty()) {
            return Err(invalid(path, key(field), "an empty path"));
        }
    }
    if let Some(clang) = &program.clang {
        validate_clang(clang, program.source.is_some(), key)?;
    }
    if let (Some(loader_source), None) = (&program.loader_source, &program.source) {
        return Err(invalid(
            loader_source,
            key("loader_source"),
            "`loader_source` goes with `source`: the loader is built around the skeleton of the object compiled from it",
        ));
    }
    validate_summary_line(program, key)?;
    validate_cgroup(program, key)?;
    validate_interface(program, key)?;
    let own_loader = match (&program.loader, &program.loader_source) {
        (Some(loader), _) => Some((loader.span(), "loader")),
        (None, Some(loader_source)) => Some((loader_source.span(), "loader_source")),
        (None, None) => None,
    };
    if let Some((span, field)) = own_loader {
        refuse_given(
            &[
                (program.function.as_ref().map(Spanned::span), "function"),
                (program.attach.as_ref().map(Spanned::span), "attach"),
                (program.cgroup.as_ref().map(Spanned::span), "cgroup"),
                (program.xdp.as_ref().map(Spanned::span), "xdp"),
                (program.tc.as_ref().map(Spanned::span), "tc"),
                (program.test_run.as_ref().map(Spanned::span), "test_run"),
            ],
            key,
            |refused| {
                format!("`{refused}` is for programs the generic loader loads; a `{field}` loads and runs its program itself")
            },
        )?;
        if program.bpf_name.is_none() || program.trigger.is_none() {
            return Err(SpannedError::new(
                span,
                key(field),
                format!("a program with a `{field}` also needs `bpf_name` (its kernel name) and `trigger` (the guest command that runs it)"),
            ));
        }
        return Ok(());
    }
    if let Some(bpf_name) = &program.bpf_name {
        return Err(invalid(
            bpf_name,
            key("bpf_name"),
            "`bpf_name` goes with `loader` or `loader_source`; for a program the generic loader loads, name its C function with `function`",
        ));
    }
    if let Some(function) = &program.function {
        validate_function(function, key)?;
    }
    match (&program.trigger, &program.test_run) {
        (Some(_), None) => Ok(()),
        (None, Some(test_run)) => validate_test_run(test_run, key),
        (Some(trigger), Some(_)) => Err(invalid(
            trigger,
            key("trigger"),
            "give `trigger` (a guest command) or `test_run` (BPF_PROG_TEST_RUN), not both",
        )),
        (None, None) => Err(invalid(
            name,
            key("trigger"),
            format!(
                "program `{}` needs `trigger` (a guest command that makes it run, e.g. [\"sync\"] for a sys_enter_sync tracepoint) or `test_run = {{ data_hex = \"...\" }}`",
                name.get_ref()
            ),
        )),
    }
}

/// Refuses the first of `fields` (each a key's span, if given, and its name) that is given.
fn refuse_given(
    fields: &[(Option<Range<usize>>, &str)],
    key: &dyn Fn(&str) -> String,
    why: impl Fn(&str) -> String,
) -> Result<(), SpannedError> {
    match fields.iter().find_map(|(span, field)| Some((span.clone()?, *field))) {
        Some((span, field)) => Err(SpannedError::new(span, key(field), why(field))),
        None => Ok(()),
    }
}

fn validate_function(
    function: &Spanned<String>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let text = function.get_ref();
    let identifier = text.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && text.len() <= 128;
    if identifier {
        Ok(())
    } else {
        Err(invalid(function, key("function"), format!("`{text}` is not a C function name")))
    }
}

/// `clang`: only with `source`, and only a clang by its usual name (`clang` or `clang-N`),
/// looked up on the host's PATH: a scenario names a compiler, not a command to run.
fn validate_clang(
    clang: &Spanned<String>,
    has_source: bool,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    if !has_source {
        return Err(invalid(clang, key("clang"), "`clang` goes with `source`: it compiles it"));
    }
    let text = clang.get_ref();
    let version = text.strip_prefix("clang-");
    if text == DEFAULT_CLANG
        || version
            .is_some_and(|v| !v.is_empty() && v.len() <= 3 && v.bytes().all(|b| b.is_ascii_digit()))
    {
        Ok(())
    } else {
        Err(invalid(
            clang,
            key("clang"),
            format!("`{text}` is not `clang` or `clang-N` (e.g. `clang-19`)"),
        ))
    }
}

/// A program another one's loader loads from its object (`loaded_by`): only its `function`,
/// and a parent declared before it that the generic loader loads itself (`--also`) or that
/// has a loader of its own around its skeleton, which prints `also.FUNCTION=ID`.
fn validate_loaded_by(
    program: &ProgramSpec,
    parent: &Spanned<Label>,
    earlier: &[ProgramSpec],
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    refuse_given(
        &[
            (program.object.as_ref().map(Spanned::span), "object"),
            (program.source.as_ref().map(Spanned::span), "source"),
            (program.loader.as_ref().map(Spanned::span), "loader"),
            (program.loader_source.as_ref().map(Spanned::span), "loader_source"),
            (program.attach.as_ref().map(Spanned::span), "attach"),
            (program.cgroup.as_ref().map(Spanned::span), "cgroup"),
            (program.xdp.as_ref().map(Spanned::span), "xdp"),
            (program.tc.as_ref().map(Spanned::span), "tc"),
            (program.bpf_name.as_ref().map(Spanned::span), "bpf_name"),
            (program.trigger.as_ref().map(Spanned::span), "trigger"),
            (program.test_run.as_ref().map(Spanned::span), "test_run"),
            (program.summary_line.as_ref().map(Spanned::span), "summary_line"),
        ],
        key,
        |field| {
            format!(
                "`{field}` does not go with `loaded_by`: `{}`'s loader loads this program from its own object, and it runs only through that program (a tail call, or the struct_ops map the loader attaches)",
                parent.get_ref()
            )
        },
    )?;
    let Some(function) = &program.function else {
        return Err(invalid(
            parent,
            key("loaded_by"),
            "a program with `loaded_by` needs `function`: its C function name in that program's object",
        ));
    };
    validate_function(function, key)?;
    match earlier.iter().find(|p| p.name.get_ref() == parent.get_ref()) {
        Some(p) if (p.is_user_object() || p.loader_source.is_some()) && p.loaded_by.is_none() => {
            Ok(())
        }
        Some(_) => Err(invalid(
            parent,
            key("loaded_by"),
            format!(
                "`{}` is loaded neither from an `object` or `source` by the generic loader nor by a `loader_source` of its own, so it cannot load another program",
                parent.get_ref()
            ),
        )),
        None => Err(invalid(
            parent,
            key("loaded_by"),
            format!("no [[program]] before this one is named `{}`", parent.get_ref()),
        )),
    }
}

fn validate_test_run(
    test_run: &Spanned<TestRunSpec>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    let spec = test_run.get_ref();
    if let (Some(_), Some(file)) = (&spec.data_hex, &spec.data_file) {
        return Err(invalid(
            file,
            key("test_run.data_file"),
            "give `data_hex` or `data_file`, not both",
        ));
    }
    if let Some(hex) = &spec.data_hex {
        let text = hex.get_ref();
        if text.is_empty() || text.len() % 2 != 0 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid(
                hex,
                key("test_run.data_hex"),
                "not an even, non-zero number of hex digits (e.g. \"00ff10\")",
            ));
        }
        if text.len() / 2 > MAX_TEST_DATA_BYTES {
            return Err(invalid(
                hex,
                key("test_run.data_hex"),
                format!("more than {MAX_TEST_DATA_BYTES} bytes: use `data_file`"),
            ));
        }
    }
    if let Some(file) = spec.data_file.as_ref().filter(|f| f.get_ref().is_empty()) {
        return Err(invalid(file, key("test_run.data_file"), "an empty path"));
    }
    Ok(())
}

/// Guest paths the harness's own image holds or mounts over.
const RESERVED_GUEST_PATHS: [&str; 13] = [
    "/init",
    "/run-me",
    "/bin/busybox",
    "/bin/termlab-agent",
    "/bin/ipi_rtt",
    "/bin/bpftool",
    "/bin/bpf_loader",
    "/bin/loops",
    "/bin/trigger_loops",
    "/bin/prog_terminate",
    "/bin/prog_term_map",
    "/bin/term_bench",
    "/bin/term_stress",
];
/// Filesystems /init mounts over (a file put there would be hidden), and the programs' directory.
const RESERVED_GUEST_DIRS: [&str; 5] = ["/proc", "/sys", "/dev", "/tmp", GUEST_PROGRAM_DIR];

/// `[vm] files`: absolute, plain guest paths, each once, none of the harness's.
fn validate_guest_files(files: &[GuestFileSpec]) -> Result<(), SpannedError> {
    let mut seen = BTreeSet::new();
    for (i, file) in files.iter().enumerate() {
        let key = |field: &str| format!("vm.files[{i}].{field}");
        if file.host.get_ref().is_empty() {
            return Err(invalid(&file.host, key("host"), "an empty path"));
        }
        let guest = file.guest.get_ref();
        let plain = guest.starts_with('/')
            && guest.len() > 1
            && guest[1..].split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || "._+-@".contains(c))
            });
        if !plain {
            return Err(invalid(
                &file.guest,
                key("guest"),
                format!("`{guest}` is not an absolute guest file path of A-Z a-z 0-9 . _ + - @ (no `..`, `//` or trailing `/`)"),
            ));
        }
        let under = |dir: &str| guest.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'));
        if RESERVED_GUEST_PATHS.contains(&guest.as_str()) {
            return Err(invalid(
                &file.guest,
                key("guest"),
                format!("`{guest}` is the harness's own file in the guest image"),
            ));
        }
        if let Some(dir) = RESERVED_GUEST_DIRS.iter().find(|dir| under(dir)) {
            return Err(invalid(
                &file.guest,
                key("guest"),
                format!("`{guest}` is under {dir}, which the guest's init mounts over or the harness fills"),
            ));
        }
        if !seen.insert(guest.clone()) {
            return Err(invalid(&file.guest, key("guest"), format!("`{guest}` is listed twice")));
        }
    }
    Ok(())
}

/// Longest `[vm] kernel_args` (the kernel's x86 limit is 2048 bytes for the whole line).
pub const MAX_KERNEL_ARGS_BYTES: usize = 1024;
/// Parameters the harness sets and needs: its console (the log, panics),
/// its init (the agent), and panic=-1/reboot=k (a panic ends the VM at once).
const HARNESS_KERNEL_PARAMS: [&str; 5] = ["console", "init", "rdinit", "panic", "reboot"];

/// `[vm] kernel_args`: printable ASCII words appended to the guest's command
/// line. Refused: control characters (newlines, tabs, NUL) and non-ASCII,
/// more than 1024 bytes, double quotes (the kernel's quoting would change how
/// the rest of the line parses), a `--` word (the rest would go to init
/// instead of the kernel), and the parameters the harness sets itself.
pub fn check_kernel_args(args: &str) -> Result<(), String> {
    if let Some(bad) = args.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(format!(
            "{bad:?}: only printable ASCII is allowed (no newlines, tabs or control characters)"
        ));
    }
    if args.len() > MAX_KERNEL_ARGS_BYTES {
        return Err(format!("{} bytes: at most {MAX_KERNEL_ARGS_BYTES}", args.len()));
    }
    if args.contains('"') {
        return Err(
            "double quotes are not allowed: they change how the whole command line parses".into()
        );
    }
    for word in args.split(' ').filter(|w| !w.is_empty()) {
        if word == "--" {
            return Err(
                "`--` would hand the rest of the command line to init, not the kernel".into()
            );
        }
        let param = word.split_once('=').map_or(word, |(name, _)| name);
        if HARNESS_KERNEL_PARAMS.contains(&param) {
            return Err(format!(
                "`{word}`: the harness sets {} itself (its console, its init and panic handling)",
                HARNESS_KERNEL_PARAMS.join(", ")
            ));
        }
    }
    Ok(())
}

/// Guest library directories the dynamic loader searches by default.
const GUEST_LIBRARY_DIRS: [&str; 6] = [
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
];

/// The host files a scenario names exist and fit: programs' objects and
/// sources, test data, and `[vm] files`, of which a dynamically linked ELF
/// file is refused unless its loader and libraries are listed too.
fn check_host_files(scenario: &Scenario, dir: &Path) -> Result<(), SpannedError> {
    let host_file = |written: &Spanned<String>, key: String| {
        let path = dir.join(written.get_ref());
        std::fs::read(&path).map_err(|error| {
            invalid(
                written,
                key,
                format!(
                    "cannot read {}: {error} (paths are relative to the scenario's directory)",
                    path.display()
                ),
            )
        })
    };
    for (i, program) in scenario.programs.iter().enumerate() {
        let key = |field: &str| format!("program[{i}].{field}");
        if let Some(object) = &program.object {
            let bytes = host_file(object, key("object"))?;
            let is_bpf = bytes.starts_with(b"\x7fELF") && bytes.get(18..20) == Some(&[247, 0]);
            if !is_bpf {
                return Err(invalid(
                    object,
                    key("object"),
                    "not a BPF object (an ELF file for machine BPF, as `clang -target bpf -c` writes)",
                ));
            }
        }
        for (path, field) in
            [(&program.source, "source"), (&program.loader_source, "loader_source")]
        {
            if let Some(path) = path {
                host_file(path, key(field))?;
            }
        }
        if let Some(file) = program.test_run.as_ref().and_then(|t| t.get_ref().data_file.as_ref()) {
            let bytes = host_file(file, key("test_run.data_file"))?;
            if bytes.len() > MAX_TEST_DATA_BYTES {
                return Err(invalid(
                    file,
                    key("test_run.data_file"),
                    format!("{} bytes: at most {MAX_TEST_DATA_BYTES}", bytes.len()),
                ));
            }
        }
    }
    let files = &scenario.vm.files;
    let guest_paths: BTreeSet<&str> = files.iter().map(|f| f.guest.get_ref().as_str()).collect();
    let libraries: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.guest.get_ref().rsplit_once('/'))
        .filter(|(lib_dir, _)| GUEST_LIBRARY_DIRS.contains(lib_dir))
        .map(|(_, name)| name)
        .collect();
    for (i, file) in files.iter().enumerate() {
        let key = format!("vm.files[{i}].host");
        let path = dir.join(file.host.get_ref());
        if !path.is_file() {
            return Err(invalid(
                &file.host,
                key,
                format!(
                    "{} is not a file (paths are relative to the scenario's directory)",
                    path.display()
                ),
            ));
        }
        let bytes = host_file(&file.host, key.clone())?;
        let needs = dynamic_needs(&bytes).map_err(|message| {
            invalid(&file.host, key.clone(), format!("{}: {message}", path.display()))
        })?;
        let Some(needs) = needs else { continue };
        let missing_loader = needs.interpreter.as_deref().filter(|i| !guest_paths.contains(i));
        let missing_libs: Vec<&str> = needs
            .needed
            .iter()
            .map(String::as_str)
            .filter(|lib| !libraries.contains(lib))
            .collect();
        if missing_loader.is_some() || !missing_libs.is_empty() {
            let mut missing: Vec<String> =
                missing_loader.map(|l| format!("its loader {l}")).into_iter().collect();
            if !missing_libs.is_empty() {
                missing.push(format!(
                    "{} in {}",
                    missing_libs.join(", "),
                    GUEST_LIBRARY_DIRS.join(" or ")
                ));
            }
            return Err(invalid(
                &file.host,
                key,
                format!(
                    "{} is dynamically linked and the guest has no shared libraries: link it statically (e.g. gcc -static), or list {} in `files` too",
                    path.display(),
                    missing.join(" and ")
                ),
            ));
        }
    }
    Ok(())
}

/// The longest host stall a terminate step may ask for: beyond the guest's RCU and
/// soft-lockup watchdogs' patience it would test them, not the call.
const MAX_HOST_STALL_MS: u32 = 5_000;

fn validate_terminate(
    terminate: &TerminateStep,
    programs: &BTreeSet<Label>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    check_target(
        &terminate.label,
        terminate.program.as_ref(),
        terminate.prog_id.as_ref(),
        programs,
        "terminate",
        key,
    )?;
    if terminate.prog_id.is_some() && terminate.by == TerminateBy::Name {
        return Err(invalid(
            &terminate.label,
            key("terminate.by"),
            "`by = \"name\"` needs `program`, not `prog_id`",
        ));
    }
    if terminate.by == TerminateBy::Name && terminate.via != TerminateVia::Bpftool {
        return Err(invalid(
            &terminate.label,
            key("terminate.by"),
            "`by = \"name\"` needs `via = \"bpftool\"`: the bpf() call itself only takes an id",
        ));
    }
    if let Some(stall) = terminate
        .host_stall_ms
        .as_ref()
        .filter(|ms| !(1..=MAX_HOST_STALL_MS).contains(ms.get_ref()))
    {
        return Err(invalid(
            stall,
            key("terminate.host_stall_ms"),
            format!("a host stall lasts 1 to {MAX_HOST_STALL_MS} ms"),
        ));
    }
    if let Some(raw) = &terminate.raw_flags {
        if !terminate.flags.is_empty() {
            return Err(invalid(
                raw,
                key("terminate.raw_flags"),
                "give `flags` or `raw_flags`, not both",
            ));
        }
        if terminate.via == TerminateVia::Bpftool {
            return Err(invalid(
                raw,
                key("terminate.raw_flags"),
                "bpftool cannot pass raw flags: use `via = \"agent\"`",
            ));
        }
    }
    Ok(())
}

/// A step that acts on a program names exactly one of a declared `program`
/// and a raw `prog_id`.
fn check_target(
    label: &Spanned<Label>,
    program: Option<&Spanned<Label>>,
    prog_id: Option<&Spanned<u32>>,
    programs: &BTreeSet<Label>,
    step: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SpannedError> {
    match (program, prog_id) {
        (Some(program), None) => check_program(programs, program, key(&format!("{step}.program"))),
        (None, Some(_)) => Ok(()),
        _ => Err(invalid(label, key(step), "give exactly one of `program` and `prog_id`")),
    }
}

fn check_program(
    programs: &BTreeSet<Label>,
    program: &Spanned<Label>,
    key: String,
) -> Result<(), SpannedError> {
    if programs.contains(program.get_ref()) {
        Ok(())
    } else {
        Err(invalid(program, key, format!("no [[program]] is named `{}`", program.get_ref())))
    }
}

fn declare_label(
    labels: &mut BTreeMap<Label, LabelKind>,
    label: &Spanned<Label>,
    kind: LabelKind,
    key: String,
) -> Result<(), SpannedError> {
    if labels.insert(label.get_ref().clone(), kind).is_some() {
        return Err(invalid(
            label,
            key,
            format!("label `{}` is used by an earlier step", label.get_ref()),
        ));
    }
    Ok(())
}

fn expect_label(
    labels: &BTreeMap<Label, LabelKind>,
    label: &Spanned<Label>,
    kinds: &[LabelKind],
    key: String,
    what: &str,
) -> Result<(), SpannedError> {
    match labels.get(label.get_ref()) {
        Some(kind) if kinds.contains(kind) => Ok(()),
        Some(_) => Err(invalid(label, key, format!("`{}` is not {what}", label.get_ref()))),
        None => Err(invalid(
            label,
            key,
            format!("no earlier step is labelled `{}` (it must be {what})", label.get_ref()),
        )),
    }
}
