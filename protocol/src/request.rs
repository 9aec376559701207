//! Requests: host → agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Data, ErrorKind, Stream, MAX_READ_FILE_BYTES, MAX_TIMEOUT_MS};

/// One request line: `{"id": N, "op": "...", ...op fields}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

/// The operations. Unknown ops and unknown or missing fields are rejected, never ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum RequestBody {
    /// Version handshake; the agent refuses a different protocol version.
    Hello(HelloRequest),
    /// Run a command to completion (or until its timeout, then kill its process group).
    Run(RunRequest),
    /// Start a background process; its handle serves `read_output`, `wait_output`, `kill`, `wait`.
    Spawn(SpawnRequest),
    /// Everything a background process wrote so far, and its exit status if it has exited.
    ReadOutput(ReadOutputRequest),
    /// Block until a complete output line of a background process contains a literal substring.
    WaitOutput(WaitOutputRequest),
    /// Send a signal to the process group of a background process.
    Kill(KillRequest),
    /// Block until a background process exits.
    Wait(WaitRequest),
    /// Read (up to `max_bytes` of) a file: /proc/kallsyms, /proc/sys/..., ...
    ReadFile(ReadFileRequest),
    /// Write a file in one write() call (the way sysctls under /proc/sys must be written).
    WriteFile(WriteFileRequest),
    /// The guest's CLOCK_MONOTONIC and CLOCK_REALTIME, for host ↔ guest clock offsets.
    Clock {},
    /// bpf(BPF_PROG_TERMINATE, {prog_id, flags}), timestamped just before and after the call.
    Terminate(TerminateRequest),
    /// Reply, kill every child, then power the guest off.
    Shutdown {},
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloRequest {
    pub protocol_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Program and arguments; the program is looked up in PATH.
    pub argv: Vec<String>,
    /// Added to (or overriding) the agent's own environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_ms: u64,
    /// Written to the command's stdin, which is then closed; without it stdin is /dev/null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Data>,
    /// Run with this uid and gid (same number) instead of the agent's (root), e.g. to check
    /// that unprivileged callers are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_uid: Option<u32>,
}

