# Running a test suite as one process group that can be ended as a whole (sourced by
# scripts/test; tested by scripts/check-suite-runner).

# The process group of the suite running now, and of the last one (each suite runs in a
# session of its own whose id is also its group id).
current_group=""
last_group=""
# Seconds between SIGTERM and SIGKILL for a suite that ran out of time.
SUITE_TERM_GRACE=${SUITE_TERM_GRACE:-20}

# Runs "$@" in a new session, so that the suite and everything it started (a termlab run, its
# nested L1 QEMU, a guest QEMU) form one process group that can be ended together. After
# limit_s seconds the group gets SIGTERM (termlab passes it on and writes its partial result),
# SUITE_TERM_GRACE s later SIGKILL; the launcher's QEMU dies with it (PR_SET_PDEATHSIG).
# Whatever the suite leaves in its group after it ended is killed too. Status: the suite's,
# or 124 on timeout.
run_in_group() { # limit_s command...
    local limit="$1" deadline pid rc=0
    shift
    deadline=$((SECONDS + limit))
    # The suite's own CPU time (see suite_cpu_ms), appended to the file the caller names.
    [[ -z ${SUITE_CPU_FILE:-} ]] || set -- /usr/bin/time -a -o "$SUITE_CPU_FILE" -f "%U %S" "$@"
    # Without job control a background job is no group leader, so setsid(1) makes its own
    # process the leader of the new session: $! is the group id.
    setsid "$@" </dev/null &
    pid=$!
    current_group=$pid
    last_group=$pid
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -TERM -- "-$pid" 2>/dev/null || true
            for _ in $(seq "$SUITE_TERM_GRACE"); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 1
            done
            end_group "$pid"
            wait "$pid" 2>/dev/null || true
            current_group=""
            return 124
        fi
        sleep 1
    done
    wait "$pid" || rc=$?
    end_group "$pid"
    current_group=""
    return "$rc"
}

# The processes still in a suite's session (a process that changed its group, like the nested
# launcher's QEMU, stays in the session).
session_processes() { # sid
    ps -e -o sid=,pid=,args= | awk -v sid="$1" '$1 == sid { $1 = ""; print }'
}

end_group() { # pgid: SIGKILL to what is left of it, and wait until it is gone
    local group="$1"
    kill -KILL -- "-$group" 2>/dev/null || true
    for _ in $(seq 50); do
        pgrep -g "$group" >/dev/null || return 0
        sleep 0.1
    done
    echo "[test] processes of group $group still alive: $(pgrep -g "$group" | tr '\n' ' ')" >&2
    return 1
}

# The subshells of the lanes running beside the test command's own suites (start_lane), while
# they run.
lane_pids=()

# Ctrl-C or SIGTERM to the test command ends the running suite's whole group, and each lane's,
# then the command.
end_current_group_and_exit() {
    echo "[test] interrupted: ending the running suite" >&2
    # A lane's subshell ends its own running suite the same way (its trap).
    local pid
    for pid in "${lane_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    if [[ -n "$current_group" ]]; then
        kill -TERM -- "-$current_group" 2>/dev/null || true
        sleep 5
        end_group "$current_group" || true
    fi
    for pid in "${lane_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    exit 130
}

# Runs "$@" (a function that runs suites with run_in_group or run_with_retries, one after
# the other) in a background subshell: a lane beside the suites that follow. For suites that
# need one CPU beside suites that leave one idle, none of them timing-sensitive: one QEMU
# TCG selftest beside another (each uses about one of the two host CPUs, 49% idle measured;
# 196/196 each, in 101 s for both); the nested launcher's tests and the suite runner's (70%
# and 68% idle) beside the kernel stress (39%), which passed 34/34 in 87 s instead of 75-79 s
# beside them; libFuzzer's single process beside a nested end-to-end test. Several lanes may
# run at once (the three kernel selftests, whose guests halt in their slow helpers).
start_lane() { # command...
    (
        lane_pids=()
        trap end_current_group_and_exit INT TERM
        "$@"
    ) &
    lane_pids+=("$!")
}

