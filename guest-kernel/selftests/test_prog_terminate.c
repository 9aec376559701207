// SPDX-License-Identifier: GPL-2.0
/*
 * test_prog_terminate: kernel selftest of BPF_PROG_TERMINATE, run inside the guest.
 *
 * Programs are written as raw instructions and run with BPF_PROG_TEST_RUN
 * (raw_tracepoint type: the run goes through bpf_prog_run() on the calling
 * CPU with interrupts enabled, like a real tracepoint hit).  A runner thread
 * pinned to one CPU runs the program; the main thread, pinned to another
 * CPU, terminates it.  The program's return value tells which image finished
 * the run: the slow helper returns the NUMA node (0) in the original and -1
 * in the termination copy, so a run whose second helper was stubbed returns
 * -1 instead of 0.
 *
 * The runtime budget (BPF_PROG_SET_RUNTIME_BUDGET, kernel.bpf_max_runtime_ms)
 * must stop the same programs through the same mechanism, never before the
 * budget and about a tick after it.
 *
 * Each stop is also checked in the kernel's own account of it, the bpf
 * trace events; --latency-ms bounds how long after its interrupted helper a
 * stopped run returns (default 500).
 *
 * Needs 2 CPUs, root, tracefs and the kernel.bpf_termination_demo_delay_ms
 * sysctl.  Prints one TAP line per check (tap.h) and
 * "test_prog_terminate: N passed, M failed".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/perf_event.h>

#include "raw_bpf.h"
#include "bpf_term_info.h"
#include "tap.h"

#define DELAY_MS 800
#define RUNNER_CPU 0
_Static_assert(RUNNER_CPU == 0, "a struct run runs on RUNNER_CPU unless its cpu is set");
#define TERMINATOR_CPU 1

/* Two slow helper calls: returns 0 normally, -1 if the second was stubbed. */
static const struct bpf_insn two_slow_helpers[] = {
	CALL_HELPER(BPF_FUNC_get_numa_node_id),
	MOV64_REG(BPF_REG_6, BPF_REG_0),
	CALL_HELPER(BPF_FUNC_get_numa_node_id),
	ADD64_REG(BPF_REG_0, BPF_REG_6),
	EXIT(),
};

/*
 * The same two calls three bpf2bpf frames deep: main -> f1 -> f2 -> helper.
 * When terminated inside the first helper the stack holds return addresses
 * into f2, f1 and main; all of them must lead into the copy.
 */
static const struct bpf_insn subprog_slow_helpers[] = {
	/* main */
	CALL_SUBPROG(2),			/* 0: -> f1 at 3 */
	ADD64_IMM(BPF_REG_0, 0),		/* 1 */
	EXIT(),					/* 2 */
	/* f1 */
	CALL_SUBPROG(1),			/* 3: -> f2 at 5 */
	EXIT(),					/* 4 */
	/* f2 */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),	/* 5 */
	MOV64_REG(BPF_REG_6, BPF_REG_0),	/* 6 */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),	/* 7 */
	ADD64_REG(BPF_REG_0, BPF_REG_6),	/* 8 */
	EXIT(),					/* 9 */
};

/*
 * Case 2: all time is spent in BPF text.  The main function calls f
 * CASE2_CALLS times; f spins in a may_goto loop of BPF_MAX_LOOPS (8M)
 * iterations.  A terminated run is interrupted in f: its IP moves into the
 * copy of f, whose may_goto test leaves the loop, and f's return address
 * leads into the copy of main, whose may_goto test ends the outer loop.  The
 * program returns its call counter: CASE2_CALLS + 1 for a complete run,
 * at most CASE2_CALLS for a terminated one.
 */
#define CASE2_CALLS 150
static const struct bpf_insn bpf_text_loop[] = {
	/* main */
	MOV64_IMM(BPF_REG_6, 0),			/* 0 */
	MAY_GOTO(4),					/* 1: -> 6 */
	ADD64_IMM(BPF_REG_6, 1),			/* 2 */
	JGT_IMM(BPF_REG_6, CASE2_CALLS, 2),		/* 3: -> 6 */
	CALL_SUBPROG(3),				/* 4: -> f at 8 */
	JA(-5),						/* 5: -> 1 */
	MOV64_REG(BPF_REG_0, BPF_REG_6),		/* 6 */
	EXIT(),						/* 7 */
	/* f */
	MOV64_IMM(BPF_REG_0, 0),			/* 8 */
	MAY_GOTO(2),					/* 9: -> 12 */
	ADD64_IMM(BPF_REG_0, 1),			/* 10 */
	JA(-3),						/* 11: -> 9 */
	MOV64_IMM(BPF_REG_0, 0),			/* 12 */
	EXIT(),						/* 13 */
};

/*
 * A loop the program bounds itself (a counter and a back-edge, nothing held)
 * with the slow helper in each of its COUNTED_ROUNDS iterations; it returns
 * its counter.  Stopped in the first iteration's helper, the run leaves the
 * loop at its back-edge, which the copy has as an exit returning 0; a copy
 * that kept the loop would make the other iterations, with the helper
 * stubbed, and return COUNTED_ROUNDS.
 */
#define COUNTED_ROUNDS 3
#define COUNTED_DELAY_MS 300
static const struct bpf_insn counted_loop[] = {
	MOV64_IMM(BPF_REG_6, 0),			/* 0: iterations */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),		/* 1: slow */
	ADD64_IMM(BPF_REG_6, 1),			/* 2 */
	JLT_IMM(BPF_REG_6, COUNTED_ROUNDS, -3),		/* 3: -> 1, the back-edge */
	MOV64_REG(BPF_REG_0, BPF_REG_6),		/* 4 */
	EXIT(),						/* 5 */
};

/*
 * The same loop without the helper, before the slow helper.  Stopped in the
 * helper, the run has left the loop and returns its counter through the
 * main exit, although the copy's first exit is the loop's (the JIT must
 * not let the other exits share its R0 = 0).
 */
static const struct bpf_insn loop_then_slow_helper[] = {
	MOV64_IMM(BPF_REG_6, 0),			/* 0: iterations */
	ADD64_IMM(BPF_REG_6, 1),			/* 1 */
	JLT_IMM(BPF_REG_6, COUNTED_ROUNDS, -2),		/* 2: -> 1, the back-edge */
	CALL_HELPER(BPF_FUNC_get_numa_node_id),		/* 3: slow */
	MOV64_REG(BPF_REG_0, BPF_REG_6),		/* 4 */
	EXIT(),						/* 5 */
};

/*
 * Case 2 in bpf_loop(): BPF_MAX_LOOPS (8M) calls of a callback that counts
 * to LOOP_WORK, in main and three bpf2bpf frames deep (a run of ~3.3 s under
 * TCG: a tenth of it, the bound on the stop's latency, stays above the
 * ~100 ms a vCPU can lose on a busy host).  bpf_loop() returns
 * how many calls it made, which the program returns: BPF_MAX_LOOPS for a
 * complete run; a terminated run's callback is left in the copy, whose
 * bpf_loop() ends the loop early (patch 0007), so fewer.
 */
#define LOOP_CALLS (1 << 23)
#define LOOP_WORK 96
#define LOOP_CALLBACK							\
	MOV64_IMM(BPF_REG_0, 0),					\
	ADD64_IMM(BPF_REG_0, 1),					\
	JLT_IMM(BPF_REG_0, LOOP_WORK, -2),				\
	MOV64_IMM(BPF_REG_0, 0),	/* 0: go on */			\
	EXIT()
static const struct bpf_insn bpf_loop_text[] = {
	MOV64_IMM(BPF_REG_1, LOOP_CALLS),		/* 0 */
	LD_FUNC(BPF_REG_2, 5),				/* 1-2: -> callback at 7 */
	MOV64_IMM(BPF_REG_3, 0),			/* 3 */
	MOV64_IMM(BPF_REG_4, 0),			/* 4 */
	CALL_HELPER(BPF_FUNC_loop),			/* 5 */
	EXIT(),						/* 6 */
	LOOP_CALLBACK,					/* 7-11 */
};
/* Where its functions start, for BTF func_info (the verifier wants it for a callback). */
static const uint32_t bpf_loop_funcs[] = { 0, 7 };
static const struct bpf_insn subprog_bpf_loop_text[] = {
	/* main */
	CALL_SUBPROG(2),				/* 0: -> f1 at 3 */
	ADD64_IMM(BPF_REG_0, 0),			/* 1 */
	EXIT(),						/* 2 */
	/* f1 */
	CALL_SUBPROG(1),				/* 3: -> f2 at 5 */
	EXIT(),						/* 4 */
	/* f2 */
	MOV64_IMM(BPF_REG_1, LOOP_CALLS),		/* 5 */
	LD_FUNC(BPF_REG_2, 5),				/* 6-7: -> callback at 12 */
	MOV64_IMM(BPF_REG_3, 0),			/* 8 */
	MOV64_IMM(BPF_REG_4, 0),			/* 9 */
	CALL_HELPER(BPF_FUNC_loop),			/* 10 */
	EXIT(),						/* 11 */
	LOOP_CALLBACK,					/* 12-16 */
};
static const uint32_t subprog_bpf_loop_funcs[] = { 0, 3, 5, 12 };

/*
 * A helper that writes an uninitialized buffer, after the slow one: a stack
 * buffer holds BUFFER_MARKER, bpf_probe_read_kernel() copies the context's
 * first word over it and the program returns the buffer.  The helper zeroes
 * the buffer when it fails, so its stub in the copy must too: a run stopped
 * in the slow helper returns 0, never the marker the stack still held.
 */
#define BUFFER_MARKER 0x5a5a5a5a
#define CTX_WORD 0x600df00dULL
static const struct bpf_insn read_after_slow_helper[] = {
	MOV64_REG(BPF_REG_6, BPF_REG_1),
	ST_MEM_DW(BPF_REG_10, -8, BUFFER_MARKER),
	CALL_HELPER(BPF_FUNC_get_numa_node_id),
	MOV64_REG(BPF_REG_1, BPF_REG_10),
	ADD64_IMM(BPF_REG_1, -8),
	MOV64_IMM(BPF_REG_2, 8),
	MOV64_REG(BPF_REG_3, BPF_REG_6),
	CALL_HELPER(BPF_FUNC_probe_read_kernel),
	LDX_MEM_DW(BPF_REG_0, BPF_REG_10, -8),
	EXIT(),
};

static const struct bpf_insn return_zero[] = {
	MOV64_IMM(BPF_REG_0, 0),
	EXIT(),
};

/* ---------------------------------------------------------------- bpf() */

#define load raw_load
#define prog_id raw_prog_id

/* Returns the syscall's result; errno is kept for the caller. */
static long terminate(uint32_t id, uint32_t flags)
{
	return termlab_bpf_prog_terminate(id, flags);
}

static void set_delay(unsigned int ms)
{
	write_sysctl(DEMO_DELAY_SYSCTL, ms);
}

/* ------------------------------------------------------------- runner */

#define SOCK_DATAGRAM 200
_Static_assert(SOCK_DATAGRAM <= RAW_TEST_PACKET_MAX,
	       "a packet test run hands the program a whole datagram");

struct run {
	int prog_fd;
	int cpu;		/* where it runs: RUNNER_CPU (0) unless set */
	/*
	 * With send_fd: not a test run but a socket filter's run on a unix
	 * datagram socket pair.  The filter runs in the sending task, in
	 * sk_filter() with migration disabled only, so a preemptible kernel
	 * can switch it out in the middle (a test run disables bottom halves
	 * or preemption).  What it returned decides the datagram's fate: 0
	 * drops it (@received -1), less than its SOCK_DATAGRAM bytes trims it
	 * to that length, anything else keeps it whole.
	 */
	int send_fd, recv_fd;
	int received;
	bool packet;		/* a test run on a packet (tc, socket filter) */
	uint64_t ctx_word;	/* the context's first word */
	uint32_t retval;
	int err;
	uint64_t start_ns, end_ns;
	uint64_t term_return_ns;	/* when run_and_terminate()'s call returned */
	volatile bool started;
};

static void *runner(void *arg)
{
	struct run *run = arg;
	char datagram[SOCK_DATAGRAM] = {};

	pin_to(run->cpu);
	if (run->send_fd) {
		run->start_ns = now_ns();
		run->started = true;
		run->err = send(run->send_fd, datagram, sizeof(datagram), 0) < 0 ? errno : 0;
		run->end_ns = now_ns();
		run->received = recv(run->recv_fd, datagram, sizeof(datagram), MSG_DONTWAIT);
		return NULL;
	}
	run->start_ns = now_ns();
	run->started = true;
	run->err = raw_test_run(run->prog_fd, run->ctx_word, run->packet ? SOCK_DATAGRAM : 0,
				&run->retval);
	run->end_ns = now_ns();
	return NULL;
}

static void run_sync(struct run *run)
{
	pthread_t t;

	pthread_create(&t, NULL, runner, run);
	pthread_join(t, NULL);
}

static void sleep_ms(unsigned int ms)
{
	struct timespec d = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&d, NULL);
}

/* Starts @fn (a runner) for @run and returns its thread @after_ms after the run began. */
static pthread_t start_thread(void *(*fn)(void *), struct run *run, unsigned int after_ms)
{
	pthread_t t;

	run->started = false;
	run->end_ns = 0;
	pthread_create(&t, NULL, fn, run);
	while (!run->started)
		sched_yield();
	sleep_ms(after_ms);
	return t;
}

/* Starts a run on its CPU and returns its thread @after_ms after it began. */
static pthread_t start_run(struct run *run, unsigned int after_ms)
{
	return start_thread(runner, run, after_ms);
}

/* Whether the run started by start_run() is still going. */
static bool still_running(const struct run *run)
{
	return !*(volatile const uint64_t *)&run->end_ns;
}

/*
 * Start a run on its CPU, terminate it from this CPU after @after_ms.
 * Returns terminate()'s result; *term_ns is the time of the call.
 */
