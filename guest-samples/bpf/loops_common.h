/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Layout shared by the BPF demo programs and their userspace tools.
 *
 * Every program keeps one `struct loops_state` in .bss. Stores to a global
 * are plain BPF instructions, not helper calls, so they still happen when a
 * run is finished by the termination copy, where every helper is stubbed.
 * That is what lets userspace tell the two paths apart:
 *   - `phase` is a direct store: it advances in the original and in the copy;
 *   - the `*_ns` fields hold bpf_ktime_get_ns() results: in the copy the
 *     helper is a stub, so a field written there is not a real timestamp.
 * A field is "real" when entry_ns <= value <= the trigger's end time (ktime
 * and CLOCK_MONOTONIC are the same clock).
 */
#ifndef LOOPS_COMMON_H
#define LOOPS_COMMON_H

#include <linux/types.h>

/*
 * All demo programs attach to the getpgid() syscall tracepoint; the trigger
 * calls getpgid(magic) and each program only runs its body for its own magic,
 * so several programs can be attached at once without running each other.
 */
#define LOOPS_MAGIC_DEMO 0x7e570001
#define LOOPS_MAGIC_BPFTEXT 0x7e570002
#define LOOPS_MAGIC_SUBPROG_HELPER 0x7e570003
#define LOOPS_MAGIC_SUBPROG_TEXT 0x7e570004
#define LOOPS_MAGIC_TAILCALL 0x7e570005
#define LOOPS_MAGIC_HELPER_LOOP 0x7e570006
#define LOOPS_MAGIC_FOREACH_ARRAY 0x7e570007
#define LOOPS_MAGIC_FOREACH_HASH 0x7e570008

/* Kernel limit on bpf_loop() iterations (BPF_MAX_LOOPS). */
#define LOOPS_MAX_ITERATIONS (1U << 23)

/* Arithmetic steps per bpf_loop() callback: keeps the run inside BPF text. */
#define LOOPS_WORK_PER_ITERATION 256

enum loops_phase {
	LOOPS_PHASE_IDLE = 0,
	LOOPS_PHASE_ENTERED = 1,	/* before the first slow call / the loop */
	LOOPS_PHASE_FIRST_DONE = 2,	/* first slow call returned */
	LOOPS_PHASE_SECOND_DONE = 3,	/* second slow call returned / loop ended */
	LOOPS_PHASE_EXITED = 4,		/* about to return */
};

struct loops_state {
	/* Written by userspace before a trigger. */
	__u64 iterations;	/* bpf_loop() iterations of bpftext, subprog_text, helper_loop */

	/* Written by the program. */
	__u64 runs;		/* incremented on entry */
	__u64 entry_ns;
	__u64 first_done_ns;
	__u64 second_done_ns;
	__u64 exit_ns;
	__u64 iterations_done;	/* bpf_loop() callbacks that ran */
	__u64 checksum;		/* result of the arithmetic, so it is not optimised away */
	__u32 phase;		/* enum loops_phase */
	__s32 first_ret;	/* return values of the slow helper */
	__s32 second_ret;
	__u32 pad;
};

#endif /* LOOPS_COMMON_H */
