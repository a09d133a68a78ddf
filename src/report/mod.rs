//! The run report: a comparison table (CSV, Markdown), trade-off and histogram plots (PNG), and
//! a self-contained `report.html` (plots and image grids inlined as data URIs, so it opens
//! offline and can be mailed around). `mono report RUN_DIR` rebuilds it from the run's files.

mod plots;
mod tops;

use std::path::{Path, PathBuf};

use anyhow::Result;
use base64::Engine;

use crate::base::config::Config;
use crate::base::io::write_atomic;
use crate::layout::{
    read_json, RunSummary, CONFIG_FILE, FINAL_SAE_DIR, LATENT_STATS_FILE, MONOSCORE_HIST_PNG,
    REPORT_FILE, RESULTS_FILE, SWEEP_CSV, SWEEP_MD, SWEEP_PNG,
};

/// One row of the comparison table.
struct Row {
    label: String,
    overrides: Vec<(String, String)>,
    /// (column, value) pairs, in display order.
    values: Vec<(&'static str, Option<f64>)>,
    train_dir: Option<PathBuf>,
    features_dir: Option<PathBuf>,
}

fn rows(summary: &RunSummary) -> Vec<Row> {
    summary
        .runs
        .iter()
        .map(|r| {
            let mut values = Vec::new();
            if let Some(t) = &r.results.train {
                let e = &t.results;
                values.extend([
                    ("lambda", Some(t.lambda)),
                    ("monoscore_mean", e.monoscore.mean),
                    ("monoscore_median", e.monoscore.median),
                    ("live", Some(e.monoscore.live as f64)),
                    ("dead", Some(e.monoscore.dead as f64)),
                    ("purity_binary", e.purity.as_ref().map(|p| p.binary)),
                    ("purity_weighted", e.purity.as_ref().map(|p| p.weighted)),
                    ("r2", Some(e.r2)),
                    ("r2_total", Some(e.r2_total)),
                    ("l0", Some(e.l0)),
                ]);
            }
            if let Some(f) = &r.results.finetune {
                values.extend([
                    ("finetune_lambda", Some(f.lambda)),
                    ("top1", Some(f.final_eval.top1)),
                    ("top5", Some(f.final_eval.top5)),
                    ("topk_monoscore", f.final_eval.monoscore.mean),
                ]);
            }
            Row {
                label: r.label.clone(),
                overrides: r.overrides.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
                values,
                train_dir: r.train_dir.clone(),
                features_dir: r.features_dir.clone(),
            }
        })
        .collect()
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => String::new(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e9 => format!("{x:.0}"),
        Some(x) if x != 0.0 && x.abs() < 1e-2 => format!("{x:.1e}"),
        Some(x) => format!("{x:.4}"),
    }
}

fn columns(rows: &[Row]) -> Vec<&'static str> {
    let mut cols: Vec<&'static str> = Vec::new();
    for r in rows {
        for (c, _) in &r.values {
            if !cols.contains(c) {
                cols.push(c);
            }
        }
    }
    cols
}

fn value(r: &Row, col: &str) -> Option<f64> {
    r.values.iter().find(|(c, _)| *c == col).and_then(|(_, v)| *v)
}

/// The comparison table as CSV and Markdown.
fn tables(rows: &[Row]) -> (String, String) {
    let cols = columns(rows);
    let mut csv = String::from("run");
    let mut md = String::from("| run |");
    for c in &cols {
        csv.push_str(&format!(",{c}"));
        md.push_str(&format!(" {c} |"));
    }
    csv.push('\n');
    md.push_str(&format!("\n|---|{}\n", "---|".repeat(cols.len())));
    for r in rows {
        csv.push_str(&format!("\"{}\"", r.label.replace('"', "'")));
        md.push_str(&format!("| {} |", r.label));
        for c in &cols {
            csv.push_str(&format!(",{}", fmt(value(r, c))));
            md.push_str(&format!(" {} |", fmt(value(r, c))));
        }
        csv.push('\n');
        md.push('\n');
    }
    (csv, md)
}

