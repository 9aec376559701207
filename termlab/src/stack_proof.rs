//! Checking a termination's stack rewrite from outside the guest (issue 6).
//!
//! The VMM stops the vCPU at the entry of the kernel's termination handler
//! (`bpf_die`) and again when it returns, and reads the interrupted context
//! each time: its saved IP and every word from its stack pointer to the top
//! of its stack. This module judges the two snapshots against the kernel's
//! own instruction map of the program and its termination copy (printed in
//! the guest by `prog_term_map`, from `bpf_prog_info`):
//!
//! * before: at least one word (or the IP) points into the original image,
//!   else the rewrite was not exercised and nothing is proven;
//! * after: no word points into the original image, except a function's
//!   entry: a callback pointer a helper keeps in its frame (data, never a
//!   return address, which follows a call in the same image), which must
//!   stay as it was;
//! * every word that changed was an original-image address and became
//!   exactly the copy address the map predicts; every other word is
//!   byte-identical;
//! * case 2 (IP in BPF text): the IP moved to the predicted copy address;
//!   case 1 (IP in a helper): the IP is unchanged.
//!
//! The prediction re-implements the kernel's rule from the map alone, so a
//! wrong translation in the kernel shows up as a mismatch here.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::results::stack::{AddrClass, StackVerdict, WordRow};

/// The kernel's instruction map of one program, as `prog_term_map` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermMap {
    pub prog_id: u32,
    pub funcs: Vec<FuncMap>,
}

/// One JITed function of the program and of its copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuncMap {
    pub prog_addr: u64,
    pub prog_len: u32,
    pub copy_addr: u64,
    pub copy_len: u32,
    /// `[offset in the program, offset in the copy]` where each instruction
    /// starts; the last entry is where the last instruction ends.
    pub insn_offs: Vec<[u32; 2]>,
}

impl TermMap {
    pub fn classify(&self, addr: u64, kernel_text: &Range<u64>) -> AddrClass {
        for (func, f) in self.funcs.iter().enumerate() {
            if let Some(offset) = offset_in(addr, f.prog_addr, f.prog_len) {
                return AddrClass::Original { func, offset };
            }
            if let Some(offset) = offset_in(addr, f.copy_addr, f.copy_len) {
                return AddrClass::Copy { func, offset };
            }
        }
        if kernel_text.contains(&addr) {
            AddrClass::KernelText
        } else {
            AddrClass::Other
        }
    }

    /// The copy address that original-image address `addr` must become, by
    /// the kernel's rule: prologue offsets map to themselves; the start of
    /// instruction k maps to the start of k in the copy (every return
    /// address is such a start); an address inside instruction k keeps its
    /// offset into k if k's native code is the same in both images
    /// (`same_code(func, k)`), else k restarts. `None`: no equivalent.
    pub fn predict(&self, addr: u64, same_code: &dyn Fn(usize, usize) -> bool) -> Option<u64> {
        let (func, f) = self
            .funcs
            .iter()
            .enumerate()
            .find(|(_, f)| offset_in(addr, f.prog_addr, f.prog_len).is_some())?;
        let offset = (addr - f.prog_addr) as u32;
        let offs = &f.insn_offs;
        let (first, last) = (offs.first()?, offs.last()?);
        if offset < first[0] {
            return Some(f.copy_addr + u64::from(offset));
        }
        if offset >= last[0] {
            return None;
        }
        // Largest k with prog offset <= offset (offsets ascend).
        let k = offs.partition_point(|o| o[0] <= offset) - 1;
        let delta = offset - offs[k][0];
        let copy_start = f.copy_addr + u64::from(offs[k][1]);
        if delta == 0 || !same_code(func, k) {
            return Some(copy_start);
        }
        let copy_insn_len = offs.get(k + 1)?[1] - offs[k][1];
        (delta < copy_insn_len).then(|| copy_start + u64::from(delta))
    }

    /// Where instruction `insn` of function `func` is in the program and in
    /// the copy: `(program range, copy range)`, for comparing their code.
    pub fn insn_code(&self, func: usize, insn: usize) -> Option<(Range<u64>, Range<u64>)> {
        let f = self.funcs.get(func)?;
        let (start, end) = (f.insn_offs.get(insn)?, f.insn_offs.get(insn + 1)?);
        let range = |base: u64, a: u32, b: u32| base + u64::from(a)..base + u64::from(b);
        Some((range(f.prog_addr, start[0], end[0]), range(f.copy_addr, start[1], end[1])))
    }
}

fn offset_in(addr: u64, base: u64, len: u32) -> Option<u32> {
    addr.checked_sub(base).filter(|&offset| offset < u64::from(len)).map(|offset| offset as u32)
}

