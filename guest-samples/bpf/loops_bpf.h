/* SPDX-License-Identifier: GPL-2.0 */
/*
 * BPF-side pieces shared by the demo programs: the tracepoint context, the
 * run bookkeeping in `state` and the BPF-text busy loop.
 */
#ifndef LOOPS_BPF_H
#define LOOPS_BPF_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "loops_common.h"

/*
 * Context of a syscalls/sys_enter_* tracepoint (struct syscall_trace_enter in
 * kernel/trace/trace.h, laid out as /sys/kernel/tracing/events/syscalls/
 * sys_enter_getpgid/format shows). Written by hand: the guest kernel has no BTF.
 */
struct syscall_enter_ctx {
	__u64 common;	/* struct trace_entry: type, flags, preempt_count, pid */
	__s32 nr;
	__u32 pad;
	__u64 args[6];
};

/* One instance per object, in .bss, read by trigger_loops through the map. */
struct loops_state state = {};

/* Only the trigger's getpgid(magic) runs a program's body. */
static __always_inline int is_trigger(const struct syscall_enter_ctx *ctx, __u32 magic)
{
	return (__u32)ctx->args[0] == magic;
}

static __always_inline void record_entry(void)
{
	state.runs++;
	state.entry_ns = bpf_ktime_get_ns();
	state.first_done_ns = 0;
	state.second_done_ns = 0;
	state.exit_ns = 0;
	state.iterations_done = 0;
	state.first_ret = -1;
	state.second_ret = -1;
	state.phase = LOOPS_PHASE_ENTERED;
}

static __always_inline void record_first_done(long ret)
{
	state.first_ret = ret;
	state.first_done_ns = bpf_ktime_get_ns();
	state.phase = LOOPS_PHASE_FIRST_DONE;
}

static __always_inline void record_second_done(long ret)
{
	state.second_ret = ret;
	state.second_done_ns = bpf_ktime_get_ns();
	state.phase = LOOPS_PHASE_SECOND_DONE;
}

static __always_inline void record_exit(void)
{
	state.exit_ns = bpf_ktime_get_ns();
	state.phase = LOOPS_PHASE_EXITED;
}

/*
 * bpf_loop() callback doing pure arithmetic, so that nearly all of a run's time
 * is spent executing BPF instructions (termination case 2: the interrupt lands
 * in the BPF image, not in a helper).
 */
static long spin_callback(__u64 index, void *unused)
{
	__u64 x = state.checksum + index;

	for (int i = 0; i < LOOPS_WORK_PER_ITERATION; i++)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	state.checksum = x;
	state.iterations_done++;
	return 0;
}

/* Runs state.iterations callbacks (set by trigger_loops --iterations). */
static __always_inline long spin(void)
{
	__u64 iterations = state.iterations;

	if (iterations > LOOPS_MAX_ITERATIONS)
		iterations = LOOPS_MAX_ITERATIONS;
	return bpf_loop(iterations, spin_callback, NULL, 0);
}

#endif /* LOOPS_BPF_H */
