//! Helpers shared by the integration tests that run the termlab binary.

use std::process::Output;

/// A finished command's exit status, stdout and stderr, for assertion messages.
pub fn explain(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