/// The interrupted context of one vCPU, as read from guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackSnapshot {
    /// Saved instruction pointer (pt_regs->ip).
    pub ip: u64,
    /// The interrupted stack from its stack pointer up and, when that is an IRQ stack (a
    /// softirq was cut off), the stack below it: a run the softirq's hardirq interrupted
    /// keeps its position there, in an interrupt frame.
    pub stacks: Vec<StackWords>,
}

/// The words of one stack from `sp` up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackWords {
    /// Guest virtual address of `words[0]`.
    pub sp: u64,
    pub words: Vec<u64>,
}

/// Judges one CPU's snapshots; see the module documentation for the rules.
/// `symbol` names code addresses (`None` for data); problems and rows use it.
pub fn verify(
    before: &StackSnapshot,
    after: &StackSnapshot,
    map: &TermMap,
    kernel_text: &Range<u64>,
    same_code: &dyn Fn(usize, usize) -> bool,
    symbol: &dyn Fn(u64) -> Option<String>,
) -> StackVerdict {
    let mut judge = Judge { map, kernel_text, same_code, symbol, problems: Vec::new() };
    judge.check_shape(before, after);
    let ip_class = judge.classify(before.ip);
    let ip_predicted = judge.check_ip(before.ip, after.ip, ip_class);
    let (mut original_before, mut original_after, mut rewritten) = (0, 0, 0);
    let mut rows = Vec::new();
    for (addr, old, new) in word_pairs(before, after) {
        let (before_class, after_class, row) = judge.judge_word(addr, old, new);
        original_before += usize::from(before_class.is_original());
        original_after += usize::from(after_class.is_original());
        rewritten += usize::from(old != new);
        rows.extend(row);
    }
    if original_before == 0 && !ip_class.is_original() {
        judge.problems.push("before the handler neither the saved IP nor any stack word pointed into the program: the rewrite was not exercised".to_owned());
    }
    StackVerdict {
        case: if ip_class.is_original() { 2 } else { 1 },
        ip_before: before.ip,
        ip_after: after.ip,
        ip_predicted,
        original_before,
        original_after,
        rewritten,
        rows,
        problems: judge.problems,
    }
}

/// `(slot address, word before, word after)` for every word of the snapshots' stacks.
fn word_pairs<'a>(
    before: &'a StackSnapshot,
    after: &'a StackSnapshot,
) -> impl Iterator<Item = (u64, u64, u64)> + 'a {
    before.stacks.iter().zip(&after.stacks).flat_map(|(b, a)| {
        b.words
            .iter()
            .zip(&a.words)
            .enumerate()
            .map(|(i, (&old, &new))| (b.sp + 8 * i as u64, old, new))
    })
}

/// What [`verify`] judges against, and the problems it has found so far.
struct Judge<'a> {
    map: &'a TermMap,
    kernel_text: &'a Range<u64>,
    same_code: &'a dyn Fn(usize, usize) -> bool,
    symbol: &'a dyn Fn(u64) -> Option<String>,
    problems: Vec<String>,
}

