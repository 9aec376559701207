// SPDX-License-Identifier: GPL-2.0
/*
 * bpf_loader: the generic guest loader for users' BPF objects (scenario
 * `[[program]] object = ...` or `source = ...`).
 *
 *   bpf_loader load OBJECT [--prog FUNCTION] [--also FUNCTION]...
 *                      [--no-attach | --cgroup DIR | --xdp INTERFACE | --tc INTERFACE]
 *
 * Opens OBJECT with libbpf, selects the program FUNCTION (its C function
 * name; optional when the object holds one program), loads only that one
 * (and each --also FUNCTION, not attached: the targets of its tail calls,
 * which libbpf puts in the prog arrays the object initializes), attaches it
 * by its section name (bpf_program__attach: tracepoint/...,
 * kprobe/..., raw_tp/..., fentry/... and whatever else libbpf knows how to
 * attach without extra arguments) unless --no-attach, and prints one line:
 *
 *   prog_id=7 prog_name=spin function=spin section=tracepoint/syscalls/sys_enter_sync attached=1
 *
 * with `also.FUNCTION=ID` appended for each --also program
 * (prog_name is the kernel's name: the function name cut to 15 bytes). A
 * cgroup program (cgroup_skb/, cgroup/sysctl, ...) is attached to the cgroup
 * v2 directory DIR given with --cgroup instead, created if missing, with
 * cgroup2 mounted on /sys/fs/cgroup if it is not. An XDP program is
 * attached to the network interface given with --xdp (native XDP, through
 * a link), a tc program to the ingress of the one given with --tc (a
 * clsact qdisc the loader adds and removes); a missing interface is made as
 * one end of a veth pair whose other end is INTERFACE_peer, both up
 * (lab_net.c). An iterator program (SEC("iter/...")) has its link pinned at
 * /sys/fs/bpf/FUNCTION (` pinned=PATH` is appended to the line): reading
 * that file runs the program once per object. It then holds the program and
 * its attachment until SIGTERM or SIGINT, detaches (unpins), and exits 0
 * after printing `prog_id=N detached signal=S`.
 *
 *   bpf_loader test-run --id PROG_ID [--data-hex HEX | --data-file PATH] [--repeat N]
 *
 * Runs a loaded program through BPF_PROG_TEST_RUN (for the program types
 * that support it: tc, xdp, socket filter, raw_tp, ...) with the given
 * packet data, and prints one machine-readable line:
 *
 *   trigger prog_id=7 start_ns=.. end_ns=.. duration_ns=.. retval=0 repeat=1 test_duration_ns=..
 *
 * start_ns/end_ns are CLOCK_MONOTONIC around the bpf() call. Exit status 0
 * when the call succeeded; 1 (with `trigger ... errno=NAME` and a message on
 * stderr) when it failed; 2 for bad arguments.
 *
 *   bpf_loader globals --prog KERNEL_NAME [--prog KERNEL_NAME]... [--samples N]
 *                      -- COMMAND [ARG...]
 *
 * A trigger that shows what a run did: reads the integer global variables of
 * the loaded program named KERNEL_NAME (its .bss and .data maps, named by
 * their BTF), runs COMMAND, reads them again and prints how much each changed:
 *
 *   trigger start_ns=.. end_ns=.. exit=0 runs=1 first_part=0 second_part=0
 *
 * Each further --prog names another program that COMMAND runs (up to 4 in
 * all, each loaded from its own object), whose variables are printed after
 * the first's as KERNEL_NAME.VARIABLE=N: an fexit program beside the fentry
 * program it watches, say.
 *
 * start_ns/end_ns are CLOCK_MONOTONIC around COMMAND. Exits with COMMAND's
 * status (128+N when a signal N ended it); 1 when the program or its
 * variables cannot be read, 2 for bad arguments.
 *
 * For each BPF ring buffer the program uses (map MAP), it also empties the
 * ring before COMMAND, consumes it after, and prints
 *
 *   MAP_records=N MAP_pending=B
 *
 * N records were submitted during COMMAND and read; B bytes stay between
 * the consumer and the producer position once everything readable is read:
 * a reservation that was never submitted nor discarded, which holds back
 * every record after it (0 when nothing leaked).
 *
 * For each user ring buffer the program uses (BPF_MAP_TYPE_USER_RINGBUF, map
 * MAP, which the program consumes with bpf_user_ringbuf_drain()), it
 * submits N samples before COMMAND with --samples N (8-byte values 1 to N,
 * 16 bytes each with their header), and prints after it
 *
 *   MAP_unconsumed=B
 *
 * B bytes of samples stay between the kernel's consumer position and the
 * producer position: what the program's runs have not drained (yet).
 * --samples for a program without a user ring buffer is an error (exit 2).
 *
 *   bpf_loader packet {--out INTERFACE --in INTERFACE | --udp PORT} [--wait-ms N]
 *
 * Sends one frame out of one interface and looks for it on another, where
 * only a frame that XDP and tc ingress passed arrives, or one UDP datagram
 * over the loopback, which a cgroup_skb program can deny: see lab_net.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/statfs.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "lab_net.h"

/* Largest packet a test run takes here (the kernel's own limit is about a page for most types). */
#define MAX_DATA_BYTES (64 * 1024)

