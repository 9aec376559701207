// SPDX-License-Identifier: GPL-2.0
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>

#include "loops_user.h"

static const struct loops_program programs[] = {
	{ "loops", LOOPS_MAGIC_DEMO, LOOPS_OBJECT_LOOPS,
	  "two slow-helper calls (termination case 1)" },
	{ "bpftext", LOOPS_MAGIC_BPFTEXT, LOOPS_OBJECT_BPFTEXT,
	  "long bpf_loop() doing arithmetic (termination case 2)" },
	{ "subprog_helper", LOOPS_MAGIC_SUBPROG_HELPER, LOOPS_OBJECT_SUBPROG,
	  "two slow-helper calls, each 3 bpf2bpf frames deep" },
	{ "subprog_text", LOOPS_MAGIC_SUBPROG_TEXT, LOOPS_OBJECT_SUBPROG,
	  "long bpf_loop() 3 bpf2bpf frames deep" },
	{ "helper_loop", LOOPS_MAGIC_HELPER_LOOP, LOOPS_OBJECT_BPFTEXT,
	  "bpf_loop() of --iterations slow-helper calls (runtime budget)" },
	{ "foreach_array", LOOPS_MAGIC_FOREACH_ARRAY, LOOPS_OBJECT_BPFTEXT,
	  "bpf_for_each_map_elem() over an array: --iterations callbacks, the first slow" },
	{ "foreach_hash", LOOPS_MAGIC_FOREACH_HASH, LOOPS_OBJECT_BPFTEXT,
	  "bpf_for_each_map_elem() over a hash map: --iterations callbacks, the first slow" },
	{ "tailcall", LOOPS_MAGIC_TAILCALL, LOOPS_OBJECT_TAILCALL,
	  "two slow-helper calls around a tail call: not terminable (EOPNOTSUPP)" },
};

const struct loops_program *loops_program_by_name(const char *name)
{
	size_t i;

	for (i = 0; i < sizeof(programs) / sizeof(programs[0]); i++)
		if (strcmp(programs[i].name, name) == 0)
			return &programs[i];
	fprintf(stderr, "unknown program '%s'; known programs:\n", name);
	for (i = 0; i < sizeof(programs) / sizeof(programs[0]); i++)
		fprintf(stderr, "  %-15s %s\n", programs[i].name, programs[i].description);
	return NULL;
}

static int prog_info_by_fd(int prog_fd, struct bpf_prog_info *info, __u32 *map_ids, __u32 max_maps)
{
	__u32 len = sizeof(*info);

	memset(info, 0, sizeof(*info));
	if (map_ids) {
		info->nr_map_ids = max_maps;
		info->map_ids = (__u64)(unsigned long)map_ids;
	}
	return bpf_obj_get_info_by_fd(prog_fd, info, &len);
}

/* Id of the only loaded program named `name`; 0 (after a message) otherwise. */
static __u32 find_prog_id(const char *name)
{
	__u32 id = 0, found = 0, matches = 0;
	struct bpf_prog_info info;

	while (bpf_prog_get_next_id(id, &id) == 0) {
		int fd = bpf_prog_get_fd_by_id(id);

		if (fd < 0)
			continue;	/* unloaded meanwhile */
		if (prog_info_by_fd(fd, &info, NULL, 0) == 0 &&
		    strncmp(info.name, name, sizeof(info.name)) == 0) {
			found = id;
			matches++;
		}
		close(fd);
	}
	if (errno != ENOENT) {
		fprintf(stderr, "listing BPF programs: %s\n", strerror(errno));
		return 0;
	}
	if (matches == 0)
		fprintf(stderr, "no loaded BPF program named '%s' (is `loops --prog %s` running?)\n",
			name, name);
	else if (matches > 1)
		fprintf(stderr, "%u BPF programs named '%s' are loaded; pass --id\n", matches, name);
	return matches == 1 ? found : 0;
}

static int has_suffix(const char *text, const char *suffix)
{
	size_t text_len = strlen(text), suffix_len = strlen(suffix);

	return text_len >= suffix_len && strcmp(text + text_len - suffix_len, suffix) == 0;
}

int loops_open_state(const struct loops_program *program, __u32 prog_id, __u32 *found_prog_id)
{
	__u32 map_ids[16];
	struct bpf_prog_info info;
	int prog_fd;
	__u32 i;

	if (prog_id == 0)
		prog_id = find_prog_id(program->name);
	if (prog_id == 0)
		return -1;
	prog_fd = bpf_prog_get_fd_by_id(prog_id);
	if (prog_fd < 0) {
		fprintf(stderr, "opening BPF program id %u: %s\n", prog_id, strerror(errno));
		return -1;
	}
	if (prog_info_by_fd(prog_fd, &info, map_ids, sizeof(map_ids) / sizeof(map_ids[0]))) {
		fprintf(stderr, "reading info of BPF program id %u: %s\n", prog_id, strerror(errno));
		close(prog_fd);
		return -1;
	}
	close(prog_fd);

	for (i = 0; i < info.nr_map_ids && i < sizeof(map_ids) / sizeof(map_ids[0]); i++) {
		struct bpf_map_info map_info;
		__u32 len = sizeof(map_info);
		int map_fd = bpf_map_get_fd_by_id(map_ids[i]);

		if (map_fd < 0)
			continue;
		memset(&map_info, 0, sizeof(map_info));
		if (bpf_obj_get_info_by_fd(map_fd, &map_info, &len) == 0 &&
		    has_suffix(map_info.name, ".bss") &&
		    map_info.value_size == sizeof(struct loops_state)) {
			*found_prog_id = prog_id;
			return map_fd;
		}
		close(map_fd);
	}
	fprintf(stderr, "BPF program id %u has no .bss map holding struct loops_state; "
		"is it one of the loops programs?\n", prog_id);
	return -1;
}

int loops_read_state(int state_fd, struct loops_state *state)
{
	__u32 key = 0;

	if (bpf_map_lookup_elem(state_fd, &key, state)) {
		fprintf(stderr, "reading the program's state: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}

int loops_write_state(int state_fd, const struct loops_state *state)
{
	__u32 key = 0;

	if (bpf_map_update_elem(state_fd, &key, state, BPF_ANY)) {
		fprintf(stderr, "writing the program's state: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}

uint64_t loops_monotonic_ns(void)
{
	struct timespec now;

	/* CLOCK_MONOTONIC is the clock bpf_ktime_get_ns() reads. */
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

int loops_parse_u64(const char *text, uint64_t *value)
{
	char *end;

	if (text == NULL || *text < '0' || *text > '9')
		return -1;
	errno = 0;
	*value = strtoull(text, &end, 10);
	return errno || *end ? -1 : 0;
}
