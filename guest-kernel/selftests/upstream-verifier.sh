#!/bin/sh
# Runs upstream's verifier tests in the guest (busybox sh), for compare-upstream:
# test_verifier as root (every test, the unprivileged variants with capabilities
# dropped) and as nobody (the unprivileged ones only), then test_progs' verifier
# tests as root (`-t verifier`; they drop capabilities for their @unpriv
# variants themselves). Prints each run's output with a prefix, `tv root ...`,
# `tv nobody ...` and `tp root ...` (its stderr as `# ...` comments), its exit
# status, the lowest MemAvailable seen while the tests ran, the count of kernel
# warnings, and last `upstream: done`.
export PATH=/bin
echo 0 >/proc/sys/kernel/unprivileged_bpf_disabled
echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>/etc/passwd

# The copies of huge programs cost memory (issue 14): the lowest MemAvailable
# while the tests run, sampled every 0.1 s.
(
	low=""
	while :; do
		now=$(sed -n 's/^MemAvailable: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
		if [ -z "$low" ] || [ "$now" -lt "$low" ]; then
			low=$now
			echo "$low" >/tmp/low-memory.tmp && mv /tmp/low-memory.tmp /tmp/low-memory
		fi
		sleep 0.1
	done
) &
sampler=$!

# stderr apart: unbuffered, it would land in the middle of stdout's result lines.
/bin/test_verifier >/tmp/root.out 2>/tmp/root.err
echo "upstream: root exit $?"
su -s /bin/test_verifier nobody >/tmp/nobody.out 2>/tmp/nobody.err
echo "upstream: nobody exit $?"
(cd /tmp && /bin/test_progs -t verifier >/tmp/progs.out 2>/tmp/progs.err)
echo "upstream: progs exit $?"
kill $sampler
echo "upstream: lowest MemAvailable $(cat /tmp/low-memory) kB"
# Printed after the runs, so that no kernel line lands in the middle of one.
for run in root nobody progs; do
	sed "s/^/# $run stderr: /" /tmp/$run.err
done
sed 's/^/tv root /' /tmp/root.out
sed 's/^/tv nobody /' /tmp/nobody.out
sed 's/^/tp root /' /tmp/progs.out
warnings=$(dmesg | grep -cE 'WARNING:|BUG:|Oops|general protection|Call Trace|soft lockup|rcu.*stall')
echo "upstream: kernel warnings $warnings"
dmesg | grep -E -A20 'WARNING:|BUG:|Oops|general protection' | head -60 | sed 's/^/# dmesg: /'
echo "upstream: done"
