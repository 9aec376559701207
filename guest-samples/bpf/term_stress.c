// SPDX-License-Identifier: GPL-2.0
/*
 * term_stress: stress, races and hostile input for BPF_PROG_TERMINATE, run
 * inside the guest (issue 8, kernel part).  Raw-instruction programs, no
 * libbpf; needs root, >= 2 CPUs (3 for the two races that need a program on
 * two CPUs, or two terminates, at the same time), the series' sysctl
 * kernel.bpf_termination_demo_delay_ms and tracefs.
 *
 *   term_stress stress --cycles N [--delay-ms D] [--fault-skip-rewrite N]
 *                    (N: the fault knob kernel.bpf_termination_fault_skip_rewrite
 *                    during the stress, to show that its checks catch stops
 *                    that leave a run in the original)
 *   term_stress races --iterations N [--race-delay-ms D]
 *   term_stress fuzz-attr --iterations N [--unpriv]
 *   term_stress all --cycles N --iterations N --fuzz N [--kmemleak]
 *                    (the three in one run; --kmemleak: no leak suspect after it)
 *   term_stress hold                 (loads ts_hold and waits for SIGTERM)
 *
 * Each check prints one kselftest-like line (`ok N - name: details` or
 * `not ok N - name: why`, tap.h).  The run ends with one line of key=value
 * fields starting with `stress` (the harness reads that line, named by the
 * scenario's `summary_line`: `failed=0` is the verdict), then `term_stress: N passed, M failed` (stress-proof.sh
 * reads that one).  Exit status 0 only if every check passed.
 *
 * Programs (raw_tracepoint type, run with BPF_PROG_TEST_RUN, which returns
 * the program's result) and their normal results:
 *   ts_helper  main -> f1 -> f2, f2 calls the slow demo helper twice: 100;
 *              a terminated run returns 98..100 (stubbed helpers return -1)
 *   ts_text    main calls f 3 times, f counts a may_goto loop to K: 3K;
 *              terminated: 0..3K
 *   ts_short   a cheap helper and a constant: 7 always (entry/exit races)
 *   ts_tp      tracepoint (getpgid) version of ts_helper, attached with a
 *              perf-event link (the detach races and the fuzz's link)
 *   ts_tail    a tail call from a subprogram: no termination copy (EOPNOTSUPP)
 *   ts_timer   (tc) arms a bpf_timer whose callback sums 3 calls of f, K
 *              rounds each, into the map value: 3K; terminated: 0..3K
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <grp.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "raw_bpf.h"
#include "tap.h"

#define TRACE_DIR "/sys/kernel/tracing"
#define MAX_CPUS 8
#define TEXT_K 20000
#define TP_MAGIC 0x7e57a001
#define HELPER_NORMAL 100
#define SHORT_NORMAL 7


/* ------------------------------------------------------------ reporting */

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Summary fields, appended by each part: `key=value ...`. */
static char summary[4096];

static void field(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void field(const char *fmt, ...)
{
	size_t len = strlen(summary);
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(summary + len, sizeof(summary) - len, fmt, ap);
	va_end(ap);
}

/* ------------------------------------------------------------ helpers */

static uint64_t rng_state = 88172645463325252ull;

static uint64_t rnd(void)
{
	/* xorshift64: shared by threads without locking; quality is irrelevant. */
	uint64_t x = __atomic_load_n(&rng_state, __ATOMIC_RELAXED);

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	__atomic_store_n(&rng_state, x, __ATOMIC_RELAXED);
	return x;
}

static uint64_t rnd_below(uint64_t n)
{
	return n ? rnd() % n : 0;
}

static void sleep_us(uint64_t us)
{
	struct timespec d = { us / 1000000, (us % 1000000) * 1000 };

	nanosleep(&d, NULL);
}

/* Waits up to ~us for a random time: short ones by spinning (finer than nanosleep). */
static void random_wait_us(uint64_t max_us)
{
	uint64_t us = rnd_below(max_us + 1);

	if (us < 200)
		spin_ns(us * 1000);
	else
		sleep_us(us);
}

static unsigned int read_uint_file(const char *path)
{
	unsigned int v;

	if (!read_sysctl(path, &v))
		die(path);
	return v;
}

static void write_str_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_TRUNC);

	if (fd < 0 || write(fd, s, strlen(s)) < 0)
		die(path);
	close(fd);
}

static long terminate_raw(uint32_t id, uint32_t flags)
{
	return termlab_bpf_prog_terminate(id, flags);
}

/* ------------------------------------------------------------ programs */

static const struct bpf_insn helper_prog[] = {
	CALL_SUBPROG(2),			/* 0: -> f1 */
	ADD64_IMM(BPF_REG_0, HELPER_NORMAL),	/* 1 */
	EXIT(),					/* 2 */
	CALL_SUBPROG(1),			/* 3: f1 -> f2 */
	EXIT(),					/* 4 */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),	/* 5: f2 */
	MOV64_REG(BPF_REG_6, BPF_REG_0),	/* 6 */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),	/* 7 */
	ADD64_REG(BPF_REG_0, BPF_REG_6),	/* 8 */
	EXIT(),					/* 9 */
};

/*
 * The loop bound K comes from the context (args[0] of the test run), so the
 * verifier does not walk K iterations (with a constant bound it does, which
 * took half a minute per load under TCG), and one program serves the long
 * stress runs and the short runs of the exit race.
 */
/*
 * r7 = f(r8) + f(r8) + f(r8), in 8 instructions (at i to i+7: i+2 leaves the
 * loop after 3 calls, i+5 calls f, i+7 jumps back to i+2), followed by
 * @tail_len instructions of the caller's, then by f (SUM3_F).
 */
#define SUM3_CALLS(tail_len)						\
	MOV64_IMM(BPF_REG_6, 0),		/* calls */		\
	MOV64_IMM(BPF_REG_7, 0),		/* sum */		\
	JGT_IMM(BPF_REG_6, 2, 5),		/* -> the tail */	\
	ADD64_IMM(BPF_REG_6, 1),					\
	MOV64_REG(BPF_REG_1, BPF_REG_8),				\
	CALL_SUBPROG(2 + (tail_len)),		/* -> f */		\
	ADD64_REG(BPF_REG_7, BPF_REG_0),				\
	JA(-6)

/*
 * f(K): K rounds of a may_goto loop, 6 instructions (at j to j+5: j+1 is the
 * may_goto, j+4 the back-edge); returns the rounds made.
 */
#define SUM3_F								\
	MOV64_IMM(BPF_REG_0, 0),					\
	MAY_GOTO(3),							\
	ADD64_IMM(BPF_REG_0, 1),					\
	INSN(BPF_JMP | BPF_JGE | BPF_X, BPF_REG_0, BPF_REG_1, 1, 0),	\
	JA(-4),								\
	EXIT()

static const struct bpf_insn text_prog[] = {
	INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_8, BPF_REG_1, 0, 0),	/* 0: r8 = K */
	SUM3_CALLS(2),				/* 1-8: r7 = sum */
	MOV64_REG(BPF_REG_0, BPF_REG_7),	/* 9 */
	EXIT(),					/* 10 */
	SUM3_F,					/* 11-16: f(K) */
};
#define TEXT_LEN 17
_Static_assert(sizeof(text_prog) / sizeof(text_prog[0]) == TEXT_LEN, "text_prog is TEXT_LEN long");
/* Where the exit race's calibration starts. */
#define TEXT_SHORT_K 4000

static const struct bpf_insn short_prog[] = {
	CALL_HELPER(BPF_FUNC_get_smp_processor_id),
	MOV64_IMM(BPF_REG_0, SHORT_NORMAL),
	EXIT(),
};

/* Tracepoint sys_enter_getpgid: args[0] is at offset 16 of the context. */
static const struct bpf_insn tp_prog[] = {
	INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_2, BPF_REG_1, 16, 0),	/* 0 */
	MOV64_IMM(BPF_REG_0, 0),					/* 1 */
	INSN(BPF_JMP | BPF_JNE | BPF_K, BPF_REG_2, 0, 4, TP_MAGIC),	/* 2: -> 7 */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),				/* 3 */
	MOV64_REG(BPF_REG_6, BPF_REG_0),				/* 4 */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),				/* 5 */
	ADD64_REG(BPF_REG_0, BPF_REG_6),				/* 6 */
	EXIT(),								/* 7 */
};

enum { P_HELPER, P_TEXT, P_SHORT, NPROGS };
static const char *const prog_names[NPROGS] = { "ts_helper", "ts_text", "ts_short" };

struct prog {
	int fd;
	uint32_t id;
	uint64_t normal;
};

static struct prog load_prog(int kind)
{
	struct prog p = {};

	switch (kind) {
	case P_HELPER:
		p.fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, helper_prog, 10, "ts_helper", 0);
		p.normal = HELPER_NORMAL;
		break;
	case P_TEXT:
		p.fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, text_prog, TEXT_LEN, "ts_text", 0);
		p.normal = 3 * TEXT_K;
		break;
	case P_SHORT:
		p.fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, short_prog, 3, "ts_short", 0);
		p.normal = SHORT_NORMAL;
		break;
	}
	p.id = raw_prog_id(p.fd);
	return p;
}

/* Is @ret a possible result of a (terminated or not) run of @kind? */
static bool valid_result(int kind, uint64_t normal, uint32_t ret)
{
	switch (kind) {
	case P_HELPER:
		return ret >= HELPER_NORMAL - 2 && ret <= HELPER_NORMAL;
	case P_TEXT:
		return ret <= normal;
	default:
		return ret == normal;
	}
}

static int test_run(int fd, uint32_t *retval)
{
	return raw_test_run(fd, TEXT_K, 0, retval);
}

/* Number of runs counted by the kernel (needs stats enabled). */
static uint64_t run_cnt(int fd)
{
	struct bpf_prog_info info;

	raw_prog_info(fd, &info);
	return info.run_cnt;
}

static int enable_stats(void)
{
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.enable_stats.type = BPF_STATS_RUN_TIME;
	fd = sys_bpf(BPF_ENABLE_STATS, &attr, sizeof(attr));
	if (fd < 0)
		die("BPF_ENABLE_STATS");
	return fd;
}

/*
 * Does the object with this id exist?  @cmd is BPF_PROG_GET_FD_BY_ID or
 * BPF_LINK_GET_FD_BY_ID; prog_id and link_id share their place in the attr.
 */
static bool id_exists(int cmd, uint32_t id)
{
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.prog_id = id;
	fd = sys_bpf(cmd, &attr, sizeof(attr));
	if (fd >= 0) {
		close(fd);
		return true;
	}
	return false;
}

static bool prog_exists(uint32_t id)
{
	return id_exists(BPF_PROG_GET_FD_BY_ID, id);
}

static bool link_exists(uint32_t id)
{
	return id_exists(BPF_LINK_GET_FD_BY_ID, id);
}

static uint32_t link_id_of(int fd)
{
	struct bpf_link_info info;
	union bpf_attr attr;

	memset(&info, 0, sizeof(info));
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = fd;
	attr.info.info_len = sizeof(info);
	attr.info.info = (uintptr_t)&info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr)))
		die("BPF_OBJ_GET_INFO_BY_FD link");
	return info.id;
}

/* The tracepoint program attached to sys_enter_getpgid with a perf-event link. */
struct tp_attach {
	int prog_fd, perf_fd, link_fd;
	uint32_t id, link_id;
};

static struct tp_attach attach_tp(void)
{
	static int tp_id = -1;
	struct perf_event_attr pattr;
	struct tp_attach t;
	union bpf_attr attr;

