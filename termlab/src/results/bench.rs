//! `bench.json`: the versioned record of one `termlab bench`, written by
//! [`crate::bench`] and rendered by [`crate::report`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{load_versioned, write_atomically, HostInfo, KernelInfo, ResultsError};
use crate::stats::{Ratios, Summary};

/// Bumped on every incompatible change of [`BenchResult`].
pub const SCHEMA_VERSION: u32 = 4;
pub const BENCH_FILE: &str = "bench.json";

/// One latency configuration: which case, how deep, on how many CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyConfig {
    pub case: u32,
    pub depth: u32,
    pub cpus: u32,
}

impl LatencyConfig {
    pub fn name(self) -> String {
        format!("case{}-depth{}-cpus{}", self.case, self.depth, self.cpus)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchResult {
    pub schema_version: u32,
    pub started_at: String,
    pub host: HostInfo,
    /// Whether the VMs ran inside the nested L1 VM (absolute times emulated).
    pub nested: bool,
    pub patched_kernel: KernelInfo,
    pub baseline_kernel: KernelInfo,
    pub latency: Vec<LatencySeries>,
    pub fastpath: Vec<FastpathSeries>,
    /// The fast path in instructions (`guest-kernel/fastpath-count --icount --json`):
    /// what the timed series above cannot blur. `None` where it was not counted.
    pub fastpath_instructions: Option<FastpathInstructions>,
    pub load: Vec<LoadSeries>,
    /// VMs that the emulated host failed under (nested: a vCPU triple-faulted). What such a
    /// VM had not finished was measured again in a fresh VM: the latency series it had
    /// completed are kept (with its IPI reference), its unfinished series and round are not.
    pub emulated_host_failures: Vec<EmulatedHostFailure>,
}

/// A VM of the benchmark that ended in a triple fault inside the nested L1 VM (README,
/// open problems: the emulated nested paging), and what it was doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatedHostFailure {
    /// The benchmark's part that VM ran ("latency, 5 vCPUs", "round 3, patched").
    pub part: String,
    /// Its console log, kept beside bench.json under this name.
    pub console: String,
    /// termlab's error, first line.
    pub error: String,
}

/// What `CONFIG_BPF_TERMINATION` adds to a run, in instructions, patched against the
/// baseline kernel: from the disassembly of one function that runs programs, and as
/// executed, counted by QEMU's `-icount` clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastpathInstructions {
    /// The disassembled function (`trace_call_bpf`, where the run's entry and exit inline).
    pub function: String,
    pub noterm_instructions: u32,
    pub patched_instructions: u32,
    /// Instructions of the patched function that touch the feature's state.
    pub feature_instructions: u32,
    pub added_lock_prefixed: i32,
    pub pushf: u32,
    /// Per `term_bench fastpath` program: instructions executed per run.
    pub executed_per_run: std::collections::BTreeMap<String, ExecutedPerRun>,
}

/// Instructions one run of a program executes, to a tenth (a million runs counted).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutedPerRun {
    pub patched: f64,
    pub noterm: f64,
    pub added: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySeries {
    pub config: LatencyConfig,
    /// The VM's vCPUs: one terminates (and runs the agent), `cpus` run.
    pub vcpus: u8,
    /// Bare IPI round trips (membarrier) in the same VM, ns: the reference
    /// of this series' ratios.
    pub ipi_rtt_ns: Vec<f64>,
    pub iterations: u32,
    /// Terminate calls that did not stop every runner (it had not entered yet).
    pub missed: u32,
    /// Kernel timestamps: request → last handler done.
    pub mechanism_ns: Vec<f64>,
    /// Request → last terminated run returned.
    pub end_to_end_ns: Vec<f64>,
    /// Case 1: interrupted helper returned → run returned.
    pub case1_tail_ns: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastpathSeries {
    pub program: String,
    /// ns per run, one sample per round.
    pub patched_ns: Vec<f64>,
    pub baseline_ns: Vec<f64>,
    /// The patched kernel with a runtime budget set (kernel.bpf_max_runtime_ms
    /// = 60000, never reached): what the budget check adds per run.
    pub patched_budget_ns: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSeries {
    pub insns: u32,
    /// Median load time of each round, ns.
    pub patched_load_ns: Vec<f64>,
    pub baseline_load_ns: Vec<f64>,
    pub patched_jited_bytes: u64,
    pub patched_copy_jited_bytes: u64,
    pub baseline_jited_bytes: u64,
}

impl BenchResult {
    /// Reads `dir/bench.json`, migrating an older schema version in memory;
    /// also returns the version the file had.
    pub fn load_with_version(dir: &Path) -> Result<(BenchResult, u32), ResultsError> {
        load_versioned(&dir.join(BENCH_FILE), SCHEMA_VERSION, migrate_bench_result)
    }

    /// Writes `dir/bench.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ResultsError> {
        let path = dir.join(BENCH_FILE);
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|source| ResultsError::Parse { path: path.clone(), source })?;
        text.push(b'\n');
        write_atomically(&path, &text)
    }
}

