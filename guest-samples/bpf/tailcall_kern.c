// SPDX-License-Identifier: GPL-2.0
/*
 * A program with a tail call: the termination copy turns the tail call into
 * a jump past it, so a run stopped before it does not enter another program
 * (patch 0024). The jump table stays empty, so the tail call falls through
 * and a run completes normally: two slow helpers, like the loops demo.
 */
#include "loops_bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} jump_table SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getpgid")
int tailcall(struct syscall_enter_ctx *ctx)
{
	if (!is_trigger(ctx, LOOPS_MAGIC_TAILCALL))
		return 0;
	record_entry();
	record_first_done(bpf_get_numa_node_id());
	bpf_tail_call(ctx, &jump_table, 0);
	record_second_done(bpf_get_numa_node_id());
	record_exit();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
