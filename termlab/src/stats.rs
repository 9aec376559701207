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

/// The nearest-rank `p`th percentile of `samples` (as in [`Summary`]);
/// `None` for no samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    sorted(samples).map(|sorted| percentile_of_sorted(&sorted, p))
}

/// How the change of a percentile from a base sample set to a new one is
/// estimated: a percentile bootstrap of the ratio new/base.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapSettings {
    /// Resamples drawn (each side resampled independently, with replacement,
    /// to its own size).
    pub resamples: u32,
    /// Two-sided coverage of the interval, e.g. 0.95.
    pub confidence: f64,
    /// Seed of the resampling: the same inputs give the same interval.
    pub seed: u64,
}

/// The ratio new/base of one percentile, with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatioEstimate {
    pub percentile: f64,
    /// The percentile of the base and of the new samples, as measured.
    pub base_ns: f64,
    pub new_ns: f64,
    /// `new_ns / base_ns`.
    pub ratio: f64,
    /// The bootstrap interval of the ratio: the (1 − confidence)/2 and
    /// (1 + confidence)/2 nearest-rank quantiles of the resampled ratios.
    pub low: f64,
    pub high: f64,
}

/// For each of `percentiles`, the ratio of the new samples' percentile to
/// the base samples' and its percentile-bootstrap interval: `resamples`
/// times, both sets are resampled with replacement (independently, each to
/// its own size) and the ratio of the resamples' percentiles recorded.
/// `None` when either side has no samples. A base percentile of 0 gives a
/// ratio of 1 against a new 0 and infinity against anything larger.
pub fn bootstrap_ratios(
    base: &[f64],
    new: &[f64],
    percentiles: &[f64],
    settings: BootstrapSettings,
) -> Option<Vec<RatioEstimate>> {
    let base = sorted(base)?;
    let new = sorted(new)?;
    let mut rng = SplitMix64(settings.seed);
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); percentiles.len()];
    let (mut base_resample, mut new_resample) = (Vec::new(), Vec::new());
    for _ in 0..settings.resamples.max(1) {
        rng.resample(&base, &mut base_resample);
        rng.resample(&new, &mut new_resample);
        for (&p, ratios) in percentiles.iter().zip(&mut ratios) {
            ratios.push(ratio(
                percentile_of_sorted(&base_resample, p),
                percentile_of_sorted(&new_resample, p),
            ));
        }
    }
    let tail = (1.0 - settings.confidence.clamp(0.0, 1.0)) / 2.0;
    let estimates = percentiles
        .iter()
        .zip(&mut ratios)
        .map(|(&p, ratios)| {
            ratios.sort_by(f64::total_cmp);
            let (base_ns, new_ns) = (percentile_of_sorted(&base, p), percentile_of_sorted(&new, p));
            RatioEstimate {
                percentile: p,
                base_ns,
                new_ns,
                ratio: ratio(base_ns, new_ns),
                low: percentile_of_sorted(ratios, tail * 100.0),
                high: percentile_of_sorted(ratios, (1.0 - tail) * 100.0),
            }
        })
        .collect();
    Some(estimates)
}

fn ratio(base: f64, new: f64) -> f64 {
    if base > 0.0 {
        new / base
    } else if new <= 0.0 {
        1.0
    } else {
        f64::INFINITY
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a small, fast generator whose
/// output depends only on the seed, so bootstrap intervals are reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An index in `0..n`, by multiply-shift (bias below n / 2^64).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// `out` := `sorted` resampled with replacement to its size, sorted.
    fn resample(&mut self, sorted: &[f64], out: &mut Vec<f64>) {
        out.clear();
        out.extend((0..sorted.len()).map(|_| sorted[self.below(sorted.len())]));
        out.sort_by(f64::total_cmp);
    }
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

    const SETTINGS: BootstrapSettings =
        BootstrapSettings { resamples: 2000, confidence: 0.95, seed: 1 };

    /// `n` samples around `center` with a spread of about ±10 %.
    fn noisy(center: f64, n: usize, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64(seed);
        (0..n).map(|_| center * (0.9 + 0.2 * (rng.next() as f64 / u64::MAX as f64))).collect()
    }

    #[test]
    fn bootstrap_of_identical_samples_is_exactly_one() {
        let samples = noisy(1e6, 10, 7);
        let estimates =
            bootstrap_ratios(&samples, &samples, &[50.0, 99.0], SETTINGS).expect("samples");
        assert_eq!(estimates[0].ratio, 1.0);
        assert_eq!(estimates[1].ratio, 1.0);
        // Resampling still varies; the interval straddles 1.
        assert!(estimates[0].low < 1.0 && estimates[0].high > 1.0, "{:?}", estimates[0]);
        let constant = [5e5; 4];
        let flat = bootstrap_ratios(&constant, &constant, &[50.0], SETTINGS).expect("samples");
        assert_eq!((flat[0].low, flat[0].ratio, flat[0].high), (1.0, 1.0, 1.0));
    }

    #[test]
    fn bootstrap_is_reproducible() {
        let (a, b) = (noisy(1e6, 10, 1), noisy(1.1e6, 10, 2));
        let once = bootstrap_ratios(&a, &b, &[50.0, 99.0], SETTINGS);
        assert!(once.is_some());
        assert_eq!(once, bootstrap_ratios(&a, &b, &[50.0, 99.0], SETTINGS));
    }

    #[test]
    fn bootstrap_interval_covers_the_true_ratio() {
        // Two draws from distributions whose medians differ by exactly 1.3:
        // the 95 % interval should hold 1.3 in about 95 of 100 trials.
        let trials = 100;
        let covered = (0..trials)
            .filter(|&trial| {
                let base = noisy(1e6, 30, 1000 + trial);
                let new = noisy(1.3e6, 30, 2000 + trial);
                let estimate = bootstrap_ratios(&base, &new, &[50.0], SETTINGS).expect("samples");
                estimate[0].low <= 1.3 && 1.3 <= estimate[0].high
            })
            .count();
        assert!(covered >= 85, "the interval covered the true ratio in {covered} of {trials}");
        // And it is informative: shifted samples never straddle 1.
        let estimate =
            bootstrap_ratios(&noisy(1e6, 30, 5), &noisy(1.3e6, 30, 6), &[50.0, 99.0], SETTINGS)
                .expect("samples");
        assert!(estimate.iter().all(|e| e.low > 1.1), "{estimate:?}");
    }

    #[test]
    fn bootstrap_ratio_of_zero_base_and_no_samples() {
        let zero = bootstrap_ratios(&[0.0, 0.0], &[0.0, 0.0], &[50.0], SETTINGS).expect("samples");
        assert_eq!(zero[0].ratio, 1.0);
        let grown = bootstrap_ratios(&[0.0, 0.0], &[3.0, 3.0], &[50.0], SETTINGS).expect("samples");
        assert_eq!(grown[0].low, f64::INFINITY);
        assert_eq!(bootstrap_ratios(&[], &[1.0], &[50.0], SETTINGS), None);
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