static long run_and_terminate(struct run *run, uint32_t id, unsigned int after_ms,
			      uint64_t *term_ns, int *term_errno)
{
	pthread_t t = start_run(run, after_ms);
	long ret;

	*term_ns = now_ns();
	ret = terminate(id, 0);
	*term_errno = errno;
	run->term_return_ns = now_ns();
	pthread_join(t, NULL);
	return ret;
}

static double ms(uint64_t ns)
{
	return ns / 1e6;
}

static void get_term_info(int fd, struct termlab_prog_info *info);

/* ------------------------------------------------------------- trace */

#define TRACE_DIR "/sys/kernel/tracing"

/* Bound on a stopped run's return after its interrupted helper (--latency-ms). */
static unsigned int latency_ms = 500;

/*
 * How many lines of event bpf:@event of program @id (0: of any program)
 * the trace buffer holds; the last one, without its newline, in @last.
 */
static int scan_events(const char *event, uint32_t id, char *last, size_t size)
{
	char name[96], prog[32], *line = NULL;
	size_t cap = 0;
	ssize_t len;
	int count = 0;
	FILE *f = fopen(TRACE_DIR "/trace", "r");

	snprintf(name, sizeof(name), " %s: ", event);
	snprintf(prog, sizeof(prog), " prog_id=%u ", id);
	snprintf(last, size, "(no %s event)", event);
	while (f && (len = getline(&line, &cap, f)) > 0) {
		if (!strstr(line, name) || (id && !strstr(line, prog)))
			continue;
		if (line[len - 1] == '\n')
			line[len - 1] = 0;
		snprintf(last, size, "%s", line);
		count++;
	}
	free(line);
	if (f)
		fclose(f);
	return count;
}

/* The last line of event bpf:@event of program @id (0: any), printed as a comment. */
static bool last_event(const char *event, uint32_t id, char *out, size_t size)
{
	int count = scan_events(event, id, out, size);

	printf("# trace: %s\n", out);
	return count > 0;
}

/* The number after ` @key=` in an event line; -1 if it has none. */
static long long event_field(const char *line, const char *key)
{
	char pattern[32];
	const char *at;

	snprintf(pattern, sizeof(pattern), " %s=", key);
	at = strstr(line, pattern);
	return at ? strtoll(at + strlen(pattern), NULL, 10) : -1;
}

/*
 * The kernel's own account (patch 0006's events) of the stop of program
 * @id's run inside its first slow helper: one CPU stopped in case 1, its
 * frames rewritten and none lost, the run continuing in the copy right
 * after that call (function @func, instruction 1: patch 0017); the events in
 * their causal order; the run's return shortly after the interrupted
 * helper's.  Returns the number of frames the handler rewrote (-1: no
 * handler event).
 */
static long long check_trace_of_stop(const char *what, uint32_t id, int func, int insn)
{
	char request[512], handler[512], done[512], returned[512], helper[512], name[192];
	long long t_req, t_sent, t_entry, t_stop, t_done, t_helper, t_ret;

	last_event("bpf_prog_terminate_request", id, request, sizeof(request));
	last_event("bpf_prog_terminate", id, handler, sizeof(handler));
	last_event("bpf_prog_terminate_done", id, done, sizeof(done));
	last_event("bpf_prog_terminated_return", id, returned, sizeof(returned));
	/* The demo helper's event has no program id: the last one is this run's. */
	last_event("bpf_termination_demo_delay_done", 0, helper, sizeof(helper));

	snprintf(name, sizeof(name), "%s: trace: one CPU stopped in case 1, frames rewritten, nothing lost",
		 what);
	check(event_field(handler, "case") == 1 && event_field(handler, "lost") == 0 &&
	      event_field(handler, "frames") >= 1, name, "%s", handler);
	snprintf(name, sizeof(name),
		 "%s: trace: the run continues in the copy after the interrupted call (func=%d insn=%d)",
		 what, func, insn);
	check(event_field(handler, "func") == func && event_field(handler, "insn") == insn, name,
	      "%s", handler);
	snprintf(name, sizeof(name), "%s: trace: the request returned 1 (CPUs stopped)", what);
	check(event_field(done, "ret") == 1, name, "%s", done);

	t_req = event_field(request, "ts_ns");
	t_stop = event_field(handler, "ts_ns");
	t_done = event_field(done, "ts_ns");
	t_helper = event_field(helper, "ts_ns");
	t_ret = event_field(returned, "ts_ns");
	t_sent = event_field(handler, "sent_ns");
	t_entry = event_field(handler, "entry_ns");
	snprintf(name, sizeof(name),
		 "%s: trace: request <= IPI sent <= handler begins <= handler done: the mechanism's parts",
		 what);
	check(t_sent > 0 && t_entry > 0 && t_req <= t_sent && t_sent <= t_entry && t_entry <= t_stop,
	      name, "send %.3f ms, delivery %.3f ms, handler %.3f ms, wait %.3f ms",
	      ms(t_sent - t_req), ms(t_entry - t_sent), ms(t_stop - t_entry), ms(t_done - t_stop));
	snprintf(name, sizeof(name),
		 "%s: trace: request <= handler done <= call returns, request < helper returns <= run returns",
		 what);
	check(t_req > 0 && t_stop > 0 && t_done > 0 && t_helper > 0 && t_ret > 0 && t_req <= t_stop &&
	      t_stop <= t_done && t_req < t_helper && t_helper <= t_ret, name,
	      "request %lld, handler %lld, done %lld, helper %lld, return %lld", t_req, t_stop, t_done,
	      t_helper, t_ret);
	snprintf(name, sizeof(name),
		 "%s: trace: the run returned within %u ms of the interrupted helper (case 1 tail)", what,
		 latency_ms);
	check(t_helper > 0 && t_ret >= t_helper && t_ret - t_helper < latency_ms * 1000000LL, name,
	      "%.3f ms; mechanism (request -> handler done) %.3f ms", ms(t_ret - t_helper),
	      ms(t_stop - t_req));
	return event_field(handler, "frames");
}

/* ------------------------------------------------------------- checks */

/*
 * The series' sysctls exist and are off on a freshly booted kernel: no demo
 * delay, no fault injection, no system-wide runtime budget.  Run first,
 * before anything here or in the proof writes them.
 */
static void test_sysctl_defaults(void)
{
	static const struct {
		const char *path, *name;
	} knobs[] = {
		{ DEMO_DELAY_SYSCTL,
		  "demo delay sysctl kernel.bpf_termination_demo_delay_ms exists, default 0" },
		{ FAULT_SKIP_REWRITE_SYSCTL,
		  "fault knob kernel.bpf_termination_fault_skip_rewrite exists, default 0" },
		{ FAULT_ENTRY_DELAY_SYSCTL,
		  "fault knob kernel.bpf_termination_fault_entry_delay_ms exists, default 0" },
		{ TERMLAB_MAX_RUNTIME_SYSCTL,
		  "system-wide budget kernel.bpf_max_runtime_ms exists, default 0" },
	};

	for (size_t i = 0; i < sizeof(knobs) / sizeof(knobs[0]); i++) {
		unsigned int value;

		if (read_sysctl(knobs[i].path, &value))
			check(value == 0, knobs[i].name, "%u", value);
		else
			check(false, knobs[i].name, "%s missing", knobs[i].path);
	}
}

/*
 * A stop inside the first of two slow helper calls, which function @func of
 * the program makes as its instruction 0.  Returns the frames the stop
 * rewrote, as traced (-1: not traced).
 */
static long long test_case1(const char *what, const struct bpf_insn *insns, size_t cnt, int func)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, cnt, "term_case1", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };
	struct termlab_prog_info info = {};
	uint64_t term_ns;
	int term_errno;
	long ret;
	long long frames;
	char name[128];

	set_delay(DELAY_MS);

	run_sync(&run);
	snprintf(name, sizeof(name), "%s: control run takes both slow helpers", what);
	check(!run.err && run.retval == 0 && ms(run.end_ns - run.start_ns) >= 2 * DELAY_MS * 0.95,
	      name, "retval %d, %.0f ms (delay %d ms)", (int)run.retval,
	      ms(run.end_ns - run.start_ns), DELAY_MS);

	ret = run_and_terminate(&run, id, DELAY_MS / 2, &term_ns, &term_errno);
	snprintf(name, sizeof(name), "%s: terminate inside the first helper stops 1 CPU", what);
	check(ret == 1, name, "returned %ld (%s)", ret, ret < 0 ? strerror(term_errno) : "ok");
	snprintf(name, sizeof(name), "%s: second helper was stubbed (retval -1)", what);
	check(!run.err && (int)run.retval == -1, name, "retval %d", (int)run.retval);
	snprintf(name, sizeof(name), "%s: run ended after one delay, not two", what);
	check(ms(run.end_ns - run.start_ns) < 1.5 * DELAY_MS, name,
	      "run %.0f ms, terminate->return %.3f ms", ms(run.end_ns - run.start_ns),
	      ms(run.end_ns - term_ns));
	frames = check_trace_of_stop(what, id, func, 1);
	get_term_info(fd, &info);
	snprintf(name, sizeof(name), "%s: prog info counts one run terminated on demand", what);
	check(info.nr_terminated_on_demand == 1 && info.nr_terminated_budget == 0 &&
	      info.last_terminated_ns, name, "on demand %llu, budget %llu, last %llu ns",
	      (unsigned long long)info.nr_terminated_on_demand,
	      (unsigned long long)info.nr_terminated_budget,
	      (unsigned long long)info.last_terminated_ns);

	run_sync(&run);
	snprintf(name, sizeof(name), "%s: next run is the original again", what);
	check(!run.err && run.retval == 0 && ms(run.end_ns - run.start_ns) >= 2 * DELAY_MS * 0.95,
	      name, "retval %d, %.0f ms", (int)run.retval, ms(run.end_ns - run.start_ns));

	set_delay(0);
	close(fd);
	return frames;
}

/*
 * Fault injection (kernel.bpf_termination_fault_skip_rewrite=1): the IPI
 * handler skips the first return address it would rewrite, so the
 * interrupted helper returns into the original image and the second slow
 * call runs after all.  The mechanism is what the test sees: a stop that
 * rewrites one frame fewer than @frames_ok (the same program's normal
 * stop) leaves the run in the original.
 */
static void test_skip_rewrite(const struct bpf_insn *insns, size_t cnt, long long frames_ok)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, cnt, "term_skip", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };
	char handler[512];
	uint64_t term_ns;
	unsigned int knob;
	int term_errno;
	long ret;

	if (!read_sysctl(FAULT_SKIP_REWRITE_SYSCTL, &knob)) {
		check(false, "skip_rewrite=1: the fault knob exists", "%s missing",
		      FAULT_SKIP_REWRITE_SYSCTL);
		close(fd);
		return;
	}
	set_delay(DELAY_MS);
	write_sysctl(FAULT_SKIP_REWRITE_SYSCTL, 1);
	ret = run_and_terminate(&run, id, DELAY_MS / 2, &term_ns, &term_errno);
	write_sysctl(FAULT_SKIP_REWRITE_SYSCTL, 0);
	set_delay(0);
	last_event("bpf_prog_terminate", id, handler, sizeof(handler));
	check(ret == 1 && event_field(handler, "frames") == frames_ok - 1,
	      "skip_rewrite=1: the handler rewrote one frame fewer (the first was skipped)",
	      "terminate %ld, %lld frames, %lld without the fault", ret,
	      event_field(handler, "frames"), frames_ok);
	check(!run.err && run.retval == 0,
	      "skip_rewrite=1: the helper returned into the original: second slow call ran",
	      "retval %d (-1: it was stubbed), %.0f ms", (int)run.retval,
	      ms(run.end_ns - run.start_ns));
	close(fd);
}

/*
 * Case 2: a run that spends its time in BPF text, whose complete run
 * returns @complete and a run left early less.  Terminated a third of the
 * way in, it stops on 1 CPU and returns within milliseconds (a tenth of a
 * run, and --latency-ms); the next run is complete again.
 */
static void test_case2(const char *what, const struct bpf_insn *insns, size_t cnt,
		       const uint32_t *func_starts, uint32_t nfuncs, uint32_t complete)
{
	int fd = raw_load_funcs(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, cnt, "term_case2", 0,
				func_starts, nfuncs);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };
	uint64_t term_ns, full_ns, latency_ns;
	int term_errno;
	long ret;
	char name[160];

	run_sync(&run);
	full_ns = run.end_ns - run.start_ns;
	snprintf(name, sizeof(name), "%s: control run is complete", what);
	check(!run.err && run.retval == complete, name, "retval %u, %.1f ms", run.retval,
	      ms(full_ns));

	ret = run_and_terminate(&run, id, ms(full_ns) / 3 + 1, &term_ns, &term_errno);
	latency_ns = run.end_ns - term_ns;
	snprintf(name, sizeof(name), "%s: terminate in BPF text stops 1 CPU", what);
	check(ret == 1, name, "returned %ld (%s) after %.3f ms", ret,
	      ret < 0 ? strerror(term_errno) : "ok", ms(run.term_return_ns - term_ns));
	snprintf(name, sizeof(name), "%s: the loops were left early in the copy", what);
	check(!run.err && run.retval < complete, name, "retval %u, complete run %u", run.retval,
	      complete);
	snprintf(name, sizeof(name), "%s: run ends within milliseconds of the terminate call", what);
	check(latency_ns < full_ns / 10 && latency_ns < latency_ms * 1000000ULL, name,
	      "terminate->return %.3f ms (bound %u ms), full run %.1f ms", ms(latency_ns),
	      latency_ms, ms(full_ns));

	run_sync(&run);
	snprintf(name, sizeof(name), "%s: next run is the original, complete", what);
	check(!run.err && run.retval == complete, name, "retval %u, %.1f ms", run.retval,
	      ms(run.end_ns - run.start_ns));
	close(fd);
}

/*
 * Issue 14, point 3: a timer's callback.  A tc program's test run (tracing
 * programs cannot use timers) arms a bpf_timer that fires at once on the
 * runner's CPU; its callback runs there in the timer
 * softirq, called by the timer, not through bpf_prog_run().  The callback
 * notes in the map value that it began (x = 1), makes two slow helper
 * calls and stores 100 plus what they returned: 100 in the original, 99 if
 * the second call was stubbed.  Before, nothing recorded such a run:
 * terminate answered ESRCH while the callback ran, and both helpers ran.
 */
