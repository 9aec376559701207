//! Executing one repetition's steps against the guest agent.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use termlab_protocol::client::{Client, ClientError};
use termlab_protocol::{
    ErrorKind, ExitStatus, RunRequest, SpawnRequest, SyscallResult, TerminateRequest,
};

use super::stack_probe::{RepetitionProbe, Watch, Watched};
use super::{EngineError, Invariant};
use crate::cancel::Cancel;
use crate::kernel_trace::{self, TraceEvent};
use crate::results::StepRecord;
use crate::scenario::{
    guest_loader_path, guest_object_path, guest_test_data_path, BudgetStep, Errno, ExecStep,
    KmemleakStep, Label, ProgInfoStep, ProgramSpec, Scenario, SleepStep, Step, TerminateBy,
    TerminateStep, TerminateVia, TriggerStep, WaitTraceStep, GUEST_LOADER,
};

/// The kernel trace buffer, read by the agent through trace_pipe (see
/// `WaitTraceStep`). Reads are non-blocking (the agent opens files with
/// O_NONBLOCK) and consuming, so everything read is kept here and offsets
/// into it mark "after this trigger started".
#[derive(Default)]
pub struct TraceReader {
    text: String,
}

const TRACE_PIPE: &str = "/sys/kernel/tracing/trace_pipe";
/// More than the trace buffer holds, so nothing read is dropped.
const TRACE_READ_BYTES: u64 = 8 << 20;
/// Longest wait of one read for new trace lines (the agent answers as soon as any come):
/// how soon Ctrl-C is noticed while a scenario waits for a line.
const TRACE_WAIT_SLICE: Duration = Duration::from_millis(250);

impl TraceReader {
    /// Reads what the buffer holds now, or when it is empty what comes within `wait` (the
    /// agent polls trace_pipe: no request every few milliseconds, which under nested
    /// emulation kept a host CPU busy); returns how many bytes came.
    fn read_available(
        &mut self,
        client: &mut Client<UnixStream>,
        wait: Duration,
    ) -> Result<usize, EngineError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let contents = client
            .read_file_waiting(TRACE_PIPE, TRACE_READ_BYTES, wait_ms)
            .map_err(agent("reading the kernel trace buffer (is tracefs mounted?)"))?;
        let text = contents.data.to_string_lossy();
        self.text.push_str(&text);
        Ok(text.len())
    }

    /// Everything written so far has been read: the offset new lines start at.
    pub fn drain(&mut self, client: &mut Client<UnixStream>) -> Result<usize, EngineError> {
        while self.read_available(client, Duration::ZERO)? > 0 {}
        Ok(self.text.len())
    }

    /// What was read from `offset` (a value `drain` returned) on.
    pub fn since(&self, offset: usize) -> &str {
        self.text.get(offset..).unwrap_or_default()
    }

    /// Waits until `count` lines after `from` contain `needle`.
    fn wait_for(
        &mut self,
        client: &mut Client<UnixStream>,
        needle: &str,
        count: u32,
        from: usize,
        deadline: Instant,
        cancel: &Cancel,
    ) -> Result<(), EngineError> {
        loop {
            let found = self.text[from..].lines().filter(|line| line.contains(needle)).count();
            if found >= count as usize {
                return Ok(());
            }
            if cancel.is_cancelled() {
                return Err(EngineError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EngineError::TraceLinesMissing {
                    needle: needle.to_owned(),
                    found,
                    wanted: count,
                });
            }
            self.read_available(client, left.min(TRACE_WAIT_SLICE))?;
        }
    }
}

/// A program the loader has loaded: its spec, kernel id and kernel name
/// (as the loader printed it: `prog_name=`).
pub struct LoadedProgram<'a> {
    pub spec: &'a ProgramSpec,
    pub prog_id: u32,
    pub kernel_name: Option<String>,
}

impl LoadedProgram<'_> {
    /// The kernel's name of the program, for `bpftool prog terminate name`.
    fn bpf_name(&self) -> Option<&str> {
        match &self.spec.bpf_name {
            Some(name) => Some(name.get_ref().as_str()),
            None => self.kernel_name.as_deref(),
        }
    }
}

fn find_program<'p, 'a>(
    programs: &'p [LoadedProgram<'a>],
    name: &Label,
) -> Option<&'p LoadedProgram<'a>> {
    programs.iter().find(|p| p.spec.name.get_ref() == name)
}

/// The guest argv that loads `spec`, prints `prog_id=N` and stays: the
/// program's own loader, or the generic one for an `object` or `source`,
/// which also loads the functions in `also` (the programs `loaded_by` it).
pub fn loader_argv(spec: &ProgramSpec, also: &[&str]) -> Vec<String> {
    if let Some(loader) = &spec.loader {
        return loader.get_ref().as_slice().to_vec();
    }
    if spec.loader_source.is_some() {
        return vec![guest_loader_path(spec.name.get_ref())];
    }
    let mut argv =
        vec![GUEST_LOADER.to_owned(), "load".to_owned(), guest_object_path(spec.name.get_ref())];
    if let Some(function) = &spec.function {
        argv.extend(["--prog".to_owned(), function.get_ref().clone()]);
    }
    for function in also {
        argv.extend(["--also".to_owned(), (*function).to_owned()]);
    }
    if !spec.attaches() {
        argv.push("--no-attach".to_owned());
    }
    if let Some(cgroup) = &spec.cgroup {
        argv.extend(["--cgroup".to_owned(), cgroup.get_ref().clone()]);
    }
    for (option, interface) in [("--xdp", &spec.xdp), ("--tc", &spec.tc)] {
        if let Some(interface) = interface {
            argv.extend([option.to_owned(), interface.get_ref().clone()]);
        }
    }
    argv
}

/// A trigger running in the background.
struct Background {
    handle: u32,
    argv: Vec<String>,
    /// Its program's `summary_line`.
    summary_line: String,
    timeout_ms: u32,
    /// When the agent started it (guest clock).
    start_ns: u64,
    prog_id: u32,
}

/// When a step started, on the host clock, for `sleep = { after = ... }`.
type StartedAt = BTreeMap<Label, Instant>;

fn agent(what: impl Into<String>) -> impl FnOnce(ClientError) -> EngineError {
    let what = what.into();
    move |source| EngineError::Agent { what, source }
}

