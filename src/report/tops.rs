//! Top-activating images of a sample of latents: the SAE over the evaluation split, the best
//! rows per latent, and (when the images can be read) thumbnails with their classes.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{data_uri_png, escape};
use crate::base::config::Config;
use crate::data::images::open_dataset;
use crate::data::store::{open_split, FeatureStore};
use crate::layout::{FINAL_SAE_DIR, LATENT_STATS_FILE};

/// Latents shown: the highest-MonoScore live ones, then random live ones.
const BEST: usize = 6;
const RANDOM: usize = 6;
/// Images per latent.
const PER_LATENT: usize = 8;

fn pick_latents(stats: &HashMap<String, Tensor>) -> Result<Vec<(usize, f32, f32)>> {
    let scores = stats["monoscore"].to_vec1::<f32>()?;
    let purity = stats["purity_binary"].to_vec1::<f32>()?;
    let mut live: Vec<usize> = (0..scores.len()).filter(|&k| scores[k].is_finite()).collect();
    live.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut chosen: Vec<usize> = live.iter().take(BEST).copied().collect();
    let mut rest: Vec<usize> = live.iter().skip(BEST).copied().collect();
    rest.shuffle(&mut StdRng::seed_from_u64(0));
    chosen.extend(rest.into_iter().take(RANDOM));
    Ok(chosen.into_iter().map(|k| (k, scores[k], purity[k])).collect())
}

/// For each latent, its `PER_LATENT` largest activations as (value, row), largest first.
fn top_rows(
    sae: &dyn crate::sae::Sae,
    store: &FeatureStore,
    latents: &[usize],
) -> Result<Vec<Vec<(f32, usize)>>> {
    let mut tops: Vec<Vec<(f32, usize)>> = vec![Vec::new(); latents.len()];
    // Each latent's place in `latents`, if chosen.
    let mut slot = vec![None; sae.spec().n_latents];
    for (j, &k) in latents.iter().enumerate() {
        slot[k] = Some(j);
    }
    let (n, d) = (store.len(), store.dim());
    let mut x = Vec::new();
    let inferrer = crate::sae::Inferrer::new(sae)?;
    for start in (0..n).step_by(1024) {
        let end = (start + 1024).min(n);
        store.read_range(start, end, &mut x)?;
        let input = Tensor::from_slice(&x, (end - start, d), &Device::Cpu)?;
        let lat = inferrer.infer(&input)?.latents;
        for r in 0..lat.rows() {
            for e in lat.row_offsets[r]..lat.row_offsets[r + 1] {
                if let Some(j) = slot[lat.columns[e] as usize] {
                    tops[j].push((lat.values[e], start + r));
                }
            }
        }
        for top in &mut tops {
            top.sort_by(|a, b| b.0.total_cmp(&a.0));
            top.truncate(PER_LATENT);
        }
    }
    Ok(tops)
}

fn thumbnail(image: image::RgbImage) -> Result<String> {
    let small = image::imageops::resize(&image, 64, 64, image::imageops::FilterType::Triangle);
    let mut png = Vec::new();
    small.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(data_uri_png(&png))
}

/// The HTML section for one trained SAE (`train_dir`) trained on the feature set `features`.
pub fn section(config: &Config, features: Option<&Path>, train_dir: &Path) -> Result<String> {
    let stats_path = train_dir.join(LATENT_STATS_FILE);
    if !stats_path.is_file() {
        return Ok("<p>No evaluation statistics for this run.</p>".into());
    }
    let stats = candle_core::safetensors::load(&stats_path, &Device::Cpu)?;
    let latents = pick_latents(&stats)?;
    let Some(features) = features else {
        return Ok("<p>No feature set recorded for this run.</p>".into());
    };
    let store = open_split(features, &config.data.eval_split)?;
    let sae = crate::sae::checkpoint::load(
        &train_dir.join(FINAL_SAE_DIR),
        &Device::Cpu,
        crate::base::host::Kernels::Host,
    )?;
    let ids: Vec<usize> = latents.iter().map(|l| l.0).collect();
    let tops = top_rows(sae.as_ref(), &store, &ids)?;
    // Images when the data set is readable here; otherwise paths and classes only.
    let dataset = config
        .data
        .root
        .as_ref()
        .and_then(|root| open_dataset(config.data.kind, root, &config.data.eval_split).ok());
    let index: HashMap<String, usize> = dataset
        .as_ref()
        .map(|ds| (0..ds.len()).map(|i| (ds.path(i), i)).collect())
        .unwrap_or_default();
    let names = store.label_names();
    let mut html = String::from("<p>Latents with the highest MonoScore, then random live ones; each with its most activating evaluation images.</p>");
    for ((k, score, purity), rows) in latents.iter().zip(&tops) {
        html.push_str(&format!("<div class=\"latent\"><b>latent {k}</b> — MonoScore {score:.3}, purity {purity:.3}<div class=\"grid\">"));
        for &(value, row) in rows {
            let class = store
                .row_labels(row)
                .iter()
                .filter_map(|&c| names.get(c as usize))
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            let path = store.path(row)?;
            let path = path.as_str();
            let img = match (dataset.as_ref(), index.get(path)) {
                (Some(ds), Some(&i)) => ds.load(i).ok().map(thumbnail).transpose()?,
                _ => None,
            };
            html.push_str("<div class=\"cell\">");
            match img {
                Some(uri) => html.push_str(&format!(
                    "<img alt=\"{}\" title=\"{}\" src=\"{uri}\">",
                    escape(path),
                    escape(path)
                )),
                None => html.push_str(&format!("<code>{}</code>", escape(path))),
            }
            html.push_str(&format!("<br>{}<br>{value:.2}</div>", escape(&class)));
        }
        html.push_str("</div></div>");
    }
    Ok(html)
}
