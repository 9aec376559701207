// SPDX-License-Identifier: GPL-2.0
/*
 * The loader of sched_ext.bpf.c, the usual libbpf way: open and load the skeleton, attach its
 * struct_ops map (which enables the BPF scheduler: every task moves to it), print the line a
 * scenario's loader prints once its program is loaded, and hold the scheduler until SIGTERM
 * or SIGINT, then detach it (sched_ext moves the tasks back to the fair class).
 *
 *   sched_ext          load and hold:
 *                        prog_id=N prog_name=scx_enqueue also.scx_init_task=M scheduler=termlab
 *   sched_ext fork     be the task whose fork the scheduler is slow for: name itself
 *                      scx_fork, fork a child that exits 0 at once, exit with its status
 *   sched_ext nap      be the task whose enqueue the scheduler is slow for: name itself
 *                      scx_slow, sleep 200 ms (waking up enqueues it), exit 0
 *
 * Exits 1 when a libbpf call failed, with its error on stderr.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include "loader_hold.h"
#include "sched_ext.skel.h"

static int fail(const char *what, int err)
{
	fprintf(stderr, "sched_ext: %s: %s\n", what, strerror(err < 0 ? -err : err));
	return 1;
}

static int nap(void)
{
	struct timespec pause = { .tv_nsec = 200 * 1000 * 1000 };

	if (prctl(PR_SET_NAME, "scx_slow"))
		return fail("naming the task", errno);
	while (nanosleep(&pause, &pause))
		if (errno != EINTR)
			return fail("sleeping", errno);
	return 0;
}

static int fork_child(void)
{
	int status;
	pid_t child;

	if (prctl(PR_SET_NAME, "scx_fork"))
		return fail("naming the task", errno);
	child = fork();
	if (child < 0)
		return fail("forking", errno);
	if (!child)
		_exit(0);
	if (waitpid(child, &status, 0) < 0)
		return fail("waiting for the child", errno);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int prog_info(const struct bpf_program *prog, struct bpf_prog_info *info)
{
	__u32 info_len = sizeof(*info);

	return bpf_prog_get_info_by_fd(bpf_program__fd(prog), info, &info_len);
}

int main(int argc, char **argv)
{
	struct bpf_prog_info info = {}, init_info = {};
	struct sched_ext_bpf *skel;
	struct bpf_link *link;
	sigset_t stop;
	int err, sig;

	if (argc > 1 && !strcmp(argv[1], "nap"))
		return nap();
	if (argc > 1 && !strcmp(argv[1], "fork"))
		return fork_child();
	skel = sched_ext_bpf__open_and_load();
	if (!skel)
		return fail("opening and loading the skeleton", errno);
	link = bpf_map__attach_struct_ops(skel->maps.termlab_ops);
	if (!link)
		return fail("attaching the scheduler", errno);
	err = prog_info(skel->progs.scx_enqueue, &info);
	if (!err)
		err = prog_info(skel->progs.scx_init_task, &init_info);
	if (err)
		return fail("reading the programs' info", err);

	hold_begin(&stop);
	printf("prog_id=%u prog_name=%s also.%s=%u scheduler=termlab\n", info.id, info.name,
	       init_info.name, init_info.id);
	sig = hold_until_signal(&stop);

	bpf_link__destroy(link);
	sched_ext_bpf__destroy(skel);
	printf("prog_id=%u detached signal=%d\n", info.id, sig);
	return 0;
}
