/* SPDX-License-Identifier: GPL-2.0 */
/*
 * How the skeleton loaders of this directory hold their program: they print the line a
 * scenario's loader prints once its program is loaded (prog_id=N ...), then wait for
 * SIGTERM or SIGINT, which termlab sends at power-off.
 *
 *   sigset_t stop;
 *   hold_begin(&stop);               before the line: a signal sent after it is not lost
 *   printf("prog_id=%u ...\n", ...);
 *   sig = hold_until_signal(&stop);  flushes the line, returns the signal
 */
#ifndef LOADER_HOLD_H
#define LOADER_HOLD_H

#include <signal.h>
#include <stdio.h>

static void hold_begin(sigset_t *stop)
{
	sigemptyset(stop);
	sigaddset(stop, SIGTERM);
	sigaddset(stop, SIGINT);
	sigprocmask(SIG_BLOCK, stop, NULL);
}

static int hold_until_signal(const sigset_t *stop)
{
	int sig = 0;

	fflush(stdout);
	sigwait(stop, &sig);
	return sig;
}

#endif
