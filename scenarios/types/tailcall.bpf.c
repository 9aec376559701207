// SPDX-License-Identifier: GPL-2.0
/*
 * A chain of tail calls in kprobe programs on the full kernel, written the way BPF
 * programs are written today: CO-RE against the full guest kernel's vmlinux.h, the
 * jump table initialized by libbpf (it puts `worker` in slot 0 at load). `dispatch`, on
 * ksys_sync, tail-calls `worker`, which runs two_parts.h's two slow parts. A tail call
 * does not return: `dispatch` counts `fell_through` only if the call failed, or if its
 * run was redirected into its termination copy before the call (where the tail call
 * falls through, patch 0024).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "jump_table.h"
#include "two_parts.h"

__u64 dispatched, entered, fell_through;

SEC("kprobe")
int worker(struct pt_regs *ctx)
{
	struct task_struct *task = (void *)bpf_get_current_task();

	entered++;
	return two_slow_parts("tail-call worker", BPF_CORE_READ(task, tgid));
}

JUMP_TABLE(jump_table, worker);

SEC("kprobe/ksys_sync")
int BPF_KPROBE(dispatch)
{
	dispatched++;
	bpf_tail_call(ctx, &jump_table, 0);
	fell_through++;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
