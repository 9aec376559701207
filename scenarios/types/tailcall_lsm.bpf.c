// SPDX-License-Identifier: GPL-2.0
/*
 * The tail-call chain of tailcall_fentry.bpf.c in BPF LSM programs on task_setnice (for nice
 * 9 only): `lsm_dispatch` tail-calls `lsm_worker`, which runs two_parts.h's two slow parts.
 * The trampoline takes an LSM program's verdict from its return value, which for a stopped
 * run its copy returns: a run stopped in the target would return the target's. So a program
 * whose verdict the trampoline takes gets no copy when it tail-calls; its runs are recorded,
 * and its tail call hands them over to `lsm_worker` marked unstoppable (patches 0024, 0025).
 * Its own object: libbpf fills every prog array of an object it loads, and the generic
 * loader loads only the programs a scenario names.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "jump_table.h"
#include "two_parts.h"

__u64 dispatched, entered, fell_through;

SEC("lsm/task_setnice")
int BPF_PROG(lsm_worker, struct task_struct *p, int nice)
{
	entered++;
	return two_slow_parts("lsm tail-call worker", bpf_get_current_pid_tgid() >> 32);
}

JUMP_TABLE(jump_table, lsm_worker);

SEC("lsm/task_setnice")
int BPF_PROG(lsm_dispatch, struct task_struct *p, int nice)
{
	if (nice != 9)
		return 0;
	dispatched++;
	bpf_tail_call(ctx, &jump_table, 0);
	fell_through++;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
