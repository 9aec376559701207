// SPDX-License-Identifier: GPL-2.0
/*
 * The termination demo (termination case 1): two calls to the slow helper.
 * With kernel.bpf_termination_demo_delay_ms = D, a run takes about 2*D.
 * Terminating it during the first call lets that call finish, then the rest of
 * the run continues in the termination copy where the second call is a stub:
 * about 1*D in total.
 */
#include "loops_bpf.h"

SEC("tracepoint/syscalls/sys_enter_getpgid")
int loops(struct syscall_enter_ctx *ctx)
{
	if (!is_trigger(ctx, LOOPS_MAGIC_DEMO))
		return 0;
	record_entry();

	bpf_printk("loops: first slow helper call");
	record_first_done(bpf_get_numa_node_id());

	bpf_printk("loops: second slow helper call");
	record_second_done(bpf_get_numa_node_id());

	bpf_printk("loops: done");
	record_exit();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
