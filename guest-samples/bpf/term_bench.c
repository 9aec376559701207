// SPDX-License-Identifier: GPL-2.0
/*
 * term_bench: the guest side of `termlab bench`. Raw-instruction programs run
 * with BPF_PROG_TEST_RUN (raw_tracepoint type: bpf_prog_run() on the calling
 * CPU, interrupts on, like a tracepoint hit), so no attach point is needed.
 * Every output line is machine-readable `key=value`.
 *
 *   term_bench latency --case 1|2 [--depth D] [--cpus K] [--iterations N]
 *                      [--delay-ms MS] [--settle-us US] --trace-out FILE
 *
 *     N times: runner threads on CPUs 1..K each run the program; once all are
 *     inside it (plus US microseconds), CPU 0 calls BPF_PROG_TERMINATE. The
 *     program is D functions deep (D-1 bpf2bpf frames) and its innermost
 *     function is, for case 1, two calls of the slow demo helper (MS ms each)
 *     and, for case 2, a long may_goto loop in BPF text. Prints one line per
 *     call (`iter i=.. ret=.. errno=.. call_ns=.. return_ns=.. runs_end_ns=..`)
 *     and appends the kernel's trace (bpf: events enabled here) to FILE,
 *     where the harness finds the kernel's timestamps of each call.
 *
 *   term_bench fastpath --prog empty|helpers|loop [--repeat R]
 *
 *     One BPF_PROG_TEST_RUN with repeat R: `fastpath prog=.. repeat=..
 *     ns_per_run=.. call_total_ns=..` (the kernel's own average per run, and
 *     the whole call as this process timed it).
 *
 *   term_bench load --insns N [--count C]
 *
 *     Loads a straight-line program of about N instructions C times:
 *     `load insns=.. count=.. load_ns_median=.. load_ns_min=.. jited_bytes=..
 *     copy_jited_bytes=..` (the termination copy's bytes, 0 without one).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>

#include "raw_bpf.h"
#include "bpf_term_info.h"

#define MAX_CPUS 8
#define MAX_DEPTH 8
#define TRACE_DIR "/sys/kernel/tracing"

static int usage(void)
{
	fprintf(stderr, "usage: term_bench latency --case 1|2 [--depth D] [--cpus K] [--iterations N] "
			"[--delay-ms MS] [--settle-us US] --trace-out FILE\n"
			"       term_bench fastpath --prog empty|helpers|loop [--repeat R]\n"
			"       term_bench load --insns N [--count C]\n");
	return 2;
}

/* --name VALUE as an unsigned number within [lo, hi]; 0 if not present. */
static int opt_num(int argc, char **argv, const char *name, unsigned long lo, unsigned long hi,
		   unsigned long *value)
{
	for (int i = 2; i + 1 < argc; i++) {
		char *end;

		if (strcmp(argv[i], name))
			continue;
		errno = 0;
		*value = strtoul(argv[i + 1], &end, 10);
		if (errno || *end || *value < lo || *value > hi) {
			fprintf(stderr, "term_bench: %s must be %lu..%lu\n", name, lo, hi);
			exit(2);
		}
		return 1;
	}
	return 0;
}

static const char *opt_str(int argc, char **argv, const char *name)
{
	for (int i = 2; i + 1 < argc; i++)
		if (!strcmp(argv[i], name))
			return argv[i + 1];
	return NULL;
}

/* ------------------------------------------------------------ programs */

/*
 * @depth functions: f0 calls f1 ... calls f(depth-1), the leaf. Case 1 leaf:
 * two slow helper calls. Case 2 leaf: a may_goto loop of BPF_MAX_LOOPS (8M)
 * iterations, run 8 times by a counted loop so a run lasts long enough to be
 * caught inside.
 */
