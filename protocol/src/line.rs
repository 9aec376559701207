//! Newline framing with a maximum line length, shared by the agent (requests) and the client
//! (responses).

use std::io::{self, Read};

/// How much is read from the stream at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// A line longer than the limit; it has been skipped entirely (up to and including its
    /// newline), so the next call returns the line after it.
    #[error("line longer than {max_bytes} bytes")]
    TooLong { max_bytes: usize },
    /// The peer closed the stream. `unterminated_bytes` > 0: it closed in the middle of a line.
    #[error("stream closed ({unterminated_bytes} bytes of an unterminated line)")]
    Closed { unterminated_bytes: usize },
    /// A read failed; on a timeout (`WouldBlock`/`TimedOut`) the partial line is kept and the
    /// next call continues it.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Splits a byte stream into lines without ever holding more than one maximal line (plus one
/// read chunk) in memory. Keeps its state across calls, so it survives read timeouts.
#[derive(Debug)]
pub struct LineBuffer {
    pending: Vec<u8>,
    /// `pending[..scanned]` is known to contain no newline.
    scanned: usize,
    max_line_bytes: usize,
    /// Inside an over-long line, whose bytes are being dropped until its newline.
    discarding: bool,
}

impl LineBuffer {
    pub fn new(max_line_bytes: usize) -> Self {
        LineBuffer { pending: Vec::new(), scanned: 0, max_line_bytes, discarding: false }
    }

    /// The next line from `source`, without its `\n`.
    pub fn read_line(&mut self, source: &mut impl Read) -> Result<Vec<u8>, LineError> {
        loop {
            if let Some(found) = memchr_newline(&self.pending[self.scanned..]) {
                let newline_at = self.scanned + found;
                let mut line: Vec<u8> = self.pending.drain(..=newline_at).collect();
                line.pop();
                self.scanned = 0;
                if std::mem::take(&mut self.discarding) || line.len() > self.max_line_bytes {
                    return Err(LineError::TooLong { max_bytes: self.max_line_bytes });
                }
                return Ok(line);
            }
            if self.pending.len() > self.max_line_bytes {
                self.discarding = true;
            }
            if self.discarding {
                self.pending.clear();
            }
            self.scanned = self.pending.len();

            let start = self.pending.len();
            self.pending.resize(start + READ_CHUNK_BYTES, 0);
            let read = source.read(&mut self.pending[start..]);
            self.pending.truncate(start + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => {
                    let unterminated_bytes = self.pending.len();
                    self.pending.clear();
                    self.scanned = 0;
                    self.discarding = false;
                    return Err(LineError::Closed { unterminated_bytes });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its data in fixed-size pieces, like a socket would.
    struct Trickle<'a> {
        data: &'a [u8],
        piece: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.piece.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn lines_of(data: &[u8], piece: usize, max: usize) -> Vec<Result<Vec<u8>, String>> {
        let mut source = Trickle { data, piece };
        let mut buffer = LineBuffer::new(max);
        let mut out = Vec::new();
        loop {
            match buffer.read_line(&mut source) {
                Ok(line) => out.push(Ok(line)),
                Err(LineError::Closed { unterminated_bytes }) => {
                    out.push(Err(format!("closed {unterminated_bytes}")));
                    return out;
                }
                Err(e) => out.push(Err(e.to_string())),
            }
        }
    }

    #[test]
    fn splits_lines_across_read_boundaries() {
        for piece in [1, 2, 3, 7, 1 << 20] {
            assert_eq!(
                lines_of(b"ab\n\ncde\n", piece, 10),
                vec![
                    Ok(b"ab".to_vec()),
                    Ok(Vec::new()),
                    Ok(b"cde".to_vec()),
                    Err("closed 0".into())
                ],
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn over_long_line_is_skipped_and_the_next_line_survives() {
        let mut data = vec![b'x'; 200_000];
        data.extend_from_slice(b"\nok\nexactly10\n12345678901\nend");
        for piece in [1000, 1 << 20] {
            assert_eq!(
                lines_of(&data, piece, 10),
                vec![
                    Err("line longer than 10 bytes".into()),
                    Ok(b"ok".to_vec()),
                    Ok(b"exactly10".to_vec()),
                    Err("line longer than 10 bytes".into()),
                    Err("closed 3".into())
                ],
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn read_timeout_keeps_the_partial_line() {
        struct Stutter {
            steps: Vec<io::Result<&'static [u8]>>,
        }
        impl Read for Stutter {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.steps.remove(0) {
                    Ok(bytes) => {
                        buf[..bytes.len()].copy_from_slice(bytes);
                        Ok(bytes.len())
                    }
                    Err(e) => Err(e),
                }
            }
        }
        let mut source = Stutter {
            steps: vec![Ok(b"{\"id\""), Err(io::ErrorKind::WouldBlock.into()), Ok(b":1}\n")],
        };
        let mut buffer = LineBuffer::new(100);
        assert!(matches!(
            buffer.read_line(&mut source),
            Err(LineError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock
        ));
        assert_eq!(buffer.read_line(&mut source).unwrap(), b"{\"id\":1}");
    }
}
