//! SVG plots with plotters' SVG backend. Without a font feature plotters
//! estimates text extents itself and writes `<text>` elements, so no font
//! files or fontconfig are needed, and the SVG can be inlined in HTML.

use plotters::prelude::*;
use thiserror::Error;

use crate::stats;

#[derive(Debug, Error)]
#[error("drawing the plot `{title}` failed: {message}")]
pub struct PlotError {
    title: String,
    message: String,
}

const SIZE: (u32, u32) = (640, 360);

/// A display unit chosen so the values read as small numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unit {
    pub name: &'static str,
    pub nanoseconds: f64,
}

impl Unit {
    /// ms for anything reaching a millisecond, µs below that.
    pub fn for_max_ns(max_ns: f64) -> Unit {
        if max_ns >= 1e6 {
            Unit { name: "ms", nanoseconds: 1e6 }
        } else {
            Unit { name: "µs", nanoseconds: 1e3 }
        }
    }

    pub fn format(self, ns: f64) -> String {
        format!("{:.3} {}", ns / self.nanoseconds, self.name)
    }
}

/// One curve: a legend label and samples in nanoseconds.
pub struct Series<'a> {
    pub label: &'a str,
    pub samples_ns: &'a [f64],
}

/// The empirical CDF of one or more sample sets on shared axes.
pub fn cdf_svg(title: &str, series: &[Series<'_>]) -> Result<String, PlotError> {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.samples_ns.iter().copied())
        .filter(|x| x.is_finite())
        .collect();
    let unit = Unit::for_max_ns(all.iter().copied().fold(0.0, f64::max));
    let x_range = padded_range(&all, unit);
    let mut svg = String::new();
    draw(title, &mut svg, |root| {
        let mut chart =
            chart_builder(root, title).build_cartesian_2d(x_range.clone(), 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc(format!("latency ({})", unit.name))
            .y_desc("fraction of runs ≤ x")
            .draw()?;
        for (index, one) in series.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            // Steps: the fraction jumps at each sample.
            let mut points = vec![(x_range.start, 0.0)];
            let mut previous = 0.0;
            for (x, fraction) in stats::cdf(one.samples_ns) {
                let x = x / unit.nanoseconds;
                points.push((x, previous));
                points.push((x, fraction));
                previous = fraction;
            }
            points.push((x_range.end, previous));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(one.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })?;
    Ok(svg)
}

/// A histogram of one sample set.
pub fn histogram_svg(title: &str, samples_ns: &[f64]) -> Result<String, PlotError> {
    let finite: Vec<f64> = samples_ns.iter().copied().filter(|x| x.is_finite()).collect();
    let unit = Unit::for_max_ns(finite.iter().copied().fold(0.0, f64::max));
    let in_unit: Vec<f64> = finite.iter().map(|x| x / unit.nanoseconds).collect();
    // About one bin per two samples, between 5 and 30.
    let bins = stats::histogram(&in_unit, (in_unit.len() / 2).clamp(5, 30));
    let tallest = bins.iter().map(|b| b.2).max().unwrap_or(1).max(1);
    let x_range = match (bins.first(), bins.last()) {
        (Some(first), Some(last)) => first.0..last.1,
        _ => 0.0..1.0,
    };
    let mut svg = String::new();
    draw(title, &mut svg, |root| {
        let mut chart =
            chart_builder(root, title).build_cartesian_2d(x_range, 0f64..(tallest as f64 * 1.1))?;
        chart.configure_mesh().x_desc(format!("latency ({})", unit.name)).y_desc("runs").draw()?;
        let color = Palette99::pick(0).to_rgba();
        chart.draw_series(bins.iter().map(|&(low, high, count)| {
            Rectangle::new([(low, 0.0), (high, count as f64)], color.filled())
        }))?;
        chart.draw_series(bins.iter().map(|&(low, high, count)| {
            Rectangle::new([(low, 0.0), (high, count as f64)], BLACK.stroke_width(1))
        }))?;
        Ok(())
    })?;
    Ok(svg)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Runs `body` on a white SVG canvas writing into `svg`.
fn draw(
    title: &str,
    svg: &mut String,
    body: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> DrawResult,
) -> Result<(), PlotError> {
    let error =
        |e: &dyn std::fmt::Display| PlotError { title: title.to_owned(), message: e.to_string() };
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    body(&root).map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// The caption, margins and axis label areas every plot shares.
fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50);
    builder
}

/// The samples' range in `unit`, widened by 5 % (or ±1 unit when all are
/// equal) so no point sits on the frame.
fn padded_range(samples_ns: &[f64], unit: Unit) -> std::ops::Range<f64> {
    let low = samples_ns.iter().copied().fold(f64::INFINITY, f64::min) / unit.nanoseconds;
    let high = samples_ns.iter().copied().fold(f64::NEG_INFINITY, f64::max) / unit.nanoseconds;
    if !low.is_finite() || !high.is_finite() {
        return 0.0..1.0;
    }
    let pad = if high > low { (high - low) * 0.05 } else { 1.0 };
    (low - pad)..(high + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_plot_has_axes_labels_and_one_path_per_series() {
        let fast: Vec<f64> = (1..=20).map(|i| i as f64 * 50_000.0).collect();
        let slow: Vec<f64> = (1..=20).map(|i| i as f64 * 90_000.0).collect();
        let svg = cdf_svg(
            "end_to_end",
            &[
                Series { label: "kernel A", samples_ns: &fast },
                Series { label: "kernel B", samples_ns: &slow },
            ],
        )
        .expect("drawn");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("end_to_end"));
        assert!(svg.contains("kernel A") && svg.contains("kernel B"));
        // 1.8 ms max -> milliseconds.
        assert!(svg.contains("latency (ms)"));
        // Two curves, each a polyline through 2 points per sample + 2 ends.
        let polylines: Vec<&str> = svg.match_indices("<polyline").map(|(i, _)| &svg[i..]).collect();
        let curve_points = polylines
            .iter()
            .map(|p| p[..p.find("/>").unwrap_or(p.len())].matches(',').count())
            .filter(|&n| n == 42)
            .count();
        assert_eq!(curve_points, 2, "expected two 42-point curves");
    }

    #[test]
    fn histogram_plot_draws_a_bar_per_nonempty_bin() {
        let samples: Vec<f64> = [10.0, 11.0, 11.0, 12.0, 30.0, 30.0, 31.0, 50.0, 50.0, 50.0]
            .iter()
            .map(|us| us * 1000.0)
            .collect();
        let svg = histogram_svg("agent_rtt", &samples).expect("drawn");
        assert!(svg.contains("latency (µs)"));
        // 10 samples -> 5 bins; filled bars are <rect> elements with a fill
        // other than the white background.
        let bars = svg.matches("<rect").count();
        assert!(bars >= 5, "{bars} rects");
    }

    #[test]
    fn unit_follows_magnitude() {
        assert_eq!(Unit::for_max_ns(999_999.0).name, "µs");
        assert_eq!(Unit::for_max_ns(1_000_000.0).name, "ms");
        assert_eq!(Unit::for_max_ns(2_500_000.0).format(2_500_000.0), "2.500 ms");
    }
}
