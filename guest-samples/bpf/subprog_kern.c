// SPDX-License-Identifier: GPL-2.0
/*
 * bpf2bpf subprogram frames: the slow helper (subprog_helper) or the BPF-text
 * loop (subprog_text) runs three calls deep, so terminating it must rewrite the
 * return addresses of every BPF frame on the stack, not only the innermost.
 * Each level keeps a little stack of its own so the frames are not trivial.
 */
#include "loops_bpf.h"

static __noinline long slow_leaf(int which)
{
	volatile __u64 frame_marker = which;
	long ret = bpf_get_numa_node_id();

	if (which == 1)
		record_first_done(ret);
	else
		record_second_done(ret);
	return ret + (long)frame_marker - which;
}

static __noinline long slow_middle(int which)
{
	volatile __u64 frame_marker = which * 2;

	return slow_leaf(which) + (long)frame_marker - which * 2;
}

static __noinline long slow_outer(int which)
{
	volatile __u64 frame_marker = which * 3;

	return slow_middle(which) + (long)frame_marker - which * 3;
}

SEC("tracepoint/syscalls/sys_enter_getpgid")
int subprog_helper(struct syscall_enter_ctx *ctx)
{
	if (!is_trigger(ctx, LOOPS_MAGIC_SUBPROG_HELPER))
		return 0;
	record_entry();

	bpf_printk("subprog_helper: first slow call, 3 frames deep");
	slow_outer(1);
	bpf_printk("subprog_helper: second slow call, 3 frames deep");
	slow_outer(2);

	bpf_printk("subprog_helper: done");
	record_exit();
	return 0;
}

static __noinline long text_leaf(int depth)
{
	volatile __u64 frame_marker = depth;

	return spin() + (long)frame_marker - depth;
}

static __noinline long text_middle(int depth)
{
	volatile __u64 frame_marker = depth;

	return text_leaf(depth + 1) + (long)frame_marker - depth;
}

static __noinline long text_outer(int depth)
{
	volatile __u64 frame_marker = depth;

	return text_middle(depth + 1) + (long)frame_marker - depth;
}

SEC("tracepoint/syscalls/sys_enter_getpgid")
int subprog_text(struct syscall_enter_ctx *ctx)
{
	if (!is_trigger(ctx, LOOPS_MAGIC_SUBPROG_TEXT))
		return 0;
	record_entry();

	bpf_printk("subprog_text: looping %llu times, 3 frames deep", state.iterations);
	record_second_done(text_outer(1));

	bpf_printk("subprog_text: done after %llu iterations", state.iterations_done);
	record_exit();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
