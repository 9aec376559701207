//! `termlab run --junit FILE`: the run as JUnit XML, for CI test reports.
//!
//! One `<testsuite>` per scenario and one `<testcase>` per expectation; a
//! failed expectation's `<failure>` carries the check and what was observed;
//! a run that stopped early adds a `run` testcase with an `<error>` whose
//! type is the exit class (finding, infrastructure, interrupted).
//! `<system-out>` holds the end of the guest console. The document is valid
//! against both the strict Ant schema and Jenkins' xUnit one
//! (termlab/tests/data/junit/), so: no attributes on `<testsuites>`, a
//! time-zone-less `timestamp`, every required element present.

use std::fmt::Write as _;
use std::path::Path;

use crate::exit::ExitClass;
use crate::results::{self, ResultsError, RunResult};

/// Console lines kept in a suite's `<system-out>`.
pub const CONSOLE_TAIL_LINES: usize = 100;

/// One scenario of the run, as far as it got.
pub struct ScenarioReport<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    /// Its result, when the run got as far as its results directory.
    pub result: Option<&'a RunResult>,
    /// Where that result is.
    pub dir: Option<&'a Path>,
    /// Wall-clock seconds the scenario took.
    pub seconds: f64,
    /// The end of the guest console.
    pub console_tail: Vec<String>,
    /// Why it stopped early.
    pub error: Option<RunError>,
}

pub struct RunError {
    pub class: ExitClass,
    pub message: String,
}

/// The JUnit document of `reports`. `timestamp` (RFC 3339 UTC) and
/// `hostname` stand in for scenarios without a result.
pub fn junit_xml(reports: &[ScenarioReport<'_>], timestamp: &str, hostname: &str) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for (id, report) in reports.iter().enumerate() {
        write_suite(&mut xml, id, report, timestamp, hostname);
    }
    xml.push_str("</testsuites>\n");
    xml
}

/// Writes the document atomically (a CI step never reads half of it).
pub fn write_junit(path: &Path, xml: &str) -> Result<(), ResultsError> {
    results::write_atomically(path, xml.as_bytes())
}

fn write_suite(
    xml: &mut String,
    id: usize,
    report: &ScenarioReport<'_>,
    timestamp: &str,
    hostname: &str,
) {
    let expectations = report.result.map_or(&[][..], |r| r.expectations.as_slice());
    let failures = expectations.iter().filter(|e| !e.passed).count();
    let errors = usize::from(report.error.is_some());
    let started = report.result.map_or(timestamp, |r| r.started_at.as_str());
    let host = report
        .result
        .map(|r| r.environment.host.hostname.as_str())
        .filter(|h| !h.trim().is_empty())
        .unwrap_or(hostname);
    let host = if host.trim().is_empty() { "localhost" } else { host };
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{}\" package=\"termlab\" id=\"{id}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"0\" time=\"{:.3}\" timestamp=\"{}\" hostname=\"{}\">",
        attribute(report.name),
        expectations.len() + errors,
        report.seconds.max(0.0),
        attribute(&junit_timestamp(started)),
        attribute(host),
    );
    xml.push_str("    <properties>\n");
    for (name, value) in properties(report) {
        let _ = writeln!(
            xml,
            "      <property name=\"{}\" value=\"{}\"/>",
            attribute(name),
            attribute(&value)
        );
    }
    xml.push_str("    </properties>\n");
    let classname = attribute(&format!("termlab.{}", report.name));
    for expectation in expectations {
        let _ = write!(
            xml,
            "    <testcase name=\"{}\" classname=\"{classname}\" time=\"0\"",
            attribute(&expectation.name)
        );
        if expectation.passed {
            xml.push_str("/>\n");
            continue;
        }
        let repetitions = report.result.map_or(0, |r| r.scenario.repetitions);
        let failed: Vec<String> =
            expectation.failed_repetitions.iter().map(u32::to_string).collect();
        let body = format!(
            "check: {}\nobserved: {}\nfailed in repetitions (0-based, of {repetitions}): {}",
            expectation.check,
            expectation.detail,
            if failed.is_empty() { "-".to_owned() } else { failed.join(", ") }
        );
        let _ = write!(
            xml,
            ">\n      <failure type=\"expectation\" message=\"{}\">{}</failure>\n    </testcase>\n",
            attribute(&format!("{}: observed {}", expectation.check, expectation.detail)),
            text(&body)
        );
    }
    if let Some(error) = &report.error {
        let first_line = error.message.lines().next().unwrap_or_default();
        let _ = write!(
            xml,
            "    <testcase name=\"run\" classname=\"{classname}\" time=\"{:.3}\">\n      <error type=\"{}\" message=\"{}\">{}</error>\n    </testcase>\n",
            report.seconds.max(0.0),
            error.class.name(),
            attribute(first_line),
            text(&error.message)
        );
    }
    let console = report.console_tail.join("\n");
    let _ = writeln!(xml, "    <system-out>{}</system-out>", text(&console));
    let stderr = report.error.as_ref().map_or("", |e| e.message.as_str());
    let _ = writeln!(xml, "    <system-err>{}</system-err>", text(stderr));
    xml.push_str("  </testsuite>\n");
}

