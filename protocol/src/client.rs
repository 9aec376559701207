//! Blocking client for the host harness: one request at a time over any stream with a settable
//! read timeout (the hybrid-vsock Unix socket, or a plain Unix socket in tests).
//!
//! Requests that may legitimately block in the agent (`run`, `wait`, `wait_output`) get their own
//! timeout plus [`Client::response_margin`]; every other call waits [`Client::default_timeout`].
//! Concurrent requests (e.g. `terminate` while a `run` blocks) need a second connection.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::line::{LineBuffer, LineError};
use crate::{
    ClockReading, Data, ErrorReply, FileContents, HelloReply, HelloRequest, KillRequest,
    OutputMatch, ProcessExit, ProcessOutput, ReadFileRequest, ReadOutputRequest, Request,
    RequestBody, Response, ResponseBody, RunOutput, RunRequest, SpawnReply, SpawnRequest,
    TerminateReply, TerminateRequest, WaitOutputRequest, WaitRequest, WriteFileRequest, WriteReply,
    MAX_RESPONSE_LINE_BYTES, PROTOCOL_VERSION,
};

/// A byte stream whose reads can be given a deadline.
pub trait Transport: Read + Write {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Transport for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("sending request {id} failed: {source}")]
    Send { id: u64, source: io::Error },
    #[error("reading the response to request {id} failed: {source}")]
    Receive { id: u64, source: io::Error },
    #[error("no response to request {id} ({op}) within {waited:?}")]
    Timeout { id: u64, op: &'static str, waited: Duration },
    #[error("the agent closed the connection while request {id} was pending")]
    Closed { id: u64 },
    #[error("a response line exceeded {max_bytes} bytes")]
    ResponseTooLong { max_bytes: usize },
    #[error("the agent sent an invalid response: {0}")]
    MalformedResponse(String),
    #[error("the agent answered request {id}: {error}")]
    Agent { id: u64, error: ErrorReply },
    #[error("request {id} was a {expected} but the agent answered a {got}")]
    UnexpectedReply { id: u64, expected: &'static str, got: &'static str },
    #[error("the agent speaks protocol version {agent}, this client version {client}")]
    VersionMismatch { agent: u32, client: u32 },
    #[error("cannot encode request: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ClientError {
    /// The agent's error reply, when that is what this is (to check the error kind).
    pub fn agent_error(&self) -> Option<&ErrorReply> {
        match self {
            ClientError::Agent { error, .. } => Some(error),
            _ => None,
        }
    }
}

pub struct Client<T: Transport> {
    stream: T,
    lines: LineBuffer,
    next_id: u64,
    /// How long calls without a timeout of their own wait for their response.
    pub default_timeout: Duration,
    /// Added to the timeout of `run`/`wait`/`wait_output` to cover the agent's own work.
    pub response_margin: Duration,
}

impl<T: Transport> Client<T> {
    pub fn new(stream: T) -> Self {
        Client {
            stream,
            lines: LineBuffer::new(MAX_RESPONSE_LINE_BYTES),
            next_id: 1,
            default_timeout: Duration::from_secs(10),
            response_margin: Duration::from_secs(5),
        }
    }

    /// Sends `body` and returns the agent's answer to it. Responses with other ids (left over
    /// from an earlier request that timed out) are skipped.
    pub fn call(
        &mut self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let op = body.op();
        self.send_line(id, &Request::new(id, body).to_line()?)?;
        let response = self.receive(id, Some(id), op, timeout)?;
        response.outcome.map_err(|error| ClientError::Agent { id, error })
    }

    /// [`Client::call`], checking that the answer is for the same op and has the expected type.
    fn call_typed<R: Reply>(
        &mut self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let id = self.next_id;
        let expected = body.op();
        let reply = self.call(body, timeout)?;
        let got = reply.op();
        let unexpected = ClientError::UnexpectedReply { id, expected, got };
        if got != expected {
            return Err(unexpected);
        }
        R::from_body(reply).ok_or(unexpected)
    }

