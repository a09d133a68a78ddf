//! PNG plots with plotters (bitmap backend, the embedded DejaVu Sans font).

use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("cannot load the embedded plot font"))
    }
}

/// Renders into an RGB buffer and encodes it as PNG.
fn render(
    width: u32,
    height: u32,
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    register_font()?;
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        draw(root.clone())?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    let image = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| anyhow!("plot buffer has the wrong size"))?;
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

fn series_range(values: &[Option<f64>]) -> (f64, f64) {
    let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
    let (lo, hi) =
        finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.15).max(1e-3);
    (lo - pad, hi + pad)
}

/// Two panels over the sweep's runs (x = run, labelled by its swept values).
pub fn tradeoff(
    labels: &[String],
    left: (&str, &[Option<f64>]),
    right: (&str, &[Option<f64>]),
) -> Result<Vec<u8>> {
    render(1000, 400, |root| {
        let panels = root.split_evenly((1, 2));
        for (area, (name, values), color) in [(&panels[0], left, RED), (&panels[1], right, BLUE)] {
            let (lo, hi) = series_range(values);
            let n = labels.len();
            let mut chart = ChartBuilder::on(area)
                .caption(name, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
                .map_err(|e| anyhow!("plot: {e}"))?;
            let x_label = |x: &f64| {
                labels
                    .get(x.round() as usize)
                    .filter(|_| (x - x.round()).abs() < 1e-6)
                    .cloned()
                    .unwrap_or_default()
            };
            chart
                .configure_mesh()
                .x_labels(n.max(2))
                .x_label_formatter(&x_label)
                .x_desc("sweep value")
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
            let points: Vec<(f64, f64)> =
                values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i as f64, v))).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?;
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        Ok(())
    })
}

/// Histogram outlines (fraction of live latents per 0.05 bin) of several runs' MonoScores.
pub fn histograms(runs: &[(String, Vec<f32>)]) -> Result<Vec<u8>> {
    const BINS: usize = 24; // [-0.2, 1.0)
    render(900, 420, |root| {
        let hists: Vec<Vec<(f64, f64)>> = runs
            .iter()
            .map(|(_, scores)| {
                let mut counts = [0usize; BINS];
                for &s in scores {
                    let b = (((s as f64 + 0.2) / 0.05).floor().max(0.0) as usize).min(BINS - 1);
                    counts[b] += 1;
                }
                let total = scores.len().max(1) as f64;
                counts
                    .iter()
                    .enumerate()
                    .flat_map(|(b, &c)| {
                        let (x0, x1, y) = (
                            -0.2 + b as f64 * 0.05,
                            -0.2 + (b + 1) as f64 * 0.05,
                            c as f64 / total,
                        );
                        [(x0, y), (x1, y)]
                    })
                    .collect()
            })
            .collect();
        let top = hists.iter().flatten().map(|p| p.1).fold(0.0f64, f64::max).max(0.05) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("MonoScore per live latent", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2f64..1.0, 0.0..top)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("MonoScore")
            .y_desc("share of live latents")
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, ((label, _), points)) in runs.iter().zip(hists).enumerate() {
            let color = palette[i % palette.len()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        Ok(())
    })
}
