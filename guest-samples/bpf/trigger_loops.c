// SPDX-License-Identifier: GPL-2.0
/*
 * trigger_loops: runs a loaded demo program once (getpgid(magic) fires the
 * tracepoint it is attached to) and prints one machine-readable line:
 *
 *   trigger prog=loops prog_id=7 start_ns=.. end_ns=.. duration_ns=.. duration_ms=..
 *           ran=1 phase=4 first_done=1 second_done=1 exited=1 ...
 *
 * start_ns/end_ns are CLOCK_MONOTONIC around the syscall. first_done,
 * second_done and exited are 1 when the program recorded a real timestamp
 * after the first slow call, after the second slow call (or the loop), and at
 * its end: a part that ran in the termination copy, where helpers are stubs,
 * records no real timestamp. `phase` is a plain store and advances in the copy
 * too. Exit status: 0 when the program ran, 3 when it did not (e.g. detached).
 *
 *   trigger_loops [--prog NAME] [--id PROG_ID] [--iterations N] [--count N] [--show]
 *
 * --iterations sets the bpf_loop() length of the BPF-text programs first.
 * --count N triggers N runs back to back and prints one summary line.
 * --show prints the program's recorded state without triggering.
 */
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "loops_user.h"

/* A timestamp the program took after `state->entry_ns` and before `end_ns`. */
static int is_real_timestamp(const struct loops_state *state, __u64 ns, __u64 end_ns)
{
	return ns != 0 && ns >= state->entry_ns && ns <= end_ns;
}

static void print_state(const struct loops_state *state, __u64 end_ns)
{
	printf(" runs=%llu phase=%u first_done=%d second_done=%d exited=%d first_ret=%d second_ret=%d"
	       " iterations=%llu iterations_done=%llu\n",
	       (unsigned long long)state->runs, state->phase,
	       is_real_timestamp(state, state->first_done_ns, end_ns),
	       is_real_timestamp(state, state->second_done_ns, end_ns),
	       is_real_timestamp(state, state->exit_ns, end_ns),
	       state->first_ret, state->second_ret,
	       (unsigned long long)state->iterations,
	       (unsigned long long)state->iterations_done);
}

static int usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [--prog NAME] [--id PROG_ID] [--iterations N] [--count N] [--show]\n",
		argv0);
	return 2;
}

int main(int argc, char **argv)
{
	const char *prog_name = "loops";
	const struct loops_program *program;
	uint64_t prog_id_arg = 0, iterations = 0, count = 1, i, ran = 0;
	int set_iterations = 0, show_only = 0, state_fd, arg;
	struct loops_state before, after;
	__u64 start_ns, end_ns, run_start_ns = 0;
	__u32 prog_id;

	for (arg = 1; arg < argc; arg++) {
		const char *value = arg + 1 < argc ? argv[arg + 1] : NULL;

		if (strcmp(argv[arg], "--prog") == 0 && value) {
			prog_name = value;
		} else if (strcmp(argv[arg], "--id") == 0 &&
			   loops_parse_u64(value, &prog_id_arg) == 0 && prog_id_arg <= UINT32_MAX) {
		} else if (strcmp(argv[arg], "--iterations") == 0 &&
			   loops_parse_u64(value, &iterations) == 0) {
			if (iterations > LOOPS_MAX_ITERATIONS) {
				fprintf(stderr, "--iterations: at most %u (the kernel's bpf_loop() limit)\n",
					LOOPS_MAX_ITERATIONS);
				return 2;
			}
			set_iterations = 1;
		} else if (strcmp(argv[arg], "--count") == 0 &&
			   loops_parse_u64(value, &count) == 0 && count > 0) {
		} else if (strcmp(argv[arg], "--show") == 0) {
			show_only = 1;
			continue;
		} else {
			return usage(argv[0]);
		}
		arg++;
	}
	program = loops_program_by_name(prog_name);
	if (!program)
		return 2;
	state_fd = loops_open_state(program, (__u32)prog_id_arg, &prog_id);
	if (state_fd < 0)
		return 1;
	if (loops_read_state(state_fd, &before))
		return 1;
	if (show_only) {
		printf("state prog=%s prog_id=%u", program->name, prog_id);
		print_state(&before, loops_monotonic_ns());
		return 0;
	}
	if (set_iterations) {
		before.iterations = iterations;
		if (loops_write_state(state_fd, &before))
			return 1;
	}

	after = before;
	start_ns = end_ns = loops_monotonic_ns();
	for (i = 0; i < count; i++) {
		__u64 runs_before = after.runs;

		run_start_ns = loops_monotonic_ns();
		/* Fails with ESRCH (no such process group): only the tracepoint matters. */
		syscall(SYS_getpgid, (pid_t)program->magic);
		end_ns = loops_monotonic_ns();
		if (loops_read_state(state_fd, &after))
			return 1;
		ran += after.runs != runs_before;
	}
	if (count == 1) {
		printf("trigger prog=%s prog_id=%u start_ns=%llu end_ns=%llu duration_ns=%llu"
		       " duration_ms=%llu ran=%llu", program->name, prog_id,
		       (unsigned long long)run_start_ns, (unsigned long long)end_ns,
		       (unsigned long long)(end_ns - run_start_ns),
		       (unsigned long long)((end_ns - run_start_ns) / 1000000),
		       (unsigned long long)ran);
		print_state(&after, end_ns);
	} else {
		printf("trigger prog=%s prog_id=%u count=%llu ran=%llu start_ns=%llu end_ns=%llu"
		       " duration_ms=%llu\n", program->name, prog_id, (unsigned long long)count,
		       (unsigned long long)ran, (unsigned long long)start_ns,
		       (unsigned long long)end_ns,
		       (unsigned long long)((end_ns - start_ns) / 1000000));
	}
	return ran == count ? 0 : 3;
}
