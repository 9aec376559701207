/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The BPF_PROG_TERMINATE command of termlab's patched kernel, called directly:
 * libbpf-dev's headers predate it. Values are the fixed UAPI (see
 * guest-kernel/patches): command 37, right after BPF_TOKEN_CREATE.
 */
#ifndef BPF_PROG_TERMINATE_H
#define BPF_PROG_TERMINATE_H

#include <linux/types.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TERMLAB_BPF_PROG_TERMINATE 37
#define TERMLAB_BPF_F_TERMINATE_DETACH (1U << 0)

/* The prog_terminate member of union bpf_attr. */
struct termlab_prog_terminate_attr {
	__u32 prog_id;
	__u32 flags;
};

/*
 * Returns the number of CPUs on which the program was found running and
 * stopped, or -1 with errno set.
 */
static inline long termlab_bpf_prog_terminate(__u32 prog_id, __u32 flags)
{
	struct termlab_prog_terminate_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.prog_id = prog_id;
	attr.flags = flags;
	return syscall(__NR_bpf, TERMLAB_BPF_PROG_TERMINATE, &attr, sizeof(attr));
}

#endif /* BPF_PROG_TERMINATE_H */