static size_t build_latency_prog(int term_case, int depth, struct bpf_insn *insns)
{
	size_t n = 0;

	for (int f = 0; f + 1 < depth; f++) {
		insns[n] = CALL_SUBPROG(1);	/* -> the next function, 2 insns on */
		n++;
		insns[n++] = EXIT();
	}
	if (term_case == 1) {
		insns[n++] = CALL_HELPER(BPF_FUNC_get_numa_node_id);
		insns[n++] = MOV64_REG(BPF_REG_6, BPF_REG_0);
		insns[n++] = CALL_HELPER(BPF_FUNC_get_numa_node_id);
		insns[n++] = ADD64_REG(BPF_REG_0, BPF_REG_6);
		insns[n++] = EXIT();
	} else {
		insns[n++] = MOV64_IMM(BPF_REG_6, 0);
		insns[n++] = MOV64_IMM(BPF_REG_0, 0);		/* outer: */
		insns[n++] = MAY_GOTO(2);			/* inner: -> after */
		insns[n++] = ADD64_IMM(BPF_REG_0, 1);
		insns[n++] = JA(-3);				/* -> inner */
		insns[n++] = ADD64_IMM(BPF_REG_6, 1);		/* after: */
		insns[n++] = JGT_IMM(BPF_REG_6, 7, 1);		/* -> done */
		insns[n++] = JA(-7);				/* -> outer */
		insns[n++] = MOV64_REG(BPF_REG_0, BPF_REG_6);	/* done: */
		insns[n++] = EXIT();
	}
	return n;
}

/* ---------------------------------------------------------------- latency */

struct runner {
	pthread_t thread;
	int cpu, prog_fd;
	volatile bool started;
	uint64_t end_ns;
};

static void *run_once(void *arg)
{
	struct runner *r = arg;

	pin_to(r->cpu);
	r->started = true;
	raw_test_run(r->prog_fd, 0, 0, NULL);
	r->end_ns = now_ns();
	return NULL;
}

/*
 * Appends what the trace buffer holds now to @out, or drops it with NULL
 * (trace_pipe consumes what it returns).
 */
static void drain_trace(int pipe_fd, FILE *out)
{
	char buf[65536];
	ssize_t n;

	while ((n = read(pipe_fd, buf, sizeof(buf))) > 0)
		if (out)
			fwrite(buf, 1, n, out);
}

