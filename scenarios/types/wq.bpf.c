// SPDX-License-Identifier: GPL-2.0
/*
 * Programs with a workqueue callback (bpf_wq): at a syscall (fentry) each starts a bpf_wq
 * whose callback calls the slow helper twice, in a kworker on the same CPU, after the
 * program's own run has ended.
 *
 * The kernel records a callback's run as a run of the program that set it (patch 0023),
 * so terminating the program stops the callback where it is. Unless the callback can sleep
 * (a workqueue callback may make sleepable calls, here bpf_copy_from_user_str()): a run
 * that sleeps would leave its record on the CPU, so such a program gets no termination
 * copy and terminate answers EOPNOTSUPP. two_parts.h counts what a callback really ran.
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
extern int bpf_copy_from_user_str(void *dst, __u32 dst__sz, const void *unsafe_ptr__ign,
				  __u64 flags) __ksym;

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
/* Never set: the verifier cannot tell, so the sleepable call below counts. */
__u64 copy_a_string;

static int slow_callback(void *map, int *key, void *value)
{
	return two_slow_parts("wq callback", bpf_get_current_pid_tgid() >> 32);
}

static int sleepable_callback(void *map, int *key, void *value)
{
	char name[16];

	if (copy_a_string)
		bpf_copy_from_user_str(name, sizeof(name), NULL, 0);
	return two_slow_parts("wq callback that can sleep", bpf_get_current_pid_tgid() >> 32);
}

static __always_inline void start_work(int (*callback)(void *map, int *key, void *value))
{
	int zero = 0;
	struct work *work = bpf_map_lookup_elem(&works, &zero);

	if (!work)
		return;
	/* Once per map element; later runs get EBUSY here and reuse it. */
	bpf_wq_init(&work->wq, &works, 0);
	if (bpf_wq_set_callback_impl(&work->wq, callback, 0, NULL))
		return;
	if (bpf_wq_start(&work->wq, 0) == 0)
		started++;
}

SEC("fentry/ksys_sync")
int BPF_PROG(wq_sync)
{
	start_work(slow_callback);
	return 0;
}

SEC("fentry/ksys_setsid")
int BPF_PROG(wq_sleepy)
{
	start_work(sleepable_callback);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