impl RunRequest {
    /// Runs `argv` as root in the agent's environment, with stdin /dev/null,
    /// for at most `timeout_ms`; set the other fields on the result for more.
    pub fn command(argv: Vec<String>, timeout_ms: u64) -> Self {
        RunRequest { argv, env: BTreeMap::new(), timeout_ms, stdin: None, as_uid: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_uid: Option<u32>,
}

impl SpawnRequest {
    /// Starts `argv` as root in the agent's environment; set `env` or
    /// `as_uid` on the result for more.
    pub fn command(argv: Vec<String>) -> Self {
        SpawnRequest { argv, env: BTreeMap::new(), as_uid: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadOutputRequest {
    pub handle: u32,
    /// Return only what was written since the previous `consume` read, and let the agent
    /// forget it: output then streams without the kept-output limit (a command's whole output,
    /// however long, as it is written). `wait_output` on a process read this way is refused,
    /// its offsets would no longer count from the start. Optional: older hosts never send it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub consume: bool,
    /// With `consume`: when nothing new has been written and the process has not exited, wait
    /// up to this long (ms) for either before answering (a long poll). 0: answer at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_ms: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitOutputRequest {
    pub handle: u32,
    /// Literal substring (not a regex) to look for in each complete line.
    pub pattern: String,
    #[serde(default)]
    pub stream: Stream,
    pub timeout_ms: u64,
    /// Byte offset in the stream to search from: 0, or the `end_offset` of a previous match to
    /// find the next occurrence.
    #[serde(default)]
    pub from_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    pub handle: u32,
    /// Signal number (e.g. 2 = SIGINT, 9 = SIGKILL, 15 = SIGTERM).
    pub signal: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    pub handle: u32,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub path: String,
    pub max_bytes: u64,
    /// When the file has nothing to give now (a pipe-like file such as tracefs' `trace_pipe`,
    /// opened non-blocking), wait up to this long (ms) for data before answering: a long poll
    /// instead of a request every few milliseconds. An empty answer means nothing came in
    /// time. 0: answer at once. Optional: older hosts never send it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    pub data: Data,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateRequest {
    pub prog_id: u32,
    pub flags: u32,
    /// Make the call from a thread running with this uid and gid and no capabilities
    /// (the EPERM case) instead of as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_uid: Option<u32>,
}

/// Highest signal number on Linux x86_64 (SIGRTMAX).
const MAX_SIGNAL: i32 = 64;

/// A request that parsed but makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("argv must not be empty")]
    EmptyArgv,
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    #[error("environment variable name {name:?} is empty or contains '='")]
    BadEnvName { name: String },
    #[error("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {got}")]
    BadTimeout { got: u64 },
    #[error("max_bytes must be between 1 and {MAX_READ_FILE_BYTES}, got {got}")]
    BadMaxBytes { got: u64 },
    #[error("signal must be between 1 and {MAX_SIGNAL}, got {got}")]
    BadSignal { got: i32 },
    #[error("pattern must not be empty or contain a newline")]
    BadPattern,
    #[error("wait_ms needs consume: without it the reply is everything so far, never empty")]
    WaitWithoutConsume,
    #[error("path must be absolute, got {path:?}")]
    RelativePath { path: String },
}

impl RequestBody {
    /// The `op` name, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            RequestBody::Hello(_) => "hello",
            RequestBody::Run(_) => "run",
            RequestBody::Spawn(_) => "spawn",
            RequestBody::ReadOutput(_) => "read_output",
            RequestBody::WaitOutput(_) => "wait_output",
            RequestBody::Kill(_) => "kill",
            RequestBody::Wait(_) => "wait",
            RequestBody::ReadFile(_) => "read_file",
            RequestBody::WriteFile(_) => "write_file",
            RequestBody::Clock {} => "clock",
            RequestBody::Terminate(_) => "terminate",
            RequestBody::Shutdown {} => "shutdown",
        }
    }

    /// The agent's checks beyond what the types enforce; run before anything is executed.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            RequestBody::Run(run) => {
                // stdin needs no limit of its own: the request line limit bounds it.
                validate_command(&run.argv, &run.env)?;
                validate_timeout(run.timeout_ms)
            }
            RequestBody::Spawn(spawn) => validate_command(&spawn.argv, &spawn.env),
            RequestBody::WaitOutput(wait) => {
                validate_timeout(wait.timeout_ms)?;
                if wait.pattern.is_empty() || wait.pattern.contains('\n') {
                    return Err(ValidationError::BadPattern);
                }
                Ok(())
            }
            RequestBody::Kill(kill) => {
                if (1..=MAX_SIGNAL).contains(&kill.signal) {
                    Ok(())
                } else {
                    Err(ValidationError::BadSignal { got: kill.signal })
                }
            }
            RequestBody::Wait(wait) => validate_timeout(wait.timeout_ms),
            RequestBody::ReadFile(read) => {
                validate_path(&read.path)?;
                if !(1..=MAX_READ_FILE_BYTES).contains(&read.max_bytes) {
                    Err(ValidationError::BadMaxBytes { got: read.max_bytes })
                } else if read.wait_ms == 0 {
                    Ok(())
                } else {
                    validate_timeout(read.wait_ms)
                }
            }
            RequestBody::WriteFile(write) => validate_path(&write.path),
            RequestBody::ReadOutput(read) => {
                if read.wait_ms == 0 {
                    Ok(())
                } else if !read.consume {
                    Err(ValidationError::WaitWithoutConsume)
                } else {
                    validate_timeout(read.wait_ms)
                }
            }
            RequestBody::Hello(_)
            | RequestBody::Clock {}
            | RequestBody::Terminate(_)
            | RequestBody::Shutdown {} => Ok(()),
        }
    }
}

