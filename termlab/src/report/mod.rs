//! Reports: `report.md` and a self-contained `report.html` for one run, and
//! a side-by-side comparison of several runs.
//!
//! Both formats render the same [`Document`], so the Markdown and the HTML
//! can never disagree about a number.

mod bench;
mod compare;
mod document;
pub mod plot;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use compare::compare_document;
pub use document::{Block, Document};

use crate::results::stack::AddrClass;
use crate::results::{write_atomically, ResultsError, RunResult, StepRecord, IPI_RTT_METRIC};
use plot::{PlotError, Series, Unit};

#[derive(Debug, Error)]
pub enum ReportError {
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error(transparent)]
    Plot(#[from] PlotError),
}

pub const MARKDOWN_FILE: &str = "report.md";
pub const HTML_FILE: &str = "report.html";

/// Writes report.md, report.html and the plots' .svg files (which report.md
/// links; report.html inlines them) into `dir`.
pub fn write_run_report(result: &RunResult, dir: &Path) -> Result<(), ReportError> {
    let document = run_document(result)?;
    write_document(&document, dir)
}

/// Writes the benchmark's report.md, report.html and plots into `dir`.
pub fn write_bench_report(
    result: &crate::results::bench::BenchResult,
    dir: &Path,
) -> Result<(), ReportError> {
    write_document(&bench::bench_document(result)?, dir)
}

/// Writes `document` as Markdown + HTML + SVG files into `dir`.
pub fn write_document(document: &Document, dir: &Path) -> Result<(), ReportError> {
    for (file_name, svg) in document.figures() {
        write_atomically(&dir.join(file_name), svg.as_bytes())?;
    }
    write_atomically(&dir.join(MARKDOWN_FILE), document.to_markdown().as_bytes())?;
    write_atomically(&dir.join(HTML_FILE), document.to_html().as_bytes())?;
    Ok(())
}

fn verdict(result: &RunResult) -> &'static str {
    match (result.complete, result.all_expectations_passed()) {
        (false, _) => "INCOMPLETE",
        (true, true) => "PASS",
        (true, false) => "FAIL",
    }
}

/// The report of one run.
pub fn run_document(result: &RunResult) -> Result<Document, ReportError> {
    let mut doc =
        Document::new(format!("termlab run: {} — {}", result.scenario.name, verdict(result)));
    doc.push(Block::Paragraph(result.scenario.description.clone()));
    if let Some(reason) = &result.incomplete_reason {
        doc.push(Block::Paragraph(format!("The run is incomplete: {reason}")));
    }

    doc.push(Block::Heading("Expectations".into()));
    doc.push(Block::Table {
        header: vec!["".into(), "expectation".into(), "check".into(), "observed".into()],
        rows: result
            .expectations
            .iter()
            .map(|e| {
                vec![
                    if e.passed { "pass" } else { "FAIL" }.into(),
                    e.name.clone(),
                    e.check.clone(),
                    e.detail.clone(),
                ]
            })
            .collect(),
        highlight: result.expectations.iter().map(|e| !e.passed).collect(),
    });

    doc.push(Block::Heading("Summary".into()));
    doc.push(Block::Paragraph(format!(
        "{} repetitions; times on the guest's CLOCK_MONOTONIC. Ratios are to the median bare IPI round trip (`{IPI_RTT_METRIC}`) measured in the same guest: under nested virtualisation absolute times are emulated, ratios travel.",
        result.repetitions.len()
    )));
    for void in &result.void_repetitions {
        doc.push(Block::Paragraph(format!(
            "Repetition {} tested nothing once and was run again: {}.",
            void.index, void.reason
        )));
    }
    if let Some(split) = measured_split(result) {
        doc.push(Block::Paragraph(split));
    }
    doc.push(summary_table(result));

    mechanism_timeline(result, &mut doc);
    stack_tables(result, &mut doc);
    if let Some(timings) = &result.timings {
        doc.push(Block::Heading("Where the run's time went".into()));
        doc.push(Block::Paragraph(format!("Host wall clock: {}.", timings.line())));
    }

    doc.push(Block::Heading("Plots".into()));
    for (metric, samples) in result.metric_samples() {
        let cdf = plot::cdf_svg(
            &format!("{metric}: CDF"),
            &[Series { label: &metric, samples_ns: &samples }],
        )?;
        doc.push(Block::Figure {
            file_name: format!("{metric}-cdf.svg"),
            caption: format!("{metric}: cumulative distribution"),
            svg: cdf,
        });
        let histogram = plot::histogram_svg(&format!("{metric}: histogram"), &samples)?;
        doc.push(Block::Figure {
            file_name: format!("{metric}-histogram.svg"),
            caption: format!("{metric}: histogram"),
            svg: histogram,
        });
    }

    doc.push(Block::Heading("Environment".into()));
    doc.push(environment_table(&[result]));
    Ok(doc)
}