#define TIMER_X_OFF 16			/* x, an int after the struct bpf_timer */
#define TIMER_VALUE_SIZE 24
#define TIMER_BEGAN 1			/* x while the callback runs */
#define TIMER_COMPLETE 100		/* x after a complete callback */
#define TIMER_STOPPED (TIMER_COMPLETE - 1)

/* The map value's x, -1 if it cannot be read. */
static int timer_x(int map)
{
	struct {
		uint64_t timer[2];
		int32_t x, pad;
	} value;

	return raw_map_elem(BPF_MAP_LOOKUP_ELEM, map, 0, &value) ? -1 : value.x;
}

/* Waits up to @ms for x to become @to (@become) or to leave it; returns x. */
static int timer_x_wait(int map, bool become, int to, unsigned int ms)
{
	uint64_t end = now_ns() + ms * 1000000ULL;
	int x;

	while (((x = timer_x(map)) == to) != become && now_ns() < end)
		sleep_ms(1);
	return x;
}

/*
 * Arms the timer with a test run on RUNNER_CPU, in @run's thread (*@t): the
 * callback runs in the softirq work that follows the run there, before the
 * syscall returns.  Returns when the callback began (0: not within a second).
 */
static uint64_t timer_fire(struct run *run, int map, pthread_t *t)
{
	*t = start_run(run, 0);
	return timer_x_wait(map, true, TIMER_BEGAN, 1000) == TIMER_BEGAN ? now_ns() : 0;
}

/* Waits for the callback that began to end, and for its thread; returns x. */
static int timer_done(struct run *run, int map, pthread_t t)
{
	int x = timer_x_wait(map, false, TIMER_BEGAN, 3 * DELAY_MS + 2000);

	pthread_join(t, NULL);
	return run->err ? -1 : x;
}

static void test_timer_callback(void)
{
	int map = raw_timer_map(TIMER_VALUE_SIZE);
	const struct bpf_insn insns[] = {
		/* main: x = 0 (the mark), then the timer armed to call the callback at 24 */
		RAW_ARM_TIMER(map, ST_MEM_W(BPF_REG_6, TIMER_X_OFF, 0)),		/* 0-23 */
		/* callback(map, key, value) */
		MOV64_REG(BPF_REG_8, BPF_REG_3),		/* 24 */
		ST_MEM_W(BPF_REG_8, TIMER_X_OFF, TIMER_BEGAN),	/* 25 */
		CALL_HELPER(BPF_FUNC_get_numa_node_id),		/* 26: the callback's insn 2 */
		MOV64_REG(BPF_REG_7, BPF_REG_0),		/* 27 */
		CALL_HELPER(BPF_FUNC_get_numa_node_id),		/* 28 */
		ADD64_REG(BPF_REG_0, BPF_REG_7),		/* 29 */
		ADD64_IMM(BPF_REG_0, TIMER_COMPLETE),		/* 30 */
		STX_MEM_W(BPF_REG_8, BPF_REG_0, TIMER_X_OFF),	/* 31 */
		MOV64_IMM(BPF_REG_0, 0),			/* 32 */
		EXIT(),						/* 33 */
	};
	const uint32_t funcs[] = { 0, RAW_ARM_TIMER_LEN };
	int fd = raw_load_funcs(BPF_PROG_TYPE_SCHED_CLS, insns,
				sizeof(insns) / sizeof(insns[0]), "term_timer", 0, funcs, 2);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd, .packet = true };
	struct termlab_prog_info info = {};
	uint64_t began, term_ns, ended;
	int x, term_errno;
	pthread_t t;
	long ret;

	set_delay(DELAY_MS);
	began = timer_fire(&run, map, &t);
	x = timer_done(&run, map, t);
	ended = now_ns();
	check(began && x == TIMER_COMPLETE && ms(ended - began) >= 2 * DELAY_MS * 0.95,
	      "timer callback: a control run takes both slow helpers", "x %d, %.0f ms (delay %d ms)",
	      x, began ? ms(ended - began) : 0.0, DELAY_MS);

	began = timer_fire(&run, map, &t);
	sleep_ms(DELAY_MS / 2);
	term_ns = now_ns();
	ret = terminate(id, 0);
	term_errno = errno;
	x = timer_done(&run, map, t);
	ended = now_ns();
	check(began && ret == 1, "timer callback: terminate inside its first helper stops 1 CPU",
	      "returned %ld (%s)", ret, ret < 0 ? strerror(term_errno) : "ok");
	check(x == TIMER_STOPPED, "timer callback: its second helper was stubbed",
	      "x %d (%d: it ran, %d: stubbed)", x, TIMER_COMPLETE, TIMER_STOPPED);
	check(began && ms(ended - began) < 1.5 * DELAY_MS,
	      "timer callback: it ended after one delay, not two",
	      "%.0f ms, terminate -> end %.0f ms", began ? ms(ended - began) : 0.0,
	      ms(ended - term_ns));
	check_trace_of_stop("timer callback", id, 1, 3);
	get_term_info(fd, &info);
	check(info.nr_terminated_on_demand == 1,
	      "timer callback: prog info counts one run terminated on demand", "%llu",
	      (unsigned long long)info.nr_terminated_on_demand);
	errno = 0;
	ret = terminate(id, 0);
	check(ret == -1 && errno == ESRCH, "timer callback: after it ended -> ESRCH", "%ld %s", ret,
	      strerror(errno));

	began = timer_fire(&run, map, &t);
	x = timer_done(&run, map, t);
	check(began && x == TIMER_COMPLETE, "timer callback: the next one is the original again",
	      "x %d", x);
	set_delay(0);
	close(fd);
	close(map);
}

static void test_counted_loop(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, counted_loop,
		      sizeof(counted_loop) / sizeof(counted_loop[0]), "term_counted", 0);
	struct run run = { .prog_fd = fd };
	uint64_t term_ns;
	int term_errno;
	long ret;

	set_delay(COUNTED_DELAY_MS);
	run_sync(&run);
	check(!run.err && run.retval == COUNTED_ROUNDS,
	      "counted loop: control run makes every iteration", "retval %u, %.0f ms",
	      run.retval, ms(run.end_ns - run.start_ns));
	ret = run_and_terminate(&run, prog_id(fd), COUNTED_DELAY_MS / 2, &term_ns, &term_errno);
	check(ret == 1 && !run.err && run.retval == 0,
	      "counted loop: a stopped run leaves the loop at its next back-edge",
	      "terminate %ld, retval %u (%d: the loop went on in the copy), %.0f ms", ret,
	      run.retval, COUNTED_ROUNDS, ms(run.end_ns - run.start_ns));
	run_sync(&run);
	check(!run.err && run.retval == COUNTED_ROUNDS,
	      "counted loop: next run is the original, every iteration", "retval %u", run.retval);
	close(fd);

	fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, loop_then_slow_helper,
		  sizeof(loop_then_slow_helper) / sizeof(loop_then_slow_helper[0]),
		  "term_loop_first", 0);
	run.prog_fd = fd;
	ret = run_and_terminate(&run, prog_id(fd), COUNTED_DELAY_MS / 2, &term_ns, &term_errno);
	check(ret == 1 && !run.err && run.retval == COUNTED_ROUNDS,
	      "counted loop: a run stopped after its loop returns its counter, not the loop exit's 0",
	      "terminate %ld, retval %u, expected %d", ret, run.retval, COUNTED_ROUNDS);
	set_delay(0);
	close(fd);
}

static void test_stub_zeroes_buffer(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, read_after_slow_helper,
		      sizeof(read_after_slow_helper) / sizeof(read_after_slow_helper[0]),
		      "term_zero", 0);
	struct run run = { .prog_fd = fd, .ctx_word = CTX_WORD };
	uint64_t term_ns;
	int term_errno;
	long ret;

	set_delay(DELAY_MS);
	run_sync(&run);
	check(!run.err && run.retval == (uint32_t)CTX_WORD,
	      "stub buffers: control run reads the context into the buffer",
	      "retval %#x, expected %#x", run.retval, (uint32_t)CTX_WORD);
	ret = run_and_terminate(&run, prog_id(fd), DELAY_MS / 2, &term_ns, &term_errno);
	check(ret == 1 && !run.err && run.retval == 0,
	      "stub buffers: a stopped run's bpf_probe_read_kernel() buffer is zeroed, as on failure",
	      "terminate %ld, retval %#x (%#x = the stale stack, %#x = the helper ran)", ret,
	      run.retval, BUFFER_MARKER, (uint32_t)CTX_WORD);
	set_delay(0);
	close(fd);
}

/*
 * BPF_PROG_TERMINATE of @id from a child that dropped every uid and gid to
 * nobody, and so every capability.  Returns the call's errno (100: the
 * child could not drop them, 101: the call succeeded); *@call_ns is when
 * the child made the call, CLOCK_MONOTONIC, 0 if unknown.
 * The parent's own clock cannot say: waiting for the child's exit can take
 * as long as a run busy in the kernel on the other CPU lasts.
 */
