//! `results/<scenario>/<timestamp>/result.json`: the versioned record of one
//! run, written atomically so a reader never sees a half-written file, and
//! the other records termlab keeps ([`bench`]: bench.json).
//!
//! This is the bottom layer: plain data, their file format and schema
//! history. It depends on nothing of termlab's but [`crate::stats`]; the
//! modules above build these records ([`crate::engine`],
//! [`crate::kernel_trace`], [`crate::stack_proof`], [`crate::bench`]) or
//! read them ([`crate::evaluate`], [`crate::report`], [`crate::compare`]).

pub mod bench;
pub mod kernel;
pub mod stack;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::stats::{Ratios, Summary};
use kernel::KernelTermination;
use stack::CpuStackProof;

/// Bumped on every incompatible change of [`RunResult`].
pub const SCHEMA_VERSION: u32 = 3;

pub const RESULT_FILE: &str = "result.json";
pub const CONSOLE_FILE: &str = "console.log";

/// Name of the built-in metric: host request → agent reply (`clock` op).
pub const AGENT_RTT_METRIC: &str = "agent_rtt";
/// Name of the built-in metric: bare IPI round trip in the guest.
pub const IPI_RTT_METRIC: &str = "ipi_rtt";

#[derive(Debug, Error)]
pub enum ResultsError {
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a termlab result: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has schema version {found}, newer than this termlab reads ({current}); use a newer termlab", path.display())]
    Newer { path: PathBuf, found: u32, current: u32 },
    #[error("{} has schema version {found}, which cannot be migrated: {why}", path.display())]
    Unmigratable { path: PathBuf, found: u32, why: String },
}

/// Reads a versioned JSON file (`schema_version` at the top level) written
/// by this termlab or an older one: `migrate(document, version)` turns a
/// document of `version` into `version + 1` (or says why it cannot), and is
/// applied until the document has version `current`.
///
/// Returns the value and the version the file had.
pub fn load_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    current: u32,
    migrate: fn(&mut serde_json::Value, u32) -> Result<(), String>,
) -> Result<(T, u32), ResultsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ResultsError::Read { path: path.to_owned(), source })?;
    let parse_error = |source| ResultsError::Parse { path: path.to_owned(), source };
    let mut document: serde_json::Value = serde_json::from_str(&text).map_err(parse_error)?;
    if !document.is_object() {
        return Err(parse_error(serde::de::Error::custom("the file is not a JSON object")));
    }
    // The version first, so an old file gets a clear message rather than a
    // complaint about some field.
    #[derive(Deserialize)]
    struct Version {
        schema_version: u32,
    }
    let found = Version::deserialize(&document).map_err(parse_error)?.schema_version;
    if found > current {
        return Err(ResultsError::Newer { path: path.to_owned(), found, current });
    }
    for version in found..current {
        migrate(&mut document, version).map_err(|why| ResultsError::Unmigratable {
            path: path.to_owned(),
            found,
            why,
        })?;
        document["schema_version"] = serde_json::Value::from(version + 1);
    }
    let value = T::deserialize(document).map_err(parse_error)?;
    Ok((value, found))
}

/// One step of [`RunResult`]'s schema history, `from` → `from + 1`:
///
/// * 0 never existed.
/// * 1 → 2 (ffa7665) added `kernel` to terminate steps, optional: nothing to
///   do, except that files written before b76ca33 hold `wait_until` steps,
///   which later termlabs replaced by `wait_trace` with other fields.
/// * 2 → 3 (4ebf587) added `reason` (request or budget) to the kernel's
///   record of a termination; schema 2 knew only requests. The other
///   additions (budget and prog_info steps, `kernel` on triggers) are
///   optional.
fn migrate_run_result(document: &mut serde_json::Value, from: u32) -> Result<(), String> {
    match from {
        1 => {
            if steps_mut(document).any(|step| step["kind"] == "wait_until") {
                return Err("it has `wait_until` steps (polling, replaced by `wait_trace` in \
                     b76ca33); termlab at commit 1455792 reads it"
                    .to_owned());
            }
            Ok(())
        }
        2 => {
            for step in steps_mut(document).filter(|step| step["kind"] == "terminate") {
                if let Some(kernel) = step.get_mut("kernel").and_then(|k| k.as_object_mut()) {
                    kernel.insert("reason".to_owned(), "request".into());
                }
            }
            Ok(())
        }
        _ => Err(format!("schema version {from} was never written by termlab")),
    }
}

