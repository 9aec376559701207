//! termlab's harness: scenario files, the run engine, results and reports.
//! The `termlab` binary (main.rs) is a thin CLI over these modules.

pub mod report;
pub mod results;
pub mod scenario;
pub mod stats;
