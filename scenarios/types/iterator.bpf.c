// SPDX-License-Identifier: GPL-2.0
/*
 * An open-coded iterator loop (bpf_iter_num_*, what libbpf's bpf_for() expands to) in a
 * kprobe program on ksys_sync, CO-RE against the full guest kernel's vmlinux.h. Each of
 * ITERATIONS iterations counts itself, then calls the slow helper
 * (kernel.bpf_termination_demo_delay_ms). A stopped run must leave the loop at its next
 * test instead of running the remaining iterations in the termination copy, where the
 * helper is a stub and they would only cost time: bpf_iter_num_next() returns NULL there,
 * the iterator's end (patch 0004).
 *
 * Debian 12's libbpf (1.1) predates bpf_for(), so the kfuncs are declared here.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define ITERATIONS 3

extern int bpf_iter_num_new(struct bpf_iter_num *it, int start, int end) __weak __ksym;
extern int *bpf_iter_num_next(struct bpf_iter_num *it) __weak __ksym;
extern void bpf_iter_num_destroy(struct bpf_iter_num *it) __weak __ksym;

/*
 * Runs; their iterations; runs whose loop made all ITERATIONS; runs that got past it. The
 * latest run's iterations are counted in memory (this_run), not in a register: a counter
 * the program compares after the loop would be tracked exactly by the verifier, which
 * could then never find two iterations' states equal and would walk the loop to its
 * complexity limit.
 */
__u64 runs, iterations, full_loops, after_loop, this_run;

SEC("kprobe/ksys_sync")
int BPF_KPROBE(iterate)
{
	struct bpf_iter_num it;

	runs++;
	this_run = 0;
	bpf_printk("iterate: entering the loop");
	bpf_iter_num_new(&it, 0, ITERATIONS);
	while (bpf_iter_num_next(&it)) {
		this_run++;
		iterations++;
		bpf_get_numa_node_id();
	}
	bpf_iter_num_destroy(&it);
	full_loops += this_run == ITERATIONS;
	after_loop++;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
