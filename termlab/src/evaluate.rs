//! From raw step records to metrics, and from metrics and records to the
//! verdict of each expectation. Pure functions of what was recorded.

use std::collections::BTreeMap;

use crate::results::kernel::KernelTermination;
use crate::results::{ExpectationOutcome, Repetition, StepRecord};
use crate::scenario::{
    BudgetResultCheck, Check, EventPoint, EventRef, Expectation, KernelCaseCheck,
    KmemleakCleanCheck, MetricBound, MetricSpec, TerminateResultCheck, TerminationsCheck,
    TriggerFieldCheck, TriggerOkCheck,
};

/// The guest-clock timestamp of `event` in one repetition's records.
fn event_ns(steps: &[StepRecord], event: &EventRef) -> Option<u64> {
    let (start_ns, end_ns, kernel) = steps.iter().find_map(|step| match step {
        StepRecord::Trigger { label, start_ns, end_ns, kernel, .. }
        | StepRecord::Terminate { label, start_ns, end_ns, kernel, .. }
            if label.as_str() == event.step.as_str() =>
        {
            Some((*start_ns, *end_ns, kernel.as_ref()))
        }
        StepRecord::Exec { label, start_ns, end_ns, .. }
            if label.as_str() == event.step.as_str() =>
        {
            Some((Some(*start_ns), Some(*end_ns), None))
        }
        _ => None,
    })?;
    match event.point {
        EventPoint::Start => start_ns,
        EventPoint::End => end_ns,
        EventPoint::Request => kernel?.request_ns,
        EventPoint::IpiSent => kernel?.ipi_sent_ns(),
        EventPoint::HandlerEntry => kernel?.handler_entry_ns(),
        EventPoint::Stopped => kernel?.stopped_ns(),
        EventPoint::Done => kernel?.done_ns,
        EventPoint::Returned => kernel?.returned_ns(),
        EventPoint::HelperReturned => kernel?.helper_returned_ns(),
    }
}

/// The kernel's account of the termination a step caused (terminate) or
/// suffered (a trigger whose run was stopped for its budget); the outer
/// `None` when no such step ran.
fn kernel_termination<'a>(
    rep: &'a Repetition,
    step: &str,
) -> Option<Option<&'a KernelTermination>> {
    rep.steps.iter().find_map(|s| match s {
        StepRecord::Terminate { label, kernel, .. } | StepRecord::Trigger { label, kernel, .. }
            if label == step =>
        {
            Some(kernel.as_ref())
        }
        _ => None,
    })
}

/// Each declared metric that both of its events were recorded for, in ns.
/// Signed: a negative value (the program ended before the terminate call
/// began) is a finding, not an error.
pub fn compute_metrics(specs: &[MetricSpec], steps: &[StepRecord]) -> BTreeMap<String, f64> {
    specs
        .iter()
        .filter_map(|spec| {
            let from = event_ns(steps, spec.from.get_ref())?;
            let to = event_ns(steps, spec.to.get_ref())?;
            Some((spec.name.get_ref().to_string(), to as f64 - from as f64))
        })
        .collect()
}

/// Substrings of kernel log lines that mean something went wrong.
const KERNEL_TROUBLE: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "Kernel panic",
    "general protection fault",
    "KASAN:",
    "UBSAN:",
    "possible circular locking",
    "possible recursive locking",
    "inconsistent lock state",
    "suspicious RCU usage",
    // kmemleak's report ("kmemleak: 3 new suspected memory leaks") and its
    // giving up on an error, not its start-up line ("kmemleak: Kernel memory
    // leak detector initialized").
    "suspected memory leak",
    "leak detector disabled",
    "Call Trace:",
    "stack segment",
];

/// The dmesg lines that report a kernel problem.
pub fn kernel_trouble(dmesg: &str) -> Vec<&str> {
    dmesg
        .lines()
        .filter(|line| KERNEL_TROUBLE.iter().any(|pattern| line.contains(pattern)))
        .collect()
}

/// The guest's kernel log read right after boot and at the end of the run.
#[derive(Debug, Clone, Default)]
pub struct KernelLog {
    pub after_boot: String,
    pub at_end: String,
}

impl KernelLog {
    /// The lines logged while the scenario ran: what it is accountable for.
    /// Problems during boot come from the VM's setup, not the scenario; they
    /// are reported next to the verdict instead.
    pub fn during_run(&self) -> String {
        let mut lines = self.at_end.lines();
        let end_starts_with_boot = self.after_boot.lines().zip(lines.by_ref()).all(|(a, b)| a == b);
        if end_starts_with_boot {
            lines.map(|l| format!("{l}\n")).collect()
        } else {
            // The ring buffer wrapped: judge everything rather than guess.
            self.at_end.clone()
        }
    }
}

