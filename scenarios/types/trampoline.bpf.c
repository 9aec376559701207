// SPDX-License-Identifier: GPL-2.0
/*
 * Programs the kernel runs from a BPF trampoline, not through bpf_prog_run(): fentry, fexit,
 * fmod_ret and BPF LSM. The trampoline's enter and exit functions keep their runs on the CPU's
 * running stack (patch 0025), so they are terminated like any other run, and a terminated
 * run returns into the trampoline, whose exit path goes on.
 *
 * fentry_getppid and lsm_setnice count, like kprobe.bpf.c, which parts of each run really
 * ran. fexit_getppid, on the same function as fentry_getppid, shows what the trampoline did
 * after the fentry run: it ran (fexit_runs) and getppid(2) returned the caller's real parent
 * (ret_right), read here with CO-RE, not what a stopped run left behind.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "two_parts.h"

__u64 fexit_runs, ret_right;

SEC("fentry/__do_sys_getppid")
int BPF_PROG(fentry_getppid)
{
	return two_slow_parts("fentry_getppid", bpf_get_current_pid_tgid() >> 32);
}

/*
 * __do_sys_getppid is the name BTF has for getppid(2)'s code (__x64_sys_getppid, the same
 * address, is not in it), with the wrapper's prototype: one argument, the registers.
 */
SEC("fexit/__do_sys_getppid")
int BPF_PROG(fexit_getppid, const struct pt_regs *regs, long ret)
{
	struct task_struct *task = (void *)bpf_get_current_task();

	fexit_runs++;
	ret_right += ret == BPF_CORE_READ(task, real_parent, tgid);
	return 0;
}

/*
 * Allows every setpriority(2) to nice 5: the program and its copy return 0. A terminated
 * run denies it all the same (-EPERM): the kernel's verdict for a stopped LSM program on a
 * hook that returns 0 or an error, unless the program declared another. Other nice values
 * are lsm_eacces's.
 */
SEC("lsm/task_setnice")
int BPF_PROG(lsm_setnice, struct task_struct *p, int nice)
{
	if (nice != 5)
		return 0;
	return two_slow_parts("lsm_setnice", bpf_get_current_pid_tgid() >> 32);
}

/*
 * The same for nice 7, with the verdict of a terminated run declared where a libbpf user
 * declares it, in the source: a decl tag in the program's BTF, which libbpf passes through
 * (patch 0026). A stopped run returns -EACCES (-13), not the default -EPERM.
 */
SEC("lsm/task_setnice")
__attribute__((btf_decl_tag("term_verdict:-13")))
int BPF_PROG(lsm_eacces, struct task_struct *p, int nice)
{
	if (nice != 7)
		return 0;
	return two_slow_parts("lsm_eacces", bpf_get_current_pid_tgid() >> 32);
}

/*
 * Declares a verdict task_setnice cannot return (it returns 0 or an errno): refused at load
 * with EINVAL, as any return value outside the hook's range would be.
 */
SEC("lsm/task_setnice")
__attribute__((btf_decl_tag("term_verdict:5")))
int BPF_PROG(lsm_bad_verdict, struct task_struct *p, int nice)
{
	return 0;
}

/*
 * fmod_ret on bpf_modify_return_test(), which BPF_PROG_TEST_RUN of this program calls (then
 * bpf_modify_return_test2(), unmodified). A whole run returns 0: the function runs. A
 * terminated run returns its declared verdict, 7, which the trampoline returns in the
 * function's place, skipping it: the test run's retval says which (see trampoline.toml).
 */
SEC("fmod_ret/bpf_modify_return_test")
__attribute__((btf_decl_tag("term_verdict:7")))
int BPF_PROG(fmod_ret_slow, int a, int *b, int ret)
{
	return two_slow_parts("fmod_ret_slow", bpf_get_current_pid_tgid() >> 32);
}

char LICENSE[] SEC("license") = "GPL";