# Waits for every lane start_lane started. Status: the first failed lane's, else 0.
finish_lane() {
    local rc=0 lane_rc pid
    for pid in "${lane_pids[@]}"; do
        lane_rc=0
        wait "$pid" || lane_rc=$?
        ((rc != 0)) || rc=$lane_rc
    done
    lane_pids=()
    return "$rc"
}

# run_in_group with the suite's stdout and stderr both on stdout and appended to log_file (the
# tee runs in the suite's group, so the file is complete when the group has ended).
run_logged() { # log_file limit_s command...
    local log="$1" limit="$2"
    shift 2
    run_in_group "$limit" bash -c 'set -o pipefail; "$@" 2>&1 | tee -a "$0"' "$log" "$@"
}

# The lines of a suite's log that say why it failed, for the end of a long CI log (where a CI
# system's excerpt shows them): the last 15 lines that name a failure (and the nested
# launcher's notes of an L1 VM that paused), then the last 5 lines.
failure_digest() { # log_file
    grep -E 'FAIL|not ok|panicked at|[Ee]rror[:(]|timed out|: failed|failed inside|gave no sign of life' "$1" |
        grep -vE '(^| )0 failed|^ok ' | tail -n 15 | sed 's/^/    /'
    echo "    ..."
    tail -n 5 "$1" | sed 's/^/    /'
}

# What the nested launcher prints when the L1 VM ended under the command (an L1 kernel crash
# in QEMU TCG's SVM emulation), or when it killed an L1 whose CPU stopped giving signs of
# life: the emulated host failed, not the code under test.
readonly L1_CRASHED="the L1 VM ended without running the command"
readonly L1_STALLED="the L1 VM stalled and was killed"
# What termlab prints when a guest's vCPU triple-faulted, and what the nested launcher prints
# when it runs the command inside L1. Nested guests (L2, on L1's KVM on QEMU TCG's emulated
# SVM) triple-fault now and then without a console message: traced inside L1, each one is an
# instruction fetch of kernel text that faults "not present" right after KVM entered the
# guest, which no real CPU does (README's open problems; vmm/examples/triple_fault_study.rs).
# Counted as the emulated host failing.
readonly L2_TRIPLE_FAULT="a vCPU triple-faulted"
# The same exit as the VMM's own tests print it (`ExitReason` in an assertion's message).
readonly L2_TRIPLE_FAULT_VMM="Some(TripleFault)"
# What a hang report says of a vCPU whose page-table root is outside the guest's memory
# (termlab's engine/guest.rs, HOST_STATE_IN_VCPU): KVM handed back its host's registers. The
# nested hangs of 2026-12-05 had both vCPUs at L1's __svm_vcpu_run+0x9c with an L1 CR3: the
# emulated SVM lost the guest's state, the same failure as the triple faults (README).
readonly L2_HOST_STATE="the vCPU holds its host's state, not the guest's"
readonly NESTED_RUN="re-running inside an L1 VM"
# What termlab prints after a scenario it could not run, its exit class 3 ("says nothing
# about the kernel under test"; termlab/src/exit.rs): in the nested runs of 2026-12-05, a
# nested guest whose agent never answered its first request within 180 s.
readonly TERMLAB_INFRASTRUCTURE=": exit class infrastructure)"

# Why a failed try of a nested suite is the emulated host's failure, not the code's: a
# timeout (a hung L1), the nested launcher saying the L1 VM crashed or stalled, a nested
# guest's triple fault, a hung nested guest whose vCPU holds its host's state, or a nested
# scenario termlab itself classed as infrastructure; nothing when it is not. Reads only that
# try's output. A failure that repeats still fails: after NESTED_TRIES tries.
infrastructure_failure() { # rc try_log
    local rc="$1" try_log="$2"
    if ((rc == 124)); then
        echo "timed out (a hung nested L1 VM?); its processes were ended"
    elif ((rc != 0)) && grep -qF -e "$L1_CRASHED" -e "$L1_STALLED" "$try_log"; then
        echo "the nested L1 VM crashed or stalled under it (infrastructure; its console is above)"
    elif ((rc != 0)) && grep -qF -e "$L2_TRIPLE_FAULT" -e "$L2_TRIPLE_FAULT_VMM" "$try_log" &&
        grep -qF "$NESTED_RUN" "$try_log"; then
        echo "a nested guest's vCPU triple-faulted (no console message; counted as the emulated host, see README)"
    elif ((rc != 0)) && grep -qF "$L2_HOST_STATE" "$try_log" && grep -qF "$NESTED_RUN" "$try_log"; then
        echo "a nested guest's vCPU held its host's state (its CR3 outside the guest; counted as the emulated host, see README)"
    elif ((rc != 0)) && grep -qF "$TERMLAB_INFRASTRUCTURE" "$try_log" && grep -qF "$NESTED_RUN" "$try_log"; then
        echo "termlab could not run a nested scenario (its exit class infrastructure, e.g. a guest whose agent never answered)"
    fi
}

