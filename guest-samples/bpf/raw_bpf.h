/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Raw-instruction BPF programs without libbpf, for the kernel selftest
 * (guest-kernel/selftests/test_prog_terminate.c) and the benchmark
 * (term_bench.c): instruction encoding, bpf() wrappers, BPF_PROG_TERMINATE
 * (which the system headers predate), CPU pinning and sysctls.
 * Header-only: each user is a single-file static binary, which defines
 * _GNU_SOURCE before any include (for sched_setaffinity).
 */
#ifndef RAW_BPF_H
#define RAW_BPF_H

#include <errno.h>
#include <linux/bpf.h>
#include <linux/btf.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bpf_prog_terminate.h"

#ifndef BPF_JCOND
#define BPF_JCOND 0xe0
#endif
#ifndef BPF_PSEUDO_FUNC
#define BPF_PSEUDO_FUNC 4
#endif

/* ---- instruction encoding (include/linux/filter.h, in userspace form) */

#define INSN(CODE, DST, SRC, OFF, IMM) \
	((struct bpf_insn){ .code = (CODE), .dst_reg = (DST), .src_reg = (SRC), .off = (OFF), .imm = (IMM) })
#define MOV64_IMM(DST, IMM) INSN(BPF_ALU64 | BPF_MOV | BPF_K, DST, 0, 0, IMM)
#define MOV64_REG(DST, SRC) INSN(BPF_ALU64 | BPF_MOV | BPF_X, DST, SRC, 0, 0)
#define ADD64_REG(DST, SRC) INSN(BPF_ALU64 | BPF_ADD | BPF_X, DST, SRC, 0, 0)
#define ADD64_IMM(DST, IMM) INSN(BPF_ALU64 | BPF_ADD | BPF_K, DST, 0, 0, IMM)
#define CALL_HELPER(ID) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, ID)
#define CALL_SUBPROG(OFF) INSN(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_CALL, 0, OFF)
#define JA(OFF) INSN(BPF_JMP | BPF_JA, 0, 0, OFF, 0)
#define MAY_GOTO(OFF) INSN(BPF_JMP | BPF_JCOND, 0, 0, OFF, 0)
#define EXIT() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
#define ST_MEM_DW(DST, OFF, IMM) INSN(BPF_ST | BPF_MEM | BPF_DW, DST, 0, OFF, IMM)
#define ST_MEM_W(DST, OFF, IMM) INSN(BPF_ST | BPF_MEM | BPF_W, DST, 0, OFF, IMM)
#define LDX_MEM_DW(DST, SRC, OFF) INSN(BPF_LDX | BPF_MEM | BPF_DW, DST, SRC, OFF, 0)
#define STX_MEM_DW(DST, SRC, OFF) INSN(BPF_STX | BPF_MEM | BPF_DW, DST, SRC, OFF, 0)
#define JEQ_IMM(DST, IMM, OFF) INSN(BPF_JMP | BPF_JEQ | BPF_K, DST, 0, OFF, IMM)
#define JGT_IMM(DST, IMM, OFF) INSN(BPF_JMP | BPF_JGT | BPF_K, DST, 0, OFF, IMM)
/* DST = the address of the subprogram OFF instructions after the next one (two slots). */
#define LD_MAP_FD(DST, FD) INSN(BPF_LD | BPF_DW | BPF_IMM, DST, BPF_PSEUDO_MAP_FD, 0, FD), INSN(0, 0, 0, 0, 0)
#define LD_FUNC(DST, OFF) INSN(BPF_LD | BPF_DW | BPF_IMM, DST, BPF_PSEUDO_FUNC, 0, OFF), INSN(0, 0, 0, 0, 0)

/*
 * The first RAW_ARM_TIMER_LEN instructions of a program that arms a bpf_timer to fire at
 * once: it looks up key 0 of @MAP (an array whose value begins with its struct bpf_timer),
 * runs @MARK (one instruction; r6 holds the value), initializes the timer on
 * CLOCK_MONOTONIC (-EBUSY once it is), gives it the callback at instruction
 * RAW_ARM_TIMER_LEN, starts it and returns 0.
 */
