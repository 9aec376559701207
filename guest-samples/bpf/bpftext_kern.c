// SPDX-License-Identifier: GPL-2.0
/*
 * Termination case 2: a run that spends its time in BPF text (a long bpf_loop()
 * whose callback does arithmetic). Its length is state.iterations, set by
 * `trigger_loops --prog bpftext --iterations N`; terminating it must end the
 * loop at its next iteration.
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

char LICENSE[] SEC("license") = "GPL";
