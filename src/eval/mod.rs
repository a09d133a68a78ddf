//! Evaluation of an SAE on a feature store split, in one streaming pass: R² (per-feature
//! explained variance, averaged), MSE, L0, dead latents, MonoScore (one-pass engine, sparse path)
//! and class purity. Never touches the training dead-latent counters.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::base::config::Config;
use crate::base::sparse::SparseBatch;
use crate::data::store::FeatureStore;
use crate::layout::{
    split_results_file, write_json, EvalResults, Purity, TrainResults, CONFIG_FILE, FINAL_SAE_DIR,
    LATENT_STATS_FILE, RESULTS_FILE,
};
use crate::monoscore::{MonoScoreAccumulator, MonoScores};
use crate::sae::{Inference, Inferrer, Sae};

/// Per-latent numbers behind the summary (for reports and histograms).
pub struct LatentStats {
    pub monoscores: MonoScores,
    pub fire_count: Vec<u64>,
    pub purity_binary: Vec<Option<f64>>,
    pub purity_weighted: Vec<Option<f64>>,
}

/// Streaming sums for R² and MSE over D features, in f64.
struct ReconstructionStats {
    n: u64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    sq_err: Vec<f64>,
}

impl ReconstructionStats {
    fn new(d: usize) -> Self {
        Self { n: 0, sum: vec![0.0; d], sum_sq: vec![0.0; d], sq_err: vec![0.0; d] }
    }

    fn add(&mut self, x: &[f32], recon: &[f32], d: usize) {
        for (row, rrow) in x.chunks_exact(d).zip(recon.chunks_exact(d)) {
            for j in 0..d {
                let (a, b) = (row[j] as f64, rrow[j] as f64);
                self.sum[j] += a;
                self.sum_sq[j] += a * a;
                self.sq_err[j] += (a - b) * (a - b);
            }
            self.n += 1;
        }
    }

    /// (per-feature R² averaged over features that vary, total R², MSE).
    fn finish(&self) -> (f64, f64, f64) {
        let n = self.n as f64;
        let (mut r2_sum, mut counted, mut tot_sum, mut err_sum) = (0.0, 0usize, 0.0, 0.0);
        for j in 0..self.sum.len() {
            let ss_tot = self.sum_sq[j] - self.sum[j] * self.sum[j] / n;
            tot_sum += ss_tot;
            err_sum += self.sq_err[j];
            if ss_tot > 1e-12 * n.max(1.0) {
                r2_sum += 1.0 - self.sq_err[j] / ss_tot;
                counted += 1;
            }
        }
        let r2 = if counted > 0 { r2_sum / counted as f64 } else { f64::NAN };
        let r2_total = if tot_sum > 0.0 { 1.0 - err_sum / tot_sum } else { f64::NAN };
        (r2, r2_total, err_sum / (n * self.sum.len() as f64))
    }
}

/// Per latent and class: activating images and summed activation.
struct PurityStats {
    classes: usize,
    count: Vec<u64>,
    weight: Vec<f64>,
    total_count: Vec<u64>,
    total_weight: Vec<f64>,
}

impl PurityStats {
    fn new(m: usize, classes: usize) -> Self {
        Self {
            classes,
            count: vec![0; m * classes],
            weight: vec![0.0; m * classes],
            total_count: vec![0; m],
            total_weight: vec![0.0; m],
        }
    }

    fn add(&mut self, latents: &SparseBatch, labels_of: impl Fn(usize) -> Vec<u32>) {
        for r in 0..latents.rows() {
            let labels = labels_of(r);
            for e in latents.row_offsets[r]..latents.row_offsets[r + 1] {
                let (k, v) = (latents.columns[e] as usize, latents.values[e] as f64);
                self.total_count[k] += 1;
                self.total_weight[k] += v;
                for &c in &labels {
                    self.count[k * self.classes + c as usize] += 1;
                    self.weight[k * self.classes + c as usize] += v;
                }
            }
        }
    }

    /// (binary, weighted) purity per latent; None for latents that never fired.
    fn per_latent(&self) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
        (0..self.total_count.len())
            .map(|k| {
                if self.total_count[k] == 0 {
                    return (None, None);
                }
                let row = k * self.classes..(k + 1) * self.classes;
                let best_count = self.count[row.clone()].iter().copied().max().unwrap_or(0);
                let best_weight = self.weight[row].iter().copied().fold(0.0, f64::max);
                let weighted = if self.total_weight[k] > 0.0 {
                    best_weight / self.total_weight[k]
                } else {
                    0.0
                };
                (Some(best_count as f64 / self.total_count[k] as f64), Some(weighted))
            })
            .unzip()
    }
}

