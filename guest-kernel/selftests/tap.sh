# Check lines of the guest proofs (termination-proof.sh, stress-proof.sh;
# busybox sh), sourced as /bin/tap.sh: one `ok N - name` or `not ok N - name:
# why` line per check, numbered across the whole proof, and at the end
# `selftest: N passed, M failed`, the line run-qemu and run-stress wait for.
#
# The C test programs (test_prog_terminate, term_stress) print the same
# lines through guest-samples/bpf/tap.h; run_tap folds them into this
# sequence.

passed=0
failed=0
check_number=0

ok() {
	check_number=$((check_number + 1))
	passed=$((passed + 1))
	echo "ok $check_number - $1"
}

not_ok() {
	check_number=$((check_number + 1))
	failed=$((failed + 1))
	echo "not ok $check_number - $1: $2"
}

# check NAME WHY-IF-FAILED CONDITION...: runs `test CONDITION`.
check() {
	name=$1
	why=$2
	shift 2
	if [ "$@" ]; then ok "$name"; else not_ok "$name" "$why"; fi
}

# run_tap PROGRAM [ARGS...]: runs a C test program, streaming its output:
# its check lines become checks of this proof (renumbered), everything
# else a `#` comment. Then one more check: it exited 0 after its summary
# line `PROGRAM: N passed, 0 failed` (a crash or an early exit fails here
# even if every line it printed passed).
run_tap() {
	program=${1##*/}
	fifo=/tmp/tap.$program.$$.fifo
	rm -f "$fifo"
	mkfifo "$fifo"
	"$@" >"$fifo" 2>&1 &
	tap_pid=$!
	tap_summary=""
	# Read in this shell (not a pipeline's subshell): the counts stay here.
	while IFS= read -r line; do
		case "$line" in
		"ok "*) ok "${line#ok [0-9]* - }" ;;
		"not ok "*)
			rest=${line#not ok [0-9]* - }
			# not_ok adds its own `: why`; the program's line has one already.
			check_number=$((check_number + 1))
			failed=$((failed + 1))
			echo "not ok $check_number - $rest"
			;;
		"$program: "*" passed, "*" failed") tap_summary=${line#"$program": }; echo "# $line" ;;
		"#"*) echo "$line" ;;
		*) echo "# $line" ;;
		esac
	done <"$fifo"
	wait "$tap_pid"
	tap_status=$?
	rm -f "$fifo"
	case "$tap_summary" in
	*" passed, 0 failed") summary_ok=yes ;;
	*) summary_ok=no ;;
	esac
	check "$program exited 0 after its summary (${tap_summary:-none})" \
		"exit status $tap_status, summary '${tap_summary:-missing}'" \
		"$tap_status:$summary_ok" = 0:yes
}

# tap_end: the proof's summary line; returns non-zero if a check failed.
tap_end() {
	echo "selftest: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}
