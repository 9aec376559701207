// SPDX-License-Identifier: GPL-2.0
/*
 * A program that holds an RCU read section across its slow helpers: at sync(2)'s entry
 * (kprobe, ftrace-based) it opens one with the bpf_rcu_read_lock() kfunc, calls the slow
 * helper twice (kernel.bpf_termination_demo_delay_ms) inside it, then closes it.
 *
 * The verifier makes every path close a section it opened; the termination copy keeps the
 * kfuncs, so a run stopped inside one still closes it. Were bpf_rcu_read_unlock() left out,
 * the section would stay open: on the full kernel, where RCU is not preemptible, that is a
 * preempt_disable() never undone, which the kernel reports (it counts preemption there,
 * CONFIG_DEBUG_ATOMIC_SLEEP) as soon as sync(2) sleeps or the CPU schedules.
 *
 * The program reads the CPU's preempt count (pcpu_hot) at its entry and inside the section:
 * counted_sections grows when the section shows there, what makes a section left open
 * visible (without CONFIG_DEBUG_ATOMIC_SLEEP it does not). The kernel's report is the check:
 * it repairs the count at the CPU's next context switch, so the next run starts at the usual
 * count either way.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

extern void bpf_rcu_read_lock(void) __ksym;
extern void bpf_rcu_read_unlock(void) __ksym;
extern const struct pcpu_hot pcpu_hot __ksym;

/* The preempt count without its PREEMPT_NEED_RESCHED bit (x86 keeps it inverted on top). */
#define COUNT_MASK 0x7fffffff

__u64 counted_sections;

static __always_inline int preempt_count(void)
{
	const struct pcpu_hot *hot = bpf_this_cpu_ptr(&pcpu_hot);

	return hot->preempt_count & COUNT_MASK;
}

SEC("kprobe/ksys_sync")
int BPF_KPROBE(rcu_hold)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	__u32 tgid = BPF_CORE_READ(task, tgid);
	int entry = preempt_count();

	bpf_rcu_read_lock();
	counted_sections += preempt_count() == entry + 1;
	two_slow_parts("rcu rcu_hold", tgid);
	bpf_rcu_read_unlock();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