fn mean(values: &[Option<f64>]) -> (f64, usize) {
    let live: Vec<f64> = values.iter().flatten().copied().collect();
    (
        if live.is_empty() { f64::NAN } else { live.iter().sum::<f64>() / live.len() as f64 },
        live.len(),
    )
}

/// One inferred batch: store rows start.., their features and the SAE's output.
struct Batch {
    start: usize,
    x: Vec<f32>,
    latents: SparseBatch,
    /// (rows, D) reconstruction on the CPU, f32.
    recon: Tensor,
}

/// Reads rows start..end into `x` (a recycled buffer) and runs the SAE on them.
fn infer_batch(
    sae: &Inferrer,
    store: &FeatureStore,
    start: usize,
    end: usize,
    mut x: Vec<f32>,
    device: &Device,
) -> Result<Batch> {
    store.read_range(start, end, &mut x)?;
    let input = Tensor::from_slice(&x, (end - start, store.dim()), device)?;
    let Inference { latents, recon } = sae.infer(&input)?;
    let recon = recon.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok(Batch { start, x, latents, recon })
}

/// The streaming statistics of an evaluation, fed batch after batch in store order.
struct Tally<'a> {
    store: &'a FeatureStore,
    similarity: Option<&'a FeatureStore>,
    recon: ReconstructionStats,
    scores: MonoScoreAccumulator,
    purity: Option<PurityStats>,
    fire_count: Vec<u64>,
    nnz: usize,
    /// The similarity store's rows of the batch (a recycled buffer).
    sim: Vec<f32>,
}

impl Tally<'_> {
    /// Adds a batch; gives back its row count and its feature buffer for reuse.
    fn add(&mut self, batch: Batch) -> Result<(usize, Vec<f32>)> {
        let Batch { start, x, latents, recon } = batch;
        let (d, rows) = (self.store.dim(), latents.rows());
        crate::base::cpu::with_cpu_slice(&recon, |r| self.recon.add(&x, r, d))?;
        self.nnz += latents.nnz();
        latents.add_column_counts(&mut self.fire_count);
        let judge = match self.similarity {
            Some(s) => {
                s.read_range(start, start + rows, &mut self.sim)?;
                &self.sim
            }
            None => &x,
        };
        self.scores.add_sparse(judge, latents.as_rows()).with_context(|| {
            format!("rows {start}..{} of {}", start + rows, self.store.dir().display())
        })?;
        if let Some(p) = self.purity.as_mut() {
            p.add(&latents, |r| self.store.row_labels(start + r).to_vec());
        }
        Ok((rows, x))
    }
}

/// The largest evaluation batch on the CPU.
const CPU_BATCH_ROWS: usize = 1024;

