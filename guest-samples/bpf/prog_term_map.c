// SPDX-License-Identifier: GPL-2.0
/*
 * prog_term_map: prints where a program's JITed functions and their
 * termination copies are, and the native offset of every instruction in
 * both, as one JSON object on one line:
 *
 *   {"prog_id":7,"funcs":[{"prog_addr":..,"prog_len":..,"copy_addr":..,
 *    "copy_len":..,"insn_offs":[[prog_off,copy_off],...]},...]}
 *
 * insn_offs[k] is where instruction k starts, the last entry where the last
 * instruction ends. This is the kernel's own map (bpf_prog_info, patch 0011),
 * from which a verifier outside the guest predicts what every return address
 * into the program must become after a termination.
 *
 *   prog_term_map PROG_ID
 *
 * Exit status 0 on success; 3 with a message on stderr when the program has
 * no termination copy (the kernel cannot terminate it: there is nothing to
 * map); 1 with a message when it does not exist or the caller may not see
 * addresses.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bpf/bpf.h>

#include "bpf_term_info.h"
#include "loops_user.h"

/* The program has no termination copy (its exit status). */
#define EXIT_NO_COPY 3

/* The arrays bpf_prog_info fills in for the second call. */
struct term_map {
	__u32 nr_funcs, nr_offs;
	__u64 *prog_addrs, *copy_addrs;
	__u32 *prog_lens, *copy_lens;
	struct termlab_term_insn_off *offs;
};

static int get_info(int fd, struct termlab_prog_info *info)
{
	__u32 len = sizeof(*info);

	return bpf_obj_get_info_by_fd(fd, info, &len);
}

/* Asks for the counts, then for the arrays. */
static int read_map(int fd, struct term_map *map)
{
	struct termlab_prog_info info;

	memset(&info, 0, sizeof(info));
	if (get_info(fd, &info))
		return -errno;
	if (!info.nr_term_jited_ksyms)
		return -EOPNOTSUPP;
	map->nr_funcs = info.nr_term_jited_ksyms;
	map->nr_offs = info.nr_term_insn_offs;
	map->prog_addrs = calloc(map->nr_funcs, sizeof(__u64));
	map->copy_addrs = calloc(map->nr_funcs, sizeof(__u64));
	map->prog_lens = calloc(map->nr_funcs, sizeof(__u32));
	map->copy_lens = calloc(map->nr_funcs, sizeof(__u32));
	map->offs = calloc(map->nr_offs, sizeof(*map->offs));
	if (!map->prog_addrs || !map->copy_addrs || !map->prog_lens || !map->copy_lens || !map->offs)
		return -ENOMEM;

	memset(&info, 0, sizeof(info));
	info.base.nr_jited_ksyms = map->nr_funcs;
	info.base.jited_ksyms = (uintptr_t)map->prog_addrs;
	info.base.nr_jited_func_lens = map->nr_funcs;
	info.base.jited_func_lens = (uintptr_t)map->prog_lens;
	info.nr_term_jited_ksyms = map->nr_funcs;
	info.term_jited_ksyms = (uintptr_t)map->copy_addrs;
	info.term_jited_func_lens = (uintptr_t)map->copy_lens;
	info.nr_term_insn_offs = map->nr_offs;
	info.term_insn_offs = (uintptr_t)map->offs;
	if (get_info(fd, &info))
		return -errno;
	/* Zeroed pointers: the kernel would not show addresses to this caller. */
	if (!info.base.jited_ksyms || !info.term_jited_ksyms || !info.term_insn_offs)
		return -EPERM;
	if (info.nr_term_jited_ksyms != map->nr_funcs || info.nr_term_insn_offs != map->nr_offs)
		return -EAGAIN;
	return 0;
}

static void print_map(uint64_t prog_id, const struct term_map *map)
{
	__u32 func, i = 0;

	printf("{\"prog_id\":%llu,\"funcs\":[", (unsigned long long)prog_id);
	for (func = 0; func < map->nr_funcs; func++) {
		const char *sep = "";

		printf("%s{\"prog_addr\":%llu,\"prog_len\":%u,\"copy_addr\":%llu,\"copy_len\":%u,"
		       "\"insn_offs\":[", func ? "," : "",
		       (unsigned long long)map->prog_addrs[func], map->prog_lens[func],
		       (unsigned long long)map->copy_addrs[func], map->copy_lens[func]);
		for (; i < map->nr_offs && map->offs[i].func == func; i++, sep = ",")
			printf("%s[%u,%u]", sep, map->offs[i].prog_off, map->offs[i].copy_off);
		printf("]}");
	}
	printf("]}\n");
}

int main(int argc, char **argv)
{
	struct term_map map = {};
	uint64_t prog_id;
	int fd, err;

	if (argc != 2 || loops_parse_u64(argv[1], &prog_id) || prog_id > UINT32_MAX) {
		fprintf(stderr, "usage: %s PROG_ID\n", argv[0]);
		return 2;
	}
	fd = bpf_prog_get_fd_by_id((__u32)prog_id);
	if (fd < 0) {
		fprintf(stderr, "prog_term_map: program %llu: %s\n", (unsigned long long)prog_id,
			strerror(errno));
		return 1;
	}
	err = read_map(fd, &map);
	close(fd);
	if (err) {
		fprintf(stderr, "prog_term_map: program %llu: %s\n", (unsigned long long)prog_id,
			err == -EOPNOTSUPP ? "it has no termination copy" : strerror(-err));
		return err == -EOPNOTSUPP ? EXIT_NO_COPY : 1;
	}
	print_map(prog_id, &map);
	return 0;
}
