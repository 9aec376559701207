// SPDX-License-Identifier: GPL-2.0
/*
 * Programs the kernel runs from a BPF trampoline, not through bpf_prog_run(): fentry and
 * LSM. Their runs are not on the CPU's running stack and they get no termination copy,
 * so BPF_PROG_TERMINATE refuses them (EOPNOTSUPP) before looking for runs.
 *
 * fentry_sync counts, like kprobe.bpf.c, which parts of each run really ran.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "two_parts.h"

SEC("fentry/ksys_sync")
int BPF_PROG(fentry_sync)
{
	return two_slow_parts("fentry_sync", bpf_get_current_pid_tgid() >> 32);
}

/* Allows every getpgid(): a BPF LSM program that changes nothing. */
SEC("lsm/task_getpgid")
int BPF_PROG(lsm_getpgid, struct task_struct *p)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