/// What one step left behind before the repetition's kernel trace is read.
/// Trigger runs and terminate calls become records only then, complete with
/// the kernel's events of their run ([`StepOutcome::into_record`]).
enum StepOutcome {
    /// A record the kernel's trace adds nothing to.
    Complete(StepRecord),
    Trigger(TriggerRun),
    Terminate(TerminateCall),
}

impl StepOutcome {
    /// The step's record; `events` are the kernel's `bpf:` trace events of
    /// the repetition, `None` when the scenario does not trace them.
    fn into_record(self, events: Option<&[TraceEvent]>) -> StepRecord {
        match self {
            StepOutcome::Complete(record) => record,
            StepOutcome::Trigger(run) => run.into_record(events),
            StepOutcome::Terminate(call) => call.into_record(events),
        }
    }
}

/// Runs every step once; returns the complete records in step order (with
/// the kernel's events of each termination when the scenario traces them).
/// `step_done` hears how long each step took, by its description
/// ([`describe_step`]).
pub fn run_repetition(
    client: &mut Client<UnixStream>,
    scenario: &Scenario,
    programs: &[LoadedProgram<'_>],
    trace: &mut TraceReader,
    probe: Option<RepetitionProbe<'_, '_>>,
    step_done: &dyn Fn(&str, Duration),
    cancel: &Cancel,
) -> Result<Vec<StepRecord>, EngineError> {
    // Where this repetition's kernel events start in the trace.
    let repetition_from = if crate::scenario::traces_terminations(scenario) {
        Some(trace.drain(client)?)
    } else {
        None
    };
    let mut run = RepetitionRun {
        client,
        programs,
        trace,
        cancel,
        uses_trace: crate::scenario::uses_trace(scenario),
        outcomes: Vec::new(),
        trace_from: BTreeMap::new(),
        background: BTreeMap::new(),
        started: BTreeMap::new(),
    };
    for step in &scenario.steps {
        if cancel.is_cancelled() {
            return Err(EngineError::Interrupted);
        }
        let step_began = Instant::now();
        run.step(step, probe)?;
        step_done(&describe_step(step), step_began.elapsed());
    }
    run.finish(repetition_from)
}

/// One repetition's steps as they run: the agent, what the steps started and what they left.
struct RepetitionRun<'a, 'p> {
    client: &'a mut Client<UnixStream>,
    programs: &'a [LoadedProgram<'p>],
    trace: &'a mut TraceReader,
    cancel: &'a Cancel,
    uses_trace: bool,
    outcomes: Vec<StepOutcome>,
    /// Trace offset when each background trigger started.
    trace_from: BTreeMap<Label, usize>,
    background: BTreeMap<Label, Background>,
    started: StartedAt,
}