/// Judges every expectation over all repetitions. `dmesg` is the guest's
/// kernel log (`None`: it could not be read).
pub fn evaluate(
    expectations: &[Expectation],
    repetitions: &[Repetition],
    dmesg: Option<&KernelLog>,
) -> Vec<ExpectationOutcome> {
    expectations.iter().map(|expectation| evaluate_one(expectation, repetitions, dmesg)).collect()
}

/// Judges one repetition: Ok(observed) or Err(observed).
type RepetitionCheck = Box<dyn Fn(&Repetition) -> Result<String, String>>;

fn evaluate_one(
    expectation: &Expectation,
    repetitions: &[Repetition],
    dmesg: Option<&KernelLog>,
) -> ExpectationOutcome {
    let (check, per_repetition): (String, RepetitionCheck) = match &expectation.check {
        Check::Metric(bound) => metric_check(bound),
        Check::TerminateResult(result) => terminate_result_check(result),
        Check::KernelCase(want) => kernel_case_check(want),
        Check::BudgetResult(result) => budget_result_check(result),
        Check::KmemleakClean(clean) => kmemleak_clean_check(clean),
        Check::Terminations(delta) => terminations_check(delta),
        Check::TriggerOk(ok) => trigger_ok_check(ok),
        Check::TriggerField(field) => trigger_field_check(field),
        Check::DmesgClean(_) => return dmesg_clean_outcome(&expectation.name, dmesg),
    };

    let mut failed = Vec::new();
    let mut observed = Vec::new();
    for rep in repetitions {
        match per_repetition(rep) {
            Ok(value) => observed.push(value),
            Err(value) => {
                failed.push(rep.index);
                observed.push(value);
            }
        }
    }
    let detail = if repetitions.is_empty() {
        "no repetition ran".to_owned()
    } else if failed.is_empty() {
        summarize_observations(&observed)
    } else {
        let first = failed[0] as usize;
        let value = repetitions
            .iter()
            .position(|r| r.index as usize == first)
            .map_or(String::new(), |i| observed[i].clone());
        format!(
            "failed in {} of {} repetitions (first: #{first}: {value}); all: {}",
            failed.len(),
            repetitions.len(),
            summarize_observations(&observed)
        )
    };
    ExpectationOutcome {
        name: expectation.name.clone(),
        check,
        passed: !repetitions.is_empty() && failed.is_empty(),
        detail,
        failed_repetitions: failed,
    }
}

/// Every repetition's value of the metric within its bounds.
fn metric_check(bound: &MetricBound) -> (String, RepetitionCheck) {
    let metric = bound.metric.get_ref().to_string();
    let mut words = Vec::new();
    if let Some(low) = bound.at_least_ms {
        words.push(format!("≥ {low} ms"));
    }
    if let Some(high) = bound.at_most_ms {
        words.push(format!("≤ {high} ms"));
    }
    let check = format!("{metric} {}", words.join(" and "));
    let (low, high) = (bound.at_least_ms, bound.at_most_ms);
    (
        check,
        Box::new(move |rep: &Repetition| {
            let Some(&ns) = rep.metrics.get(&metric) else {
                return Err(format!("{metric} was not measured"));
            };
            let ms = ns / 1e6;
            let shown = format!("{ms:.3} ms");
            if low.is_some_and(|low| ms < low) || high.is_some_and(|high| ms > high) {
                Err(shown)
            } else {
                Ok(shown)
            }
        }),
    )
}

/// The terminate step's errno, or the CPUs it stopped.
fn terminate_result_check(result: &TerminateResultCheck) -> (String, RepetitionCheck) {
    let step = result.step.get_ref().to_string();
    let (want_errno, want_cpus) = (result.errno, result.cpus);
    let check = match (want_errno, want_cpus) {
        (Some(errno), _) => format!("terminate `{step}` fails with {}", errno.name()),
        (None, Some(cpus)) => {
            format!("terminate `{step}` stops the program on {cpus} CPU(s)")
        }
        (None, None) => format!("terminate `{step}` result"),
    };
    (
        check,
        Box::new(move |rep: &Repetition| {
            let found = rep.steps.iter().find_map(|s| match s {
                StepRecord::Terminate { label, cpus, errno, .. } if *label == step => {
                    Some((cpus, errno))
                }
                _ => None,
            });
            let Some((cpus, errno)) = found else {
                return Err(format!("terminate `{step}` did not run"));
            };
            let observed = match (cpus, errno) {
                (_, Some(errno)) => errno.clone(),
                (Some(cpus), None) => format!("{cpus} CPU(s)"),
                (None, None) => "no result".to_owned(),
            };
            let matches = match (want_errno, want_cpus) {
                (Some(want), _) => errno.as_deref() == Some(want.name()),
                (None, Some(want)) => errno.is_none() && *cpus == Some(want),
                (None, None) => false,
            };
            if matches {
                Ok(observed)
            } else {
                Err(observed)
            }
        }),
    )
}