    fn send_line(&mut self, id: u64, line: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(line)
            .and_then(|()| self.stream.flush())
            .map_err(|source| ClientError::Send { id, source })
    }

    /// Reads responses until one for `wanted_id` arrives (any response when `None`). A null id
    /// also matches: the agent could not read the line at all, which is this request's error.
    fn receive(
        &mut self,
        id: u64,
        wanted_id: Option<u64>,
        op: &'static str,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::Timeout { id, op, waited: timeout });
            }
            self.stream
                .set_read_timeout(Some(remaining))
                .map_err(|source| ClientError::Receive { id, source })?;
            let line = match self.lines.read_line(&mut self.stream) {
                Ok(line) => line,
                Err(LineError::Io(e))
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(LineError::Io(source)) => return Err(ClientError::Receive { id, source }),
                Err(LineError::Closed { .. }) => return Err(ClientError::Closed { id }),
                Err(LineError::TooLong { max_bytes }) => {
                    return Err(ClientError::ResponseTooLong { max_bytes })
                }
            };
            let response: Response = serde_json::from_slice(&line)
                .map_err(|e| ClientError::MalformedResponse(e.to_string()))?;
            match (wanted_id, response.id) {
                (Some(wanted), Some(got)) if wanted != got => continue,
                _ => return Ok(response),
            }
        }
    }

    fn with_margin(&self, timeout_ms: u64) -> Duration {
        Duration::from_millis(timeout_ms) + self.response_margin
    }

    /// Checks that the agent speaks [`PROTOCOL_VERSION`]; call it first on a new connection.
    pub fn hello(&mut self) -> Result<HelloReply, ClientError> {
        let body = RequestBody::Hello(HelloRequest { protocol_version: PROTOCOL_VERSION });
        let reply: HelloReply = self.call_typed(body, self.default_timeout)?;
        if reply.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                agent: reply.protocol_version,
                client: PROTOCOL_VERSION,
            });
        }
        Ok(reply)
    }

    pub fn run(&mut self, request: RunRequest) -> Result<RunOutput, ClientError> {
        let timeout = self.with_margin(request.timeout_ms);
        self.call_typed(RequestBody::Run(request), timeout)
    }

    pub fn spawn(&mut self, request: SpawnRequest) -> Result<SpawnReply, ClientError> {
        self.call_typed(RequestBody::Spawn(request), self.default_timeout)
    }

    pub fn read_output(&mut self, handle: u32) -> Result<ProcessOutput, ClientError> {
        let body =
            RequestBody::ReadOutput(ReadOutputRequest { handle, consume: false, wait_ms: 0 });
        self.call_typed(body, self.default_timeout)
    }

    /// What a background process wrote since the previous call (see
    /// [`ReadOutputRequest::consume`]), waiting up to `wait_ms` for something to happen: new
    /// output or its exit. Streams a process's output without any size limit.
    pub fn read_new_output(
        &mut self,
        handle: u32,
        wait_ms: u64,
    ) -> Result<ProcessOutput, ClientError> {
        let timeout = self.with_margin(wait_ms);
        let body = RequestBody::ReadOutput(ReadOutputRequest { handle, consume: true, wait_ms });
        self.call_typed(body, timeout)
    }

    pub fn wait_output(&mut self, request: WaitOutputRequest) -> Result<OutputMatch, ClientError> {
        let timeout = self.with_margin(request.timeout_ms);
        self.call_typed(RequestBody::WaitOutput(request), timeout)
    }

    pub fn kill(&mut self, handle: u32, signal: i32) -> Result<(), ClientError> {
        let body = RequestBody::Kill(KillRequest { handle, signal });
        self.call_typed(body, self.default_timeout)
    }

    pub fn wait(&mut self, handle: u32, timeout_ms: u64) -> Result<ProcessExit, ClientError> {
        let timeout = self.with_margin(timeout_ms);
        self.call_typed(RequestBody::Wait(WaitRequest { handle, timeout_ms }), timeout)
    }

    pub fn read_file(&mut self, path: &str, max_bytes: u64) -> Result<FileContents, ClientError> {
        self.read_file_waiting(path, max_bytes, 0)
    }

    /// [`Client::read_file`], but when the file has nothing to give now the agent waits up to
    /// `wait_ms` for data (see [`ReadFileRequest::wait_ms`]): what came, or nothing.
    pub fn read_file_waiting(
        &mut self,
        path: &str,
        max_bytes: u64,
        wait_ms: u64,
    ) -> Result<FileContents, ClientError> {
        let timeout = self.with_margin(wait_ms).max(self.default_timeout);
        let body =
            RequestBody::ReadFile(ReadFileRequest { path: path.to_owned(), max_bytes, wait_ms });
        self.call_typed(body, timeout)
    }

    pub fn write_file(
        &mut self,
        path: &str,
        data: impl Into<Data>,
    ) -> Result<WriteReply, ClientError> {
        let body =
            RequestBody::WriteFile(WriteFileRequest { path: path.to_owned(), data: data.into() });
        self.call_typed(body, self.default_timeout)
    }

    pub fn clock(&mut self) -> Result<ClockReading, ClientError> {
        self.call_typed(RequestBody::Clock {}, self.default_timeout)
    }

    pub fn terminate(&mut self, request: TerminateRequest) -> Result<TerminateReply, ClientError> {
        self.call_typed(RequestBody::Terminate(request), self.default_timeout)
    }

    /// Asks the agent to kill its children and power the guest off; returns once it has replied.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.call_typed(RequestBody::Shutdown {}, self.default_timeout)
    }

    /// Sends one raw line (a newline is appended) and returns the next response, whatever its
    /// id: for tests of how the agent handles bad input.
    pub fn send_raw_line(
        &mut self,
        line: &[u8],
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let id = self.next_id;
        let mut line = line.to_vec();
        line.push(b'\n');
        self.send_line(id, &line)?;
        self.receive(id, None, "raw", timeout)
    }

    /// The underlying stream (e.g. to shut it down).
    pub fn stream(&self) -> &T {
        &self.stream
    }
}

