//! The harness's chart: peak memory by category and median step time per run, as SVG.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::bench::BenchRow;

const CATEGORIES: [(&str, RGBColor); 6] = [
    ("parameters", RGBColor(31, 119, 180)),
    ("gradients", RGBColor(255, 127, 14)),
    ("master_weights", RGBColor(44, 160, 44)),
    ("optimizer_state", RGBColor(214, 39, 40)),
    ("activations", RGBColor(148, 103, 189)),
    ("other", RGBColor(140, 140, 140)),
];

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Draws one horizontal bar per run: on the left its peak memory stacked by category (with the
/// estimator's prediction as a tick), on the right its median step time; writes the SVG to
/// `path` atomically.
///
/// # Errors
/// When there are no rows, or the chart cannot be drawn or written.
pub fn write_chart(rows: &[BenchRow], path: &Path) -> anyhow::Result<()> {
    if rows.is_empty() {
        anyhow::bail!("no benchmark rows to chart");
    }
    let labels: Vec<String> = rows.iter().map(|r| format!("{} {}", r.model, r.config)).collect();
    let n = rows.len();
    let height = 120 + 26 * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(760);
        let max_mib = rows
            .iter()
            .map(|r| mib(r.peak_bytes.max(r.predicted_peak_bytes.unwrap_or(0))))
            .fold(0.0, f64::max);
        // Row i is drawn at y = n - 1 - i, so the first row is on top.
        let slot = |i: usize| (n - 1 - i) as f64;
        let y_label = |y: &f64| {
            let from_top = n as f64 - 1.0 - (y - 0.5);
            if (from_top - from_top.round()).abs() < 1e-6 && from_top >= 0.0 {
                labels.get(from_top.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let mut memory = ChartBuilder::on(&left)
            .caption("peak memory of a step by category (MiB; | = predicted)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(260)
            .build_cartesian_2d(0.0..max_mib * 1.45, 0.0..n as f64)?;
        memory.configure_mesh().disable_y_mesh().y_labels(2 * n + 1).y_label_formatter(&y_label).draw()?;
        for (i, (name, color)) in CATEGORIES.iter().enumerate() {
            let bars = rows.iter().enumerate().map(|(row_index, r)| {
                let below: usize = CATEGORIES[..i]
                    .iter()
                    .map(|(c, _)| r.bytes_by_category.get(*c).copied().unwrap_or(0))
                    .sum();
                let own = r.bytes_by_category.get(*name).copied().unwrap_or(0);
                let y = slot(row_index);
                Rectangle::new([(mib(below), y + 0.15), (mib(below + own), y + 0.85)], color.filled())
            });
            memory
                .draw_series(bars)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        let ticks = rows.iter().enumerate().filter_map(|(i, r)| {
            r.predicted_peak_bytes.map(|p| {
                PathElement::new(
                    vec![(mib(p), slot(i) + 0.05), (mib(p), slot(i) + 0.95)],
                    BLACK.stroke_width(2),
                )
            })
        });
        memory.draw_series(ticks)?;
        memory
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;

        let max_ms = rows.iter().map(|r| r.step_time_s.max * 1e3).fold(0.0, f64::max);
        let mut time = ChartBuilder::on(&right)
            .caption("median step time (ms; line = min-max)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..max_ms * 1.05, 0.0..n as f64)?;
        time.configure_mesh().disable_y_mesh().y_labels(0).draw()?;
        time.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = slot(i);
            Rectangle::new(
                [(0.0, y + 0.15), (r.step_time_s.median * 1e3, y + 0.85)],
                RGBColor(31, 119, 180).filled(),
            )
        }))?;
        time.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = slot(i) + 0.5;
            PathElement::new(
                vec![(r.step_time_s.min * 1e3, y), (r.step_time_s.max * 1e3, y)],
                BLACK.stroke_width(2),
            )
        }))?;
        root.present()?;
    }
    candle_train::io::write_atomic(path, svg.as_bytes())
        .with_context(|| format!("writing the chart to {}", path.display()))
}