impl RepetitionRun<'_, '_> {
    fn program(&self, name: &Label) -> Result<&LoadedProgram<'_>, Invariant> {
        find_program(self.programs, name)
            .ok_or_else(|| Invariant::ProgramNotLoaded { step: "program", label: name.to_string() })
    }

    fn step(
        &mut self,
        step: &Step,
        probe: Option<RepetitionProbe<'_, '_>>,
    ) -> Result<(), EngineError> {
        match step {
            Step::Trigger(trigger) if trigger.background => self.start_trigger(trigger),
            Step::Trigger(trigger) => self.run_trigger(trigger),
            Step::Sleep(sleep) => self.sleep(sleep),
            Step::Wait(wait) => self.wait(wait.step.get_ref()),
            Step::WaitTrace(wait) => self.wait_trace(wait),
            Step::Exec(exec) => self.exec(exec),
            Step::Terminate(terminate) => {
                let call = terminate_step(self.client, terminate, self.programs, probe)?;
                self.started.insert(terminate.label.get_ref().clone(), Instant::now());
                self.outcomes.push(StepOutcome::Terminate(call));
                Ok(())
            }
            Step::Budget(budget) => {
                let record = budget_step(self.client, budget, self.programs)?;
                self.outcomes.push(StepOutcome::Complete(record));
                Ok(())
            }
            Step::ProgInfo(info) => {
                let prog_id = self.program(info.program.get_ref())?.prog_id;
                let record = prog_info_step(self.client, info, prog_id)?;
                self.outcomes.push(StepOutcome::Complete(record));
                Ok(())
            }
            Step::Kmemleak(scan) => {
                let record = kmemleak_step(self.client, scan)?;
                self.outcomes.push(StepOutcome::Complete(record));
                Ok(())
            }
        }
    }

    /// A background trigger: started, its output read by its `wait` step.
    fn start_trigger(&mut self, trigger: &TriggerStep) -> Result<(), EngineError> {
        let target = self.program(trigger.program.get_ref())?;
        let (argv, prog_id) = (trigger_argv(trigger, target)?, target.prog_id);
        let summary_line = target.spec.summary_line().to_owned();
        let label = trigger.label.get_ref().clone();
        if self.uses_trace {
            self.trace_from.insert(label.clone(), self.trace.drain(self.client)?);
        }
        let reply = self
            .client
            .spawn(SpawnRequest::command(argv.clone()))
            .map_err(agent(format!("starting trigger `{label}`")))?;
        self.started.insert(label.clone(), Instant::now());
        let job = Background {
            handle: reply.handle,
            argv,
            summary_line,
            timeout_ms: trigger.timeout_ms.get(),
            start_ns: reply.start_ns,
            prog_id,
        };
        self.background.insert(label, job);
        Ok(())
    }

    fn run_trigger(&mut self, trigger: &TriggerStep) -> Result<(), EngineError> {
        let target = self.program(trigger.program.get_ref())?;
        let (argv, prog_id) = (trigger_argv(trigger, target)?, target.prog_id);
        let summary_line = target.spec.summary_line().to_owned();
        let label = trigger.label.get_ref();
        let output = self
            .client
            .run(RunRequest::command(argv.clone(), trigger.timeout_ms.get().into()))
            .map_err(agent(format!("trigger `{label}`")))?;
        if output.timed_out {
            return Err(EngineError::TimedOut {
                what: format!("trigger `{label}`"),
                limit_ms: trigger.timeout_ms.get().into(),
            });
        }
        self.outcomes.push(StepOutcome::Trigger(TriggerRun::new(
            label,
            argv,
            exit_code(&output.status),
            &Printed {
                stdout: &output.stdout.data.to_string_lossy(),
                stderr: &output.stderr.data.to_string_lossy(),
                summary_line: &summary_line,
            },
            AgentTimes { start_ns: output.start_ns, end_ns: output.end_ns, prog_id },
        )));
        Ok(())
    }

    fn sleep(&mut self, sleep: &SleepStep) -> Result<(), EngineError> {
        let requested = Duration::from_millis(sleep.ms.get().into());
        let begin = Instant::now();
        let until = match &sleep.after {
            Some(after) => self.started.get(after.get_ref()).copied().unwrap_or(begin) + requested,
            None => begin + requested,
        };
        sleep_until(until, self.cancel)?;
        self.outcomes.push(StepOutcome::Complete(StepRecord::Sleep {
            requested_ms: sleep.ms.get(),
            slept_ns: begin.elapsed().as_nanos() as u64,
        }));
        Ok(())
    }

    /// The end of a background trigger, and its output.
    fn wait(&mut self, label: &Label) -> Result<(), EngineError> {
        let job = self
            .background
            .remove(label)
            .ok_or_else(|| Invariant::NotInBackground(label.to_string()))?;
        let exit = wait_for(self.client, job.handle, job.timeout_ms, label, self.cancel)?;
        let output = self
            .client
            .read_output(job.handle)
            .map_err(agent(format!("reading the output of `{label}`")))?;
        self.outcomes.push(StepOutcome::Trigger(TriggerRun::new(
            label,
            job.argv,
            exit_code(&exit.status),
            &Printed {
                stdout: &output.stdout.data.to_string_lossy(),
                stderr: &output.stderr.data.to_string_lossy(),
                summary_line: &job.summary_line,
            },
            AgentTimes { start_ns: job.start_ns, end_ns: exit.end_ns, prog_id: job.prog_id },
        )));
        self.outcomes.push(StepOutcome::Complete(StepRecord::Wait { label: label.to_string() }));
        Ok(())
    }

    fn wait_trace(&mut self, wait: &WaitTraceStep) -> Result<(), EngineError> {
        let label = wait.step.get_ref();
        let from = *self
            .trace_from
            .get(label)
            .ok_or_else(|| Invariant::NotInBackground(label.to_string()))?;
        let begin = Instant::now();
        let deadline = begin + Duration::from_millis(wait.timeout_ms.get().into());
        self.trace.wait_for(self.client, &wait.line, wait.count, from, deadline, self.cancel)?;
        self.outcomes.push(StepOutcome::Complete(StepRecord::WaitTrace {
            label: label.to_string(),
            line: wait.line.clone(),
            count: wait.count,
            waited_ns: begin.elapsed().as_nanos() as u64,
        }));
        Ok(())
    }

    /// A guest command that must succeed (fault injection, setup).
    fn exec(&mut self, exec: &ExecStep) -> Result<(), EngineError> {
        let label = exec.label.get_ref();
        let argv = exec.argv.as_slice().to_vec();
        let timeout_ms = exec.timeout_ms.get();
        let output = self
            .client
            .run(RunRequest::command(argv.clone(), timeout_ms.into()))
            .map_err(agent(format!("exec `{label}` ({argv:?})")))?;
        let stderr = output.stderr.data.to_string_lossy().into_owned();
        if output.timed_out {
            return Err(EngineError::TimedOut {
                what: format!("exec `{label}`"),
                limit_ms: timeout_ms.into(),
            });
        }
        if exit_code(&output.status) != Some(0) {
            return Err(EngineError::ExecFailed {
                label: label.to_string(),
                argv,
                status: output.status,
                stderr: stderr.trim().to_owned(),
            });
        }
        self.outcomes.push(StepOutcome::Complete(StepRecord::Exec {
            label: label.to_string(),
            argv,
            exit_code: exit_code(&output.status),
            start_ns: output.start_ns,
            end_ns: output.end_ns,
            stdout: output.stdout.data.to_string_lossy().into_owned(),
            stderr,
        }));
        Ok(())
    }

    /// The records, complete with the kernel's events since `repetition_from`.
    fn finish(self, repetition_from: Option<usize>) -> Result<Vec<StepRecord>, EngineError> {
        // Validation guarantees every background trigger is waited for; a
        // leftover here would be a bug, and must not outlive the repetition.
        if let Some((label, _)) = self.background.first_key_value() {
            let label = label.to_string();
            for job in self.background.values() {
                let _ = self.client.kill(job.handle, libc::SIGKILL);
            }
            return Err(Invariant::NeverWaited(label).into());
        }
        let events = match repetition_from {
            Some(from) => {
                self.trace.drain(self.client)?;
                Some(kernel_trace::parse(self.trace.since(from)))
            }
            None => None,
        };
        let records = self.outcomes.into_iter();
        Ok(records.map(|outcome| outcome.into_record(events.as_deref())).collect())
    }
}

/// A step in a few words, e.g. "trigger `run`", "sleep 500 ms".
pub fn describe_step(step: &Step) -> String {
    match step {
        Step::Trigger(trigger) => format!("trigger `{}`", trigger.label.get_ref()),
        Step::Sleep(sleep) => format!("sleep {} ms", sleep.ms.get()),
        Step::Wait(wait) => format!("wait `{}`", wait.step.get_ref()),
        Step::WaitTrace(wait) => format!("wait_trace `{}`", wait.step.get_ref()),
        Step::Exec(exec) => format!("exec `{}`", exec.label.get_ref()),
        Step::Terminate(terminate) => format!("terminate `{}`", terminate.label.get_ref()),
        Step::Budget(budget) => format!("budget `{}`", budget.label.get_ref()),
        Step::ProgInfo(info) => format!("prog_info `{}`", info.label.get_ref()),
        Step::Kmemleak(scan) => format!("kmemleak `{}`", scan.label.get_ref()),
    }
}

