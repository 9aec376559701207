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
 * What remains here of the series' selftest, which is moving into upstream's
 * framework (tools/testing/selftests/bpf/prog_tests/prog_terminate.c, patch
 * 0031, where the stops in helpers, the errors, verdicts, tail calls, timer
 * callbacks, loops, stub buffers, prog info, the runtime budget, the
 * interrupts-off run and the run-start window are):
 * programs whose exact instructions matter (may_goto, which Debian's clang
 * cannot emit: case 2 in BPF text, spin-lock sections that last seconds,
 * the case-2 half of the preempted runs), and the preempted runs.
 *
 * Each stop is also checked in the kernel's own account of it, the bpf
 * trace events; --latency-ms bounds how long after the terminate call a run
 * stopped in BPF text (case 2) returns (default 500).
 *
 * Needs 2 CPUs, root, tracefs and the kernel.bpf_termination_demo_delay_ms
 * sysctl.  Prints one TAP line per check (tap.h) and
 * "test_prog_terminate: N passed, M failed".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/syscall.h>

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
	run->err = raw_test_run(run->prog_fd, 0, run->packet ? SOCK_DATAGRAM : 0,
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

/* Bound on a case-2 run's return after the terminate call (--latency-ms). */
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

/* The number after ` @key=` in an event line; -1 if it has none. */
static long long event_field(const char *line, const char *key)
{
	char pattern[32];
	const char *at;

	snprintf(pattern, sizeof(pattern), " %s=", key);
	at = strstr(line, pattern);
	return at ? strtoll(at + strlen(pattern), NULL, 10) : -1;
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
	/*
	 * The bound is the time the caller saw pass (0022), which a loaded host
	 * can stretch in wall time (1305 ms once, beside two other guests): the
	 * call must not have waited for the section, whose end is the run's.
	 */
	check(ms(call_ns) >= SPIN_LOCK_BOUND_MS * 0.9 &&
	      call_at_ns + call_ns + full_ns / 4 < run.end_ns,
	      "spin-lock section: the call gave up after its bound, not at the end of the section",
	      "%.0f ms (bound %d ms), returned %.0f ms before the section ended (%.0f ms long)",
	      ms(call_ns), SPIN_LOCK_BOUND_MS, ms(run.end_ns - call_at_ns - call_ns), ms(full_ns));
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

/* ------------------------------------------------------ runtime budget */

/* A multiple of the guest's tick (CONFIG_HZ=250: 4 ms). */
#define BUDGET_MS 200

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

static int usage(void)
{
	fprintf(stderr, "usage: test_prog_terminate [--latency-ms MS]\n");
	return 2;
}

int main(int argc, char **argv)
{
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
	/*
	 * The slow helpers halt between interrupts instead of spinning
	 * (kernel.bpf_termination_demo_delay_idle; a terminate IPI lands in
	 * them all the same), but in the case-1 checks: under emulation a
	 * spinning vCPU keeps a host CPU busy through each delay, which tests
	 * run beside this one lack.  A helper with interrupts off spins anyway.
	 */
	write_sysctl(DEMO_DELAY_IDLE_SYSCTL, 1);
	test_preempted_run();
	section_ms = test_spin_lock_section(&lock_iterations);
	test_case2("case 2 (may_goto loops, 2 frames)", bpf_text_loop,
		   sizeof(bpf_text_loop) / sizeof(bpf_text_loop[0]), NULL, 0, CASE2_CALLS + 1);
	test_budget_after_spin_lock(section_ms, lock_iterations);
	write_sysctl(DEMO_DELAY_IDLE_SYSCTL, 0);
	return tap_summary("test_prog_terminate");
}
