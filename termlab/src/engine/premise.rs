//! Whether a repetition tested what its terminate steps were written to test.
//!
//! A terminate step between a background trigger of its program and that trigger's `wait`
//! is meant for the trigger's run, which the steps before it (a `wait_trace` for a line the
//! run writes) showed to be running. If the kernel saw the request only after that run had
//! ended, its answer, ESRCH, says nothing about termination: the run's time ran out while
//! the request was on its way (under nesting the emulated host can hold a VM for seconds).
//! Such a repetition tested nothing and is run again. A kernel that answers ESRCH while the
//! run still runs, or that holds the call until the run ends, is not excused: the first
//! sees the request inside the run, the second's request timestamp (taken as the call
//! enters the kernel) is inside it too.

use crate::evaluate::{compute_metrics, evaluate};
use crate::results::{trigger_record, Repetition, StepRecord};
use crate::scenario::{Scenario, Step};

/// Why the repetition whose records are `records` tested nothing, if it did not: the first
/// terminate step answered ESRCH whose request reached the kernel after the run it was meant
/// for had ended.
pub fn untested_terminate(scenario: &Scenario, records: &[StepRecord]) -> Option<String> {
    for (index, step) in scenario.steps.iter().enumerate() {
        let Step::Terminate(terminate) = step else { continue };
        let Some(program) = &terminate.program else { continue };
        let label = terminate.label.get_ref().as_str();
        let Some((request_ns, host_ms)) = esrch_request(records, label) else { continue };
        for run in runs_in_flight(scenario, index, program.get_ref().as_str()) {
            let Some(end_ns) = trigger_end_ns(records, run) else { continue };
            if request_ns > end_ns {
                let host = host_ms
                    .map(|ms| format!("; the host sent it {ms:.1} ms after the step began"))
                    .unwrap_or_default();
                return Some(format!(
                    "terminate `{label}` reached the kernel {:.1} ms after the run of `{run}` had ended (ESRCH){host}",
                    (request_ns - end_ns) as f64 / 1e6
                ));
            }
        }
    }
    None
}

/// Why the repetition whose records are `records` tested nothing by its scenario's own
/// account: the first `premise = true` expectation that does not hold in it.
pub fn failed_premise(scenario: &Scenario, records: &[StepRecord]) -> Option<String> {
    let repetition = Repetition {
        index: 0,
        steps: records.to_vec(),
        metrics: compute_metrics(&scenario.metrics, records),
        vmm_stops: false,
    };
    scenario.expectations.iter().filter(|expectation| expectation.premise).find_map(|premise| {
        let outcome =
            evaluate(std::slice::from_ref(premise), std::slice::from_ref(&repetition), None)
                .pop()?;
        (!outcome.passed)
            .then(|| format!("premise `{}` did not hold: {}", premise.name, outcome.detail))
    })
}

/// The labels of the background triggers of `program` started before step `index` and
/// waited for after it: the runs a terminate at `index` is meant for.
fn runs_in_flight<'s>(scenario: &'s Scenario, index: usize, program: &str) -> Vec<&'s str> {
    let waited_after = |label: &str| {
        scenario.steps[index + 1..]
            .iter()
            .any(|step| matches!(step, Step::Wait(wait) if wait.step.get_ref().as_str() == label))
    };
    scenario.steps[..index]
        .iter()
        .filter_map(|step| match step {
            Step::Trigger(trigger)
                if trigger.background && trigger.program.get_ref().as_str() == program =>
            {
                Some(trigger.label.get_ref().as_str())
            }
            _ => None,
        })
        .filter(|label| waited_after(label))
        .collect()
}

/// When the kernel saw terminate step `label`'s request, if the call answered ESRCH, and how
/// long the host took to send it.
fn esrch_request(records: &[StepRecord], label: &str) -> Option<(u64, Option<f64>)> {
    records.iter().find_map(|record| match record {
        StepRecord::Terminate {
            label: l,
            errno: Some(errno),
            kernel,
            start_ns,
            host_before_call_ms,
            ..
        } if l == label && errno == "ESRCH" => kernel
            .as_ref()
            .and_then(|kernel| kernel.request_ns)
            .or(*start_ns)
            .map(|ns| (ns, *host_before_call_ms)),
        _ => None,
    })
}

