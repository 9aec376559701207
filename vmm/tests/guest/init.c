/*
 * PID 1 of the VMM integration test guest. Reports what the host test asserts on the serial
 * console and exercises virtio-vsock in both directions. Behaviour comes from the kernel
 * command line (/proc/cmdline):
 *   termlab.host_port=P     connect to the host (CID 2) port P, send a line, print the reply
 *   termlab.listen_port=Q   listen on port Q before that; echo everything one host client
 *                           sends until it closes
 *   termlab.stress=S        for S seconds, two workers per CPU yield to each other in a
 *                           syscall loop with a pattern in the vector registers (AVX when
 *                           the kernel enabled it, else SSE), checking it after every 1000
 *                           rounds: the kernel must save and restore it on every switch
 *   termlab.end=reboot|panic  reboot(RB_AUTOBOOT) like `reboot -f`, or exit PID 1, which
 *                           panics the kernel ("Attempted to kill init!"); the guest config
 *                           has no CONFIG_MAGIC_SYSRQ, so /proc/sysrq-trigger is unavailable.
 * Markers (one line each): TERMLAB-INIT-RAN, CPUS-ONLINE=<n>, VSOCK-LISTENING=<Q>,
 * GUEST-GOT=<reply>, VSOCK-ECHOED=<bytes>, STRESS-VECTORS=avx|sse,
 * STRESS-DONE workers=<n> failed=<n> rounds=<n>, TERMLAB-ERROR=<what>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char cmdline[4096];

/*
 * Returns once everything written to the console has left the UART: the kernel prints its
 * panic and reboot messages straight to the console, and would otherwise cut into a marker
 * line still queued in the tty ("TERMLAB-PANICKI[ ... ] Kernel panic ... AttemNG").
 */
static void drain_console(void)
{
	fflush(stdout);
	tcdrain(STDOUT_FILENO);
}

static void fail(const char *what)
{
	printf("TERMLAB-ERROR=%s: %s\n", what, strerror(errno));
	fflush(stdout);
}

/* Value of "termlab.<key>=" on the command line, or NULL. */
static const char *param(const char *key, char *out, size_t len)
{
	char needle[64];
	snprintf(needle, sizeof(needle), "termlab.%s=", key);
	const char *at = strstr(cmdline, needle);
	if (!at)
		return NULL;
	at += strlen(needle);
	size_t n = strcspn(at, " \n");
	if (n >= len)
		n = len - 1;
	memcpy(out, at, n);
	out[n] = 0;
	return out;
}

static int count_online_cpus(void)
{
	/* "0-1" or "0,2-3": count every id in every range. */
	FILE *f = fopen("/sys/devices/system/cpu/online", "r");
	char buf[256];
	int count = 0;
	if (!f || !fgets(buf, sizeof(buf), f)) {
		fail("read cpu/online");
		return -1;
	}
	fclose(f);
	for (char *tok = strtok(buf, ",\n"); tok; tok = strtok(NULL, ",\n")) {
		int lo, hi;
		int n = sscanf(tok, "%d-%d", &lo, &hi);
		count += n == 2 ? hi - lo + 1 : 1;
	}
	return count;
}

static int vsock_socket(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket(AF_VSOCK)");
	return fd;
}

static void connect_to_host(unsigned port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
	char reply[128];
	int fd = vsock_socket();
	if (fd < 0)
		return;
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fail("connect to host");
		close(fd);
		return;
	}
	const char hello[] = "ping-from-guest\n";
	if (write(fd, hello, sizeof(hello) - 1) != sizeof(hello) - 1)
		fail("write to host");
	ssize_t n = 0, got;
	while (n < (ssize_t)sizeof(reply) - 1 && (got = read(fd, reply + n, sizeof(reply) - 1 - n)) > 0) {
		n += got;
		if (reply[n - 1] == '\n')
			break;
	}
	reply[n > 0 ? n : 0] = 0;
	reply[strcspn(reply, "\n")] = 0;
	printf("GUEST-GOT=%s\n", reply);
	fflush(stdout);
	close(fd);
}

static int listen_on(unsigned port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int fd = vsock_socket();
	if (fd < 0)
		return -1;
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 1) < 0) {
		fail("bind/listen");
		close(fd);
		return -1;
	}
	printf("VSOCK-LISTENING=%u\n", port);
	fflush(stdout);
	return fd;
}

static void echo_one_client(int listener)
{
	static char buf[65536];
	long total = 0;
	int fd = accept(listener, NULL, NULL);
	if (fd < 0) {
		fail("accept");
		return;
	}
	ssize_t n;
	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w <= 0) {
				fail("echo write");
				close(fd);
				return;
			}
			off += w;
		}
		total += n;
	}
	if (n < 0)
		fail("echo read");
	printf("VSOCK-ECHOED=%ld\n", total);
	fflush(stdout);
	close(fd);
}

/*
 * Loads ymm0-15 (or xmm0-15) from `in`, calls sched_yield `rounds` times with nothing but
 * the syscall touching registers, and stores the registers to `out`.
 */