/// The kernel's trace of the step: the path on every stopped CPU, frames rewritten, none lost.
fn kernel_case_check(want: &KernelCaseCheck) -> (String, RepetitionCheck) {
    let (step, case, min_frames) = (
        want.step.get_ref().to_string(),
        want.case.as_ref().map(|c| *c.get_ref()),
        want.min_frames,
    );
    let path = case.map_or("a termination".to_owned(), |case| format!("case {case}"));
    (
        format!("the kernel traced `{step}` as {path} on every CPU, ≥ {min_frames} frame(s) rewritten, none lost"),
        Box::new(move |rep: &Repetition| {
            let Some(kernel) = kernel_termination(rep, &step) else { return Err(format!("step `{step}` did not run")) };
            let Some(kernel) = kernel else { return Err("the kernel traced no termination for it (no bpf:bpf_prog_terminate_request, or no budget stop in the run)".to_owned()) };
            if kernel.handlers.is_empty() {
                return Err("no CPU was stopped (no bpf:bpf_prog_terminate event)".to_owned());
            }
            let seen: Vec<String> = kernel.handlers.iter().map(|h| format!("cpu{} case {} frames {} lost {}", h.cpu, h.case, h.frames, h.lost)).collect();
            let ok = kernel.handlers.iter().all(|h| case.is_none_or(|case| h.case == case) && h.frames >= min_frames && h.lost == 0);
            if ok {
                Ok(seen.join(", "))
            } else {
                Err(seen.join(", "))
            }
        }),
    )
}

/// The budget step accepted, or refused with the errno.
fn budget_result_check(result: &BudgetResultCheck) -> (String, RepetitionCheck) {
    let (step, want) = (result.step.get_ref().to_string(), result.errno);
    (
        match want {
            Some(errno) => format!("budget `{step}` fails with {}", errno.name()),
            None => format!("budget `{step}` is accepted"),
        },
        Box::new(move |rep: &Repetition| {
            let errno = rep.steps.iter().find_map(|s| match s {
                StepRecord::Budget { label, errno, .. } if *label == step => Some(errno),
                _ => None,
            });
            let Some(errno) = errno else {
                return Err(format!("budget `{step}` did not run"));
            };
            let observed = errno.clone().unwrap_or_else(|| "accepted".to_owned());
            if errno.as_deref() == want.map(|w| w.name()) {
                Ok(observed)
            } else {
                Err(observed)
            }
        }),
    )
}

fn kmemleak_clean_check(clean: &KmemleakCleanCheck) -> (String, RepetitionCheck) {
    let step = clean.step.get_ref().to_string();
    (
        format!("kmemleak `{step}` reports no unreferenced object"),
        Box::new(move |rep: &Repetition| {
            let found = rep.steps.iter().find_map(|s| match s {
                StepRecord::Kmemleak { label, suspects, report } if *label == step => {
                    Some((*suspects, report))
                }
                _ => None,
            });
            match found {
                None => Err(format!("kmemleak `{step}` did not run")),
                Some((0, _)) => Ok("0 suspects".to_owned()),
                Some((n, report)) => Err(format!(
                    "{n} suspect(s); first: {}",
                    report.lines().next().unwrap_or("(no report)").trim()
                )),
            }
        }),
    )
}

/// The kernel's termination counters between two prog_info steps.
fn terminations_check(delta: &TerminationsCheck) -> (String, RepetitionCheck) {
    let (from, to, want_on_demand, want_budget) = (
        delta.from.get_ref().to_string(),
        delta.to.get_ref().to_string(),
        delta.on_demand,
        delta.budget,
    );
    let mut words = Vec::new();
    words.extend(want_on_demand.map(|n| format!("{n} on demand")));
    words.extend(want_budget.map(|n| format!("{n} by budget")));
    (
        format!(
            "from `{from}` to `{to}` the kernel counted {} more terminated run(s)",
            words.join(" and ")
        ),
        Box::new(move |rep: &Repetition| {
            let counters = |step: &str| {
                rep.steps.iter().find_map(|s| match s {
                    StepRecord::ProgInfo {
                        label, terminated_on_demand, terminated_budget, ..
                    } if label == step => Some((*terminated_on_demand, *terminated_budget)),
                    _ => None,
                })
            };
            let (Some(before), Some(after)) = (counters(&from), counters(&to)) else {
                return Err(format!("prog_info `{from}` or `{to}` did not run"));
            };
            let (on_demand, budget) =
                (after.0.wrapping_sub(before.0), after.1.wrapping_sub(before.1));
            let observed = format!("{on_demand} on demand, {budget} by budget");
            if want_on_demand.is_none_or(|n| n == on_demand)
                && want_budget.is_none_or(|n| n == budget)
            {
                Ok(observed)
            } else {
                Err(observed)
            }
        }),
    )
}

