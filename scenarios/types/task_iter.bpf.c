// SPDX-License-Identifier: GPL-2.0
/*
 * BPF iterator programs over every task (SEC("iter/task")): a read of the iterator's pinned
 * link (the loader pins it at /sys/fs/bpf/FUNCTION) runs the program once per task, and the
 * reader gets what the runs wrote with bpf_seq_printf(). Each run writes one record of two
 * lines, "begin PID SLOW" and "end PID SLOW"; for the reader's own task (SLOW 1) it calls the
 * slow helper in between, so a terminate lands there.
 *
 * What ran is counted in global variables, read by `bpf_loader globals` around the read:
 * slow_runs, the runs that reached the slow helper; reader_ends, those that got past it with
 * real helpers (in the termination copy bpf_get_current_pid_tgid() is a stub that returns a
 * constant, never the reader's ids).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

__u64 runs, slow_runs, reader_ends;

static __always_inline int task_record(struct bpf_iter__task *ctx, const char *who)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	__u32 reader = bpf_get_current_pid_tgid() >> 32;
	int slow;

	/* The iteration's last call has no task. */
	if (!task)
		return 0;
	runs++;
	slow = task->pid == reader;
	BPF_SEQ_PRINTF(seq, "begin %d %d\n", task->pid, slow);
	if (slow) {
		slow_runs++;
		bpf_printk("%s: reader %u in the slow helper", who, reader);
		bpf_get_numa_node_id();
		reader_ends += bpf_get_current_pid_tgid() >> 32 == reader;
	}
	BPF_SEQ_PRINTF(seq, "end %d %d\n", task->pid, slow);
	return 0;
}

/*
 * The kernel's verdict for a stopped iterator run (patch 0027): 1, retry the object. The
 * read drops the stopped run's "begin" and shows the reader's task again on the next read,
 * which runs the original: the reader gets every record whole, its own once.
 */
SEC("iter/task")
int it_tasks(struct bpf_iter__task *ctx)
{
	return task_record(ctx, "it_tasks");
}

/*
 * The same, with the verdict declared 0 in its BTF: skip the object. The read goes on past
 * the stopped run, whose "begin" stays without its "end": the record cut short that the
 * default verdict avoids.
 */
SEC("iter/task")
__attribute__((btf_decl_tag("term_verdict:0")))
int it_tasks_skip(struct bpf_iter__task *ctx)
{
	return task_record(ctx, "it_tasks_skip");
}

/* An iterator returns 0 or 1: a declared 2 is refused at load with EINVAL. */
SEC("iter/task")
__attribute__((btf_decl_tag("term_verdict:2")))
int it_bad_verdict(struct bpf_iter__task *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