static int print_libbpf(enum libbpf_print_level level, const char *format, va_list args)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	return vfprintf(stderr, format, args);
}

static int usage(void)
{
	fprintf(stderr,
		"usage: bpf_loader load OBJECT [--prog FUNCTION] [--also FUNCTION]...\n"
		"                       [--no-attach | --cgroup DIR | --xdp INTERFACE | --tc INTERFACE]\n"
		"       bpf_loader test-run --id PROG_ID [--data-hex HEX | --data-file PATH] [--repeat N]\n"
		"       bpf_loader globals --prog KERNEL_NAME [--prog KERNEL_NAME]... [--samples N]\n"
		"                          -- COMMAND [ARG...]\n"
		"       bpf_loader packet {--out INTERFACE --in INTERFACE | --udp PORT} [--wait-ms N]\n");
	return 2;
}

static uint64_t monotonic_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

static int parse_u32(const char *text, __u32 *value)
{
	unsigned long long parsed;
	char *end;

	if (text == NULL || *text < '0' || *text > '9')
		return -1;
	errno = 0;
	parsed = strtoull(text, &end, 10);
	if (errno || *end || parsed > UINT32_MAX)
		return -1;
	*value = (__u32)parsed;
	return 0;
}

static const char *errno_name(int error)
{
	switch (error) {
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case ESRCH: return "ESRCH";
	case EALREADY: return "EALREADY";
	case EAGAIN: return "EAGAIN";
	case EINTR: return "EINTR";
	case EFAULT: return "EFAULT";
	case EINVAL: return "EINVAL";
	case ENOSPC: return "ENOSPC";
	case E2BIG: return "E2BIG";
	case ENOTSUP: return "ENOTSUP";
	case ETIMEDOUT: return "ETIMEDOUT";
	default: return "EOTHER";
	}
}

/* An fd of the cgroup v2 directory DIR (created if missing), or -1 after a message. */
static int cgroup_fd(const char *dir)
{
	struct statfs fs;
	int fd;

	if (statfs("/sys/fs/cgroup", &fs) || fs.f_type != CGROUP2_SUPER_MAGIC) {
		if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, NULL)) {
			fprintf(stderr, "bpf_loader: mounting cgroup2 on /sys/fs/cgroup: %s\n",
				strerror(errno));
			return -1;
		}
	}
	if (mkdir(dir, 0755) && errno != EEXIST) {
		fprintf(stderr, "bpf_loader: creating cgroup %s: %s\n", dir, strerror(errno));
		return -1;
	}
	fd = open(dir, O_RDONLY | O_DIRECTORY);
	if (fd < 0)
		fprintf(stderr, "bpf_loader: opening cgroup %s: %s\n", dir, strerror(errno));
	return fd;
}

/* The most --also programs one load takes. */
#define MAX_ALSO 8

/* Is @prog one of the @n programs in @progs? */
static int is_one_of(const struct bpf_program *prog, struct bpf_program *const *progs, int n)
{
	for (int i = 0; i < n; i++)
		if (prog == progs[i])
			return 1;
	return 0;
}

/* How load() attaches its program. */
enum attach_to {
	ATTACH_NONE,
	ATTACH_SECTION,	/* by its section name */
	ATTACH_CGROUP,
	ATTACH_XDP,
	ATTACH_TC,	/* at an interface's ingress */
};

/* Is @option one of load()'s ways to attach?  Then *@how says which. */
static bool attach_option(const char *option, enum attach_to *how)
{
	static const struct {
		const char *option;
		enum attach_to how;
	} options[] = {
		{ "--no-attach", ATTACH_NONE },
		{ "--cgroup", ATTACH_CGROUP },
		{ "--xdp", ATTACH_XDP },
		{ "--tc", ATTACH_TC },
	};

	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
		if (strcmp(option, options[i].option) == 0) {
			*how = options[i].how;
			return true;
		}
	}
	return false;
}

