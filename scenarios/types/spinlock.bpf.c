// SPDX-License-Identifier: GPL-2.0
/*
 * Two tc programs around a bpf_spin_lock section, for the full guest kernel, run through
 * BPF_PROG_TEST_RUN. Each loads with its own map, whose one value holds the lock.
 *
 * lock_brief counts its run, calls the slow helper (kernel.bpf_termination_demo_delay_ms),
 * then counts its section in the map value under the lock, then calls the slow helper again.
 * The termination copy keeps bpf_spin_lock() and bpf_spin_unlock() (a held lock must be
 * released), so a run stopped in its first slow helper still takes the lock, counts its
 * section and releases it, and the next run takes the lock again (had the copy skipped the
 * unlock, that run would spin on it for good, interrupts off). It returns 10 times the runs
 * so far that did not count their section (0 while every run did), plus 1 if the helper
 * after the second slow one really ran (a stub never returns the caller's ids).
 *
 * lock_long calls the slow helper, then spins inside the lock: a may_goto loop of
 * BPF_MAX_LOOPS (8M) rounds of arithmetic, seconds under emulation, with interrupts off,
 * where no stop interrupt lands. It returns the rounds it made, plus 1 if the helper after
 * the section really ran: a run stopped anywhere, even in bpf_spin_unlock() where the
 * interrupts come back on, returns the rounds alone.
 *
 * may_goto needs clang 19's assembler (the scenario sets clang = "clang-19").
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

/* selftests' bpf_experimental.h: true until the may_goto allowance is spent. */
#define can_loop					\
	({ __label__ l_break, l_continue;		\
	bool ret = true;				\
	asm volatile goto("may_goto %l[l_break]"	\
		      :::: l_break);			\
	goto l_continue;				\
	l_break: ret = false;				\
	l_continue:;					\
	ret;						\
	})

#define LATER_HELPER_RAN 1

/* lock_long's work per round: 512 instructions, about 3 s for 8M rounds, nested. */
#define WORK_4 "%0 *= 3; %0 ^= %1; %0 *= 3; %0 ^= %1; %0 *= 3; %0 ^= %1; %0 *= 3; %0 ^= %1;"
#define WORK_16 WORK_4 WORK_4 WORK_4 WORK_4
#define WORK_256 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 \
	WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16 WORK_16

/* lock_brief's runs, counted at their start. */
__u64 entered;

struct locked {
	struct bpf_spin_lock lock;
	__u64 sections;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, int);
	__type(value, struct locked);
} section SEC(".maps");

SEC("tc")
int lock_brief(struct __sk_buff *skb)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 runs, sections;
	struct locked *v;
	int key = 0;

	v = bpf_map_lookup_elem(&section, &key);
	if (!v)
		return 0;
	runs = ++entered;
	bpf_get_numa_node_id();
	bpf_spin_lock(&v->lock);
	sections = ++v->sections;
	bpf_spin_unlock(&v->lock);
	bpf_get_numa_node_id();
	return 10 * (runs - sections) +
	       (bpf_get_current_pid_tgid() >> 32 == tgid ? LATER_HELPER_RAN : 0);
}

SEC("tc")
int lock_long(struct __sk_buff *skb)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 rounds = 0, work = 1;
	struct locked *v;
	int key = 0;

	v = bpf_map_lookup_elem(&section, &key);
	if (!v)
		return 0;
	bpf_get_numa_node_id();
	bpf_spin_lock(&v->lock);
	while (can_loop) {
		rounds++;
		/* A chain no emulator can fold: work = work * 3 ^ rounds, 256 times. */
		asm volatile(WORK_256 : "+r"(work) : "r"(rounds));
	}
	v->sections += work & 1;
	bpf_spin_unlock(&v->lock);
	return rounds + (bpf_get_current_pid_tgid() >> 32 == tgid ? LATER_HELPER_RAN : 0);
}

char LICENSE[] SEC("license") = "GPL";
