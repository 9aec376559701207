// SPDX-License-Identifier: GPL-2.0
/*
 * loops: loads one of the demo BPF programs (embedded in this binary), attaches
 * it to the getpgid() syscall tracepoint, prints `prog_id=<N> prog_name=<NAME>`
 * and stays resident until SIGTERM/SIGINT, then detaches and exits 0.
 *
 *   loops [--prog loops|bpftext|subprog_helper|subprog_text|helper_loop|foreach_array|foreach_hash|tailcall]
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "loops_user.h"

/* Defined in bpf_objects.S: the compiled BPF objects, byte for byte. */
extern const char loops_kern_object[], loops_kern_object_end[];
extern const char bpftext_kern_object[], bpftext_kern_object_end[];
extern const char subprog_kern_object[], subprog_kern_object_end[];
extern const char tailcall_kern_object[], tailcall_kern_object_end[];

struct embedded_object {
	const char *name;
	const char *start;
	const char *end;
};

static const struct embedded_object embedded_objects[] = {
	[LOOPS_OBJECT_LOOPS] = { "loops_kern", loops_kern_object, loops_kern_object_end },
	[LOOPS_OBJECT_BPFTEXT] = { "bpftext_kern", bpftext_kern_object, bpftext_kern_object_end },
	[LOOPS_OBJECT_SUBPROG] = { "subprog_kern", subprog_kern_object, subprog_kern_object_end },
	[LOOPS_OBJECT_TAILCALL] = { "tailcall_kern", tailcall_kern_object, tailcall_kern_object_end },
};

static int print_libbpf(enum libbpf_print_level level, const char *format, va_list args)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	return vfprintf(stderr, format, args);
}

static int usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [--prog NAME]\n", argv0);
	return 2;
}

int main(int argc, char **argv)
{
	const char *prog_name = "loops";
	const struct loops_program *program;
	const struct embedded_object *embedded;
	struct bpf_object *object;
	struct bpf_program *bpf_prog, *selected = NULL;
	struct bpf_link *link;
	struct bpf_prog_info info;
	__u32 info_len = sizeof(info);
	sigset_t stop_signals;
	int signal_number, i, err;

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--prog") == 0 && i + 1 < argc)
			prog_name = argv[++i];
		else
			return usage(argv[0]);
	}
	program = loops_program_by_name(prog_name);
	if (!program)
		return 2;
	embedded = &embedded_objects[program->object];

	/* Block the stop signals first so one sent right after prog_id= is not lost. */
	sigemptyset(&stop_signals);
	sigaddset(&stop_signals, SIGTERM);
	sigaddset(&stop_signals, SIGINT);
	sigprocmask(SIG_BLOCK, &stop_signals, NULL);

	libbpf_set_print(print_libbpf);
	LIBBPF_OPTS(bpf_object_open_opts, open_opts, .object_name = embedded->name);
	object = bpf_object__open_mem(embedded->start, embedded->end - embedded->start, &open_opts);
	if (!object) {
		fprintf(stderr, "opening BPF object %s: %s\n", embedded->name, strerror(errno));
		return 1;
	}
	/* Only the requested program of a multi-program object is loaded. */
	bpf_object__for_each_program(bpf_prog, object) {
		if (strcmp(bpf_program__name(bpf_prog), program->name) == 0)
			selected = bpf_prog;
		else
			bpf_program__set_autoload(bpf_prog, false);
	}
	if (!selected) {
		fprintf(stderr, "BPF object %s has no program %s\n", embedded->name, program->name);
		bpf_object__close(object);
		return 1;
	}
	err = bpf_object__load(object);
	if (err) {
		fprintf(stderr, "loading BPF program %s: %s\n", program->name, strerror(-err));
		bpf_object__close(object);
		return 1;
	}
	link = bpf_program__attach(selected);
	if (!link) {
		fprintf(stderr, "attaching BPF program %s: %s (is tracefs mounted at "
			"/sys/kernel/tracing?)\n", program->name, strerror(errno));
		bpf_object__close(object);
		return 1;
	}
	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(bpf_program__fd(selected), &info, &info_len)) {
		fprintf(stderr, "reading the program id: %s\n", strerror(errno));
		bpf_link__destroy(link);
		bpf_object__close(object);
		return 1;
	}
	printf("prog_id=%u prog_name=%s magic=0x%x\n", info.id, program->name, program->magic);
	fflush(stdout);

	if (sigwait(&stop_signals, &signal_number))
		signal_number = 0;
	bpf_link__destroy(link);
	bpf_object__close(object);
	printf("prog_id=%u detached signal=%d\n", info.id, signal_number);
	return 0;
}