/// Every step record of every repetition of a result.json document.
fn steps_mut(document: &mut serde_json::Value) -> impl Iterator<Item = &mut serde_json::Value> {
    document.get_mut("repetitions").and_then(|r| r.as_array_mut()).into_iter().flatten().flat_map(
        |repetition| {
            repetition.get_mut("steps").and_then(|s| s.as_array_mut()).into_iter().flatten()
        },
    )
}

/// Everything one `termlab run` of one scenario produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunResult {
    pub schema_version: u32,
    /// False while running and for runs that stopped early; then
    /// `incomplete_reason` says why.
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete_reason: Option<String>,
    pub scenario: ScenarioRecord,
    /// RFC 3339, UTC.
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    pub environment: Environment,
    pub repetitions: Vec<Repetition>,
    /// Repetitions that tested nothing and were run again (see `engine::premise`): a
    /// terminate step's request reached the kernel after the run it was meant for had ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub void_repetitions: Vec<VoidRepetition>,
    /// Per metric, over all repetitions; see [`RunResult::summarize`].
    pub summary: Vec<MetricSummary>,
    pub expectations: Vec<ExpectationOutcome>,
    /// Where the run's time went, host wall clock (absent in runs before 2026-12-04).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<PhaseTimings>,
}

/// The record of trigger step `label` among a repetition's `steps`.
pub fn trigger_record<'a>(steps: &'a [StepRecord], label: &str) -> Option<&'a StepRecord> {
    steps.iter().find(|step| matches!(step, StepRecord::Trigger { label: l, .. } if l == label))
}

/// A repetition that tested nothing, and why; the repetition run in its place has its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidRepetition {
    pub index: u32,
    pub reason: String,
}

/// Where one scenario's run spent its time, in host seconds (`termlab run --timings` prints
/// them). Phases not reached (a run cut short) stay 0 or empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseTimings {
    /// Finding the kernel and the guest image, making the results directory.
    pub prepare_s: f64,
    /// The VMM's start until the guest agent's hello.
    pub boot_s: f64,
    /// Sysctls, program loaders, trace events and the stack probe's lookups.
    pub setup_s: f64,
    /// Each repetition, in order.
    pub repetitions_s: Vec<f64>,
    /// The kernel log, the expectations and powering the VM off.
    pub teardown_s: f64,
    /// The whole run of the scenario.
    pub total_s: f64,
}