#define RAW_ARM_TIMER_LEN 24
#define RAW_ARM_TIMER(MAP, MARK)						\
	ST_MEM_W(BPF_REG_10, -4, 0),			/* 0: key 0 */		\
	LD_MAP_FD(BPF_REG_1, MAP),			/* 1-2 */		\
	MOV64_REG(BPF_REG_2, BPF_REG_10),		/* 3 */			\
	ADD64_IMM(BPF_REG_2, -4),			/* 4 */			\
	CALL_HELPER(BPF_FUNC_map_lookup_elem),		/* 5 */			\
	JEQ_IMM(BPF_REG_0, 0, 15),			/* 6: -> 22 */		\
	MOV64_REG(BPF_REG_6, BPF_REG_0),		/* 7 */			\
	MARK,						/* 8 */			\
	MOV64_REG(BPF_REG_1, BPF_REG_6),		/* 9 */			\
	LD_MAP_FD(BPF_REG_2, MAP),			/* 10-11 */		\
	MOV64_IMM(BPF_REG_3, 1),			/* 12: CLOCK_MONOTONIC */ \
	CALL_HELPER(BPF_FUNC_timer_init),		/* 13 */		\
	MOV64_REG(BPF_REG_1, BPF_REG_6),		/* 14 */		\
	LD_FUNC(BPF_REG_2, 8),				/* 15-16: -> 24 */	\
	CALL_HELPER(BPF_FUNC_timer_set_callback),	/* 17 */		\
	MOV64_REG(BPF_REG_1, BPF_REG_6),		/* 18 */		\
	MOV64_IMM(BPF_REG_2, 0),			/* 19: now */		\
	MOV64_IMM(BPF_REG_3, 0),			/* 20 */		\
	CALL_HELPER(BPF_FUNC_timer_start),		/* 21 */		\
	MOV64_IMM(BPF_REG_0, 0),			/* 22 */		\
	EXIT()						/* 23 */

#define DEMO_DELAY_SYSCTL "/proc/sys/kernel/bpf_termination_demo_delay_ms"
/* Fault injection (patch 0029): the IPI handler skips the first rewrite. */
#define FAULT_SKIP_REWRITE_SYSCTL "/proc/sys/kernel/bpf_termination_fault_skip_rewrite"

static inline long sys_bpf(int cmd, void *attr, unsigned int size)
{
	return syscall(__NR_bpf, cmd, attr, size);
}

/* The most packet data raw_test_run() hands a program. */
#define RAW_TEST_PACKET_MAX 256

/*
 * One BPF_PROG_TEST_RUN of @fd: on @packet_len zero bytes of packet data (tc,
 * socket filter, XDP; at most RAW_TEST_PACKET_MAX), or, with @packet_len 0,
 * on a context whose first word is @ctx_word (tracing types).  Returns 0 or
 * the errno, and the program's return value (0 after an error) in *@retval
 * unless it is NULL.
 */
