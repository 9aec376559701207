//! Firecracker's "hybrid vsock" handshake: the host reaches a guest vsock port through a Unix
//! socket of the VMM by writing `CONNECT <port>\n`; the VMM answers `OK <host_port>\n` once the
//! guest accepted, or closes the socket if nothing listens on that port. After the handshake the
//! Unix socket carries the guest connection's bytes.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest handshake line we accept (`OK 4294967295\n` and `CONNECT 4294967295\n` are shorter).
const MAX_HANDSHAKE_LINE_BYTES: usize = 32;

/// How long to wait between attempts while the guest agent is not listening yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot connect to the VMM's vsock socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("handshake I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the VMM closed the connection: nothing listens on guest vsock port {port}")]
    Refused { port: u32 },
    #[error("no handshake answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed handshake line {line:?}: expected {expected}")]
    Malformed { line: String, expected: &'static str },
}

/// `CONNECT <port>\n`
pub fn connect_request_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// `OK <host_port>\n`
pub fn connect_reply_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// The guest port of a `CONNECT <port>` line (newline already removed).
pub fn parse_connect_request(line: &str) -> Result<u32, HandshakeError> {
    parse_keyword_and_number(line, "CONNECT", "CONNECT <port>")
}

/// The host-side port number of an `OK <n>` line (newline already removed).
pub fn parse_connect_reply(line: &str) -> Result<u32, HandshakeError> {
    parse_keyword_and_number(line, "OK", "OK <port>")
}

fn parse_keyword_and_number(
    line: &str,
    keyword: &str,
    expected: &'static str,
) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed { line: line.to_owned(), expected };
    let number =
        line.strip_prefix(keyword).and_then(|rest| rest.strip_prefix(' ')).ok_or_else(malformed)?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    number.parse().map_err(|_| malformed())
}

/// Reads one handshake line byte by byte, so not a byte of the data after it is consumed.
/// `Ok(None)`: the peer closed before sending anything.
pub fn read_handshake_line(stream: &mut impl Read) -> Result<Option<String>, HandshakeError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() == MAX_HANDSHAKE_LINE_BYTES => {
                return Err(HandshakeError::Malformed {
                    line: String::from_utf8_lossy(&line).into_owned(),
                    expected: "a short handshake line",
                })
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    String::from_utf8(line).map(Some).map_err(|e| HandshakeError::Malformed {
        line: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        expected: "ASCII",
    })
}

/// Connects to guest vsock `port` through the VMM's Unix socket at `uds_path`; one attempt.
/// Returns the stream, ready for protocol traffic, with no read timeout set.
pub fn connect(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let mut stream = UnixStream::connect(uds_path).map_err(|source| HandshakeError::Connect {
        path: uds_path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(connect_request_line(port).as_bytes())?;
    let line = match read_handshake_line(&mut stream) {
        Ok(Some(line)) => line,
        Ok(None) => return Err(HandshakeError::Refused { port }),
        Err(HandshakeError::Io(e))
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
        {
            return Err(HandshakeError::Timeout(timeout))
        }
        // A reset instead of an orderly close also means the guest refused.
        Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Err(HandshakeError::Refused { port })
        }
        Err(e) => return Err(e),
    };
    parse_connect_reply(&line)?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// [`connect`], retried while the VMM socket does not exist yet or the guest does not listen yet
/// (the agent is still starting), until `overall` has passed.
pub fn connect_with_retry(
    uds_path: &Path,
    port: u32,
    overall: Duration,
) -> Result<UnixStream, HandshakeError> {
    let deadline = Instant::now() + overall;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match connect(uds_path, port, remaining.max(Duration::from_millis(1))) {
            Err(error) if is_not_ready(&error) && Instant::now() + RETRY_INTERVAL < deadline => {
                std::thread::sleep(RETRY_INTERVAL)
            }
            result => return result,
        }
    }
}

fn is_not_ready(error: &HandshakeError) -> bool {
    match error {
        HandshakeError::Refused { .. } => true,
        HandshakeError::Connect { source, .. } => {
            matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines_round_trip() {
        assert_eq!(connect_request_line(1024), "CONNECT 1024\n");
        assert_eq!(parse_connect_request("CONNECT 1024").unwrap(), 1024);
        assert_eq!(
            parse_connect_reply(connect_reply_line(1073741824).trim_end()).unwrap(),
            1073741824
        );
    }

    #[test]
    fn malformed_handshake_lines_are_rejected() {
        for bad in
            ["", "OK", "OK ", "OK x", "OK -1", "OK +1", "OK 1 2", "ok 1", "OK  1", "OK 99999999999"]
        {
            assert!(parse_connect_reply(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_connect_request("CONNECT").is_err());
        assert!(parse_connect_request("OK 5").is_err());
    }

    #[test]
    fn handshake_line_reader_stops_at_the_newline() {
        let mut input: &[u8] = b"OK 5\n{\"id\":1}";
        assert_eq!(read_handshake_line(&mut input).unwrap().as_deref(), Some("OK 5"));
        assert_eq!(input, b"{\"id\":1}");
        let mut closed: &[u8] = b"";
        assert!(read_handshake_line(&mut closed).unwrap().is_none());
        let mut endless: &[u8] = &[b'O'; 100];
        assert!(matches!(read_handshake_line(&mut endless), Err(HandshakeError::Malformed { .. })));
    }
}
