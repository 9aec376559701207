// SPDX-License-Identifier: GPL-2.0
/*
 * A program that looks up the vma of its task's text with bpf_find_vma() at sync(2)'s
 * entry (kprobe). The callback calls the slow helper twice (two_parts.h) while
 * bpf_find_vma() holds the task's mmap lock for reading, and its CPU's guard for a
 * deferred unlock.
 *
 * Terminated inside the callback, the run's frames move to the copy: the callback finishes
 * there, its helpers stubbed, and returns into bpf_find_vma(), which must still unlock.
 * Were the lock kept, the process could never exit (exit_mmap() takes it for writing); were
 * the guard kept, the next bpf_find_vma() on that CPU would answer -EBUSY.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

/* found: runs whose bpf_find_vma() returned 0 (the callback ran); after_find: runs whose
 * helper after it really ran.
 */
__u64 found, after_find;

struct vma_ctx {
	__u32 tgid;
};

static long in_vma(struct task_struct *task, struct vm_area_struct *vma, void *data)
{
	struct vma_ctx *ctx = data;

	two_slow_parts("find_vma in_vma", ctx->tgid);
	return 0;
}

SEC("kprobe/ksys_sync")
int BPF_KPROBE(find_text_vma)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct vma_ctx where = { .tgid = BPF_CORE_READ(task, tgid) };
	long ret;

	ret = bpf_find_vma(task, BPF_CORE_READ(task, mm, start_code), in_vma, &where, 0);
	found += ret == 0;
	after_find += bpf_get_current_pid_tgid() >> 32 == where.tgid;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
