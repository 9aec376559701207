// SPDX-License-Identifier: GPL-2.0
/*
 * prog_terminate: calls BPF_PROG_TERMINATE directly, for tests that need the
 * exact errno, arbitrary flags or the call time; `bpftool prog terminate` is
 * the user-facing way. Prints one machine-readable line:
 *
 *   terminate prog_id=7 flags=0 ret=1 errno=0 call_ns=.. return_ns=..
 *
 * errno is the symbolic name (ENOENT, ESRCH, ...) or 0. Exit status 0 when the
 * call succeeded, 1 when it failed.
 *
 *   prog_terminate [--flags N | --detach] [--repeat N] PROG_ID
 *
 * --repeat N calls it N times back to back (to race a program's exit) and
 * prints `terminate prog_id=.. attempts=N stopped=A not_running=B already=D
 * again=E other=C other_errno=..`; exit status 0 when every call either
 * stopped the program, found it not running (ESRCH), found the run the
 * previous call stopped still finishing (EALREADY: nobody else terminates it
 * meanwhile), or found a run entering or leaving the program on every try
 * (EAGAIN: nothing stopped).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "bpf_prog_terminate.h"
#include "loops_user.h"

static const char *errno_name(int err)
{
	const char *name = err ? strerrorname_np(err) : "0";

	return name ? name : "unknown";
}

static int usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [--flags N | --detach] [--repeat N] PROG_ID\n", argv0);
	return 2;
}

int main(int argc, char **argv)
{
	uint64_t prog_id = 0, flags = 0, repeat = 0, stopped = 0, not_running = 0, already = 0;
	uint64_t again = 0, other = 0, i;
	int arg, have_id = 0, other_errno = 0, stopping = 0;

	for (arg = 1; arg < argc; arg++) {
		const char *value = arg + 1 < argc ? argv[arg + 1] : NULL;

		if (strcmp(argv[arg], "--detach") == 0) {
			flags |= TERMLAB_BPF_F_TERMINATE_DETACH;
		} else if (strcmp(argv[arg], "--flags") == 0 &&
			   loops_parse_u64(value, &flags) == 0 && flags <= UINT32_MAX) {
			arg++;
		} else if (strcmp(argv[arg], "--repeat") == 0 &&
			   loops_parse_u64(value, &repeat) == 0 && repeat > 0) {
			arg++;
		} else if (!have_id && loops_parse_u64(argv[arg], &prog_id) == 0 &&
			   prog_id <= UINT32_MAX) {
			have_id = 1;
		} else {
			return usage(argv[0]);
		}
	}
	if (!have_id)
		return usage(argv[0]);

	if (repeat == 0) {
		__u64 call_ns = loops_monotonic_ns(), return_ns;
		long ret = termlab_bpf_prog_terminate((__u32)prog_id, (__u32)flags);
		int err = ret < 0 ? errno : 0;

		return_ns = loops_monotonic_ns();
		printf("terminate prog_id=%llu flags=%llu ret=%ld errno=%s call_ns=%llu return_ns=%llu\n",
		       (unsigned long long)prog_id, (unsigned long long)flags, ret, errno_name(err),
		       (unsigned long long)call_ns, (unsigned long long)return_ns);
		if (ret < 0)
			fprintf(stderr, "BPF_PROG_TERMINATE id %llu: %s\n",
				(unsigned long long)prog_id, strerror(err));
		return ret < 0;
	}

	for (i = 0; i < repeat; i++) {
		long ret = termlab_bpf_prog_terminate((__u32)prog_id, (__u32)flags);

		if (ret > 0) {
			stopped++;
			stopping = 1;
		} else if (ret < 0 && errno == ESRCH) {
			not_running++;
			stopping = 0;
		} else if (ret < 0 && errno == EALREADY && stopping) {
			already++;
		} else if (ret < 0 && errno == EAGAIN) {
			again++;
		} else {
			other++;
			other_errno = ret < 0 ? errno : 0;
		}
	}
	printf("terminate prog_id=%llu flags=%llu attempts=%llu stopped=%llu not_running=%llu"
	       " already=%llu again=%llu other=%llu other_errno=%s\n", (unsigned long long)prog_id,
	       (unsigned long long)flags, (unsigned long long)repeat,
	       (unsigned long long)stopped, (unsigned long long)not_running,
	       (unsigned long long)already, (unsigned long long)again, (unsigned long long)other,
	       errno_name(other_errno));
	return other != 0;
}