/* What load() attached: a link, or a tc hook (libbpf 1.1 has no tc links). */
struct attachment {
	struct bpf_link *link;
	/* An iterator's link, pinned here to be read; unpinned with it. */
	char pinned[64];
	struct bpf_tc_hook tc;
	/* The clsact qdisc under the tc hook is the loader's: removed with it. */
	bool tc_qdisc_made;
};

static void detach_program(struct attachment *at)
{
	if (at->pinned[0])
		bpf_link__unpin(at->link);
	at->pinned[0] = 0;
	bpf_link__destroy(at->link);
	at->link = NULL;
	if (!at->tc.ifindex)
		return;
	/* Both attach points: the qdisc goes; ingress alone: its filters. */
	if (at->tc_qdisc_made)
		at->tc.attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS;
	bpf_tc_hook_destroy(&at->tc);
	at->tc.ifindex = 0;
}

static int attach_tc(struct bpf_program *prog, int ifindex, struct attachment *at)
{
	struct bpf_tc_opts opts = { .sz = sizeof(opts), .prog_fd = bpf_program__fd(prog) };
	int err;

	at->tc = (struct bpf_tc_hook){
		.sz = sizeof(at->tc), .ifindex = ifindex, .attach_point = BPF_TC_INGRESS,
	};
	err = bpf_tc_hook_create(&at->tc);
	at->tc_qdisc_made = !err;
	if (!err || err == -EEXIST)
		err = bpf_tc_attach(&at->tc, &opts);
	if (err) {
		detach_program(at);
		errno = -err;
	}
	return err;
}

/* Pins an iterator's link at /sys/fs/bpf/@name, where a read runs it; 0 or 1 after a message. */
static int pin_iterator(const char *name, struct attachment *at)
{
	int err;

	snprintf(at->pinned, sizeof(at->pinned), "/sys/fs/bpf/%s", name);
	err = bpf_link__pin(at->link, at->pinned);
	if (!err)
		return 0;
	fprintf(stderr, "bpf_loader: pinning iterator %s at %s: %s\n", name, at->pinned,
		strerror(-err));
	at->pinned[0] = 0;
	detach_program(at);
	return 1;
}

/* Attaches @prog @how, to @where (a cgroup directory, an interface); 0 or 1 after a message. */
static int attach_program(struct bpf_program *prog, enum attach_to how, const char *where,
			  struct attachment *at)
{
	const char *name = bpf_program__name(prog);
	int fd, ifindex;

	switch (how) {
	case ATTACH_NONE:
		return 0;
	case ATTACH_SECTION:
		at->link = bpf_program__attach(prog);
		if (!at->link) {
			fprintf(stderr, "bpf_loader: attaching %s by its section `%s`: %s (libbpf "
				"attaches tracepoint/, kprobe/, raw_tp/, fentry/... sections by "
				"themselves; for a program you only test-run, use `attach = false`)\n",
				name, bpf_program__section_name(prog), strerror(errno));
			return 1;
		}
		return bpf_program__expected_attach_type(prog) == BPF_TRACE_ITER ?
			pin_iterator(name, at) : 0;
	case ATTACH_CGROUP:
		fd = cgroup_fd(where);
		if (fd < 0)
			return 1;
		at->link = bpf_program__attach_cgroup(prog, fd);
		if (!at->link)
			fprintf(stderr, "bpf_loader: attaching %s to cgroup %s: %s\n", name, where,
				strerror(errno));
		return !at->link;
	case ATTACH_XDP:
	case ATTACH_TC:
		ifindex = lab_interface(where);
		if (ifindex < 0)
			return 1;
		if (how == ATTACH_XDP) {
			at->link = bpf_program__attach_xdp(prog, ifindex);
			if (at->link)
				return 0;
		} else if (attach_tc(prog, ifindex, at) == 0) {
			return 0;
		}
		fprintf(stderr, "bpf_loader: attaching %s to the %s hook of %s: %s\n", name,
			how == ATTACH_XDP ? "XDP" : "tc ingress", where, strerror(errno));
		return 1;
	}
	return 1;
}

