// SPDX-License-Identifier: GPL-2.0
/*
 * A kprobe program on ksys_sync loaded the usual libbpf way: by its own user-space loader
 * (skeleton.c) through the skeleton `bpftool gen skeleton` makes of this object
 * (skeleton.skel.h), which termlab builds for the scenario's `loader_source`.
 *
 * The loader configures the program before loading it, as skeleton users do, through a
 * read-only global: each run adds `weight` to `weighted_runs`. two_parts.h counts which
 * parts of each run really ran.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

/* Set by the loader through skel->rodata before load; frozen from then on. */
const volatile __u64 weight = 1;
__u64 weighted_runs;

SEC("kprobe/ksys_sync")
int BPF_KPROBE(skel_sync)
{
	struct task_struct *task = (void *)bpf_get_current_task();

	weighted_runs += weight;
	return two_slow_parts("skeleton skel_sync", BPF_CORE_READ(task, tgid));
}

char LICENSE[] SEC("license") = "GPL";