	if (tp_id < 0)
		tp_id = read_uint_file(TRACE_DIR "/events/syscalls/sys_enter_getpgid/id");
	t.prog_fd = raw_load(BPF_PROG_TYPE_TRACEPOINT, tp_prog, 8, "ts_tp", 0);
	t.id = raw_prog_id(t.prog_fd);
	memset(&pattr, 0, sizeof(pattr));
	pattr.type = PERF_TYPE_TRACEPOINT;
	pattr.size = sizeof(pattr);
	pattr.config = tp_id;
	pattr.sample_period = 1;
	pattr.wakeup_events = 1;
	/* One event is enough: the tracepoint's program array runs on every CPU. */
	t.perf_fd = syscall(__NR_perf_event_open, &pattr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
	if (t.perf_fd < 0)
		die("perf_event_open sys_enter_getpgid");
	memset(&attr, 0, sizeof(attr));
	attr.link_create.prog_fd = t.prog_fd;
	attr.link_create.target_fd = t.perf_fd;
	attr.link_create.attach_type = BPF_PERF_EVENT;
	t.link_fd = sys_bpf(BPF_LINK_CREATE, &attr, sizeof(attr));
	if (t.link_fd < 0)
		die("BPF_LINK_CREATE perf event");
	if (ioctl(t.perf_fd, PERF_EVENT_IOC_ENABLE, 0))
		die("PERF_EVENT_IOC_ENABLE");
	t.link_id = link_id_of(t.link_fd);
	return t;
}

static void detach_tp(struct tp_attach *t)
{
	close(t->link_fd);
	close(t->perf_fd);
	close(t->prog_fd);
}

static void trigger_tp(void)
{
	syscall(SYS_getpgid, (pid_t)TP_MAGIC);
}

/* ------------------------------------------------------------ kernel state */

/* What must come back to its value after every program is unloaded. */
struct kstate {
	long progs;		/* loaded programs (BPF_PROG_GET_NEXT_ID) */
	long ksyms;		/* bpf_prog_* and bpf_term_* lines in /proc/kallsyms */
	long vmalloc_lines;	/* /proc/vmallocinfo lines of the BPF JIT allocator */
	long vmalloc_bytes;
};

static struct kstate kstate_now(void)
{
	struct kstate s = {};
	union bpf_attr attr;
	char line[512];
	FILE *f;