static int load(int argc, char **argv)
{
	const char *path = NULL, *function = NULL, *where = NULL, *also[MAX_ALSO];
	struct bpf_program *prog, *selected = NULL, *also_progs[MAX_ALSO];
	__u32 also_ids[MAX_ALSO];
	int nalso = 0;
	struct attachment attached = { 0 };
	enum attach_to how = ATTACH_SECTION;
	struct bpf_object *object;
	struct bpf_prog_info info;
	__u32 info_len = sizeof(info);
	int programs = 0, signal_number, i, err;
	sigset_t stop_signals;

	for (i = 0; i < argc; i++) {
		if (strcmp(argv[i], "--prog") == 0 && i + 1 < argc)
			function = argv[++i];
		else if (strcmp(argv[i], "--also") == 0 && i + 1 < argc && nalso < MAX_ALSO)
			also[nalso++] = argv[++i];
		else if (how == ATTACH_SECTION && attach_option(argv[i], &how) &&
			 (how == ATTACH_NONE || i + 1 < argc))
			where = how == ATTACH_NONE ? NULL : argv[++i];
		else if (argv[i][0] != '-' && path == NULL)
			path = argv[i];
		else
			return usage();
	}
	if (path == NULL)
		return usage();

	/* Block the stop signals first so one sent right after prog_id= is not lost. */
	sigemptyset(&stop_signals);
	sigaddset(&stop_signals, SIGTERM);
	sigaddset(&stop_signals, SIGINT);
	sigprocmask(SIG_BLOCK, &stop_signals, NULL);

	libbpf_set_print(print_libbpf);
	object = bpf_object__open_file(path, NULL);
	if (!object) {
		fprintf(stderr, "bpf_loader: opening BPF object %s: %s\n", path, strerror(errno));
		return 1;
	}
	bpf_object__for_each_program(prog, object) {
		programs++;
		if (function == NULL || strcmp(bpf_program__name(prog), function) == 0)
			selected = prog;
	}
	if (selected == NULL || (function == NULL && programs != 1)) {
		if (function)
			fprintf(stderr, "bpf_loader: %s has no program (function) named %s; it has:\n",
				path, function);
		else
			fprintf(stderr, "bpf_loader: %s holds %d programs: choose one with --prog "
				"(scenario key `function`):\n", path, programs);
		bpf_object__for_each_program(prog, object)
			fprintf(stderr, "  %s (section %s)\n", bpf_program__name(prog),
				bpf_program__section_name(prog));
		bpf_object__close(object);
		return 1;
	}
	for (i = 0; i < nalso; i++) {
		also_progs[i] = bpf_object__find_program_by_name(object, also[i]);
		if (!also_progs[i]) {
			fprintf(stderr, "bpf_loader: %s has no program (function) named %s (--also)\n",
				path, also[i]);
			bpf_object__close(object);
			return 1;
		}
	}
	/* Only the selected program and the --also ones are loaded (and verified). */
	bpf_object__for_each_program(prog, object)
		if (prog != selected && !is_one_of(prog, also_progs, nalso))
			bpf_program__set_autoload(prog, false);
	err = bpf_object__load(object);
	if (err) {
		fprintf(stderr, "bpf_loader: loading %s from %s: %s (the verifier's log is above)\n",
			bpf_program__name(selected), path, strerror(-err));
		bpf_object__close(object);
		return 1;
	}
	if (attach_program(selected, how, where, &attached)) {
		bpf_object__close(object);
		return 1;
	}
	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(bpf_program__fd(selected), &info, &info_len)) {
		fprintf(stderr, "bpf_loader: reading the program id: %s\n", strerror(errno));
		detach_program(&attached);
		bpf_object__close(object);
		return 1;
	}
	for (i = 0; i < nalso; i++) {
		struct bpf_prog_info also_info;
		__u32 also_len = sizeof(also_info);

		memset(&also_info, 0, sizeof(also_info));
		if (bpf_obj_get_info_by_fd(bpf_program__fd(also_progs[i]), &also_info, &also_len)) {
			fprintf(stderr, "bpf_loader: reading the id of %s: %s\n", also[i],
				strerror(errno));
			detach_program(&attached);
			bpf_object__close(object);
			return 1;
		}
		also_ids[i] = also_info.id;
	}
	printf("prog_id=%u prog_name=%s function=%s section=%s attached=%d", info.id, info.name,
	       bpf_program__name(selected), bpf_program__section_name(selected),
	       how != ATTACH_NONE);
	for (i = 0; i < nalso; i++)
		printf(" also.%s=%u", also[i], also_ids[i]);
	if (attached.pinned[0])
		printf(" pinned=%s", attached.pinned);
	printf("\n");
	fflush(stdout);

	if (sigwait(&stop_signals, &signal_number))
		signal_number = 0;
	detach_program(&attached);
	bpf_object__close(object);
	printf("prog_id=%u detached signal=%d\n", info.id, signal_number);
	return 0;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decodes HEX into data; returns the byte count or -1 after a message. */