static int unprivileged_terminate(uint32_t id, uint64_t *call_ns)
{
	int fds[2], status;
	uint64_t at = 0;
	pid_t child;

	if (pipe(fds))
		return -1;
	child = fork();
	if (!child) {
		close(fds[0]);
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(100);
		errno = 0;
		at = now_ns();
		if (write(fds[1], &at, sizeof(at)) != sizeof(at))
			_exit(102);
		_exit(terminate(id, 0) == -1 ? errno : 101);
	}
	close(fds[1]);
	if (child > 0 && read(fds[0], &at, sizeof(at)) != sizeof(at))
		at = 0;
	close(fds[0]);
	*call_ns = at;
	if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

/*
 * Bad requests for a program that is running: unknown flag bits (EINVAL)
 * and an unprivileged caller (EPERM) are refused before anything is done,
 * and the run they were aimed at goes on untouched: both slow helpers, in
 * the original.  The premise, that the calls were made while
 * it ran, is measured: under TCG the calls have been seen to return only when
 * the run on the other CPU ended (3 of 10 selftests of 2026-12-04, cause not
 * found yet), and a run that ended first proves nothing.  Such a try is
 * reported and made again, up to 3 times; the check fails if none had the
 * calls inside the run.
 */
static void test_errors_while_running(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_busy", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };
	long flag1 = 0, flag31 = 0;
	int errno1 = 0, errno31 = 0, unpriv = 0;
	uint64_t flags_done_ns = 0, unpriv_ns = 0;
	bool inside = false;

	set_delay(DELAY_MS);
	for (int try = 1; try <= 3 && !inside; try++) {
		pthread_t t = start_run(&run, DELAY_MS / 2);

		errno = 0;
		flag1 = terminate(id, 1U << 1);
		errno1 = errno;
		errno = 0;
		flag31 = terminate(id, 1U << 31);
		errno31 = errno;
		flags_done_ns = now_ns();
		unpriv = unprivileged_terminate(id, &unpriv_ns);
		pthread_join(t, NULL);
		inside = flags_done_ns < run.end_ns && unpriv_ns && unpriv_ns < run.end_ns;
		if (!inside)
			printf("# errors while running, try %d: calls %.0f and %.0f ms into the %.0f ms run, not inside it\n",
			       try, ms(flags_done_ns - run.start_ns),
			       unpriv_ns ? ms(unpriv_ns - run.start_ns) : -1.0,
			       ms(run.end_ns - run.start_ns));
	}
	set_delay(0);

	check(flag1 == -1 && errno1 == EINVAL, "unknown flag bit (flags=2) on a running program -> EINVAL",
	      "%ld %s", flag1, strerror(errno1));
	check(flag31 == -1 && errno31 == EINVAL,
	      "unknown flag bit (flags=1<<31) on a running program -> EINVAL", "%ld %s", flag31,
	      strerror(errno31));
	check(unpriv == EPERM, "unprivileged user on a running program -> EPERM", "child exit %d",
	      unpriv);
	check(inside && !run.err && run.retval == 0 && ms(run.end_ns - run.start_ns) >= 2 * DELAY_MS * 0.95,
	      "the run with EINVAL/EPERM attempts was not stopped (both slow helpers, in the original)",
	      "calls %.0f and %.0f ms into the %.0f ms run, retval %d (delay %d ms)",
	      ms(flags_done_ns - run.start_ns), unpriv_ns ? ms(unpriv_ns - run.start_ns) : -1.0,
	      ms(run.end_ns - run.start_ns), (int)run.retval, DELAY_MS);
	close(fd);
}

/*
 * A run with interrupts off: a perf_event program on a cpu-clock event runs
 * from the event's hrtimer, in hardirq context.  Armed once through its
 * map, it notes that it started, sits in the slow helper, then stores
 * bpf_ktime_get_ns() (a stub in the copy returns -1).  No IPI reaches such a
 * run before it returns, so terminate must say so at once (EBUSY) instead
 * of spinning until the run is over and answering ESRCH, and must not claim
 * or count a stop: the run completes in the original.
 */
enum { IRQS_OFF_ARMED, IRQS_OFF_STARTED, IRQS_OFF_AFTER, IRQS_OFF_WORDS };

static void test_irqs_off_run(void)
{
	uint64_t words[IRQS_OFF_WORDS] = { 1, 0, 0 }, t0, term_ns, term_end_ns;
	struct perf_event_attr pattr = {};
	struct termlab_prog_info info = {};
	int map_fd = raw_map_create(BPF_MAP_TYPE_ARRAY, sizeof(words), 1);
	int fd, perf_fd, term_errno;
	uint32_t id;
	long ret;

	{
		const struct bpf_insn insns[] = {
			LD_MAP_FD(BPF_REG_1, map_fd),
			MOV64_REG(BPF_REG_2, BPF_REG_10),
			ADD64_IMM(BPF_REG_2, -8),
			ST_MEM_DW(BPF_REG_10, -8, 0),
			CALL_HELPER(BPF_FUNC_map_lookup_elem),
			JEQ_IMM(BPF_REG_0, 0, 9),	/* -> exit */
			MOV64_REG(BPF_REG_6, BPF_REG_0),
			LDX_MEM_DW(BPF_REG_1, BPF_REG_6, 8 * IRQS_OFF_ARMED),
			JEQ_IMM(BPF_REG_1, 0, 6),	/* -> exit */
			ST_MEM_DW(BPF_REG_6, 8 * IRQS_OFF_ARMED, 0),
			ST_MEM_DW(BPF_REG_6, 8 * IRQS_OFF_STARTED, 1),
			CALL_HELPER(BPF_FUNC_get_numa_node_id),
			CALL_HELPER(BPF_FUNC_ktime_get_ns),
			STX_MEM_DW(BPF_REG_6, BPF_REG_0, 8 * IRQS_OFF_AFTER),
			MOV64_IMM(BPF_REG_0, 0),
			EXIT(),
		};

		fd = load(BPF_PROG_TYPE_PERF_EVENT, insns, sizeof(insns) / sizeof(insns[0]),
			  "term_irqs_off", 0);
	}
	id = prog_id(fd);
	pattr.type = PERF_TYPE_SOFTWARE;
	pattr.size = sizeof(pattr);
	pattr.config = PERF_COUNT_SW_CPU_CLOCK;
	pattr.sample_period = 1000000;	/* every millisecond of RUNNER_CPU */
	perf_fd = syscall(__NR_perf_event_open, &pattr, -1, RUNNER_CPU, -1, PERF_FLAG_FD_CLOEXEC);
	if (perf_fd < 0 || ioctl(perf_fd, PERF_EVENT_IOC_SET_BPF, fd) ||
	    ioctl(perf_fd, PERF_EVENT_IOC_ENABLE, 0)) {
		perror("cpu-clock perf event with the program");
		exit(1);
	}
	set_delay(DELAY_MS);
	if (raw_map_elem(BPF_MAP_UPDATE_ELEM, map_fd, 0, words)) {
		perror("arming the program");
		exit(1);
	}
	t0 = now_ns();
	while (!raw_map_elem(BPF_MAP_LOOKUP_ELEM, map_fd, 0, words) && !words[IRQS_OFF_STARTED] &&
	       now_ns() - t0 < 5000000000ULL)
		sched_yield();
	term_ns = now_ns();
	errno = 0;
	ret = terminate(id, 0);
	term_errno = errno;
	term_end_ns = now_ns();
	while (!raw_map_elem(BPF_MAP_LOOKUP_ELEM, map_fd, 0, words) && !words[IRQS_OFF_AFTER] &&
	       now_ns() - t0 < 10000000000ULL)
		usleep(10000);
	ioctl(perf_fd, PERF_EVENT_IOC_DISABLE, 0);
	close(perf_fd);
	set_delay(0);
	get_term_info(fd, &info);

	check(words[IRQS_OFF_STARTED] == 1, "IRQs-off run: the perf_event program started in hardirq",
	      NULL);
	check(ret == -1 && term_errno == EBUSY,
	      "IRQs-off run: terminate -> EBUSY (no IPI can reach it now)", "%ld %s", ret,
	      strerror(term_errno));
	check(ms(term_end_ns - term_ns) < DELAY_MS / 10.0,
	      "IRQs-off run: the call did not wait for the run to end", "%.1f ms (delay %d ms)",
	      ms(term_end_ns - term_ns), DELAY_MS);
	check(words[IRQS_OFF_AFTER] != 0 && words[IRQS_OFF_AFTER] != (uint64_t)-1,
	      "IRQs-off run: not stopped: the helper after the slow one ran in the original",
	      "after=%#llx", (unsigned long long)words[IRQS_OFF_AFTER]);
	check(info.nr_terminated_on_demand == 0,
	      "IRQs-off run: no stop counted (nr_terminated_on_demand 0)", "%llu",
	      (unsigned long long)info.nr_terminated_on_demand);
	close(fd);
	close(map_fd);
}

/*
 * Calls that come while a stopped run still sits in its first slow helper
 * (it returns about a delay later): the run is running, but already
 * stopped.  The kernel says so (EALREADY), counts and traces that run once,
 * and once the run has returned, the program is idle again (ESRCH); the
 * next run is the original.
 */
static void test_terminate_twice(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_twice", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };
	struct termlab_prog_info info = {};
	long first, second, third, after;
	int errno2, errno3, errno_after, stops;
	char handler[512];
	bool running;
	pthread_t t;

	set_delay(DELAY_MS);
	t = start_run(&run, DELAY_MS / 2);
	first = terminate(id, 0);
	errno = 0;
	second = terminate(id, 0);
	errno2 = errno;
	errno = 0;
	third = terminate(id, 0);
	errno3 = errno;
	running = still_running(&run);
	pthread_join(t, NULL);
	errno = 0;
	after = terminate(id, 0);
	errno_after = errno;
	get_term_info(fd, &info);
	stops = scan_events("bpf_prog_terminate", id, handler, sizeof(handler));

	check(first == 1, "terminate twice: first call stops it", "returned %ld", first);
	check(running, "terminate twice: the run was still in its slow call for the later calls",
	      NULL);
	check(second == -1 && errno2 == EALREADY,
	      "terminate twice: a second call on the stopped run -> EALREADY", "%ld %s", second,
	      strerror(errno2));
	check(third == -1 && errno3 == EALREADY,
	      "terminate twice: a third call on the stopped run -> EALREADY", "%ld %s", third,
	      strerror(errno3));
	check(!run.err && (int)run.retval == -1 && ms(run.end_ns - run.start_ns) < 1.5 * DELAY_MS,
	      "terminate twice: the run ended after one delay, second helper stubbed",
	      "retval %d, %.0f ms (delay %d ms)", (int)run.retval, ms(run.end_ns - run.start_ns),
	      DELAY_MS);
	check(info.nr_terminated_on_demand == 1,
	      "terminate twice: the run is counted once (nr_terminated_on_demand 1)", "%llu",
	      (unsigned long long)info.nr_terminated_on_demand);
	check(stops == 1, "terminate twice: one bpf_prog_terminate event for the run", "%d events",
	      stops);
	check(after == -1 && errno_after == ESRCH, "terminate after the run ended -> ESRCH", "%ld %s",
	      after, strerror(errno_after));

	run_sync(&run);
	check(!run.err && run.retval == 0 && ms(run.end_ns - run.start_ns) >= 2 * DELAY_MS * 0.95,
	      "after terminations the next run is the original again", "retval %d, %.0f ms",
	      (int)run.retval, ms(run.end_ns - run.start_ns));
	set_delay(0);
	close(fd);
}

/* ------------------------------------------------------ preempted runs */

#define RT_RUNTIME_SYSCTL "/proc/sys/kernel/sched_rt_runtime_us"
#define RT_PERIOD_US 1000000
#define PREEMPT_DELAY_MS 800
#define PREEMPT_AFTER_MS 300

/* Become a SCHED_FIFO task (@on) or an ordinary one again. */
static void set_fifo(bool on)
{
	struct sched_param sp = { .sched_priority = on ? 10 : 0 };

	if (sched_setscheduler(0, on ? SCHED_FIFO : SCHED_OTHER, &sp))
		perror("sched_setscheduler");
}

/* A runner on RUNNER_CPU that preempts whatever ordinary task runs there. */
static void *rt_runner(void *arg)
{
	/* Real-time first: it then preempts the run there the moment it arrives. */
	set_fifo(true);
	return runner(arg);
}

/* The last bpf_prog_terminate event of program @id says its run was preempted. */
static bool stop_traced_preempted(uint32_t id, long long *sent_ns)
{
	char line[512];

	if (!scan_events("bpf_prog_terminate", id, line, sizeof(line)))
		return false;
	printf("# trace: %s\n", line);
	*sent_ns = event_field(line, "sent_ns");
	return event_field(line, "preempted") == 1;
}

/* A unix datagram socket pair filtered by @prog_fd, for @run to send on. */
static void filter_socket(int prog_fd, struct run *run)
{
	int sv[2];

	raw_filter_socket(prog_fd, sv);
	run->send_fd = sv[0];
	run->recv_fd = sv[1];
}

static void close_filter_socket(struct run *run)
{
	close(run->send_fd);
	close(run->recv_fd);
}

struct rt_spinner {
	volatile bool started, stop;
};

/* A real-time task spinning on RUNNER_CPU until told to stop. */
static void *rt_spin(void *arg)
{
	struct rt_spinner *sp = arg;

	set_fifo(true);
	pin_to(RUNNER_CPU);
	sp->started = true;
	while (!sp->stop)
		;
	return NULL;
}

/*
 * The preempted run is in its own code: the may_goto loops of bpf_text_loop
 * (case 2), switched out by a real-time task that only spins.  The saved IP
 * that leads back into the program is in the interrupt frame it was
 * preempted from, on its task's stack; it must move to the copy, whose
 * may_goto tests then leave the loops: the filter returns fewer than the
 * complete run's CASE2_CALLS + 1 calls, and trims the datagram to that
 * (or drops it for 0).
 */
static void test_preempted_in_text(const char *stopped_name, const char *resumed_name)
{
	int fd = load(BPF_PROG_TYPE_SOCKET_FILTER, bpf_text_loop,
		      sizeof(bpf_text_loop) / sizeof(bpf_text_loop[0]), "term_preempt_text", 0);
	uint32_t id = prog_id(fd);
	struct run run = {};
	struct rt_spinner sp = {};
	char line[512] = "";
	pthread_t t, t_sp;
	long ret;
	int err;

	filter_socket(fd, &run);
	t = start_run(&run, PREEMPT_AFTER_MS);
	pthread_create(&t_sp, NULL, rt_spin, &sp);
	while (!sp.started)
		sched_yield();
	sleep_ms(PREEMPT_AFTER_MS);
	errno = 0;
	ret = terminate(id, 0);
	err = errno;
	if (scan_events("bpf_prog_terminate", id, line, sizeof(line)))
		printf("# trace: %s\n", line);
	sp.stop = true;
	pthread_join(t_sp, NULL);
	pthread_join(t, NULL);
	check(ret == 1 && event_field(line, "preempted") == 1 && event_field(line, "case") == 2,
	      stopped_name, "returned %ld (%s), traced preempted %lld case %lld", ret,
	      ret < 0 ? strerror(err) : "", event_field(line, "preempted"), event_field(line, "case"));
	check(!run.err && run.received != CASE2_CALLS + 1, resumed_name,
	      "send %s, received %d bytes (a complete run: %d)", strerror(run.err), run.received,
	      CASE2_CALLS + 1);
	close_filter_socket(&run);
	close(fd);
}

/*
 * Issue 14, point 1 (preempt variant): a socket filter's run, in the task
 * that sends a datagram, is preempted in its first slow helper by a
 * real-time task on the same CPU, which then runs another filter there.
 * Terminating the preempted run's program must stop that run, and only it:
 * the call returns 1, the stop is traced as a preempted run's, and when the
 * run resumes its second helper does not run: the filter returns -1 from
 * the copy and the datagram is kept, where a complete run returns 0 and
 * drops it.  The other task's run, on the CPU meanwhile, is stopped by its
 * own terminate.  Then the same with the preempted run on the caller's own
 * CPU, preempted by the caller itself.  Before, the running marker stayed on
 * the CPU: the handler looked for the run in the real-time task's stack,
 * found nothing and, after its retries, the call said EAGAIN (ESRCH on the
 * caller's CPU) while the run went on through both helpers.
 */
static void test_preempted_run(void)
{
	static const char *const names[] = {
		"preempted run: terminate stops the run of a task preempted on another CPU",
		"preempted run: the stop is traced as a preempted run's",
		"preempted run: the task that preempted it, running another program, is stopped by its own terminate",
		"preempted run: the preempted run resumed in the copy (second helper stubbed: datagram kept)",
		"preempted run: the preempting run was stopped too (datagram kept)",
		"preempted run: terminate stops a run preempted on the caller's own CPU, without an IPI",
		"preempted run: that run resumed in the copy too (datagram kept)",
		"preempted run: each run counted once (nr_terminated_on_demand 2 and 1)",
		"preempted run: the next run is the original again (datagram dropped)",
		"preempted run: a run preempted in its own code (case 2) is stopped, traced preempted in case 2",
		"preempted run: it resumed in the copy, whose loops it left (not its 151 calls)",
	};
	int fd = load(BPF_PROG_TYPE_SOCKET_FILTER, two_slow_helpers, 5, "term_preempted", 0);
	int other = load(BPF_PROG_TYPE_SOCKET_FILTER, two_slow_helpers, 5, "term_preemptor", 0);
	uint32_t id = prog_id(fd), other_id = prog_id(other);
	struct run run = {}, rt = {};
	struct termlab_prog_info info = {}, other_info = {};
	long first, second, here;
	int errno1, errno2, errno_here;
	long long sent_ns = -1, here_sent_ns = -1;
	bool first_preempted, here_preempted;
	unsigned int rt_runtime = 0;
	bool rt_runtime_read;
	pthread_t t, t_rt;

	if (!raw_kernel_preemptible()) {
		for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
			skip(names[i], "not a preemptible kernel (the preempt variant tests this)");
		close(fd);
		close(other);
		return;
	}
	filter_socket(fd, &run);
	filter_socket(other, &rt);
	/*
	 * The real-time task must not be throttled back to the preempted one:
	 * real-time tasks may use the whole period (1 s by default).
	 */
	rt_runtime_read = read_sysctl(RT_RUNTIME_SYSCTL, &rt_runtime);
	write_sysctl(RT_RUNTIME_SYSCTL, RT_PERIOD_US);
	set_delay(PREEMPT_DELAY_MS);

	t = start_run(&run, PREEMPT_AFTER_MS);
	t_rt = start_thread(rt_runner, &rt, PREEMPT_AFTER_MS);
	errno = 0;
	first = terminate(id, 0);
	errno1 = errno;
	first_preempted = stop_traced_preempted(id, &sent_ns);
	errno = 0;
	second = terminate(other_id, 0);
	errno2 = errno;
	pthread_join(t_rt, NULL);
	pthread_join(t, NULL);

	check(first == 1, names[0], "returned %ld (%s)", first, first < 0 ? strerror(errno1) : "");
	check(first_preempted && sent_ns > 0, names[1], "sent_ns %lld", sent_ns);
	check(second == 1, names[2], "returned %ld (%s)", second,
	      second < 0 ? strerror(errno2) : "");
	check(!run.err && run.received == SOCK_DATAGRAM, names[3], "send %s, received %d bytes",
	      strerror(run.err), run.received);
	check(!rt.err && rt.received == SOCK_DATAGRAM, names[4], "send %s, received %d bytes",
	      strerror(rt.err), rt.received);

	/* The preempted run on this CPU: this task, real-time, preempts it. */
	run.cpu = TERMINATOR_CPU;
	t = start_run(&run, 0);
	set_fifo(true);
	sleep_ms(PREEMPT_AFTER_MS);
	errno = 0;
	here = terminate(id, 0);
	errno_here = errno;
	here_preempted = stop_traced_preempted(id, &here_sent_ns);
	set_fifo(false);
	pthread_join(t, NULL);
	run.cpu = RUNNER_CPU;
	check(here == 1 && here_preempted && here_sent_ns == 0, names[5],
	      "returned %ld (%s), traced preempted %d, sent_ns %lld", here,
	      here < 0 ? strerror(errno_here) : "", here_preempted, here_sent_ns);
	check(!run.err && run.received == SOCK_DATAGRAM, names[6], "send %s, received %d bytes",
	      strerror(run.err), run.received);

	test_preempted_in_text(names[9], names[10]);

	get_term_info(fd, &info);
	get_term_info(other, &other_info);
	check(info.nr_terminated_on_demand == 2 && other_info.nr_terminated_on_demand == 1, names[7],
	      "%llu and %llu", (unsigned long long)info.nr_terminated_on_demand,
	      (unsigned long long)other_info.nr_terminated_on_demand);
	set_delay(0);
	run_sync(&run);
	check(!run.err && run.received < 0, names[8], "send %s, received %d bytes", strerror(run.err),
	      run.received);
	if (rt_runtime_read)
		write_sysctl(RT_RUNTIME_SYSCTL, rt_runtime);
	close_filter_socket(&run);
	close_filter_socket(&rt);
	close(fd);
	close(other);
}

/* --------------------------------------------------- spin-lock sections */

#define SPIN_LOCK_BOUND_MS 500	/* the kernel's BPF_TERM_IPI_WAIT_MS */

/*
 * A one-entry array map whose value is struct v { struct bpf_spin_lock lock;
 * int x; }, described in BTF as bpf_spin_lock needs; exits on failure.
 */
static int spin_lock_map(void)
{
	/* "" at 0, "int" at 1, "bpf_spin_lock" at 5, "val" at 19, "v" at 23, "lock" at 25, "x" at 30 */
	static const char strings[] = "\0int\0bpf_spin_lock\0val\0v\0lock\0x";
	const uint32_t types[] = {
		/* 1: int */
		1, BTF_KIND_INT << 24, 4, BTF_INT_SIGNED << 24 | 32,
		/* 2: struct bpf_spin_lock { int val; } */
		5, BTF_KIND_STRUCT << 24 | 1, 4, 19, 1, 0,
		/* 3: struct v { struct bpf_spin_lock lock; int x; } */
		23, BTF_KIND_STRUCT << 24 | 2, 8, 25, 2, 0, 30, 1, 32,
	};

	return raw_btf_array_map(types, sizeof(types), strings, sizeof(strings), 8, 3);
}

/*
 * Issue 14, point 11: a run that disabled interrupts itself, in a
 * bpf_spin_lock section (a tc program's test run; inside the lock a may_goto
 * loop of BPF_MAX_LOOPS iterations of SPIN_LOCK_WORK instructions each,
 * seconds under TCG, which the verifier accepts).  The stop interrupt cannot be taken before the unlock, and the
 * call must not wait for that: it gives up after its bound, answers EBUSY and
 * claims nothing; the run completes in the original.  A terminate after the
 * run answers ESRCH, and the next stop of a run works (the abandoned
 * interrupt was taken and dropped).  Before, the call waited with preemption
 * off until the section ended, then stopped the run in bpf_spin_unlock().
 *
 * The terminating thread must call while the run is well inside its section.
 * With the section on CPU 0 it could not, in about a third of the runs with a
 * second guest busy beside this one (QEMU TCG): sleeping or spinning, the
 * thread on CPU 1 got its CPU back only at the section's end, so something
 * there waited for CPU 0 (not understood; device interrupts go to CPU 0).
 * The section runs on CPU 1 and the terminating thread on CPU 0; it
 * busy-waits for its moment, and the premise is checked either way.
 */
#define SPIN_LOCK_WORK 1024
#define SPIN_LOCK_PROG_MAX (21 + 2 * SPIN_LOCK_WORK + 4)

/* SPIN_LOCK_WORK instructions r8 *= 3, r8 ^= r7 in turn: a chain no emulator can fold. */
static size_t spin_lock_work(struct bpf_insn *insns)
{
	for (int i = 0; i < SPIN_LOCK_WORK; i += 2) {
		insns[i] = (struct bpf_insn)INSN(BPF_ALU64 | BPF_MUL | BPF_K, BPF_REG_8, 0, 0, 3);
		insns[i + 1] = (struct bpf_insn)INSN(BPF_ALU64 | BPF_XOR | BPF_X, BPF_REG_8, BPF_REG_7,
						     0, 0);
	}
	return SPIN_LOCK_WORK;
}

/*
 * The spin-lock section's program: a may_goto loop of SPIN_LOCK_WORK
 * instructions per iteration inside the lock, returning its iterations.
 * With @loop_after, the section ends after as many iterations as the map
 * value's x says (a constant would make the verifier walk every iteration)
 * and the same loop follows the unlock, outside the lock, for what is left of
 * the may_goto allowance (one per program frame: BPF_MAX_LOOPS); the program
 * then returns that loop's iterations.  Returns the instruction count.
 */
static size_t spin_lock_prog(struct bpf_insn *insns, int map, bool loop_after)
{
	/* The section's loop: the may_goto, the count, [the limit,] the work, the back-edge. */
	size_t loop_len = 3 + !!loop_after + SPIN_LOCK_WORK;
	size_t n = 0;
	const struct bpf_insn head[] = {
		ST_MEM_W(BPF_REG_10, -4, 0),			/* 0: key 0 */
		LD_MAP_FD(BPF_REG_1, map),			/* 1-2 */
		MOV64_REG(BPF_REG_2, BPF_REG_10),		/* 3 */
		ADD64_IMM(BPF_REG_2, -4),			/* 4 */
		CALL_HELPER(BPF_FUNC_map_lookup_elem),		/* 5 */
		JEQ_IMM(BPF_REG_0, 0, 0),			/* 6: -> exit, set below */
		MOV64_REG(BPF_REG_6, BPF_REG_0),		/* 7 */
		MOV64_REG(BPF_REG_1, BPF_REG_6),		/* 8 */
		CALL_HELPER(BPF_FUNC_spin_lock),		/* 9 */
		MOV64_IMM(BPF_REG_7, 0),			/* 10: iterations */
		MOV64_IMM(BPF_REG_8, 0),			/* 11: work */
		INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_9, BPF_REG_6, 4, 0), /* 12: x */
		MAY_GOTO(loop_len - 1),				/* 13: -> unlock */
		ADD64_IMM(BPF_REG_7, 1),			/* 14 */
	};
	const struct bpf_insn unlock[] = {
		JA(-(int)loop_len),				/* -> 13 */
		MOV64_REG(BPF_REG_1, BPF_REG_6),		/* unlock */
		CALL_HELPER(BPF_FUNC_spin_unlock),
	};
	const struct bpf_insn after_head[] = {
		MOV64_IMM(BPF_REG_7, 0),			/* iterations after the unlock */
		MAY_GOTO(2 + SPIN_LOCK_WORK),			/* -> exit */
		ADD64_IMM(BPF_REG_7, 1),
	};
	const struct bpf_insn tail[] = {
		MOV64_REG(BPF_REG_0, BPF_REG_7),
		EXIT(),						/* exit */
	};

	memcpy(insns, head, sizeof(head));
	n += sizeof(head) / sizeof(head[0]);
	if (loop_after) /* 15: r7 >= x -> unlock */
		insns[n++] = (struct bpf_insn)INSN(BPF_JMP | BPF_JGE | BPF_X, BPF_REG_7, BPF_REG_9,
						   SPIN_LOCK_WORK + 1, 0);
	n += spin_lock_work(insns + n);
	memcpy(insns + n, unlock, sizeof(unlock));
	n += sizeof(unlock) / sizeof(unlock[0]);
	if (loop_after) {
		memcpy(insns + n, after_head, sizeof(after_head));
		n += sizeof(after_head) / sizeof(after_head[0]);
		n += spin_lock_work(insns + n);
		insns[n++] = (struct bpf_insn)JA(-(3 + SPIN_LOCK_WORK));
	}
	memcpy(insns + n, tail, sizeof(tail));
	n += sizeof(tail) / sizeof(tail[0]);
	insns[6].off = n - 1 - 7;	/* the last instruction, the exit */
	return n;
}

