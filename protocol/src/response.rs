//! Responses: agent → host.

use serde::{Deserialize, Serialize};

use crate::Data;

/// One response line: `{"id": N|null, "ok": {...}}` or `{"id": N|null, "error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request's id; `None` (JSON null) when the request line was unusable.
    pub id: Option<u64>,
    pub outcome: Result<ResponseBody, ErrorReply>,
}

/// Successful results, tagged with the `op` of the request they answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseBody {
    Hello(HelloReply),
    Run(RunOutput),
    Spawn(SpawnReply),
    ReadOutput(ProcessOutput),
    WaitOutput(OutputMatch),
    Kill {},
    Wait(ProcessExit),
    ReadFile(FileContents),
    WriteFile(WriteReply),
    Clock(ClockReading),
    Terminate(TerminateReply),
    Shutdown {},
}

impl ResponseBody {
    /// The `op` name, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            ResponseBody::Hello(_) => "hello",
            ResponseBody::Run(_) => "run",
            ResponseBody::Spawn(_) => "spawn",
            ResponseBody::ReadOutput(_) => "read_output",
            ResponseBody::WaitOutput(_) => "wait_output",
            ResponseBody::Kill {} => "kill",
            ResponseBody::Wait(_) => "wait",
            ResponseBody::ReadFile(_) => "read_file",
            ResponseBody::WriteFile(_) => "write_file",
            ResponseBody::Clock(_) => "clock",
            ResponseBody::Terminate(_) => "terminate",
            ResponseBody::Shutdown {} => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloReply {
    pub protocol_version: u32,
    /// The agent crate's version, for result metadata.
    pub agent_version: String,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExitStatus {
    Exited { code: i32 },
    Signaled { signal: i32, name: String },
}

/// Bytes a process wrote to one stream; at most [`crate::MAX_CAPTURED_OUTPUT_BYTES`] are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturedOutput {
    pub data: Data,
    /// More was written than was kept.
    pub truncated: bool,
    /// Everything the process wrote, kept or not.
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOutput {
    pub status: ExitStatus,
    /// The deadline passed before the command finished (exited and closed its output); its
    /// process group was then killed with SIGKILL.
    pub timed_out: bool,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
    /// Guest CLOCK_MONOTONIC just before the process was started.
    pub start_ns: u64,
    /// Guest CLOCK_MONOTONIC when its exit was observed.
    pub end_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnReply {
    /// The process id, which is also its process group id.
    pub handle: u32,
    /// Guest CLOCK_MONOTONIC just before the process was started.
    pub start_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessOutput {
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
    /// `None` while the process runs.
    pub exit: Option<ProcessExit>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    #[default]
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputMatch {
    /// The first complete line containing the pattern, without its newline.
    pub line: Data,
    /// Offset just past the line's newline: pass it as `from_offset` to find the next match.
    pub end_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessExit {
    pub status: ExitStatus,
    /// Guest CLOCK_MONOTONIC when the exit was observed.
    pub end_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileContents {
    pub data: Data,
    /// The file had more than `max_bytes`.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteReply {
    pub bytes_written: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockReading {
    pub monotonic_ns: u64,
    pub realtime_ns: u64,
}

/// An errno value with its symbolic name (e.g. 22, "EINVAL").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrnoInfo {
    pub number: i32,
    pub name: String,
}

/// What a system call returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SyscallResult {
    /// A non-negative return value.
    Returned(i64),
    /// -1 with this errno.
    Failed(ErrnoInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateReply {
    /// For BPF_PROG_TERMINATE: the number of CPUs the program was stopped on, or the errno.
    pub result: SyscallResult,
    /// Guest CLOCK_MONOTONIC just before the bpf() call.
    pub before_ns: u64,
    /// Guest CLOCK_MONOTONIC just after the bpf() call returned.
    pub after_ns: u64,
}

/// What went wrong with a request (as opposed to a command or syscall that ran and failed,
/// which is reported in an `ok` result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not JSON.
    MalformedJson,
    /// JSON, but not a valid request: no id, unknown op, missing/unknown/bad fields.
    InvalidRequest,
    /// The line exceeded [`crate::MAX_REQUEST_LINE_BYTES`]; it was discarded.
    LineTooLong,
    /// `hello` with a protocol version the agent does not speak.
    VersionMismatch,
    /// No background process with this handle.
    UnknownHandle,
    /// The process has already exited (kill).
    ProcessExited,
    /// wait_output: the stream was closed, or filled the kept output, without a matching line.
    OutputEnded,
    /// The wait ran out of time.
    Timeout,
    /// run: the process outlived its time limit and the SIGKILL after it (the kernel holds
    /// it); the message says where, from /proc.
    Unkillable,
    /// An operating-system call failed (spawn, open, read, write); `errno` says which error.
    Io,
    /// The agent keeps too many background processes (none of them has exited).
    TooManyProcesses,
    /// A bug in the agent (a thread of it panicked); the agent itself keeps serving.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{kind:?}: {message}")]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<ErrnoInfo>,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorReply { kind, message: message.into(), errno: None }
    }
}

/// The wire shape, checked for "exactly one of ok/error" when converted into a [`Response`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseRepr {
    id: Option<u64>,
    #[serde(default)]
    ok: Option<ResponseBody>,
    #[serde(default)]
    error: Option<ErrorReply>,
}

impl Response {
    pub fn ok(id: u64, body: ResponseBody) -> Self {
        Response { id: Some(id), outcome: Ok(body) }
    }

    pub fn error(id: Option<u64>, error: ErrorReply) -> Self {
        Response { id, outcome: Err(error) }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> serde_json::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("id", &self.id)?;
        match &self.outcome {
            Ok(body) => map.serialize_entry("ok", body)?,
            Err(error) => map.serialize_entry("error", error)?,
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = ResponseRepr::deserialize(deserializer)?;
        let outcome = match (repr.ok, repr.error) {
            (Some(body), None) => Ok(body),
            (None, Some(error)) => Err(error),
            _ => {
                return Err(serde::de::Error::custom(
                    "a response needs exactly one of \"ok\" and \"error\"",
                ))
            }
        };
        Ok(Response { id: repr.id, outcome })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_reply() -> Vec<ResponseBody> {
        let output =
            CapturedOutput { data: "prog_id=12\n".into(), truncated: true, total_bytes: 5_000_000 };
        let killed = ExitStatus::Signaled { signal: 9, name: "SIGKILL".into() };
        vec![
            ResponseBody::Hello(HelloReply { protocol_version: 1, agent_version: "0.1.0".into() }),
            ResponseBody::Run(RunOutput {
                status: ExitStatus::Exited { code: 3 },
                timed_out: false,
                stdout: output.clone(),
                stderr: CapturedOutput::default(),
                start_ns: 1,
                end_ns: 2,
            }),
            ResponseBody::Spawn(SpawnReply { handle: 77, start_ns: 5 }),
            ResponseBody::ReadOutput(ProcessOutput {
                stdout: output,
                stderr: CapturedOutput::default(),
                exit: Some(ProcessExit { status: killed.clone(), end_ns: 9 }),
            }),
            ResponseBody::WaitOutput(OutputMatch { line: "prog_id=12".into(), end_offset: 11 }),
            ResponseBody::Kill {},
            ResponseBody::Wait(ProcessExit { status: killed, end_ns: 10 }),
            ResponseBody::ReadFile(FileContents {
                data: Data(vec![0, 159, 146, 150]),
                truncated: false,
            }),
            ResponseBody::WriteFile(WriteReply { bytes_written: 4 }),
            ResponseBody::Clock(ClockReading { monotonic_ns: u64::MAX, realtime_ns: 0 }),
            ResponseBody::Terminate(TerminateReply {
                result: SyscallResult::Failed(ErrnoInfo { number: 3, name: "ESRCH".into() }),
                before_ns: 100,
                after_ns: 200,
            }),
            ResponseBody::Terminate(TerminateReply {
                result: SyscallResult::Returned(2),
                before_ns: 100,
                after_ns: 200,
            }),
            ResponseBody::Shutdown {},
        ]
    }

    #[test]
    fn every_reply_and_errors_round_trip() {
        let mut responses: Vec<Response> = every_reply()
            .into_iter()
            .enumerate()
            .map(|(id, body)| Response::ok(id as u64, body))
            .collect();
        responses.push(Response::error(None, ErrorReply::new(ErrorKind::MalformedJson, "x")));
        responses.push(Response::error(
            Some(4),
            ErrorReply {
                kind: ErrorKind::Io,
                message: "open /nope".into(),
                errno: Some(ErrnoInfo { number: 2, name: "ENOENT".into() }),
            },
        ));
        for response in responses {
            let line = response.to_line().unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let parsed: Response = serde_json::from_slice(&line).unwrap();
            assert_eq!(parsed, response);
        }
    }

    #[test]
    fn wire_format_is_the_documented_one() {
        let error = Response::error(None, ErrorReply::new(ErrorKind::LineTooLong, "too long"));
        assert_eq!(
            String::from_utf8(error.to_line().unwrap()).unwrap(),
            "{\"id\":null,\"error\":{\"kind\":\"line_too_long\",\"message\":\"too long\"}}\n"
        );
        let ok = Response::ok(
            2,
            ResponseBody::Terminate(TerminateReply {
                result: SyscallResult::Failed(ErrnoInfo { number: 22, name: "EINVAL".into() }),
                before_ns: 1,
                after_ns: 2,
            }),
        );
        assert_eq!(
            String::from_utf8(ok.to_line().unwrap()).unwrap(),
            "{\"id\":2,\"ok\":{\"op\":\"terminate\",\"result\":{\"failed\":{\"number\":22,\"name\":\"EINVAL\"}},\"before_ns\":1,\"after_ns\":2}}\n"
        );
    }

    #[test]
    fn responses_need_exactly_one_outcome() {
        for bad in [
            r#"{"id":1}"#,
            r#"{"id":1,"ok":{"op":"kill"},"error":{"kind":"io","message":"x"}}"#,
            r#"{"id":1,"ok":{"op":"kill","extra":1}}"#,
            r#"{"id":1,"ok":{"op":"clock","monotonic_ns":1}}"#,
            r#"{"id":1,"error":{"kind":"bogus","message":"x"}}"#,
            r#"{"id":1,"ok":{"op":"kill"},"note":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Response>(bad).is_err(), "{bad} accepted");
        }
    }
}