static long decode_hex(const char *hex, unsigned char *data)
{
	size_t length = strlen(hex), i;

	if (length % 2 || length / 2 > MAX_DATA_BYTES) {
		fprintf(stderr, "bpf_loader: --data-hex needs an even number of hex digits, "
			"at most %d bytes\n", MAX_DATA_BYTES);
		return -1;
	}
	for (i = 0; i < length; i += 2) {
		int high = hex_digit(hex[i]), low = hex_digit(hex[i + 1]);

		if (high < 0 || low < 0) {
			fprintf(stderr, "bpf_loader: --data-hex: `%c%c` is not a hex byte\n",
				hex[i], hex[i + 1]);
			return -1;
		}
		data[i / 2] = (unsigned char)(high << 4 | low);
	}
	return (long)(length / 2);
}

static long read_data_file(const char *path, unsigned char *data)
{
	long total = 0;
	ssize_t got;
	int fd = open(path, O_RDONLY);

	if (fd < 0) {
		fprintf(stderr, "bpf_loader: opening %s: %s\n", path, strerror(errno));
		return -1;
	}
	while ((got = read(fd, data + total, MAX_DATA_BYTES + 1 - total)) > 0)
		total += got;
	close(fd);
	if (got < 0 || total > MAX_DATA_BYTES) {
		fprintf(stderr, "bpf_loader: %s: %s\n", path,
			got < 0 ? strerror(errno) : "more than 64 KiB of test data");
		return -1;
	}
	return total;
}

static int test_run(int argc, char **argv)
{
	static unsigned char data_in[MAX_DATA_BYTES + 1], data_out[MAX_DATA_BYTES + 4096];
	__u32 prog_id = 0, repeat = 1;
	long data_size = 0;
	int have_data = 0, prog_fd, err, error, i;
	uint64_t start_ns, end_ns;

	for (i = 0; i < argc; i++) {
		const char *value = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(argv[i], "--id") == 0 && parse_u32(value, &prog_id) == 0 && prog_id) {
		} else if (strcmp(argv[i], "--repeat") == 0 && parse_u32(value, &repeat) == 0 &&
			   repeat) {
		} else if (strcmp(argv[i], "--data-hex") == 0 && value && !have_data) {
			data_size = decode_hex(value, data_in);
			have_data = 1;
		} else if (strcmp(argv[i], "--data-file") == 0 && value && !have_data) {
			data_size = read_data_file(value, data_in);
			have_data = 1;
		} else {
			return usage();
		}
		i++;
		if (data_size < 0)
			return 2;
	}
	if (prog_id == 0)
		return usage();
	prog_fd = bpf_prog_get_fd_by_id(prog_id);
	if (prog_fd < 0) {
		fprintf(stderr, "bpf_loader: opening BPF program id %u: %s\n", prog_id,
			strerror(errno));
		return 1;
	}
	LIBBPF_OPTS(bpf_test_run_opts, opts, .repeat = repeat);
	if (have_data) {
		opts.data_in = data_in;
		opts.data_size_in = (__u32)data_size;
		opts.data_out = data_out;
		opts.data_size_out = sizeof(data_out);
	}
	start_ns = monotonic_ns();
	err = bpf_prog_test_run_opts(prog_fd, &opts);
	error = errno;
	end_ns = monotonic_ns();
	close(prog_fd);
	printf("trigger prog_id=%u start_ns=%llu end_ns=%llu duration_ns=%llu repeat=%u", prog_id,
	       (unsigned long long)start_ns, (unsigned long long)end_ns,
	       (unsigned long long)(end_ns - start_ns), repeat);
	if (err) {
		printf(" errno=%s\n", errno_name(error));
		fprintf(stderr, "bpf_loader: BPF_PROG_TEST_RUN of program %u: %s\n", prog_id,
			strerror(error));
		return 1;
	}
	printf(" retval=%u test_duration_ns=%u data_size_out=%u\n", opts.retval, opts.duration,
	       opts.data_size_out);
	return 0;
}

/* The integer global variables of a program: where each sits in which map's value. */
#define MAX_GLOBALS 64
#define MAX_GLOBAL_MAPS 4

struct global_map {
	int fd;
	__u32 value_size;
	unsigned char *before, *after;
};

struct global_var {
	const char *name;
	int map;		/* index into the maps */
	__u32 offset, size;
	int is_signed;
};

/* A ring buffer of the program: a BPF ring buffer, read as its user-space consumer, or a user
 * ring buffer, which user space produces and the program drains.
 */
#define MAX_RINGS 4

struct ring {
	char name[BPF_OBJ_NAME_LEN];
	struct ring_buffer *reader;	/* NULL for a user ring buffer */
	int user_fd;			/* the user ring buffer's map, else -1 */
	/* The consumer and producer positions (their pages, mapped read-only). */
	const volatile unsigned long *consumer, *producer;
	long records;
};

