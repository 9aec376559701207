#!/bin/sh
# load_refused OBJECT FUNCTION REASON: exits 0 when the generic loader refuses to load FUNCTION
# from OBJECT with EINVAL and the verifier's REASON (a fixed string) on stderr; 1 otherwise,
# with the loader's exit status and its last lines on stderr. A load that passes would hold
# the program: `timeout` ends it, and the check fails.
err=/tmp/load_refused.$$
timeout 10 bpf_loader load "$1" --prog "$2" >/dev/null 2>"$err"
status=$?
if [ $status -eq 1 ] && grep -q 'Invalid argument' "$err" && grep -qF "$3" "$err"; then
	rm -f "$err"
	exit 0
fi
echo "loader exit $status" >&2
tail -5 "$err" >&2
rm -f "$err"
exit 1