/// Which repetitions the summary comes from, when the VMM stopped the vCPUs in only some.
fn measured_split(result: &RunResult) -> Option<String> {
    let measured = result.measured_repetitions().count();
    (measured < result.repetitions.len()).then(|| {
        let stopped: Vec<String> = result
            .repetitions
            .iter()
            .filter(|rep| rep.vmm_stops)
            .map(|rep| format!("#{}", rep.index))
            .collect();
        format!(
            "Timings from the {measured} repetitions that ran untouched. In {} ({}) the VMM \
             stopped the vCPUs at the handler to read their stacks (`verify_stack = \"alternate\"`), \
             while the guest's clock ran on: those prove the rewrite below, and their timings \
             are in result.json only.",
            stopped.len(),
            stopped.join(", ")
        )
    })
}

/// The first measured repetition's first terminate call that stopped a run, as the kernel traced it:
/// each point in time from the request to the run's return, with the part each step took
/// and that part as a multiple of the repetition's bare IPI round trip.
fn mechanism_timeline(result: &RunResult, doc: &mut Document) {
    let Some((rep, label, kernel, trapped)) = result.measured_repetitions().find_map(|rep| {
        rep.steps.iter().find_map(|step| match step {
            StepRecord::Terminate { label, kernel: Some(kernel), stack, .. }
                if !kernel.handlers.is_empty() && kernel.request_ns.is_some() =>
            {
                Some((rep, label, kernel, !stack.is_empty()))
            }
            _ => None,
        })
    }) else {
        return;
    };
    let Some(request) = kernel.request_ns else { return };
    let mut points: Vec<(u64, String)> = vec![(request, "BPF_PROG_TERMINATE entered".into())];
    for handler in &kernel.handlers {
        let cpu = handler.cpu;
        points.extend(handler.sent_ns.map(|t| (t, format!("IPI to CPU {cpu} sent"))));
        points.extend(handler.entry_ns.map(|t| (t, format!("handler began on CPU {cpu}"))));
        points.push((handler.ts_ns, format!("handler done on CPU {cpu} (case {})", handler.case)));
    }
    points.extend(kernel.done_ns.map(|t| (t, "BPF_PROG_TERMINATE returns".into())));
    points.extend(
        kernel
            .helper_returns
            .iter()
            .map(|r| (r.ts_ns, format!("the interrupted helper returned on CPU {}", r.cpu))),
    );
    points.extend(
        kernel.returns.iter().map(|r| (r.ts_ns, format!("the run returned on CPU {}", r.cpu))),
    );
    points.sort_by_key(|(t, _)| *t);
    let ipi = rep.metrics.get(IPI_RTT_METRIC).copied().filter(|ns| *ns > 0.0);
    let mut previous = request;
    let rows = points
        .iter()
        .map(|&(t, ref what)| {
            let step = t.saturating_sub(previous);
            previous = t;
            vec![
                what.clone(),
                format!("{:.1}", t.saturating_sub(request) as f64 / 1e3),
                format!("{:.1}", step as f64 / 1e3),
                ipi.map_or(String::new(), |ipi| format!("{:.1}", step as f64 / ipi)),
            ]
        })
        .collect::<Vec<_>>();
    doc.push(Block::Heading("Mechanism timeline".into()));
    let traps = if trapped {
        " With `verify_stack` the VMM stops the vCPU at the handler's entry and after its rewrite to read its stack: the handler's start and the call's return include those stops."
    } else {
        ""
    };
    doc.push(Block::Paragraph(format!(
        "`{label}` in repetition #{}, from the kernel's trace events (guest CLOCK_MONOTONIC). Kernels without patch 0019 show no IPI or handler-entry points.{traps}",
        rep.index
    )));
    doc.push(Block::Table {
        header: ["point", "µs after the request", "µs since the previous", "× IPI round trip"]
            .map(String::from)
            .to_vec(),
        highlight: vec![false; rows.len()],
        rows,
    });
}

