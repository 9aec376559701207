// SPDX-License-Identifier: GPL-2.0
/*
 * A sched_ext scheduler (struct_ops) whose enqueue callback gets stuck: one global FIFO, as
 * the smallest BPF scheduler is, except that the first enqueue of a task named "scx_slow"
 * first takes two calls of the slow helper (kernel.bpf_termination_demo_delay_ms).
 * sched_ext.c loads and attaches it, and in its `nap` mode is that task: it names itself,
 * sleeps and wakes up.
 *
 * ops.enqueue runs under the runqueue's lock, with interrupts off. two_parts.h counts which
 * parts of a stuck run ran; `runs` counts only the scx_slow tasks' first enqueues, so a run
 * of the next trigger shows this scheduler still enqueued it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

/* sched_ext's kfunc of 6.12 (renamed scx_bpf_dsq_insert() in 6.13). */
void scx_bpf_dispatch(struct task_struct *p, u64 dsq_id, u64 slice, u64 enq_flags) __ksym;

static __always_inline bool is_slow_task(const struct task_struct *p)
{
	static const char name[] = "scx_slow";

	for (int i = 0; i < sizeof(name); i++)
		if (p->comm[i] != name[i])
			return false;
	return true;
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
	if (is_slow_task(p) && p->pid != slow_pid) {
		slow_pid = p->pid;
		struct task_struct *task = (void *)bpf_get_current_task();

		two_slow_parts("sched_ext enqueue", BPF_CORE_READ(task, tgid));
	}
	scx_bpf_dispatch(p, SCX_DSQ_GLOBAL, SCX_SLICE_DFL, enq_flags);
}

SEC(".struct_ops.link")
struct sched_ext_ops termlab_ops = {
	.enqueue = (void *)scx_enqueue,
	.name = "termlab",
};

char LICENSE[] SEC("license") = "GPL";