static inline int raw_test_run(int fd, uint64_t ctx_word, unsigned int packet_len,
			       uint32_t *retval)
{
	unsigned char packet[RAW_TEST_PACKET_MAX] = {};
	uint64_t ctx[1] = { ctx_word };
	union bpf_attr attr;
	int err;

	memset(&attr, 0, sizeof(attr));
	attr.test.prog_fd = fd;
	if (packet_len) {
		attr.test.data_in = (uintptr_t)packet;
		attr.test.data_size_in = packet_len < sizeof(packet) ? packet_len : sizeof(packet);
	} else {
		attr.test.ctx_in = (uintptr_t)ctx;
		attr.test.ctx_size_in = sizeof(ctx);
	}
	err = sys_bpf(BPF_PROG_TEST_RUN, &attr, sizeof(attr)) ? errno : 0;
	if (retval)
		*retval = attr.test.retval;
	return err;
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* Busy-waits @ns on CLOCK_MONOTONIC: no timer, no sleep. */
static inline void spin_ns(uint64_t ns)
{
	uint64_t end = now_ns() + ns;

	while (now_ns() < end)
		;
}

/*
 * Loads BTF made of @types (@type_len bytes of btf_type records, ids from 1)
 * and @strings (@str_len bytes, "" first); returns its fd, exits on failure.
 */
static inline int raw_btf_load(const uint32_t *types, uint32_t type_len, const char *strings,
			       uint32_t str_len)
{
	static char blob[4096];
	struct btf_header *hdr = (struct btf_header *)blob;
	union bpf_attr attr;
	int fd;

	if (sizeof(*hdr) + type_len + str_len > sizeof(blob)) {
		fprintf(stderr, "raw_btf_load: %u bytes of types and strings, too many\n",
			type_len + str_len);
		exit(1);
	}
	memset(hdr, 0, sizeof(*hdr));
	hdr->magic = BTF_MAGIC;
	hdr->version = BTF_VERSION;
	hdr->hdr_len = sizeof(*hdr);
	hdr->type_len = type_len;
	hdr->str_off = type_len;
	hdr->str_len = str_len;
	memcpy(blob + sizeof(*hdr), types, type_len);
	memcpy(blob + sizeof(*hdr) + type_len, strings, str_len);

	memset(&attr, 0, sizeof(attr));
	attr.btf = (uintptr_t)blob;
	attr.btf_size = sizeof(*hdr) + type_len + str_len;
	fd = sys_bpf(BPF_BTF_LOAD, &attr, sizeof(attr));
	if (fd < 0) {
		perror("BPF_BTF_LOAD");
		exit(1);
	}
	return fd;
}

/* The names raw_btf_func_types() uses: "" at 0, "int" at 1, "f" at 5. */
#define RAW_BTF_FUNC_STRINGS "\0int\0f"

/*
 * Writes at @t the BTF types of @nfuncs functions `static int f(void)`
 * (types 3..; 1 is int, 2 is int (void)), named in RAW_BTF_FUNC_STRINGS.
 * Returns the end of what it wrote.
 */
static inline uint32_t *raw_btf_func_types(uint32_t *t, uint32_t nfuncs)
{
	/* 1: int */
	*t++ = 1;
	*t++ = BTF_KIND_INT << 24;
	*t++ = 4;
	*t++ = BTF_INT_SIGNED << 24 | 32;
	/* 2: int (void) */
	*t++ = 0;
	*t++ = BTF_KIND_FUNC_PROTO << 24;
	*t++ = 1;
	/* 3..: static int f(void) */
	for (uint32_t i = 0; i < nfuncs; i++) {
		*t++ = 5;
		*t++ = BTF_KIND_FUNC << 24 | BTF_FUNC_STATIC;
		*t++ = 2;
	}
	return t;
}

/*
 * BTF that describes @nfuncs functions `static int f(void)` (types 3..),
 * for func_info: the verifier wants it for a program whose subprogram is a
 * callback (bpf_loop()).  Returns the BTF's fd; exits on failure.
 */
static inline int raw_btf_of_funcs(uint32_t nfuncs)
{
	uint32_t types[4 + 3 + 3 * 16], *t;

	if (nfuncs > 16) {
		fprintf(stderr, "raw_btf_of_funcs: %u functions, at most 16\n", nfuncs);
		exit(1);
	}
	t = raw_btf_func_types(types, nfuncs);
	return raw_btf_load(types, (t - types) * 4, RAW_BTF_FUNC_STRINGS,
			    sizeof(RAW_BTF_FUNC_STRINGS));
}

/* BPF_PROG_LOAD's attributes for @cnt instructions of a GPL program of @type. */
static inline void raw_prog_attr(union bpf_attr *attr, enum bpf_prog_type type,
				 const struct bpf_insn *insns, size_t cnt, const char *name,
				 uint32_t prog_flags)
{
	memset(attr, 0, sizeof(*attr));
	attr->prog_type = type;
	attr->insns = (uintptr_t)insns;
	attr->insn_cnt = cnt;
	attr->license = (uintptr_t)"GPL";
	attr->prog_flags = prog_flags;
	strncpy(attr->prog_name, name, sizeof(attr->prog_name) - 1);
}

/*
 * Loads @cnt instructions as a program of @type; on failure prints the
 * verifier's log and exits, since every caller needs the program.  With
 * @nfuncs, @func_starts lists where each function (main first, at 0)
 * starts, described as BTF func_info (raw_btf_of_funcs()).
 */
static inline int raw_load_funcs(enum bpf_prog_type type, const struct bpf_insn *insns,
				 size_t cnt, const char *name, uint32_t prog_flags,
				 const uint32_t *func_starts, uint32_t nfuncs)
{
	static char log[1 << 20];
	struct bpf_func_info funcs[16];
	union bpf_attr attr;
	int fd, btf_fd = -1;

	raw_prog_attr(&attr, type, insns, cnt, name, prog_flags);
	if (nfuncs) {
		btf_fd = raw_btf_of_funcs(nfuncs);
		for (uint32_t i = 0; i < nfuncs; i++)
			funcs[i] = (struct bpf_func_info){ .insn_off = func_starts[i], .type_id = 3 + i };
		attr.prog_btf_fd = btf_fd;
		attr.func_info_rec_size = sizeof(funcs[0]);
		attr.func_info = (uintptr_t)funcs;
		attr.func_info_cnt = nfuncs;
	}
	fd = sys_bpf(BPF_PROG_LOAD, &attr, sizeof(attr));
	if (fd < 0) {
		fprintf(stderr, "load %s: %s\n", name, strerror(errno));
		attr.log_buf = (uintptr_t)log;
		attr.log_size = sizeof(log);
		attr.log_level = 1;
		sys_bpf(BPF_PROG_LOAD, &attr, sizeof(attr));
		fprintf(stderr, "%.4000s\n", log);
		exit(1);
	}
	/* The program holds its own reference to the BTF. */
	if (btf_fd >= 0)
		close(btf_fd);
	return fd;
}

/* raw_load_funcs() of a program without BTF. */
static inline int raw_load(enum bpf_prog_type type, const struct bpf_insn *insns, size_t cnt,
			   const char *name, uint32_t prog_flags)
{
	return raw_load_funcs(type, insns, cnt, name, prog_flags, NULL, 0);
}

/*
 * A map of @type with one entry per 4-byte key below @max_entries; with @btf_fd > 0, its
 * key is type 1 and its value type @value_type of that BTF.  Exits on failure.
 */
static inline int raw_map_create_btf(enum bpf_map_type type, uint32_t value_size,
				     uint32_t max_entries, int btf_fd, uint32_t value_type)
{
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = type;
	attr.key_size = 4;
	attr.value_size = value_size;
	attr.max_entries = max_entries;
	if (btf_fd > 0) {
		attr.btf_fd = btf_fd;
		attr.btf_key_type_id = 1;
		attr.btf_value_type_id = value_type;
	}
	fd = sys_bpf(BPF_MAP_CREATE, &attr, sizeof(attr));
	if (fd < 0) {
		perror("BPF_MAP_CREATE");
		exit(1);
	}
	return fd;
}

/* A map of @type with one entry per 4-byte key below @max_entries; exits on failure. */
static inline int raw_map_create(enum bpf_map_type type, uint32_t value_size, uint32_t max_entries)
{
	return raw_map_create_btf(type, value_size, max_entries, 0, 0);
}

/*
 * A one-entry array map whose @value_size-byte value is type @value_type of the BTF made
 * of @types and @strings (raw_btf_load(); type 1 is the key's), as maps with a
 * bpf_spin_lock or bpf_timer in their value need; exits on failure.
 */
static inline int raw_btf_array_map(const uint32_t *types, uint32_t type_len, const char *strings,
				    uint32_t str_len, uint32_t value_size, uint32_t value_type)
{
	int btf_fd = raw_btf_load(types, type_len, strings, str_len);
	int fd = raw_map_create_btf(BPF_MAP_TYPE_ARRAY, value_size, 1, btf_fd, value_type);

	/* The map holds its own reference to the BTF. */
	close(btf_fd);
	return fd;
}

/*
 * An array map of one element of @value_size bytes that begin with a struct
 * bpf_timer (the verifier finds the timer through the value's BTF); the rest
 * of the value is the program's.
 */
static inline int raw_timer_map(uint32_t value_size)
{
	/* "" 0, "int" 1, "long long" 5, "bpf_timer" 15, "a" 25, "b" 27, "value" 29, "t" 35 */
	static const char strings[] = "\0int\0long long\0bpf_timer\0a\0b\0value\0t";
	const uint32_t types[] = {
		/* 1: int, the key */
		1, BTF_KIND_INT << 24, 4, BTF_INT_SIGNED << 24 | 32,
		/* 2: long long */
		5, BTF_KIND_INT << 24, 8, BTF_INT_SIGNED << 24 | 64,
		/* 3: struct bpf_timer { long long a; long long b; } */
		15, BTF_KIND_STRUCT << 24 | 2, 16, 25, 2, 0, 27, 2, 64,
		/* 4: struct value { struct bpf_timer t; } of @value_size bytes */
		29, BTF_KIND_STRUCT << 24 | 1, value_size, 35, 3, 0,
	};

	return raw_btf_array_map(types, sizeof(types), strings, sizeof(strings), value_size, 4);
}

/* BPF_MAP_LOOKUP_ELEM or BPF_MAP_UPDATE_ELEM (flags 0) of @key; the syscall's result. */
static inline long raw_map_elem(int cmd, int map_fd, uint32_t key, void *value)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map_fd;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)value;
	return sys_bpf(cmd, &attr, sizeof(attr));
}