/// `verify_stack`: for each terminate step, the stack of the first failing
/// repetition (else the first) as the VMM read it before and after the
/// kernel's handler, every code word annotated, changed words highlighted.
fn stack_tables(result: &RunResult, doc: &mut Document) {
    let terminates = result
        .repetitions
        .iter()
        .flat_map(|rep| rep.steps.iter().map(move |step| (rep.index, step)));
    let mut shown = std::collections::BTreeMap::new();
    for (index, step) in terminates {
        let StepRecord::Terminate { label, stack, .. } = step else { continue };
        let failing = stack
            .iter()
            .any(|p| p.error.is_some() || p.verdict.as_ref().is_some_and(|v| !v.passed()));
        let slot = shown.entry(label.clone()).or_insert((index, stack, failing));
        if failing && !slot.2 {
            *slot = (index, stack, failing);
        }
    }
    if shown.values().all(|(_, stack, _)| stack.is_empty()) {
        return;
    }
    doc.push(Block::Heading("Stack rewrite, read from the VMM".into()));
    for (label, (index, stack, _)) in shown {
        for proof in stack {
            let Some(v) = &proof.verdict else {
                doc.push(Block::Paragraph(format!(
                    "`{label}`, repetition #{index}, vCPU {}: {}",
                    proof.vcpu,
                    match (&proof.error, proof.untouched) {
                        (Some(error), _) => error.as_str(),
                        (None, true) => "the handler ran and rewrote nothing",
                        (None, false) => "no snapshots",
                    }
                )));
                continue;
            };
            let ip = |addr: u64| format!("{addr:#x}");
            doc.push(Block::Paragraph(format!(
                "`{label}`, repetition #{index}, vCPU {}: case {}; saved IP {} → {}; {} word(s) into the program before, {} after, {} rewritten. {}",
                proof.vcpu,
                v.case,
                ip(v.ip_before),
                ip(v.ip_after),
                v.original_before,
                v.original_after,
                v.rewritten,
                if v.passed() { "Verified.".to_owned() } else { format!("**Wrong:** {}", v.problems.join("; ")) }
            )));
            let class = |c: &AddrClass| match c {
                AddrClass::Original { func, .. } => format!("program f{func}"),
                AddrClass::Copy { func, .. } => format!("copy f{func}"),
                AddrClass::OriginalEntry { func } => {
                    format!("program f{func} entry (a callback pointer)")
                }
                AddrClass::KernelText => "kernel".to_owned(),
                AddrClass::Other => "data".to_owned(),
            };
            let rows: Vec<Vec<String>> = v
                .rows
                .iter()
                .map(|r| {
                    vec![
                        format!("{:#x}", r.addr),
                        format!("{:#018x}", r.before),
                        format!("{} {}", class(&r.before_class), r.before_at),
                        format!("{:#018x}", r.after),
                        format!("{} {}", class(&r.after_class), r.after_at),
                        r.predicted.map_or(String::new(), |p| {
                            if p == r.after {
                                "= predicted".to_owned()
                            } else {
                                format!("predicted {p:#x}")
                            }
                        }),
                    ]
                })
                .collect();
            doc.push(Block::Table {
                header: ["slot", "before", "points to", "after", "points to", "kernel map"]
                    .map(String::from)
                    .to_vec(),
                highlight: v
                    .rows
                    .iter()
                    .map(|r| r.before != r.after || r.after_class.is_original())
                    .collect(),
                rows,
            });
        }
    }
}

fn summary_table(result: &RunResult) -> Block {
    let mut rows = Vec::new();
    for metric in &result.summary {
        let s = &metric.summary;
        let unit = Unit::for_max_ns(s.max_ns);
        let ratio = |pick: fn(&crate::stats::Ratios) -> f64| {
            metric.ratio_to_ipi.as_ref().map_or("–".to_owned(), |r| format!("{:.1}×", pick(r)))
        };
        rows.push(vec![
            metric.metric.clone(),
            s.n.to_string(),
            unit.format(s.p50_ns),
            unit.format(s.p90_ns),
            unit.format(s.p99_ns),
            unit.format(s.max_ns),
            ratio(|r| r.p50),
            ratio(|r| r.p99),
        ]);
    }
    let highlight = vec![false; rows.len()];
    Block::Table {
        header: ["metric", "n", "p50", "p90", "p99", "max", "p50 / IPI", "p99 / IPI"]
            .map(String::from)
            .to_vec(),
        rows,
        highlight,
    }
}