static double test_spin_lock_section(uint32_t *iterations)
{
	int map = spin_lock_map();
	struct bpf_insn insns[SPIN_LOCK_PROG_MAX];
	size_t n = spin_lock_prog(insns, map, false);
	int fd = load(BPF_PROG_TYPE_SCHED_CLS, insns, n, "term_spin_lock", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd, .packet = true, .cpu = TERMINATOR_CPU };
	struct termlab_prog_info info = {};
	uint64_t call_at_ns, call_ns, full_ns;
	double held_ms;
	uint32_t complete;
	long ret, after;
	int err, err_after;
	pthread_t t;

	pin_to(RUNNER_CPU);
	run_sync(&run);
	complete = run.retval;
	full_ns = run.end_ns - run.start_ns;
	check(!run.err && complete > 0 && ms(full_ns) > 3 * SPIN_LOCK_BOUND_MS,
	      "spin-lock section: control run loops inside the lock longer than the bound",
	      "retval %u, %.0f ms (bound %d ms)", complete, ms(full_ns), SPIN_LOCK_BOUND_MS);

	t = start_run(&run, 0);
	spin_ns(full_ns / 5);
	call_at_ns = now_ns();
	errno = 0;
	ret = terminate(id, 0);
	err = errno;
	call_ns = now_ns() - call_at_ns;
	pthread_join(t, NULL);
	held_ms = ms(call_at_ns - run.start_ns) - ms(full_ns) / 5;
	errno = 0;
	after = terminate(id, 0);
	err_after = errno;
	get_term_info(fd, &info);
	check(held_ms < SPIN_LOCK_BOUND_MS,
	      "spin-lock section: the terminate was called while the run was inside the section",
	      "%.0f ms after the run began (%.0f ms late), the run lasted %.0f ms",
	      ms(call_at_ns - run.start_ns), held_ms, ms(run.end_ns - run.start_ns));
	check(ret == -1 && err == EBUSY, "spin-lock section: terminate -> EBUSY (interrupts off there)",
	      "returned %ld (%s)", ret, ret < 0 ? strerror(err) : "ok");
	check(ms(call_ns) >= SPIN_LOCK_BOUND_MS * 0.9 && ms(call_ns) < 2 * SPIN_LOCK_BOUND_MS,
	      "spin-lock section: the call gave up after its bound, not at the end of the section",
	      "%.0f ms (bound %d ms, section %.0f ms)", ms(call_ns), SPIN_LOCK_BOUND_MS, ms(full_ns));
	check(!run.err && run.retval == complete && info.nr_terminated_on_demand == 0,
	      "spin-lock section: the run was not stopped and nothing was counted",
	      "retval %u (complete %u), nr_terminated_on_demand %llu", run.retval, complete,
	      (unsigned long long)info.nr_terminated_on_demand);
	check(after == -1 && err_after == ESRCH, "spin-lock section: terminate after the run -> ESRCH",
	      "%ld %s", after, strerror(err_after));
	close(fd);
	close(map);

	/* The CPU took the abandoned interrupt at the unlock: the next stop there works. */
	fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_after_lock", 0);
	run = (struct run){ .prog_fd = fd, .cpu = TERMINATOR_CPU };
	set_delay(PREEMPT_DELAY_MS);
	t = start_run(&run, PREEMPT_AFTER_MS);
	errno = 0;
	ret = terminate(prog_id(fd), 0);
	err = errno;
	pthread_join(t, NULL);
	set_delay(0);
	check(ret == 1 && (int)run.retval == -1,
	      "spin-lock section: the next run on that CPU is stopped as usual",
	      "returned %ld (%s), retval %d", ret, ret < 0 ? strerror(err) : "ok", (int)run.retval);
	close(fd);
	pin_to(TERMINATOR_CPU);
	*iterations = complete;
	return ms(full_ns);
}

/*
 * Issue 14, point 12: a run is marked running a few instructions before its
 * first one.  The fault knob kernel.bpf_termination_fault_entry_delay_ms
 * holds it there for ENTRY_DELAY_MS, and a terminate lands in that window.
 * Nothing of the run is inside the program yet, so the kernel must claim
 * nothing (EAGAIN, no count, no stop event) and leave the run untouched; a
 * terminate once the run is in its first slow helper must then stop it for
 * real: its second helper does not run.  Before, the first call returned 1
 * and counted a stop, the run then executed the original from its first
 * instruction with both helpers, and the second call said EALREADY.
 */
#define ENTRY_DELAY_MS 1000