#define AVX_LOAD(i) "vmovdqu " #i "*32(%[in]), %%ymm" #i "\n"
#define AVX_STORE(i) "vmovdqu %%ymm" #i ", " #i "*32(%[out])\n"
#define SSE_LOAD(i) "movdqu " #i "*16(%[in]), %%xmm" #i "\n"
#define SSE_STORE(i) "movdqu %%xmm" #i ", " #i "*16(%[out])\n"
#define SIXTEEN(m) m(0) m(1) m(2) m(3) m(4) m(5) m(6) m(7) m(8) m(9) m(10) m(11) m(12) m(13) m(14) m(15)
#define YIELD_LOOP "1: mov %[nr], %%eax\n syscall\n dec %[n]\n jnz 1b\n"
#define VECTOR_CLOBBERS "rax", "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", \
	"xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

__attribute__((target("avx"))) static void yield_keeping_ymm(unsigned long rounds, const uint8_t *in, uint8_t *out)
{
	asm volatile(SIXTEEN(AVX_LOAD) YIELD_LOOP SIXTEEN(AVX_STORE) "vzeroupper\n"
		     : [n] "+r"(rounds)
		     : [in] "r"(in), [out] "r"(out), [nr] "i"(SYS_sched_yield)
		     : VECTOR_CLOBBERS);
}

static void yield_keeping_xmm(unsigned long rounds, const uint8_t *in, uint8_t *out)
{
	asm volatile(SIXTEEN(SSE_LOAD) YIELD_LOOP SIXTEEN(SSE_STORE)
		     : [n] "+r"(rounds)
		     : [in] "r"(in), [out] "r"(out), [nr] "i"(SYS_sched_yield)
		     : VECTOR_CLOBBERS);
}

/* One worker pinned to `cpu`: returns 0 if the registers always came back intact. */
static int stress_worker(int cpu, int worker, int avx, double seconds, unsigned long *rounds)
{
	enum { CHUNK = 1000 };
	uint8_t in[16 * 32], out[16 * 32];
	size_t len = avx ? 16 * 32 : 16 * 16;
	cpu_set_t set;
	struct timespec start, now;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) < 0) {
		fail("sched_setaffinity");
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &start);
	*rounds = 0;
	do {
		/* A pattern unique to this worker and chunk, so another task's state shows. */
		for (size_t i = 0; i < len; i++)
			in[i] = (uint8_t)(i * 7 + worker * 31 + *rounds / CHUNK);
		if (avx)
			yield_keeping_ymm(CHUNK, in, out);
		else
			yield_keeping_xmm(CHUNK, in, out);
		*rounds += CHUNK;
		if (memcmp(in, out, len) != 0) {
			printf("TERMLAB-ERROR=vector registers of worker %d on CPU %d changed after %lu rounds\n",
			       worker, cpu, *rounds);
			return 1;
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
	return 0;
}

static void stress(double seconds)
{
	int cpus = count_online_cpus();
	int avx = __builtin_cpu_supports("avx");
	int workers = 0, failed = 0;
	unsigned long total = 0;
	int pipes[2];

	printf("STRESS-VECTORS=%s\n", avx ? "avx" : "sse");
	fflush(stdout);
	if (pipe(pipes) < 0) {
		fail("pipe");
		return;
	}
	for (int cpu = 0; cpu < cpus; cpu++) {
		for (int i = 0; i < 2; i++) {
			pid_t pid = fork();
			if (pid < 0) {
				fail("fork");
				continue;
			}
			if (pid == 0) {
				unsigned long rounds;
				int rc = stress_worker(cpu, workers, avx, seconds, &rounds);
				if (write(pipes[1], &rounds, sizeof(rounds)) != sizeof(rounds))
					rc = 1;
				fflush(stdout);
				_exit(rc);
			}
			workers++;
		}
	}
	close(pipes[1]);
	for (int i = 0; i < workers; i++) {
		int status;
		if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed++;
	}
	for (unsigned long rounds; read(pipes[0], &rounds, sizeof(rounds)) == sizeof(rounds);)
		total += rounds;
	close(pipes[0]);
	printf("STRESS-DONE workers=%d failed=%d rounds=%lu\n", workers, failed, total);
	fflush(stdout);
}

int main(void)
{
	char value[64];
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	FILE *f = fopen("/proc/cmdline", "r");
	if (!f || !fgets(cmdline, sizeof(cmdline), f))
		fail("read /proc/cmdline");
	if (f)
		fclose(f);

	printf("TERMLAB-INIT-RAN\n");
	printf("CPUS-ONLINE=%d\n", count_online_cpus());
	fflush(stdout);

	int listener = param("listen_port", value, sizeof(value)) ? listen_on(strtoul(value, NULL, 10)) : -1;
	if (param("host_port", value, sizeof(value)))
		connect_to_host(strtoul(value, NULL, 10));
	if (listener >= 0)
		echo_one_client(listener);
	if (param("stress", value, sizeof(value)))
		stress(strtod(value, NULL));

	if (param("end", value, sizeof(value)) && strcmp(value, "panic") == 0) {
		printf("TERMLAB-PANICKING\n");
		drain_console();
		return 1; /* PID 1 exiting panics the kernel. */
	}
	drain_console();
	sync();
	reboot(RB_AUTOBOOT);
	fail("reboot");
	return 1;
}