static int latency(int argc, char **argv)
{
	unsigned long term_case = 0, depth = 1, cpus = 1, iterations = 100, delay_ms = 10, settle_us = 2000;
	const char *trace_out = opt_str(argc, argv, "--trace-out");
	static struct bpf_insn insns[64];
	struct runner runners[MAX_CPUS];
	unsigned long ok = 0;
	int fd, pipe_fd;
	uint32_t id;
	FILE *out;

	if (!opt_num(argc, argv, "--case", 1, 2, &term_case) || !trace_out)
		return usage();
	opt_num(argc, argv, "--depth", 1, MAX_DEPTH, &depth);
	opt_num(argc, argv, "--cpus", 1, MAX_CPUS - 1, &cpus);
	opt_num(argc, argv, "--iterations", 1, 1000000, &iterations);
	opt_num(argc, argv, "--delay-ms", 1, 60000, &delay_ms);
	opt_num(argc, argv, "--settle-us", 0, 10000000, &settle_us);
	if ((long)cpus >= sysconf(_SC_NPROCESSORS_ONLN)) {
		fprintf(stderr, "term_bench: --cpus %lu needs %lu CPUs (CPU 0 terminates)\n", cpus, cpus + 1);
		return 1;
	}

	fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, build_latency_prog(term_case, depth, insns),
		      "term_bench", 0);
	id = raw_prog_id(fd);
	write_sysctl(DEMO_DELAY_SYSCTL, term_case == 1 ? delay_ms : 0);
	write_sysctl(TRACE_DIR "/events/bpf/enable", 1);
	pipe_fd = open(TRACE_DIR "/trace_pipe", O_RDONLY | O_NONBLOCK);
	out = fopen(trace_out, "w");
	if (pipe_fd < 0 || !out) {
		perror("trace_pipe / --trace-out");
		return 1;
	}
	pin_to(0);
	drain_trace(pipe_fd, NULL);
	printf("bench case=%lu depth=%lu cpus=%lu iterations=%lu delay_ms=%lu prog_id=%u\n",
	       term_case, depth, cpus, iterations, delay_ms, id);

	for (unsigned long i = 0; i < iterations; i++) {
		struct timespec settle = { settle_us / 1000000, (settle_us % 1000000) * 1000 };
		uint64_t call_ns, return_ns, runs_end_ns = 0;
		long ret;
		int err;

		for (unsigned long c = 0; c < cpus; c++) {
			runners[c] = (struct runner){ .cpu = c + 1, .prog_fd = fd };
			pthread_create(&runners[c].thread, NULL, run_once, &runners[c]);
		}
		for (unsigned long c = 0; c < cpus; c++)
			while (!runners[c].started)
				sched_yield();
		nanosleep(&settle, NULL);
		call_ns = now_ns();
		ret = termlab_bpf_prog_terminate(id, 0);
		err = ret < 0 ? errno : 0;
		return_ns = now_ns();
		for (unsigned long c = 0; c < cpus; c++) {
			pthread_join(runners[c].thread, NULL);
			if (runners[c].end_ns > runs_end_ns)
				runs_end_ns = runners[c].end_ns;
		}
		ok += ret == (long)cpus;
		printf("iter i=%lu ret=%ld errno=%s call_ns=%llu return_ns=%llu runs_end_ns=%llu\n", i, ret,
		       err ? strerrorname_np(err) : "0", (unsigned long long)call_ns,
		       (unsigned long long)return_ns, (unsigned long long)runs_end_ns);
		drain_trace(pipe_fd, out);
	}
	fclose(out);
	write_sysctl(DEMO_DELAY_SYSCTL, 0);
	printf("done ok=%lu missed=%lu\n", ok, iterations - ok);
	return 0;
}

/* --------------------------------------------------------------- fastpath */

/*
 * Small programs for the per-run cost of the running marker: nothing, a few
 * cheap helpers, and a short bpf_loop()-free counted loop.
 */
static size_t build_fastpath_prog(const char *name, struct bpf_insn *insns)
{
	size_t n = 0;

	if (!strcmp(name, "empty")) {
		insns[n++] = MOV64_IMM(BPF_REG_0, 0);
	} else if (!strcmp(name, "helpers")) {
		for (int i = 0; i < 3; i++)
			insns[n++] = CALL_HELPER(BPF_FUNC_get_smp_processor_id);
	} else if (!strcmp(name, "loop")) {
		insns[n++] = MOV64_IMM(BPF_REG_0, 0);
		insns[n++] = ADD64_IMM(BPF_REG_0, 1);
		insns[n++] = JGT_IMM(BPF_REG_0, 99, 1);
		insns[n++] = JA(-3);
	} else {
		return 0;
	}
	insns[n++] = EXIT();
	return n;
}

/*
 * Socket-filter programs: their test run honours `repeat` and reports the
 * kernel's own average per run (raw_tracepoint test runs take no repeat),
 * each run going through bpf_prog_run() and so through the running marker.
 */
static int fastpath(int argc, char **argv)
{
	const char *name = opt_str(argc, argv, "--prog");
	unsigned long repeat = 1000000;
	static struct bpf_insn insns[16];
	unsigned char packet[64] = {};
	uint64_t start, call_ns;
	union bpf_attr attr;
	size_t n;

	opt_num(argc, argv, "--repeat", 1, 100000000, &repeat);
	if (!name || !(n = build_fastpath_prog(name, insns)))
		return usage();
	pin_to(1 < sysconf(_SC_NPROCESSORS_ONLN) ? 1 : 0);
	memset(&attr, 0, sizeof(attr));
	attr.test.prog_fd = raw_load(BPF_PROG_TYPE_SOCKET_FILTER, insns, n, "fastpath", 0);
	attr.test.data_in = (uintptr_t)packet;
	attr.test.data_size_in = sizeof(packet);
	attr.test.repeat = repeat;
	start = now_ns();
	if (sys_bpf(BPF_PROG_TEST_RUN, &attr, sizeof(attr))) {
		perror("BPF_PROG_TEST_RUN");
		return 1;
	}
	call_ns = now_ns() - start;
	/*
	 * The kernel's average, truncated to whole ns, and the whole call as
	 * this process saw it, for a finer average where the call's own cost is
	 * small beside repeat runs (guest-kernel/fastpath-count --icount).
	 */
	printf("fastpath prog=%s repeat=%lu ns_per_run=%u call_total_ns=%llu\n", name, repeat,
	       attr.test.duration, (unsigned long long)call_ns);
	return 0;
}

