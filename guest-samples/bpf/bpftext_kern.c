// SPDX-License-Identifier: GPL-2.0
/*
 * Termination case 2: a run that spends its time in BPF text (a long bpf_loop()
 * whose callback does arithmetic). Its length is state.iterations, set by
 * `trigger_loops --prog bpftext --iterations N`; terminating it must end the
 * loop at its next iteration.  helper_loop, below, loops over the slow helper.
 */
#include "loops_bpf.h"

SEC("tracepoint/syscalls/sys_enter_getpgid")
int bpftext(struct syscall_enter_ctx *ctx)
{
	if (!is_trigger(ctx, LOOPS_MAGIC_BPFTEXT))
		return 0;
	record_entry();

	bpf_printk("bpftext: looping %llu times", state.iterations);
	record_second_done(spin());

	bpf_printk("bpftext: done after %llu iterations", state.iterations_done);
	record_exit();
	return 0;
}

/*
 * A busy helper loop, for the runtime budget: state.iterations calls of the
 * slow helper (kernel.bpf_termination_demo_delay_ms each) from a bpf_loop()
 * callback.  A budget stops the run inside a call (case 1) or between two
 * (case 2); either way bpf_loop() ends at its next iteration, so the run
 * returns within about one call of being stopped.
 */
static long slow_call_callback(__u64 index, void *unused)
{
	bpf_get_numa_node_id();
	state.iterations_done++;
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getpgid")
int helper_loop(struct syscall_enter_ctx *ctx)
{
	__u64 iterations = state.iterations;

	if (!is_trigger(ctx, LOOPS_MAGIC_HELPER_LOOP))
		return 0;
	record_entry();
	if (iterations > LOOPS_MAX_ITERATIONS)
		iterations = LOOPS_MAX_ITERATIONS;
	bpf_printk("helper_loop: %llu slow calls", iterations);
	record_second_done(bpf_loop(iterations, slow_call_callback, NULL, 0));
	bpf_printk("helper_loop: done after %llu calls", state.iterations_done);
	record_exit();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