struct globals {
	struct global_map maps[MAX_GLOBAL_MAPS];
	struct global_var vars[MAX_GLOBALS];
	int nr_maps, nr_vars;
	struct btf *btfs[MAX_GLOBAL_MAPS];
	struct ring rings[MAX_RINGS];
	int nr_rings;
};

/* The fd of the one loaded program whose kernel name is NAME, or -1 after a message. */
static int prog_fd_by_name(const char *name)
{
	__u32 id = 0, found_id = 0;
	int found = -1;

	while (bpf_prog_get_next_id(id, &id) == 0) {
		struct bpf_prog_info info = {};
		__u32 len = sizeof(info);
		int fd = bpf_prog_get_fd_by_id(id);

		if (fd < 0)
			continue;
		if (bpf_obj_get_info_by_fd(fd, &info, &len) || strcmp(info.name, name)) {
			close(fd);
			continue;
		}
		if (found >= 0) {
			fprintf(stderr, "bpf_loader: programs %u and %u are both named %s\n",
				found_id, id, name);
			close(fd);
			close(found);
			return -1;
		}
		found = fd;
		found_id = id;
	}
	if (found < 0)
		fprintf(stderr, "bpf_loader: no loaded BPF program is named %s\n", name);
	return found;
}

/* Adds the integer variables of one global-data map (a DATASEC value type). */
static void add_global_map(struct globals *globals, int map_fd, const struct bpf_map_info *info)
{
	const struct btf_var_secinfo *var;
	const struct btf_type *section;
	struct btf *btf;
	int index = globals->nr_maps, i;

	if (index == MAX_GLOBAL_MAPS || !info->btf_id || !info->btf_value_type_id)
		return;
	btf = btf__load_from_kernel_by_id(info->btf_id);
	if (!btf)
		return;
	section = btf__type_by_id(btf, info->btf_value_type_id);
	if (!section || !btf_is_datasec(section)) {
		btf__free(btf);
		return;
	}
	globals->btfs[index] = btf;
	globals->maps[index] = (struct global_map){
		.fd = map_fd,
		.value_size = info->value_size,
		.before = calloc(1, info->value_size),
		.after = calloc(1, info->value_size),
	};
	globals->nr_maps++;
	for (i = 0, var = btf_var_secinfos(section); i < btf_vlen(section); i++, var++) {
		const struct btf_type *type = btf__type_by_id(btf, var->type);
		const struct btf_type *target;
		int target_id;

		if (!type || !btf_is_var(type) || globals->nr_vars == MAX_GLOBALS)
			continue;
		target_id = btf__resolve_type(btf, type->type);
		target = target_id < 0 ? NULL : btf__type_by_id(btf, target_id);
		if (!target || !(btf_is_int(target) || btf_is_enum(target)))
			continue;
		if (var->size != 1 && var->size != 2 && var->size != 4 && var->size != 8)
			continue;
		if (var->offset + var->size > info->value_size)
			continue;
		globals->vars[globals->nr_vars++] = (struct global_var){
			.name = btf__name_by_offset(btf, type->name_off),
			.map = index,
			.offset = var->offset,
			.size = var->size,
			.is_signed = btf_is_int(target) && (btf_int_encoding(target) & BTF_INT_SIGNED),
		};
	}
}

static int count_record(void *ctx, void *data __attribute__((unused)),
			size_t size __attribute__((unused)))
{
	((struct ring *)ctx)->records++;
	return 0;
}

/* Watches the ring buffer MAP_FD (keeps the fd; closes it past MAX_RINGS): a BPF ring buffer
 * as its consumer, a user ring buffer by its positions; 0, or -1 after a message.
 */
static int add_ring(struct globals *globals, int map_fd, const struct bpf_map_info *info)
{
	struct ring *ring = &globals->rings[globals->nr_rings];
	long page = sysconf(_SC_PAGESIZE);
	bool user = info->type == BPF_MAP_TYPE_USER_RINGBUF;
	void *consumer, *producer;

	if (globals->nr_rings == MAX_RINGS) {
		close(map_fd);
		return 0;
	}
	snprintf(ring->name, sizeof(ring->name), "%s", info->name);
	ring->user_fd = user ? map_fd : -1;
	ring->reader = user ? NULL : ring_buffer__new(map_fd, count_record, ring, NULL);
	consumer = mmap(NULL, page, PROT_READ, MAP_SHARED, map_fd, 0);
	producer = mmap(NULL, page, PROT_READ, MAP_SHARED, map_fd, page);
	if ((!user && !ring->reader) || consumer == MAP_FAILED || producer == MAP_FAILED) {
		fprintf(stderr, "bpf_loader: reading ring buffer %s: %s\n", info->name,
			strerror(errno));
		return -1;
	}
	ring->consumer = consumer;
	ring->producer = producer;
	globals->nr_rings++;
	return 0;
}

