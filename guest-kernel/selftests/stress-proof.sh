#!/bin/sh
# Issue-8 kernel proof, run inside the guest (busybox sh) by
# guest-kernel/selftests/run-stress: term_stress's stress, races and attr fuzz
# (root and unprivileged), a kmemleak scan, then dmesg. Prints one TAP-like
# line per check and, last, `selftest: N passed, M failed`.
#
# Parameters come from the kernel command line: stress.cycles=N (terminate
# calls of the stress, default 500), stress.iterations=N (each race, default
# 100), stress.fuzz=N (hostile calls per user, default 2000), stress.debug=0 (not a
# debug kernel: no KASAN/lockdep check, no kmemleak scan; run-stress --no-debug).
export PATH=/bin
cmdline_value() {
	tr ' ' '\n' </proc/cmdline | sed -n "s/^stress\\.$1=\\([0-9][0-9]*\\)\$/\\1/p"
}
CYCLES=$(cmdline_value cycles)
ITERATIONS=$(cmdline_value iterations)
FUZZ=$(cmdline_value fuzz)
DEBUG=$(cmdline_value debug)

# EPERM must come from BPF_PROG_TERMINATE's own check, not from a global switch.
echo 0 >/proc/sys/kernel/unprivileged_bpf_disabled 2>/dev/null
# ok, not_ok, check, run_tap, tap_end (run-stress adds it to the initramfs).
. /lib/tap.sh
# KASAN and lockdep are what make this proof worth running on the debug variant
# (kmemleak is checked by term_stress): a kernel without them fails here, unless
# run-stress was told it is not a debug kernel.
kmemleak=--kmemleak
if [ "$DEBUG" = 0 ]; then
	ok "KASAN and lockdep are active # SKIP not a debug kernel (run-stress --no-debug)"
	kmemleak=""
else
	check "KASAN and lockdep are active" \
		"boot the debug variant (guest-kernel/build --variant debug)" \
		-n "$(dmesg | grep 'KernelAddressSanitizer initialized')" -a -e /proc/lockdep
fi

# Streamed, so the host sees progress: term_stress's check lines become
# this proof's checks, everything else comments; then one check that it
# exited 0 after its summary line.
run_tap term_stress all --cycles "${CYCLES:-500}" --iterations "${ITERATIONS:-100}" --fuzz "${FUZZ:-2000}" \
	$kmemleak

# The stress's verdicts must be able to fail: with the fault knob the handler
# leaves the innermost return address of each stop in the original, so the
# kernel counts stops whose runs go on there and call their next helper. The
# per-run check (each stopped run gives what its copy gives from where the
# kernel says it continues) must say so; the check it replaced accepted any
# such run, since a normal result needed no explanation.
caught="every stopped run gave the result its copy gives from where the kernel says it continues"
fault_run=$(term_stress stress --cycles 60 --fault-skip-rewrite 1 2>&1)
if echo "$fault_run" | grep -q "^not ok .*$caught"; then
	ok "the stress catches stops that leave a run in the original (fault knob skip_rewrite=1)"
	# Its "not ok" said as a finding: a failure digest of this log then shows the checks that failed.
	echo "$fault_run" | grep -E "^# .* returned|$caught|not stopped gave" |
		sed 's/^not ok [0-9]* - /caught: /; s/^/# fault run: /'
else
	not_ok "the stress catches stops that leave a run in the original (fault knob skip_rewrite=1)" \
		"its per-run check passed:"
	echo "$fault_run" | grep -E '^(ok|not ok) ' | sed 's/^/# /'
fi

bad=$(dmesg | grep -E 'WARNING:|BUG:|Oops|general protection|Call Trace|RIP:|KASAN:|UBSAN:|possible circular|possible recursive|inconsistent lock state|suspicious RCU|sleeping function called|new suspected memory leaks|soft lockup|hard LOCKUP|rcu.*stall|Kernel panic|without equivalent in the copy')
if [ -z "$bad" ]; then
	ok "no WARN/BUG/KASAN/lockdep/kmemleak report in dmesg"
else
	not_ok "no WARN/BUG/KASAN/lockdep/kmemleak report in dmesg" "found:"
	dmesg | grep -E -A30 'WARNING:|BUG:|KASAN:|possible circular|possible recursive|inconsistent lock state|suspicious RCU|sleeping function called' | head -120 | sed 's/^/# /'
	echo "$bad" | head -20 | sed 's/^/# /'
fi
tap_end
