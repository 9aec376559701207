// SPDX-License-Identifier: GPL-2.0
/*
 * The tail-call chain of tailcall.bpf.c in fentry programs, which a BPF trampoline runs:
 * `dispatch`, on ksys_sync, tail-calls `worker` (on the same function, as a prog array of
 * tracing programs requires), which runs two_parts.h's two slow parts. The trampoline
 * ignores an fentry program's return value, so both have a termination copy, and a run in
 * `worker` is stopped there (patches 0024, 0025). tailcall_lsm.bpf.c is the chain whose
 * verdict the trampoline takes.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "jump_table.h"
#include "two_parts.h"

__u64 dispatched, entered, fell_through;

SEC("fentry/ksys_sync")
int BPF_PROG(worker)
{
	entered++;
	return two_slow_parts("fentry tail-call worker", bpf_get_current_pid_tgid() >> 32);
}

JUMP_TABLE(jump_table, worker);

SEC("fentry/ksys_sync")
int BPF_PROG(dispatch)
{
	dispatched++;
	bpf_tail_call(ctx, &jump_table, 0);
	fell_through++;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
