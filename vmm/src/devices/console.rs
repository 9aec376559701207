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
    tail: Mutex<VecDeque<u8>>,
    grew: Condvar,
}

impl ConsoleLog {
    fn append(&self, bytes: &[u8]) {
        let mut tail = lock(&self.tail);
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
        self.grew.notify_all();
    }

    /// The retained console output, lossily decoded.
    pub fn text(&self) -> String {
        let tail = lock(&self.tail);
        let (a, b) = tail.as_slices();
        let mut s = String::from_utf8_lossy(a).into_owned();
        s.push_str(&String::from_utf8_lossy(b));
        s
    }

    /// Waits until `needle` appears in the retained output; false on timeout.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut tail = lock(&self.tail);
        loop {
            let (a, b) = tail.as_slices();
            let mut joined = a.to_vec();
            joined.extend_from_slice(b);
            if String::from_utf8_lossy(&joined).contains(needle) {
                return true;
            }
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