static void test_run_start_window(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_entry", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };
	struct termlab_prog_info info = {};
	long at_entry, in_helper;
	int entry_errno, helper_errno, stops;
	uint64_t called_ns, returned_ns;
	char handler[512];
	unsigned int knob;
	pthread_t t;

	if (!read_sysctl(FAULT_ENTRY_DELAY_SYSCTL, &knob)) {
		check(false, "run-start window: the fault knob exists", "%s missing",
		      FAULT_ENTRY_DELAY_SYSCTL);
		close(fd);
		return;
	}
	set_delay(DELAY_MS);
	write_sysctl(FAULT_ENTRY_DELAY_SYSCTL, ENTRY_DELAY_MS);
	t = start_run(&run, ENTRY_DELAY_MS / 2);
	called_ns = now_ns();
	errno = 0;
	at_entry = terminate(id, 0);
	entry_errno = errno;
	returned_ns = now_ns();
	/* Runs that start from now on are not held. */
	write_sysctl(FAULT_ENTRY_DELAY_SYSCTL, 0);
	/* The held run enters its first slow helper ENTRY_DELAY_MS after it started. */
	sleep_ms(ENTRY_DELAY_MS / 2 + DELAY_MS / 2);
	errno = 0;
	in_helper = terminate(id, 0);
	helper_errno = errno;
	pthread_join(t, NULL);
	set_delay(0);
	get_term_info(fd, &info);
	stops = scan_events("bpf_prog_terminate", id, handler, sizeof(handler));

	check(at_entry == -1 && entry_errno == EAGAIN,
	      "run-start window: a terminate before the first insn claims nothing (EAGAIN)",
	      "returned %ld (%s)", at_entry, at_entry < 0 ? strerror(entry_errno) : "stopped");
	/* 20 tries 50 us apart; each waits for the IPI's round trip (ms under a busy TCG). */
	check(ms(returned_ns - called_ns) < ENTRY_DELAY_MS / 2,
	      "run-start window: the call gave up before the held run began (bounded tries)",
	      "%.3f ms, the run began %d ms after the call", ms(returned_ns - called_ns),
	      ENTRY_DELAY_MS / 2);
	check(in_helper == 1,
	      "run-start window: a terminate in the run's first helper then stops it",
	      "returned %ld (%s)", in_helper, in_helper < 0 ? strerror(helper_errno) : "ok");
	check(!run.err && (int)run.retval == -1,
	      "run-start window: the stopped run's second helper did not run (retval -1)",
	      "retval %d, %.0f ms", (int)run.retval, ms(run.end_ns - run.start_ns));
	/* The one stop is the one in the helper: it rewrote the run's frame. */
	check(info.nr_terminated_on_demand == 1 && stops == 1 &&
	      event_field(handler, "frames") >= 1,
	      "run-start window: one stop counted and traced, the one that rewrote a frame",
	      "nr_terminated_on_demand %llu, %d bpf_prog_terminate events, last %lld frames",
	      (unsigned long long)info.nr_terminated_on_demand, stops,
	      event_field(handler, "frames"));
	close(fd);
}

#define JIT_HARDEN_SYSCTL "/proc/sys/net/core/bpf_jit_harden"

/*
 * @insns loaded with constant blinding (bpf_jit_harden=2, put back after),
 * which leaves them without a termination copy; -1 and a failed check named
 * @what if the sysctl is missing.
 */
static int load_blinded_insns(const struct bpf_insn *insns, size_t cnt, const char *name,
			      const char *what)
{
	unsigned int harden;
	int fd;

	if (!read_sysctl(JIT_HARDEN_SYSCTL, &harden)) {
		check(false, what, "%s missing", JIT_HARDEN_SYSCTL);
		return -1;
	}
	write_sysctl(JIT_HARDEN_SYSCTL, 2);
	fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, cnt, name, 0);
	write_sysctl(JIT_HARDEN_SYSCTL, harden);
	return fd;
}

/* The two slow helpers without a termination copy (load_blinded_insns()). */
static int load_blinded(const char *what)
{
	return load_blinded_insns(two_slow_helpers, 5, "term_blinded", what);
}

/* One run of the tail-call chain, stopped after @after_ms by @id's terminate. */
static void tail_call_stop(int caller, uint32_t id, unsigned int after_ms, const char *what,
			   int want_retval, double max_delays)
{
	struct run run = { .prog_fd = caller };
	char name[160];
	uint64_t term_ns;
	int term_errno;
	long ret;

	ret = run_and_terminate(&run, id, after_ms, &term_ns, &term_errno);
	snprintf(name, sizeof(name), "tail-call chain: %s: stopped (1), returns %d within %.1f delays",
		 what, want_retval, max_delays);
	check(ret == 1 && !run.err && (int)run.retval == want_retval &&
	      ms(run.end_ns - run.start_ns) < max_delays * DELAY_MS, name,
	      "terminate %ld (%s), retval %d, %.0f ms", ret, ret < 0 ? strerror(term_errno) : "ok",
	      (int)run.retval, ms(run.end_ns - run.start_ns));
}

/*
 * A tail call into a program without a termination copy (loaded with
 * constant blinding): a terminate by the caller's id while the run is there
 * cannot stop it and says so (EOPNOTSUPP), not that nothing runs (ESRCH);
 * the run goes on through all three helpers.
 */
static void test_tail_call_uncopied(int caller, int map_fd)
{
	struct run run = { .prog_fd = caller };
	uint64_t term_ns;
	int blinded, term_errno;
	long ret;

	blinded = load_blinded("tail-call chain: a target without a copy");
	if (blinded < 0)
		return;
	raw_map_elem(BPF_MAP_UPDATE_ELEM, map_fd, 0, &blinded);
	set_delay(DELAY_MS);
	ret = run_and_terminate(&run, prog_id(caller), DELAY_MS * 3 / 2, &term_ns, &term_errno);
	set_delay(0);
	check(ret == -1 && term_errno == EOPNOTSUPP && !run.err && run.retval == 0 &&
	      ms(run.end_ns - run.start_ns) >= 3 * DELAY_MS * 0.95,
	      "tail-call chain: by the caller's id, the run in a target without a copy (constant blinding) -> EOPNOTSUPP, not ESRCH; the run goes on whole",
	      "terminate %ld (%s), retval %d, %.0f ms", ret, ret < 0 ? strerror(term_errno) : "ok",
	      (int)run.retval, ms(run.end_ns - run.start_ns));
	close(blinded);
}

/*
 * Runs that reach the callee through a tail call made by a program without a
 * termination copy: from its main image (@caller_insns loaded with constant
 * blinding), where the callee replaces the caller's whole frame, and from a
 * subprogram (raw_load_tail_call()), whose caller's frames stay below the
 * callee's.  Either way the run is in the callee, so a terminate by the
 * callee's id must not answer ESRCH.  The first run is stopped in the
 * callee's first helper, which is all of the run that is left (its second
 * helper does not run: -1); the second cannot be, since the callee would
 * return into its caller's original image, and the call says so
 * (EOPNOTSUPP) while the run goes on whole.
 */
static void test_tail_call_from_uncopied(int callee, const struct bpf_insn *caller_insns,
					 size_t cnt)
{
	int blinded, sub_map, sub = raw_load_tail_call("term_tail_sub", &sub_map);
	uint32_t callee_id = prog_id(callee);
	struct run run = {};
	uint64_t term_ns;
	int term_errno;
	long ret;

	blinded = load_blinded_insns(caller_insns, cnt, "term_tail_blind",
				     "tail-call chain: a caller without a copy");
	if (blinded < 0)
		return;
	set_delay(DELAY_MS);
	run.prog_fd = blinded;
	ret = run_and_terminate(&run, callee_id, DELAY_MS * 3 / 2, &term_ns, &term_errno);
	check(ret == 1 && !run.err && (int)run.retval == -1 &&
	      ms(run.end_ns - run.start_ns) < 2.5 * DELAY_MS,
	      "tail-call chain: tail-called by a caller without a copy (constant blinding), the callee is stopped by its id: 1, returns -1 within 2.5 delays",
	      "terminate %ld (%s), retval %d, %.0f ms", ret, ret < 0 ? strerror(term_errno) : "ok",
	      (int)run.retval, ms(run.end_ns - run.start_ns));

	ret = raw_map_elem(BPF_MAP_UPDATE_ELEM, sub_map, 0, &callee);
	run.prog_fd = sub;
	ret = ret ?: run_and_terminate(&run, callee_id, DELAY_MS / 2, &term_ns, &term_errno);
	check(ret == -1 && term_errno == EOPNOTSUPP && !run.err && run.retval == 0 &&
	      ms(run.end_ns - run.start_ns) >= 2 * DELAY_MS * 0.95,
	      "tail-call chain: tail-called from a subprogram, the callee's run cannot be stopped (its caller's frames stay below it) -> EOPNOTSUPP, not ESRCH; the run goes on whole",
	      "terminate %ld (%s), retval %d, %.0f ms", ret, ret < 0 ? strerror(term_errno) : "ok",
	      (int)run.retval, ms(run.end_ns - run.start_ns));
	set_delay(0);
	close(blinded);
	close(sub);
	close(sub_map);
}

/*
 * A run follows its tail calls (patch 0024; issue 14, point 9).  The caller
 * runs a slow helper, then tail-calls the two slow helpers from a prog
 * array: three delays in all, 0 returned.  Stopped in the callee's first
 * helper, by the callee's id or by the caller's (the program the hook ran),
 * the callee's second helper does not run (-1, its stub's result, after two
 * delays); stopped in the caller's helper, the run does not enter the
 * callee at all (the copy's tail call falls through to "return 42").  The
 * stops are counted and traced for the program the run was in.  Before:
 * EOPNOTSUPP for both programs while the callee was in the prog array, and
 * every run went on through all three helpers.
 */
static void test_tail_call_chain(void)
{
	int callee = load(BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_callee", 0);
	int map_fd = raw_map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 1);
	const struct bpf_insn caller_insns[] = {
		MOV64_REG(BPF_REG_6, BPF_REG_1),
		CALL_HELPER(BPF_FUNC_get_numa_node_id),
		MOV64_REG(BPF_REG_1, BPF_REG_6),
		LD_MAP_FD(BPF_REG_2, map_fd),
		MOV64_IMM(BPF_REG_3, 0),
		CALL_HELPER(BPF_FUNC_tail_call),
		MOV64_IMM(BPF_REG_0, 42),
		EXIT(),
	};
	int caller = load(BPF_PROG_TYPE_RAW_TRACEPOINT, caller_insns,
			  sizeof(caller_insns) / sizeof(caller_insns[0]), "term_tail_caller", 0);
	uint32_t callee_id = prog_id(callee), caller_id = prog_id(caller);
	struct termlab_prog_info callee_info = {}, caller_info = {};
	struct run run = { .prog_fd = caller };
	char handler[512];
	int stops;
	long ret;

	ret = raw_map_elem(BPF_MAP_UPDATE_ELEM, map_fd, 0, &callee);
	check(ret == 0, "tail-call chain: the callee is in the caller's prog array", "%s",
	      ret ? strerror(errno) : "updated");
	errno = 0;
	ret = terminate(callee_id, 0);
	check(ret == -1 && errno == ESRCH, "tail-call chain: the callee, idle in a prog array -> ESRCH",
	      "%ld %s", ret, strerror(errno));

	set_delay(DELAY_MS);
	tail_call_stop(caller, callee_id, DELAY_MS * 3 / 2, "by the callee's id, in its first helper",
		       -1, 2.5);
	tail_call_stop(caller, caller_id, DELAY_MS * 3 / 2, "by the caller's id, in the callee's first helper",
		       -1, 2.5);
	tail_call_stop(caller, caller_id, DELAY_MS / 2, "by the caller's id, in its own helper",
		       42, 1.5);
	run_sync(&run);
	check(!run.err && run.retval == 0 && ms(run.end_ns - run.start_ns) >= 3 * DELAY_MS * 0.95,
	      "tail-call chain: the next run is whole (three helpers, the callee's 0)",
	      "retval %d, %.0f ms", (int)run.retval, ms(run.end_ns - run.start_ns));
	set_delay(0);

	get_term_info(callee, &callee_info);
	get_term_info(caller, &caller_info);
	stops = scan_events("bpf_prog_terminate", callee_id, handler, sizeof(handler));
	check(callee_info.nr_terminated_on_demand == 2 && caller_info.nr_terminated_on_demand == 1 &&
	      stops == 2,
	      "tail-call chain: each stop counted once, for the program the run was in",
	      "callee %llu, caller %llu counted, %d events of the callee",
	      (unsigned long long)callee_info.nr_terminated_on_demand,
	      (unsigned long long)caller_info.nr_terminated_on_demand, stops);
	test_tail_call_uncopied(caller, map_fd);
	raw_map_elem(BPF_MAP_UPDATE_ELEM, map_fd, 0, &callee);
	test_tail_call_from_uncopied(callee, caller_insns,
				     sizeof(caller_insns) / sizeof(caller_insns[0]));
	close(caller);
	close(map_fd);
	close(callee);
}

/* Loads a raw tracepoint program with @flags and term_verdict @verdict; -1 and errno on failure. */
static int load_with_verdict(const struct bpf_insn *insns, size_t cnt, const char *name,
			     uint32_t flags, uint32_t verdict)
{
	union bpf_attr attr;

	raw_prog_attr(&attr, BPF_PROG_TYPE_RAW_TRACEPOINT, insns, cnt, name, flags);
	return termlab_bpf_prog_load_verdict(&attr, sizeof(attr), verdict);
}

/*
 * A terminated run returns the verdict its program declared at load time
 * (BPF_F_TERM_VERDICT, patch 0018), not what its copy computes: the two
 * slow helpers' copy returns -1 when stopped in the first.  A declared 0
 * must count too, and a verdict without the flag is refused.
 */