fn data_uri_png(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Builds `report.html` (and the sweep table and plots for sweeps) in `run_dir`.
pub fn build(run_dir: &Path) -> Result<PathBuf> {
    let summary_path = run_dir.join(RESULTS_FILE);
    anyhow::ensure!(
        summary_path.is_file(),
        "{} has no {RESULTS_FILE} (is this a `mono run` directory?)",
        run_dir.display()
    );
    let summary: RunSummary = read_json(&summary_path)?;
    let config = Config::load(&run_dir.join(CONFIG_FILE))?;
    let rows = rows(&summary);
    anyhow::ensure!(!rows.is_empty(), "{}: no runs to report", summary_path.display());

    let mut html = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>mono report: {name}</title><style>{css}</style></head><body>\
         <h1>mono report: {name}</h1><p>Stages: {stages}. Generated from <code>{dir}</code>.</p>",
        name = escape(&config.run.name),
        css = CSS,
        stages = escape(&serde_json::to_string(&summary.stages)?),
        dir = escape(&run_dir.display().to_string())
    );
    html.push_str(&results_table(&rows));
    if rows.len() > 1 {
        html.push_str(&sweep_section(run_dir, &rows)?);
    }
    html.push_str(&histogram_section(run_dir, &rows)?);
    html.push_str(&top_images_sections(&config, &rows)?);
    html.push_str("</body></html>\n");
    let path = run_dir.join(REPORT_FILE);
    write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

/// The comparison table as HTML.
fn results_table(rows: &[Row]) -> String {
    let cols = columns(rows);
    let mut html = String::from("<h2>Results</h2><table><tr><th>run</th>");
    for c in &cols {
        html.push_str(&format!("<th>{c}</th>"));
    }
    html.push_str("</tr>");
    for r in rows {
        html.push_str(&format!("<tr><td>{}</td>", escape(&r.label)));
        for c in &cols {
            html.push_str(&format!("<td>{}</td>", fmt(value(r, c))));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    html
}

/// sweep.csv, sweep.md and the trade-off plot (MonoScore and R², or accuracy, per swept value).
fn sweep_section(run_dir: &Path, rows: &[Row]) -> Result<String> {
    let (csv, md) = tables(rows);
    write_atomic(&run_dir.join(SWEEP_CSV), csv.as_bytes())?;
    write_atomic(&run_dir.join(SWEEP_MD), md.as_bytes())?;
    let cols = columns(rows);
    let labels: Vec<String> = rows
        .iter()
        .map(|r| r.overrides.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>().join(","))
        .collect();
    let (left, right) = if cols.contains(&"monoscore_mean") {
        ("monoscore_mean", if cols.contains(&"r2_total") { "r2_total" } else { "r2" })
    } else {
        ("topk_monoscore", "top1")
    };
    let series = |c: &str| rows.iter().map(|r| value(r, c)).collect::<Vec<_>>();
    let png = plots::tradeoff(&labels, (left, &series(left)), (right, &series(right)))?;
    write_atomic(&run_dir.join(SWEEP_PNG), &png)?;
    Ok(format!(
        "<p>Tables: <a href=\"{SWEEP_CSV}\">{SWEEP_CSV}</a>, <a href=\"{SWEEP_MD}\">{SWEEP_MD}</a>.</p>\
         <h2>Trade-off</h2><img alt=\"trade-off\" src=\"{}\">",
        data_uri_png(&png)
    ))
}

/// MonoScore histograms of every trained SAE (baseline vs MonoLoss when swept).
fn histogram_section(run_dir: &Path, rows: &[Row]) -> Result<String> {
    let mut hists = Vec::new();
    for r in rows {
        let Some(path) = r.train_dir.as_ref().map(|d| d.join(LATENT_STATS_FILE)) else { continue };
        if path.is_file() {
            let t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
            let scores: Vec<f32> =
                t["monoscore"].to_vec1::<f32>()?.into_iter().filter(|v| v.is_finite()).collect();
            hists.push((r.label.clone(), scores));
        }
    }
    if hists.is_empty() {
        return Ok(String::new());
    }
    let png = plots::histograms(&hists)?;
    write_atomic(&run_dir.join(MONOSCORE_HIST_PNG), &png)?;
    Ok(format!(
        "<h2>MonoScore of live latents</h2><p>Per-latent MonoScore on the evaluation split (dead latents left out).</p><img alt=\"histogram\" src=\"{}\">",
        data_uri_png(&png)
    ))
}

/// Top-activating images of a sample of latents, for the first and the last trained SAE.
fn top_images_sections(config: &Config, rows: &[Row]) -> Result<String> {
    let trained: Vec<&Row> = rows
        .iter()
        .filter(|r| r.train_dir.as_ref().is_some_and(|d| d.join(FINAL_SAE_DIR).is_dir()))
        .collect();
    let mut html = String::new();
    let mut shown = Vec::new();
    for r in [trained.first(), trained.last()].into_iter().flatten() {
        if shown.contains(&r.label) {
            continue;
        }
        shown.push(r.label.clone());
        let train_dir = r.train_dir.as_ref().expect("filtered on train_dir");
        html.push_str(&format!("<h2>Top-activating images: {}</h2>", escape(&r.label)));
        html.push_str(&tops::section(config, r.features_dir.as_deref(), train_dir)?);
    }
    Ok(html)
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto}\
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}\
.latent{margin:1em 0;padding:.5em;border:1px solid #ddd}.grid{display:flex;flex-wrap:wrap;gap:6px}\
.cell{font-size:11px;text-align:center;width:72px}.cell img{width:64px;height:64px;image-rendering:pixelated}";