/* ------------------------------------------------------------------- load */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Sum of the JITed lengths of the program's images and of its copy's. */
static void jited_bytes(int fd, uint64_t *prog, uint64_t *copy)
{
	struct termlab_prog_info info;
	uint32_t lens[1] = {}, copy_lens[1] = {};
	union bpf_attr attr;

	memset(&info, 0, sizeof(info));
	info.base.nr_jited_func_lens = 1;
	info.base.jited_func_lens = (uintptr_t)lens;
	info.nr_term_jited_ksyms = 1;
	info.term_jited_func_lens = (uintptr_t)copy_lens;
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = fd;
	attr.info.info_len = sizeof(info);
	attr.info.info = (uintptr_t)&info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr))) {
		/* A kernel without the series refuses the longer info: ask again with the base. */
		attr.info.info_len = sizeof(info.base);
		if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr))) {
			perror("BPF_OBJ_GET_INFO_BY_FD");
			exit(1);
		}
		info.nr_term_jited_ksyms = 0;
	}
	*prog = lens[0];
	*copy = info.nr_term_jited_ksyms ? copy_lens[0] : 0;
}

static int load(int argc, char **argv)
{
	unsigned long target = 0, count = 5;
	uint64_t times[64], prog_bytes = 0, copy_bytes = 0;
	struct bpf_insn *insns;
	size_t n = 0;

	if (!opt_num(argc, argv, "--insns", 2, 1000000, &target))
		return usage();
	opt_num(argc, argv, "--count", 1, 64, &count);
	insns = calloc(target + 2, sizeof(*insns));
	/* Straight-line arithmetic with a helper call every 100 instructions. */
	insns[n++] = MOV64_IMM(BPF_REG_6, 0);
	while (n + 1 < target) {
		if (n % 100 == 99) {
			insns[n++] = CALL_HELPER(BPF_FUNC_get_smp_processor_id);
			insns[n++] = ADD64_REG(BPF_REG_6, BPF_REG_0);
		} else {
			insns[n++] = ADD64_IMM(BPF_REG_6, (int)n);
		}
	}
	insns[n++] = MOV64_REG(BPF_REG_0, BPF_REG_6);
	insns[n++] = EXIT();
	for (unsigned long i = 0; i < count; i++) {
		uint64_t start = now_ns();
		int fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, n, "load_bench", 0);

		times[i] = now_ns() - start;
		jited_bytes(fd, &prog_bytes, &copy_bytes);
		close(fd);
	}
	qsort(times, count, sizeof(times[0]), cmp_u64);
	printf("load insns=%zu count=%lu load_ns_median=%llu load_ns_min=%llu jited_bytes=%llu "
	       "copy_jited_bytes=%llu\n", n, count, (unsigned long long)times[count / 2],
	       (unsigned long long)times[0], (unsigned long long)prog_bytes,
	       (unsigned long long)copy_bytes);
	free(insns);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		return usage();
	if (!strcmp(argv[1], "latency"))
		return latency(argc, argv);
	if (!strcmp(argv[1], "fastpath"))
		return fastpath(argc, argv);
	if (!strcmp(argv[1], "load"))
		return load(argc, argv);
	return usage();
}
