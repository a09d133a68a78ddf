//! `mono extract CONFIG`: a data set's images through an encoder into a feature store, per split.
//!
//! Decoding and preprocessing run in parallel (rayon) on a producer thread, overlapped with
//! inference on the caller's thread. An image that cannot be read is skipped, logged with its
//! path and recorded in the manifest; a run never aborts on one. Rerunning after an interruption
//! continues after the last complete shard; a finished split is left as it is.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use serde_json::json;

use crate::base::config::{Config, EncoderKind};
use crate::base::cpu::normalize_rows;
use crate::data::batch::load_pixels;
use crate::data::images::{open_dataset, ImageDataset};
use crate::data::preprocess::Preprocessor;
use crate::data::sets::features_dir;
use crate::data::store::{BatchLabels, LabelKind, StoreInfo, StoreWriter, MANIFEST_FILE};
use crate::encoders::{self, ImageEncoder};

/// Which part of the work this process does.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtractOptions {
    /// At most this many images per split (a quick look).
    pub limit: Option<usize>,
    /// Part `i` of `n` (0-based): a disjoint contiguous range of each split, written to its own
    /// feature set `<features.dir>-part-<i>-of-<n>`; `mono features merge` joins the parts.
    pub part: Option<(usize, usize)>,
}

/// Parses `--shard i/n` (0 ≤ i < n).
pub fn parse_part(text: &str) -> Result<(usize, usize)> {
    let (i, n) = text
        .split_once('/')
        .with_context(|| format!("--shard {text:?}: expected i/n, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (
        i.trim().parse().with_context(|| format!("--shard {text:?}"))?,
        n.trim().parse().with_context(|| format!("--shard {text:?}"))?,
    );
    ensure!(n > 0 && i < n, "--shard {text:?}: need 0 ≤ i < n");
    Ok((i, n))
}

#[derive(Clone, Debug)]
pub struct SplitReport {
    pub split: String,
    pub dir: PathBuf,
    pub rows: usize,
    pub skipped: usize,
    /// Rows found from an earlier, interrupted run.
    pub resumed_rows: usize,
    /// The split was already finished: nothing was done.
    pub already_done: bool,
    pub seconds: f64,
}

/// One decoded and preprocessed batch.
struct Batch {
    /// (rows, 3·H·W) pixel values of the images that decoded.
    pixels: Vec<f32>,
    /// The item index, path and labels of each row.
    items: Vec<usize>,
    paths: Vec<String>,
    labels: Vec<Vec<u32>>,
    /// Items that did not decode: index, path, reason.
    skipped: Vec<(usize, String, String)>,
}

fn prepare(dataset: &dyn ImageDataset, preprocessor: &Preprocessor, items: Range<usize>) -> Batch {
    let items: Vec<usize> = items.collect();
    let results = load_pixels(dataset, &items, |_, image| {
        preprocessor.process(&image::DynamicImage::ImageRgb8(image))
    });
    let mut batch = Batch {
        pixels: Vec::new(),
        items: Vec::new(),
        paths: Vec::new(),
        labels: Vec::new(),
        skipped: Vec::new(),
    };
    for (&i, result) in items.iter().zip(results) {
        match result {
            Ok(pixels) => {
                batch.pixels.extend(pixels);
                batch.items.push(i);
                batch.paths.push(dataset.path(i));
                batch.labels.push(dataset.labels(i));
            }
            Err(e) => batch.skipped.push((i, dataset.path(i), format!("{e:#}"))),
        }
    }
    batch
}

/// Runs the encoder on one prepared batch: (rows, dim) features on the host.
fn encode(
    encoder: &dyn ImageEncoder,
    pixels: &[f32],
    rows: usize,
    (h, w): (u32, u32),
    dtype: DType,
    device: &Device,
) -> Result<Vec<f32>> {
    let input =
        Tensor::from_slice(pixels, (rows, 3, h as usize, w as usize), device)?.to_dtype(dtype)?;
    Ok(encoder
        .forward(&input)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

struct Extraction<'a> {
    config: &'a Config,
    encoder: &'a dyn ImageEncoder,
    preprocessor: &'a Preprocessor,
    encoder_info: serde_json::Value,
    device: &'a Device,
    /// (height, width) of the preprocessed images.
    size: (u32, u32),
}

fn extract_split(
    ctx: &Extraction,
    split: &str,
    out_root: &Path,
    opts: &ExtractOptions,
) -> Result<SplitReport> {
    let config = ctx.config;
    let dir = out_root.join(crate::data::store::split_dir(split));
    if dir.join(MANIFEST_FILE).is_file() {
        let manifest = crate::data::store::Manifest::load(&dir)?;
        // A finished split is reused only if it was made by this encoder from this data set.
        let same = |key: &str| {
            manifest.info.encoder.as_ref().map(|e| &e[key]) == Some(&ctx.encoder_info[key])
        };
        let dataset = serde_json::to_value(config.data.kind)?;
        ensure!(
            ["kind", "model", "revision", "output", "normalized"].iter().all(|k| same(k)) && manifest.info.dataset.as_deref() == dataset.as_str(),
            "{} holds features of another encoder or data set ({}); remove it or set features.dir elsewhere",
            dir.display(),
            manifest.info.encoder.as_ref().map(|e| e.to_string()).unwrap_or_default()
        );
        return Ok(SplitReport {
            split: split.into(),
            dir,
            rows: manifest.count,
            skipped: manifest.skipped.len(),
            resumed_rows: manifest.count,
            already_done: true,
            seconds: 0.0,
        });
    }
    let root = config.data.root.as_ref().context("data.root is not set: where are the images?")?;
    let dataset = open_dataset(config.data.kind, root, split).with_context(|| {
        format!("data.root = {:?}, split {split:?}", root.display().to_string())
    })?;
    let total = config.data.limit.into_iter().chain(opts.limit).fold(dataset.len(), usize::min);
    let range = match opts.part {
        Some((i, n)) => (i * total / n)..((i + 1) * total / n),
        None => 0..total,
    };
    let mut info = StoreInfo::new(ctx.encoder.dim(), split);
    info.dtype = config.features.dtype;
    info.dataset =
        Some(serde_json::to_value(config.data.kind)?.as_str().unwrap_or_default().to_string());
    info.encoder = Some(ctx.encoder_info.clone());
    info.labels = dataset.label_kind();
    info.label_names = dataset.class_names().to_vec();
    info.preprocessing = Some(serde_json::to_value(ctx.preprocessor)?);
    let has_shards = dir.is_dir()
        && std::fs::read_dir(&dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("shard-"));
    let mut writer = if has_shards {
        StoreWriter::resume(&dir, info, config.features.shard_size)?
    } else {
        StoreWriter::create(&dir, info, config.features.shard_size)?
    };
    let resumed_rows = writer.resumed_rows();
    let start = match writer.resumed_last_path() {
        Some(last) => range.clone().find(|&i| dataset.path(i) == last).map(|i| i + 1).with_context(|| {
            format!("{}: its last row ({last}) is not among the items of this split/part; delete the directory to start over", dir.display())
        })?,
        None => range.start,
    };

    let batch_size = config.encoder.batch_size;
    let size = ctx.size;
    let dtype = encoders::dtype(config.encoder.dtype);
    let bar = crate::base::progress::bar((range.end - range.start) as u64, split);
    bar.set_position((start - range.start) as u64);
    let started = Instant::now();
    let dataset: &dyn ImageDataset = dataset.as_ref();
    // Batches keep the grid of an uninterrupted run (range.start + i · batch_size) wherever a
    // previous run stopped, so every row is encoded in the same batch as it would have been
    // (batched kernels round differently for other batch compositions): the batch holding
    // `start` is encoded whole and its rows stored before are dropped.
    let first = range.start + (start - range.start) / batch_size * batch_size;
    let (tx, rx) = sync_channel::<Batch>(2);
    std::thread::scope(|scope| -> Result<()> {
        let producer = scope.spawn(move || {
            let mut at = first;
            while at < range.end {
                let end = (at + batch_size).min(range.end);
                if tx.send(prepare(dataset, ctx.preprocessor, at..end)).is_err() {
                    break; // the consumer stopped on an error
                }
                at = end;
            }
        });
        for batch in rx {
            for (_, path, reason) in batch.skipped.iter().filter(|s| s.0 >= start) {
                bar.suspend(|| eprintln!("skipped {path}: {reason}"));
                writer.skip(path.clone(), reason.clone());
            }
            let new_items = batch.items.iter().chain(batch.skipped.iter().map(|s| &s.0));
            let new_items = new_items.filter(|&&i| i >= start).count();
            if !batch.paths.is_empty() {
                let mut features =
                    encode(ctx.encoder, &batch.pixels, batch.paths.len(), size, dtype, ctx.device)?;
                if config.encoder.normalize {
                    normalize_rows(&mut features, ctx.encoder.dim());
                }
                // Rows already stored (the start of a batch continued after a restart).
                let stored = batch.items.iter().take_while(|&&i| i < start).count();
                let dim = ctx.encoder.dim();
                let (features, paths) = (&features[stored * dim..], &batch.paths[stored..]);
                let batch_labels = &batch.labels[stored..];
                let class_ids: Vec<u32>;
                let labels = match writer.info().labels {
                    LabelKind::None => BatchLabels::None,
                    LabelKind::Class => {
                        // Exactly one class per item; never a default class for a missing one.
                        class_ids = batch_labels
                            .iter()
                            .zip(paths)
                            .map(|(l, path)| match l.as_slice() {
                                [c] => Ok(*c),
                                other => Err(anyhow::anyhow!(
                                    "{path}: a single-label data set gave {} labels",
                                    other.len()
                                )),
                            })
                            .collect::<Result<_>>()?;
                        BatchLabels::Class(&class_ids)
                    }
                    LabelKind::Multi => BatchLabels::Multi(batch_labels),
                };
                if !paths.is_empty() {
                    writer.push(features, labels, paths)?;
                }
            }
            bar.inc(new_items as u64);
        }
        producer.join().map_err(|_| anyhow::anyhow!("the image decoding thread panicked"))?;
        Ok(())
    })?;
    bar.finish_and_clear();
    let manifest = writer.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(SplitReport {
        split: split.into(),
        dir,
        rows: manifest.count,
        skipped: manifest.skipped.len(),
        resumed_rows,
        already_done: false,
        seconds,
    })
}

/// What an extraction depends on (docs/reliability.md): the encoder settings and files (or the
/// key of the finetuning run that makes them), the data set's splits, the store format and
/// which part of the data. Recorded in the feature set and checked whenever it is continued or
/// reused, so no run continues or reuses features of other inputs.
pub fn inputs_identity(
    config: &Config,
    opts: &ExtractOptions,
    finetuned: Option<&str>,
) -> Result<serde_json::Value> {
    let mut encoder = serde_json::to_value(&config.encoder)?;
    encoder["batch_size"] = json!(null); // does not change the features
    encoder["model"] = json!(canonical_model(&config.encoder.model));
    encoder["output"] = json!(config.encoder.output()); // the default, resolved
    let model_files = match finetuned {
        Some(key) => json!({ "finetuned": key }),
        None => {
            let files = encoders::hub::resolve(&config.encoder.model, &config.encoder.revision)?;
            json!(encoders::fingerprint(&files)?)
        }
    };
    let mut data = serde_json::to_value(&config.data)?;
    data["root"] = json!(null); // in data_files, resolved
    let root = config.data.root.as_ref().context("data.root is not set: where are the images?")?;
    let splits = [config.data.train_split.as_str(), config.data.eval_split.as_str()];
    Ok(json!({
        "stage": "extract",
        "encoder": encoder,
        "model_files": model_files,
        "data": data,
        "data_files": crate::data::images::data_identity(config.data.kind, root, &splits)?,
        // How files become pixels: features extracted under other rules are not reused.
        "decoding": crate::data::images::DECODING,
        "features": { "dtype": config.features.dtype, "shard_size": config.features.shard_size },
        "limit": opts.limit,
        "part": opts.part,
    }))
}

/// `encoder.model` as a key part: a local directory by its canonical path, a hub id as is.
pub fn canonical_model(model: &str) -> String {
    let path = Path::new(model);
    match path.is_dir().then(|| path.canonicalize()) {
        Some(Ok(canonical)) => canonical.display().to_string(),
        _ => model.to_string(),
    }
}

/// Refuses a feature set made from other inputs; records the identity in a new one.
fn check_feature_set(out_root: &Path, identity: &serde_json::Value) -> Result<()> {
    match crate::base::io::recorded_input_differences(out_root, identity)? {
        Some(differences) if !differences.is_empty() => anyhow::bail!(
            "{} holds features of other inputs ({}); remove it or set features.dir elsewhere",
            out_root.display(),
            differences.join("; ")
        ),
        Some(_) => Ok(()),
        // A directory from before inputs were recorded keeps the manifest checks alone.
        None if out_root.read_dir().is_ok_and(|mut d| d.next().is_some()) => Ok(()),
        None => {
            std::fs::create_dir_all(out_root)
                .with_context(|| format!("cannot create {}", out_root.display()))?;
            crate::base::io::record_inputs(out_root, identity)
        }
    }
}

/// Extracts the config's train and eval splits.
pub fn extract(config: &Config, opts: &ExtractOptions) -> Result<Vec<SplitReport>> {
    let device = crate::base::device::open_device(&config.run.device)?;
    let (encoder, files) = encoders::load(&config.encoder, &device)?;
    let preprocessor = encoders::preprocessor_for(config.encoder.kind, &files)?;
    let (h, w) = preprocessor
        .output_size()
        .with_context(|| format!("{}: its preprocessing gives images of varying size (no crop); an encoder needs one size", files.source))?;
    let (eh, ew) = encoder.input_size();
    ensure!(
        (h as usize, w as usize) == (eh, ew) || config.encoder.kind == EncoderKind::Resnet50,
        "the preprocessor makes {h}×{w} images but {} expects {eh}×{ew}",
        files.source
    );
    let encoder_info = json!({
        "kind": config.encoder.kind,
        "model": config.encoder.model,
        "revision": config.encoder.revision,
        "output": config.encoder.output(),
        "normalized": config.encoder.normalize,
        "source": files.source,
        "dim": encoder.dim(),
    });
    let mut out_root = features_dir(config);
    if let Some((i, n)) = opts.part {
        let name = out_root
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "features".into());
        out_root.set_file_name(format!("{name}-part-{i}-of-{n}"));
    }
    let _lock = crate::base::lock::lock_dir(&out_root)?;
    check_feature_set(&out_root, &inputs_identity(config, opts, None)?)?;
    let ctx = Extraction {
        config,
        encoder: encoder.as_ref(),
        preprocessor: &preprocessor,
        encoder_info,
        device: &device,
        size: (h, w),
    };
    let mut splits = vec![config.data.train_split.clone()];
    if config.data.eval_split != config.data.train_split {
        splits.push(config.data.eval_split.clone());
    }
    splits.iter().map(|split| extract_split(&ctx, split, &out_root, opts)).collect()
}