/* Reads every record the rings hold now; 0, or -1 after a message. */
static int consume_rings(struct globals *globals)
{
	int i;

	for (i = 0; i < globals->nr_rings; i++) {
		if (globals->rings[i].reader && ring_buffer__consume(globals->rings[i].reader) < 0) {
			fprintf(stderr, "bpf_loader: consuming ring buffer %s: %s\n",
				globals->rings[i].name, strerror(errno));
			return -1;
		}
	}
	return 0;
}

/* Finds the .bss and .data maps and the ring buffers of the program in PROG_FD; 0, or -1 after
 * a message.
 */
static int find_globals(int prog_fd, struct globals *globals)
{
	__u32 map_ids[32], i;
	struct bpf_prog_info info = {};
	__u32 len = sizeof(info);

	info.nr_map_ids = sizeof(map_ids) / sizeof(map_ids[0]);
	info.map_ids = (__u64)(unsigned long)map_ids;
	if (bpf_obj_get_info_by_fd(prog_fd, &info, &len)) {
		fprintf(stderr, "bpf_loader: reading the program's maps: %s\n", strerror(errno));
		return -1;
	}
	for (i = 0; i < info.nr_map_ids && i < sizeof(map_ids) / sizeof(map_ids[0]); i++) {
		struct bpf_map_info map_info = {};
		__u32 map_len = sizeof(map_info);
		int fd = bpf_map_get_fd_by_id(map_ids[i]);
		const char *dot;

		if (fd < 0)
			continue;
		dot = NULL;
		if (bpf_obj_get_info_by_fd(fd, &map_info, &map_len) == 0)
			dot = strrchr(map_info.name, '.');
		if (dot && (strcmp(dot, ".bss") == 0 || strcmp(dot, ".data") == 0) &&
		    map_info.type == BPF_MAP_TYPE_ARRAY && map_info.max_entries == 1)
			add_global_map(globals, fd, &map_info);
		else if (map_info.type == BPF_MAP_TYPE_RINGBUF ||
			 map_info.type == BPF_MAP_TYPE_USER_RINGBUF) {
			if (add_ring(globals, fd, &map_info))
				return -1;
		} else {
			close(fd);
		}
	}
	if (globals->nr_vars == 0) {
		fprintf(stderr, "bpf_loader: the program has no integer global variables "
			"(in .bss or .data, with BTF)\n");
		return -1;
	}
	return 0;
}

static int read_globals(struct globals *globals, int after)
{
	__u32 zero = 0;
	int i;

	for (i = 0; i < globals->nr_maps; i++) {
		struct global_map *map = &globals->maps[i];

		if (bpf_map_lookup_elem(map->fd, &zero, after ? map->after : map->before)) {
			fprintf(stderr, "bpf_loader: reading global variables: %s\n", strerror(errno));
			return -1;
		}
	}
	return 0;
}

static long long global_value(const struct global_var *var, const unsigned char *value)
{
	__u64 raw = 0;

	memcpy(&raw, value + var->offset, var->size);	/* little-endian */
	if (var->is_signed && var->size < 8 && (raw >> (var->size * 8 - 1)) & 1)
		raw |= ~0ULL << (var->size * 8);
	return (long long)raw;
}

/* Reads the variables and rings of the program named NAME as they are before COMMAND. */
static int watch_globals(const char *name, struct globals *found)
{
	int prog_fd = prog_fd_by_name(name), i;

	if (prog_fd < 0)
		return -1;
	/* What the rings held before COMMAND is not its runs'. */
	if (find_globals(prog_fd, found) || read_globals(found, 0) || consume_rings(found))
		return -1;
	for (i = 0; i < found->nr_rings; i++)
		found->rings[i].records = 0;
	return 0;
}

/* Submits SAMPLES samples (8-byte values 1 to SAMPLES) to each user ring buffer of FOUND; the
 * number of user ring buffers, or -1 after a message.
 */