	memset(&attr, 0, sizeof(attr));
	while (!sys_bpf(BPF_PROG_GET_NEXT_ID, &attr, sizeof(attr))) {
		s.progs++;
		attr.start_id = attr.next_id;
	}
	f = fopen("/proc/kallsyms", "r");
	if (!f)
		die("/proc/kallsyms");
	while (fgets(line, sizeof(line), f))
		if (strstr(line, " bpf_prog_") || strstr(line, " bpf_term_"))
			s.ksyms += strstr(line, "[bpf]") != NULL;
	fclose(f);
	f = fopen("/proc/vmallocinfo", "r");
	if (!f)
		die("/proc/vmallocinfo");
	while (fgets(line, sizeof(line), f)) {
		long bytes;

		/* bpf_jit_alloc_exec() -> execmem_alloc() (the pack allocator's chunks too). */
		if ((strstr(line, "execmem") || strstr(line, "bpf_")) &&
		    sscanf(line, "%*s %ld", &bytes) == 1) {
			s.vmalloc_lines++;
			s.vmalloc_bytes += bytes;
		}
	}
	fclose(f);
	return s;
}

static bool kstate_equal(struct kstate a, struct kstate b)
{
	return a.progs == b.progs && a.ksyms == b.ksyms && a.vmalloc_lines == b.vmalloc_lines &&
	       a.vmalloc_bytes == b.vmalloc_bytes;
}

/* Programs are freed after an RCU grace period and a work item: wait for it. */
static void check_back_to_baseline(const char *what, struct kstate base)
{
	struct kstate now = kstate_now();
	uint64_t start = now_ns();

	while (!kstate_equal(now, base) && now_ns() - start < 20000000000ull) {
		sleep_us(100000);
		now = kstate_now();
	}
	check(kstate_equal(now, base), what,
	      "progs %ld->%ld, bpf kallsyms %ld->%ld, JIT vmalloc %ld lines/%ld bytes -> %ld/%ld (after %.1f s)",
	      base.progs, now.progs, base.ksyms, now.ksyms, base.vmalloc_lines, base.vmalloc_bytes,
	      now.vmalloc_lines, now.vmalloc_bytes, (now_ns() - start) / 1e9);
}

/* ------------------------------------------------------------ trace */

/*
 * The kernel's view of each termination: bpf:bpf_prog_terminate (one per CPU
 * moved to the copy: case, frames, lost) and bpf:bpf_prog_terminated_return.
 */
struct trace_counts {
	long stops, case1, case2, max_frames, lost, returns;
	long preempted;	/* stops of runs whose task was switched out (preempted=1) */
};

/*
 * One CPU stopped by BPF_PROG_TERMINATE, as its bpf_prog_terminate event
 * says: when (CLOCK_MONOTONIC, like the runs' own stamps), and where the run
 * continues in the copy (function, BPF instruction; -1 when unknown).
 */
struct stop_rec {
	uint64_t ts;
	uint32_t id;
	int cpu, func, insn;
};

static struct stop_rec *stop_recs;
static size_t stop_n, stop_cap;

static int trace_fd = -1;
static char trace_partial[4096];
static size_t trace_partial_len;
static uint32_t trace_ids[64];
static struct trace_counts trace_by[64];
static int trace_nids;

static void trace_start(void)
{
	write_str_file(TRACE_DIR "/events/bpf/enable", "0\n");
	write_str_file(TRACE_DIR "/events/bpf/bpf_prog_terminate/enable", "1\n");
	write_str_file(TRACE_DIR "/events/bpf/bpf_prog_terminated_return/enable", "1\n");
	write_str_file(TRACE_DIR "/trace", "");
	trace_fd = open(TRACE_DIR "/trace_pipe", O_RDONLY | O_NONBLOCK);
	if (trace_fd < 0)
		die(TRACE_DIR "/trace_pipe");
	trace_partial_len = 0;
	trace_nids = 0;
	memset(trace_by, 0, sizeof(trace_by));
	stop_n = 0;
}

/* "[003]": the CPU an event happened on, from the trace line before @event. */
static int trace_cpu(const char *line, const char *event)
{
	const char *open = strstr(line, " [");
	int cpu;

	if (!open || open > event || sscanf(open, " [%d]", &cpu) != 1)
		return -1;
	return cpu;
}

static void keep_stop(const char *line, const char *event, uint32_t id)
{
	const char *ts = strstr(event, " ts_ns="), *func = strstr(event, " func="), *insn = strstr(event, " insn=");
	struct stop_rec rec = { .id = id, .cpu = trace_cpu(line, event), .func = -1, .insn = -1 };
	unsigned long long t;

	if (!ts || sscanf(ts, " ts_ns=%llu", &t) != 1)
		return;
	rec.ts = t;
	if (func)
		sscanf(func, " func=%d", &rec.func);
	if (insn)
		sscanf(insn, " insn=%d", &rec.insn);
	if (stop_n == stop_cap) {
		stop_cap = stop_cap ? 2 * stop_cap : 1024;
		stop_recs = realloc(stop_recs, stop_cap * sizeof(*stop_recs));
		if (!stop_recs)
			die("realloc");
	}
	stop_recs[stop_n++] = rec;
}

static struct trace_counts *trace_slot(uint32_t id)
{
	for (int i = 0; i < trace_nids; i++)
		if (trace_ids[i] == id)
			return &trace_by[i];
	if (trace_nids == 64)
		return &trace_by[63];
	trace_ids[trace_nids] = id;
	return &trace_by[trace_nids++];
}

static void trace_line(const char *line)
{
	const char *p;
	unsigned int id;
	int c, frames, lost;

	/* Only stops of BPF_PROG_TERMINATE (a later series adds reason=budget). */
	if ((p = strstr(line, "bpf_prog_terminate: ")) && (!strstr(p, " reason=") || strstr(p, " reason=request")) &&
	    sscanf(p, "bpf_prog_terminate: prog_id=%u case=%d frames=%d lost=%d", &id, &c, &frames, &lost) == 4) {
		struct trace_counts *t = trace_slot(id);

		t->stops++;
		t->case1 += c == 1;
		t->case2 += c == 2;
		if (frames > t->max_frames)
			t->max_frames = frames;
		t->lost += lost;
		t->preempted += strstr(p, " preempted=1 ") != NULL;
		keep_stop(line, p, id);
	} else if ((p = strstr(line, "bpf_prog_terminated_return: ")) &&
		   sscanf(p, "bpf_prog_terminated_return: prog_id=%u", &id) == 1) {
		trace_slot(id)->returns++;
	}
}

static void trace_drain(void)
{
	char buf[16384];
	ssize_t n;

	while ((n = read(trace_fd, buf, sizeof(buf))) > 0) {
		for (ssize_t i = 0; i < n; i++) {
			if (buf[i] != '\n') {
				if (trace_partial_len < sizeof(trace_partial) - 1)
					trace_partial[trace_partial_len++] = buf[i];
				continue;
			}
			trace_partial[trace_partial_len] = 0;
			trace_line(trace_partial);
			trace_partial_len = 0;
		}
	}
}

static void trace_stop(void)
{
	/* The events of the last calls may still be in flight on the other CPUs. */
	sleep_us(50000);
	trace_drain();
	close(trace_fd);
	write_str_file(TRACE_DIR "/events/bpf/bpf_prog_terminate/enable", "0\n");
	write_str_file(TRACE_DIR "/events/bpf/bpf_prog_terminated_return/enable", "0\n");
}

static long trace_overruns(void)
{
	/* per_cpu/cpuN/stats "overrun: N": events lost because nobody read them in time. */
	long total = 0;

	for (int cpu = 0; cpu < MAX_CPUS; cpu++) {
		char path[128], line[128];
		FILE *f;

		snprintf(path, sizeof(path), TRACE_DIR "/per_cpu/cpu%d/stats", cpu);
		f = fopen(path, "r");
		if (!f)
			continue;
		while (fgets(line, sizeof(line), f)) {
			long n;

			if (sscanf(line, "overrun: %ld", &n) == 1)
				total += n;
		}
		fclose(f);
	}
	return total;
}

/* ------------------------------------------------------------ stress */

struct run_rec {
	uint64_t start, end;
	uint32_t ret;
	uint8_t kind;
	uint8_t err;
	uint8_t stops;		/* bpf_prog_terminate events in the run, on its CPU */
	int8_t func;		/* where the kernel says the stopped run continues */
	int16_t insn;
};

struct term_rec {
	uint64_t call, back;
	int ret;	/* CPUs stopped, or -errno */
	uint8_t kind;
};

static int ncpus;
static struct prog progs[NPROGS];
static volatile bool stop_runners;

struct runner_state {
	pthread_t thread;
	int cpu;
	struct run_rec *runs;
	size_t n, cap;
};

static void *stress_runner(void *arg)
{
	struct runner_state *r = arg;

	pin_to(r->cpu);
	while (!stop_runners) {
		/* ts_short most often: its runs are the entry/exit targets. */
		static const uint8_t mix[] = { P_HELPER, P_TEXT, P_SHORT, P_SHORT };
		struct run_rec rec = { .kind = mix[rnd_below(sizeof(mix))] };
		int err;

		rec.start = now_ns();
		err = test_run(progs[rec.kind].fd, &rec.ret);
		rec.end = now_ns();
		rec.err = err > 255 ? 255 : err;
		if (r->n == r->cap) {
			r->cap = r->cap ? 2 * r->cap : 4096;
			r->runs = realloc(r->runs, r->cap * sizeof(*r->runs));
			if (!r->runs)
				die("realloc");
		}
		r->runs[r->n++] = rec;
	}
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* The stress program a traced stop belongs to, or -1. */
static int stop_kind(const struct stop_rec *stop)
{
	for (int k = 0; k < NPROGS; k++)
		if (progs[k].id == stop->id)
			return k;
	return -1;
}

/*
 * The run of @kind on runner @r during which @stop happened, or NULL.  A
 * runner's runs follow one another on its CPU, so at most one contains it.
 */
static struct run_rec *run_at(struct runner_state *r, int kind, uint64_t ts)
{
	size_t lo = 0, hi = r->n;

	/* First run that started after ts; the one before it is the candidate. */
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (r->runs[mid].start <= ts)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (!lo || r->runs[lo - 1].end < ts || r->runs[lo - 1].kind != kind)
		return NULL;
	return &r->runs[lo - 1];
}

/*
 * The results a run of @kind can give when it continues in the termination
 * copy (helpers return -1, may_goto leaves its loop) from instruction @insn
 * of function @func, where the kernel's trace event says it continues:
 * [*lo, *hi].  Not an allowance for "stopped somewhere": each position has
 * its own prediction.
 *
 * ts_helper (functions main, f1, f2; f2 calls the slow helper at 0 and 2):
 * each real helper returns 0, each stubbed one -1, so the result is 100
 * minus the helper calls still ahead of the position.
 * ts_text (main, f): f's may_goto leaves its loop, or its back-edge leaves
 * f and main at once (0032), and main's back-edge (insn 8) is an exit
 * returning 0 in the copy (nothing is held there): from f, or from main
 * before its back-edge, the run returns 0, not the sum of its calls.  Only
 * at main's loop test (insn 3, which may leave the loop with the sum) or
 * after the loop is the result the sum: at most 3K.
 * ts_short: the helper's result is overwritten, 7 whatever happens.
 */
static void copy_results(int kind, int func, int insn, uint64_t *lo, uint64_t *hi)
{
	*lo = 0;
	switch (kind) {
	case P_HELPER: {
		int ahead = func == 2 ? (insn == 0 ? 2 : insn <= 2 ? 1 : 0) : insn == 0 ? 2 : 0;

		*lo = *hi = HELPER_NORMAL - ahead;
		return;
	}
	case P_TEXT:
		if (func == 1 || (func == 0 && insn != 3 && insn <= 8))
			*hi = 0;
		else
			*hi = 3 * TEXT_K;
		return;
	default:
		*lo = *hi = SHORT_NORMAL;
	}
}

/* What the stress's stops did to its runs, judged run by run. */
struct stop_verdict {
	long matched, unmatched, twice, predicted_exactly, mismatched, unexplained;
};

/*
 * Maps every traced stop to the run it landed in (its CPU, its time) and
 * judges each run: a stopped run gives what its copy gives from where the
 * kernel says it continues; a run without a stop gives its normal result.
 * The first problem of each kind is printed.
 */
static struct stop_verdict judge_stops(struct runner_state *runners, int nrunners)
{
	struct stop_verdict v = {};

	for (size_t i = 0; i < stop_n; i++) {
		const struct stop_rec *stop = &stop_recs[i];
		int kind = stop_kind(stop);
		struct run_rec *run = NULL;

		if (kind < 0)
			continue;
		if (stop->cpu >= 0 && stop->cpu < nrunners)
			run = run_at(&runners[stop->cpu], kind, stop->ts);
		if (!run) {
			if (!v.unmatched++)
				printf("# stop of %s on CPU %d at %llu ns: no run of it there then\n",
				       prog_names[kind], stop->cpu, (unsigned long long)stop->ts);
			continue;
		}
		v.matched++;
		if (run->stops++) {
			if (!v.twice++)
				printf("# a run of %s on CPU %d was stopped twice\n", prog_names[kind], stop->cpu);
		}
		run->func = stop->func;
		run->insn = stop->insn;
	}
	for (int i = 0; i < nrunners; i++) {
		for (size_t j = 0; j < runners[i].n; j++) {
			const struct run_rec *r = &runners[i].runs[j];
			uint64_t lo, hi;

			if (r->err)
				continue;
			if (!r->stops) {
				if (r->ret != progs[r->kind].normal && !v.unexplained++)
					printf("# unexplained: %s returned %u (normal %llu) on CPU %d, not stopped\n",
					       prog_names[r->kind], r->ret, (unsigned long long)progs[r->kind].normal,
					       runners[i].cpu);
				continue;
			}
			if (r->func < 0 || r->insn < 0) {
				/* A kernel whose event does not say where the run continues. */
				if (!v.mismatched++)
					printf("# a stop of %s without func= and insn= in its trace event\n",
					       prog_names[r->kind]);
				continue;
			}
			copy_results(r->kind, r->func, r->insn, &lo, &hi);
			v.predicted_exactly += lo == hi;
			if ((r->ret < lo || r->ret > hi) && !v.mismatched++)
				printf("# %s stopped to continue at function %d instruction %d returned %u, not %llu..%llu\n",
				       prog_names[r->kind], r->func, r->insn, r->ret, (unsigned long long)lo,
				       (unsigned long long)hi);
		}
	}
	return v;
}

static void do_stress(unsigned long cycles, unsigned int delay_ms, unsigned int skip_rewrite)
{
	struct runner_state runners[MAX_CPUS] = {};
	struct term_rec *terms = calloc(cycles, sizeof(*terms));
	unsigned int old_delay = read_uint_file(DEMO_DELAY_SYSCTL);
	struct kstate base = kstate_now();
	long stopped = 0, esrch = 0, already = 0, again = 0, bad_ret = 0, first_bad = 0;
	bool stopped_before[NPROGS] = {};
	long runs = 0, run_errors = 0, abnormal = 0, invalid = 0, per_kind_stops[NPROGS] = {};
	struct stop_verdict verdict;
	long trace_stops = 0, trace_returns = 0, trace_lost = 0, case1 = 0, case2 = 0, max_frames = 0;
	long overrun_before = trace_overruns();
	uint64_t t0 = now_ns();
	int nrunners = ncpus;

	if (!terms)
		die("calloc");
	for (int k = 0; k < NPROGS; k++)
		progs[k] = load_prog(k);
	printf("# stress: %d programs loaded in %.1f s\n", NPROGS, (now_ns() - t0) / 1e9);
	{
		/* The measures must see loaded programs, or "back to baseline" proves nothing. */
		struct kstate loaded = kstate_now();

		check(loaded.progs >= base.progs + NPROGS && loaded.ksyms >= base.ksyms + 2 * NPROGS &&
		      loaded.vmalloc_lines > base.vmalloc_lines,
		      "stress: the leak measures see the loaded programs and their copies",
		      "progs %ld->%ld, bpf kallsyms %ld->%ld, JIT/prog vmalloc %ld->%ld lines (%ld->%ld bytes)",
		      base.progs, loaded.progs, base.ksyms, loaded.ksyms, base.vmalloc_lines, loaded.vmalloc_lines,
		      base.vmalloc_bytes, loaded.vmalloc_bytes);
	}
	write_sysctl(DEMO_DELAY_SYSCTL, delay_ms);

	/* Each program's normal result, before any terminate. */
	for (int k = 0; k < NPROGS; k++) {
		uint32_t ret = 0;
		int err = test_run(progs[k].fd, &ret);

		check(!err && ret == progs[k].normal, "stress: an unterminated run gives the normal result",
		      "%s: err=%d result=%u, expected %llu", prog_names[k], err, ret,
		      (unsigned long long)progs[k].normal);
	}

	trace_start();
	if (skip_rewrite)
		write_sysctl(FAULT_SKIP_REWRITE_SYSCTL, skip_rewrite);
	stop_runners = false;
	for (int i = 0; i < nrunners; i++) {
		runners[i].cpu = i;
		pthread_create(&runners[i].thread, NULL, stress_runner, &runners[i]);
	}
	/* The terminator: CPU 0, random target, random moment. */
	pin_to(0);
	for (unsigned long i = 0; i < cycles; i++) {
		struct term_rec *t = &terms[i];
		long ret;

		/* Mostly the long programs: their runs are where stops land. */
		t->kind = rnd_below(5) < 2 ? P_HELPER : rnd_below(3) ? P_TEXT : P_SHORT;
		random_wait_us(t->kind == P_SHORT ? 100 : 2 * delay_ms * 1000 + 500);
		t->call = now_ns();
		ret = terminate_raw(progs[t->kind].id, 0);
		t->ret = ret < 0 ? -errno : (int)ret;
		t->back = now_ns();
		if (t->ret > 0 && t->ret < ncpus) {
			stopped += t->ret;
			per_kind_stops[t->kind] += t->ret;
			stopped_before[t->kind] = true;
		} else if (t->ret == -ESRCH) {
			esrch++;
		} else if (t->ret == -EAGAIN) {
			/* A run at its entry or exit on every try: nothing stopped. */
			again++;
		} else if (t->ret == -EALREADY && stopped_before[t->kind]) {
			/*
			 * The calls come at most two delays apart: a run an
			 * earlier call stopped may still be in its slow call.
			 */
			already++;
		} else if (!bad_ret++) {
			first_bad = t->ret;
		}
		if (i % 16 == 15)
			trace_drain();
	}
	stop_runners = true;
	for (int i = 0; i < nrunners; i++)
		pthread_join(runners[i].thread, NULL);
	trace_stop();
	if (skip_rewrite)
		write_sysctl(FAULT_SKIP_REWRITE_SYSCTL, 0);
	write_sysctl(DEMO_DELAY_SYSCTL, old_delay);

	for (int k = 0; k < NPROGS; k++) {
		struct trace_counts *t = trace_slot(progs[k].id);

		trace_stops += t->stops;
		trace_returns += t->returns;
		trace_lost += t->lost;
		case1 += t->case1;
		case2 += t->case2;
		if (t->max_frames > max_frames)
			max_frames = t->max_frames;
	}

	/* Every run: no error, a possible result; then what the stops did to them. */
	for (int i = 0; i < nrunners; i++) {
		for (size_t j = 0; j < runners[i].n; j++) {
			struct run_rec *r = &runners[i].runs[j];

			runs++;
			if (r->err) {
				run_errors++;
				continue;
			}
			if (!valid_result(r->kind, progs[r->kind].normal, r->ret)) {
				if (!invalid++)
					printf("# invalid result: %s returned %u\n", prog_names[r->kind], r->ret);
				continue;
			}
			abnormal += r->ret != progs[r->kind].normal;
		}
	}
	verdict = judge_stops(runners, nrunners);
	for (int i = 0; i < nrunners; i++)
		free(runners[i].runs);

	{
		/* How long a successful terminate call took (IPIs sent and handled). */
		uint64_t *lat = calloc(cycles, sizeof(*lat));
		unsigned long m = 0;

		for (unsigned long k = 0; k < cycles; k++)
			if (terms[k].ret > 0)
				lat[m++] = terms[k].back - terms[k].call;
		qsort(lat, m, sizeof(*lat), cmp_u64);
		if (m)
			field(" stress_call_us_p50=%llu stress_call_us_p99=%llu stress_call_us_max=%llu",
			      (unsigned long long)lat[m / 2] / 1000, (unsigned long long)lat[m * 99 / 100] / 1000,
			      (unsigned long long)lat[m - 1] / 1000);
		free(lat);
	}
	check(bad_ret == 0, "stress: every terminate returned 1..CPUs-1, ESRCH, EAGAIN, or EALREADY after a stop",
	      "%lu calls, %ld stopped CPUs, %ld ESRCH, %ld EAGAIN, %ld EALREADY, %ld other (first %ld)", cycles,
	      stopped, esrch, again, already, bad_ret, first_bad);
	check(run_errors == 0 && invalid == 0, "stress: every run succeeded with a possible result",
	      "%ld runs, %ld test-run errors, %ld impossible results", runs, run_errors, invalid);
	check(verdict.unmatched == 0 && verdict.twice == 0,
	      "stress: every stop the kernel traced landed in a run of that program on that CPU, each run stopped at most once",
	      "%ld stops in runs, %ld outside any run, %ld runs stopped twice", verdict.matched, verdict.unmatched,
	      verdict.twice);
	check(verdict.mismatched == 0,
	      "stress: every stopped run gave the result its copy gives from where the kernel says it continues",
	      "%ld stopped runs (%ld with one exact result predicted), %ld gave another result", verdict.matched,
	      verdict.predicted_exactly, verdict.mismatched);
	check(verdict.unexplained == 0, "stress: every run that was not stopped gave its normal result",
	      "%ld runs, %ld with a terminated result, %ld of them not stopped", runs, abnormal,
	      verdict.unexplained);
	check(trace_stops == stopped || trace_overruns() != overrun_before,
	      "stress: the kernel traced one bpf_prog_terminate per stopped CPU",
	      "%ld traced, %ld returned by the calls, trace overruns %ld", trace_stops, stopped,
	      trace_overruns() - overrun_before);
	check(trace_returns <= trace_stops && trace_returns >= abnormal,
	      "stress: terminated runs returned (traced) no more often than stopped, and at least once per terminated result",
	      "%ld terminated returns, %ld stops, %ld terminated results", trace_returns, trace_stops, abnormal);
	check(trace_lost == 0, "stress: no address without an equivalent in the copy", "lost=%ld", trace_lost);
	if (cycles >= 100)
		check(case1 > 0 && case2 > 0 && max_frames >= 2,
		      "stress: stops landed in helpers (case 1), in BPF text (case 2) and in subprogram frames",
		      "case1=%ld case2=%ld max_frames=%ld short_prog_stops=%ld", case1, case2, max_frames,
		      per_kind_stops[P_SHORT]);

	/* Programs still work normally after all this. */
	for (int k = 0; k < NPROGS; k++) {
		uint32_t ret = 0;
		int err = test_run(progs[k].fd, &ret);

		check(!err && ret == progs[k].normal, "stress: a run after the stress gives the normal result",
		      "%s: err=%d result=%u", prog_names[k], err, ret);
		close(progs[k].fd);
	}
	check_back_to_baseline("stress: programs, kallsyms and JIT memory back to the baseline after unload", base);
	field(" stress_cycles=%lu stress_stopped=%ld stress_esrch=%ld stress_already=%ld"
	      " stress_short_stopped=%ld stress_runs=%ld"
	      " stress_terminated_runs=%ld"
	      " stress_case1=%ld stress_case2=%ld stress_max_frames=%ld stress_s=%.1f",
	      cycles, stopped, esrch, already, per_kind_stops[P_SHORT], runs, abnormal, case1, case2, max_frames,
	      (now_ns() - t0) / 1e9);
	free(terms);
}

/* ------------------------------------------------------------ races */

/* A test run in a thread of its own: on @packet_len bytes, or with args[0] = @arg. */
struct one_run {
	int fd, cpu;
	uint64_t arg;
	unsigned int packet_len;
	volatile int started;
	int err;
	uint32_t ret;
	uint64_t start, end;
};

static void *one_run_thread(void *arg)
{
	struct one_run *r = arg;

	pin_to(r->cpu);
	r->start = now_ns();
	__atomic_store_n(&r->started, 1, __ATOMIC_SEQ_CST);
	r->err = raw_test_run(r->fd, r->arg, r->packet_len, &r->ret);
	r->end = now_ns();
	return NULL;
}

/* Starts @r's run on its CPU and returns as its thread is about to make the call. */
static void start_one_run(struct one_run *r, pthread_t *t)
{
	pthread_create(t, NULL, one_run_thread, r);
	while (!__atomic_load_n(&r->started, __ATOMIC_SEQ_CST))
		sched_yield();
}

static void start_run_arg(struct one_run *r, pthread_t *t, int fd, int cpu, uint64_t arg)
{
	*r = (struct one_run){ .fd = fd, .cpu = cpu, .arg = arg };
	start_one_run(r, t);
}

static void wait_go(volatile int *go)
{
	while (!__atomic_load_n(go, __ATOMIC_SEQ_CST))
		sched_yield();
}

static void start_run(struct one_run *r, pthread_t *t, int fd, int cpu)
{
	start_run_arg(r, t, fd, cpu, TEXT_K);
}

/*
 * A stop on 1..max CPUs, not running (ESRCH), or a run found entering or
 * leaving the program on each of the kernel's tries (EAGAIN: nothing
 * stopped, and the run's own checks then require its normal result).
 */
static bool ok_ret(long ret, int max)
{
	return (ret > 0 && ret <= max) || ret == -ESRCH || ret == -EAGAIN;
}

/*
 * The K (a loop bound) for which a run that @measure times takes a few
 * milliseconds, its duration in *@dur: under TCG on a busy host the IPI
 * itself can take a millisecond, and a shorter run ends before any handler
 * runs.  The median of three: one run can be slowed down by a console write.
 */
static uint64_t calibrate_k(uint64_t (*measure)(void *ctx, uint64_t k), void *ctx, uint64_t *dur)
{
	uint64_t k;

	for (k = TEXT_SHORT_K; k < 8000000; k *= 2) {
		uint64_t d[3];

		for (int i = 0; i < 3; i++)
			d[i] = measure(ctx, k);
		qsort(d, 3, sizeof(d[0]), cmp_u64);
		*dur = d[1];
		if (*dur >= 4000000)
			break;
	}
	return k;
}

/* How long a run of the program (ctx: its fd) with args[0] = @k takes on CPU 1. */
static uint64_t text_run_ns(void *ctx, uint64_t k)
{
	struct one_run r;
	pthread_t t;

	start_run_arg(&r, &t, *(int *)ctx, 1, k);
	pthread_join(t, NULL);
	return r.end - r.start;
}

static uint64_t calibrate_text_run(int fd, uint64_t *dur)
{
	return calibrate_k(text_run_ns, &fd, dur);
}

/*
 * The races timed by a calibration (calibrate_text_run(), the timer race's
 * calibrate_timer()) run in rounds of n iterations, each calibrated anew,
 * until both of the outcomes they must show have occurred, at most
 * RACE_ROUNDS.  A calibration during a load spike of the host misjudges a
 * run's length for the rest of the round: in a CI run of 2026-12-06 runs
 * calibrated at 4.8 ms, and stopped at a random moment of that, were mostly
 * over before the stop (2 stops of 100, none before the tail call).
 */
#define RACE_ROUNDS 4

/* Terminate vs the program's exit: a short BPF-text run, terminated around its end. */
static void race_exit(unsigned long n)
{
	int fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, text_prog, TEXT_LEN, "ts_text", 0);
	uint32_t id = raw_prog_id(fd), normal;
	long stopped = 0, esrch = 0, bad = 0, bad_run = 0, abnormal = 0;
	uint64_t dur = 0, k = 0;
	unsigned long i = 0;
	int round;

	pin_to(0);
	for (round = 1; round <= RACE_ROUNDS && !(stopped > 0 && esrch > 0); round++) {
		k = calibrate_text_run(fd, &dur);
		normal = 3 * k;
		for (unsigned long end = i + n; i < end; i++) {
			struct one_run r;
			pthread_t t;
			long ret;

			start_run_arg(&r, &t, fd, 1, k);
			spin_ns(rnd_below(2 * dur));
			ret = terminate_raw(id, 0);
			ret = ret < 0 ? -errno : ret;
			pthread_join(t, NULL);
			stopped += ret == 1;
			esrch += ret == -ESRCH;
			bad += !ok_ret(ret, 1);
			if (r.err || r.ret > normal || (r.ret != normal && ret != 1))
				bad_run++;
			abnormal += !r.err && r.ret < normal;
		}
	}
	check(!bad && !bad_run && stopped > 0 && esrch > 0, "race: terminate vs program exit",
	      "%lu iterations in %d round(s) (last run ~%llu us, K=%llu): %ld stopped, %ld ESRCH (both must "
	      "occur), %ld bad returns, %ld bad runs, %ld terminated results", i, round - 1,
	      (unsigned long long)dur / 1000, (unsigned long long)k, stopped, esrch, bad, bad_run, abnormal);
	field(" race_exit=%lu race_exit_stopped=%ld race_exit_esrch=%ld", i, stopped, esrch);
	close(fd);
}

/* Terminate vs unload: terminate, close the link and the program's fds, all concurrently. */
struct unload_ctx {
	volatile int go;
	uint64_t term_delay_us, unload_delay_us;
	uint32_t id;
	int fds[3];
	long term_ret;
};

static void *unload_terminator(void *arg)
{
	struct unload_ctx *c = arg;
	long ret;

	pin_to(0);
	wait_go(&c->go);
	random_wait_us(c->term_delay_us);
	ret = terminate_raw(c->id, 0);
	c->term_ret = ret < 0 ? -errno : ret;
	return NULL;
}

static void *unloader(void *arg)
{
	struct unload_ctx *c = arg;

	pin_to(ncpus > 2 ? 2 : 0);
	wait_go(&c->go);
	random_wait_us(c->unload_delay_us);
	for (int i = 0; i < 3; i++)
		close(c->fds[i]);
	return NULL;
}

static void race_unload(unsigned long n, unsigned int delay_ms)
{
	long stopped = 0, esrch = 0, enoent = 0, bad = 0, bad_run = 0, lingering = 0, ran = 0;

	for (unsigned long i = 0; i < n; i++) {
		struct unload_ctx c = { .term_delay_us = 2 * delay_ms * 1000, .unload_delay_us = 2 * delay_ms * 1000 };
		struct prog p = load_prog(P_HELPER);
		pthread_t rt, tt, ut;
		struct one_run r;
		union bpf_attr attr;
		uint64_t start;
		int link_fd, run_fd = dup(p.fd);

		memset(&attr, 0, sizeof(attr));
		attr.raw_tracepoint.name = (uintptr_t)"task_rename";
		attr.raw_tracepoint.prog_fd = p.fd;
		link_fd = sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &attr, sizeof(attr));
		if (link_fd < 0 || run_fd < 0)
			die("BPF_RAW_TRACEPOINT_OPEN task_rename / dup");
		c.id = p.id;
		c.fds[0] = link_fd;
		c.fds[1] = p.fd;
		c.fds[2] = run_fd;	/* the runner's own fd: closed while its run may be in flight */
		pthread_create(&tt, NULL, unload_terminator, &c);
		pthread_create(&ut, NULL, unloader, &c);
		start_run(&r, &rt, run_fd, 1);
		__atomic_store_n(&c.go, 1, __ATOMIC_SEQ_CST);
		pthread_join(tt, NULL);
		pthread_join(ut, NULL);
		pthread_join(rt, NULL);
		stopped += c.term_ret == 1;
		esrch += c.term_ret == -ESRCH;
		enoent += c.term_ret == -ENOENT;
		bad += !ok_ret(c.term_ret, 1) && c.term_ret != -ENOENT;
		/* The run either did not start (its fd was closed first) or gave a possible result. */
		if (!r.err) {
			ran++;
			if (!valid_result(P_HELPER, HELPER_NORMAL, r.ret) || (r.ret != HELPER_NORMAL && c.term_ret != 1))
				bad_run++;
		} else if (r.err != EBADF) {
			bad_run++;
		}
		start = now_ns();
		while (prog_exists(p.id) && now_ns() - start < 5000000000ull)
			sleep_us(1000);
		lingering += prog_exists(p.id);
	}
	check(!bad && !bad_run && !lingering && stopped > 0, "race: terminate vs unload (close link + fds)",
	      "%lu iterations: %ld stopped, %ld ESRCH, %ld ENOENT, %ld bad returns, %ld runs (%ld bad), "
	      "%ld programs still loaded after their last reference", n, stopped, esrch, enoent, bad, ran, bad_run,
	      lingering);
	field(" race_unload=%lu race_unload_stopped=%ld", n, stopped);
}

