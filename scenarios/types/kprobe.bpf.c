// SPDX-License-Identifier: GPL-2.0
/*
 * kprobe programs on ksys_sync (the sync(2) path), written the way BPF programs are
 * written today: CO-RE against the full guest kernel's vmlinux.h, loaded and attached
 * by libbpf. Each run reads its caller's tgid through a CO-RE relocation, then calls the
 * slow helper twice (kernel.bpf_termination_demo_delay_ms).
 *
 * two_parts.h counts which parts of each run really ran.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

/* The caller's tgid, read through a CO-RE relocation of struct task_struct. */
static __always_inline __u32 caller_tgid(void)
{
	struct task_struct *task = (void *)bpf_get_current_task();

	return BPF_CORE_READ(task, tgid);
}

/* At the function's entry the kprobe goes through ftrace: the program runs with
 * interrupts on.
 */
SEC("kprobe/ksys_sync")
int BPF_KPROBE(on_entry)
{
	return two_slow_parts("kprobe on_entry", caller_tgid());
}

/* Past endbr64 and the 5-byte __fentry__ call (gcc 12, full variant: `objdump -d` of
 * ksys_sync), the kprobe is an int3 breakpoint: the program runs in the breakpoint's
 * exception handler, with interrupts off.
 */
SEC("kprobe/ksys_sync+9")
int BPF_KPROBE(inside)
{
	return two_slow_parts("kprobe inside", caller_tgid());
}

char LICENSE[] SEC("license") = "GPL";