/// When trigger `label`'s run ended, from its own output line.
fn trigger_end_ns(records: &[StepRecord], label: &str) -> Option<u64> {
    match trigger_record(records, label)? {
        StepRecord::Trigger { end_ns, .. } => *end_ns,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const SCENARIO: &str = r#"
description = "x"
[vm]
kernel = "default"
vcpus = 2
[[program]]
name = "p"
object = "p.o"
trigger = ["true"]
[[step]]
trigger = { label = "first", program = "p", background = true, cpu = 1 }
[[step]]
terminate = { label = "term", program = "p" }
[[step]]
wait = { step = "first" }
[[step]]
terminate = { label = "after", program = "p" }
"#;

    fn trigger(label: &str, end_ns: u64) -> StepRecord {
        StepRecord::Trigger {
            label: label.into(),
            argv: vec![],
            exit_code: Some(0),
            start_ns: Some(1_000),
            end_ns: Some(end_ns),
            fields: BTreeMap::new(),
            stdout: String::new(),
            stderr: String::new(),
            kernel: None,
        }
    }

    fn terminate(label: &str, errno: Option<&str>, start_ns: u64) -> StepRecord {
        StepRecord::Terminate {
            label: label.into(),
            prog_id: 1,
            flags: 0,
            via: "agent".into(),
            cpus: errno.is_none().then_some(1),
            errno: errno.map(str::to_owned),
            start_ns: Some(start_ns),
            end_ns: Some(start_ns + 10),
            kernel: None,
            stack: vec![],
            host_before_call_ms: Some(2_000.0),
            host_stall_ms: None,
        }
    }

    /// sched_ext.toml's premise: the refusal must come with most of the stuck run ahead.
    #[test]
    fn a_failed_premise_voids_the_repetition_and_names_itself() {
        let scenario = crate::scenario::parse(&format!(
            r#"{SCENARIO}
[[metric]]
name = "run_after_refusal"
from = "term.end"
to = "first.end"
[[expect]]
name = "refused early"
metric = {{ metric = "run_after_refusal", at_least_ms = 500 }}
premise = true
[[expect]]
name = "not a premise"
metric = {{ metric = "run_after_refusal", at_least_ms = 1900 }}
"#
        ))
        .unwrap_or_else(|e| panic!("{e:?}"));
        // Refused 1987 ms before the task ended: the premise holds (the other check is not
        // one, and is left to the run's verdict).
        let early =
            [terminate("term", Some("EOPNOTSUPP"), 3_013_000_000), trigger("first", 5_000_000_000)];
        assert_eq!(failed_premise(&scenario, &early), None);
        // 4.6 ms before: the repetition tested nothing.
        let late =
            [terminate("term", Some("EOPNOTSUPP"), 4_995_399_990), trigger("first", 5_000_000_000)];
        let reason = failed_premise(&scenario, &late).expect("void");
        assert!(reason.starts_with("premise `refused early` did not hold: "), "{reason}");
        assert!(reason.contains("4.6"), "{reason}");
    }

    #[test]
    fn an_esrch_after_the_run_it_was_meant_for_ended_tested_nothing() {
        let scenario = crate::scenario::parse(SCENARIO).unwrap_or_else(|e| panic!("{e:?}"));
        // The request came 83 ms after the run ended: void.
        let late =
            [terminate("term", Some("ESRCH"), 5_083_000_000), trigger("first", 5_000_000_000)];
        let reason = untested_terminate(&scenario, &late).expect("void");
        assert!(
            reason.contains("`term`") && reason.contains("83.0 ms") && reason.contains("`first`")
        );
        // ESRCH while the run still ran is the kernel's answer, judged as such.
        let wrong =
            [terminate("term", Some("ESRCH"), 4_000_000_000), trigger("first", 5_000_000_000)];
        assert_eq!(untested_terminate(&scenario, &wrong), None);
        // A stop, and any other errno, are answers too.
        let stopped = [terminate("term", None, 5_083_000_000), trigger("first", 5_000_000_000)];
        assert_eq!(untested_terminate(&scenario, &stopped), None);
        let busy =
            [terminate("term", Some("EBUSY"), 5_083_000_000), trigger("first", 5_000_000_000)];
        assert_eq!(untested_terminate(&scenario, &busy), None);
        // A terminate after the wait is meant for no run: its ESRCH is what it tests.
        let after = [
            terminate("term", None, 4_000_000_000),
            trigger("first", 5_000_000_000),
            terminate("after", Some("ESRCH"), 6_000_000_000),
        ];
        assert_eq!(untested_terminate(&scenario, &after), None);
    }
}