/*
 * Two terminates of the same program at the same moment: one run, so at most
 * one of them stops it; the other finds it stopped (EALREADY) or gone (ESRCH).
 */
struct dual_ctx {
	volatile int go;
	uint32_t id;
	long ret[2];
};

struct dual_arg {
	struct dual_ctx *c;
	int slot, cpu;
};

static void *dual_terminator(void *arg)
{
	struct dual_arg *a = arg;
	long ret;

	pin_to(a->cpu);
	wait_go(&a->c->go);
	ret = terminate_raw(a->c->id, 0);
	a->c->ret[a->slot] = ret < 0 ? -errno : ret;
	return NULL;
}

static void race_dual(unsigned long n, unsigned int delay_ms)
{
	struct prog p = load_prog(P_HELPER);
	int run_cpu = ncpus - 1;
	long both = 0, one = 0, none = 0, already = 0, bad = 0, bad_run = 0;

	pin_to(0);
	for (unsigned long i = 0; i < n; i++) {
		struct dual_ctx c = { .id = p.id };
		int already_here;
		struct dual_arg a[2] = { { &c, 0, 0 }, { &c, 1, ncpus > 2 ? 1 : 0 } };
		pthread_t rt, t0, t1;
		struct one_run r;
		int stops;

		pthread_create(&t0, NULL, dual_terminator, &a[0]);
		pthread_create(&t1, NULL, dual_terminator, &a[1]);
		start_run(&r, &rt, p.fd, run_cpu);
		random_wait_us(5 * delay_ms * 1000 / 2);
		__atomic_store_n(&c.go, 1, __ATOMIC_SEQ_CST);
		pthread_join(t0, NULL);
		pthread_join(t1, NULL);
		pthread_join(rt, NULL);
		stops = (c.ret[0] == 1) + (c.ret[1] == 1);
		already_here = (c.ret[0] == -EALREADY) + (c.ret[1] == -EALREADY);
		both += stops == 2;
		one += stops == 1;
		none += stops == 0;
		already += already_here;
		/* EALREADY only beside the call that did stop the run. */
		bad += (!ok_ret(c.ret[0], 1) && c.ret[0] != -EALREADY) ||
		       (!ok_ret(c.ret[1], 1) && c.ret[1] != -EALREADY) ||
		       (already_here && (already_here > 1 || stops != 1));
		if (r.err || !valid_result(P_HELPER, HELPER_NORMAL, r.ret) || (r.ret != HELPER_NORMAL && !stops))
			bad_run++;
	}
	check(!bad && !bad_run && !both && one > 0,
	      "race: two concurrent terminates of the same program, one run stopped and counted once",
	      "%lu iterations (terminators on CPUs 0 and %d, run on CPU %d): both claimed the stop %ld, one %ld, "
	      "neither %ld, EALREADY %ld, %ld bad returns, %ld bad runs", n, ncpus > 2 ? 1 : 0, run_cpu, both,
	      one, none, already, bad, bad_run);
	field(" race_dual=%lu race_dual_one=%ld race_dual_already=%ld", n, one, already);
	close(p.fd);
}