/// One step of [`BenchResult`]'s schema history, `from` → `from + 1`:
/// 1 → 2 (4ebf587) added the fast path with a runtime budget set
/// (`patched_budget_ns`), not measured before: empty; 2 → 3 added the fast path in
/// instructions (`fastpath_instructions`), not counted before: null; 3 → 4 added the VMs
/// the emulated host failed under (`emulated_host_failures`), which ended the run before: none.
fn migrate_bench_result(document: &mut serde_json::Value, from: u32) -> Result<(), String> {
    match from {
        1 => {
            let series = document.get_mut("fastpath").and_then(|f| f.as_array_mut());
            for one in series.into_iter().flatten().filter_map(|s| s.as_object_mut()) {
                one.entry("patched_budget_ns").or_insert_with(|| serde_json::json!([]));
            }
            Ok(())
        }
        2 => {
            document
                .as_object_mut()
                .ok_or("bench.json is not an object")?
                .entry("fastpath_instructions")
                .or_insert(serde_json::Value::Null);
            Ok(())
        }
        3 => {
            document
                .as_object_mut()
                .ok_or("bench.json is not an object")?
                .entry("emulated_host_failures")
                .or_insert_with(|| serde_json::json!([]));
            Ok(())
        }
        _ => Err(format!("bench.json schema version {from} was never written by termlab")),
    }
}

/// Median of `samples`, for the headline tables.
pub fn median(samples: &[f64]) -> Option<f64> {
    Summary::of(samples).map(|s| s.p50_ns)
}

/// Summary and ratios to the median IPI round trip.
pub fn summarize(samples: &[f64], ipi_ns: Option<f64>) -> Option<(Summary, Option<Ratios>)> {
    let summary = Summary::of(samples)?;
    let ratios = ipi_ns.and_then(|ipi| summary.ratios_to(ipi));
    Some((summary, ratios))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Today's example as an older `version` wrote it (`edit` takes out what came later),
    /// loaded back: the migrated result and the version the file had.
    fn example_as_written_by(
        version: u32,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> (BenchResult, u32) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results/example/bench");
        let text = std::fs::read_to_string(dir.join(BENCH_FILE)).expect("bench.json");
        let mut document: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        document["schema_version"] = version.into();
        edit(&mut document);
        let scratch = tempfile::tempdir().expect("temp dir");
        std::fs::write(scratch.path().join(BENCH_FILE), document.to_string()).expect("written");
        BenchResult::load_with_version(scratch.path()).expect("migrated")
    }

    #[test]
    fn a_schema_1_benchmark_is_migrated_without_budget_samples() {
        let (result, found) = example_as_written_by(1, |document| {
            for series in document["fastpath"].as_array_mut().expect("fastpath") {
                series.as_object_mut().expect("object").remove("patched_budget_ns");
            }
            let top = document.as_object_mut().expect("object");
            top.remove("fastpath_instructions");
            top.remove("emulated_host_failures");
        });
        assert_eq!((found, result.schema_version), (1, SCHEMA_VERSION));
        assert!(!result.fastpath.is_empty());
        assert!(result.fastpath.iter().all(|s| s.patched_budget_ns.is_empty()));
        assert!(result.fastpath.iter().all(|s| !s.patched_ns.is_empty()));
        assert_eq!(result.fastpath_instructions, None);
    }

    #[test]
    fn a_schema_3_benchmark_is_migrated_without_failed_vms() {
        let (result, found) = example_as_written_by(3, |document| {
            document.as_object_mut().expect("object").remove("emulated_host_failures");
        });
        assert_eq!((found, result.schema_version), (3, SCHEMA_VERSION));
        assert!(result.emulated_host_failures.is_empty());
        assert!(!result.latency.is_empty());
    }
}
