//! The host ↔ guest-agent protocol of termlab: the one definition both sides use.
//!
//! Transport: a byte stream (AF_VSOCK in the guest, a Firecracker-style hybrid vsock Unix socket on
//! the host). Framing: one JSON object per line (`\n`-terminated, no embedded newlines).
//!
//! Every request carries an `id` (u64) and an `op` naming the operation; its response echoes the id
//! and carries exactly one of `ok` (a result tagged with the same `op`) or `error`
//! (`{kind, message, errno?}`). A line the agent cannot attribute to a request (not JSON, no valid
//! id, too long) is answered with `"id": null`.
//!
//! ```text
//! → {"id":1,"op":"run","argv":["echo","hi"],"timeout_ms":1000}
//! ← {"id":1,"ok":{"op":"run","status":{"kind":"exited","code":0},"timed_out":false,
//!     "stdout":{"data":"hi\n","truncated":false,"total_bytes":3},"stderr":{...},
//!     "start_ns":123,"end_ns":456}}
//! ```

pub mod client;
mod data;
pub mod hybrid_vsock;
pub mod line;
mod request;
mod response;

pub use data::Data;
pub use request::{
    HelloRequest, KillRequest, ReadFileRequest, ReadOutputRequest, Request, RequestBody,
    RequestParseError, RunRequest, SpawnRequest, TerminateRequest, ValidationError,
    WaitOutputRequest, WaitRequest, WriteFileRequest,
};
pub use response::{
    CapturedOutput, ClockReading, ErrnoInfo, ErrorKind, ErrorReply, ExitStatus, FileContents,
    HelloReply, OutputMatch, ProcessExit, ProcessOutput, Response, ResponseBody, RunOutput,
    SpawnReply, Stream, SyscallResult, TerminateReply, WriteReply,
};

/// Bumped on every incompatible change; exchanged by the `hello` op.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

/// `BPF_PROG_TERMINATE` in `enum bpf_cmd` of the patched kernel (right after `BPF_TOKEN_CREATE`).
pub const BPF_PROG_TERMINATE: u32 = 37;

/// `BPF_F_TERMINATE_DETACH`: also detach the program after stopping it.
pub const BPF_F_TERMINATE_DETACH: u32 = 1 << 0;

/// Longest request line the agent accepts (bounds `write_file` data and `run` stdin).
pub const MAX_REQUEST_LINE_BYTES: usize = 8 << 20;

/// Bytes of stdout and of stderr kept per process; the rest is counted and flagged as truncated.
pub const MAX_CAPTURED_OUTPUT_BYTES: usize = 4 << 20;

/// Largest `max_bytes` a `read_file` may ask for (/proc/kallsyms of a small kernel is ~1–3 MiB).
pub const MAX_READ_FILE_BYTES: u64 = 16 << 20;

/// Longest response line the client accepts. Worst case of a maximal `read_file` reply: every byte
/// escaped as `\u00XX` (6×) plus envelope.
pub const MAX_RESPONSE_LINE_BYTES: usize = 6 * (MAX_READ_FILE_BYTES as usize) + (1 << 20);

/// Upper bound of every `timeout_ms`; anything longer is a mistake in a scenario.
pub const MAX_TIMEOUT_MS: u64 = 60 * 60 * 1000;