# Tries of a nested suite while each failure is the emulated host's. Three in a row happen: a
# dry run of 2026-12-05 had two L1 kernel crashes, then a guest triple fault, in program-types.
# The tries of program-types and of the harness shards rerun only what has not passed yet, so
# a further try costs a scenario or a shard, not the suite. A timeout is tried once more only,
# so that a hung suite costs at most twice its limit.
readonly NESTED_TRIES=4

# Where the tries of one nested suite keep what a later try can skip (TERMLAB_SUITE_STATE:
# check-program-types keeps the results of its scenarios there, check-shards the outcome of
# each shard, and a try after the emulated host failed runs only what has not passed).
# Under results/, which L1 can write; each suite removes its own after its last try, the
# test command all of them on exit.
readonly SUITE_STATE_ROOT="$REPO/results/.suite-state"

# run_logged again while a try fails for the emulated host (infrastructure_failure), up to
# NESTED_TRIES tries; says so on stderr and in the log, which holds every try. Status: the
# last try's.
run_with_retries() { # name limit_s log_file command...
    local name="$1" limit="$2" log="$3" rc try=1 why
    local try_log="$log.try" state="$SUITE_STATE_ROOT/$1"
    shift 3
    rm -rf "$state"
    mkdir -p "$state"
    while :; do
        rc=0
        : >"$try_log"
        TERMLAB_SUITE_STATE="$state" run_logged "$try_log" "$limit" "$@" || rc=$?
        cat "$try_log" >>"$log"
        why="$(infrastructure_failure "$rc" "$try_log")"
        if [[ -z "$why" ]] || ((try == NESTED_TRIES)) || ((rc == 124 && try == 2)); then
            break
        fi
        try=$((try + 1))
        echo "[test] suite $name: $why; trying again (try $try of at most $NESTED_TRIES)" |
            tee -a "$log" >&2
    done
    rm -f "$try_log"
    rm -rf "$state"
    return "$rc"
}

# The host's CPU time so far, from /proc/stat: "busy total" in clock ticks, busy being user,
# nice, system, irq and softirq time, total that plus idle, iowait and steal. Two snapshots
# give how busy the host's CPUs were between them (busy_percent): where the test command
# leaves CPU time unused, and how far from its CPU time its wall time is (issue 18).
cpu_snapshot() {
    local _cpu user nice system idle iowait irq softirq steal
    read -r _cpu user nice system idle iowait irq softirq steal _ </proc/stat
    local busy=$((user + nice + system + irq + softirq))
    echo "$busy $((busy + idle + iowait + steal))"
}

# The CPU time (ms, user + system) in a SUITE_CPU_FILE: what the suite's processes used, with
# what their own children used (a termlab run's QEMU, waited for by its launcher), in every
# try, whatever ran beside it; not what a try cut off at its time limit used (its time(1) was
# killed with it). 0 without the file.
suite_cpu_ms() { # file
    awk '/^[0-9.]+ [0-9.]+$/ { t += $1 + $2 } END { printf "%d", t * 1000 }' "$1" 2>/dev/null ||
        echo 0
}

busy_percent() { # "busy total" (earlier) "busy total" (later)
    local busy0 total0 busy1 total1
    read -r busy0 total0 <<<"$1"
    read -r busy1 total1 <<<"$2"
    if ((total1 > total0)); then
        echo $((100 * (busy1 - busy0) / (total1 - total0)))
    else
        echo 0
    fi
}
