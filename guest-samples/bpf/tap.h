/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The check lines of the guest's C test programs (test_prog_terminate.c,
 * term_stress.c): one kselftest-like line per check,
 *
 *   ok N - name
 *   ok N - name: details
 *   not ok N - name: why
 *   ok N - name # SKIP why
 *
 * numbered from 1 in the order printed, and a summary at the end.  The
 * proofs in the guest (guest-kernel/selftests/termination-proof.sh,
 * stress-proof.sh) renumber the `ok`/`not ok` lines into their own sequence
 * and read nothing else of them; run-qemu and run-stress read only the
 * proofs' own `selftest: N passed, M failed` line.
 *
 * Header-only, like raw_bpf.h: each user is a single-file static binary.
 * Call the functions from one process: a forked child's checks would be
 * counted in the child only.
 */
#ifndef TAP_H
#define TAP_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>

/* Counts of the checks printed so far. */
static struct {
	int passed, failed, skipped;
} tap;

/*
 * One check: `ok N - name` (with `: details` if @fmt is given) when @ok,
 * else `not ok N - name: why`.  The details say what was measured, so a
 * passing line is worth reading too.
 */
static void check(bool ok, const char *name, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void check(bool ok, const char *name, const char *fmt, ...)
{
	va_list ap;

	printf("%s %d - %s", ok ? "ok" : "not ok", tap.passed + tap.failed + tap.skipped + 1,
	       name);
	if (fmt) {
		printf(": ");
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
	}
	printf("\n");
	/* Before a fork() or a crash, the line must be out already. */
	fflush(stdout);
	if (ok)
		tap.passed++;
	else
		tap.failed++;
}

/* A check that cannot run here, and why: counts as passed for the proofs. */
static void __attribute__((unused)) skip(const char *name, const char *why)
{
	printf("ok %d - %s # SKIP %s\n", tap.passed + tap.failed + tap.skipped + 1, name, why);
	fflush(stdout);
	tap.skipped++;
}

/*
 * The summary line `@program: N passed, M failed` (skipped checks are in N
 * and said in a comment before it), and the exit status to return: 0 only
 * if no check failed.
 */
static int __attribute__((unused)) tap_summary(const char *program)
{
	if (tap.skipped)
		printf("# %s: %d of the passed checks skipped\n", program, tap.skipped);
	printf("%s: %d passed, %d failed\n", program, tap.passed + tap.skipped, tap.failed);
	fflush(stdout);
	return tap.failed ? 1 : 0;
}

#endif /* TAP_H */
