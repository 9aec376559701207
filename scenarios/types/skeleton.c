// SPDX-License-Identifier: GPL-2.0
/*
 * The loader of skeleton.bpf.c, written the usual libbpf way: open the skeleton, set the
 * program's read-only configuration, load, attach, then hold the program until SIGTERM or
 * SIGINT. It prints the line a scenario's loader prints once its program is loaded:
 *
 *   prog_id=N prog_name=skel_sync weight=W
 *
 *   skeleton [WEIGHT]    WEIGHT: what each run adds to weighted_runs (default 5)
 *
 * Exits 0 after destroying the skeleton (which detaches the program), 1 when a libbpf call
 * failed, with its error on stderr.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include "loader_hold.h"
#include "skeleton.skel.h"

static int fail(const char *what, int err)
{
	fprintf(stderr, "skeleton: %s: %s\n", what, strerror(err < 0 ? -err : err));
	return 1;
}

int main(int argc, char **argv)
{
	struct bpf_prog_info info = {};
	__u32 info_len = sizeof(info);
	struct skeleton_bpf *skel;
	sigset_t stop;
	int err, sig;

	skel = skeleton_bpf__open();
	if (!skel)
		return fail("opening the skeleton", errno);
	skel->rodata->weight = argc > 1 ? strtoull(argv[1], NULL, 0) : 5;
	err = skeleton_bpf__load(skel);
	if (err)
		return fail("loading", err);
	err = skeleton_bpf__attach(skel);
	if (err)
		return fail("attaching", err);
	err = bpf_prog_get_info_by_fd(bpf_program__fd(skel->progs.skel_sync), &info, &info_len);
	if (err)
		return fail("reading the program's info", err);

	hold_begin(&stop);
	printf("prog_id=%u prog_name=%s weight=%llu\n", info.id, info.name,
	       (unsigned long long)skel->rodata->weight);
	sig = hold_until_signal(&stop);

	skeleton_bpf__destroy(skel);
	printf("prog_id=%u detached signal=%d\n", info.id, sig);
	return 0;
}
