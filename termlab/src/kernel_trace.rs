//! The kernel's own account of each termination: the `bpf:` trace events of
//! the series (guest-kernel/patches/0006, 0026, 0012), parsed from the trace
//! buffer and matched to the terminate steps that caused them, or, for runs
//! the kernel stopped for exceeding their runtime budget, to the triggers
//! whose runs they were.
//!
//! Every event carries `ts_ns`, the guest's CLOCK_MONOTONIC in ns taken in
//! the kernel where it happened, so metrics between them need no clock
//! translation and include no user-space overhead:
//!
//! ```text
//!   bpf_prog_terminate_request   BPF_PROG_TERMINATE entered
//!   bpf_prog_terminate           one CPU moved to the copy (handler done),
//!                                reason=request or reason=budget; since
//!                                patch 0019 also sent_ns (its IPI sent, 0
//!                                for the budget's tick) and entry_ns
//!                                (handler began)
//!   bpf_prog_terminate_done      BPF_PROG_TERMINATE returns
//!   bpf_termination_demo_delay_begin  a slow demo helper starts its delay
//!                                (scenarios wait for it to stop a run there)
//!   bpf_termination_demo_delay_done   a slow demo helper returns
//!   bpf_prog_terminated_return   a terminated run returned
//! ```

use std::collections::BTreeMap;

use crate::results::kernel::{CpuTime, HandlerEvent, KernelTermination, Reason};

/// tracefs file that enables every `bpf:` event (they are all the series').
pub const ENABLE_PATH: &str = "/sys/kernel/tracing/events/bpf/enable";

/// One parsed line of the trace buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    pub cpu: u32,
    pub name: String,
    pub fields: BTreeMap<String, String>,
}

impl TraceEvent {
    fn field<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.fields.get(key)?.parse().ok()
    }

    fn ts_ns(&self) -> Option<u64> {
        self.field("ts_ns")
    }

    fn is(&self, name: &str, prog_id: u32) -> bool {
        self.name == name && self.field::<u32>("prog_id") == Some(prog_id)
    }
}

/// Parses `  task-pid  [001] d.h1.  12.345678: event_name: k=v k=v`; lines
/// of other shapes (bpf_printk output of the demo, headers) are skipped.
pub fn parse(text: &str) -> Vec<TraceEvent> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<TraceEvent> {
    let open = line.find(" [")?;
    let close = open + line[open..].find(']')?;
    let cpu = line[open + 2..close].trim().parse().ok()?;
    // After the timestamp: "event_name: payload".
    let rest = &line[close..];
    let (_, after_ts) = rest.split_once(": ")?;
    let (name, payload) = after_ts.split_once(": ")?;
    if name.contains(char::is_whitespace) {
        return None;
    }
    let fields = payload
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some(TraceEvent { cpu, name: name.to_owned(), fields })
}

/// Finds the events of the terminate call on `prog_id` that user space made
/// between `called_ns` and `returned_ns` (its own CLOCK_MONOTONIC stamps
/// around bpf()). `None` when the kernel traced no such request.
pub fn find_termination(
    events: &[TraceEvent],
    prog_id: u32,
    called_ns: u64,
    returned_ns: u64,
) -> Option<KernelTermination> {
    // Per-CPU trace buffers are merged by the trace clock, which need not
    // agree across CPUs: order by the events' own CLOCK_MONOTONIC stamps.
    let request_ns = events
        .iter()
        .filter(|e| e.is("bpf_prog_terminate_request", prog_id))
        .filter_map(TraceEvent::ts_ns)
        .find(|t| (called_ns..=returned_ns).contains(t))?;
    let after: Vec<&TraceEvent> =
        events.iter().filter(|e| e.ts_ns().is_some_and(|t| t >= request_ns)).collect();
    let done = after
        .iter()
        .copied()
        .filter(|e| e.is("bpf_prog_terminate_done", prog_id))
        .min_by_key(|e| e.ts_ns());
    let done_ns = done.and_then(TraceEvent::ts_ns);
    let handlers = handlers(&after, prog_id, Reason::Request, |t| done_ns.is_none_or(|d| t <= d));
    let mut termination = KernelTermination {
        reason: Reason::Request,
        request_ns: Some(request_ns),
        ret: done.and_then(|e| e.field("ret")),
        done_ns,
        handlers,
        returns: Vec::new(),
        helper_returns: Vec::new(),
    };
    follow_to_return(&mut termination, &after, prog_id);
    Some(termination)
}