/*
 * Loads @name, a program whose subprogram tail-calls into an empty program
 * array (so it returns 0), a construct with no termination copy: the
 * target would return into the caller's image, so BPF_PROG_TERMINATE
 * refuses it (EOPNOTSUPP).  A tail call from a subprogram needs BTF
 * func_info.  The array's fd goes to *@map_fd; exits on failure.
 */
static inline int raw_load_tail_call(const char *name, int *map_fd)
{
	*map_fd = raw_map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 1);
	const struct bpf_insn insns[] = {
		CALL_SUBPROG(1),
		EXIT(),
		/* the subprogram, called with the context in r1 */
		LD_MAP_FD(BPF_REG_2, *map_fd),
		MOV64_IMM(BPF_REG_3, 0),
		CALL_HELPER(BPF_FUNC_tail_call),
		MOV64_IMM(BPF_REG_0, 0),
		EXIT(),
	};

	static const uint32_t func_starts[] = { 0, 2 };

	return raw_load_funcs(BPF_PROG_TYPE_RAW_TRACEPOINT, insns, sizeof(insns) / sizeof(insns[0]),
			      name, 0, func_starts, 2);
}

/* The kernel's bpf_prog_info of the program behind @fd; exits on failure. */
static inline void raw_prog_info(int fd, struct bpf_prog_info *info)
{
	union bpf_attr attr;

	memset(info, 0, sizeof(*info));
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = fd;
	attr.info.info_len = sizeof(*info);
	attr.info.info = (uintptr_t)info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr))) {
		perror("BPF_OBJ_GET_INFO_BY_FD");
		exit(1);
	}
}

