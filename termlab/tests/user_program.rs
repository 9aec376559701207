//! A user's own BPF program, end to end (issue 16): a BPF C source, a
//! scenario with its own trigger and expectations, a guest file and kernel
//! arguments, all in a temporary directory outside the repository, run by
//! `termlab run` from that directory. Boots the guest (inside the nested L1
//! VM where needed): minutes. Run with
//! `cargo test -p termlab --test user_program -- --ignored`.

use std::path::Path;
use std::process::Command;

use termlab::results::{RunResult, StepRecord};

/// Two programs in one file: `spin` sits in the demo kernel's slow helper
/// (`kernel.bpf_termination_demo_delay_ms`) twice per run and counts its
/// runs; `packet_len` is a tc program that returns the packet's length.
const SOURCE: &str = r#"// A user's program: no vmlinux.h (the guest kernel has no BTF), UAPI headers only.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

__u64 runs;

SEC("tracepoint/syscalls/sys_enter_sync")
int spin(void *ctx)
{
	runs++;
	bpf_printk("spin: in the slow helper, run %llu", runs);
	bpf_get_numa_node_id();
	bpf_get_numa_node_id();
	return 0;
}

SEC("tc")
int packet_len(struct __sk_buff *skb)
{
	return skb->len;
}

char LICENSE[] SEC("license") = "GPL";
"#;

/// 22 bytes: an Ethernet header (at least 14 bytes for a tc test run) with
/// a local experimental ethertype (0x88b5): an IPv4 one would need a whole
/// IP header, which the kernel checks.
const PACKET_HEX: &str = "ffffffffffff00000000000088b50000000000000000";

const SCENARIO: &str = r#"description = "A user's program from source: triggered by sync, terminated in its slow helper; another run by BPF_PROG_TEST_RUN"
repetitions = 1

[vm]
kernel = "default"
vcpus = 2
memory_mib = 256
files = [{ host = "note.txt", guest = "/etc/user-note" }]
kernel_args = "termlab_user_test=1"

[sysctl]
"kernel.bpf_termination_demo_delay_ms" = 1000

[[program]]
name = "spin"
source = "spin.bpf.c"
function = "spin"
trigger = ["sync"]

[[program]]
name = "len"
source = "spin.bpf.c"
function = "packet_len"
attach = false
test_run = { data_hex = "PACKET", repeat = 3 }

[[step]]
exec = { label = "file", argv = ["grep", "-q", "hello from the host", "/etc/user-note"] }

[[step]]
exec = { label = "cmdline", argv = ["grep", "-q", "termlab_user_test=1", "/proc/cmdline"] }

[[step]]
trigger = { label = "first", program = "spin", background = true, cpu = 1 }

[[step]]
wait_trace = { step = "first", line = "spin: in the slow helper" }

[[step]]
terminate = { label = "term", program = "spin" }

[[step]]
wait = { step = "first" }

[[step]]
trigger = { label = "next", program = "spin", cpu = 1 }

[[step]]
trigger = { label = "probe", program = "len" }

# Kernel timestamps: terminate entry -> the terminated run returned. The
# agent's process times of `sync` include its start under nested emulation.
[[metric]]
name = "end_to_end"
from = "term.request"
to = "term.returned"

[[metric]]
name = "next_run"
from = "next.start"
to = "next.end"

[[expect]]
name = "terminate stopped spin on one CPU"
terminate_result = { step = "term", cpus = 1 }

[[expect]]
name = "the kernel stopped it inside the helper"
kernel_case = { step = "term", case = 1 }

[[expect]]
name = "the terminated run returned within the delay it was stopped in, not after the second helper's (≤ 1500 ms after terminate; a delay is 1000 ms)"
metric = { metric = "end_to_end", at_most_ms = 1500 }

[[expect]]
name = "the next sync ran both delays"
metric = { metric = "next_run", at_least_ms = 1950 }

[[expect]]
name = "sync exited 0"
trigger_ok = { step = "next" }

[[expect]]
name = "the test run returned the packet's length"
trigger_field = { step = "probe", field = "retval", equals = 22 }

[[expect]]
name = "no kernel WARN/BUG/oops"
dmesg_clean = {}
"#;

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn a_users_program_from_outside_the_repository_loads_runs_and_is_terminated() {
    // /var/tmp: /tmp is a private tmpfs inside the nested L1 VM.
    let dir = tempfile::Builder::new()
        .prefix("termlab-user-program.")
        .tempdir_in("/var/tmp")
        .expect("a directory under /var/tmp");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo");
    assert!(!dir.path().starts_with(repo));
    std::fs::write(dir.path().join("spin.bpf.c"), SOURCE).expect("source");
    std::fs::write(dir.path().join("note.txt"), "hello from the host\n").expect("note");
    let scenario = dir.path().join("user.toml");
    std::fs::write(&scenario, SCENARIO.replace("PACKET", PACKET_HEX)).expect("scenario");
    let results = dir.path().join("results");

    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(dir.path())
        .args(["--quiet", "run", "--results"])
        .arg(&results)
        .arg(&scenario)
        .output()
        .expect("termlab runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("termlab run took {:.1} s", started.elapsed().as_secs_f64());
    let run_dir = std::fs::read_dir(results.join("user"))
        .unwrap_or_else(|e| panic!("no results ({e}):\nstdout:\n{stdout}\nstderr:\n{stderr}"))
        .next()
        .expect("one run")
        .expect("entry")
        .path();
    let result = RunResult::load(&run_dir).expect("result.json");
    // What the guest commands printed, for a failure's message.
    let printed: Vec<String> = result
        .repetitions
        .iter()
        .flat_map(|rep| &rep.steps)
        .filter_map(|step| match step {
            StepRecord::Trigger { label, stdout, stderr, .. } => {
                Some(format!("{label}: {} {}", stdout.trim(), stderr.trim()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}\ntriggers:\n{}",
        printed.join("\n")
    );
    assert!(result.complete && result.all_expectations_passed(), "{:?}", result.expectations);
    assert_eq!(result.expectations.len(), 7);
    assert!(result.environment.vm.cmdline.ends_with(" termlab_user_test=1"));
    let steps = &result.repetitions[0].steps;
    let terminated = steps
        .iter()
        .find_map(|step| match step {
            StepRecord::Terminate { label, prog_id, cpus, .. } if label == "term" => {
                Some((*prog_id, *cpus))
            }
            _ => None,
        })
        .expect("a terminate record");
    assert_eq!(terminated.1, Some(1), "terminated on one CPU");
    // The triggers ran the program the loader loaded, and the test run ran 3 times.
    for step in steps {
        if let StepRecord::Trigger { label, fields, exit_code, .. } = step {
            assert_eq!(*exit_code, Some(0), "{label}");
            if label == "probe" {
                assert_eq!(fields.get("repeat").map(String::as_str), Some("3"));
                assert_ne!(fields.get("prog_id"), Some(&terminated.0.to_string()));
            } else {
                assert_eq!(fields.get("prog_id"), Some(&terminated.0.to_string()), "{label}");
            }
        }
    }
    // `dir` is removed on drop, results and all.
}
