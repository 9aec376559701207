// SPDX-License-Identifier: GPL-2.0
/*
 * A cgroup/sysctl program for the full guest kernel: it runs when a task of its cgroup reads
 * or writes a file under /proc/sys, calls the slow helper
 * (kernel.bpf_termination_demo_delay_ms), and allows the access. Its copy allows too, so a
 * terminated run is refused only because the kernel returns 0 (deny) for a stopped program
 * of a cgroup hook that allows or denies (patch 0018).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

__u64 runs, after_delay;

SEC("cgroup/sysctl")
int sysctl_slow(struct bpf_sysctl *ctx)
{
	runs++;
	bpf_printk("sysctl_slow: in the slow helper");
	bpf_get_numa_node_id();
	/* Counted only where the helper really ran: its stub in the copy returns -1. */
	after_delay += bpf_get_numa_node_id() != -1;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