/* One terminate for a program running on two CPUs at once. */
static void race_two_cpus(unsigned long n, unsigned int delay_ms)
{
	struct prog p;
	long two = 0, one = 0, none = 0, bad = 0, bad_run = 0;

	if (ncpus < 3) {
		skip("race: terminate a program running on 2 CPUs at once", "needs 3 CPUs (1 terminating)");
		return;
	}
	p = load_prog(P_HELPER);
	pin_to(0);
	for (unsigned long i = 0; i < n; i++) {
		struct one_run r[2];
		pthread_t t[2];
		long ret;
		int terminated;

		start_run(&r[0], &t[0], p.fd, 1);
		start_run(&r[1], &t[1], p.fd, 2);
		random_wait_us(delay_ms * 1000);
		ret = terminate_raw(p.id, 0);
		ret = ret < 0 ? -errno : ret;
		pthread_join(t[0], NULL);
		pthread_join(t[1], NULL);
		two += ret == 2;
		one += ret == 1;
		none += ret == -ESRCH;
		bad += !ok_ret(ret, 2);
		terminated = 0;
		for (int c = 0; c < 2; c++) {
			if (r[c].err || !valid_result(P_HELPER, HELPER_NORMAL, r[c].ret))
				bad_run++;
			terminated += !r[c].err && r[c].ret != HELPER_NORMAL;
		}
		if (terminated > (ret > 0 ? ret : 0))
			bad_run++;
	}
	check(!bad && !bad_run && two > 0, "race: terminate a program running on 2 CPUs at once",
	      "%lu iterations: 2 CPUs stopped %ld, 1 %ld, ESRCH %ld, %ld bad returns, %ld bad runs",
	      n, two, one, none, bad, bad_run);
	field(" race_two_cpus=%lu race_two_cpus_both=%ld", n, two);
	close(p.fd);
}

/* BPF_F_TERMINATE_DETACH while getpgid() triggers keep coming on the other CPUs. */
static volatile bool stop_triggers;
static long trigger_count[MAX_CPUS];

