// SPDX-License-Identifier: GPL-2.0
/*
 * A sched_ext scheduler (struct_ops) whose callbacks get stuck: one global FIFO, as the
 * smallest BPF scheduler is, except that
 *  - ops.init_task of a task forked by a task named "scx_fork" first takes two calls of the
 *    slow helper (kernel.bpf_termination_demo_delay_ms). It runs in the parent, in fork(),
 *    with interrupts on: terminate stops it there.
 *  - ops.enqueue of a task named "scx_slow" does the same, once per task. It runs under the
 *    runqueue's lock, with interrupts off, where no IPI lands: terminate answers EBUSY.
 * sched_ext.c loads and attaches it, and in its `fork` and `nap` modes is those tasks.
 *
 * two_parts.h counts which parts of a stuck run ran; `runs` counts only the stuck runs, so a
 * run of the next trigger shows that this scheduler still served it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

/* sched_ext's kfunc of 6.12 (renamed scx_bpf_dsq_insert() in 6.13). */
void scx_bpf_dispatch(struct task_struct *p, u64 dsq_id, u64 slice, u64 enq_flags) __ksym;

static __always_inline bool is_named(const struct task_struct *p, const char *name, int size)
{
	for (int i = 0; i < size; i++)
		if (p->comm[i] != name[i])
			return false;
	return true;
}

static const char fork_task[] = "scx_fork", slow_task[] = "scx_slow";

/* What a stopped run returns: the copy's own return value, 0, so the fork goes on. */
SEC("struct_ops/scx_init_task")
s32 BPF_PROG(scx_init_task, struct task_struct *p, struct scx_init_task_args *args)
{
	/* A forked task has its parent's name; current is the parent. */
	if (args->fork && is_named(p, fork_task, sizeof(fork_task))) {
		struct task_struct *task = (void *)bpf_get_current_task();

		two_slow_parts("sched_ext init_task", BPF_CORE_READ(task, tgid));
	}
	return 0;
}

/* The scx_slow task the callback was last slow for: once per task. */
pid_t slow_pid;

SEC("struct_ops/scx_enqueue")
void BPF_PROG(scx_enqueue, struct task_struct *p, u64 enq_flags)
{
	/*
	 * Once per task: a task is enqueued again whenever its slice runs out or another class
	 * takes its CPU, which under emulation can happen to the nap task too.
	 */
	if (is_named(p, slow_task, sizeof(slow_task)) && p->pid != slow_pid) {
		slow_pid = p->pid;
		struct task_struct *task = (void *)bpf_get_current_task();

		two_slow_parts("sched_ext enqueue", BPF_CORE_READ(task, tgid));
	}
	scx_bpf_dispatch(p, SCX_DSQ_GLOBAL, SCX_SLICE_DFL, enq_flags);
}

SEC(".struct_ops.link")
struct sched_ext_ops termlab_ops = {
	.init_task = (void *)scx_init_task,
	.enqueue = (void *)scx_enqueue,
	.name = "termlab",
};

char LICENSE[] SEC("license") = "GPL";
