//! The verdict on a termination's stack rewrite, as result.json records it
//! (`verify_stack`): built by [`crate::stack_proof::verify`] from the VMM's
//! snapshots, rendered by the reports.

use serde::{Deserialize, Serialize};

/// Where an address points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AddrClass {
    /// Into function `func` of the original program.
    Original {
        func: usize,
        offset: u32,
    },
    /// Into function `func` of the termination copy.
    Copy {
        func: usize,
        offset: u32,
    },
    /// The entry of function `func` of the original program, held in a stack slot: a
    /// function pointer (the callback a helper such as `bpf_user_ringbuf_drain()` or
    /// `bpf_find_vma()` keeps in its C frame), not a return address, which always follows
    /// a call instruction of the same image. The handler rewrites return addresses only:
    /// such a slot keeps the original's entry, and the helper checks the stop flag before
    /// each call of it (patch 0007).
    OriginalEntry {
        func: usize,
    },
    KernelText,
    Other,
}

impl AddrClass {
    pub fn is_original(self) -> bool {
        matches!(self, AddrClass::Original { .. })
    }
}

/// One stack slot, before and after the handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WordRow {
    pub addr: u64,
    pub before: u64,
    pub after: u64,
    pub before_class: AddrClass,
    pub after_class: AddrClass,
    /// For an original-image word: the copy address the map predicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<u64>,
    /// `symbol+0xoff` of each value, empty for data.
    #[serde(default)]
    pub before_at: String,
    #[serde(default)]
    pub after_at: String,
}

/// The verdict on one CPU's rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackVerdict {
    /// 1: the IP was outside the program (in a helper); 2: in BPF text.
    pub case: u32,
    pub ip_before: u64,
    pub ip_after: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_predicted: Option<u64>,
    /// Original-image words before / after, words rewritten.
    pub original_before: usize,
    pub original_after: usize,
    pub rewritten: usize,
    /// Only the slots that matter: every code address, and every changed word.
    pub rows: Vec<WordRow>,
    /// Empty when the rewrite is proven correct.
    pub problems: Vec<String>,
}

impl StackVerdict {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What the VMM saw on one vCPU during one terminate call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuStackProof {
    pub vcpu: usize,
    /// The judgement of the rewrite; `None` when the snapshots are incomplete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<StackVerdict>,
    /// Why there is no verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kernel's handler ran on this vCPU and returned without rewriting anything: it
    /// found no run it could stop there (the run had left, or cannot be stopped where it
    /// is). No verdict and no error: whether that was right depends on what the call
    /// answered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub untouched: bool,
}
