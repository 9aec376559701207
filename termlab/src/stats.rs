//! Summary statistics of a metric's samples.

use serde::{Deserialize, Serialize};

/// n, percentiles and extremes of one metric, in nanoseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub min_ns: f64,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub p99_ns: f64,
    pub max_ns: f64,
    pub mean_ns: f64,
}

impl Summary {
    /// `None` for no samples: there is nothing to summarise, and a zero
    /// would read as a measurement.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let sorted = sorted(samples)?;
        Some(Summary {
            n: sorted.len(),
            min_ns: sorted[0],
            p50_ns: percentile_of_sorted(&sorted, 50.0),
            p90_ns: percentile_of_sorted(&sorted, 90.0),
            p99_ns: percentile_of_sorted(&sorted, 99.0),
            max_ns: sorted[sorted.len() - 1],
            mean_ns: sorted.iter().sum::<f64>() / sorted.len() as f64,
        })
    }

    /// Each statistic divided by `reference` (e.g. the bare IPI round trip's
    /// median): absolute times under nested virtualisation are emulated,
    /// ratios to a mechanism measured in the same guest travel.
    pub fn ratios_to(&self, reference_ns: f64) -> Option<Ratios> {
        (reference_ns > 0.0).then(|| Ratios {
            p50: self.p50_ns / reference_ns,
            p90: self.p90_ns / reference_ns,
            p99: self.p99_ns / reference_ns,
            max: self.max_ns / reference_ns,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Samples in ascending order with NaNs dropped; `None` when nothing is left.
fn sorted(samples: &[f64]) -> Option<Vec<f64>> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    (!sorted.is_empty()).then_some(sorted)
}

/// Nearest-rank percentile: the smallest sample with at least `p` percent of
/// the samples at or below it. With few samples (a scenario's 10
/// repetitions) interpolating would invent values nobody measured.
fn percentile_of_sorted(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The empirical CDF as (value, fraction of samples <= value) steps.
pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let Some(sorted) = sorted(samples) else { return Vec::new() };
    let n = sorted.len() as f64;
    sorted.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)).collect()
}

/// Equal-width bins over [min, max]: (bin start, bin end, count).
pub fn histogram(samples: &[f64], bins: usize) -> Vec<(f64, f64, usize)> {
    let Some(sorted) = sorted(samples) else { return Vec::new() };
    let (low, high) = (sorted[0], sorted[sorted.len() - 1]);
    let bins = bins.max(1);
    // All samples equal: one bin of nominal width so it still has an extent.
    let width = if high > low { (high - low) / bins as f64 } else { low.abs().max(1.0) * 0.01 };
    let bins = if high > low { bins } else { 1 };
    let mut counts = vec![0usize; bins];
    for x in sorted {
        let index = (((x - low) / width) as usize).min(bins - 1);
        counts[index] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, count)| (low + i as f64 * width, low + (i + 1) as f64 * width, count))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples 1..=100 in a scrambled order (multiplication by a unit mod 101).
    fn one_to_hundred_scrambled() -> Vec<f64> {
        (1..=100u32).map(|i| ((i * 37) % 101) as f64).collect()
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_hundred() {
        let summary = Summary::of(&one_to_hundred_scrambled()).expect("samples");
        assert_eq!(summary.n, 100);
        assert_eq!((summary.min_ns, summary.max_ns), (1.0, 100.0));
        assert_eq!((summary.p50_ns, summary.p90_ns, summary.p99_ns), (50.0, 90.0, 99.0));
        assert_eq!(summary.mean_ns, 50.5);
    }

    #[test]
    fn percentiles_of_few_samples_are_real_samples() {
        let summary = Summary::of(&[30.0, 10.0, 20.0]).expect("samples");
        // ranks: p50 -> ceil(1.5) = 2, p90 -> ceil(2.7) = 3, p99 -> 3.
        assert_eq!((summary.p50_ns, summary.p90_ns, summary.p99_ns), (20.0, 30.0, 30.0));
        let single = Summary::of(&[7.0]).expect("one sample");
        assert_eq!(
            (single.min_ns, single.p50_ns, single.p99_ns, single.max_ns),
            (7.0, 7.0, 7.0, 7.0)
        );
    }

    #[test]
    fn no_samples_no_summary_and_nans_are_dropped() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(Summary::of(&[f64::NAN, 4.0]).expect("one real sample").n, 1);
    }

    #[test]
    fn ratios_divide_by_reference() {
        let summary = Summary::of(&[100.0, 200.0, 300.0, 400.0]).expect("samples");
        let ratios = summary.ratios_to(50.0).expect("positive reference");
        assert_eq!((ratios.p50, ratios.max), (4.0, 8.0));
        assert_eq!(summary.ratios_to(0.0), None);
    }

    #[test]
    fn cdf_steps_reach_one_in_order() {
        let steps = cdf(&[3.0, 1.0, 2.0, 2.0]);
        assert_eq!(steps, vec![(1.0, 0.25), (2.0, 0.5), (2.0, 0.75), (3.0, 1.0)]);
        assert!(cdf(&[]).is_empty());
    }

    #[test]
    fn histogram_counts_every_sample_once() {
        let samples = one_to_hundred_scrambled();
        let bins = histogram(&samples, 10);
        assert_eq!(bins.len(), 10);
        assert_eq!(bins.iter().map(|b| b.2).sum::<usize>(), 100);
        // [1, 10.9) holds 1..=10; the last bin includes the maximum.
        assert_eq!(bins[0].2, 10);
        assert_eq!(bins[9].2, 10);
        assert!((bins[0].0 - 1.0).abs() < 1e-9 && (bins[9].1 - 100.0).abs() < 1e-9);
        let flat = histogram(&[5.0, 5.0, 5.0], 10);
        assert_eq!(flat.len(), 1);
        assert_eq!(flat[0].2, 3);
    }
}