/// Evaluates `sae` on every row of `store`. `similarity` (same rows) judges MonoScore; without it
/// the SAE input does, as in training.
pub fn evaluate(
    sae: &dyn Sae,
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    batch_rows: usize,
    device: &Device,
) -> Result<(EvalResults, LatentStats)> {
    let (n, d, m) = (store.len(), store.dim(), sae.spec().n_latents);
    ensure!(
        d == sae.spec().d_in,
        "{}: features have {d} columns but the SAE expects d_in = {}",
        store.dir().display(),
        sae.spec().d_in
    );
    if let Some(s) = similarity {
        ensure!(
            s.len() == n,
            "similarity store {} has {} rows, {} has {n}",
            s.dir().display(),
            s.len(),
            store.dir().display()
        );
    }
    // On the CPU, batches of at most 1024 rows keep each (rows × M) buffer near the size of the
    // last-level cache: 15–20 % faster than 4096 rows at M = 8192 (BENCHMARKS.md), same results.
    let batch_rows = if device.is_cpu() { batch_rows.min(CPU_BATCH_ROWS) } else { batch_rows };
    let classes = store.n_classes();
    let mut tally = Tally {
        store,
        similarity,
        recon: ReconstructionStats::new(d),
        scores: MonoScoreAccumulator::new(similarity.map_or(d, |s| s.dim()), m),
        purity: (classes > 0).then(|| PurityStats::new(m, classes)),
        fire_count: vec![0u64; m],
        nnz: 0,
        sim: Vec::new(),
    };
    let bar = crate::base::progress::bar(n as u64, "evaluating");
    // Batch i's statistics are added on a second thread while this one infers batch i + 1:
    // their serial parts (CSR merges, R² sums, each batch's CSC) overlap the other's parallel
    // work instead of leaving a core idle. The statistics still see the batches in order, so
    // the results do not depend on the overlap; inference stays on this thread (the device's).
    // At most three batches are alive: one inferred, one queued, one being added.
    std::thread::scope(|s| -> Result<()> {
        let (batches, queued) = std::sync::mpsc::sync_channel::<Batch>(1);
        let (buffers, recycled) = std::sync::mpsc::channel::<Vec<f32>>();
        let (tally, bar) = (&mut tally, &bar);
        let adder = s.spawn(move || -> Result<()> {
            for batch in queued {
                let (rows, x) = tally.add(batch)?;
                bar.inc(rows as u64);
                let _ = buffers.send(x);
            }
            Ok(())
        });
        let step = batch_rows.max(1);
        let inferrer = Inferrer::new(sae)?;
        let infer_all = || -> Result<()> {
            for start in (0..n).step_by(step) {
                let x = recycled.try_recv().unwrap_or_default();
                let batch = infer_batch(&inferrer, store, start, (start + step).min(n), x, device)?;
                // A closed channel: the adder stopped on an error, which its join returns.
                if batches.send(batch).is_err() {
                    break;
                }
            }
            Ok(())
        };
        let inferred = infer_all();
        drop(batches);
        // The adder's error concerns an earlier batch than this thread's.
        adder.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        inferred
    })?;
    bar.finish_and_clear();
    let Tally { recon: recon_stats, scores, purity, fire_count, nnz: nnz_total, .. } = tally;

    let (r2, r2_total, mse) = recon_stats.finish();
    let monoscores = scores.finish();
    let dead_latents = fire_count.par_iter().filter(|c| **c == 0).count();
    let (mut purity_binary, mut purity_weighted) =
        purity.as_ref().map(|p| p.per_latent()).unwrap_or_else(|| (vec![None; m], vec![None; m]));
    // One set of live latents for every per-latent metric: MonoScore's (a latent firing on fewer
    // than two images has no score, and its purity of 1 would inflate the mean).
    for (k, score) in monoscores.scores.iter().enumerate() {
        if score.is_none() {
            (purity_binary[k], purity_weighted[k]) = (None, None);
        }
    }
    let purity_summary = purity.as_ref().map(|_| {
        let (binary, latents) = mean(&purity_binary);
        let (weighted, _) = mean(&purity_weighted);
        Purity { binary, weighted, latents }
    });
    let results = EvalResults {
        split: store.manifest().info.split.clone(),
        n_images: n,
        r2,
        r2_total,
        mse,
        l0: nnz_total as f64 / n as f64,
        dead_latents,
        live_latents: m - dead_latents,
        monoscore: monoscores.summary(),
        purity: purity_summary,
    };
    Ok((results, LatentStats { monoscores, fire_count, purity_binary, purity_weighted }))
}

impl LatentStats {
    /// Per-latent tensors (NaN where undefined), for `latent_stats.safetensors`.
    pub fn tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let cpu = Device::Cpu;
        let opt = |v: &[Option<f64>]| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                v.iter().map(|x| x.unwrap_or(f64::NAN) as f32).collect::<Vec<f32>>(),
                v.len(),
                &cpu,
            )?)
        };
        let fire: Vec<f32> = self.fire_count.iter().map(|&c| c as f32).collect();
        Ok([
            ("monoscore".to_string(), opt(&self.monoscores.scores)?),
            ("purity_binary".to_string(), opt(&self.purity_binary)?),
            ("purity_weighted".to_string(), opt(&self.purity_weighted)?),
            ("fire_count".to_string(), Tensor::from_vec(fire, self.fire_count.len(), &cpu)?),
        ]
        .into_iter()
        .collect())
    }
}

/// Evaluates `sae` on `store` and writes results.json (`results_file`) and, for the run's own
/// evaluation split, latent_stats.safetensors into `run_dir`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_into(
    run_dir: &Path,
    results_file: &str,
    sae: &dyn Sae,
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    lambda: f64,
    train_seconds: Option<f64>,
    checkpoint: Option<&Path>,
    batch_rows: usize,
    device: &Device,
) -> Result<TrainResults> {
    let (results, latents) = evaluate(sae, store, similarity, batch_rows, device)?;
    let doc = TrainResults {
        results,
        sae: sae.spec().clone(),
        lambda,
        train_seconds,
        features: store.dir().display().to_string(),
        checkpoint: checkpoint.map(|c| c.display().to_string()),
    };
    if results_file == RESULTS_FILE {
        write_latent_stats(run_dir, &latents)?;
    }
    write_json(&run_dir.join(results_file), &doc)?;
    Ok(doc)
}

