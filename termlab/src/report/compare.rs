//! The report of `termlab compare`: verdicts per metric and expectation,
//! the method, overlaid CDFs and both environments.

use std::path::Path;

use super::plot::Unit;
use super::{environment_table, overlaid_cdf_figure, run_label, Block, Document, ReportError};
use crate::compare::{Comparison, ExpectationChange, Verdict, MIN_SAMPLES, PERCENTILES};
use crate::results::RunResult;
use crate::stats::RatioEstimate;

/// The comparison of NEW (read from `new_dir`) against BASE (`base_dir`).
pub fn compare_document(
    base: (&RunResult, &Path),
    new: (&RunResult, &Path),
    comparison: &Comparison,
) -> Result<Document, ReportError> {
    let ((base, base_dir), (new, new_dir)) = (base, new);
    let mut doc = Document::new(format!(
        "termlab compare: {} — {}",
        new.scenario.name,
        if comparison.regressed() { "REGRESSED" } else { "no regression" }
    ));
    let labels = [format!("base: {}", run_label(base)), format!("new: {}", run_label(new))];
    doc.push(Block::Paragraph(format!(
        "Base: {} ({} repetitions). New: {} ({} repetitions). Threshold ±{}%.",
        base_dir.display(),
        base.repetitions.len(),
        new_dir.display(),
        new.repetitions.len(),
        comparison.threshold_pct
    )));
    for caveat in &comparison.caveats {
        doc.push(Block::Paragraph(format!("Caveat: {caveat}.")));
    }

    doc.push(Block::Heading("Metrics".into()));
    let confidence = format!("{:.0}% CI", comparison.bootstrap.confidence * 100.0);
    let mut header = vec!["metric".to_owned(), "n base / new".to_owned()];
    for p in PERCENTILES {
        header.push(format!("p{p:.0} base → new"));
        header.push(format!("p{p:.0} change [{confidence}]"));
    }
    header.push("verdict".to_owned());
    let rows = comparison
        .metrics
        .iter()
        .map(|m| {
            let mut row = vec![m.metric.clone(), format!("{} / {}", m.base_n, m.new_n)];
            if m.changes.is_empty() {
                for _ in PERCENTILES {
                    row.extend(["–".to_owned(), format!("fewer than {MIN_SAMPLES} samples")]);
                }
            }
            for change in &m.changes {
                row.push(values(change));
                row.push(format_change(change));
            }
            row.push(m.verdict.as_str().to_owned());
            row
        })
        .collect();
    let highlight = comparison.metrics.iter().map(|m| m.verdict == Verdict::Regressed).collect();
    doc.push(Block::Table { header, rows, highlight });
    let not_judged = |why: &str, names: &[String]| {
        (!names.is_empty()).then(|| format!("Not judged ({why}): {}.", names.join(", ")))
    };
    for note in [
        not_judged("only in the base run", &comparison.metrics_only_in_base),
        not_judged("only in the new run", &comparison.metrics_only_in_new),
        not_judged("not selected with --metric", &comparison.metrics_not_selected),
    ]
    .into_iter()
    .flatten()
    {
        doc.push(Block::Paragraph(note));
    }

    doc.push(Block::Heading("Expectations".into()));
    let shown = |passed: Option<bool>| match passed {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "–",
    };
    doc.push(Block::Table {
        header: ["expectation", "base", "new", "change"].map(String::from).to_vec(),
        rows: comparison
            .expectations
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    shown(e.base_passed).to_owned(),
                    shown(e.new_passed).to_owned(),
                    e.change.as_str().to_owned(),
                ]
            })
            .collect(),
        highlight: comparison
            .expectations
            .iter()
            .map(|e| e.change == ExpectationChange::Regressed)
            .collect(),
    });

    doc.push(Block::Heading("Method".into()));
    let b = comparison.bootstrap;
    doc.push(Block::Paragraph(format!(
        "Per metric measured in both runs, the change of the p50 and of the p99 (nearest rank) is the ratio new / base. Its {confidence} is a percentile bootstrap over the raw per-repetition samples: {} times, each run's samples are resampled with replacement to their own count and the ratio of the resamples' percentiles recorded; the interval runs from the {:.1}th to the {:.1}th percentile of those ratios (seed {:#x}, mixed with the metric's name: the same runs always give the same intervals). A percentile regressed when its whole interval lies above +{t}% (improved: below −{t}%); a metric regressed when its p50 or its p99 did, else improved when either did, else it is unchanged; with fewer than {MIN_SAMPLES} samples on a side it is not judged. An expectation that passed in base and fails in new is a regression too. `termlab compare` exits 1 on any regression.",
        b.resamples,
        (1.0 - b.confidence) / 2.0 * 100.0,
        (1.0 + b.confidence) / 2.0 * 100.0,
        b.seed,
        t = comparison.threshold_pct
    )));

    doc.push(Block::Heading("Plots".into()));
    let (base_samples, new_samples) = (base.metric_samples(), new.metric_samples());
    let of = |samples: &[(String, Vec<f64>)], metric: &str| {
        samples.iter().find(|(m, _)| m == metric).map(|(_, values)| values.clone())
    };
    for m in &comparison.metrics {
        let pair: Vec<(String, Vec<f64>)> = [
            (labels[0].clone(), of(&base_samples, &m.metric)),
            (labels[1].clone(), of(&new_samples, &m.metric)),
        ]
        .into_iter()
        .filter_map(|(label, values)| Some((label, values?)))
        .collect();
        doc.push(overlaid_cdf_figure(&m.metric, &pair)?);
    }

    doc.push(Block::Heading("Environment".into()));
    doc.push(environment_table(&[base, new]));
    Ok(doc)
}