/// The trigger's argv, pinned with busybox `taskset` when it names a CPU:
/// the program's trigger command, or the generic loader's BPF_PROG_TEST_RUN.
fn trigger_argv(
    trigger: &TriggerStep,
    program: &LoadedProgram<'_>,
) -> Result<Vec<String>, EngineError> {
    let mut argv = Vec::new();
    if let Some(cpu) = &trigger.cpu {
        argv.extend(["taskset".to_owned(), "-c".to_owned(), cpu.get_ref().to_string()]);
    }
    let spec = program.spec;
    match (&spec.trigger, &spec.test_run) {
        (Some(command), _) => argv.extend(command.get_ref().as_slice().iter().cloned()),
        (None, Some(test_run)) => {
            let test_run = test_run.get_ref();
            argv.extend([
                GUEST_LOADER.to_owned(),
                "test-run".to_owned(),
                "--id".to_owned(),
                program.prog_id.to_string(),
                "--repeat".to_owned(),
                test_run.repeat.get().to_string(),
            ]);
            if let Some(hex) = &test_run.data_hex {
                argv.extend(["--data-hex".to_owned(), hex.get_ref().clone()]);
            }
            if test_run.data_file.is_some() {
                argv.extend(["--data-file".to_owned(), guest_test_data_path(spec.name.get_ref())]);
            }
        }
        (None, None) => {
            return Err(EngineError::NoTrigger { program: spec.name.get_ref().to_string() })
        }
    }
    argv.extend(trigger.args.iter().cloned());
    Ok(argv)
}

fn exit_code(status: &ExitStatus) -> Option<i32> {
    match status {
        ExitStatus::Exited { code } => Some(*code),
        ExitStatus::Signaled { .. } => None,
    }
}