fn write_latent_stats(run_dir: &Path, latents: &LatentStats) -> Result<()> {
    crate::base::io::write_safetensors_atomic(&run_dir.join(LATENT_STATS_FILE), &latents.tensors()?)
}

/// `mono eval RUN_DIR|CONFIG [--split S]`: evaluates a run's final SAE (or its newest checkpoint)
/// and writes results.json (results-S.json for another split). Returns the file and the results.
pub fn eval_run(target: &Path, split: Option<&str>) -> Result<(PathBuf, EvalResults)> {
    let (config, run_dir) = if target.is_file() {
        let config = Config::load(target)?;
        let dir = config.run_dir();
        (config, dir)
    } else {
        let path = target.join(CONFIG_FILE);
        ensure!(
            path.is_file(),
            "{} is neither a config file nor a run directory (no {CONFIG_FILE})",
            target.display()
        );
        (Config::load(&path)?, target.to_path_buf())
    };
    let device = crate::base::device::open_device(&config.run.device)?;
    let sae_dir = match run_dir.join(FINAL_SAE_DIR) {
        d if d.is_dir() => d,
        _ => crate::train::run_dir::RunDir::new(&run_dir, "step-", 8)
            .checkpoints()?
            .pop()
            .map(|(_, p)| p)
            .with_context(|| {
                format!("{} has no trained SAE (no sae/ and no checkpoint)", run_dir.display())
            })?,
    };
    let kernels = crate::base::host::Kernels::choose(config.run.ops, &device);
    let sae = crate::sae::checkpoint::load(&sae_dir, &device, kernels)?;
    let split = split.unwrap_or(&config.data.eval_split).to_string();
    let dir = crate::data::sets::features_dir(&config);
    let store = crate::data::store::open_split(&dir, &split)?;
    let judge = config
        .mono
        .similarity_store
        .as_ref()
        .map(|j| crate::data::store::open_split(j, &split))
        .transpose()?;
    let name = if split == config.data.eval_split {
        RESULTS_FILE.to_string()
    } else {
        split_results_file(&split)
    };
    let lambda = config.lambda().unwrap_or(0.0);
    let doc = evaluate_into(
        &run_dir,
        &name,
        sae.as_ref(),
        &store,
        judge.as_ref(),
        lambda,
        None,
        Some(&sae_dir),
        config.train.batch_size,
        &device,
    )?;
    Ok((run_dir.join(name), doc.results))
}

/// Opens `path` as one store, or as a feature set's split `split`.
fn open_store_or_split(path: &Path, split: Option<&str>, what: &str) -> Result<FeatureStore> {
    let is_store = path.join(crate::data::store::MANIFEST_FILE).is_file();
    match (is_store, split) {
        (true, None) => FeatureStore::open(path),
        (true, Some(s)) => anyhow::bail!(
            "{what} {} is one split's store already: --split {s} does not apply",
            path.display()
        ),
        (false, Some(s)) => crate::data::store::open_split(path, s),
        (false, None) => {
            let splits = crate::data::store::list_splits(path)?;
            anyhow::bail!(
                "{what} {} is not a feature store; for a feature set name its split with --split \
                 (it holds {})",
                path.display(),
                if splits.is_empty() { "none".to_string() } else { splits.join(", ") }
            )
        }
    }
}

/// What `mono eval --sae` scored and how it did (written by `--out`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExternalEval {
    pub results: EvalResults,
    /// The SAE as mono reads it.
    pub sae: crate::sae::SaeSpec,
    pub sae_dir: String,
    pub features: String,
}

/// `mono eval --sae DIR --features STORE [--split S]`: scores any SAE in the SAELens layout
/// (written by mono or not) on a feature store, without a run directory. `similarity` judges
/// MonoScore (same rows; default: the features themselves).
pub fn eval_external(
    sae_dir: &Path,
    features: &Path,
    split: Option<&str>,
    similarity: Option<&Path>,
    device: &Device,
    kernels: crate::base::host::Kernels,
) -> Result<ExternalEval> {
    let sae = crate::sae::checkpoint::load(sae_dir, device, kernels)?;
    let store = open_store_or_split(features, split, "--features")?;
    let judge = similarity.map(|j| open_store_or_split(j, split, "--similarity")).transpose()?;
    if let Some(j) = &judge {
        store.check_same_rows(j)?;
    }
    let (results, _) = evaluate(sae.as_ref(), &store, judge.as_ref(), 4096, device)?;
    Ok(ExternalEval {
        results,
        sae: sae.spec().clone(),
        sae_dir: sae_dir.display().to_string(),
        features: store.dir().display().to_string(),
    })
}
