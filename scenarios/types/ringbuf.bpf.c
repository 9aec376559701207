// SPDX-License-Identifier: GPL-2.0
/*
 * A program that holds a ring buffer reservation across its slow helpers: at sync(2)'s
 * entry (kprobe, ftrace-based) it reserves a record, calls the slow helper twice
 * (kernel.bpf_termination_demo_delay_ms) while it holds it, then submits it.
 *
 * The verifier makes every path submit or discard a reservation; the termination copy
 * keeps both calls (they release it), so a run stopped while it holds one still hands it
 * over. Were the submit stubbed, the record would stay reserved: the consumer would never
 * get past it, nor get any later record (`bpf_loader globals` prints the bytes it is held
 * back by as rb_pending).
 *
 * two_parts.h's counters say which parts of each run really ran.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

struct record {
	__u32 tgid;
	__u32 parts;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} rb SEC(".maps");

__u64 reserved;

SEC("kprobe/ksys_sync")
int BPF_KPROBE(rb_hold)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	__u32 tgid = BPF_CORE_READ(task, tgid);
	struct record *record;

	record = bpf_ringbuf_reserve(&rb, sizeof(*record), 0);
	if (!record)
		return 0;
	reserved++;
	record->tgid = tgid;
	two_slow_parts("ringbuf rb_hold", tgid);
	record->parts = first_part + second_part;
	bpf_ringbuf_submit(record, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
