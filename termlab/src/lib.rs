//! termlab's harness: scenario files, the run engine, results and reports.
//! The `termlab` binary (main.rs) is a thin CLI over these modules.

pub mod bench;
pub mod cancel;
pub mod compare;
pub mod engine;
pub mod environment;
pub mod evaluate;
pub mod exec;
pub mod exit;
pub mod guest_image;
pub mod junit;
pub mod kernel_trace;
pub mod progress;
pub mod report;
pub mod results;
pub mod scenario;
pub mod selection;
pub mod stack_proof;
pub mod stats;
pub mod ui;
pub mod user_programs;
pub mod vmtest;
