/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The termination fields that termlab's patched kernel appends to struct
 * bpf_prog_info (guest-kernel/patches/0011, 0014): linux-libc-dev's headers predate
 * them. The base struct is the same as 6.12's up to its final padding.
 */
#ifndef BPF_TERM_INFO_H
#define BPF_TERM_INFO_H

#include <linux/bpf.h>
#include <linux/types.h>

struct termlab_prog_info {
	struct bpf_prog_info base;
	__u32 nr_term_jited_ksyms;
	__u32 nr_term_insn_offs;
	__aligned_u64 term_jited_ksyms;		/* __u64[nr_term_jited_ksyms] */
	__aligned_u64 term_jited_func_lens;	/* __u32[nr_term_jited_ksyms] */
	__aligned_u64 term_insn_offs;		/* struct termlab_term_insn_off[] */
	__u64 nr_terminated_on_demand;		/* runs stopped by BPF_PROG_TERMINATE */
	__u64 nr_terminated_budget;		/* runs stopped by their runtime budget */
	__u64 last_terminated_ns;		/* CLOCK_BOOTTIME, 0: never */
	__u32 runtime_budget_ms;		/* 0: kernel.bpf_max_runtime_ms */
	__u32 :32;
} __attribute__((aligned(8)));

/* struct bpf_term_insn_off */
struct termlab_term_insn_off {
	__u32 func;
	__u32 insn;
	__u32 prog_off;
	__u32 copy_off;
};

#endif /* BPF_TERM_INFO_H */
