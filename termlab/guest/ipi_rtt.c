// SPDX-License-Identifier: Apache-2.0
/*
 * ipi_rtt: the bare inter-processor-interrupt round trip of this guest, the
 * reference every termination latency is divided by in termlab's reports
 * (absolute times under nested virtualisation are emulated; ratios travel).
 *
 * A helper thread spins on CPU B while the main thread, on CPU A, calls
 * membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED): the kernel sends an IPI to
 * every other CPU currently running a thread of this process (only B) and
 * returns once B has run the handler. One call = one IPI round trip plus a
 * syscall. Prints one machine-readable line:
 *
 *   ipi_rtt count=N cpu=A other_cpu=B min_ns=.. median_ns=.. max_ns=..
 *
 *   ipi_rtt [--count N] [--cpu A] [--other-cpu B]      (defaults 21, 0, 1)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_COUNT 100000

static atomic_int stop_spinning;
static atomic_int spinner_running;

static long membarrier(int cmd)
{
	return syscall(__NR_membarrier, cmd, 0, 0);
}

static unsigned long long monotonic_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (unsigned long long)now.tv_sec * 1000000000ull + (unsigned long long)now.tv_nsec;
}

static int pin_to(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

static void *spin(void *arg)
{
	if (pin_to(*(int *)arg)) {
		perror("ipi_rtt: pinning the spinner");
		exit(1);
	}
	atomic_store(&spinner_running, 1);
	while (!atomic_load(&stop_spinning))
		;
	return NULL;
}

static int compare(const void *a, const void *b)
{
	unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;

	return x < y ? -1 : x > y;
}

static int parse(const char *text, long max, long *value)
{
	char *end;

	errno = 0;
	*value = strtol(text, &end, 10);
	return errno || *end || end == text || *value < 0 || *value > max ? -1 : 0;
}

int main(int argc, char **argv)
{
	long count = 21, cpu = 0, other_cpu = 1, i;
	unsigned long long *samples;
	pthread_t spinner;
	int other;

	for (i = 1; i < argc; i++) {
		long *target = NULL, max = 4095;

		if (strcmp(argv[i], "--count") == 0)
			target = &count, max = MAX_COUNT;
		else if (strcmp(argv[i], "--cpu") == 0)
			target = &cpu;
		else if (strcmp(argv[i], "--other-cpu") == 0)
			target = &other_cpu;
		if (!target || i + 1 >= argc || parse(argv[i + 1], max, target)) {
			fprintf(stderr, "usage: %s [--count 1..%d] [--cpu A] [--other-cpu B]\n", argv[0], MAX_COUNT);
			return 2;
		}
		i++;
	}
	if (count < 1 || cpu == other_cpu) {
		fprintf(stderr, "ipi_rtt: need --count >= 1 and two different CPUs\n");
		return 2;
	}
	if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)) {
		perror("ipi_rtt: membarrier register (CONFIG_MEMBARRIER?)");
		return 1;
	}
	if (pin_to((int)cpu)) {
		perror("ipi_rtt: pinning the caller");
		return 1;
	}
	samples = calloc((size_t)count, sizeof(*samples));
	if (!samples) {
		perror("ipi_rtt");
		return 1;
	}
	other = (int)other_cpu;
	if (pthread_create(&spinner, NULL, spin, &other)) {
		fprintf(stderr, "ipi_rtt: cannot start the spinner thread\n");
		return 1;
	}
	while (!atomic_load(&spinner_running))
		;
	for (i = 0; i < count; i++) {
		unsigned long long start = monotonic_ns();

		if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)) {
			perror("ipi_rtt: membarrier");
			return 1;
		}
		samples[i] = monotonic_ns() - start;
	}
	atomic_store(&stop_spinning, 1);
	pthread_join(spinner, NULL);
	qsort(samples, (size_t)count, sizeof(*samples), compare);
	printf("ipi_rtt count=%ld cpu=%ld other_cpu=%ld min_ns=%llu median_ns=%llu max_ns=%llu\n",
	       count, cpu, other_cpu, samples[0], samples[count / 2], samples[count - 1]);
	free(samples);
	return 0;
}
