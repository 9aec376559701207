#!/bin/sh
# Issue-8 kernel proof, run inside the guest (busybox sh) by
# guest-kernel/selftests/run-stress: term_stress's stress, races and attr fuzz
# (root and unprivileged), a kmemleak scan, then dmesg. Prints one TAP-like
# line per check and, last, `selftest: N passed, M failed`.
#
# Parameters come from the kernel command line: stress.cycles=N (terminate
# calls of the stress, default 500), stress.iterations=N (each race, default
# 100), stress.fuzz=N (hostile calls per user, default 2000).
export PATH=/bin
cmdline_value() {
	tr ' ' '\n' </proc/cmdline | sed -n "s/^stress\\.$1=\\([0-9][0-9]*\\)\$/\\1/p"
}
CYCLES=$(cmdline_value cycles)
ITERATIONS=$(cmdline_value iterations)
FUZZ=$(cmdline_value fuzz)

# EPERM must come from BPF_PROG_TERMINATE's own check, not from a global switch.
echo 0 >/proc/sys/kernel/unprivileged_bpf_disabled 2>/dev/null
# ok, not_ok, check, run_tap, tap_end (run-stress adds it to the initramfs).
. /lib/tap.sh
# KASAN and lockdep are what make this proof worth running (kmemleak is
# checked by term_stress): a kernel without them fails here.
check "KASAN and lockdep are active" \
	"boot the debug variant (guest-kernel/build --variant debug)" \
	-n "$(dmesg | grep 'KernelAddressSanitizer initialized')" -a -e /proc/lockdep

# Streamed, so the host sees progress: term_stress's check lines become
# this proof's checks, everything else comments; then one check that it
# exited 0 after its summary line.
run_tap term_stress all --cycles "${CYCLES:-500}" --iterations "${ITERATIONS:-100}" --fuzz "${FUZZ:-2000}" \
	--kmemleak

bad=$(dmesg | grep -E 'WARNING:|BUG:|Oops|general protection|Call Trace|RIP:|KASAN:|UBSAN:|possible circular|possible recursive|inconsistent lock state|suspicious RCU|sleeping function called|new suspected memory leaks|soft lockup|hard LOCKUP|rcu.*stall|Kernel panic|without equivalent in the copy')
if [ -z "$bad" ]; then
	ok "no WARN/BUG/KASAN/lockdep/kmemleak report in dmesg"
else
	not_ok "no WARN/BUG/KASAN/lockdep/kmemleak report in dmesg" "found:"
	dmesg | grep -E -A30 'WARNING:|BUG:|KASAN:|possible circular|possible recursive|inconsistent lock state|suspicious RCU|sleeping function called' | head -120 | sed 's/^/# /'
	echo "$bad" | head -20 | sed 's/^/# /'
fi
tap_end