/// Finds the run of `prog_id` that the kernel stopped for exceeding its
/// runtime budget while a trigger's run lasted, `start_ns..=end_ns` (the
/// trigger's stamps around the syscall that ran it). `None` when it was not.
pub fn find_budget_termination(
    events: &[TraceEvent],
    prog_id: u32,
    start_ns: u64,
    end_ns: u64,
) -> Option<KernelTermination> {
    let during: Vec<&TraceEvent> =
        events.iter().filter(|e| e.ts_ns().is_some_and(|t| t >= start_ns)).collect();
    let handlers = handlers(&during, prog_id, Reason::Budget, |t| t <= end_ns);
    if handlers.is_empty() {
        return None;
    }
    let mut termination = KernelTermination {
        reason: Reason::Budget,
        request_ns: None,
        ret: None,
        done_ns: None,
        handlers,
        returns: Vec::new(),
        helper_returns: Vec::new(),
    };
    follow_to_return(&mut termination, &during, prog_id);
    Some(termination)
}

/// The bpf:bpf_prog_terminate events of `prog_id` for `reason` among
/// `events`, at times `in_window` accepts.
fn handlers(
    events: &[&TraceEvent],
    prog_id: u32,
    reason: Reason,
    in_window: impl Fn(u64) -> bool,
) -> Vec<HandlerEvent> {
    events
        .iter()
        .filter(|e| {
            e.is("bpf_prog_terminate", prog_id)
                && e.fields.get("reason").map(String::as_str) == Some(reason.as_str())
        })
        .filter(|e| e.ts_ns().is_some_and(&in_window))
        .filter_map(|e| {
            Some(HandlerEvent {
                cpu: e.cpu,
                case: e.field("case")?,
                frames: e.field("frames")?,
                lost: e.field("lost")?,
                sent_ns: e.field("sent_ns").filter(|&t: &u64| t != 0),
                entry_ns: e.field("entry_ns"),
                ts_ns: e.ts_ns()?,
            })
        })
        .collect()
}

