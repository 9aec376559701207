/* SPDX-License-Identifier: GPL-2.0 */
/* Userspace side shared by loops and trigger_loops. */
#ifndef LOOPS_USER_H
#define LOOPS_USER_H

#include <stdint.h>
#include "loops_common.h"

/* The BPF objects embedded in the loader (see bpf_objects.S). */
enum loops_object {
	LOOPS_OBJECT_LOOPS,
	LOOPS_OBJECT_BPFTEXT,
	LOOPS_OBJECT_SUBPROG,
	LOOPS_OBJECT_TAILCALL,
};

struct loops_program {
	const char *name;	/* BPF program (function) name, also its kernel name */
	__u32 magic;		/* getpgid() argument that runs it */
	enum loops_object object;
	const char *description;
};

/* Returns NULL and prints the known names when `name` is unknown. */
const struct loops_program *loops_program_by_name(const char *name);

/*
 * Finds the loaded program called `program->name` (or takes `prog_id` when it
 * is non-zero) and opens the .bss map holding its struct loops_state.
 * Returns the map fd, or -1 after printing why.
 */
int loops_open_state(const struct loops_program *program, __u32 prog_id, __u32 *found_prog_id);

int loops_read_state(int state_fd, struct loops_state *state);
int loops_write_state(int state_fd, const struct loops_state *state);

uint64_t loops_monotonic_ns(void);

/* Parses a decimal unsigned number; returns -1 on anything else. */
int loops_parse_u64(const char *text, uint64_t *value);

#endif /* LOOPS_USER_H */