static void *trigger_thread(void *arg)
{
	int cpu = (int)(long)arg;

	pin_to(cpu);
	while (!stop_triggers) {
		trigger_tp();
		__atomic_add_fetch(&trigger_count[cpu], 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static long triggers_total(void)
{
	long n = 0;

	for (int i = 0; i < MAX_CPUS; i++)
		n += __atomic_load_n(&trigger_count[i], __ATOMIC_RELAXED);
	return n;
}

/* Waits until the trigger threads made at least @k more calls. */
static void wait_triggers(long k)
{
	long target = triggers_total() + k;
	uint64_t start = now_ns();

	while (triggers_total() < target && now_ns() - start < 5000000000ull)
		sleep_us(200);
}

static void race_detach(unsigned long n, unsigned int delay_ms)
{
	long detached = 0, esrch = 0, bad = 0, still_runs = 0, link_lost = 0, no_triggers = 0;
	int ntrig = ncpus - 1;

	pin_to(0);
	for (unsigned long i = 0; i < n; i++) {
		struct tp_attach t = attach_tp();
		pthread_t th[MAX_CPUS];
		uint64_t c1, c2, c3;
		long ret, t1;

		stop_triggers = false;
		for (int c = 0; c < ntrig; c++)
			pthread_create(&th[c], NULL, trigger_thread, (void *)(long)(c + 1));
		wait_triggers(1);
		random_wait_us(2 * delay_ms * 1000);
		ret = terminate_raw(t.id, TERMLAB_BPF_F_TERMINATE_DETACH);
		ret = ret < 0 ? -errno : ret;
		/* Runs that had begun before the detach may still finish: one per CPU. */
		c1 = run_cnt(t.prog_fd);
		t1 = triggers_total();
		wait_triggers(2 * ntrig + 2);
		c2 = run_cnt(t.prog_fd);
		wait_triggers(2 * ntrig + 2);
		c3 = run_cnt(t.prog_fd);
		/* Without triggers after the call, "no run afterwards" would prove nothing. */
		if (triggers_total() - t1 < 4 * ntrig + 4)
			no_triggers++;
		stop_triggers = true;
		for (int c = 0; c < ntrig; c++)
			pthread_join(th[c], NULL);
		if (ret > 0 && ret <= ntrig) {
			detached++;
			if (c2 - c1 > (uint64_t)ntrig || c3 != c2)
				still_runs++;
		} else if (ret == -ESRCH) {
			esrch++;
			if (c3 <= c1)
				link_lost++;	/* not stopped: nothing may be detached */
		} else {
			bad++;
		}
		detach_tp(&t);
	}
	check(!bad && !still_runs && !link_lost && !no_triggers && detached > 0,
	      "race: BPF_F_TERMINATE_DETACH while triggers keep coming",
	      "%lu iterations: %ld detached (%ld still ran afterwards), %ld ESRCH (%ld of them lost their link), "
	      "%ld bad returns, %ld without triggers after the call", n, detached, still_runs, esrch, link_lost, bad,
	      no_triggers);
	field(" race_detach=%lu race_detach_stopped=%ld", n, detached);
}

/*
 * Concurrent detaches of one perf-event link.  A perf_event program's link
 * detach clears the event's program and drops the event's reference to it;
 * two detaches at once must drop it once.  Checked by its effect: with the
 * program's fd closed, the link alone must still hold the program.  Each
 * pair gets a new program and event (reusing them, the previous series
 * lost no program in 1000 pairs; new ones, 15).
 */
static const struct bpf_insn perf_prog[] = {
	MOV64_IMM(BPF_REG_0, 1),
	EXIT(),
};

struct detach_racer {
	int cpu, link_fd;
	volatile int *ready;
	long ret;
};

static void *detach_racer(void *arg)
{
	struct detach_racer *r = arg;
	union bpf_attr attr;

	pin_to(r->cpu);
	memset(&attr, 0, sizeof(attr));
	attr.link_detach.link_fd = r->link_fd;
	__atomic_add_fetch(r->ready, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(r->ready, __ATOMIC_SEQ_CST) < 2)
		;
	r->ret = sys_bpf(BPF_LINK_DETACH, &attr, sizeof(attr)) < 0 ? -errno : 0;
	return NULL;
}

static void race_concurrent_detach(unsigned long n)
{
	long lost = 0, failed_detach = 0;
	struct perf_event_attr pattr;
	uint64_t t0 = now_ns();

	memset(&pattr, 0, sizeof(pattr));
	pattr.type = PERF_TYPE_SOFTWARE;
	pattr.size = sizeof(pattr);
	pattr.config = PERF_COUNT_SW_CPU_CLOCK;
	/* Sampling (a program needs it), overflowing every 100 us of this thread. */
	pattr.sample_period = 100000;
	for (unsigned long i = 0; i < n; i++) {
		int prog_fd = raw_load(BPF_PROG_TYPE_PERF_EVENT, perf_prog, 2, "ts_perf", 0);
		uint32_t id = raw_prog_id(prog_fd);
		struct detach_racer r[2];
		volatile int ready = 0;
		union bpf_attr attr;
		int perf_fd, link_fd;
		pthread_t th[2];

		perf_fd = syscall(__NR_perf_event_open, &pattr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
		if (perf_fd < 0)
			die("perf_event_open cpu-clock");
		memset(&attr, 0, sizeof(attr));
		attr.link_create.prog_fd = prog_fd;
		attr.link_create.target_fd = perf_fd;
		attr.link_create.attach_type = BPF_PERF_EVENT;
		link_fd = sys_bpf(BPF_LINK_CREATE, &attr, sizeof(attr));
		if (link_fd < 0)
			die("BPF_LINK_CREATE cpu-clock perf event");
		for (int c = 0; c < 2; c++) {
			r[c] = (struct detach_racer){ .cpu = c % ncpus, .link_fd = link_fd, .ready = &ready };
			pthread_create(&th[c], NULL, detach_racer, &r[c]);
		}
		for (int c = 0; c < 2; c++)
			pthread_join(th[c], NULL);
		if (r[0].ret || r[1].ret)
			failed_detach++;
		close(prog_fd);
		if (!prog_exists(id))
			lost++;
		close(link_fd);
		close(perf_fd);
	}
	check(!lost && !failed_detach, "race: two concurrent BPF_LINK_DETACH of one perf_event link",
	      "%lu pairs: %ld lost the program while its link still held it (reference dropped twice), "
	      "%ld detach calls failed", n, lost, failed_detach);
	field(" race_concurrent_detach=%lu race_concurrent_detach_s=%.1f", n, (now_ns() - t0) / 1e9);
}

/*
 * Terminate vs preemption (issue 14, point 1).  The run is ts_helper's
 * instructions as a socket filter on a unix datagram socket pair: it runs in
 * the task that sends, in sk_filter() with only migration disabled, and
 * shares its CPU with a task that spins, so a preemptible kernel switches it
 * out and in at the scheduler's will and the terminates land on runs both
 * running and preempted.  Every other iteration the run is on the caller's
 * own CPU, where a terminate only happens while the run is switched out.
 * The filter trims the 200-byte datagram to what it returns, so the length
 * received is the run's result, judged as the other races judge ts_helper's.
 * On a preemptible kernel some stops must be of preempted runs (their
 * bpf_prog_terminate event says preempted=1).
 */
#define SOCK_DATAGRAM 200

struct spinner {
	int cpu;
	volatile int stop;
};

static void *spinner_thread(void *arg)
{
	struct spinner *sp = arg;

	pin_to(sp->cpu);
	while (!__atomic_load_n(&sp->stop, __ATOMIC_SEQ_CST))
		;
	return NULL;
}

struct send_run {
	int fd, cpu;
	volatile int started;
	int err;
};

static void *send_thread(void *arg)
{
	struct send_run *r = arg;
	char buf[SOCK_DATAGRAM] = {};

	pin_to(r->cpu);
	__atomic_store_n(&r->started, 1, __ATOMIC_SEQ_CST);
	r->err = send(r->fd, buf, sizeof(buf), 0) == sizeof(buf) ? 0 : errno;
	return NULL;
}

static void race_preempted(unsigned long n, unsigned int delay_ms)
{
	int fd = raw_load(BPF_PROG_TYPE_SOCKET_FILTER, helper_prog, 10, "ts_sock", 0);
	uint32_t id = raw_prog_id(fd);
	long stopped = 0, here = 0, bad = 0, bad_run = 0, preempted;
	bool preemptible = raw_kernel_preemptible();
	char buf[SOCK_DATAGRAM];
	int sv[2];

	raw_filter_socket(fd, sv);
	pin_to(0);
	trace_start();
	for (unsigned long i = 0; i < n; i++) {
		int cpu = i % 2 ? 0 : ncpus - 1;
		struct spinner sp = { .cpu = cpu };
		struct send_run r = { .fd = sv[0], .cpu = cpu };
		pthread_t st, rt;
		ssize_t len;
		long ret;

		pthread_create(&st, NULL, spinner_thread, &sp);
		pthread_create(&rt, NULL, send_thread, &r);
		while (!__atomic_load_n(&r.started, __ATOMIC_SEQ_CST))
			sched_yield();
		random_wait_us(2 * delay_ms * 1000);
		ret = terminate_raw(id, 0);
		ret = ret < 0 ? -errno : ret;
		pthread_join(rt, NULL);
		__atomic_store_n(&sp.stop, 1, __ATOMIC_SEQ_CST);
		pthread_join(st, NULL);
		len = recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT);
		stopped += ret == 1;
		here += ret == 1 && cpu == 0;
		bad += !ok_ret(ret, 1);
		if (r.err || len < 0 || !valid_result(P_HELPER, HELPER_NORMAL, len) ||
		    (len != HELPER_NORMAL && ret != 1))
			bad_run++;
		trace_drain();
	}
	trace_stop();
	preempted = trace_slot(id)->preempted;
	check(!bad && !bad_run && stopped > 0 && (!preemptible || preempted > 0),
	      "race: terminate vs preemption, runs stopped running or switched out, judged by their result",
	      "%lu iterations (a run and a spinning task on CPU %d or on the caller's CPU 0; %s kernel): "
	      "%ld stopped (%ld on the caller's CPU), %ld of them preempted, %ld bad returns, %ld bad runs",
	      n, ncpus - 1, preemptible ? "preemptible" : "non-preemptible", stopped, here, preempted, bad,
	      bad_run);
	field(" race_preempted=%lu race_preempted_stops=%ld race_preempted_switched_out=%ld", n, stopped,
	      preempted);
	close(sv[0]);
	close(sv[1]);
	close(fd);
}

/*
 * Terminate vs a timer's callback (patch 0023), which the timer softirq runs
 * outside bpf_prog_run(): a tc program's test run on CPU 1 arms a bpf_timer
 * that fires at once there; its callback calls a may_goto loop of K rounds
 * three times and stores the sum (3K) in the map value.  Terminates land at
 * random times in and after the callback.  One not stopped stores 3K.  A
 * stopped one leaves at its loop's next back-edge in the copy, storing
 * nothing, or stores less than 3K (or 3K, stopped after its last round); the
 * kernel must trace its return (bpf_prog_terminated_return), once.
 */
#define TIMER_STALE -3LL	/* set before arming */
#define TIMER_ARMED -2LL	/* set by the arming run */
#define TIMER_BEGAN -1LL	/* set by the callback as it begins */

struct timer_value {
	uint64_t timer[2];	/* struct bpf_timer */
	int64_t k, r;
};

static int load_timer_prog(int map)
{
	const struct bpf_insn insns[] = {
		/* main: r = ARMED (the mark), then the timer armed to call the callback at 24 */
		RAW_ARM_TIMER(map, ST_MEM_DW(BPF_REG_6, 24, TIMER_ARMED)),		/* 0-23 */
		/* callback(map, key, value): r = f(k) + f(k) + f(k) */
		MOV64_REG(BPF_REG_9, BPF_REG_3),		/* 24 */
		ST_MEM_DW(BPF_REG_9, 24, TIMER_BEGAN),		/* 25 */
		LDX_MEM_DW(BPF_REG_8, BPF_REG_9, 16),		/* 26: k */
		SUM3_CALLS(3),					/* 27-34: r7 = sum */
		STX_MEM_DW(BPF_REG_9, BPF_REG_7, 24),		/* 35 */
		MOV64_IMM(BPF_REG_0, 0),			/* 36 */
		EXIT(),						/* 37 */
		SUM3_F,						/* 38-43: f(K) */
	};
	static const uint32_t funcs[] = { 0, RAW_ARM_TIMER_LEN, 38 };

	return raw_load_funcs(BPF_PROG_TYPE_SCHED_CLS, insns, sizeof(insns) / sizeof(insns[0]),
			      "ts_timer", 0, funcs, 3);
}

static int64_t timer_result(int map)
{
	struct timer_value v;

	return raw_map_elem(BPF_MAP_LOOKUP_ELEM, map, 0, &v) ? INT64_MIN : v.r;
}

/* Waits up to @ms for the result to leave the values up to @below; returns it. */
static int64_t timer_wait(int map, int64_t below, unsigned int ms)
{
	uint64_t end = now_ns() + ms * 1000000ULL;
	int64_t r;

	while ((r = timer_result(map)) <= below && r != INT64_MIN && now_ns() < end)
		sched_yield();
	return r;
}

/* Waits up to @ms for the trace to show more terminated returns of @id than @returns. */
static bool timer_stopped_return(uint32_t id, long returns, unsigned int ms)
{
	uint64_t end = now_ns() + ms * 1000000ULL;

	do {
		trace_drain();
		if (trace_slot(id)->returns > returns)
			return true;
		sched_yield();
	} while (now_ns() < end);
	return false;
}

/*
 * Arms the timer with loop bound @k and, unless @terminate_after_ns is
 * negative, terminates @id that long after the callback began (the trace
 * must be on).  Returns the callback's result, its duration as seen from
 * here in *@dur_ns, terminate's result in *@ret, and in *@ended whether the
 * callback ended: it stored its result, or, stopped, its return was traced.
 */
static int64_t timer_round(int fd, int map, uint32_t id, int64_t k, int64_t terminate_after_ns,
			   uint64_t *dur_ns, long *ret, bool *ended)
{
	struct timer_value v = { .k = k, .r = TIMER_STALE };
	/* A tc test run on CPU 1 arms the timer; its callback runs there. */
	struct one_run a = { .fd = fd, .cpu = 1, .packet_len = 64 };
	long returns = 0;
	uint64_t began;
	pthread_t t;
	int64_t r;

	/* Also frees the last round's timer: the next arming run makes a new one. */
	if (raw_map_elem(BPF_MAP_UPDATE_ELEM, map, 0, &v))
		die("timer map update");
	start_one_run(&a, &t);
	r = timer_wait(map, TIMER_STALE, 2000);
	if (r == TIMER_ARMED)
		r = timer_wait(map, TIMER_ARMED, 2000);
	began = now_ns();
	*ret = 0;
	if (terminate_after_ns >= 0) {
		trace_drain();
		returns = trace_slot(id)->returns;
		spin_ns(terminate_after_ns);
		*ret = terminate_raw(id, 0);
		*ret = *ret < 0 ? -errno : *ret;
	}
	if (*ret == 1) {
		*ended = timer_stopped_return(id, returns, 5000);
		r = timer_result(map);
	} else {
		/* Also a callback that had not begun when the waits above gave up. */
		r = timer_wait(map, TIMER_BEGAN, 5000);
		*ended = r >= 0;
	}
	*dur_ns = now_ns() - began;
	pthread_join(t, NULL);
	return a.err ? TIMER_STALE : r;
}

/* The timer race's program and map (ctx of timer_callback_ns()). */
struct timer_race {
	int fd, map;
	uint32_t id;
};

/* How long a callback with loop bound @k takes, seen from here, left alone. */
static uint64_t timer_callback_ns(void *ctx, uint64_t k)
{
	struct timer_race *race = ctx;
	uint64_t took;
	long ret;
	bool ended;

	timer_round(race->fd, race->map, race->id, k, -1, &took, &ret, &ended);
	return took;
}

/* The loop bound K for timer callbacks of a few milliseconds, as in the exit race. */
static int64_t calibrate_timer(int fd, int map, uint32_t id, uint64_t *dur)
{
	struct timer_race race = { .fd = fd, .map = map, .id = id };

	return calibrate_k(timer_callback_ns, &race, dur);
}

static void race_timer(unsigned long n)
{
	int map = raw_timer_map(sizeof(struct timer_value)), fd = load_timer_prog(map);
	uint32_t id = raw_prog_id(fd);
	long stopped = 0, esrch = 0, bad = 0, bad_run = 0, left = 0, partial = 0, ret;
	uint64_t dur = 0, took;
	int64_t k = 0, normal, r;
	unsigned long i = 0;
	char first_bad[128] = "none";
	bool ended;
	int round;

	pin_to(0);
	trace_start();
	for (round = 1; round <= RACE_ROUNDS && !(stopped > 0 && esrch > 0); round++) {
		k = calibrate_timer(fd, map, id, &dur);
		normal = 3 * k;
		for (unsigned long end = i + n; i < end; i++) {
			uint64_t after = rnd_below(2 * dur);

			r = timer_round(fd, map, id, k, after, &took, &ret, &ended);
			stopped += ret == 1;
			esrch += ret == -ESRCH;
			bad += !ok_ret(ret, 1);
			if (!ended || r > normal || (ret == 1 ? r < TIMER_BEGAN : r != normal)) {
				if (!bad_run++)
					snprintf(first_bad, sizeof(first_bad),
						 "terminate %llu us in: %ld, result %lld of %lld, %s, %llu us",
						 (unsigned long long)after / 1000, ret, (long long)r,
						 (long long)normal, ended ? "ended" : "not ended",
						 (unsigned long long)took / 1000);
			}
			left += ret == 1 && r == TIMER_BEGAN;
			partial += ret == 1 && r >= 0 && r < normal;
		}
	}
	trace_stop();
	check(!bad && !bad_run && stopped > 0 && esrch > 0 && trace_slot(id)->stops == stopped &&
	      trace_slot(id)->returns == stopped, "race: terminate vs timer callbacks",
	      "%lu iterations in %d round(s) (last callback ~%llu us, K=%lld): %ld stopped (%ld left at a "
	      "back-edge, %ld stored less), %ld ESRCH (both must occur), %ld bad returns, %ld bad runs "
	      "(unfinished, or a result its stop does not allow; the first: %s); traced: %ld stops, %ld "
	      "terminated returns", i, round - 1, (unsigned long long)dur / 1000, (long long)k, stopped,
	      left, partial, esrch, bad, bad_run, first_bad, trace_slot(id)->stops,
	      trace_slot(id)->returns);
	field(" race_timer=%lu race_timer_stopped=%ld race_timer_esrch=%ld", i, stopped, esrch);
	close(fd);
	close(map);
}

/*
 * The tail-call chain's caller: counts to 3K (K: args[0]) in f (SUM3_F), a
 * static function that g, a bpf_loop() callback called once, calls: as long
 * as the callee's work.  Then it tail-calls slot 0 of @map (ts_text: 3K) and,
 * if that falls through, returns TAIL_FELL plus the count g stored.  In the
 * copy the tail call is a jump to the next instruction (patch 0024), and f's
 * loop ends at its may_goto, whose count g stores, or at its back-edge, which
 * leaves f and g together, returning 0 to bpf_loop() with nothing stored (a
 * static frame under a callback leaves with it, 0032): either way the caller
 * goes on to its tail call's jump.  Every run redirected into the caller's
 * copy returns TAIL_FELL..TAIL_FELL + 3K, every one stopped in the callee at
 * most 3K.  (Were g itself a static function, a run would leave its loop and
 * its caller at once and return 0, as a run stopped in the callee can.)
 */
#define TAIL_FELL (1u << 30)

static int load_tail_caller(int map)
{
	const struct bpf_insn insns[] = {
		MOV64_REG(BPF_REG_6, BPF_REG_1),				/* 0 */
		LDX_MEM_DW(BPF_REG_1, BPF_REG_1, 0),				/* 1: r1 = K */
		INSN(BPF_ALU64 | BPF_MUL | BPF_K, BPF_REG_1, 0, 0, 3),		/* 2: r1 = 3K */
		STX_MEM_DW(BPF_REG_10, BPF_REG_1, -8),				/* 3: g's bound */
		ST_MEM_DW(BPF_REG_10, -16, 0),					/* 4: g's count */
		MOV64_IMM(BPF_REG_1, 1),					/* 5: one call */
		LD_FUNC(BPF_REG_2, 14),						/* 6-7: g, at 21 */
		MOV64_REG(BPF_REG_3, BPF_REG_10),				/* 8 */
		ADD64_IMM(BPF_REG_3, -16),					/* 9: its ctx */
		MOV64_IMM(BPF_REG_4, 0),					/* 10 */
		CALL_HELPER(BPF_FUNC_loop),					/* 11 */
		LDX_MEM_DW(BPF_REG_7, BPF_REG_10, -16),				/* 12 */
		MOV64_REG(BPF_REG_1, BPF_REG_6),				/* 13 */
		LD_MAP_FD(BPF_REG_2, map),					/* 14-15 */
		MOV64_IMM(BPF_REG_3, 0),					/* 16 */
		CALL_HELPER(BPF_FUNC_tail_call),				/* 17 */
		MOV64_IMM(BPF_REG_0, TAIL_FELL),				/* 18 */
		ADD64_REG(BPF_REG_0, BPF_REG_7),				/* 19 */
		EXIT(),								/* 20 */
		/* g(index, ctx): stores f(ctx[1]) in ctx[0] */
		MOV64_REG(BPF_REG_6, BPF_REG_2),				/* 21 */
		LDX_MEM_DW(BPF_REG_1, BPF_REG_2, 8),				/* 22 */
		CALL_SUBPROG(3),						/* 23: -> f */
		STX_MEM_DW(BPF_REG_6, BPF_REG_0, 0),				/* 24 */
		MOV64_IMM(BPF_REG_0, 0),					/* 25 */
		EXIT(),								/* 26 */
		SUM3_F,								/* 27-32: f */
	};
	static const uint32_t funcs[] = { 0, 21, 27 };

	return raw_load_funcs(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, sizeof(insns) / sizeof(insns[0]),
			      "ts_tail_caller", 0, funcs, 3);
}

/*
 * Terminate vs a run moving through a tail call: runs of a few milliseconds,
 * half in the caller's loop and half in the callee's, stopped at a random
 * moment by the caller's id or the callee's.  A stop by the callee's id can
 * only land in the callee (before the tail call the callee is not running:
 * ESRCH); one by the caller's, the program the run entered by, lands
 * wherever the run is.  Each stop must be counted and traced once, its
 * return too, for the program the run was in, and show in the run's result:
 * the caller's copy never tail-calls (TAIL_FELL and up), the callee's
 * returns at most 3K (0 when it leaves main's loop at its back-edge, exactly
 * 3K when stopped past its last loop); a run without a stop returns 3K.  A
 * run interrupted inside the tail call's own code is at its edge: EAGAIN if
 * it stays there, which never leaves a mark.
 */
static void race_tail_call(unsigned long n)
{
	int callee = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, text_prog, TEXT_LEN, "ts_text", 0);
	int map = raw_map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 1), caller = load_tail_caller(map);
	uint32_t ids[2] = { raw_prog_id(caller), raw_prog_id(callee) };
	long stopped = 0, esrch = 0, bad = 0, bad_run = 0, fell = 0, in_callee = 0;
	uint64_t dur = 0, k = 0, normal;
	unsigned long i = 0;
	int round;

	if (raw_map_elem(BPF_MAP_UPDATE_ELEM, map, 0, &callee))
		die("prog array update");
	pin_to(0);
	trace_start();
	for (round = 1; round <= RACE_ROUNDS && !(fell > 0 && in_callee > 0); round++) {
		k = calibrate_text_run(caller, &dur);
		normal = 3 * k;
		for (unsigned long end = i + n; i < end; i++) {
			bool by_callee = rnd_below(2);
			struct one_run r;
			pthread_t t;
			long ret;

			start_run_arg(&r, &t, caller, 1, k);
			spin_ns(rnd_below(dur));
			ret = terminate_raw(ids[by_callee], 0);
			ret = ret < 0 ? -errno : ret;
			pthread_join(t, NULL);
			stopped += ret == 1;
			esrch += ret == -ESRCH;
			bad += !ok_ret(ret, 1);
			if (r.err || (r.ret != normal && ret != 1) ||
			    (r.ret > normal && (r.ret < TAIL_FELL || r.ret > TAIL_FELL + normal || by_callee)))
				bad_run++;
			fell += !r.err && r.ret >= TAIL_FELL;
			in_callee += ret == 1 && !r.err && r.ret <= normal;
		}
	}
	trace_stop();
	check(!bad && !bad_run && fell > 0 && in_callee > 0 && trace_slot(ids[0])->stops == fell &&
	      trace_slot(ids[1])->stops == in_callee && trace_slot(ids[0])->returns == fell &&
	      trace_slot(ids[1])->returns == in_callee,
	      "race: terminate vs a tail call",
	      "%lu iterations in %d round(s) (last run ~%llu us, K=%llu): %ld stopped (%ld in the caller, fell "
	      "through its tail call; %ld in the callee; both must occur), %ld ESRCH, %ld bad returns, %ld bad "
	      "runs (a result its stop does not allow); traced: %ld stops and %ld terminated returns of the "
	      "caller, %ld and %ld of the callee", i, round - 1, (unsigned long long)dur / 1000,
	      (unsigned long long)k, stopped, fell,
	      in_callee, esrch, bad, bad_run, trace_slot(ids[0])->stops, trace_slot(ids[0])->returns,
	      trace_slot(ids[1])->stops, trace_slot(ids[1])->returns);
	field(" race_tail_call=%lu race_tail_call_stopped=%ld", i, stopped);
	close(caller);
	close(map);
	close(callee);
}

static void do_races(unsigned long n, unsigned int delay_ms)
{
	unsigned int old_delay = read_uint_file(DEMO_DELAY_SYSCTL);
	struct kstate base = kstate_now();
	int stats_fd = enable_stats();
	uint64_t t0 = now_ns();

	write_sysctl(DEMO_DELAY_SYSCTL, delay_ms);
	race_exit(n);
	race_unload(n, delay_ms);
	race_dual(n, delay_ms);
	race_two_cpus(n, delay_ms);
	race_preempted(n, delay_ms);
	race_timer(n);
	race_tail_call(n);
	race_detach(n, delay_ms);
	race_concurrent_detach(5 * n);
	write_sysctl(DEMO_DELAY_SYSCTL, old_delay);
	close(stats_fd);
	check_back_to_baseline("races: programs, kallsyms and JIT memory back to the baseline after unload", base);
	field(" races_s=%.1f", (now_ns() - t0) / 1e9);
}

/* ------------------------------------------------------------ fuzz */

/*
 * One hostile call: a buffer of @size bytes at @ptr kind, holding prog_id and
 * flags and possibly non-zero bytes after them (inside the kernel's union
 * bpf_attr: "padding", or past it: the tail).  The expected errno is computed
 * from the order of the kernel's checks: tail (E2BIG, EFAULT), copy
 * (EFAULT), CHECK_ATTR (EINVAL), flags (EINVAL), capabilities (EPERM), id
 * (ENOENT), termination copy (EOPNOTSUPP), running (ESRCH).
 */
enum ptr_kind { PTR_GOOD, PTR_EDGE, PTR_NULL, PTR_LOW, PTR_KERNEL, PTR_NONCANON, NPTR };

struct fuzz_targets {
	uint32_t idle_id;	/* terminable, no link, not running */
	uint32_t linked_id;	/* terminable, perf link (detachable), not running */
	uint32_t notsupp_id;	/* tail call: no termination copy */
	size_t attr_size;	/* the kernel's sizeof(union bpf_attr) */
};

struct fuzz_result {
	long calls, mismatches, by_errno[8];
	char first[256];
};

static char *fuzz_area;		/* 2 pages readable, then 1 PROT_NONE page */
static long page_size;

/* The kernel's sizeof(union bpf_attr): the first offset whose non-zero byte is E2BIG. */
static size_t probe_attr_size(void)
{
	static unsigned char buf[8192];
	size_t lo = 8, hi = 4096;

	while (hi - lo > 1) {
		size_t mid = (lo + hi) / 2;

		memset(buf, 0, sizeof(buf));
		buf[mid] = 1;
		if (sys_bpf(TERMLAB_BPF_PROG_TERMINATE, buf, mid + 1) < 0 && errno == E2BIG)
			hi = mid;
		else
			lo = mid;
	}
	return hi;
}

static const char *errname(int e)
{
	return e ? strerrorname_np(e) : "success";
}

static int errno_slot(int e)
{
	static const int order[] = { EINVAL, EPERM, ENOENT, EOPNOTSUPP, ESRCH, E2BIG, EFAULT };

	for (int i = 0; i < 7; i++)
		if (order[i] == e)
			return i;
	return 7;
}

static void fuzz_once(const struct fuzz_targets *tg, bool priv, struct fuzz_result *res)
{
	static const size_t sizes_fixed[] = { 0, 1, 4, 7, 8, 9, 12, 16 };
	size_t ksize = tg->attr_size, size, i;
	unsigned char content[8192];
	uint32_t id, flags;
	int kind = rnd_below(2) ? PTR_GOOD : (int)rnd_below(NPTR), expect = 0, got;
	bool tail_nonzero = false, pad_nonzero = false, tail_nz_readable = false;
	char *ptr = NULL;
	size_t readable = 0, copy;
	long ret;

	switch (rnd_below(6)) {
	case 0: size = sizes_fixed[rnd_below(8)]; break;
	case 1: size = ksize; break;
	case 2: size = ksize + 1 + rnd_below(64); break;
	case 3: size = page_size + rnd_below(2) ; break;
	case 4: size = rnd_below(ksize + 1); break;
	default: size = 8; break;
	}
	switch (rnd_below(8)) {
	case 0: id = 0; break;
	case 1: id = 0x80000000u + rnd_below(0x7fffffff); break;	/* above INT_MAX: never allocated */
	case 2: id = 0xffffffffu; break;
	case 3: id = tg->notsupp_id; break;
	case 4: id = tg->linked_id; break;
	default: id = tg->idle_id; break;
	}
	switch (rnd_below(6)) {
	case 0: flags = 0; break;
	case 1: flags = TERMLAB_BPF_F_TERMINATE_DETACH; break;
	case 2: flags = 1u << rnd_below(32); break;
	case 3: flags = (uint32_t)rnd(); break;
	case 4: flags = 0x80000000u; break;
	default: flags = 0; break;
	}
	memset(content, 0, sizeof(content));
	memcpy(content, &id, 4);
	memcpy(content + 4, &flags, 4);
	if (rnd_below(3) == 0 && size > 8) {	/* one non-zero byte somewhere after flags */
		size_t at = 8 + rnd_below(size - 8);

		content[at] = 1 + rnd_below(255);
		if (at < ksize)
			pad_nonzero = true;
		else
			tail_nonzero = true;
	}

	switch (kind) {
	case PTR_GOOD:
		ptr = fuzz_area;	/* a page and more readable */
		readable = 2 * page_size;
		break;
	case PTR_EDGE:	/* ends somewhere near the PROT_NONE page */
		readable = rnd_below(size + 1);
		ptr = fuzz_area + 2 * page_size - readable;
		break;
	case PTR_NULL: ptr = NULL; break;
	case PTR_LOW: ptr = (char *)(uintptr_t)(1 + rnd_below(4095)); break;
	case PTR_KERNEL: ptr = (char *)0xffff888000000000ull; break;
	default: ptr = (char *)0x0000800000000000ull; break;
	}
	if (ptr && (kind == PTR_GOOD || kind == PTR_EDGE))
		memcpy(ptr, content, size < readable ? size : readable);

	/* The expected answer, check by check in the kernel's order. */
	copy = size < ksize ? size : ksize;
	for (i = ksize; i < size && i < readable; i++)
		tail_nz_readable |= content[i] != 0;
	if (size > (size_t)page_size) {
		expect = E2BIG;		/* "silly large" */
	} else if (size > ksize && tail_nz_readable) {
		expect = E2BIG;		/* the tail is read up to a non-zero byte */
	} else if (size > ksize && readable < size) {
		expect = EFAULT;	/* ... or up to the fault */
	} else if (readable < copy) {
		expect = EFAULT;
	} else if (pad_nonzero) {
		expect = EINVAL;
	} else {
		uint32_t eff_id = size >= 4 ? id : 0, eff_flags = size >= 8 ? flags : 0;

		/* A short attr: the missing bytes are zero, partial fields included. */
		if (size < 4)
			memcpy(&eff_id, content, size), eff_id &= size ? (1u << (8 * size)) - 1 : 0;
		if (size > 4 && size < 8)
			memcpy(&eff_flags, content + 4, size - 4), eff_flags &= (1u << (8 * (size - 4))) - 1;
		if (eff_flags & ~TERMLAB_BPF_F_TERMINATE_DETACH)
			expect = EINVAL;
		else if (!priv)
			expect = EPERM;
		else if (eff_id != tg->idle_id && eff_id != tg->linked_id && eff_id != tg->notsupp_id)
			expect = ENOENT;
		else if (eff_id == tg->notsupp_id)
			expect = EOPNOTSUPP;
		else
			expect = ESRCH;
	}

	ret = syscall(__NR_bpf, TERMLAB_BPF_PROG_TERMINATE, ptr, (unsigned int)size);
	got = ret < 0 ? errno : 0;
	res->calls++;
	res->by_errno[errno_slot(got)]++;
	if (got != expect) {
		if (!res->mismatches++)
			snprintf(res->first, sizeof(res->first),
				 "size=%zu ptr=%d readable=%zu id=%u flags=%#x pad_nz=%d tail_nz=%d: got %s (ret %ld), expected %s",
				 size, kind, readable, id, flags, pad_nonzero, tail_nonzero, errname(got), ret,
				 errname(expect));
	}
}

static void do_fuzz(unsigned long n, bool unpriv)
{
	struct fuzz_targets tg;
	struct fuzz_result res = {};
	struct tp_attach t;
	int tail_map, tail_fd, stats_fd = enable_stats();
	struct prog idle;
	const char *who = unpriv ? "unprivileged (uid 65534)" : "root";
	struct trace_counts *tc[3];
	uint64_t cnt0;
	uint32_t ret = 0;
	int err;

	page_size = sysconf(_SC_PAGESIZE);
	fuzz_area = mmap(NULL, 3 * page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (fuzz_area == MAP_FAILED || mprotect(fuzz_area + 2 * page_size, page_size, PROT_NONE))
		die("mmap");
	idle = load_prog(P_HELPER);
	t = attach_tp();
	tail_fd = raw_load_tail_call("ts_tail", &tail_map);
	tg.idle_id = idle.id;
	tg.linked_id = t.id;
	tg.notsupp_id = raw_prog_id(tail_fd);
	tg.attr_size = probe_attr_size();
	trace_start();
	cnt0 = run_cnt(t.prog_fd);

	if (!unpriv) {
		for (unsigned long i = 0; i < n; i++)
			fuzz_once(&tg, true, &res);
	} else {
		struct fuzz_result *shared = mmap(NULL, sizeof(*shared), PROT_READ | PROT_WRITE,
						  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		int status;
		pid_t pid;

		if (shared == MAP_FAILED)
			die("mmap shared");
		memset(shared, 0, sizeof(*shared));
		fflush(stdout);
		pid = fork();
		if (pid < 0)
			die("fork");
		if (!pid) {
			if (setgroups(0, NULL) || setgid(65534) || setuid(65534))
				_exit(3);
			for (unsigned long i = 0; i < n; i++)
				fuzz_once(&tg, false, shared);
			_exit(0);
		}
		waitpid(pid, &status, 0);
		check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fuzz: the unprivileged child ran",
		      "status %#x", status);
		res = *shared;
		munmap(shared, sizeof(*shared));
	}
	trace_stop();

	check(res.mismatches == 0, unpriv ? "fuzz-attr (unprivileged): every call got exactly its documented errno"
					  : "fuzz-attr (root): every call got exactly its documented errno",
	      "%ld calls as %s, attr size %zu: EINVAL %ld EPERM %ld ENOENT %ld EOPNOTSUPP %ld ESRCH %ld E2BIG %ld "
	      "EFAULT %ld other %ld; %ld mismatches%s%s", res.calls, who, tg.attr_size, res.by_errno[0],
	      res.by_errno[1], res.by_errno[2], res.by_errno[3], res.by_errno[4], res.by_errno[5], res.by_errno[6],
	      res.by_errno[7], res.mismatches, res.mismatches ? ", first: " : "", res.first);

	/* State unchanged: programs loaded, link attached and working, normal results, nothing traced. */
	tc[0] = trace_slot(tg.idle_id);
	tc[1] = trace_slot(tg.linked_id);
	tc[2] = trace_slot(tg.notsupp_id);
	err = test_run(idle.fd, &ret);
	trigger_tp();
	check(prog_exists(tg.idle_id) && prog_exists(tg.linked_id) && prog_exists(tg.notsupp_id) &&
	      link_exists(t.link_id) && run_cnt(t.prog_fd) > cnt0 && !err && ret == HELPER_NORMAL &&
	      tc[0]->stops + tc[1]->stops + tc[2]->stops + tc[0]->returns + tc[1]->returns + tc[2]->returns == 0,
	      unpriv ? "fuzz-attr (unprivileged): state unchanged" : "fuzz-attr (root): state unchanged",
	      "programs loaded %d%d%d, link %d, link runs %llu->%llu, normal run err=%d result=%u, "
	      "termination events %ld", prog_exists(tg.idle_id), prog_exists(tg.linked_id),
	      prog_exists(tg.notsupp_id), link_exists(t.link_id), (unsigned long long)cnt0,
	      (unsigned long long)run_cnt(t.prog_fd), err, ret,
	      tc[0]->stops + tc[1]->stops + tc[2]->stops + tc[0]->returns + tc[1]->returns + tc[2]->returns);
	field(" fuzz_%s=%ld fuzz_%s_mismatches=%ld", unpriv ? "unpriv" : "root", res.calls,
	      unpriv ? "unpriv" : "root", res.mismatches);
	detach_tp(&t);
	close(idle.fd);
	close(tail_fd);
	close(tail_map);
	close(stats_fd);
	munmap(fuzz_area, 3 * page_size);
}

/* ------------------------------------------------------------ kmemleak */

#define KMEMLEAK "/sys/kernel/debug/kmemleak"

static bool kmemleak_write(const char *cmd)
{
	int fd = open(KMEMLEAK, O_WRONLY);
	bool ok = fd >= 0 && write(fd, cmd, strlen(cmd)) == (ssize_t)strlen(cmd);

	if (fd >= 0)
		close(fd);
	return ok;
}

/* Forget what was unreferenced before the tests (boot-time objects). */
static bool kmemleak_begin(void)
{
	if (access(KMEMLEAK, F_OK))
		mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL);
	uint64_t t0 = now_ns();
	bool ok = kmemleak_write("scan") && kmemleak_write("clear");

	printf("# kmemleak: baseline scan %s in %.1f s\n", ok ? "done" : "failed", (now_ns() - t0) / 1e9);
	return ok;
}

/*
 * An object is reported once it is unreferenced for 5 s, after two scans:
 * wait, scan twice, read the report.
 */
static void kmemleak_end(void)
{
	char line[512];
	long leaks = 0, shown = 0;
	bool ok;
	FILE *f;

	sleep_us(6000000);
	ok = kmemleak_write("scan") && kmemleak_write("scan");
	f = fopen(KMEMLEAK, "r");
	while (ok && f && fgets(line, sizeof(line), f)) {
		leaks += !strncmp(line, "unreferenced object", 19);
		if (shown++ < 60)
			printf("# kmemleak: %s", line);
	}
	if (f)
		fclose(f);
	check(ok && f && leaks == 0, "kmemleak: no unreferenced object after the tests",
	      "%s, %ld suspected leaks", ok && f ? "scanned twice" : "kmemleak scan failed", leaks);
	field(" kmemleak_leaks=%ld", ok && f ? leaks : -1);
}

/* ------------------------------------------------------------ main */

static int usage(void)
{
	fprintf(stderr,
		"usage: term_stress stress --cycles N [--delay-ms D] [--fault-skip-rewrite N]\n"
		"       term_stress races --iterations N [--race-delay-ms D]\n"
		"       term_stress fuzz-attr --iterations N [--unpriv]\n"
		"       term_stress all [--cycles N] [--iterations N] [--fuzz N] [--delay-ms D] [--kmemleak]\n"
		"       term_stress hold\n");
	return 2;
}

static unsigned long opt_num(int argc, char **argv, const char *name, unsigned long def)
{
	for (int i = 2; i + 1 < argc; i++) {
		char *end;
		unsigned long v;

		if (strcmp(argv[i], name))
			continue;
		errno = 0;
		v = strtoul(argv[i + 1], &end, 10);
		if (errno || *end || !v) {
			fprintf(stderr, "term_stress: %s needs a positive number\n", name);
			exit(2);
		}
		return v;
	}
	return def;
}

static bool opt_flag(int argc, char **argv, const char *name)
{
	for (int i = 2; i < argc; i++)
		if (!strcmp(argv[i], name))
			return true;
	return false;
}

static void on_term(int sig)
{
	(void)sig;
}

int main(int argc, char **argv)
{
	unsigned int delay_ms, race_delay_ms;
	uint64_t start = now_ns();
	const char *mode;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		return usage();
	mode = argv[1];
	if (!strcmp(mode, "hold")) {
		/* A resident program for the harness's [[program]] (its loader). */
		int fd = raw_load(BPF_PROG_TYPE_RAW_TRACEPOINT, short_prog, 3, "ts_hold", 0);

		signal(SIGTERM, on_term);
		signal(SIGINT, on_term);
		printf("hold prog_id=%u\n", raw_prog_id(fd));
		pause();
		close(fd);
		return 0;
	}
	ncpus = sysconf(_SC_NPROCESSORS_ONLN);
	if (ncpus > MAX_CPUS)
		ncpus = MAX_CPUS;
	if (ncpus < 2) {
		fprintf(stderr, "term_stress: needs at least 2 CPUs\n");
		return 1;
	}
	rng_state ^= now_ns() | 1;
	/* The slow helper's delay: short in the stress (many cycles), longer in the
	 * races, whose windows must survive a vCPU descheduled by a busy host. */
	delay_ms = opt_num(argc, argv, "--delay-ms", 1);
	race_delay_ms = opt_num(argc, argv, "--race-delay-ms", 5);
	printf("# term_stress %s: %d CPUs, seed %#llx\n", mode, ncpus, (unsigned long long)rng_state);

	if (!strcmp(mode, "stress")) {
		do_stress(opt_num(argc, argv, "--cycles", 500), delay_ms,
			  opt_num(argc, argv, "--fault-skip-rewrite", 0));
	} else if (!strcmp(mode, "races")) {
		do_races(opt_num(argc, argv, "--iterations", 100), race_delay_ms);
	} else if (!strcmp(mode, "fuzz-attr")) {
		do_fuzz(opt_num(argc, argv, "--iterations", 1000), opt_flag(argc, argv, "--unpriv"));
	} else if (!strcmp(mode, "all")) {
		unsigned long fuzz = opt_num(argc, argv, "--fuzz", 1000);
		bool leakcheck = opt_flag(argc, argv, "--kmemleak");

		if (leakcheck && !kmemleak_begin()) {
			check(false, "kmemleak: active", "cannot scan %s (CONFIG_DEBUG_KMEMLEAK, debugfs?)", KMEMLEAK);
			leakcheck = false;
		}
		do_stress(opt_num(argc, argv, "--cycles", 500), delay_ms, 0);
		do_races(opt_num(argc, argv, "--iterations", 100), race_delay_ms);
		do_fuzz(fuzz, false);
		do_fuzz(fuzz, true);
		if (leakcheck)
			kmemleak_end();
	} else {
		return usage();
	}
	printf("stress mode=%s cpus=%d passed=%d failed=%d skipped=%d start_ns=%llu end_ns=%llu%s\n", mode, ncpus,
	       tap.passed, tap.failed, tap.skipped, (unsigned long long)start, (unsigned long long)now_ns(), summary);
	return tap_summary("term_stress");
}
