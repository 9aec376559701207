# Check lines of the guest proofs (termination-proof.sh, stress-proof.sh;
# busybox sh), sourced as /lib/tap.sh: one `ok N - name` or `not ok N - name:
# why` line per check, numbered across the whole proof, and at the end
# `selftest: N passed, M failed`, the line run-qemu and run-stress wait for.
#
# The C test program term_stress prints the same lines through
# guest-samples/bpf/tap.h; run_tap folds them into this sequence.

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

# stream HANDLER COMMAND [ARGS...]: runs COMMAND and hands each line of its
# output to the shell function HANDLER as it comes, read in this shell (not
# a pipeline's subshell: the counts stay here). Sets tap_status to its exit
# status.
stream() {
	handler=$1
	shift
	fifo=/tmp/tap.$$.fifo
	rm -f "$fifo"
	mkfifo "$fifo"
	"$@" >"$fifo" 2>&1 &
	tap_pid=$!
	while IFS= read -r line; do
		"$handler" "$line"
	done <"$fifo"
	wait "$tap_pid"
	tap_status=$?
	rm -f "$fifo"
}

# exit_check WHAT OK: one more check after a streamed program: it exited 0
# and its summary (tap_summary) was OK (yes/no).
exit_check() {
	check "$1 exited 0 after its summary (${tap_summary:-none})" \
		"exit status $tap_status, summary '${tap_summary:-missing}'" \
		"$tap_status:$2" = 0:yes
}

# run_tap PROGRAM [ARGS...]: runs a C test program, streaming its output:
# its check lines become checks of this proof (renumbered), everything
# else a `#` comment. Then one more check: it exited 0 after its summary
# line `PROGRAM: N passed, 0 failed` (a crash or an early exit fails here
# even if every line it printed passed).
run_tap() {
	program=${1##*/}
	tap_summary=""
	stream tap_line "$@"
	case "$tap_summary" in
	*" passed, 0 failed") exit_check "$program" yes ;;
	*) exit_check "$program" no ;;
	esac
}

tap_line() {
	case "$1" in
	"ok "*) ok "${1#ok [0-9]* - }" ;;
	"not ok "*)
		# not_ok adds its own `: why`; the program's line has one already.
		check_number=$((check_number + 1))
		failed=$((failed + 1))
		echo "not ok $check_number - ${1#not ok [0-9]* - }"
		;;
	"$program: "*" passed, "*" failed") tap_summary=${1#"$program": }; echo "# $1" ;;
	"#"*) echo "$1" ;;
	*) echo "# $1" ;;
	esac
}

# run_test_progs TEST [ARGS...]: runs upstream's test_progs ($TEST_PROGS,
# default /bin/test_progs) on TEST with ARGS, streaming its output: each subtest's result line
# (`#N/M TEST/SUBTEST:OK`) becomes a check of this proof, a SKIP a failed one
# (it tested nothing), everything else a `#` comment. A failed subtest's check
# names its first failed assertion (`FUNC:FAIL:NAME ...`), so that a log that
# keeps only the check lines still says what failed. Then one more check: it
# exited 0 after `Summary: ... 0 FAILED` and ran a subtest.
run_test_progs() {
	test=$1
	shift
	tap_summary=""
	subtests=0
	repeats=""
	first_failure=""
	stream test_progs_line "${TEST_PROGS:-/bin/test_progs}" -t "$test" "$@"
	case "$subtests:$tap_summary" in
	0:*) exit_check "test_progs -t $test (no subtest ran)" no ;;
	*", 0 FAILED") exit_check "test_progs -t $test ($subtests subtests)" yes ;;
	*) exit_check "test_progs -t $test ($subtests subtests)" no ;;
	esac
}

test_progs_line() {
	case "$1" in
	# After a failure, test_progs shows the failed ones again.
	"All error logs:") repeats=yes ;;
	"Summary: "*) tap_summary=${1#Summary: } ;;
	# "#1/2     prog_terminate/errors:OK": the number, then the result.
	"#"*" $test/"*:*)
		if [ -z "$repeats" ]; then
			result=${1##* }
			subtests=$((subtests + 1))
			case "$result" in
			*:OK) ok "test_progs ${result%:OK}" ;;
			*) not_ok "test_progs ${result%:*}" \
				"${result##*:}${first_failure:+, first: $first_failure} (its log above)" ;;
			esac
			first_failure=""
			return
		fi
		;;
	*:FAIL:*) [ -n "$first_failure" ] || first_failure=$1 ;;
	esac
	echo "# $1"
}

# tap_end: the proof's summary line; returns non-zero if a check failed.
tap_end() {
	echo "selftest: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}