/// Sleeps until `deadline` in short slices so Ctrl-C is noticed.
fn sleep_until(deadline: Instant, cancel: &Cancel) -> Result<(), EngineError> {
    loop {
        if cancel.is_cancelled() {
            return Err(EngineError::Interrupted);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Waits for a background process in half-second slices (to notice Ctrl-C).
fn wait_for(
    client: &mut Client<UnixStream>,
    handle: u32,
    timeout_ms: u32,
    label: &Label,
    cancel: &Cancel,
) -> Result<termlab_protocol::ProcessExit, EngineError> {
    const SLICE_MS: u64 = 500;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
    loop {
        if cancel.is_cancelled() {
            let _ = client.kill(handle, libc::SIGKILL);
            return Err(EngineError::Interrupted);
        }
        match client.wait(handle, SLICE_MS) {
            Ok(exit) => return Ok(exit),
            Err(error)
                if error.agent_error().is_some_and(|e| e.kind == ErrorKind::Timeout)
                    && Instant::now() < deadline =>
            {
                continue
            }
            Err(error) if error.agent_error().is_some_and(|e| e.kind == ErrorKind::Timeout) => {
                let _ = client.kill(handle, libc::SIGKILL);
                return Err(EngineError::TimedOut {
                    what: format!("trigger `{label}`"),
                    limit_ms: timeout_ms.into(),
                });
            }
            Err(error) => {
                return Err(EngineError::Agent {
                    what: format!("waiting for `{label}`"),
                    source: error,
                })
            }
        }
    }
}

/// `key=value` tokens of the first output line starting with `prefix`.
pub fn parse_fields(stdout: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let line = stdout.lines().find(|line| line.split_whitespace().next() == Some(prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|token| token.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// What the agent knows of a trigger run, for a command that prints no
/// `trigger ... start_ns=.. end_ns=..` line of its own (any guest command).
struct AgentTimes {
    /// Just before the agent started the process.
    start_ns: u64,
    /// When the agent saw it exit.
    end_ns: u64,
    prog_id: u32,
}

/// What a trigger command printed, and the first word of the line that
/// holds its `key=value` fields.
struct Printed<'a> {
    stdout: &'a str,
    stderr: &'a str,
    summary_line: &'a str,
}

/// A trigger that ran, waiting for the kernel's trace of its run.
struct TriggerRun {
    label: String,
    argv: Vec<String>,
    exit_code: Option<i32>,
    /// Guest CLOCK_MONOTONIC ns when the run started and ended.
    start_ns: u64,
    end_ns: u64,
    /// Every `key=value` of its summary line (`trigger ...` unless its
    /// program names another), with `prog_id` always.
    fields: BTreeMap<String, String>,
    stdout: String,
    stderr: String,
}

impl TriggerRun {
    /// The fields of its summary line (`trigger key=value ...`), its run's
    /// start and end from that line or else the agent's process start and
    /// exit, and its program's id (for the kernel's budget events).
    fn new(
        label: &Label,
        argv: Vec<String>,
        exit_code: Option<i32>,
        printed: &Printed<'_>,
        agent: AgentTimes,
    ) -> Self {
        let Printed { stdout, stderr, summary_line } = *printed;
        let mut fields = parse_fields(stdout, summary_line).unwrap_or_default();
        fields.entry("prog_id".to_owned()).or_insert_with(|| agent.prog_id.to_string());
        let number = |key: &str| fields.get(key).and_then(|v| v.parse::<u64>().ok());
        let (start_ns, end_ns) = match (number("start_ns"), number("end_ns")) {
            (Some(start), Some(end)) => (start, end),
            _ => (agent.start_ns, agent.end_ns),
        };
        TriggerRun {
            label: label.to_string(),
            argv,
            exit_code,
            start_ns,
            end_ns,
            fields,
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
        }
    }

    /// Its record, with the kernel's events of the run if the kernel stopped
    /// it for exceeding its runtime budget.
    fn into_record(self, events: Option<&[TraceEvent]>) -> StepRecord {
        let prog_id = self.fields.get("prog_id").and_then(|id| id.parse().ok());
        let kernel = events.zip(prog_id).and_then(|(events, prog_id)| {
            kernel_trace::find_budget_termination(events, prog_id, self.start_ns, self.end_ns)
        });
        StepRecord::Trigger {
            label: self.label,
            argv: self.argv,
            exit_code: self.exit_code,
            start_ns: Some(self.start_ns),
            end_ns: Some(self.end_ns),
            fields: self.fields,
            stdout: self.stdout,
            stderr: self.stderr,
            kernel,
        }
    }
}

/// What a BPF_PROG_TERMINATE call returned, made by the agent or bpftool.
struct TerminateReply {
    /// "agent" or "bpftool".
    via: &'static str,
    /// Number of CPUs the program was stopped on, on success.
    cpus: Option<u32>,
    /// Symbolic errno on failure.
    errno: Option<String>,
    /// Guest CLOCK_MONOTONIC ns just before and after the call.
    start_ns: u64,
    end_ns: u64,
}

/// A terminate step that was made, waiting for the kernel's trace of its call.
struct TerminateCall {
    label: String,
    request: TerminateRequest,
    reply: TerminateReply,
    /// What the VMM saw on each vCPU during the call (`verify_stack`), how long it parked
    /// the guest (`host_stall_ms`).
    watched: Watched,
    /// Host time from the step's start until the request was sent.
    host_before_call: Duration,
}

impl TerminateCall {
    /// Its record, with the kernel's events of the call when it traced it.
    fn into_record(self, events: Option<&[TraceEvent]>) -> StepRecord {
        let TerminateCall { label, request, reply, watched, host_before_call } = self;
        let kernel = events.and_then(|events| {
            kernel_trace::find_termination(events, request.prog_id, reply.start_ns, reply.end_ns)
        });
        StepRecord::Terminate {
            label,
            prog_id: request.prog_id,
            flags: request.flags,
            via: reply.via.to_owned(),
            cpus: reply.cpus,
            errno: reply.errno,
            start_ns: Some(reply.start_ns),
            end_ns: Some(reply.end_ns),
            kernel,
            stack: watched.stack,
            host_before_call_ms: Some(host_before_call.as_secs_f64() * 1e3),
            host_stall_ms: watched.host_stall.map(|stall| stall.as_secs_f64() * 1e3),
        }
    }
}

/// One terminate step; with a `probe` (verify_stack), the VMM watches the
/// kernel's handler during the call and the call carries its verdicts.
fn terminate_step(
    client: &mut Client<UnixStream>,
    step: &TerminateStep,
    programs: &[LoadedProgram<'_>],
    probe: Option<RepetitionProbe<'_, '_>>,
) -> Result<TerminateCall, EngineError> {
    let label = step.label.get_ref().to_string();
    let target = step.program.as_ref().map(|name| find_program(programs, name.get_ref()));
    let (prog_id, bpf_name) = match (target, &step.prog_id) {
        (Some(Some(program)), _) => (program.prog_id, program.bpf_name()),
        (None, Some(id)) => (*id.get_ref(), None),
        _ => return Err(Invariant::ProgramNotLoaded { step: "terminate", label }.into()),
    };
    let flags = match &step.raw_flags {
        Some(raw) => *raw.get_ref(),
        None => step.flags.iter().fold(0, |bits, flag| bits | flag.bits()),
    };
    let as_uid = step.as_uid.as_ref().map(|uid| *uid.get_ref());
    let request = TerminateRequest { prog_id, flags, as_uid };
    let began = Instant::now();
    let mut host_before_call = Duration::ZERO;
    let mut call = |client: &mut Client<UnixStream>| {
        host_before_call = began.elapsed();
        call_terminate(client, step, &request, bpf_name)
    };
    // A program without a termination copy has no instruction map (stack_probe): the
    // kernel cannot stop it, so there is no rewrite to check (a scenario terminates one to
    // show that it is refused).
    let host_stall =
        step.host_stall_ms.as_ref().map(|ms| Duration::from_millis((*ms.get_ref()).into()));
    let watching = probe.map(|RepetitionProbe { probe, stacks }| {
        (probe, Watch { stacks: stacks && probe.has_instruction_map(prog_id), host_stall })
    });
    let (reply, watched) = match watching {
        Some((probe, watch)) if watch.stacks || watch.host_stall.is_some() => {
            let (reply, watched) =
                probe.around(prog_id, watch, || call(client)).map_err(|source| {
                    EngineError::StackProbe { terminate: Some(label.clone()), source }
                })?;
            (reply?, watched)
        }
        _ => (call(client)?, Watched::default()),
    };
    Ok(TerminateCall { label, request, reply, watched, host_before_call })
}

/// Makes `request` the way the step says: through the agent, or with
/// bpftool (naming the program by its id or, as the step asks and when it
/// has one, by its `bpf_name`).
fn call_terminate(
    client: &mut Client<UnixStream>,
    step: &TerminateStep,
    request: &TerminateRequest,
    bpf_name: Option<&str>,
) -> Result<TerminateReply, EngineError> {
    let label = step.label.get_ref();
    match step.via {
        TerminateVia::Agent => {
            let reply =
                client.terminate(request.clone()).map_err(agent(format!("terminate `{label}`")))?;
            let (cpus, errno) = match reply.result {
                SyscallResult::Returned(n) => (u32::try_from(n).ok(), None),
                SyscallResult::Failed(info) => (None, Some(info.name)),
            };
            Ok(TerminateReply {
                via: "agent",
                cpus,
                errno,
                start_ns: reply.before_ns,
                end_ns: reply.after_ns,
            })
        }
        TerminateVia::Bpftool => {
            let mut args: Vec<String> = ["prog", "terminate"].map(String::from).to_vec();
            match (step.by, bpf_name) {
                (TerminateBy::Name, Some(name)) => {
                    args.extend(["name".to_owned(), name.to_owned()])
                }
                _ => args.extend(["id".to_owned(), request.prog_id.to_string()]),
            }
            if request.flags & crate::scenario::TerminateFlag::Detach.bits() != 0 {
                args.push("detach".to_owned());
            }
            let output = run_bpftool(
                client,
                args,
                request.as_uid,
                format!("terminate `{label}` with bpftool"),
            )?;
            let cpus = output.errno.is_none().then(|| cpus_from_bpftool(&output.stdout)).flatten();
            // bpftool's own process start/end: coarser than the agent's
            // timestamps around the bare bpf() call.
            Ok(TerminateReply {
                via: "bpftool",
                cpus,
                errno: output.errno,
                start_ns: output.start_ns,
                end_ns: output.end_ns,
            })
        }
    }
}

/// What one bpftool run in the guest printed; `errno` is set when it failed.
struct BpftoolOutput {
    stdout: String,
    errno: Option<String>,
    start_ns: u64,
    end_ns: u64,
}

/// Runs `bpftool ARGS` through the agent (as `as_uid` without capabilities
/// when given); a failure is read back as the errno its message names.
fn run_bpftool(
    client: &mut Client<UnixStream>,
    args: Vec<String>,
    as_uid: Option<u32>,
    what: String,
) -> Result<BpftoolOutput, EngineError> {
    let argv = std::iter::once("bpftool".to_owned()).chain(args).collect();
    let output = client
        .run(RunRequest { as_uid, ..RunRequest::command(argv, 10_000) })
        .map_err(agent(what))?;
    let stdout = output.stdout.data.to_string_lossy().into_owned();
    let stderr = output.stderr.data.to_string_lossy();
    let errno = (exit_code(&output.status) != Some(0)).then(|| {
        errno_from_message(&stderr)
            .unwrap_or_else(|| format!("unrecognised failure: {}", stderr.trim()))
    });
    Ok(BpftoolOutput { stdout, errno, start_ns: output.start_ns, end_ns: output.end_ns })
}

/// Sets a program's runtime budget with `bpftool prog budget`.
fn budget_step(
    client: &mut Client<UnixStream>,
    step: &BudgetStep,
    programs: &[LoadedProgram<'_>],
) -> Result<StepRecord, EngineError> {
    let label = step.label.get_ref().to_string();
    let prog_id = match (&step.program, &step.prog_id) {
        (Some(name), _) => find_program(programs, name.get_ref()).map(|p| p.prog_id),
        (None, id) => id.as_ref().map(|id| *id.get_ref()),
    };
    let prog_id = prog_id
        .ok_or_else(|| Invariant::ProgramNotLoaded { step: "budget", label: label.clone() })?;
    let ms = *step.ms.get_ref();
    let args =
        ["prog", "budget", "id", &prog_id.to_string(), &ms.to_string()].map(String::from).to_vec();
    let output = run_bpftool(
        client,
        args,
        step.as_uid.as_ref().map(|uid| *uid.get_ref()),
        format!("budget `{label}`"),
    )?;
    Ok(StepRecord::Budget { label, prog_id, ms, errno: output.errno })
}

/// kmemleak's control and report file (debugfs).
const KMEMLEAK: &str = "/sys/kernel/debug/kmemleak";
/// Lines of kmemleak's report kept in the record.
const KMEMLEAK_REPORT_LINES: usize = 60;

/// How long kmemleak waits before it reports an object (its `MSECS_MIN_AGE`:
/// younger ones are left for a later scan), with a margin.
const KMEMLEAK_MIN_AGE: &str = "5.1";

/// Has kmemleak scan twice, the second time once everything allocated before
/// the step is old enough to be reported (an object is reported once two
/// scans found no reference to it and it is 5 s old), reads its report, then
/// clears it: the next scan reports only objects that leaked after this step.
/// Without the wait, what the last few seconds of a repetition leaked (its
/// last runs) would be left for the next repetition's scan, or for none.
fn kmemleak_step(
    client: &mut Client<UnixStream>,
    step: &KmemleakStep,
) -> Result<StepRecord, EngineError> {
    let label = step.label.get_ref().to_string();
    let script = format!(
        "test -e {KMEMLEAK} || mount -t debugfs debugfs /sys/kernel/debug; \
         test -w {KMEMLEAK} || {{ echo 'no {KMEMLEAK}: the kernel lacks CONFIG_DEBUG_KMEMLEAK (the debug and full variants have it)' >&2; exit 2; }}; \
         echo scan 2>/dev/null > {KMEMLEAK} || {{ echo 'kmemleak is off in this kernel (CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF, as in the full variant): boot it with kmemleak=on ([vm] kernel_args)' >&2; exit 2; }}; \
         sleep {KMEMLEAK_MIN_AGE} && echo scan > {KMEMLEAK} && cat {KMEMLEAK} && echo clear > {KMEMLEAK}"
    );
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
    let stdout = super::guest_output(client, argv, step.timeout_ms.get().into())?.stdout;
    let suspects = stdout.lines().filter(|line| line.starts_with("unreferenced object")).count();
    let report: Vec<&str> = stdout.lines().take(KMEMLEAK_REPORT_LINES).collect();
    Ok(StepRecord::Kmemleak {
        label,
        suspects: u32::try_from(suspects).unwrap_or(u32::MAX),
        report: report.join("\n"),
    })
}

/// Reads a program's budget and termination counters from `bpftool --json prog show`.
fn prog_info_step(
    client: &mut Client<UnixStream>,
    step: &ProgInfoStep,
    prog_id: u32,
) -> Result<StepRecord, EngineError> {
    let label = step.label.get_ref().to_string();
    let args = ["--json", "prog", "show", "id", &prog_id.to_string()].map(String::from).to_vec();
    let output = run_bpftool(client, args, None, format!("prog_info `{label}`"))?;
    if let Some(errno) = output.errno {
        return Err(EngineError::ProgInfoFailed { label, prog_id, errno });
    }
    let counters =
        termination_counters(&output.stdout).ok_or_else(|| EngineError::UnexpectedOutput {
            tool: format!("prog_info `{label}`: bpftool"),
            missing: "program object".into(),
            output: output.stdout.trim().to_owned(),
        })?;
    Ok(StepRecord::ProgInfo {
        label,
        prog_id,
        runtime_budget_ms: counters.0,
        terminated_on_demand: counters.1,
        terminated_budget: counters.2,
    })
}

/// (runtime_budget_ms, on demand, by budget) of `bpftool --json prog show`'s
/// object; bpftool leaves out a budget of 0 and the counts before the first
/// termination.
fn termination_counters(json: &str) -> Option<(u32, u64, u64)> {
    let object: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    object.get("id")?;
    let number =
        |value: Option<&serde_json::Value>| value.and_then(serde_json::Value::as_u64).unwrap_or(0);
    let budget_ms = u32::try_from(number(object.get("runtime_budget_ms"))).ok()?;
    let terminated = object.get("terminated");
    Some((
        budget_ms,
        number(terminated.and_then(|t| t.get("on_demand"))),
        number(terminated.and_then(|t| t.get("budget"))),
    ))
}

/// The CPU count bpftool prints on success: the number right before "CPU".
fn cpus_from_bpftool(stdout: &str) -> Option<u32> {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    words.windows(2).find(|pair| pair[1].starts_with("CPU")).and_then(|pair| pair[0].parse().ok())
}

/// The errno whose strerror() text appears in a failure message.
fn errno_from_message(message: &str) -> Option<String> {
    Errno::ALL.into_iter().find_map(|errno| {
        // SAFETY: strerror returns a pointer to a NUL-terminated static
        // string (or a thread-local buffer) for any errno value.
        let text = unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno.code())) }
            .to_string_lossy()
            .into_owned();
        message.contains(&text).then(|| errno.name().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::DEFAULT_SUMMARY_LINE;

    #[test]
    fn trigger_line_fields_are_parsed() {
        // A line as trigger_loops prints it (guest-samples/bpf/trigger_loops.c).
        let stdout = "libbpf: noise\ntrigger prog=loops prog_id=7 start_ns=1000 end_ns=401000 duration_ns=400000 duration_ms=0 ran=1 runs=3 phase=4 first_done=1 second_done=0 exited=0\n";
        let run = TriggerRun::new(
            &Label::try_from("run".to_owned()).expect("label"),
            vec![],
            Some(0),
            &printed(stdout),
            AgentTimes { start_ns: 900, end_ns: 402000, prog_id: 7 },
        );
        assert_eq!((run.start_ns, run.end_ns), (1000, 401000));
        assert_eq!(run.fields.get("second_done").map(String::as_str), Some("0"));
        assert_eq!(run.fields.get("prog").map(String::as_str), Some("loops"));
        assert_eq!(parse_fields("no such line\n", "trigger"), None);
    }

    /// Output with the default summary line.
    fn printed(stdout: &str) -> Printed<'_> {
        Printed { stdout, stderr: "", summary_line: DEFAULT_SUMMARY_LINE }
    }

    #[test]
    fn a_program_s_summary_line_is_the_one_read() {
        let stdout = "trigger failed=9\nstress mode=all failed=0 start_ns=5 end_ns=6\n";
        let run = TriggerRun::new(
            &Label::try_from("run".to_owned()).expect("label"),
            vec![],
            Some(0),
            &Printed { stdout, stderr: "", summary_line: "stress" },
            AgentTimes { start_ns: 1, end_ns: 9, prog_id: 7 },
        );
        assert_eq!((run.start_ns, run.end_ns), (5, 6));
        assert_eq!(run.fields.get("failed").map(String::as_str), Some("0"));
        assert_eq!(run.fields.get("mode").map(String::as_str), Some("all"));
        let spec = program("name = \"p\"\nloader = [\"x\"]\nbpf_name = \"x\"\ntrigger = [\"x\"]\nsummary_line = \"stress\"");
        assert_eq!(spec.summary_line(), "stress");
        let spec = program("name = \"p\"\nloader = [\"x\"]\nbpf_name = \"x\"\ntrigger = [\"x\"]");
        assert_eq!(spec.summary_line(), DEFAULT_SUMMARY_LINE);
    }

    fn program(text: &str) -> ProgramSpec {
        let scenario = format!(
            "description = \"x\"\n[vm]\nkernel = \"default\"\n[[program]]\n{text}\n\
             [[step]]\ntrigger = {{ label = \"run\", program = \"p\", cpu = 1, args = [\"extra\"] }}\n"
        );
        let parsed = crate::scenario::parse(&scenario).unwrap_or_else(|e| panic!("{e:?}"));
        parsed.programs.into_iter().next().expect("one program")
    }

    fn first_trigger(text: &str) -> TriggerStep {
        let scenario = format!(
            "description = \"x\"\n[vm]\nkernel = \"default\"\n[[program]]\n{text}\n\
             [[step]]\ntrigger = {{ label = \"run\", program = \"p\", cpu = 1, args = [\"extra\"] }}\n"
        );
        match crate::scenario::parse(&scenario).expect("parses").steps.remove(0) {
            Step::Trigger(trigger) => trigger,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn users_programs_are_loaded_and_run_by_the_generic_loader() {
        let text = "name = \"p\"\nsource = \"p.bpf.c\"\nfunction = \"spin\"\nattach = false\n\
                    test_run = { data_hex = \"00ff\", repeat = 5 }";
        let spec = program(text);
        assert_eq!(
            loader_argv(&spec, &[]),
            [
                "/bin/bpf_loader",
                "load",
                "/lib/termlab/programs/p.bpf.o",
                "--prog",
                "spin",
                "--no-attach"
            ]
        );
        let loaded = LoadedProgram { spec: &spec, prog_id: 42, kernel_name: Some("spin".into()) };
        assert_eq!(
            trigger_argv(&first_trigger(text), &loaded).expect("argv"),
            [
                "taskset",
                "-c",
                "1",
                "/bin/bpf_loader",
                "test-run",
                "--id",
                "42",
                "--repeat",
                "5",
                "--data-hex",
                "00ff",
                "extra"
            ]
        );
        assert_eq!(loaded.bpf_name(), Some("spin"));

        let command = "name = \"p\"\nobject = \"p.bpf.o\"\ntrigger = [\"sync\"]";
        let spec = program(command);
        assert_eq!(
            loader_argv(&spec, &[]),
            ["/bin/bpf_loader", "load", "/lib/termlab/programs/p.bpf.o"]
        );
        let loaded = LoadedProgram { spec: &spec, prog_id: 42, kernel_name: None };
        assert_eq!(
            trigger_argv(&first_trigger(command), &loaded).expect("argv"),
            ["taskset", "-c", "1", "sync", "extra"]
        );
        let spec = program("name = \"p\"\nobject = \"p.bpf.o\"\nxdp = \"lab0\"\ntrigger = [\"x\"]");
        assert_eq!(
            loader_argv(&spec, &[]),
            ["/bin/bpf_loader", "load", "/lib/termlab/programs/p.bpf.o", "--xdp", "lab0"]
        );
        let spec = program("name = \"p\"\nobject = \"p.bpf.o\"\ntc = \"lab1\"\ntrigger = [\"x\"]");
        assert_eq!(
            loader_argv(&spec, &[]),
            ["/bin/bpf_loader", "load", "/lib/termlab/programs/p.bpf.o", "--tc", "lab1"]
        );
        let own =
            "name = \"p\"\nloader = [\"loops\", \"--prog\", \"loops\"]\nbpf_name = \"loops\"\n\
                   trigger = [\"trigger_loops\"]";
        let spec = program(own);
        assert_eq!(loader_argv(&spec, &[]), ["loops", "--prog", "loops"]);
        let loaded = LoadedProgram { spec: &spec, prog_id: 42, kernel_name: Some("other".into()) };
        assert_eq!(loaded.bpf_name(), Some("loops"));
    }

    #[test]
    fn a_command_trigger_without_a_timing_line_is_timed_by_the_agent() {
        let label = Label::try_from("run".to_owned()).expect("label");
        let agent = AgentTimes { start_ns: 100, end_ns: 900, prog_id: 7 };
        let run = TriggerRun::new(&label, vec!["sync".into()], Some(0), &printed(""), agent);
        assert_eq!((run.start_ns, run.end_ns), (100, 900));
        assert_eq!(run.fields.get("prog_id").map(String::as_str), Some("7"));
        // A line of its own wins, fields and all.
        let agent = AgentTimes { start_ns: 100, end_ns: 900, prog_id: 7 };
        let stdout = "trigger retval=3 start_ns=200 end_ns=300 prog_id=8\n";
        let run = TriggerRun::new(&label, vec![], Some(0), &printed(stdout), agent);
        assert_eq!((run.start_ns, run.end_ns), (200, 300));
        assert_eq!(run.fields.get("prog_id").map(String::as_str), Some("8"));
        assert_eq!(run.fields.get("retval").map(String::as_str), Some("3"));
    }

    #[test]
    fn a_trigger_record_has_the_budget_stop_of_its_own_run() {
        let events = kernel_trace::parse(kernel_trace::tests::BUDGET);
        let label = Label::try_from("run".to_owned()).expect("label");
        let run = |stdout: &str, prog_id| {
            let agent = AgentTimes { start_ns: 30_000_000_000, end_ns: 30_400_000_000, prog_id };
            TriggerRun::new(&label, vec!["trigger".into()], Some(0), &printed(stdout), agent)
        };
        let kernel = |record: StepRecord| match record {
            StepRecord::Trigger { kernel, .. } => kernel,
            other => panic!("{other:?}"),
        };
        let stopped = kernel(run("", 9).into_record(Some(&events))).expect("a budget stop");
        assert_eq!(stopped.reason, crate::results::kernel::Reason::Budget);
        assert_eq!(stopped.returned_ns(), Some(30_302_010_000));
        // The program its own line names is the one looked for.
        assert!(kernel(run("trigger prog_id=9\n", 7).into_record(Some(&events))).is_some());
        assert!(kernel(run("trigger prog_id=7\n", 9).into_record(Some(&events))).is_none());
        // A run outside the stop's window, and a scenario without the trace.
        let late = AgentTimes { start_ns: 30_500_000_000, end_ns: 30_600_000_000, prog_id: 9 };
        let late = TriggerRun::new(&label, vec![], Some(0), &printed(""), late);
        assert!(kernel(late.into_record(Some(&events))).is_none());
        assert!(kernel(run("", 9).into_record(None)).is_none());
    }

    #[test]
    fn a_terminate_record_has_the_kernel_events_of_its_call_and_its_stack_proofs() {
        // A budget stop of program 9, then a request that terminates it.
        let events = kernel_trace::parse(kernel_trace::tests::BUDGET);
        let call = |start_ns, end_ns| TerminateCall {
            label: "stop".into(),
            request: TerminateRequest { prog_id: 9, flags: 0, as_uid: None },
            reply: TerminateReply { via: "agent", cpus: Some(1), errno: None, start_ns, end_ns },
            watched: Watched {
                stack: vec![crate::results::stack::CpuStackProof {
                    vcpu: 1,
                    verdict: None,
                    error: Some("x".into()),
                    untouched: false,
                }],
                host_stall: Some(Duration::from_millis(600)),
            },
            host_before_call: Duration::from_millis(3),
        };
        match call(31_000_000_000, 31_000_040_000).into_record(Some(&events)) {
            StepRecord::Terminate {
                prog_id,
                via,
                start_ns,
                end_ns,
                kernel,
                stack,
                host_stall_ms,
                ..
            } => {
                assert_eq!((prog_id, via.as_str()), (9, "agent"));
                assert_eq!(host_stall_ms, Some(600.0));
                assert_eq!((start_ns, end_ns), (Some(31_000_000_000), Some(31_000_040_000)));
                let kernel = kernel.expect("the call's events");
                assert_eq!(kernel.reason, crate::results::kernel::Reason::Request);
                assert_eq!((kernel.request_ns, kernel.ret), (Some(31_000_000_000), Some(1)));
                assert_eq!(kernel.stopped_ns(), Some(31_000_020_000));
                assert_eq!(stack.len(), 1);
                assert_eq!(stack[0].vcpu, 1);
            }
            other => panic!("{other:?}"),
        }
        // A call that made no traced request, and a scenario without the trace.
        for record in [
            call(30_000_000_000, 30_900_000_000).into_record(Some(&events)),
            call(31_000_000_000, 31_000_040_000).into_record(None),
        ] {
            match record {
                StepRecord::Terminate { kernel, stack, .. } => {
                    assert_eq!(kernel, None);
                    assert_eq!(stack.len(), 1);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bpftool_failures_map_to_errno_names() {
        assert_eq!(
            errno_from_message("Error: failed to terminate program 7: No such process\n")
                .as_deref(),
            Some("ESRCH")
        );
        assert_eq!(
            errno_from_message("Error: get by id (4000000000): No such file or directory")
                .as_deref(),
            Some("ENOENT")
        );
        assert_eq!(errno_from_message("something else"), None);
        assert_eq!(cpus_from_bpftool("terminated program 7 on 2 CPUs\n"), Some(2));
        assert_eq!(cpus_from_bpftool("done\n"), None);
    }

    #[test]
    fn termination_counters_are_read_from_bpftool_json() {
        // As the patched bpftool prints them (guest-kernel/patches/0016).
        let json = r#"{"id":7,"type":"tracepoint","name":"helper_loop","runtime_budget_ms":300,"terminated":{"on_demand":1,"budget":4,"last_at":1795000000}}"#;
        assert_eq!(termination_counters(json), Some((300, 1, 4)));
        assert_eq!(termination_counters(r#"{"id":7,"name":"idle"}"#), Some((0, 0, 0)));
        assert_eq!(termination_counters("Error: get by id (7): No such file or directory"), None);
    }
}
