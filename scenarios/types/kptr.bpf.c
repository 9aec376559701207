// SPDX-License-Identifier: GPL-2.0
/*
 * A tc program that owns a bpf_obj_new() object across its slow helpers, for the full guest
 * kernel, run through BPF_PROG_TEST_RUN. Each run allocates a node, stamps it with its run
 * number, calls the slow helper (kernel.bpf_termination_demo_delay_ms) twice while it owns
 * it, then stashes it in a map's kptr field with bpf_kptr_xchg(), which hands back the node
 * the previous run stashed; that one it reads and frees with bpf_obj_drop().
 *
 * The verifier makes every path give up what it owns, and the termination copy keeps
 * bpf_kptr_xchg() (it releases the node) and the kfuncs, so a run stopped while it owns its
 * node still stashes it. Whether it did is seen by the next run: the node it takes out of
 * the map is the stopped run's. The return value says that: 10 times how many runs back the
 * node it found was stashed (1: the previous run's; an empty map reads as run 0, so 1 for
 * the program's first run only), plus 1 if the helper after the slow ones really ran (in the copy it is a
 * stub that never returns the caller's ids). A stopped run that lost its node would make the
 * next run find an older one: 21, not 11.
 *
 * A kptr field needs BTF type tags, which clang 14 does not emit: the scenario compiles
 * this with clang-19.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

/* The kfuncs behind bpf_obj_new()/bpf_obj_drop() (selftests' bpf_experimental.h). */
extern void *bpf_obj_new_impl(__u64 local_type_id, void *meta) __ksym;
extern void bpf_obj_drop_impl(void *kptr, void *meta) __ksym;
#define bpf_obj_new(type) ((type *)bpf_obj_new_impl(bpf_core_type_id_local(type), NULL))
#define bpf_obj_drop(kptr) bpf_obj_drop_impl(kptr, NULL)

#define LATER_HELPER_RAN 1

struct node {
	__u64 run;
};

struct slot {
	struct node __kptr *node;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, int);
	__type(value, struct slot);
} slots SEC(".maps");

SEC("tc")
int kptr_hold(struct __sk_buff *skb)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct node *node, *previous;
	__u64 run = runs + 1;
	struct slot *slot;
	int key = 0, ret;

	slot = bpf_map_lookup_elem(&slots, &key);
	if (!slot)
		return 0;
	node = bpf_obj_new(struct node);
	if (!node)
		return 0;
	node->run = run;
	two_slow_parts("kptr kptr_hold", tgid);
	ret = bpf_get_current_pid_tgid() >> 32 == tgid ? LATER_HELPER_RAN : 0;
	previous = bpf_kptr_xchg(&slot->node, node);
	/* An empty map reads as a node of run 0: 10 for the program's first run only. */
	if (!previous)
		return ret + 10 * run;
	ret += 10 * (run - previous->run);
	bpf_obj_drop(previous);
	return ret;
}

char LICENSE[] SEC("license") = "GPL";