fn validate_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    if argv.is_empty() {
        return Err(ValidationError::EmptyArgv);
    }
    if argv.iter().any(|arg| arg.contains('\0')) {
        return Err(ValidationError::NulByte { what: "argv" });
    }
    for (name, value) in env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(ValidationError::BadEnvName { name: name.clone() });
        }
        if value.contains('\0') {
            return Err(ValidationError::NulByte { what: "env value" });
        }
    }
    Ok(())
}

fn validate_timeout(timeout_ms: u64) -> Result<(), ValidationError> {
    if (1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        Ok(())
    } else {
        Err(ValidationError::BadTimeout { got: timeout_ms })
    }
}

fn validate_path(path: &str) -> Result<(), ValidationError> {
    if path.contains('\0') {
        return Err(ValidationError::NulByte { what: "path" });
    }
    // The agent's working directory is whatever init gave it; relative paths would be guesswork.
    if !path.starts_with('/') {
        return Err(ValidationError::RelativePath { path: path.to_owned() });
    }
    Ok(())
}

/// Why a request line could not be turned into a [`Request`]. `id` is set when the line had a
/// valid id, so the error response can still be matched to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestParseError {
    pub id: Option<u64>,
    pub kind: ErrorKind,
    pub message: String,
}

impl Request {
    pub fn new(id: u64, body: RequestBody) -> Self {
        Request { id, body }
    }