/// A result type one op answers with; `call_typed` has already checked the op matches.
trait Reply: Sized {
    fn from_body(body: ResponseBody) -> Option<Self>;
}

/// `kill` and `shutdown` answer with nothing but their op.
impl Reply for () {
    fn from_body(_: ResponseBody) -> Option<Self> {
        Some(())
    }
}

macro_rules! impl_reply {
    ($($result:ty => $variant:ident),* $(,)?) => {
        $(impl Reply for $result {
            fn from_body(body: ResponseBody) -> Option<Self> {
                match body {
                    ResponseBody::$variant(result) => Some(result),
                    _ => None,
                }
            }
        })*
    };
}

impl_reply!(
    HelloReply => Hello,
    RunOutput => Run,
    SpawnReply => Spawn,
    ProcessOutput => ReadOutput,
    OutputMatch => WaitOutput,
    ProcessExit => Wait,
    FileContents => ReadFile,
    WriteReply => WriteFile,
    ClockReading => Clock,
    TerminateReply => Terminate,
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// The agent's side closing in the middle of a response line (a vsock peer that goes
    /// away mid-stream) is `Closed` at once: not a timeout, not a malformed response.
    #[test]
    fn a_peer_closing_mid_response_is_closed() {
        let (host, agent) = UnixStream::pair().expect("socket pair");
        let peer = std::thread::spawn(move || {
            let mut request = String::new();
            BufReader::new(&agent).read_line(&mut request).expect("request line");
            assert!(request.contains("\"op\":\"clock\""), "{request}");
            (&agent)
                .write_all(br#"{"id":1,"ok":{"op":"clock","monotonic_ns":12"#)
                .expect("half a response");
            // Dropping the socket closes it with the line unfinished.
        });
        let mut client = Client::new(host);
        client.default_timeout = Duration::from_secs(30);
        let began = Instant::now();
        match client.clock() {
            Err(ClientError::Closed { id: 1 }) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
        assert!(began.elapsed() < Duration::from_secs(10), "waited for the timeout instead");
        peer.join().expect("peer thread");
    }
}