/// The trigger exited 0 with its timing line.
fn trigger_ok_check(ok: &TriggerOkCheck) -> (String, RepetitionCheck) {
    let step = ok.step.get_ref().to_string();
    (
        format!("trigger `{step}` exits 0 with its timing line"),
        Box::new(move |rep: &Repetition| match find_trigger(rep, &step) {
            Some((Some(0), true, _)) => Ok("exit 0".to_owned()),
            Some((code, has_times, _)) => Err(format!(
                "exit {}{}",
                code.map_or("none".to_owned(), |c| c.to_string()),
                if has_times { "" } else { ", no timing line" }
            )),
            None => Err(format!("trigger `{step}` did not run")),
        }),
    )
}

/// A field of the trigger's output line.
fn trigger_field_check(field: &TriggerFieldCheck) -> (String, RepetitionCheck) {
    let (step, name, want) = (field.step.get_ref().to_string(), field.field.clone(), field.equals);
    (
        format!("trigger `{step}` reports {name}={want}"),
        Box::new(move |rep: &Repetition| {
            let Some((_, _, fields)) = find_trigger(rep, &step) else {
                return Err(format!("trigger `{step}` did not run"));
            };
            match fields.get(&name) {
                Some(value) if value.parse::<i64>() == Ok(want) => Ok(format!("{name}={value}")),
                Some(value) => Err(format!("{name}={value}")),
                None => Err(format!("no {name} in its output")),
            }
        }),
    )
}

/// `dmesg_clean`: judged once over the run's kernel log, not per repetition.
fn dmesg_clean_outcome(name: &str, dmesg: Option<&KernelLog>) -> ExpectationOutcome {
    let check = "no WARN/BUG/oops/KASAN/lockdep lines in dmesg while the scenario ran".to_owned();
    let (passed, mut detail) = match dmesg {
        None => (false, "dmesg could not be read".to_owned()),
        Some(log) => {
            let during = log.during_run();
            match kernel_trouble(&during).as_slice() {
                [] => (true, format!("{} lines, none reporting a problem", during.lines().count())),
                lines => {
                    (false, format!("{} problem line(s), first: {}", lines.len(), lines[0].trim()))
                }
            }
        }
    };
    if let Some(boot_problem) =
        dmesg.and_then(|log| kernel_trouble(&log.after_boot).first().map(|l| l.trim().to_owned()))
    {
        detail.push_str(&format!(
            "; note: the boot itself logged a problem (not counted): {boot_problem}"
        ));
    }
    ExpectationOutcome {
        name: name.to_owned(),
        check,
        passed,
        detail,
        failed_repetitions: Vec::new(),
    }
}

/// What the VMM saw of a call that stopped no CPU, all of it consistent: no rewrite, and on
/// some vCPUs the handler ran and returned having found nothing to stop (`untouched`).
fn nothing_rewritten(proofs: &[crate::results::stack::CpuStackProof]) -> String {
    let untouched: Vec<String> =
        proofs.iter().filter(|p| p.untouched).map(|p| p.vcpu.to_string()).collect();
    match untouched.as_slice() {
        [] => "no CPU stopped, nothing rewritten".to_owned(),
        vcpus => format!(
            "no CPU stopped, nothing rewritten (the handler ran on vCPU {} and left its stack as it was)",
            vcpus.join(", ")
        ),
    }
}

/// `verify_stack`: one expectation per terminate step. In every repetition
/// where the call stopped n CPUs, the VMM must have judged n rewrites and
/// found each correct; the detail names the first offending address.
pub fn evaluate_stack_proofs(
    labels: &[String],
    repetitions: &[Repetition],
) -> Vec<ExpectationOutcome> {
    labels
        .iter()
        .map(|label| {
            let mut failed = Vec::new();
            let mut observed = Vec::new();
            // Only the repetitions in which the VMM stopped the vCPUs to read them.
            for rep in repetitions.iter().filter(|rep| rep.vmm_stops) {
                let Some((cpus, proofs)) = rep.steps.iter().find_map(|s| match s {
                    StepRecord::Terminate { label: l, cpus, stack, .. } if l == label => Some((cpus.unwrap_or(0) as usize, stack)),
                    _ => None,
                }) else {
                    continue;
                };
                let problem = proofs.iter().find_map(|p| match (&p.verdict, &p.error) {
                    (_, Some(error)) => Some(format!("vCPU {}: {error}", p.vcpu)),
                    (Some(v), None) => v.problems.first().map(|problem| format!("vCPU {}: {problem}", p.vcpu)),
                    (None, None) if p.untouched => None,
                    (None, None) => Some(format!("vCPU {}: no snapshots", p.vcpu)),
                });
                let judged = proofs.iter().filter(|p| p.verdict.is_some()).count();
                let outcome = match problem {
                    Some(problem) => Err(problem),
                    None if judged != cpus => Err(format!("{cpus} CPU(s) stopped but {judged} rewrite(s) seen by the VMM")),
                    // A refused call (EOPNOTSUPP, ESRCH, ...): there was no rewrite to judge.
                    None if cpus == 0 => Ok(nothing_rewritten(proofs)),
                    None => Ok(proofs.iter().filter_map(|p| p.verdict.as_ref()).map(|v| format!("case {}: {} word(s) rewritten, IP {}", v.case, v.rewritten, if v.ip_before == v.ip_after { "kept" } else { "moved" })).collect::<Vec<_>>().join("; ")),
                };
                match outcome {
                    Ok(seen) => observed.push(seen),
                    Err(problem) => {
                        failed.push((rep.index, problem.clone()));
                        observed.push(problem);
                    }
                }
            }
            let detail = match failed.first() {
                _ if observed.is_empty() => "no repetition ran".to_owned(),
                None => summarize_observations(&observed),
                Some((first, problem)) => format!("failed in {} of {} repetitions (first: #{first}: {problem})", failed.len(), observed.len()),
            };
            ExpectationOutcome {
                name: format!("stack rewrite of `{label}` verified from the VMM (verify_stack)"),
                check: "before bpf_die some word points into the program; after it none does, each rewritten word is the copy address the kernel's insn map predicts, all else unchanged".to_owned(),
                passed: !observed.is_empty() && failed.is_empty(),
                detail,
                failed_repetitions: failed.into_iter().map(|(index, _)| index).collect(),
            }
        })
        .collect()
}