/// Adds, for each CPU a handler stopped, when the terminated run returned
/// there and, in case 1, when the interrupted slow demo helper returned.
fn follow_to_return(termination: &mut KernelTermination, after: &[&TraceEvent], prog_id: u32) {
    for handler in &termination.handlers {
        let on_cpu = || {
            after
                .iter()
                .filter(|e| e.cpu == handler.cpu)
                .filter_map(|e| Some((e, e.ts_ns()?)))
                .filter(|(_, t)| *t >= handler.ts_ns)
        };
        let Some(ret) = on_cpu()
            .filter(|(e, _)| e.is("bpf_prog_terminated_return", prog_id))
            .map(|(_, t)| t)
            .min()
        else {
            continue;
        };
        termination.returns.push(CpuTime { cpu: handler.cpu, ts_ns: ret });
        if handler.case == 1 {
            let helper = on_cpu()
                .filter(|(e, t)| e.name == "bpf_termination_demo_delay_done" && *t <= ret)
                .map(|(_, t)| t)
                .max();
            termination
                .helper_returns
                .extend(helper.map(|ts_ns| CpuTime { cpu: handler.cpu, ts_ns }));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    // Lines as the patched 6.12 kernel prints them (taken from a guest run).
    const CASE1: &str = "\
 agent-61      [000] .....    20.100000: bpf_prog_terminate_request: prog_id=7 flags=0x0 ts_ns=20100000100
 trigger-70    [001] d.h1.    20.100020: bpf_prog_terminate: prog_id=7 case=1 frames=1 lost=0 func=0 insn=1 reason=request sent_ns=20100005000 entry_ns=20100015000 ts_ns=20100020000
 agent-61      [000] .....    20.100030: bpf_prog_terminate_done: prog_id=7 ret=1 ts_ns=20100030000
 trigger-70    [001] ...11    20.900000: bpf_trace_printk: loops: second slow helper call
 trigger-70    [001] ...11    20.800000: bpf_termination_demo_delay_done: delay_ms=1000 ts_ns=20800000000
 trigger-70    [001] ...11    20.800010: bpf_prog_terminated_return: prog_id=7 ts_ns=20800010000
";

    #[test]
    fn parses_event_lines_and_skips_others() {
        let events = parse("# tracer: nop\n#\n".to_owned().as_str());
        assert!(events.is_empty());
        let events = parse(CASE1);
        assert_eq!(events.len(), 6);
        assert_eq!(events[1].cpu, 1);
        assert_eq!(events[1].name, "bpf_prog_terminate");
        assert_eq!(events[1].fields["frames"], "1");
        assert_eq!(events[3].name, "bpf_trace_printk");
    }

    #[test]
    fn matches_a_case1_termination_with_its_helper_return() {
        let events = parse(CASE1);
        let t = find_termination(&events, 7, 20_100_000_000, 20_100_040_000).expect("found");
        assert_eq!(t.request_ns, Some(20_100_000_100));
        assert_eq!(t.reason, Reason::Request);
        assert_eq!(t.ret, Some(1));
        assert_eq!(t.ipi_sent_ns(), Some(20_100_005_000));
        assert_eq!(t.handler_entry_ns(), Some(20_100_015_000));
        assert_eq!(t.stopped_ns(), Some(20_100_020_000));
        assert_eq!(t.helper_returned_ns(), Some(20_800_000_000));
        assert_eq!(t.returned_ns(), Some(20_800_010_000));
        assert_eq!(t.handlers[0].case, 1);
    }

    #[test]
    fn a_request_outside_the_call_window_or_of_another_program_is_not_matched() {
        let events = parse(CASE1);
        assert!(find_termination(&events, 7, 20_200_000_000, 20_300_000_000).is_none());
        assert!(find_termination(&events, 8, 20_100_000_000, 20_100_040_000).is_none());
    }

    #[test]
    fn a_failed_request_has_no_handlers() {
        let text = " agent-61 [000] ..... 5.0: bpf_prog_terminate_request: prog_id=3 flags=0x0 ts_ns=5000\n agent-61 [000] ..... 5.0: bpf_prog_terminate_done: prog_id=3 ret=-3 ts_ns=6000\n";
        let t = find_termination(&parse(text), 3, 4000, 7000).expect("found");
        assert_eq!(t.ret, Some(-3));
        assert!(t.handlers.is_empty() && t.returns.is_empty());
        assert_eq!(t.stopped_ns(), None);
    }

    /// A budget stop inside a slow helper (case 1), then an unrelated request.
    pub(crate) const BUDGET: &str = "\
 trigger-80    [001] d.h1.    30.300000: bpf_prog_terminate: prog_id=9 case=1 frames=2 lost=0 reason=budget ts_ns=30300000000
 trigger-80    [001] ...11    30.302000: bpf_termination_demo_delay_done: delay_ms=2 ts_ns=30302000000
 trigger-80    [001] ...11    30.302010: bpf_prog_terminated_return: prog_id=9 ts_ns=30302010000
 agent-61      [000] .....    31.000000: bpf_prog_terminate_request: prog_id=9 flags=0x0 ts_ns=31000000000
 trigger-81    [001] d.h1.    31.000020: bpf_prog_terminate: prog_id=9 case=2 frames=0 lost=0 reason=request ts_ns=31000020000
 agent-61      [000] .....    31.000030: bpf_prog_terminate_done: prog_id=9 ret=1 ts_ns=31000030000
";

    #[test]
    fn matches_a_budget_stop_to_the_run_it_happened_in() {
        let events = parse(BUDGET);
        let t = find_budget_termination(&events, 9, 30_000_000_000, 30_302_020_000).expect("found");
        assert_eq!((t.reason, t.request_ns, t.ret), (Reason::Budget, None, None));
        assert_eq!(t.stopped_ns(), Some(30_300_000_000));
        // A line of a kernel before patch 0019: no sent or entry stamps.
        assert_eq!((t.ipi_sent_ns(), t.handler_entry_ns()), (None, None));
        assert_eq!(t.helper_returned_ns(), Some(30_302_000_000));
        assert_eq!(t.returned_ns(), Some(30_302_010_000));
        // Not in another run's window, not for another program.
        assert!(find_budget_termination(&events, 9, 30_400_000_000, 32_000_000_000).is_none());
        assert!(find_budget_termination(&events, 8, 30_000_000_000, 30_302_020_000).is_none());
    }

    #[test]
    fn a_request_does_not_claim_a_budget_stop_and_vice_versa() {
        let events = parse(BUDGET);
        let request =
            find_termination(&events, 9, 30_000_000_000, 31_000_010_000).expect("request found");
        assert_eq!(request.handlers.len(), 1);
        assert_eq!(request.handlers[0].case, 2);
        assert!(find_termination(&events, 9, 30_000_000_000, 30_999_000_000).is_none());
    }
}
