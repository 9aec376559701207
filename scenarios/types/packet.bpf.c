// SPDX-License-Identifier: GPL-2.0
/*
 * Packet programs (XDP, tc and cgroup_skb) for the full guest kernel, run on a packet through
 * BPF_PROG_TEST_RUN, or (XDP, tc) on frames a veth pair in the guest carries. Each run calls the slow
 * helper (kernel.bpf_termination_demo_delay_ms), then decides its verdict from a helper
 * that cannot fail, bpf_ktime_get_ns(): the original passes the packet; in the
 * termination copy that call is a stub returning -1, and the program drops it. A
 * terminated XDP or tc run's verdict is what the copy computes: these programs chose drop.
 * A cgroup program's is deny, whatever its copy computes.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
/* The lab's frames (IEEE 802 local experimental ethertype 1; bpf_loader packet sends them). */
#define ETH_P_TERMLAB 0x88b5

__u64 runs;

static __always_inline int passes_after_slow_helper(const char *where)
{
	runs++;
	bpf_printk("%s: in the slow helper", where);
	bpf_get_numa_node_id();
	return bpf_ktime_get_ns() != (__u64)-1;
}

/* Only the lab's frames take the slow path, here and in tc_slow: an interface may carry others. */
SEC("xdp")
int xdp_slow(struct xdp_md *ctx)
{
	struct ethhdr *eth = (void *)(long)ctx->data;

	if ((void *)(eth + 1) > (void *)(long)ctx->data_end ||
	    eth->h_proto != bpf_htons(ETH_P_TERMLAB))
		return XDP_PASS;
	return passes_after_slow_helper("xdp_slow") ? XDP_PASS : XDP_DROP;
}

SEC("tc")
int tc_slow(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_TERMLAB))
		return TC_ACT_OK;
	return passes_after_slow_helper("tc_slow") ? TC_ACT_OK : TC_ACT_SHOT;
}

/*
 * 1 lets the packet through the cgroup, 0 drops it. This one allows whatever its helpers
 * return, so its copy computes "allow" too: a terminated run is denied only because the
 * kernel returns 0 for a stopped cgroup program (fail closed, patch 0018).
 */
SEC("cgroup_skb/ingress")
int cgroup_allow_slow(struct __sk_buff *skb)
{
	passes_after_slow_helper("cgroup_allow_slow");
	return 1;
}

/* The same, attached to a cgroup: a datagram to a socket of the cgroup's runs it. */
SEC("cgroup_skb/ingress")
int cgroup_udp_slow(struct __sk_buff *skb)
{
	passes_after_slow_helper("cgroup_udp_slow");
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
