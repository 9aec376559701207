/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The prog array of the tail-call chains of this directory: one slot, which libbpf fills
 * with the program @target when it loads the object (the scenario loads @target beside the
 * caller, `loaded_by`), for bpf_tail_call(ctx, &@name, 0).
 */
#ifndef JUMP_TABLE_H
#define JUMP_TABLE_H

#define JUMP_TABLE(name, target)				\
	struct {						\
		__uint(type, BPF_MAP_TYPE_PROG_ARRAY);		\
		__uint(max_entries, 1);				\
		__type(key, __u32);				\
		__array(values, int(void *));			\
	} name SEC(".maps") = {					\
		.values = { [0] = (void *)&target },		\
	}

#endif
