#!/bin/sh
# task_iter_read ITERATOR: reads a pinned task iterator of task_iter.bpf.c to its end (dd, in
# 64 KiB reads) and tells by its exit status what the reader got. Each task's record is
# "begin PID SLOW" then "end PID SLOW"; SLOW is 1 for the reader's own task.
#   0   every record whole, the reader's exactly once
#   3   every record whole but the reader's, which has its begin and no end, once
#   1   anything else (a record of another task cut short, lines out of order, the reader's
#       record missing or twice); the output follows on stderr
#   10  the read failed (dd's message on stderr)
out=/tmp/task_iter.$$
dd if="$1" of="$out" bs=64k 2>"$out.err" || { cat "$out.err" >&2; exit 10; }
awk '
function cut_short() { if (slow == 1) cut_reader++; else bad = 1 }
$1 == "begin" { if (open != "") cut_short(); open = $2; slow = $3; readers += $3 == 1 }
$1 == "end" { if ($2 != open) bad = 1; open = "" }
$1 != "begin" && $1 != "end" { bad = 1 }
END {
	if (open != "") cut_short()
	if (bad || readers != 1) exit 1
	exit cut_reader ? 3 : 0
}' "$out"
status=$?
[ $status -ne 1 ] || cat "$out" >&2
rm -f "$out" "$out.err"
exit $status