/// `p base → p new` in a unit fitting both.
fn values(change: &RatioEstimate) -> String {
    let unit = Unit::for_max_ns(change.base_ns.max(change.new_ns));
    format!("{} → {}", unit.format(change.base_ns), unit.format(change.new_ns))
}

/// `+30.1% [+28.0%, +32.4%]`.
fn format_change(change: &RatioEstimate) -> String {
    let percent = |ratio: f64| {
        if ratio.is_finite() {
            format!("{:+.1}%", (ratio - 1.0) * 100.0)
        } else {
            "+∞".to_owned()
        }
    };
    format!("{} [{}, {}]", percent(change.ratio), percent(change.low), percent(change.high))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{compare, DEFAULT_THRESHOLD_PCT};

    #[test]
    fn a_regression_is_marked_in_title_table_and_plots() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results/example/budget");
        let base = RunResult::load(&dir).expect("example loads");
        let mut new = base.clone();
        for repetition in &mut new.repetitions {
            repetition.metrics.values_mut().for_each(|v| *v *= 1.3);
        }
        let comparison = compare(&base, &new, DEFAULT_THRESHOLD_PCT, &[]).expect("comparable");
        let doc = compare_document((&base, &dir), (&new, &dir), &comparison).expect("rendered");
        let md = doc.to_markdown();
        assert!(md.starts_with("# termlab compare: budget — REGRESSED\n"), "{md}");
        // The tight 200 ms budget stops show it; agent_rtt (2..13 ms) cannot.
        assert!(md.contains("| **fresh_stop** |"), "{md}");
        assert!(md.contains("| agent_rtt |"), "{md}");
        assert!(md.contains("**regressed**"));
        assert!(md.contains("+30.0% ["), "{md}");
        assert!(md.contains("percentile bootstrap"));
        assert_eq!(doc.figures().count(), comparison.metrics.len());
        let html = doc.to_html();
        assert_eq!(html.matches("<svg").count(), comparison.metrics.len());
        assert!(html.contains("base: budget") && html.contains("new: budget"));
    }
}
