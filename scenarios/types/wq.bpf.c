// SPDX-License-Identifier: GPL-2.0
/*
 * A program with a workqueue callback (bpf_wq): at sync(2) (fentry on ksys_sync) it starts
 * a bpf_wq whose callback calls the slow helper twice, in a kworker, after the program's
 * run has ended.
 *
 * The callback is sleepable and runs outside bpf_prog_run(); the kernel does not record
 * its runs, so it could not find them to stop them. Rather than answer ESRCH while one runs,
 * it makes no termination copy for a program that sets such a callback (patch 0023), and
 * terminate answers EOPNOTSUPP. two_parts.h counts what the callback really ran.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "two_parts.h"

extern int bpf_wq_init(struct bpf_wq *wq, void *p__map, unsigned int flags) __ksym;
extern int bpf_wq_start(struct bpf_wq *wq, unsigned int flags) __ksym;
extern int bpf_wq_set_callback_impl(struct bpf_wq *wq,
				    int (callback_fn)(void *map, int *key, void *value),
				    unsigned int flags__k, void *aux__ign) __ksym;

struct work {
	struct bpf_wq wq;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, int);
	__type(value, struct work);
} works SEC(".maps");

__u64 started;

static int slow_callback(void *map, int *key, void *value)
{
	return two_slow_parts("wq callback", bpf_get_current_pid_tgid() >> 32);
}

SEC("fentry/ksys_sync")
int BPF_PROG(wq_sync)
{
	int zero = 0;
	struct work *work = bpf_map_lookup_elem(&works, &zero);

	if (!work)
		return 0;
	/* Once per map element; later runs get EBUSY here and reuse it. */
	bpf_wq_init(&work->wq, &works, 0);
	if (bpf_wq_set_callback_impl(&work->wq, slow_callback, 0, NULL))
		return 0;
	if (bpf_wq_start(&work->wq, 0) == 0)
		started++;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