/// `host_stall_ms`: the expectation of the terminate step `label` that asks for a stall: in
/// every repetition the VMM parked the guest as the call sent its stop interrupt. A call that
/// sent none (it found nothing to signal) tested nothing the stall is there for.
pub fn evaluate_host_stall(label: &str, repetitions: &[Repetition]) -> ExpectationOutcome {
    let stalls: Vec<(u32, Option<f64>)> = repetitions
        .iter()
        .filter_map(|rep| {
            rep.steps.iter().find_map(|step| match step {
                StepRecord::Terminate { label: l, host_stall_ms, .. } if l == label => {
                    Some((rep.index, *host_stall_ms))
                }
                _ => None,
            })
        })
        .collect();
    let failed: Vec<u32> =
        stalls.iter().filter(|(_, ms)| ms.is_none()).map(|(index, _)| *index).collect();
    let observed: Vec<String> = stalls
        .iter()
        .map(|(_, ms)| {
            ms.map_or("no stop interrupt sent".to_owned(), |ms| format!("parked {ms:.0} ms"))
        })
        .collect();
    ExpectationOutcome {
        name: format!("the VMM parked the guest as `{label}` sent its stop interrupt (host_stall_ms)"),
        check: "a breakpoint on smp_call_function_single_async was hit during the call in every repetition".to_owned(),
        passed: !stalls.is_empty() && failed.is_empty(),
        detail: match observed.is_empty() {
            true => "no repetition ran".to_owned(),
            false => summarize_observations(&observed),
        },
        failed_repetitions: failed,
    }
}

/// "value ×n" for repeated identical observations, else the list.
fn summarize_observations(observed: &[String]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for value in observed {
        match counts.iter_mut().find(|(v, _)| v == value) {
            Some((_, n)) => *n += 1,
            None => counts.push((value, 1)),
        }
    }
    counts
        .iter()
        .map(|(v, n)| if *n > 1 { format!("{v} ×{n}") } else { (*v).to_owned() })
        .collect::<Vec<_>>()
        .join(", ")
}