static void test_declared_verdict(void)
{
	static const uint32_t verdicts[] = { 42, 0 };
	char name[128];
	long fd;

	errno = 0;
	fd = load_with_verdict(two_slow_helpers, 5, "term_verdict", 0, 42);
	check(fd == -1 && errno == EINVAL, "declared verdict: term_verdict without BPF_F_TERM_VERDICT -> EINVAL",
	      "%ld %s", fd, strerror(errno));
	if (fd >= 0)
		close(fd);

	set_delay(DELAY_MS);
	for (size_t i = 0; i < sizeof(verdicts) / sizeof(verdicts[0]); i++) {
		struct run run = {};
		uint64_t term_ns;
		int term_errno;
		long ret;

		fd = load_with_verdict(two_slow_helpers, 5, "term_verdict", TERMLAB_BPF_F_TERM_VERDICT,
				       verdicts[i]);
		snprintf(name, sizeof(name), "declared verdict %u: the program loads", verdicts[i]);
		check(fd >= 0, name, "%s", fd < 0 ? strerror(errno) : "loaded");
		if (fd < 0)
			continue;
		run.prog_fd = fd;
		ret = run_and_terminate(&run, prog_id(fd), DELAY_MS / 2, &term_ns, &term_errno);
		snprintf(name, sizeof(name),
			 "declared verdict %u: the stopped run returns it (its copy computes -1), after one delay",
			 verdicts[i]);
		check(ret == 1 && !run.err && run.retval == verdicts[i] &&
		      ms(run.end_ns - run.start_ns) < 1.5 * DELAY_MS, name,
		      "terminate %ld (%s), retval %d, %.0f ms", ret, ret < 0 ? strerror(term_errno) : "ok",
		      (int)run.retval, ms(run.end_ns - run.start_ns));
		run_sync(&run);
		snprintf(name, sizeof(name), "declared verdict %u: a run not stopped returns its own 0",
			 verdicts[i]);
		check(!run.err && run.retval == 0 && ms(run.end_ns - run.start_ns) >= 2 * DELAY_MS * 0.95,
		      name, "retval %d, %.0f ms", (int)run.retval, ms(run.end_ns - run.start_ns));
		close(fd);
	}
	set_delay(0);
}

/*
 * Loads two_slow_helpers with BTF that describes its one function and puts
 * the @ntags decl tags @tags on it (what clang emits for
 * __attribute__((btf_decl_tag(...)))), with @flags; -1 and errno on failure.
 */
static int load_with_tags(const char *const *tags, uint32_t ntags, uint32_t flags)
{
	struct bpf_func_info func = { .insn_off = 0, .type_id = 3 };
	char strings[256] = RAW_BTF_FUNC_STRINGS;
	uint32_t types[4 + 3 + 3 + 4 * 2], *t = raw_btf_func_types(types, 1);
	uint32_t at = sizeof(RAW_BTF_FUNC_STRINGS);
	union bpf_attr attr;
	int fd, btf_fd;

	for (uint32_t i = 0; i < ntags && i < 2; i++) {
		size_t len = strlen(tags[i]) + 1;

		if (at + len > sizeof(strings))
			break;
		memcpy(strings + at, tags[i], len);
		*t++ = at;
		*t++ = BTF_KIND_DECL_TAG << 24;
		*t++ = 3;		/* on f */
		*t++ = (uint32_t)-1;	/* the function itself, not an argument */
		at += len;
	}
	btf_fd = raw_btf_load(types, (t - types) * 4, strings, at);
	raw_prog_attr(&attr, BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_tag", flags);
	attr.prog_btf_fd = btf_fd;
	attr.func_info_rec_size = sizeof(func);
	attr.func_info = (uintptr_t)&func;
	attr.func_info_cnt = 1;
	fd = termlab_bpf_prog_load_verdict(&attr, sizeof(attr), 0);
	close(btf_fd);
	return fd;
}

/*
 * The verdict declared in the program's BTF, for loaders without
 * term_verdict (libbpf): a "term_verdict:N" decl tag on the main function
 * means BPF_F_TERM_VERDICT with N.  A stopped run returns N; a tag that is
 * not an integer, two tags, or a tag beside the flag are refused.
 */
static void test_verdict_tag(void)
{
	static const char *const bad[][2] = {
		{ "term_verdict:x" }, { "term_verdict:1", "term_verdict:2" },
	};
	static const char *const tag[] = { "term_verdict:-5" };
	struct run run = {};
	uint64_t term_ns;
	int term_errno;
	long fd, ret;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char name[128];

		errno = 0;
		fd = load_with_tags(bad[i], bad[i][1] ? 2 : 1, 0);
		snprintf(name, sizeof(name), "verdict tag: %s%s%s -> EINVAL", bad[i][0],
			 bad[i][1] ? " and " : "", bad[i][1] ? bad[i][1] : "");
		check(fd == -1 && errno == EINVAL, name, "%ld %s", fd, strerror(errno));
		if (fd >= 0)
			close(fd);
	}
	errno = 0;
	fd = load_with_tags(tag, 1, TERMLAB_BPF_F_TERM_VERDICT);
	check(fd == -1 && errno == EINVAL, "verdict tag: beside BPF_F_TERM_VERDICT -> EINVAL",
	      "%ld %s", fd, strerror(errno));
	if (fd >= 0)
		close(fd);

	fd = load_with_tags(tag, 1, 0);
	check(fd >= 0, "verdict tag: a program tagged term_verdict:-5 loads", "%s",
	      fd < 0 ? strerror(errno) : "loaded");
	if (fd < 0)
		return;
	set_delay(DELAY_MS);
	run.prog_fd = fd;
	ret = run_and_terminate(&run, prog_id(fd), DELAY_MS / 2, &term_ns, &term_errno);
	check(ret == 1 && !run.err && (int)run.retval == -5,
	      "verdict tag: the stopped run returns -5 (its copy computes -1)",
	      "terminate %ld (%s), retval %d", ret, ret < 0 ? strerror(term_errno) : "ok",
	      (int)run.retval);
	set_delay(0);
	close(fd);
}

/*
 * Constructs the kernel refuses to terminate (EOPNOTSUPP), checked before
 * whether a run is in progress: a tail call from a subprogram (its target
 * returns into the caller's image, patch 0024), and constant blinding
 * (bpf_jit_harden=2), which rewrites the two images differently, so there is
 * no exact map between them.
 */
static void test_refused_constructs(void)
{
	int map_fd, fd = raw_load_tail_call("term_tail", &map_fd);
	long ret;

	errno = 0;
	ret = terminate(prog_id(fd), 0);
	check(ret == -1 && errno == EOPNOTSUPP, "program with a tail call from a subprogram -> EOPNOTSUPP",
	      "%ld %s", ret, strerror(errno));
	close(fd);
	close(map_fd);

	fd = load_blinded("program JITed with constant blinding (bpf_jit_harden=2) -> EOPNOTSUPP");
	if (fd < 0)
		return;
	errno = 0;
	ret = terminate(prog_id(fd), 0);
	check(ret == -1 && errno == EOPNOTSUPP,
	      "program JITed with constant blinding (bpf_jit_harden=2) -> EOPNOTSUPP", "%ld %s", ret,
	      strerror(errno));
	close(fd);
}

/* Does /proc/kallsyms list @symbol (as `ADDR t SYMBOL\t[bpf]`)? */
static bool kallsyms_has(const char *symbol)
{
	char line[512], name[256];
	bool found = false;
	FILE *f = fopen("/proc/kallsyms", "r");

	while (f && !found && fgets(line, sizeof(line), f))
		found = sscanf(line, "%*s %*s %255s", name) == 1 && !strcmp(name, symbol);
	if (f)
		fclose(f);
	return found;
}

/*
 * A loaded program's two images are in kallsyms under the names perf and
 * stack traces show: bpf_prog_<tag>_<name> and bpf_term_<tag>_<name>.
 */
static void test_kallsyms(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, two_slow_helpers, 5, "term_syms", 0);
	struct bpf_prog_info info;
	char tag[2 * BPF_TAG_SIZE + 1], symbol[128], name[192];

	raw_prog_info(fd, &info);
	for (int i = 0; i < BPF_TAG_SIZE; i++)
		sprintf(tag + 2 * i, "%02x", info.tag[i]);
	snprintf(symbol, sizeof(symbol), "bpf_prog_%s_term_syms", tag);
	snprintf(name, sizeof(name), "kallsyms lists the original image %s", symbol);
	check(kallsyms_has(symbol), name, NULL);
	snprintf(symbol, sizeof(symbol), "bpf_term_%s_term_syms", tag);
	snprintf(name, sizeof(name), "kallsyms lists the termination copy %s", symbol);
	check(kallsyms_has(symbol), name, NULL);
	close(fd);
}

/* bpf_prog_info of @fd with the termination fields, arrays sized by the caller. */
static void get_term_info(int fd, struct termlab_prog_info *info)
{
	union bpf_attr attr = {};

	attr.info.bpf_fd = fd;
	attr.info.info_len = sizeof(*info);
	attr.info.info = (uintptr_t)info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr))) {
		perror("BPF_OBJ_GET_INFO_BY_FD");
		exit(1);
	}
}

/* Is @addr the address of a bpf_term_* symbol in /proc/kallsyms? */
static bool kallsyms_has_copy_at(uint64_t addr)
{
	char line[512], name[256];
	unsigned long long sym;
	bool found = false;
	FILE *f = fopen("/proc/kallsyms", "r");

	while (f && !found && fgets(line, sizeof(line), f))
		found = sscanf(line, "%llx %*s %255s", &sym, name) == 2 && sym == addr &&
			strncmp(name, "bpf_term_", 9) == 0;
	if (f)
		fclose(f);
	return found;
}

/*
 * bpf_prog_info reports the copy and both instruction offset maps: one copy
 * image per JITed function, in kallsyms; one offset per instruction plus an
 * end entry per function; offsets ascending and inside each image; identical
 * prologues, so instruction 0 sits at the same offset in both.
 */
static void test_prog_info(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, subprog_slow_helpers,
		      sizeof(subprog_slow_helpers) / sizeof(subprog_slow_helpers[0]), "term_info", 0);
	int plain = load(BPF_PROG_TYPE_SYSCALL, return_zero, 2, "term_plain", BPF_F_SLEEPABLE);
	struct termlab_prog_info info = {};
	uint64_t prog_addrs[8], copy_addrs[8];
	uint32_t prog_lens[8], copy_lens[8], funcs, nr_offs, i, n = 0, bad = 0;
	struct termlab_term_insn_off *offs;

	get_term_info(fd, &info);
	funcs = info.nr_term_jited_ksyms;
	nr_offs = info.nr_term_insn_offs;
	check(funcs == 3 && funcs == info.base.nr_jited_ksyms, "prog info: one copy image per function",
	      "%u copy images, %u functions", funcs, info.base.nr_jited_ksyms);
	check(nr_offs == info.base.xlated_prog_len / 8 + funcs,
	      "prog info: one offset per instruction and one end per function",
	      "%u offsets for %u insns", nr_offs, info.base.xlated_prog_len / 8);
	if (funcs != 3 || !nr_offs || nr_offs > 4096) {
		close(plain);
		close(fd);
		return;
	}
	offs = calloc(nr_offs, sizeof(*offs));
	memset(&info, 0, sizeof(info));
	info.base.nr_jited_ksyms = info.base.nr_jited_func_lens = funcs;
	info.base.jited_ksyms = (uintptr_t)prog_addrs;
	info.base.jited_func_lens = (uintptr_t)prog_lens;
	info.nr_term_jited_ksyms = funcs;
	info.term_jited_ksyms = (uintptr_t)copy_addrs;
	info.term_jited_func_lens = (uintptr_t)copy_lens;
	info.nr_term_insn_offs = nr_offs;
	info.term_insn_offs = (uintptr_t)offs;
	get_term_info(fd, &info);
	for (i = 0; i < funcs; i++) {
		uint32_t first = n;

		bad += !kallsyms_has_copy_at(copy_addrs[i]) || copy_addrs[i] == prog_addrs[i];
		for (; n < nr_offs && offs[n].func == i; n++) {
			bad += offs[n].insn != n - first;
			bad += n > first && (offs[n].prog_off < offs[n - 1].prog_off ||
					     offs[n].copy_off < offs[n - 1].copy_off);
			bad += offs[n].prog_off > prog_lens[i] || offs[n].copy_off > copy_lens[i];
		}
		bad += n == first || offs[first].prog_off != offs[first].copy_off;
	}
	check(!bad && n == nr_offs, "prog info: copies in kallsyms, maps ascending inside both images",
	      "%u inconsistencies, %u of %u entries in order", bad, n, nr_offs);
	free(offs);

	memset(&info, 0, sizeof(info));
	get_term_info(plain, &info);
	check(info.nr_term_jited_ksyms == 0 && info.nr_term_insn_offs == 0,
	      "prog info: a program without copy reports none", "%u images, %u offsets",
	      info.nr_term_jited_ksyms, info.nr_term_insn_offs);
	close(plain);
	close(fd);
}

/* ------------------------------------------------------ runtime budget */

/* A multiple of the guest's tick (CONFIG_HZ=250: 4 ms), see test_budget(). */
#define BUDGET_MS 200
/*
 * "Stopped near the budget", not its precision: under TCG on a busy host a
 * vCPU can miss its tick for 100 ms.  The overshoot is measured, with many
 * samples, by scenarios/budget.toml; here it is only printed.
 */
#define BUDGET_LATE_MS 500

static uint64_t boottime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* Writes @value to kernel.bpf_max_runtime_ms; returns 0 or the write's errno. */
static int write_max_runtime(unsigned int value)
{
	int fd = open(TERMLAB_MAX_RUNTIME_SYSCTL, O_WRONLY), err = 0;
	char buf[32];
	int len = snprintf(buf, sizeof(buf), "%u\n", value);

	if (fd < 0)
		return errno;
	if (write(fd, buf, len) != len)
		err = errno;
	close(fd);
	return err;
}

static unsigned int read_max_runtime(void)
{
	unsigned int value;

	return read_sysctl(TERMLAB_MAX_RUNTIME_SYSCTL, &value) ? value : ~0u;
}