static int fill_user_rings(struct globals *found, __u32 samples)
{
	int i, nr_user = 0;

	for (i = 0; i < found->nr_rings; i++) {
		struct ring *ring = &found->rings[i];
		struct user_ring_buffer *producer;
		__u64 value;

		if (ring->user_fd < 0)
			continue;
		nr_user++;
		producer = user_ring_buffer__new(ring->user_fd, NULL);
		if (!producer) {
			fprintf(stderr, "bpf_loader: producing to user ring buffer %s: %s\n",
				ring->name, strerror(errno));
			return -1;
		}
		for (value = 1; value <= samples; value++) {
			void *sample = user_ring_buffer__reserve(producer, sizeof(value));

			if (!sample) {
				fprintf(stderr, "bpf_loader: reserving sample %llu of user ring buffer "
					"%s: %s\n", (unsigned long long)value, ring->name,
					strerror(errno));
				user_ring_buffer__free(producer);
				return -1;
			}
			memcpy(sample, &value, sizeof(value));
			user_ring_buffer__submit(producer, sample);
		}
		user_ring_buffer__free(producer);
	}
	return nr_user;
}

/* Prints how much each variable of FOUND changed, each name after PREFIX. */
static void print_globals(const struct globals *found, const char *prefix)
{
	int i;

	for (i = 0; i < found->nr_vars; i++) {
		const struct global_var *var = &found->vars[i];
		const struct global_map *map = &found->maps[var->map];

		printf(" %s%s=%lld", prefix, var->name,
		       global_value(var, map->after) - global_value(var, map->before));
	}
	for (i = 0; i < found->nr_rings; i++) {
		const struct ring *ring = &found->rings[i];

		if (ring->user_fd >= 0)
			printf(" %s%s_unconsumed=%lu", prefix, ring->name,
			       *ring->producer - *ring->consumer);
		else
			printf(" %s%s_records=%ld %s%s_pending=%lu", prefix, ring->name,
			       ring->records, prefix, ring->name, *ring->producer - *ring->consumer);
	}
}

/* Programs one `globals` trigger reads: the first, and others run by the same COMMAND. */
#define MAX_WATCHED 4

static int globals(int argc, char **argv)
{
	static struct globals found[MAX_WATCHED];
	const char *names[MAX_WATCHED];
	uint64_t start_ns, end_ns;
	int nr_names = 0, cmd = 0, status, code, i, nr_user = 0;
	bool fill = false;
	__u32 samples = 0;
	pid_t child;

	while (cmd + 1 < argc) {
		if (strcmp(argv[cmd], "--prog") == 0 && nr_names < MAX_WATCHED) {
			names[nr_names++] = argv[cmd + 1];
		} else if (strcmp(argv[cmd], "--samples") == 0 && !fill) {
			if (parse_u32(argv[cmd + 1], &samples))
				return usage();
			fill = true;
		} else {
			break;
		}
		cmd += 2;
	}
	if (nr_names == 0 || cmd + 1 >= argc || strcmp(argv[cmd], "--") != 0)
		return usage();
	cmd++;
	libbpf_set_print(print_libbpf);
	for (i = 0; i < nr_names; i++) {
		int filled;

		if (watch_globals(names[i], &found[i]))
			return 1;
		filled = fill ? fill_user_rings(&found[i], samples) : 0;
		if (filled < 0)
			return 1;
		nr_user += filled;
	}
	if (fill && nr_user == 0) {
		fprintf(stderr, "bpf_loader: --samples: no program named uses a user ring buffer\n");
		return 2;
	}
	fflush(stdout);
	start_ns = monotonic_ns();
	child = fork();
	if (child == 0) {
		execvp(argv[cmd], argv + cmd);
		fprintf(stderr, "bpf_loader: running %s: %s\n", argv[cmd], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}
	if (child < 0 || waitpid(child, &status, 0) != child) {
		fprintf(stderr, "bpf_loader: running %s: %s\n", argv[cmd], strerror(errno));
		return 1;
	}
	end_ns = monotonic_ns();
	for (i = 0; i < nr_names; i++) {
		if (read_globals(&found[i], 1) || consume_rings(&found[i]))
			return 1;
	}
	code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	printf("trigger start_ns=%llu end_ns=%llu exit=%d", (unsigned long long)start_ns,
	       (unsigned long long)end_ns, code);
	print_globals(&found[0], "");
	for (i = 1; i < nr_names; i++) {
		char prefix[BPF_OBJ_NAME_LEN + 1];

		snprintf(prefix, sizeof(prefix), "%s.", names[i]);
		print_globals(&found[i], prefix);
	}
	printf("\n");
	return code;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "load") == 0)
		return load(argc - 2, argv + 2);
	if (argc >= 2 && strcmp(argv[1], "test-run") == 0)
		return test_run(argc - 2, argv + 2);
	if (argc >= 2 && strcmp(argv[1], "globals") == 0)
		return globals(argc - 2, argv + 2);
	if (argc >= 2 && strcmp(argv[1], "packet") == 0) {
		int status = lab_packet(argc - 2, argv + 2);

		return status == 2 ? usage() : status;
	}
	return usage();
}
