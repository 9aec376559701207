/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A run in two parts, each after a call of the slow helper
 * (kernel.bpf_termination_demo_delay_ms), for the scenarios of this directory.
 *
 * What ran is counted in global variables, which `bpf_loader globals` reads around the
 * trigger. first_part and second_part grow only where bpf_get_current_pid_tgid() really
 * ran and returned the caller's tgid: in the termination copy it is a stub that returns
 * a constant (-1), never the caller's ids.
 */
#ifndef TWO_PARTS_H
#define TWO_PARTS_H

__u64 runs, first_part, second_part;

static __always_inline int two_slow_parts(const char *where, __u32 tgid)
{
	runs++;
	bpf_printk("%s: tgid %u in the slow helper", where, tgid);
	bpf_get_numa_node_id();
	first_part += bpf_get_current_pid_tgid() >> 32 == tgid;
	bpf_get_numa_node_id();
	second_part += bpf_get_current_pid_tgid() >> 32 == tgid;
	return 0;
}

#endif
