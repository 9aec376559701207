/*
 * PID 1 of the VMM integration test guest. Reports what the host test asserts on the serial
 * console and exercises virtio-vsock in both directions. Behaviour comes from the kernel
 * command line (/proc/cmdline):
 *   termlab.host_port=P     connect to the host (CID 2) port P, send a line, print the reply
 *   termlab.listen_port=Q   listen on port Q before that; echo everything one host client
 *                           sends until it closes
 *   termlab.end=reboot|panic  reboot(RB_AUTOBOOT) like `reboot -f`, or exit PID 1, which
 *                           panics the kernel ("Attempted to kill init!"); the guest config
 *                           has no CONFIG_MAGIC_SYSRQ, so /proc/sysrq-trigger is unavailable.
 * Markers (one line each): TERMLAB-INIT-RAN, CPUS-ONLINE=<n>, VSOCK-LISTENING=<Q>,
 * GUEST-GOT=<reply>, VSOCK-ECHOED=<bytes>, TERMLAB-ERROR=<what>.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char cmdline[4096];

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

	if (param("end", value, sizeof(value)) && strcmp(value, "panic") == 0) {
		printf("TERMLAB-PANICKING\n");
		fflush(stdout);
		return 1; /* PID 1 exiting panics the kernel. */
	}
	sync();
	reboot(RB_AUTOBOOT);
	fail("reboot");
	return 1;
}