impl PhaseTimings {
    /// One line: `boot 3.8 s, setup 1.2 s, 10 repetitions 30.1 s (2.9-3.2 s), ...`.
    pub fn line(&self) -> String {
        // Summed from +0.0: an empty sum of f64 is -0.0.
        let repetitions = self.repetitions_s.iter().fold(0.0, |sum, s| sum + s);
        let range = match (
            self.repetitions_s.iter().copied().reduce(f64::min),
            self.repetitions_s.iter().copied().reduce(f64::max),
        ) {
            (Some(low), Some(high)) => format!(" ({low:.1}-{high:.1} s each)"),
            _ => String::new(),
        };
        format!(
            "prepare {:.2} s, boot {:.1} s, setup {:.1} s, {} repetitions {repetitions:.1} s{range}, teardown {:.1} s, total {:.1} s",
            self.prepare_s,
            self.boot_s,
            self.setup_s,
            self.repetitions_s.len(),
            self.teardown_s,
            self.total_s
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioRecord {
    pub name: String,
    pub path: String,
    pub description: String,
    /// The scenario file, verbatim.
    pub source: String,
    /// Repetitions actually requested (the file's value or `--repeat`).
    pub repetitions: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    pub termlab_version: String,
    pub host: HostInfo,
    /// Whether the VM ran inside the nested L1 VM (timings then emulated).
    pub nested: bool,
    pub vmm: VmmInfo,
    pub kernel: KernelInfo,
    pub vm: VmInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    pub hostname: String,
    pub kernel_release: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    pub variant: String,
    /// What this run calls the kernel: its variant, or for `--kernel PATH` a name made from
    /// the path; unique among the kernels of one `termlab run --kernel A --kernel B`, and the
    /// name of the kernel's results directory there. Absent in results written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_series_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// `build-info.json` of the kernel build, verbatim (`null` for a kernel without one).
    pub build_info: serde_json::Value,
    /// The kernel's bzImage (absent in results written before `--kernel PATH` existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// What the VMM booted instead of `image`: the same build's uncompressed vmlinux
    /// (guest-kernel/build leaves it beside the bzImage), which skips the bzImage's
    /// self-decompression. Absent when the bzImage booted, and in results written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_vmlinux: Option<String>,
    /// sha256 of the bzImage's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// The version string in the bzImage's setup header (`uname -a`-like:
    /// release, builder, build number and date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    /// The System.map used for symbols on the host (verify_stack), if the kernel has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_map: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub cmdline: String,
}

/// The raw record of one repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repetition {
    pub index: u32,
    pub steps: Vec<StepRecord>,
    /// Metric name → value in nanoseconds (guest clock). Built-in metrics
    /// ([`AGENT_RTT_METRIC`], [`IPI_RTT_METRIC`]) appear here too.
    pub metrics: BTreeMap<String, f64>,
    /// The VMM stopped the vCPUs around the handler to read their stacks (`verify_stack`):
    /// the guest's clock ran on meanwhile, so the timings include those stops.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vmm_stops: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepRecord {
    Trigger {
        label: String,
        argv: Vec<String>,
        exit_code: Option<i32>,
        /// CLOCK_MONOTONIC ns around the triggering syscall, from the
        /// trigger's own output line.
        start_ns: Option<u64>,
        end_ns: Option<u64>,
        /// Every `key=value` of the trigger's output line.
        fields: BTreeMap<String, String>,
        stdout: String,
        stderr: String,
        /// The kernel's trace events of the run, if it stopped the run for
        /// exceeding its runtime budget.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<KernelTermination>,
    },
    Terminate {
        label: String,
        prog_id: u32,
        flags: u32,
        via: String,
        /// Number of CPUs the program was stopped on, on success.
        cpus: Option<u32>,
        /// Symbolic errno on failure.
        errno: Option<String>,
        /// CLOCK_MONOTONIC ns just before and after the bpf() call.
        start_ns: Option<u64>,
        end_ns: Option<u64>,
        /// The kernel's trace events of this call (request, handlers,
        /// returns), when the kernel traced it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<KernelTermination>,
        /// `verify_stack`: what the VMM saw on each vCPU the handler ran on.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stack: Vec<CpuStackProof>,
        /// Host wall clock from the step's start until the request went to the agent, in ms:
        /// with `verify_stack`, pausing the VM and arming the VMM's breakpoints (absent in
        /// runs before 2026-12-06).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_before_call_ms: Option<f64>,
        /// `host_stall_ms`: how long the VMM parked the guest as the call sent its first
        /// stop interrupt, in ms of the host's clock; absent if it sent none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_stall_ms: Option<f64>,
    },
    Budget {
        label: String,
        prog_id: u32,
        ms: u32,
        /// Symbolic errno on failure.
        errno: Option<String>,
    },
    ProgInfo {
        label: String,
        prog_id: u32,
        /// The program's own runtime budget (0: the system-wide one).
        runtime_budget_ms: u32,
        /// Runs the kernel terminated so far, on request and for the budget.
        terminated_on_demand: u64,
        terminated_budget: u64,
    },
    /// An `exec` step: a guest command run through the agent.
    Exec {
        label: String,
        argv: Vec<String>,
        exit_code: Option<i32>,
        /// CLOCK_MONOTONIC ns when the agent started it and saw it end.
        start_ns: u64,
        end_ns: u64,
        stdout: String,
        stderr: String,
    },
    /// A `kmemleak` step: what the guest kernel's kmemleak reported.
    Kmemleak {
        label: String,
        /// Unreferenced objects reported (leak suspects).
        suspects: u32,
        /// The start of kmemleak's report (each suspect's address, size,
        /// comm and backtrace), empty when there was none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        report: String,
    },
    Sleep {
        requested_ms: u32,
        slept_ns: u64,
    },
    Wait {
        label: String,
    },
    WaitTrace {
        label: String,
        line: String,
        count: u32,
        waited_ns: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSummary {
    pub metric: String,
    pub summary: Summary,
    /// Relative to the median bare IPI round trip of the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_to_ipi: Option<Ratios>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectationOutcome {
    pub name: String,
    /// The check in words, e.g. `end_to_end <= 400 ms`.
    pub check: String,
    pub passed: bool,
    /// What was observed: the worst value, the errno seen, ...
    pub detail: String,
    /// Repetitions (0-based) where it failed.
    pub failed_repetitions: Vec<u32>,
}

impl RunResult {
    /// The repetitions the timings are summarized from: those in which the VMM did not stop
    /// the vCPUs (`verify_stack = "alternate"`), or all of them when every one was stopped.
    pub fn measured_repetitions(&self) -> impl Iterator<Item = &Repetition> {
        let untouched = self.repetitions.iter().any(|repetition| !repetition.vmm_stops);
        self.repetitions.iter().filter(move |repetition| !untouched || !repetition.vmm_stops)
    }

    /// Every metric's samples over the [measured repetitions](Self::measured_repetitions),
    /// in first-seen order.
    pub fn metric_samples(&self) -> Vec<(String, Vec<f64>)> {
        let mut samples: Vec<(String, Vec<f64>)> = Vec::new();
        for repetition in self.measured_repetitions() {
            for (name, &value) in &repetition.metrics {
                match samples.iter_mut().find(|(n, _)| n == name) {
                    Some((_, values)) => values.push(value),
                    None => samples.push((name.clone(), vec![value])),
                }
            }
        }
        samples
    }

    /// Recomputes `summary` from the raw repetitions.
    pub fn summarize(&mut self) {
        let samples = self.metric_samples();
        let ipi_median = samples
            .iter()
            .find(|(name, _)| name == IPI_RTT_METRIC)
            .and_then(|(_, values)| Summary::of(values))
            .map(|s| s.p50_ns);
        self.summary = samples
            .iter()
            .filter_map(|(name, values)| {
                let summary = Summary::of(values)?;
                let ratio_to_ipi = ipi_median.and_then(|ipi| summary.ratios_to(ipi));
                Some(MetricSummary { metric: name.clone(), summary, ratio_to_ipi })
            })
            .collect();
    }

    pub fn all_expectations_passed(&self) -> bool {
        self.complete && self.expectations.iter().all(|e| e.passed)
    }

    /// Reads `dir/result.json`, migrating an older schema version to
    /// [`SCHEMA_VERSION`] in memory.
    pub fn load(dir: &Path) -> Result<RunResult, ResultsError> {
        Ok(RunResult::load_with_version(dir)?.0)
    }

    /// [`RunResult::load`], also returning the schema version of the file.
    pub fn load_with_version(dir: &Path) -> Result<(RunResult, u32), ResultsError> {
        load_versioned(&dir.join(RESULT_FILE), SCHEMA_VERSION, migrate_run_result)
    }

    /// Writes `result.json` into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ResultsError> {
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|source| ResultsError::Parse { path: dir.join(RESULT_FILE), source })?;
        json.push(b'\n');
        write_atomically(&dir.join(RESULT_FILE), &json)
    }
}

/// Writes a temporary file next to `path`, syncs it and renames it over
/// `path`: readers see the old content or the new one, never a mix, also
/// when the run is interrupted.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), ResultsError> {
    let error = |source| ResultsError::Write { path: path.to_owned(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        // Best effort: the temporary may not exist if create() failed.
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(error)
}

/// `results/<scenario>/<UTC timestamp>/`, created; a second run in the same
/// second gets a `-2`, `-3`, ... suffix instead of mixing files.
pub fn create_run_dir(
    results_root: &Path,
    scenario: &str,
    started: std::time::SystemTime,
) -> Result<PathBuf, ResultsError> {
    let stamp = humantime::format_rfc3339_seconds(started).to_string().replace(':', "");
    let parent = results_root.join(scenario);
    std::fs::create_dir_all(&parent)
        .map_err(|source| ResultsError::Write { path: parent.clone(), source })?;
    let mut attempt = 1u32;
    loop {
        let name = if attempt == 1 { stamp.clone() } else { format!("{stamp}-{attempt}") };
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
            Err(source) => return Err(ResultsError::Write { path: dir, source }),
        }
    }
}

/// Creates `dir`, which must not exist yet (its parent must): a run never
/// writes into another's directory.
pub fn create_new_dir(dir: &Path) -> Result<PathBuf, ResultsError> {
    std::fs::create_dir(dir)
        .map(|()| dir.to_owned())
        .map_err(|source| ResultsError::Write { path: dir.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::kernel::Reason;
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// A scratch directory holding `document` as result.json.
    fn with_result(document: &serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(RESULT_FILE), document.to_string()).expect("written");
        dir
    }

    fn fixture_json(name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(fixture(name).join(RESULT_FILE)).expect("fixture");
        serde_json::from_str(&text).expect("JSON")
    }

    #[test]
    fn a_schema_2_run_is_migrated_and_its_terminations_were_requests() {
        // The loops example as termlab wrote it in schema 2 (commit c0a17fd).
        let (result, found) =
            RunResult::load_with_version(&fixture("schema2-loops")).expect("migrated");
        assert_eq!(found, 2);
        assert_eq!(result.schema_version, SCHEMA_VERSION);
        assert_eq!(result.repetitions.len(), 10);
        let reasons: Vec<Reason> = result
            .repetitions
            .iter()
            .flat_map(|r| &r.steps)
            .filter_map(|step| match step {
                StepRecord::Terminate { kernel, .. } => kernel.as_ref().map(|k| k.reason),
                _ => None,
            })
            .collect();
        assert_eq!(reasons, vec![Reason::Request; 10]);
        // Saved in today's schema, it reads back as it is.
        let dir = tempfile::tempdir().expect("temp dir");
        result.save(dir.path()).expect("saved");
        let (again, found) = RunResult::load_with_version(dir.path()).expect("loads");
        assert_eq!(found, SCHEMA_VERSION);
        assert_eq!(
            serde_json::to_value(&again).expect("JSON"),
            serde_json::to_value(&result).expect("JSON")
        );
    }

    #[test]
    fn timings_come_from_the_repetitions_the_vmm_did_not_stop() {
        let mut result = RunResult::load(&fixture("schema2-loops")).expect("loads");
        let untouched_max = |result: &RunResult| {
            let summary = result.summary.iter().find(|m| m.metric == "end_to_end").expect("metric");
            (summary.summary.n, summary.summary.max_ns)
        };
        result.summarize();
        let (all, _) = untouched_max(&result);
        assert_eq!(all, 10);
        // verify_stack = "alternate": the even repetitions were stopped, their times inflated.
        let mut expected_max = 0.0f64;
        for rep in &mut result.repetitions {
            rep.vmm_stops = rep.index.is_multiple_of(2);
            let value = rep.metrics.get_mut("end_to_end").expect("end_to_end");
            if rep.vmm_stops {
                *value += 40e6;
            } else {
                expected_max = expected_max.max(*value);
            }
        }
        result.summarize();
        assert_eq!(untouched_max(&result), (5, expected_max));
        // Every repetition stopped: there is nothing else to summarize, so all count.
        for rep in &mut result.repetitions {
            rep.vmm_stops = true;
        }
        result.summarize();
        assert_eq!(untouched_max(&result).0, 10);
    }

    #[test]
    fn schema_1_migrates_unless_it_polled_with_wait_until() {
        // Schema 1 had no kernel records: the fixture without them.
        let mut document = fixture_json("schema2-loops");
        document["schema_version"] = 1.into();
        for step in steps_mut(&mut document) {
            step.as_object_mut().expect("object").remove("kernel");
        }
        let dir = with_result(&document);
        let (result, found) = RunResult::load_with_version(dir.path()).expect("migrated");
        assert_eq!((found, result.repetitions.len()), (1, 10));

        let first_step = &mut document["repetitions"][0]["steps"][0];
        *first_step = serde_json::json!({
            "kind": "wait_until", "program": "loops", "polls": 3, "matched": "x"
        });
        let dir = with_result(&document);
        let error = RunResult::load(dir.path()).expect_err("not migratable");
        assert!(matches!(error, ResultsError::Unmigratable { found: 1, .. }), "{error}");
        assert!(error.to_string().contains("1455792"), "{error}");
    }

    #[test]
    fn newer_versions_and_non_results_are_refused_clearly() {
        let mut document = fixture_json("schema2-loops");
        document["schema_version"] = (SCHEMA_VERSION + 1).into();
        let dir = with_result(&document);
        let error = RunResult::load(dir.path()).expect_err("too new");
        assert!(error.to_string().contains("newer than this termlab reads"), "{error}");
        for text in ["[3]", "{\"schema_version\": \"three\"}", "not json"] {
            let dir = tempfile::tempdir().expect("temp dir");
            std::fs::write(dir.path().join(RESULT_FILE), text).expect("written");
            let error = RunResult::load(dir.path()).expect_err("not a result");
            assert!(matches!(error, ResultsError::Parse { .. }), "{text}: {error}");
        }
        let error = RunResult::load(Path::new("/nonexistent")).expect_err("no file");
        assert!(matches!(error, ResultsError::Read { .. }), "{error}");
    }
}
