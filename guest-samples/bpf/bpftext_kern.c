// SPDX-License-Identifier: GPL-2.0
/*
 * Termination case 2: a run that spends its time in BPF text (a long bpf_loop()
 * whose callback does arithmetic). Its length is state.iterations, set by
 * `trigger_loops --prog bpftext --iterations N`; terminating it must end the
 * loop at its next iteration.  helper_loop, below, loops over the slow helper;
 * foreach_array and foreach_hash call it from bpf_for_each_map_elem().
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

/*
 * Callbacks called by bpf_for_each_map_elem(), which loops in C (the array
 * and hash maps each have their own loop), until state.iterations of them
 * have run.  The first makes the slow call; the others only read the clock.
 * Terminated during the slow call, the run must make no other callback: the
 * map's loop ends instead of calling the original program's code again.
 */
#define FOREACH_SLOTS 16

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FOREACH_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} foreach_array_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FOREACH_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} foreach_hash_slots SEC(".maps");

struct bpf_map;

static long slow_slot_callback(struct bpf_map *map, __u32 *key, __u64 *value, void *unused)
{
	if (state.iterations_done == 0)
		*value = bpf_get_numa_node_id();
	else
		*value = bpf_ktime_get_ns();
	state.iterations_done++;
	/* 1 stops the walk. */
	return state.iterations_done >= state.iterations;
}

SEC("tracepoint/syscalls/sys_enter_getpgid")
int foreach_array(struct syscall_enter_ctx *ctx)
{
	if (!is_trigger(ctx, LOOPS_MAGIC_FOREACH_ARRAY))
		return 0;
	record_entry();
	bpf_printk("foreach_array: %llu slow callbacks", state.iterations);
	record_second_done(bpf_for_each_map_elem(&foreach_array_slots, slow_slot_callback,
						 NULL, 0));
	bpf_printk("foreach_array: done after %llu callbacks", state.iterations_done);
	record_exit();
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getpgid")
int foreach_hash(struct syscall_enter_ctx *ctx)
{
	__u64 zero = 0;

	if (!is_trigger(ctx, LOOPS_MAGIC_FOREACH_HASH))
		return 0;
	record_entry();
	/* Unrolled: a loop counter kept in the stack slot would be unbounded to the verifier. */
#pragma clang loop unroll(full)
	for (__u32 i = 0; i < FOREACH_SLOTS; i++) {
		__u32 key = i;

		bpf_map_update_elem(&foreach_hash_slots, &key, &zero, BPF_ANY);
	}
	bpf_printk("foreach_hash: %llu slow callbacks", state.iterations);
	record_second_done(bpf_for_each_map_elem(&foreach_hash_slots, slow_slot_callback,
						 NULL, 0));
	bpf_printk("foreach_hash: done after %llu callbacks", state.iterations_done);
	record_exit();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
