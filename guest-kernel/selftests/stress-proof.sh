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
passed=0
failed=0
n=0
# KASAN and lockdep are what make this proof worth running (kmemleak is
# checked by term_stress): a kernel without them fails here.
n=$((n + 1))
if dmesg | grep -q 'KernelAddressSanitizer initialized' && [ -e /proc/lockdep ]; then
	passed=$((passed + 1)); echo "ok $n - KASAN and lockdep are active"
else
	failed=$((failed + 1)); echo "not ok $n - KASAN and lockdep are active: boot the debug variant (guest-kernel/build --variant debug)"
fi

# Streamed, so the host sees progress: term_stress's check lines are
# renumbered into this proof's sequence, everything else becomes a comment.
# (The loop runs in a subshell: it leaves its counts in a file.)
{ term_stress all --cycles "${CYCLES:-500}" --iterations "${ITERATIONS:-100}" --fuzz "${FUZZ:-2000}" \
	--kmemleak 2>&1; echo "status $?"; } | {
	status=1 summary=no
	while IFS= read -r line; do
		case "$line" in
		"ok "*) n=$((n + 1)); passed=$((passed + 1)); echo "ok $n -${line#ok [0-9]* -}" ;;
		"not ok "*) n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n -${line#not ok [0-9]* -}" ;;
		"status "*) status=${line#status } ;;
		"trigger "*" failed=0 "*) summary=yes; echo "# $line" ;;
		"#"*) echo "$line" ;;
		*) echo "# $line" ;;
		esac
	done
	echo "$passed $failed $n $status $summary" >/tmp/term_stress.counts
}
read -r passed failed n status summary </tmp/term_stress.counts
n=$((n + 1))
if [ "$status" = 0 ] && [ "$summary" = yes ]; then
	passed=$((passed + 1)); echo "ok $n - term_stress exited 0"
else
	failed=$((failed + 1)); echo "not ok $n - term_stress exited 0: status $status"
fi

n=$((n + 1))
bad=$(dmesg | grep -E 'WARNING:|BUG:|Oops|general protection|Call Trace|RIP:|KASAN:|UBSAN:|possible circular|possible recursive|inconsistent lock state|suspicious RCU|sleeping function called|new suspected memory leaks|soft lockup|hard LOCKUP|rcu.*stall|Kernel panic|without equivalent in the copy')
if [ -z "$bad" ]; then
	passed=$((passed + 1)); echo "ok $n - no WARN/BUG/KASAN/lockdep/kmemleak report in dmesg"
else
	failed=$((failed + 1)); echo "not ok $n - no WARN/BUG/KASAN/lockdep/kmemleak report in dmesg: found:"
	dmesg | grep -E -A30 'WARNING:|BUG:|KASAN:|possible circular|possible recursive|inconsistent lock state|suspicious RCU|sleeping function called' | head -120 | sed 's/^/# /'
	echo "$bad" | head -20 | sed 's/^/# /'
fi
echo "selftest: $passed passed, $failed failed"