/// (exit code, has start and end, fields) of trigger `label`.
fn find_trigger<'a>(
    rep: &'a Repetition,
    label: &str,
) -> Option<(Option<i32>, bool, &'a BTreeMap<String, String>)> {
    match crate::results::trigger_record(&rep.steps, label)? {
        StepRecord::Trigger { exit_code, start_ns, end_ns, fields, .. } => {
            Some((*exit_code, start_ns.is_some() && end_ns.is_some(), fields))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario;

    const SCENARIO: &str = r#"
description = "t"
[vm]
kernel = "default"
[[program]]
name = "loops"
bpf_name = "loops"
loader = ["loops"]
trigger = ["trigger_loops"]
[[step]]
trigger = { label = "run", program = "loops", background = true }
[[step]]
terminate = { label = "term", program = "loops" }
[[step]]
wait = { step = "run" }
[[metric]]
name = "end_to_end"
from = "term.start"
to = "run.end"
[[expect]]
name = "fast"
metric = { metric = "end_to_end", at_most_ms = 5 }
[[expect]]
name = "one cpu"
terminate_result = { step = "term", cpus = 1 }
[[expect]]
name = "second skipped"
trigger_field = { step = "run", field = "second_done", equals = 0 }
[[expect]]
name = "clean"
dmesg_clean = {}
"#;

    fn repetition(
        index: u32,
        term_start: u64,
        run_end: u64,
        cpus: Option<u32>,
        errno: Option<&str>,
        second_done: &str,
    ) -> Repetition {
        let steps = vec![
            StepRecord::Terminate {
                label: "term".into(),
                prog_id: 7,
                flags: 0,
                via: "agent".into(),
                cpus,
                errno: errno.map(String::from),
                start_ns: Some(term_start),
                end_ns: Some(term_start + 1000),
                kernel: None,
                stack: Vec::new(),
                host_before_call_ms: None,
                host_stall_ms: None,
            },
            StepRecord::Trigger {
                label: "run".into(),
                argv: vec!["trigger_loops".into()],
                exit_code: Some(0),
                start_ns: Some(0),
                end_ns: Some(run_end),
                fields: [("second_done".to_owned(), second_done.to_owned())].into(),
                stdout: String::new(),
                stderr: String::new(),
                kernel: None,
            },
        ];
        let scenario = scenario::parse(SCENARIO).expect("valid");
        let metrics = compute_metrics(&scenario.metrics, &steps);
        Repetition { index, steps, metrics, vmm_stops: false }
    }

    /// `verify_stack = "alternate"`: a repetition the VMM did not stop has no stack to judge,
    /// and is not a failure of the proof; a stopped one without a verdict is.
    /// The VMM's stack proofs of the terminate step of `rep`: `proof`, or none.
    fn set_terminate_stack(
        rep: &mut Repetition,
        proof: Option<crate::results::stack::CpuStackProof>,
    ) {
        for step in &mut rep.steps {
            if let StepRecord::Terminate { stack, .. } = step {
                *stack = proof.clone().into_iter().collect();
            }
        }
    }

    #[test]
    fn the_stack_proof_judges_only_the_repetitions_the_vmm_stopped() {
        let with_stack = |index: u32, stopped: bool, error: Option<&str>| {
            let mut rep = repetition(index, 200_000_000, 203_500_000, Some(1), None, "0");
            rep.vmm_stops = stopped;
            let proof = error.map(|error| crate::results::stack::CpuStackProof {
                vcpu: 1,
                verdict: None,
                error: Some(error.to_owned()),
                untouched: false,
            });
            set_terminate_stack(&mut rep, proof);
            rep
        };
        let reps = [
            with_stack(0, true, Some("slot 0x10 still points into the original")),
            with_stack(1, false, None),
            with_stack(2, true, None),
            with_stack(3, false, None),
        ];
        let outcome = &evaluate_stack_proofs(&["term".to_owned()], &reps)[0];
        assert!(!outcome.passed);
        assert_eq!(outcome.failed_repetitions, vec![0, 2]);
        assert_eq!(
            outcome.detail,
            "failed in 2 of 2 repetitions (first: #0: vCPU 1: slot 0x10 still points into the original)"
        );
    }

    #[test]
    fn a_refused_call_has_no_rewrite_to_judge_but_one_seen_fails() {
        let refused = |seen: bool| {
            let mut rep = repetition(0, 200_000_000, 203_500_000, Some(0), Some("EOPNOTSUPP"), "1");
            rep.vmm_stops = true;
            let proof = seen.then(|| crate::results::stack::CpuStackProof {
                vcpu: 1,
                verdict: Some(crate::results::stack::StackVerdict {
                    case: 1,
                    ip_before: 1,
                    ip_after: 1,
                    ip_predicted: None,
                    original_before: 1,
                    original_after: 0,
                    rewritten: 1,
                    rows: Vec::new(),
                    problems: Vec::new(),
                }),
                error: None,
                untouched: false,
            });
            set_terminate_stack(&mut rep, proof);
            rep
        };
        let outcome = &evaluate_stack_proofs(&["term".to_owned()], &[refused(false)])[0];
        assert!(outcome.passed);
        assert_eq!(outcome.detail, "no CPU stopped, nothing rewritten");
        let outcome = &evaluate_stack_proofs(&["term".to_owned()], &[refused(true)])[0];
        assert!(!outcome.passed);
        assert_eq!(
            outcome.detail,
            "failed in 1 of 1 repetitions (first: #0: 0 CPU(s) stopped but 1 rewrite(s) seen by the VMM)"
        );
    }

    /// The handler ran on a vCPU and rewrote nothing there (types/tailcall_fentry.toml: a run
    /// it cannot stop in a tail call's target): right for a refused call, wrong for one that
    /// claims a stop.
    #[test]
    fn a_handler_that_rewrote_nothing_agrees_only_with_a_call_that_stopped_nothing() {
        let answered = |cpus: Option<u32>, errno: Option<&str>| {
            let mut rep = repetition(0, 200_000_000, 203_500_000, cpus, errno, "1");
            rep.vmm_stops = true;
            set_terminate_stack(
                &mut rep,
                Some(crate::results::stack::CpuStackProof {
                    vcpu: 1,
                    verdict: None,
                    error: None,
                    untouched: true,
                }),
            );
            rep
        };
        let refused =
            &evaluate_stack_proofs(&["term".to_owned()], &[answered(None, Some("EOPNOTSUPP"))])[0];
        assert!(refused.passed, "{}", refused.detail);
        assert_eq!(
            refused.detail,
            "no CPU stopped, nothing rewritten (the handler ran on vCPU 1 and left its stack as it was)"
        );
        let claimed = &evaluate_stack_proofs(&["term".to_owned()], &[answered(Some(1), None)])[0];
        assert!(!claimed.passed);
        assert_eq!(
            claimed.detail,
            "failed in 1 of 1 repetitions (first: #0: 1 CPU(s) stopped but 0 rewrite(s) seen by the VMM)"
        );
    }

    #[test]
    fn metrics_come_from_the_recorded_timestamps() {
        let rep = repetition(0, 200_000_000, 203_500_000, Some(1), None, "0");
        assert_eq!(rep.metrics.get("end_to_end"), Some(&3_500_000.0));
    }

    #[test]
    fn all_pass_when_every_repetition_holds() {
        let scenario = scenario::parse(SCENARIO).expect("valid");
        let reps: Vec<Repetition> = (0..3)
            .map(|i| {
                repetition(
                    i,
                    100_000_000,
                    100_000_000 + 1_000_000 * (i as u64 + 1),
                    Some(1),
                    None,
                    "0",
                )
            })
            .collect();
        let log = KernelLog {
            after_boot: "[    0.1] Linux version 6.12\n".into(),
            at_end: "[    0.1] Linux version 6.12\n[    5.0] loops: loaded\n".into(),
        };
        let outcomes = evaluate(&scenario.expectations, &reps, Some(&log));
        assert!(outcomes.iter().all(|o| o.passed), "{outcomes:#?}");
        assert_eq!(outcomes[1].detail, "1 CPU(s) ×3");
    }

    #[test]
    fn one_bad_repetition_fails_with_its_index_and_value() {
        let scenario = scenario::parse(SCENARIO).expect("valid");
        let reps = vec![
            repetition(0, 100_000_000, 101_000_000, Some(1), None, "0"),
            repetition(1, 100_000_000, 109_000_000, None, Some("ESRCH"), "1"),
        ];
        let outcomes = evaluate(&scenario.expectations, &reps, None);
        let by_name = |n: &str| outcomes.iter().find(|o| o.name == n).expect("present");
        assert!(!by_name("fast").passed);
        assert_eq!(by_name("fast").failed_repetitions, vec![1]);
        assert!(by_name("fast").detail.contains("#1: 9.000 ms"), "{}", by_name("fast").detail);
        assert!(!by_name("one cpu").passed && by_name("one cpu").detail.contains("ESRCH"));
        assert!(
            !by_name("second skipped").passed
                && by_name("second skipped").detail.contains("second_done=1")
        );
        assert!(!by_name("clean").passed, "unreadable dmesg must not pass");
    }

    #[test]
    fn kernel_warnings_during_the_run_fail_boot_warnings_are_noted() {
        let boot = "[ 1.0] ok\n[ 1.5] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:605\n";
        let run = "[ 2.0] WARNING: CPU: 1 PID: 50 at kernel/bpf/core.c:100 bpf_die+0x1/0x2\n[ 2.1] Call Trace:\n";
        assert_eq!(kernel_trouble(run).len(), 2);
        let kmemleak = "[ 0.9] kmemleak: Kernel memory leak detector initialized (mem pool available: 15598)\n\
                        [ 9.0] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)\n";
        assert_eq!(
            kernel_trouble(kmemleak),
            ["[ 9.0] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)"]
        );
        let scenario = scenario::parse(SCENARIO).expect("valid");

        let log = KernelLog { after_boot: boot.into(), at_end: format!("{boot}{run}") };
        let outcome = &evaluate(&scenario.expectations, &[], Some(&log))[3];
        assert!(!outcome.passed);
        assert!(
            outcome.detail.starts_with("2 problem line(s), first: [ 2.0] WARNING: CPU: 1"),
            "{}",
            outcome.detail
        );

        let quiet_run =
            KernelLog { after_boot: boot.into(), at_end: format!("{boot}[ 3.0] fine\n") };
        let outcome = &evaluate(&scenario.expectations, &[], Some(&quiet_run))[3];
        assert!(outcome.passed, "{}", outcome.detail);
        assert!(
            outcome.detail.contains("boot itself logged a problem (not counted): [ 1.5] WARNING"),
            "{}",
            outcome.detail
        );

        // A wrapped ring buffer: everything is judged.
        let wrapped =
            KernelLog { after_boot: boot.into(), at_end: "[ 9.0] WARNING: late\n".into() };
        assert!(!evaluate(&scenario.expectations, &[], Some(&wrapped))[3].passed);
    }

    #[test]
    fn no_repetitions_pass_nothing() {
        let scenario = scenario::parse(SCENARIO).expect("valid");
        let outcomes = evaluate(&scenario.expectations, &[], Some(&KernelLog::default()));
        assert!(outcomes[..3].iter().all(|o| !o.passed && o.detail == "no repetition ran"));
    }

    const BUDGET_SCENARIO: &str = r#"
description = "budget"
[vm]
kernel = "default"
[[program]]
name = "spin"
bpf_name = "helper_loop"
loader = ["loops"]
trigger = ["trigger_loops"]
[[step]]
prog_info = { label = "before", program = "spin" }
[[step]]
budget = { label = "set", program = "spin", ms = 300 }
[[step]]
trigger = { label = "run", program = "spin" }
[[step]]
prog_info = { label = "after", program = "spin" }
[[metric]]
name = "budget_stop"
from = "run.start"
to = "run.stopped"
[[expect]]
name = "accepted"
budget_result = { step = "set" }
[[expect]]
name = "stopped by the kernel"
kernel_case = { step = "run", min_frames = 1 }
[[expect]]
name = "counted"
terminations = { from = "before", to = "after", budget = 1, on_demand = 0 }
"#;

    fn budget_repetition(stopped: bool, budget_after: u64) -> Repetition {
        use crate::results::kernel::{HandlerEvent, Reason};
        let kernel = stopped.then(|| KernelTermination {
            reason: Reason::Budget,
            request_ns: None,
            ret: None,
            done_ns: None,
            handlers: vec![HandlerEvent {
                cpu: 1,
                case: 1,
                frames: 2,
                lost: 0,
                sent_ns: None,
                entry_ns: Some(1_300_990_000),
                ts_ns: 1_301_000_000,
            }],
            returns: Vec::new(),
            helper_returns: Vec::new(),
        });
        let info = |label: &str, budget: u64| StepRecord::ProgInfo {
            label: label.into(),
            prog_id: 9,
            runtime_budget_ms: 300,
            terminated_on_demand: 2,
            terminated_budget: budget,
        };
        let steps = vec![
            info("before", 5),
            StepRecord::Budget { label: "set".into(), prog_id: 9, ms: 300, errno: None },
            StepRecord::Trigger {
                label: "run".into(),
                argv: Vec::new(),
                exit_code: Some(0),
                start_ns: Some(1_000_000_000),
                end_ns: Some(1_303_000_000),
                fields: BTreeMap::new(),
                stdout: String::new(),
                stderr: String::new(),
                kernel,
            },
            info("after", budget_after),
        ];
        let scenario = scenario::parse(BUDGET_SCENARIO).expect("valid");
        let metrics = compute_metrics(&scenario.metrics, &steps);
        Repetition { index: 0, steps, metrics, vmm_stops: false }
    }

    #[test]
    fn a_budget_stop_is_measured_from_the_run_and_counted() {
        let scenario = scenario::parse(BUDGET_SCENARIO).expect("valid");
        let rep = budget_repetition(true, 6);
        assert_eq!(rep.metrics.get("budget_stop"), Some(&301_000_000.0));
        let outcomes = evaluate(&scenario.expectations, &[rep], None);
        assert!(outcomes.iter().all(|o| o.passed), "{outcomes:#?}");
    }

    #[test]
    fn a_run_the_kernel_did_not_stop_fails_the_budget_checks() {
        let scenario = scenario::parse(BUDGET_SCENARIO).expect("valid");
        let rep = budget_repetition(false, 5);
        assert!(!rep.metrics.contains_key("budget_stop"));
        let outcomes = evaluate(&scenario.expectations, &[rep], None);
        let by_name = |n: &str| outcomes.iter().find(|o| o.name == n).expect("present");
        assert!(by_name("accepted").passed);
        assert!(!by_name("stopped by the kernel").passed);
        assert!(
            !by_name("counted").passed && by_name("counted").detail.contains("0 by budget"),
            "{}",
            by_name("counted").detail
        );
    }

    #[test]
    fn kmemleak_clean_holds_only_for_a_scan_without_suspects() {
        let scenario = scenario::parse(
            r#"
description = "x"
[vm]
kernel = "debug"
[[step]]
kmemleak = { label = "after" }
[[expect]]
name = "clean"
kmemleak_clean = { step = "after" }
"#,
        )
        .expect("valid");
        let scan = |index: u32, suspects: u32, report: &str| Repetition {
            index,
            steps: vec![StepRecord::Kmemleak {
                label: "after".into(),
                suspects,
                report: report.into(),
            }],
            metrics: BTreeMap::new(),
            vmm_stops: false,
        };
        let leak = "unreferenced object 0xffff888004a1c000 (size 64):\n  comm \"sync\", pid 80";
        let outcomes = evaluate(
            &scenario.expectations,
            &[scan(0, 0, ""), scan(1, 1, leak), scan(2, 0, "")],
            None,
        );
        assert!(!outcomes[0].passed);
        assert_eq!(outcomes[0].failed_repetitions, vec![1]);
        assert!(
            outcomes[0]
                .detail
                .contains("1 suspect(s); first: unreferenced object 0xffff888004a1c000"),
            "{}",
            outcomes[0].detail
        );
        let missing =
            Repetition { index: 0, steps: Vec::new(), metrics: BTreeMap::new(), vmm_stops: false };
        let outcomes = evaluate(&scenario.expectations, &[missing], None);
        assert!(!outcomes[0].passed && outcomes[0].detail.contains("did not run"));
    }
}
