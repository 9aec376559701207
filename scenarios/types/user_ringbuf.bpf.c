// SPDX-License-Identifier: GPL-2.0
/*
 * A program that drains a user ring buffer (BPF_MAP_TYPE_USER_RINGBUF: user space produces,
 * here `bpf_loader globals --samples N`, which submits the values 1 to N) with
 * bpf_user_ringbuf_drain() at sync(2)'s entry (kprobe). The callback of a run's first
 * sample calls the slow helper twice (two_parts.h); the others only count.
 *
 * Terminated inside that first callback, the run's frames move to the copy, but the
 * drain's own C loop holds the original callback's address: unless it checks the stop flag
 * before each call (patch 0007), it calls the original, real helpers and all, for every
 * sample left. Those samples must stay in the ring, for the next run, which drains them
 * first. While it runs, the drain holds the ring's busy flag (a second drain gets -EBUSY):
 * were it left set, no later run could drain anything.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "two_parts.h"

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 4096);
} urb SEC(".maps");

/*
 * callbacks: samples the callback read, their values summed in sample_sum; first_sample
 * grows by the value of each run's first sample; drained: the samples
 * bpf_user_ringbuf_drain() said it consumed; after_drain: runs whose helper after the drain
 * really ran.
 */
__u64 callbacks, sample_sum, first_sample, drained, after_drain;

struct drain_ctx {
	__u32 tgid;
	__u32 calls;
};

static long take_sample(struct bpf_dynptr *dynptr, void *data)
{
	struct drain_ctx *ctx = data;
	__u64 value;

	if (bpf_dynptr_read(&value, sizeof(value), dynptr, 0, 0))
		return 1;
	callbacks++;
	sample_sum += value;
	if (ctx->calls++ == 0) {
		first_sample += value;
		two_slow_parts("user_ringbuf take_sample", ctx->tgid);
	}
	return 0;
}

SEC("kprobe/ksys_sync")
int BPF_KPROBE(drain_samples)
{
	struct drain_ctx drain = { .tgid = bpf_get_current_pid_tgid() >> 32 };
	long consumed;

	consumed = bpf_user_ringbuf_drain(&urb, take_sample, &drain, 0);
	if (consumed > 0)
		drained += consumed;
	after_drain += bpf_get_current_pid_tgid() >> 32 == drain.tgid;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