/// One column per run: what the runs ran on.
fn environment_table(results: &[&RunResult]) -> Block {
    let field = |name: &str, get: &dyn Fn(&RunResult) -> String| -> Vec<String> {
        std::iter::once(name.to_owned()).chain(results.iter().map(|r| get(r))).collect()
    };
    let or_unknown = |value: &Option<String>| value.clone().unwrap_or_else(|| "unknown".to_owned());
    let mut rows = vec![
        field("started", &|r| r.started_at.clone()),
        field("kernel variant", &|r| r.environment.kernel.variant.clone()),
        field("kernel source", &|r| or_unknown(&r.environment.kernel.source_version)),
        field("patch series sha256", &|r| or_unknown(&r.environment.kernel.patch_series_sha256)),
        field("kernel config sha256", &|r| or_unknown(&r.environment.kernel.config_sha256)),
        field("VM", &|r| {
            format!("{} vCPUs, {} MiB", r.environment.vm.vcpus, r.environment.vm.memory_mib)
        }),
        field("kernel cmdline", &|r| r.environment.vm.cmdline.clone()),
        field("VMM", &|r| format!("{} {}", r.environment.vmm.name, r.environment.vmm.version)),
        field("nested (L1 under TCG)", &|r| {
            if r.environment.nested {
                "yes: times are emulated".into()
            } else {
                "no".into()
            }
        }),
        field("host", &|r| {
            let h = &r.environment.host;
            format!(
                "{} ({}, {} CPUs: {}, {} MiB)",
                h.hostname, h.kernel_release, h.cpus, h.cpu_model, h.memory_mib
            )
        }),
        field("termlab", &|r| r.environment.termlab_version.clone()),
    ];
    // Runs recorded before termlab read the image itself have none of these: no rows then.
    if results.iter().any(|r| r.environment.kernel.image.is_some()) {
        rows.splice(
            5..5,
            [
                field("kernel image", &|r| or_unknown(&r.environment.kernel.image)),
                field("kernel image version", &|r| or_unknown(&r.environment.kernel.image_version)),
                field("kernel image sha256", &|r| or_unknown(&r.environment.kernel.image_sha256)),
            ],
        );
    }
    // Runs recorded before kernels had labels have none: no row then.
    if results.iter().any(|r| r.environment.kernel.label.is_some()) {
        rows.insert(1, field("kernel", &|r| kernel_label(r).to_owned()));
    }
    let highlight = vec![false; rows.len()];
    let header =
        std::iter::once(String::new()).chain(results.iter().map(|r| run_label(r))).collect();
    Block::Table { header, rows, highlight }
}

/// How a run is named in comparisons: scenario, kernel (its label, else its variant) and start.
fn run_label(result: &RunResult) -> String {
    format!("{} ({}, {})", result.scenario.name, kernel_label(result), result.started_at)
}

/// The run's kernel label, or its variant for a run recorded before labels.
fn kernel_label(result: &RunResult) -> &str {
    let kernel = &result.environment.kernel;
    kernel.label.as_deref().unwrap_or(&kernel.variant)
}

/// What `termlab report` found in one directory.
pub enum Regenerated {
    /// A `termlab run` directory (result.json).
    Run(Box<RunResult>),
    /// A `termlab bench` directory (bench.json).
    Bench,
}

/// Regenerates the report of each directory in `dirs` (a run's result.json
/// or a benchmark's bench.json) from its raw numbers, after migrating an
/// older schema version; with `save_migrated`, a file of an older schema
/// version is also rewritten in today's. Returns what each directory held.
pub fn regenerate(dirs: &[PathBuf], save_migrated: bool) -> Result<Vec<Regenerated>, ReportError> {
    let mut regenerated = Vec::new();
    for dir in dirs {
        let is_bench = !dir.join(crate::results::RESULT_FILE).exists()
            && dir.join(crate::results::bench::BENCH_FILE).exists();
        if is_bench {
            let (result, version) = crate::results::bench::BenchResult::load_with_version(dir)?;
            if save_migrated && version != crate::results::bench::SCHEMA_VERSION {
                result.save(dir)?;
            }
            write_bench_report(&result, dir)?;
            regenerated.push(Regenerated::Bench);
        } else {
            let (mut result, version) = RunResult::load_with_version(dir)?;
            result.summarize();
            if save_migrated && version != crate::results::SCHEMA_VERSION {
                result.save(dir)?;
            }
            write_run_report(&result, dir)?;
            regenerated.push(Regenerated::Run(Box::new(result)));
        }
    }
    Ok(regenerated)
}

/// One metric's CDFs of several runs on shared axes, as
/// `compare-<metric>-cdf.svg`; `samples` holds (run label, values).
fn overlaid_cdf_figure(metric: &str, samples: &[(String, Vec<f64>)]) -> Result<Block, ReportError> {
    let series: Vec<Series<'_>> =
        samples.iter().map(|(label, values)| Series { label, samples_ns: values }).collect();
    Ok(Block::Figure {
        file_name: format!("compare-{metric}-cdf.svg"),
        caption: format!("{metric}: cumulative distribution per run"),
        svg: plot::cdf_svg(&format!("{metric}: CDF"), &series)?,
    })
}