fn properties(report: &ScenarioReport<'_>) -> Vec<(&'static str, String)> {
    let mut properties = vec![("scenario.path", report.path.display().to_string())];
    if let Some(dir) = report.dir {
        properties.push(("results.dir", dir.display().to_string()));
    }
    if let Some(result) = report.result {
        let environment = &result.environment;
        properties.extend([
            ("scenario.description", result.scenario.description.clone()),
            ("repetitions.requested", result.scenario.repetitions.to_string()),
            ("repetitions.completed", result.repetitions.len().to_string()),
            ("complete", result.complete.to_string()),
            ("kernel.variant", environment.kernel.variant.clone()),
            ("kernel.dir", environment.kernel.dir.clone()),
            ("vm.vcpus", environment.vm.vcpus.to_string()),
            ("vm.memory_mib", environment.vm.memory_mib.to_string()),
            ("nested", environment.nested.to_string()),
            ("termlab.version", environment.termlab_version.clone()),
        ]);
        if let Some(version) = &environment.kernel.source_version {
            properties.push(("kernel.source_version", version.clone()));
        }
        for metric in &result.summary {
            let s = &metric.summary;
            properties.push((
                "metric",
                format!(
                    "{}: n={} p50={:.0} ns p99={:.0} ns max={:.0} ns",
                    metric.metric, s.n, s.p50_ns, s.p99_ns, s.max_ns
                ),
            ));
        }
    }
    properties
}

/// `2026-05-01T10:20:30Z` → `2026-05-01T10:20:30` (the Ant schema's
/// timestamp has no time zone; termlab's times are UTC).
fn junit_timestamp(rfc3339: &str) -> String {
    rfc3339.get(..19).unwrap_or(rfc3339).to_owned()
}

/// Characters XML 1.0 allows (console logs carry escape codes and NULs).
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
        || c >= '\u{10000}'
}

fn escape(value: &str, in_attribute: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars().filter(|&c| xml_char(c)) {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if in_attribute => out.push_str("&quot;"),
            '\n' if in_attribute => out.push_str("&#10;"),
            '\r' if in_attribute => out.push_str("&#13;"),
            '\t' if in_attribute => out.push_str("&#9;"),
            // A bare CR in text would be read back as a line end.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

fn attribute(value: &str) -> String {
    escape(value, true)
}

fn text(value: &str) -> String {
    escape(value, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_attributes_are_escaped_and_invalid_characters_dropped() {
        assert_eq!(text("a<b & c>d \"q\""), "a&lt;b &amp; c&gt;d \"q\"");
        assert_eq!(attribute("x=\"1\"\ny"), "x=&quot;1&quot;&#10;y");
        assert_eq!(text("\u{1b}[0mok\u{0}\u{7}\r\n"), "[0mok&#13;\n");
    }

    #[test]
    fn timestamps_lose_their_zone() {
        assert_eq!(junit_timestamp("2026-05-01T10:20:30Z"), "2026-05-01T10:20:30");
    }
}
