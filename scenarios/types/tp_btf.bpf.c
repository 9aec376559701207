// SPDX-License-Identifier: GPL-2.0
/*
 * A BTF-typed raw tracepoint program (tp_btf) on sys_enter: the kernel runs it through
 * bpf_prog_run(), as it runs raw_tp programs, with the tracepoint's arguments typed by BTF.
 * It does its slow work only for sync(2), so every other system call passes through it at
 * once.
 *
 * two_parts.h counts which parts of each run really ran.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "two_parts.h"

/* x86-64's number of sync(2) (arch/x86/entry/syscalls/syscall_64.tbl). */
#define NR_SYNC 162

SEC("tp_btf/sys_enter")
int BPF_PROG(tp_sync, struct pt_regs *regs, long id)
{
	if (id != NR_SYNC)
		return 0;
	return two_slow_parts("tp_btf tp_sync", bpf_get_current_pid_tgid() >> 32);
}

char LICENSE[] SEC("license") = "GPL";
