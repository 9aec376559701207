//! Where the guest serial console goes: a file and/or stdout, plus an in-memory tail that
//! the VMM uses to recognise a kernel panic and that callers can wait on for markers.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// How much console output is kept for panic reports and marker searches.
const TAIL_BYTES: usize = 256 * 1024;

/// The retained console tail; shared between the serial device and API callers.
#[derive(Default)]
pub struct ConsoleLog {
    tail: Mutex<Tail>,
    grew: Condvar,
}

#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    /// Bytes ever appended; `total - bytes.len()` is the stream offset of `bytes[0]`.
    total: u64,
}

impl ConsoleLog {
    fn append(&self, bytes: &[u8]) {
        let mut tail = lock(&self.tail);
        tail.bytes.extend(bytes);
        tail.total += bytes.len() as u64;
        let excess = tail.bytes.len().saturating_sub(TAIL_BYTES);
        tail.bytes.drain(..excess);
        self.grew.notify_all();
    }

    /// The retained console output, lossily decoded.
    pub fn text(&self) -> String {
        let tail = lock(&self.tail);
        let (a, b) = tail.bytes.as_slices();
        let mut s = String::from_utf8_lossy(a).into_owned();
        s.push_str(&String::from_utf8_lossy(b));
        s
    }

    /// Waits until `needle` appears in the retained output; false on timeout. Each wakeup
    /// only scans bytes not scanned before (the serial device appends byte by byte, and the
    /// vCPU waits for this lock meanwhile).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let needle = needle.as_bytes();
        let deadline = Instant::now() + timeout;
        let mut tail = lock(&self.tail);
        // Stream offset from which a match may still start.
        let mut scan_from = 0u64;
        loop {
            let first = tail.total - tail.bytes.len() as u64;
            let start = scan_from.saturating_sub(first) as usize;
            let bytes = tail.bytes.make_contiguous();
            if bytes.get(start..).is_some_and(|new| new.windows(needle.len()).any(|w| w == needle))
            {
                return true;
            }
            scan_from = tail.total.saturating_sub(needle.len().saturating_sub(1) as u64);
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tail = self
                .grew
                .wait_timeout(tail, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// The serial device's output sink.
pub struct ConsoleSink {
    file: Option<File>,
    to_stdout: bool,
    log: Arc<ConsoleLog>,
}

impl ConsoleSink {
    pub fn new(file: Option<File>, to_stdout: bool, log: Arc<ConsoleLog>) -> Self {
        Self { file, to_stdout, log }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.append(buf);
        if let Some(file) = &mut self.file {
            file.write_all(buf)?;
        }
        if self.to_stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            file.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_finds_markers_split_across_appends_and_times_out_otherwise() {
        let log = Arc::new(ConsoleLog::default());
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                for byte in b"noise MARK" {
                    std::thread::sleep(Duration::from_millis(2));
                    log.append(&[*byte]);
                }
                log.append(b"ER done\r\n");
            })
        };
        assert!(log.wait_for("MARKER done", Duration::from_secs(5)));
        writer.join().expect("writer");
        assert!(!log.wait_for("absent", Duration::from_millis(50)));
        assert_eq!(log.text(), "noise MARKER done\r\n");
    }
}