/* The kernel's id of the program behind @fd; exits on failure. */
static inline uint32_t raw_prog_id(int fd)
{
	struct bpf_prog_info info;

	raw_prog_info(fd, &info);
	return info.id;
}

/* Is the running kernel preemptible (uname -v says PREEMPT or PREEMPT_DYNAMIC)? */
static inline bool raw_kernel_preemptible(void)
{
	struct utsname u;

	return !uname(&u) && strstr(u.version, " PREEMPT");
}

/*
 * A unix datagram socket pair in @sv whose receiving end, sv[1], filters with
 * the socket filter @prog_fd: the filter runs in the task sending on sv[0].
 * Exits on failure.
 */
static inline void raw_filter_socket(int prog_fd, int sv[2])
{
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) ||
	    setsockopt(sv[1], SOL_SOCKET, SO_ATTACH_BPF, &prog_fd, sizeof(prog_fd))) {
		perror("socket filter");
		exit(1);
	}
}

static inline void pin_to(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("sched_setaffinity");
		exit(1);
	}
}

/* Writes @value to the sysctl file @path; exits on failure. */
static inline void write_sysctl(const char *path, unsigned int value)
{
	FILE *f = fopen(path, "w");

	if (!f || fprintf(f, "%u\n", value) < 0 || fclose(f)) {
		perror(path);
		exit(1);
	}
}

/* Reads the number in the sysctl file @path; false if it is missing or unreadable. */
static inline bool read_sysctl(const char *path, unsigned int *value)
{
	FILE *f = fopen(path, "r");
	bool ok = f && fscanf(f, "%u", value) == 1;

	if (f)
		fclose(f);
	return ok;
}

#endif /* RAW_BPF_H */
