/*
 * PID 1 of the introspection test guest (tests/guest.rs). The host arms breakpoints in
 * __x64_sys_getppid once it sees INTROSPECT-READY; this init then waits two seconds (busy:
 * timer interrupts are not to be relied on in this guest) and makes exactly two getppid
 * calls, passing the call number as the first syscall argument (rdi) so the host can tell
 * the second call from the first one trapping again. Markers, one line each:
 *   KALLSYMS=<the /proc/kallsyms line of __x64_sys_getppid>
 *   INTROSPECT-READY
 *   GETPPID-<n>        after call n returned
 *   INTROSPECT-DONE    then reboot, which ends the VM with a reset
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void print_kallsyms_line(const char *name)
{
	char line[256];
	FILE *f = fopen("/proc/kallsyms", "r");
	if (!f) {
		printf("TERMLAB-ERROR=open /proc/kallsyms\n");
		return;
	}
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = 0;
		char *sym = strrchr(line, ' ');
		if (sym && strcmp(sym + 1, name) == 0) {
			printf("KALLSYMS=%s\n", line);
			break;
		}
	}
	fclose(f);
}

int main(void)
{
	mount("proc", "/proc", "proc", 0, NULL);
	print_kallsyms_line("__x64_sys_getppid");
	printf("INTROSPECT-READY\n");
	fflush(stdout);
	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	do
		clock_gettime(CLOCK_MONOTONIC, &now);
	while (now.tv_sec - start.tv_sec < 2);
	for (long call = 1; call <= 2; call++) {
		syscall(SYS_getppid, call);
		printf("GETPPID-%ld\n", call);
		fflush(stdout);
	}
	printf("INTROSPECT-DONE\n");
	fflush(stdout);
	sync();
	reboot(RB_AUTOBOOT);
	printf("TERMLAB-ERROR=reboot\n");
	return 1;
}