impl Judge<'_> {
    fn classify(&self, addr: u64) -> AddrClass {
        self.map.classify(addr, self.kernel_text)
    }

    /// A stack word's class: as [`Self::classify`], but a function's entry is a callback
    /// pointer ([`AddrClass::OriginalEntry`]), not a position of the run.
    fn classify_word(&self, word: u64) -> AddrClass {
        match self.classify(word) {
            AddrClass::Original { func, offset: 0 } => AddrClass::OriginalEntry { func },
            class => class,
        }
    }

    /// The copy address an original-image address must become (`None` for any other address).
    fn predict(&self, addr: u64, class: AddrClass) -> Option<u64> {
        class.is_original().then(|| self.map.predict(addr, self.same_code)).flatten()
    }

    fn symbolize(&self, addr: u64) -> String {
        match (self.symbol)(addr) {
            Some(name) => format!("{addr:#x} ({name})"),
            None => format!("{addr:#x}"),
        }
    }

    /// Both snapshots must cover the same stacks: the handler rewrites words, it does not
    /// move the interrupted stack.
    fn check_shape(&mut self, before: &StackSnapshot, after: &StackSnapshot) {
        let shape = |snapshot: &StackSnapshot| -> Vec<String> {
            snapshot
                .stacks
                .iter()
                .map(|s| format!("sp {:#x}, {} words", s.sp, s.words.len()))
                .collect()
        };
        if shape(before) != shape(after) {
            self.problems.push(format!(
                "the interrupted stack moved between the snapshots ({} -> {})",
                shape(before).join(" + "),
                shape(after).join(" + ")
            ));
        }
    }

    /// Case 2 (IP in the program): the IP moved to its predicted copy address. Case 1: it
    /// stayed. Returns the prediction.
    fn check_ip(&mut self, before: u64, after: u64, class: AddrClass) -> Option<u64> {
        let predicted = self.predict(before, class);
        let problem = match (class.is_original(), predicted) {
            (true, Some(p)) if after != p => Some(format!(
                "saved IP {} became {}, not the predicted {}",
                self.symbolize(before),
                self.symbolize(after),
                self.symbolize(p)
            )),
            (true, None) => {
                Some(format!("saved IP {} has no equivalent in the copy", self.symbolize(before)))
            }
            (false, _) if after != before => Some(format!(
                "case 1: saved IP changed from {} to {}",
                self.symbolize(before),
                self.symbolize(after)
            )),
            _ => None,
        };
        self.problems.extend(problem);
        predicted
    }

    /// One stack slot: a changed word must have pointed into the program and become its
    /// predicted copy address, and no word may point into the program afterwards. Returns
    /// the word's classes before and after, and its row for the report unless it is data
    /// that did not change.
    fn judge_word(
        &mut self,
        addr: u64,
        old: u64,
        new: u64,
    ) -> (AddrClass, AddrClass, Option<WordRow>) {
        let (before_class, after_class) = (self.classify_word(old), self.classify_word(new));
        let predicted = self.predict(old, before_class);
        if old != new {
            match predicted {
                _ if matches!(before_class, AddrClass::OriginalEntry { .. }) => {
                    self.problems.push(format!(
                        "slot {addr:#x} held a callback pointer, {}, and became {}: the handler \
                         rewrites return addresses only",
                        self.symbolize(old),
                        self.symbolize(new)
                    ))
                }
                _ if !before_class.is_original() => self.problems.push(format!(
                    "slot {addr:#x} changed but did not point into the program: {} -> {}",
                    self.symbolize(old),
                    self.symbolize(new)
                )),
                Some(p) if p != new => self.problems.push(format!(
                    "slot {addr:#x}: {} became {}, not the predicted {}",
                    self.symbolize(old),
                    self.symbolize(new),
                    self.symbolize(p)
                )),
                _ => {}
            }
        }
        if after_class.is_original() {
            self.problems.push(format!(
                "slot {addr:#x} still points into the original program after the handler: {}",
                self.symbolize(new)
            ));
        }
        let data = |class| matches!(class, AddrClass::Other);
        let row = (old != new || !data(before_class) || !data(after_class)).then(|| {
            let at = |value| (self.symbol)(value).unwrap_or_default();
            WordRow {
                addr,
                before: old,
                after: new,
                before_class,
                after_class,
                predicted,
                before_at: at(old),
                after_at: at(new),
            }
        });
        (before_class, after_class, row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: Range<u64> = 0xffff_ffff_8100_0000..0xffff_ffff_8200_0000;
    const HELPER: u64 = 0xffff_ffff_8110_0000;
    const PROG: u64 = 0xffff_ffff_a000_0000;
    const COPY: u64 = 0xffff_ffff_a000_1000;

    /// Prologue of 0x10 bytes; insn 0 at 0x10 (call, 5 bytes in the
    /// program, a 7-byte mov in the copy); insn 1 at 0x15/0x17; end.
    fn map() -> TermMap {
        TermMap {
            prog_id: 1,
            funcs: vec![FuncMap {
                prog_addr: PROG,
                prog_len: 0x40,
                copy_addr: COPY,
                copy_len: 0x40,
                insn_offs: vec![[0x10, 0x10], [0x15, 0x17], [0x20, 0x22]],
            }],
        }
    }

    fn same_code(_: usize, insn: usize) -> bool {
        insn != 0
    }

    fn snap(ip: u64, words: &[u64]) -> StackSnapshot {
        StackSnapshot {
            ip,
            stacks: vec![StackWords { sp: 0xffff_c900_0000_3f00, words: words.to_vec() }],
        }
    }

    /// A softirq on the IRQ stack (`irq`) cut off over a run whose position is in an
    /// interrupt frame on the task stack (`task`).
    fn nested(ip: u64, irq: &[u64], task: &[u64]) -> StackSnapshot {
        StackSnapshot {
            ip,
            stacks: vec![
                StackWords { sp: 0xffff_c900_0010_3f00, words: irq.to_vec() },
                StackWords { sp: 0xffff_c900_0000_3e00, words: task.to_vec() },
            ],
        }
    }

    fn run(before: &StackSnapshot, after: &StackSnapshot) -> StackVerdict {
        verify(before, after, &map(), &TEXT, &same_code, &|_| None)
    }

    #[test]
    fn predicts_like_the_kernel() {
        let m = map();
        assert_eq!(m.predict(PROG + 0x4, &same_code), Some(COPY + 0x4), "prologue maps to itself");
        assert_eq!(
            m.predict(PROG + 0x15, &same_code),
            Some(COPY + 0x17),
            "return address: start of the next insn"
        );
        assert_eq!(
            m.predict(PROG + 0x12, &same_code),
            Some(COPY + 0x10),
            "inside a rewritten insn: restart it"
        );
        assert_eq!(
            m.predict(PROG + 0x18, &same_code),
            Some(COPY + 0x1a),
            "inside an unchanged insn: same offset"
        );
        assert_eq!(m.predict(PROG + 0x30, &same_code), None, "past the last insn: no equivalent");
        assert_eq!(m.predict(HELPER, &same_code), None);
    }

    #[test]
    fn a_correct_case1_rewrite_passes_with_its_rows() {
        let before = snap(HELPER, &[7, PROG + 0x15, HELPER + 8, 9]);
        let after = snap(HELPER, &[7, COPY + 0x17, HELPER + 8, 9]);
        let v = run(&before, &after);
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!((v.case, v.original_before, v.original_after, v.rewritten), (1, 1, 0, 1));
        assert_eq!(v.rows.len(), 2, "the rewritten slot and the kernel-text slot");
    }

    #[test]
    fn a_skipped_frame_is_caught_and_named() {
        let before = snap(HELPER, &[PROG + 0x15, PROG + 0x20 - 0x0b]);
        let after = snap(HELPER, &[PROG + 0x15, COPY + 0x17]);
        let v = run(&before, &after);
        assert!(!v.passed());
        assert!(
            v.problems.iter().any(|p| p.contains("still points into the original program")
                && p.contains(&format!("{:#x}", PROG + 0x15))),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn a_wrong_target_or_a_stray_write_is_caught() {
        let before = snap(HELPER, &[PROG + 0x15, 5]);
        let after = snap(HELPER, &[COPY + 0x15, 6]);
        let v = run(&before, &after);
        assert!(v.problems.iter().any(|p| p.contains("not the predicted")), "{:?}", v.problems);
        assert!(
            v.problems.iter().any(|p| p.contains("did not point into the program")),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn case2_moves_the_ip_and_case1_keeps_it() {
        let v = run(&snap(PROG + 0x18, &[]), &snap(COPY + 0x1a, &[]));
        assert!(v.passed() && v.case == 2, "{:?}", v.problems);
        let v = run(&snap(PROG + 0x18, &[]), &snap(PROG + 0x18, &[]));
        assert!(!v.passed());
        let v = run(&snap(HELPER, &[PROG + 0x15]), &snap(HELPER + 1, &[COPY + 0x17]));
        assert!(v.problems.iter().any(|p| p.contains("saved IP changed")));
    }

    #[test]
    fn a_run_under_a_cut_off_softirq_is_checked_on_the_stack_below() {
        // The run was inside an instruction when a hardirq came (frame: ip, cs, flags...).
        let before = nested(HELPER, &[1, 2], &[PROG + 0x18, 0x10, 0x246]);
        let after = nested(HELPER, &[1, 2], &[COPY + 0x1a, 0x10, 0x246]);
        let v = run(&before, &after);
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!((v.original_before, v.original_after, v.rewritten), (1, 0, 1));
        // Left in the original (the kernel before the fix): caught, the slot named.
        let v = run(&before, &before);
        assert!(
            v.problems.iter().any(|p| p.contains("still points into the original program")
                && p.contains("0xffffc90000003e00")),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn a_callback_pointer_in_a_helper_frame_is_data_that_must_stay() {
        // The helper's frame holds the callback's entry; the return address above it is
        // rewritten.
        let before = snap(HELPER, &[PROG, PROG + 0x15]);
        let v = run(&before, &snap(HELPER, &[PROG, COPY + 0x17]));
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!((v.original_before, v.original_after, v.rewritten), (1, 0, 1));
        assert_eq!(v.rows[0].after_class, AddrClass::OriginalEntry { func: 0 });
        // Alone it proves nothing was exercised; changed, it is a stray write.
        let v = run(&snap(HELPER, &[PROG]), &snap(HELPER, &[PROG]));
        assert!(v.problems.iter().any(|p| p.contains("not exercised")), "{:?}", v.problems);
        let v = run(&before, &snap(HELPER, &[COPY, COPY + 0x17]));
        assert!(
            v.problems.iter().any(|p| p.contains("rewrites return addresses only")),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn nothing_into_the_program_is_not_a_pass() {
        let v = run(&snap(HELPER, &[1, 2]), &snap(HELPER, &[1, 2]));
        assert!(v.problems.iter().any(|p| p.contains("not exercised")));
    }

    #[test]
    fn parses_prog_term_map_output() {
        let line = r#"{"prog_id":7,"funcs":[{"prog_addr":18446744072099905536,"prog_len":96,"copy_addr":18446744072099909632,"copy_len":90,"insn_offs":[[16,16],[21,23]]}]}"#;
        let m: TermMap = serde_json::from_str(line).expect("parses");
        assert_eq!(m.funcs[0].insn_offs[1], [21, 23]);
    }
}
