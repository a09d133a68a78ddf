//! The run report: a comparison table (CSV, Markdown), trade-off and histogram plots (PNG), and
//! a self-contained `report.html` (plots and image grids inlined as data URIs, so it opens
//! offline and can be mailed around). `mono report RUN_DIR` rebuilds it from the run's files.

mod plots;
mod tops;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::Value;

use crate::Config;

/// One row of the comparison table.
struct Row {
    label: String,
    overrides: Vec<(String, String)>,
    /// (column, value) pairs, in display order.
    values: Vec<(&'static str, Option<f64>)>,
    train_dir: Option<PathBuf>,
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_u64().map(|x| x as f64))
}

fn rows(summary: &Value) -> Vec<Row> {
    summary["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .map(|r| {
                    let res = &r["results"];
                    let mut values = Vec::new();
                    if let Some(t) = res.get("train") {
                        let e = &t["results"];
                        values.extend([
                            ("lambda", num(&t["lambda"])),
                            ("monoscore_mean", num(&e["monoscore"]["mean"])),
                            ("monoscore_median", num(&e["monoscore"]["median"])),
                            ("live", num(&e["monoscore"]["live"])),
                            ("dead", num(&e["monoscore"]["dead"])),
                            ("purity_binary", num(&e["purity"]["binary"])),
                            ("purity_weighted", num(&e["purity"]["weighted"])),
                            ("r2", num(&e["r2"])),
                            ("r2_total", num(&e["r2_total"])),
                            ("l0", num(&e["l0"])),
                        ]);
                    }
                    if let Some(f) = res.get("finetune") {
                        values.extend([
                            ("finetune_lambda", num(&f["lambda"])),
                            ("top1", num(&f["final"]["top1"])),
                            ("top5", num(&f["final"]["top5"])),
                            ("topk_monoscore", num(&f["final"]["monoscore"]["mean"])),
                        ]);
                    }
                    let overrides = r["overrides"]
                        .as_object()
                        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
                        .unwrap_or_default();
                    Row {
                        label: r["label"].as_str().unwrap_or("?").to_string(),
                        overrides,
                        values,
                        train_dir: r["train_dir"].as_str().map(PathBuf::from),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
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
    let summary_path = run_dir.join(crate::pipeline::SUMMARY_FILE);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).with_context(|| {
            format!("cannot read {} (is this a `mono run` directory?)", summary_path.display())
        })?)
        .with_context(|| format!("{}: not valid JSON", summary_path.display()))?;
    let config = Config::load(&run_dir.join("config.toml"))?;
    let rows = rows(&summary);
    anyhow::ensure!(!rows.is_empty(), "{}: no runs to report", summary_path.display());

    let (csv, md) = tables(&rows);
    let mut html = String::new();
    html.push_str(&format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>mono report: {name}</title><style>{css}</style></head><body>\
         <h1>mono report: {name}</h1><p>Stages: {stages}. Generated from <code>{dir}</code>.</p>",
        name = escape(&config.run.name),
        css = CSS,
        stages = escape(&summary["stages"].to_string()),
        dir = escape(&run_dir.display().to_string())
    ));
    html.push_str("<h2>Results</h2><table><tr><th>run</th>");
    let cols = columns(&rows);
    for c in &cols {
        html.push_str(&format!("<th>{c}</th>"));
    }
    html.push_str("</tr>");
    for r in &rows {
        html.push_str(&format!("<tr><td>{}</td>", escape(&r.label)));
        for c in &cols {
            html.push_str(&format!("<td>{}</td>", fmt(value(r, c))));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");

    if rows.len() > 1 {
        crate::base::io::write_atomic(&run_dir.join("sweep.csv"), csv.as_bytes())?;
        crate::base::io::write_atomic(&run_dir.join("sweep.md"), md.as_bytes())?;
        html.push_str("<p>Tables: <a href=\"sweep.csv\">sweep.csv</a>, <a href=\"sweep.md\">sweep.md</a>.</p>");
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
        crate::base::io::write_atomic(&run_dir.join("sweep.png"), &png)?;
        html.push_str(&format!(
            "<h2>Trade-off</h2><img alt=\"trade-off\" src=\"{}\">",
            data_uri_png(&png)
        ));
    }

    // MonoScore histograms of every trained SAE (baseline vs MonoLoss when swept).
    let mut hists = Vec::new();
    for r in &rows {
        if let Some(dir) = &r.train_dir {
            let path = dir.join(crate::train::sae::LATENT_STATS_FILE);
            if path.is_file() {
                let t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
                let scores: Vec<f32> = t["monoscore"]
                    .to_vec1::<f32>()?
                    .into_iter()
                    .filter(|v| v.is_finite())
                    .collect();
                hists.push((r.label.clone(), scores));
            }
        }
    }
    if !hists.is_empty() {
        let png = plots::histograms(&hists)?;
        crate::base::io::write_atomic(&run_dir.join("monoscore_hist.png"), &png)?;
        html.push_str(&format!(
            "<h2>MonoScore of live latents</h2><p>Per-latent MonoScore on the evaluation split (dead latents left out).</p><img alt=\"histogram\" src=\"{}\">",
            data_uri_png(&png)
        ));
    }

    // Top-activating images of a sample of latents, for the first and the last trained SAE.
    let trained: Vec<&Row> = rows
        .iter()
        .filter(|r| r.train_dir.as_ref().is_some_and(|d| d.join("sae").is_dir()))
        .collect();
    let mut shown = Vec::new();
    for r in [trained.first(), trained.last()].into_iter().flatten() {
        if shown.contains(&r.label) {
            continue;
        }
        shown.push(r.label.clone());
        let run = summary["runs"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["label"] == r.label.as_str()))
            .cloned()
            .unwrap_or(Value::Null);
        html.push_str(&format!("<h2>Top-activating images: {}</h2>", escape(&r.label)));
        html.push_str(&tops::section(&config, &run, r.train_dir.as_ref().unwrap())?);
    }
    html.push_str("</body></html>\n");
    let path = run_dir.join("report.html");
    crate::base::io::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto}\
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}\
.latent{margin:1em 0;padding:.5em;border:1px solid #ddd}.grid{display:flex;flex-wrap:wrap;gap:6px}\
.cell{font-size:11px;text-align:center;width:72px}.cell img{width:64px;height:64px;image-rendering:pixelated}";