/// Several runs side by side: each metric's percentiles per run, every
/// expectation's verdict per run, overlaid CDFs and the environments.
pub fn comparison_document(runs: &[RunResult]) -> Result<Document, ReportError> {
    let mut doc = Document::new(format!("termlab comparison of {} runs", runs.len()));
    let labels: Vec<String> = runs.iter().map(run_label).collect();

    doc.push(Block::Heading("Metrics (p50 / p99)".into()));
    let mut metrics: Vec<String> = Vec::new();
    for run in runs {
        for summary in &run.summary {
            if !metrics.contains(&summary.metric) {
                metrics.push(summary.metric.clone());
            }
        }
    }
    let rows: Vec<Vec<String>> = metrics
        .iter()
        .map(|metric| {
            std::iter::once(metric.clone())
                .chain(runs.iter().map(
                    |run| match run.summary.iter().find(|s| &s.metric == metric) {
                        Some(s) => {
                            let unit = Unit::for_max_ns(s.summary.max_ns);
                            let ratio = s
                                .ratio_to_ipi
                                .as_ref()
                                .map_or(String::new(), |r| format!(" ({:.1}× IPI)", r.p50));
                            format!(
                                "{} / {}{ratio}",
                                unit.format(s.summary.p50_ns),
                                unit.format(s.summary.p99_ns)
                            )
                        }
                        None => "–".into(),
                    },
                ))
                .collect()
        })
        .collect();
    let highlight = vec![false; rows.len()];
    doc.push(Block::Table {
        header: std::iter::once("metric".to_owned()).chain(labels.iter().cloned()).collect(),
        rows,
        highlight,
    });

    doc.push(Block::Heading("Expectations".into()));
    let mut names: Vec<String> = Vec::new();
    for run in runs {
        for e in &run.expectations {
            if !names.contains(&e.name) {
                names.push(e.name.clone());
            }
        }
    }
    let verdicts: Vec<Vec<Option<bool>>> = names
        .iter()
        .map(|name| {
            runs.iter()
                .map(|run| run.expectations.iter().find(|e| &e.name == name).map(|e| e.passed))
                .collect()
        })
        .collect();
    let rows = names
        .iter()
        .zip(&verdicts)
        .map(|(name, row)| {
            std::iter::once(name.clone())
                .chain(
                    row.iter()
                        .map(|v| v.map_or("–", |p| if p { "pass" } else { "FAIL" }).to_owned()),
                )
                .collect()
        })
        .collect();
    let highlight = verdicts.iter().map(|row| row.contains(&Some(false))).collect();
    doc.push(Block::Table {
        header: std::iter::once("expectation".to_owned()).chain(labels.iter().cloned()).collect(),
        rows,
        highlight,
    });

    doc.push(Block::Heading("Plots".into()));
    for metric in &metrics {
        let samples: Vec<(String, Vec<f64>)> = runs
            .iter()
            .zip(&labels)
            .filter_map(|(run, label)| {
                run.metric_samples()
                    .into_iter()
                    .find(|(m, _)| m == metric)
                    .map(|(_, values)| (label.clone(), values))
            })
            .collect();
        doc.push(overlaid_cdf_figure(metric, &samples)?);
    }

    doc.push(Block::Heading("Environment".into()));
    let refs: Vec<&RunResult> = runs.iter().collect();
    doc.push(environment_table(&refs));
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> RunResult {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results/example/loops");
        RunResult::load(&dir).expect("example loads")
    }

    #[test]
    fn side_by_side_columns_name_each_kernel_by_its_label() {
        // As a run from before labels: the variant alone.
        let mut unlabelled = example();
        unlabelled.environment.kernel.label = None;
        let without = comparison_document(&[unlabelled.clone(), unlabelled.clone()])
            .expect("rendered")
            .to_markdown();
        // Without labels: the variant names the column, and there is no `kernel` row.
        let variant = &unlabelled.environment.kernel.variant;
        assert!(without.contains(&format!("loops ({variant}, ")), "{without}");
        assert!(!without.contains("| kernel |"), "{without}");

        let (mut a, mut b) = (unlabelled.clone(), unlabelled);
        a.environment.kernel.label = Some("default".into());
        b.environment.kernel.label = Some("linux-next".into());
        let md = comparison_document(&[a, b]).expect("rendered").to_markdown();
        let header = md.lines().find(|l| l.starts_with("| metric |")).expect("metrics table");
        assert!(
            header.contains("loops (default, ") && header.contains("loops (linux-next, "),
            "{header}"
        );
        assert!(md.contains("| kernel | default | linux-next |"), "{md}");
    }
}
