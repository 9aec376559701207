//! The kernel's own account of one termination, as result.json and
//! bench.json record it: built by [`crate::kernel_trace`] from the `bpf:`
//! trace events, read by the evaluation and the reports.

use serde::{Deserialize, Serialize};

/// Why the kernel stopped a run: the `reason` of bpf:bpf_prog_terminate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// BPF_PROG_TERMINATE.
    Request,
    /// The run exceeded its runtime budget.
    Budget,
}

impl Reason {
    /// The value of the trace event's `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Request => "request",
            Reason::Budget => "budget",
        }
    }
}

/// What the kernel reported about one BPF_PROG_TERMINATE call, or about one
/// run it stopped for its budget (then there is no request, return or done).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelTermination {
    pub reason: Reason,
    pub request_ns: Option<u64>,
    /// The call's return value (CPUs stopped, or -errno).
    pub ret: Option<i32>,
    pub done_ns: Option<u64>,
    /// One per CPU the handler moved to the copy.
    pub handlers: Vec<HandlerEvent>,
    /// The first return of a terminated run on each handler CPU.
    pub returns: Vec<CpuTime>,
    /// Case 1: on each CPU that was inside a slow demo helper, when that
    /// helper returned into the copy.
    pub helper_returns: Vec<CpuTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerEvent {
    pub cpu: u32,
    /// 1: the CPU was in a helper; 2: in BPF text.
    pub case: u32,
    /// Stack words redirected into the copy.
    pub frames: u32,
    /// Old-image addresses without an equivalent in the copy.
    pub lost: u32,
    /// When the caller sent the IPI that ran this handler (kernels with patch 0019; none
    /// for the budget's tick, which nobody sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ns: Option<u64>,
    /// When this handler began (kernels with patch 0019).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_ns: Option<u64>,
    /// When this handler was done.
    pub ts_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTime {
    pub cpu: u32,
    pub ts_ns: u64,
}

impl KernelTermination {
    /// The last CPU's handler finished: the mechanism is done.
    pub fn stopped_ns(&self) -> Option<u64> {
        self.handlers.iter().map(|h| h.ts_ns).max()
    }

    /// The IPI round that reached the last handler was sent.
    pub fn ipi_sent_ns(&self) -> Option<u64> {
        self.handlers.iter().filter_map(|h| h.sent_ns).max()
    }

    /// The last CPU's handler began.
    pub fn handler_entry_ns(&self) -> Option<u64> {
        self.handlers.iter().filter_map(|h| h.entry_ns).max()
    }

    /// The last terminated run returned.
    pub fn returned_ns(&self) -> Option<u64> {
        self.returns.iter().map(|r| r.ts_ns).max()
    }

    /// The last interrupted helper returned (case 1 only).
    pub fn helper_returned_ns(&self) -> Option<u64> {
        self.helper_returns.iter().map(|r| r.ts_ns).max()
    }
}