/* Every bad budget request fails with its documented errno and changes nothing. */
static void test_budget_errors(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, return_zero, 2, "budget_idle", 0);
	int sleepable = load(BPF_PROG_TYPE_SYSCALL, return_zero, 2, "budget_sleep",
			     BPF_F_SLEEPABLE);
	uint32_t id = prog_id(fd);
	struct termlab_prog_budget_attr flagged = { id, 10, 1 };
	struct { struct termlab_prog_budget_attr b; uint32_t pad; } padded = { { id, 10, 0 }, 1 };
	struct termlab_prog_info info = {};
	pid_t child;
	int status, err;
	long ret;

	errno = 0;
	ret = termlab_bpf_prog_set_runtime_budget(0x7ffffff0, 10);
	check(ret == -1 && errno == ENOENT, "budget: unknown id -> ENOENT", "%ld %s", ret,
	      strerror(errno));
	ret = termlab_bpf_prog_set_runtime_budget(id, 60001);
	check(ret == -1 && errno == EINVAL, "budget: 60001 ms -> EINVAL", "%ld %s", ret,
	      strerror(errno));
	ret = sys_bpf(TERMLAB_BPF_PROG_SET_RUNTIME_BUDGET, &flagged, sizeof(flagged));
	check(ret == -1 && errno == EINVAL, "budget: non-zero flags -> EINVAL", "%ld %s", ret,
	      strerror(errno));
	ret = sys_bpf(TERMLAB_BPF_PROG_SET_RUNTIME_BUDGET, &padded, sizeof(padded));
	check(ret == -1 && errno == EINVAL, "budget: non-zero bytes after the attr -> EINVAL",
	      "%ld %s", ret, strerror(errno));
	ret = termlab_bpf_prog_set_runtime_budget(prog_id(sleepable), 10);
	check(ret == -1 && errno == EOPNOTSUPP, "budget: sleepable program -> EOPNOTSUPP",
	      "%ld %s", ret, strerror(errno));
	child = fork();
	if (!child) {
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(100);
		errno = 0;
		_exit(termlab_bpf_prog_set_runtime_budget(id, 10) == -1 ? errno : 101);
	}
	waitpid(child, &status, 0);
	check(WIFEXITED(status) && WEXITSTATUS(status) == EPERM, "budget: unprivileged -> EPERM",
	      "child exit %d", WEXITSTATUS(status));
	get_term_info(fd, &info);
	check(info.runtime_budget_ms == 0, "budget: rejected requests left the budget at 0",
	      "%u ms", info.runtime_budget_ms);

	ret = termlab_bpf_prog_set_runtime_budget(id, 60000);
	memset(&info, 0, sizeof(info));	/* the last call's lengths with no buffers: EFAULT */
	get_term_info(fd, &info);
	check(ret == 0 && info.runtime_budget_ms == 60000, "budget: 60000 ms is accepted and reported",
	      "%ld, info %u ms", ret, info.runtime_budget_ms);
	termlab_bpf_prog_set_runtime_budget(id, 0);

	err = write_max_runtime(60001);
	check(err == EINVAL && read_max_runtime() == 0,
	      "budget: kernel.bpf_max_runtime_ms rejects 60001 and stays 0", "write: %s, value %u",
	      strerror(err), read_max_runtime());
	close(sleepable);
	close(fd);
}

/*
 * One run of @run's program with a budget in force: it must be terminated
 * (fewer calls than a complete run) no earlier than BUDGET_MS and well
 * before its natural end, counted once more in bpf_prog_info.
 */
static void expect_budget_stop(struct run *run, uint64_t budget_runs, const char *how)
{
	struct termlab_prog_info info = {};
	uint64_t before = boottime_ns(), after;
	double took;
	char name[160];

	run_sync(run);
	after = boottime_ns();
	took = ms(run->end_ns - run->start_ns);
	get_term_info(run->prog_fd, &info);
	snprintf(name, sizeof(name), "budget (%s): the run is terminated in the copy", how);
	check(!run->err && run->retval <= CASE2_CALLS, name, "retval %u, complete run %u",
	      run->retval, CASE2_CALLS + 1);
	snprintf(name, sizeof(name), "budget (%s): stopped no earlier than %d ms, less than %d ms later",
		 how, BUDGET_MS, BUDGET_LATE_MS);
	check(took >= BUDGET_MS && took < BUDGET_MS + BUDGET_LATE_MS, name,
	      "run %.3f ms, overshoot %.3f ms", took, took - BUDGET_MS);
	snprintf(name, sizeof(name), "budget (%s): prog info counts it, at the time it happened",
		 how);
	check(info.nr_terminated_budget == budget_runs && info.nr_terminated_on_demand == 0 &&
	      info.last_terminated_ns >= before && info.last_terminated_ns <= after, name,
	      "budget %llu (want %llu), on demand %llu, last %llu in [%llu, %llu]",
	      (unsigned long long)info.nr_terminated_budget, (unsigned long long)budget_runs,
	      (unsigned long long)info.nr_terminated_on_demand,
	      (unsigned long long)info.last_terminated_ns, (unsigned long long)before,
	      (unsigned long long)after);
}

static void expect_complete_run(struct run *run, const char *name)
{
	run_sync(run);
	check(!run->err && run->retval == CASE2_CALLS + 1, name, "retval %u, %.1f ms", run->retval,
	      ms(run->end_ns - run->start_ns));
}

/*
 * The BPF-text loop of case 2 runs for seconds under emulation.  A budget of
 * BUDGET_MS, the program's own or the system-wide one, stops it; a larger
 * own budget overrides the system-wide one; without a budget it completes.
 */
static void test_budget(void)
{
	int fd = load(BPF_PROG_TYPE_RAW_TRACEPOINT, bpf_text_loop,
		      sizeof(bpf_text_loop) / sizeof(bpf_text_loop[0]), "term_budget", 0);
	uint32_t id = prog_id(fd);
	struct run run = { .prog_fd = fd };

	run_sync(&run);
	check(!run.err && ms(run.end_ns - run.start_ns) > 3 * BUDGET_MS,
	      "budget: an unbudgeted run lasts well over the budget",
	      "%.1f ms, budget %d ms", ms(run.end_ns - run.start_ns), BUDGET_MS);

	termlab_bpf_prog_set_runtime_budget(id, BUDGET_MS);
	expect_budget_stop(&run, 1, "its own");
	termlab_bpf_prog_set_runtime_budget(id, 0);
	write_max_runtime(BUDGET_MS);
	expect_budget_stop(&run, 2, "kernel.bpf_max_runtime_ms");
	termlab_bpf_prog_set_runtime_budget(id, 60000);
	expect_complete_run(&run, "budget: a program's own 60 s budget overrides the system-wide one");
	termlab_bpf_prog_set_runtime_budget(id, 0);
	write_max_runtime(0);
	expect_complete_run(&run, "budget: without any budget the run completes again");
	close(fd);
}

/*
 * Issue 14, point 11, for the budget: the tick that enforces a runtime budget
 * cannot fire while a run holds a bpf_spin_lock (interrupts off).  A run whose
 * budget runs out inside its section is stopped at the first tick after the
 * unlock, in the same loop that follows it outside the lock (case 2): not
 * inside the section, and not at its natural end.  The section makes half of
 * the control run's iterations (test_spin_lock_section(): @iterations in
 * @section_ms), the loop after it the other half.
 */
static void test_budget_after_spin_lock(double section_ms, uint32_t iterations)
{
	int map = spin_lock_map();
	struct bpf_insn insns[SPIN_LOCK_PROG_MAX];
	size_t n = spin_lock_prog(insns, map, true);
	int fd = load(BPF_PROG_TYPE_SCHED_CLS, insns, n, "term_lock_budget", 0);
	uint32_t value[2] = { 0, iterations / 2 };	/* the lock, x */
	struct run run = { .prog_fd = fd, .packet = true, .cpu = TERMINATOR_CPU };
	struct termlab_prog_info info = {};
	double took, bound, half_ms = section_ms / 2;

	if (raw_map_elem(BPF_MAP_UPDATE_ELEM, map, 0, value)) {
		printf("# setting the section's iterations: %s\n", strerror(errno));
		exit(1);
	}
	pin_to(RUNNER_CPU);
	termlab_bpf_prog_set_runtime_budget(prog_id(fd), BUDGET_MS);
	run_sync(&run);
	took = ms(run.end_ns - run.start_ns);
	get_term_info(fd, &info);
	check(!run.err && info.nr_terminated_budget == 1 && run.retval < iterations / 4,
	      "budget (spin-lock section): the run is stopped by its budget once the section ends, early in the loop after it",
	      "stopped by budget %llu, %u of %u iterations after the unlock",
	      (unsigned long long)info.nr_terminated_budget, run.retval, iterations - iterations / 2);
	/*
	 * A stop inside the section would end the run near BUDGET_MS; how soon
	 * after the section it came is the count above.  The section's own time
	 * varies with the host's load, from one run to the next: 2383 ms
	 * expected and 2883 ms taken once beside a stress guest, and 7137 ms
	 * expected (the control run slowed down) and at most 3121 ms taken once
	 * beside three.  So the bound is half the expected section, but no more
	 * than 5 x BUDGET_MS, still far from a stop near the budget.
	 */
	bound = half_ms / 2 < 5 * BUDGET_MS ? half_ms / 2 : 5 * BUDGET_MS;
	check(took >= bound,
	      "budget (spin-lock section): not stopped inside the section (interrupts off there)",
	      "run %.0f ms (at least %.0f), the section about %.0f ms, budget %d ms", took, bound,
	      half_ms, BUDGET_MS);
	close(fd);
	close(map);
	pin_to(TERMINATOR_CPU);
}

/* Turns on the bpf trace events (the kernel's account of each stop). */
static void enable_trace_events(void)
{
	FILE *f = fopen(TRACE_DIR "/events/bpf/enable", "w");
	bool ok = f && fputs("1\n", f) >= 0;

	ok = f && !fclose(f) && ok;
	check(ok, "bpf trace events enabled (" TRACE_DIR "/events/bpf)", ok ? NULL : "%s",
	      strerror(errno));
}

#define UNPRIV_BPF_SYSCTL "/proc/sys/kernel/unprivileged_bpf_disabled"
static unsigned int unpriv_bpf_before = ~0u;

/*
 * With kernel.unprivileged_bpf_disabled=0 the bpf() syscall lets an
 * unprivileged caller reach the command, so the EPERM checks see the
 * command's own capability check, not the global switch (1 cannot be
 * undone: the checks then say so by failing).  restore_unprivileged_bpf()
 * puts the value back.
 */
static void allow_unprivileged_bpf(void)
{
	FILE *f;
	bool ok;

	if (!read_sysctl(UNPRIV_BPF_SYSCTL, &unpriv_bpf_before) || !unpriv_bpf_before)
		return;
	f = fopen(UNPRIV_BPF_SYSCTL, "w");
	ok = f && fputs("0\n", f) >= 0;
	if (f && fclose(f))
		ok = false;
	if (!ok)
		printf("# cannot set %s to 0 (it was %u): %s\n", UNPRIV_BPF_SYSCTL, unpriv_bpf_before,
		       strerror(errno));
}

static void restore_unprivileged_bpf(void)
{
	if (unpriv_bpf_before && unpriv_bpf_before != ~0u)
		write_sysctl(UNPRIV_BPF_SYSCTL, unpriv_bpf_before);
}

static int usage(void)
{
	fprintf(stderr, "usage: test_prog_terminate [--latency-ms MS]\n");
	return 2;
}

int main(int argc, char **argv)
{
	long long frames;
	uint32_t lock_iterations;
	double section_ms;

	for (int i = 1; i < argc; i++) {
		char *end;

		if (strcmp(argv[i], "--latency-ms") || i + 1 == argc)
			return usage();
		errno = 0;
		latency_ms = strtoul(argv[++i], &end, 10);
		if (errno || *end || !latency_ms)
			return usage();
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	pin_to(TERMINATOR_CPU);
	printf("TAP version 13\n");
	test_sysctl_defaults();
	enable_trace_events();
	allow_unprivileged_bpf();
	/*
	 * The slow helpers halt between interrupts instead of spinning
	 * (kernel.bpf_termination_demo_delay_idle; a terminate IPI lands in
	 * them all the same), but in the case-1 checks: under emulation a
	 * spinning vCPU keeps a host CPU busy through each delay, which tests
	 * run beside this one lack.  A helper with interrupts off spins anyway.
	 */
	write_sysctl(DEMO_DELAY_IDLE_SYSCTL, 1);
	test_errors_while_running();
	test_refused_constructs();
	test_tail_call_chain();
	test_declared_verdict();
	test_verdict_tag();
	test_kallsyms();
	test_prog_info();
	/* Case 1 as a runaway helper is: an IPI into a CPU busy in it. */
	write_sysctl(DEMO_DELAY_IDLE_SYSCTL, 0);
	frames = test_case1("case 1", two_slow_helpers, 5, 0);
	test_skip_rewrite(two_slow_helpers, 5, frames);
	write_sysctl(DEMO_DELAY_IDLE_SYSCTL, 1);
	test_terminate_twice();
	test_run_start_window();
	test_irqs_off_run();
	test_preempted_run();
	section_ms = test_spin_lock_section(&lock_iterations);
	test_case1("subprog", subprog_slow_helpers,
		   sizeof(subprog_slow_helpers) / sizeof(subprog_slow_helpers[0]), 2);
	test_case2("case 2 (may_goto loops, 2 frames)", bpf_text_loop,
		   sizeof(bpf_text_loop) / sizeof(bpf_text_loop[0]), NULL, 0, CASE2_CALLS + 1);
	test_case2("case 2 (bpf_loop in BPF text)", bpf_loop_text,
		   sizeof(bpf_loop_text) / sizeof(bpf_loop_text[0]), bpf_loop_funcs,
		   sizeof(bpf_loop_funcs) / sizeof(bpf_loop_funcs[0]), LOOP_CALLS);
	test_case2("case 2, bpf_loop 3 bpf2bpf frames deep", subprog_bpf_loop_text,
		   sizeof(subprog_bpf_loop_text) / sizeof(subprog_bpf_loop_text[0]),
		   subprog_bpf_loop_funcs,
		   sizeof(subprog_bpf_loop_funcs) / sizeof(subprog_bpf_loop_funcs[0]), LOOP_CALLS);
	test_timer_callback();
	test_counted_loop();
	test_stub_zeroes_buffer();
	test_budget_errors();
	test_budget();
	test_budget_after_spin_lock(section_ms, lock_iterations);
	write_sysctl(DEMO_DELAY_IDLE_SYSCTL, 0);
	restore_unprivileged_bpf();
	return tap_summary("test_prog_terminate");
}