    /// Parses one line (without its newline). The id is extracted first so that a request with a
    /// valid id but a bad body gets an error response carrying that id.
    pub fn parse_line(line: &[u8]) -> Result<Request, RequestParseError> {
        let value: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| RequestParseError {
                id: None,
                kind: ErrorKind::MalformedJson,
                message: format!("request is not valid JSON: {e}"),
            })?;
        Self::from_value(value)
    }

    fn from_value(value: serde_json::Value) -> Result<Request, RequestParseError> {
        let invalid = |id, message: String| RequestParseError {
            id,
            kind: ErrorKind::InvalidRequest,
            message,
        };
        let serde_json::Value::Object(mut fields) = value else {
            return Err(invalid(None, "request must be a JSON object".into()));
        };
        let id = match fields.remove("id") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| {
            invalid(None, "request needs an \"id\" that is an unsigned integer".into())
        })?;
        let body = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| invalid(Some(id), format!("bad request: {e}")))?;
        Ok(Request { id, body })
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> serde_json::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut value = serde_json::to_value(&self.body).map_err(serde::ser::Error::custom)?;
        match value.as_object_mut() {
            Some(fields) => {
                fields.insert("id".into(), self.id.into());
            }
            None => return Err(serde::ser::Error::custom("request body is not an object")),
        }
        value.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Request::from_value(value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_request() -> Vec<RequestBody> {
        vec![
            RequestBody::Hello(HelloRequest { protocol_version: 1 }),
            RequestBody::Run(RunRequest {
                argv: vec!["sh".into(), "-c".into(), "cat; exit 3".into()],
                env: BTreeMap::from([("A".into(), "b c".into())]),
                timeout_ms: 500,
                stdin: Some(Data(vec![0xff, b'\n'])),
                as_uid: Some(65534),
            }),
            RequestBody::Spawn(SpawnRequest {
                argv: vec!["loops".into()],
                env: BTreeMap::new(),
                as_uid: None,
            }),
            RequestBody::ReadOutput(ReadOutputRequest { handle: 42, consume: false, wait_ms: 0 }),
            RequestBody::ReadOutput(ReadOutputRequest { handle: 42, consume: true, wait_ms: 250 }),
            RequestBody::WaitOutput(WaitOutputRequest {
                handle: 42,
                pattern: "prog_id=".into(),
                stream: Stream::Stderr,
                timeout_ms: 1000,
                from_offset: 17,
            }),
            RequestBody::Kill(KillRequest { handle: 42, signal: 15 }),
            RequestBody::Wait(WaitRequest { handle: 42, timeout_ms: 10 }),
            RequestBody::ReadFile(ReadFileRequest {
                path: "/proc/kallsyms".into(),
                max_bytes: 1 << 20,
                wait_ms: 0,
            }),
            RequestBody::ReadFile(ReadFileRequest {
                path: "/sys/kernel/tracing/trace_pipe".into(),
                max_bytes: 1 << 20,
                wait_ms: 250,
            }),
            RequestBody::WriteFile(WriteFileRequest {
                path: "/proc/sys/kernel/bpf_termination_demo_delay_ms".into(),
                data: "500\n".into(),
            }),
            RequestBody::Clock {},
            RequestBody::Terminate(TerminateRequest {
                prog_id: 7,
                flags: crate::BPF_F_TERMINATE_DETACH,
                as_uid: None,
            }),
            RequestBody::Shutdown {},
        ]
    }

    #[test]
    fn every_op_round_trips_through_one_line() {
        for (id, body) in every_request().into_iter().enumerate() {
            let request = Request::new(id as u64, body);
            let line = request.to_line().unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(line.last(), Some(&b'\n'));
            let parsed = Request::parse_line(&line[..line.len() - 1]).unwrap();
            assert_eq!(parsed, request);
            let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(json["op"], request.body.op());
            assert_eq!(json["id"], id as u64);
        }
    }

    #[test]
    fn wire_format_is_the_documented_one() {
        let request =
            Request::parse_line(br#"{"id":9,"op":"run","argv":["echo","hi"],"timeout_ms":1000}"#)
                .unwrap();
        assert_eq!(
            request,
            Request::new(
                9,
                RequestBody::Run(RunRequest::command(vec!["echo".into(), "hi".into()], 1000))
            )
        );
        assert_eq!(
            Request::parse_line(br#"{"op":"clock","id":3}"#).unwrap(),
            Request::new(3, RequestBody::Clock {})
        );
    }

    fn rejection(line: &str) -> RequestParseError {
        match Request::parse_line(line.as_bytes()) {
            Ok(request) => panic!("{line} was accepted as {request:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn lines_without_a_usable_id_are_rejected_with_a_null_id() {
        let cases = [
            ("", ErrorKind::MalformedJson),
            ("garbage", ErrorKind::MalformedJson),
            (r#"{"id":1,"op":"clock""#, ErrorKind::MalformedJson),
            ("[1,2]", ErrorKind::InvalidRequest),
            (r#"{"op":"clock"}"#, ErrorKind::InvalidRequest),
            (r#"{"id":-1,"op":"clock"}"#, ErrorKind::InvalidRequest),
            (r#"{"id":1.5,"op":"clock"}"#, ErrorKind::InvalidRequest),
            (r#"{"id":"1","op":"clock"}"#, ErrorKind::InvalidRequest),
        ];
        for (line, kind) in cases {
            let error = rejection(line);
            assert_eq!((error.id, error.kind), (None, kind), "{line}");
        }
    }

    #[test]
    fn bad_bodies_are_rejected_with_their_id() {
        let cases = [
            (r#"{"id":5}"#, "op"),
            (r#"{"id":5,"op":"format_disk"}"#, "format_disk"),
            (r#"{"id":5,"op":"clock","extra":1}"#, "extra"),
            (r#"{"id":5,"op":"shutdown","now":true}"#, "now"),
            (r#"{"id":5,"op":"run","argv":["true"]}"#, "timeout_ms"),
            (r#"{"id":5,"op":"run","argv":["true"],"timeout_ms":1,"shell":true}"#, "shell"),
            (r#"{"id":5,"op":"terminate","prog_id":1}"#, "flags"),
            (r#"{"id":5,"op":"terminate","prog_id":-1,"flags":0}"#, "-1"),
            (r#"{"id":5,"op":"terminate","prog_id":4294967296,"flags":0}"#, "4294967296"),
            (r#"{"id":5,"op":"kill","handle":1,"signal":"TERM"}"#, "TERM"),
            (
                r#"{"id":5,"op":"wait_output","handle":1,"pattern":"x","timeout_ms":1,"stream":"stdin"}"#,
                "stdin",
            ),
            (r#"{"id":5,"op":"write_file","path":"/x","data":{"base64":"%%"}}"#, "base64"),
        ];
        for (line, mentioned) in cases {
            let error = rejection(line);
            assert_eq!((error.id, error.kind), (Some(5), ErrorKind::InvalidRequest), "{line}");
            assert!(error.message.contains(mentioned), "{line}: {}", error.message);
        }
    }

    #[test]
    fn validation_catches_what_types_cannot() {
        let run = |argv: &[&str], timeout_ms| {
            RequestBody::Run(RunRequest::command(
                argv.iter().map(|s| s.to_string()).collect(),
                timeout_ms,
            ))
            .validate()
        };
        assert_eq!(run(&["true"], 1), Ok(()));
        assert_eq!(run(&[], 1), Err(ValidationError::EmptyArgv));
        assert_eq!(run(&["a\0b"], 1), Err(ValidationError::NulByte { what: "argv" }));
        assert_eq!(run(&["true"], 0), Err(ValidationError::BadTimeout { got: 0 }));
        assert!(run(&["true"], MAX_TIMEOUT_MS + 1).is_err());

        let spawn_env = |name: &str| {
            RequestBody::Spawn(SpawnRequest {
                argv: vec!["true".into()],
                env: BTreeMap::from([(name.to_owned(), "v".to_owned())]),
                as_uid: None,
            })
            .validate()
        };
        assert_eq!(spawn_env("OK_NAME"), Ok(()));
        assert!(spawn_env("").is_err());
        assert!(spawn_env("A=B").is_err());

        let kill = |signal| RequestBody::Kill(KillRequest { handle: 1, signal }).validate();
        assert_eq!(kill(9), Ok(()));
        assert_eq!(kill(0), Err(ValidationError::BadSignal { got: 0 }));
        assert_eq!(kill(65), Err(ValidationError::BadSignal { got: 65 }));

        let read_waiting = |path: &str, max_bytes, wait_ms| {
            RequestBody::ReadFile(ReadFileRequest { path: path.into(), max_bytes, wait_ms })
                .validate()
        };
        let read = |path: &str, max_bytes| read_waiting(path, max_bytes, 0);
        assert_eq!(read("/proc/kallsyms", MAX_READ_FILE_BYTES), Ok(()));
        assert!(read("/proc/kallsyms", 0).is_err());
        assert!(read("/proc/kallsyms", MAX_READ_FILE_BYTES + 1).is_err());
        assert!(read("proc/kallsyms", 10).is_err());
        assert_eq!(read_waiting("/sys/kernel/tracing/trace_pipe", 10, 250), Ok(()));
        assert_eq!(
            read_waiting("/sys/kernel/tracing/trace_pipe", 10, MAX_TIMEOUT_MS + 1),
            Err(ValidationError::BadTimeout { got: MAX_TIMEOUT_MS + 1 })
        );

        let wait_output = |pattern: &str| {
            RequestBody::WaitOutput(WaitOutputRequest {
                handle: 1,
                pattern: pattern.into(),
                stream: Stream::Stdout,
                timeout_ms: 10,
                from_offset: 0,
            })
            .validate()
        };
        assert_eq!(wait_output("prog_id="), Ok(()));
        assert_eq!(wait_output(""), Err(ValidationError::BadPattern));
        assert_eq!(wait_output("a\nb"), Err(ValidationError::BadPattern));
    }
}
