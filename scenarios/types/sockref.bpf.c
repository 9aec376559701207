// SPDX-License-Identifier: GPL-2.0
/*
 * A tc program that holds a socket reference across its slow helpers, for the full guest
 * kernel, run through BPF_PROG_TEST_RUN. The scenario keeps an established TCP connection
 * on the guest's loopback (127.0.0.1:7778 -> 127.0.0.1:7777). Each run looks up the
 * server's end of it with bpf_sk_lookup_tcp(), which takes a reference, reads the socket's
 * reference count, calls the slow helper (kernel.bpf_termination_demo_delay_ms) twice while
 * it holds the reference, then releases it.
 *
 * The verifier makes every path release what it acquired; the termination copy keeps the
 * release (a releasing helper), so a run stopped while it holds the reference still drops
 * it. Whether it did is seen by the next run: the count it reads is the first run's again,
 * not one higher. The return value says that: 100 plus how much the count grew since the
 * first run of the program (0 for a run that found no socket), computed before the slow
 * helpers, so a terminated run returns it too; plus 1000 if the helper after the slow ones
 * really ran (in the copy it is a stub that never returns the caller's ids).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "two_parts.h"

#define CLIENT_PORT 7778
#define SERVER_PORT 7777
#define SAME_REFERENCES 100
#define LATER_HELPER_RAN 1000
/* A uapi #define, so not in vmlinux.h: look up in the caller's network namespace. */
#define BPF_F_CURRENT_NETNS (-1L)

/* The server end's reference count as the program's first run saw it, holding its own. */
int first_refcnt;
__u64 found;

SEC("tc")
int sk_hold(struct __sk_buff *skb)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct bpf_sock_tuple tuple = {};
	struct tcp_sock *tp;
	struct bpf_sock *sk;
	int refcnt, ret;

	/* As a packet from the client would be looked up: the server's end is found. */
	tuple.ipv4.saddr = bpf_htonl(0x7f000001);
	tuple.ipv4.daddr = bpf_htonl(0x7f000001);
	tuple.ipv4.sport = bpf_htons(CLIENT_PORT);
	tuple.ipv4.dport = bpf_htons(SERVER_PORT);
	sk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	found++;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp) {
		bpf_sk_release(sk);
		return 1;
	}
	refcnt = tp->inet_conn.icsk_inet.sk.__sk_common.skc_refcnt.refs.counter;
	if (!first_refcnt)
		first_refcnt = refcnt;
	ret = SAME_REFERENCES + refcnt - first_refcnt;
	two_slow_parts("sockref sk_hold", tgid);
	if (bpf_get_current_pid_tgid() >> 32 == tgid)
		ret += LATER_HELPER_RAN;
	bpf_sk_release(sk);
	return ret;
}

char LICENSE[] SEC("license") = "GPL";
