//! `mono train`: an SAE on a feature store with reconstruction + λ·MonoLoss.
//!
//! Each step: a batch in the epoch's seeded order → forward → losses → backward → gradients to
//! the host → decoder gradients made tangent to the unit sphere → clipping → Adam → decoder rows
//! renormalised. Dead-latent counters advance on training steps only. Checkpoints hold every bit
//! of state, so a resumed run equals an uninterrupted one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::full_mono;
use super::optim::{self, Adam};
use super::run_dir;
use crate::base::config::Config;
use crate::data::store::FeatureStore;
use crate::eval::{self, EvalResults};
use crate::sae::{self, checkpoint, ops, ForwardPass, Sae, SaeSpec};

pub use super::run_dir::CHECKPOINTS_DIR;
pub const FINAL_SAE_DIR: &str = "sae";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const RESULTS_FILE: &str = "results.json";
pub const LATENT_STATS_FILE: &str = "latent_stats.safetensors";
const STATE_JSON: &str = "trainer_state.json";
const STATE_TENSORS: &str = "trainer_state.safetensors";
/// Checkpoints kept on disk (the newest ones).
const KEEP_CHECKPOINTS: usize = 2;

/// The stores a training run reads.
pub struct SaeTrainInputs<'a> {
    pub train: &'a FeatureStore,
    /// Judge embeddings of the same rows; None = the SAE input judges similarity.
    pub train_similarity: Option<&'a FeatureStore>,
    pub eval: Option<&'a FeatureStore>,
    pub eval_similarity: Option<&'a FeatureStore>,
}

/// Scalar state saved with each checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct TrainerState {
    step: usize,
    lambda: f64,
    batch_size: usize,
    seed: u64,
    extra_state: Vec<f64>,
}

pub struct TrainReport {
    pub steps: usize,
    pub results: Option<EvalResults>,
}

/// What one step measured (also a metrics.jsonl line).
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    pub loss: f64,
    pub reconstruction: f64,
    pub terms: HashMap<String, f64>,
    pub mono_loss: Option<f64>,
    /// Batch MonoScore (measured every step when λ > 0, else on logged steps).
    pub mono_score: Option<f64>,
    pub mono_active: Option<usize>,
    pub l0: f64,
    pub dead: usize,
    pub grad_norm: f64,
    /// Exact full-dataset MonoScore, on steps that took the full-dataset MonoLoss (period > 1).
    pub full_mono_score: Option<f64>,
}

/// Checks the inputs against the config before anything is written.
fn check_inputs(config: &Config, inputs: &SaeTrainInputs) -> Result<()> {
    let train = inputs.train;
    let b = config.train.batch_size;
    ensure!(
        b <= train.len(),
        "train.batch_size = {b} exceeds the {} rows of {}",
        train.len(),
        train.dir().display()
    );
    ensure!(
        config.sae.k <= config.sae.n_latents,
        "sae.k = {} must be ≤ sae.n_latents = {}",
        config.sae.k,
        config.sae.n_latents
    );
    for (store, judge) in
        [(Some(train), inputs.train_similarity), (inputs.eval, inputs.eval_similarity)]
    {
        if let (Some(store), Some(judge)) = (store, judge) {
            ensure!(
                judge.len() == store.len(),
                "similarity store {} has {} rows but {} has {}: it must embed the same images in the same order",
                judge.dir().display(),
                judge.len(),
                store.dir().display(),
                store.len()
            );
            if let Some(row) = (0..store.len()).find(|&r| judge.path(r) != store.path(r)) {
                bail!(
                    "similarity store {} row {row} is {:?} but {} row {row} is {:?}: not the same images",
                    judge.dir().display(),
                    judge.path(row),
                    store.dir().display(),
                    store.path(row)
                );
            }
        }
    }
    if let Some(eval) = inputs.eval {
        ensure!(
            eval.dim() == train.dim(),
            "{} has {} feature columns but {} has {}",
            eval.dir().display(),
            eval.dim(),
            train.dir().display(),
            train.dim()
        );
    }
    Ok(())
}

/// The newest checkpoint of a run, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(run_dir::checkpoint_dirs(run_dir, "step-")?.pop().map(|(_, p)| p))
}

fn save_checkpoint(
    run_dir: &Path,
    sae: &dyn Sae,
    adam: &Adam,
    since_fired: &[u64],
    state: &TrainerState,
    source: &serde_json::Value,
) -> Result<()> {
    let dir = run_dir.join(CHECKPOINTS_DIR).join(format!("step-{:08}", state.step));
    let weights = checkpoint::weight_tensors(sae)?;
    let cfg = checkpoint::cfg_json(sae, source);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for ((name, _), (m, v)) in sae.params().named().iter().zip(&adam.moments) {
        tensors.insert(format!("adam_m.{name}"), Tensor::from_slice(m, m.len(), &Device::Cpu)?);
        tensors.insert(format!("adam_v.{name}"), Tensor::from_slice(v, v.len(), &Device::Cpu)?);
    }
    let fired: Vec<i64> = since_fired.iter().map(|&s| s as i64).collect();
    tensors.insert(
        "samples_since_fired".into(),
        Tensor::from_vec(fired, since_fired.len(), &Device::Cpu)?,
    );
    let state_json =
        serde_json::to_string_pretty(&json!({"trainer": state, "adam_steps": adam.steps}))? + "\n";
    crate::base::io::write_dir_atomic(&dir, |tmp| {
        checkpoint::write_into(tmp, &weights, &cfg)?;
        candle_core::safetensors::save(&tensors, tmp.join(STATE_TENSORS))?;
        std::fs::write(tmp.join(STATE_JSON), &state_json)?;
        Ok(())
    })?;
    run_dir::prune_checkpoints(run_dir, "step-", KEEP_CHECKPOINTS)
}

/// Restores SAE, optimizer and counters from a checkpoint written by `save_checkpoint`.
fn load_checkpoint(
    dir: &Path,
    spec: &SaeSpec,
    device: &Device,
) -> Result<(Box<dyn Sae>, Adam, Vec<u64>, TrainerState)> {
    let saved_spec = checkpoint::read_spec(dir)?;
    ensure!(
        saved_spec == *spec,
        "checkpoint {} does not match the config: it has d_in = {}, n_latents = {}, kind = {:?}, the config gives d_in = {}, n_latents = {}, kind = {:?}",
        dir.display(),
        saved_spec.d_in,
        saved_spec.n_latents,
        saved_spec.kind,
        spec.d_in,
        spec.n_latents,
        spec.kind
    );
    let mut sae = checkpoint::load(dir, device)?;
    let state_path = dir.join(STATE_JSON);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", state_path.display()))?;
    let state: TrainerState = serde_json::from_value(doc["trainer"].clone())
        .with_context(|| format!("{}: bad trainer state", state_path.display()))?;
    sae.restore_extra_state(&state.extra_state)?;
    let tensors_path = dir.join(STATE_TENSORS);
    let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", tensors_path.display()))?;
    let get = |name: &str| -> Result<&Tensor> {
        tensors.get(name).with_context(|| format!("{}: missing `{name}`", tensors_path.display()))
    };
    let names: Vec<(&str, usize)> =
        sae.params().named().iter().map(|(n, v)| (*n, v.elem_count())).collect();
    let sizes: Vec<usize> = names.iter().map(|(_, s)| *s).collect();
    let mut adam = Adam::new(&sizes, [0.9, 0.999], 1e-8);
    adam.steps = doc["adam_steps"].as_u64().context("trainer state lacks adam_steps")?;
    for ((name, size), moments) in names.iter().zip(adam.moments.iter_mut()) {
        let m = get(&format!("adam_m.{name}"))?.to_vec1::<f32>()?;
        let v = get(&format!("adam_v.{name}"))?.to_vec1::<f32>()?;
        ensure!(
            m.len() == *size && v.len() == *size,
            "{}: optimizer state of `{name}` has the wrong size",
            tensors_path.display()
        );
        *moments = (m, v);
    }
    let since_fired: Vec<u64> = get("samples_since_fired")?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|s| s.max(0) as u64)
        .collect();
    ensure!(
        since_fired.len() == spec.n_latents,
        "{}: dead-latent counters have the wrong size",
        tensors_path.display()
    );
    Ok((sae, adam, since_fired, state))
}

/// Which latents fired in this batch, and how many non-zeros the batch has.
fn fired_columns(latents: &Tensor) -> Result<(Vec<bool>, usize)> {
    let (_, m) = latents.dims2()?;
    let host = latents
        .detach()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut fired = vec![false; m];
    let mut nnz = 0;
    for row in host.chunks_exact(m) {
        for (f, &v) in fired.iter_mut().zip(row) {
            if v != 0.0 {
                *f = true;
                nnz += 1;
            }
        }
    }
    Ok((fired, nnz))
}

/// One optimisation step's losses; returns the total loss tensor and the metrics so far.
/// With λ = 0 the batch MonoScore is measured (no graph) only when `measure_mono`.
fn step_losses(
    sae: &dyn Sae,
    pass: &ForwardPass,
    similarity: &Tensor,
    dead: &[bool],
    lambda: f64,
    eps: f64,
    measure_mono: bool,
) -> Result<(Tensor, StepMetrics)> {
    let reconstruction = sae.reconstruction_loss(pass)?;
    let mut total = reconstruction.clone();
    let mut terms = HashMap::new();
    for (name, term) in sae.extra_losses(pass, dead)? {
        terms.insert(name.to_string(), term.to_scalar::<f32>()? as f64);
        total = (total + term)?;
    }
    let (mono_loss, stats) = match &pass.mono {
        Some((loss, stats)) => {
            total = (total + (loss * lambda)?)?;
            (Some(loss.to_scalar::<f32>()? as f64), Some(*stats))
        }
        None if measure_mono => {
            let (_, stats) =
                crate::monoscore::batch_mono_loss(&pass.latents().detach(), similarity, eps, None)?;
            (None, Some(stats))
        }
        None => (None, None),
    };
    let metrics = StepMetrics {
        step: 0,
        epoch: 0,
        lr: 0.0,
        loss: total.to_scalar::<f32>()? as f64,
        reconstruction: reconstruction.to_scalar::<f32>()? as f64,
        terms,
        mono_loss,
        mono_score: stats.map(|s| s.mean_score),
        mono_active: stats.map(|s| s.n_active),
        l0: 0.0,
        dead: dead.iter().filter(|d| **d).count(),
        grad_norm: 0.0,
        full_mono_score: None,
    };
    Ok((total, metrics))
}

/// The state that one training step changes, and the step itself.
pub struct SaeTrainer {
    pub sae: Box<dyn Sae>,
    pub adam: Adam,
    /// Training samples since each latent last fired.
    pub since_fired: Vec<u64>,
    /// λ of the batch MonoLoss (0 when the full-dataset form is used instead).
    batch_lambda: f64,
    lambda: f64,
    eps: f64,
    clip: Option<f64>,
    dead_after: u64,
}

impl SaeTrainer {
    pub fn new(
        sae: Box<dyn Sae>,
        adam: Adam,
        since_fired: Vec<u64>,
        config: &Config,
        lambda: f64,
    ) -> Self {
        Self {
            sae,
            adam,
            since_fired,
            batch_lambda: if config.mono.period == 1 { lambda } else { 0.0 },
            lambda,
            eps: config.mono.eps,
            clip: config.train.grad_clip(config.sae.kind),
            dead_after: config.sae.dead_after,
        }
    }

    /// A fresh SAE and optimizer for `config` on `d_in`-dimensional features.
    pub fn fresh(config: &Config, d_in: usize, lambda: f64, device: &Device) -> Result<Self> {
        let spec = SaeSpec::from_config(&config.sae, d_in);
        let sae = sae::build(&spec, config.run.seed, device)?;
        let sizes: Vec<usize> = sae.params().named().iter().map(|(_, v)| v.elem_count()).collect();
        let adam = Adam::new(&sizes, config.train.adam_betas, config.train.adam_eps);
        Ok(Self::new(sae, adam, vec![0u64; spec.n_latents], config, lambda))
    }

    /// One optimisation step on a batch `input` (B, D) with its similarity embeddings;
    /// `full` adds λ times the full-dataset MonoLoss gradient; `measure_mono` asks for the
    /// batch MonoScore even when it is not trained on (for logging).
    pub fn step(
        &mut self,
        input: &Tensor,
        similarity: &Tensor,
        lr: f64,
        full: Option<full_mono::FullMonoGradient>,
        measure_mono: bool,
    ) -> Result<StepMetrics> {
        let (b, d) = input.dims2()?;
        let dead: Vec<bool> = self.since_fired.iter().map(|&s| s >= self.dead_after).collect();
        let mono = (self.batch_lambda > 0.0).then_some(ops::MonoTerm {
            similarity,
            lambda: self.batch_lambda,
            eps: self.eps,
        });
        let pass = sae::forward_with_mono(self.sae.as_ref(), input, true, mono)?;
        let (total, mut metrics) = step_losses(
            self.sae.as_ref(),
            &pass,
            similarity,
            &dead,
            self.batch_lambda,
            self.eps,
            measure_mono,
        )?;
        ensure!(metrics.loss.is_finite(), "training diverged: loss is {}", metrics.loss);
        let grads = total.backward()?;

        let params = self.sae.params().named();
        let mut host: Vec<Vec<f32>> =
            params.iter().map(|(_, v)| optim::host_grad(&grads, v)).collect::<Result<_>>()?;
        drop(grads);
        if let Some(full) = full {
            for (h, g) in host.iter_mut().zip(&full.grads) {
                h.iter_mut().zip(g).for_each(|(a, b)| *a += self.lambda as f32 * b);
            }
            metrics.full_mono_score = Some(full.mean_score);
        }
        let dec_index = params.iter().position(|(n, _)| *n == "W_dec").expect("W_dec");
        let w_dec = optim::host_data(params[dec_index].1)?;
        optim::project_out_parallel(&mut host[dec_index], &w_dec, d);
        metrics.grad_norm = match self.clip {
            Some(max) => optim::clip_global_norm(&mut host, max),
            None => optim::global_norm(&host),
        };
        let vars: Vec<&candle_core::Var> = params.iter().map(|(_, v)| *v).collect();
        self.adam.step(&vars, &host, lr)?;
        optim::update_param(&self.sae.params().w_dec, |w| optim::normalize_rows(w, d))?;
        self.sae.observe_step(&pass);

        let (fired, nnz) = fired_columns(pass.latents())?;
        for (s, f) in self.since_fired.iter_mut().zip(&fired) {
            *s = if *f { 0 } else { s.saturating_add(b as u64) };
        }
        metrics.lr = lr;
        metrics.l0 = nnz as f64 / b as f64;
        Ok(metrics)
    }
}

/// Trains an SAE as `config` says, writing into `run_dir`.
pub fn train_sae(
    config: &Config,
    inputs: &SaeTrainInputs,
    run_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<TrainReport> {
    check_inputs(config, inputs)?;
    let lambda = config.lambda()?;
    let spec = SaeSpec::from_config(&config.sae, inputs.train.dim());
    let latest = latest_checkpoint(run_dir)?;
    let finished = run_dir.join(RESULTS_FILE).exists() || run_dir.join(FINAL_SAE_DIR).exists();
    if !resume && (latest.is_some() || finished) {
        bail!("{} already holds a training run; pass --resume to continue it, or choose another run.name", run_dir.display());
    }
    if resume && latest.is_none() {
        bail!("--resume: {} has no checkpoint to resume from", run_dir.display());
    }

    let (mut trainer, start_step) = match &latest {
        Some(dir) if resume => {
            let (sae, adam, since_fired, state) = load_checkpoint(dir, &spec, device)?;
            ensure!(
                state.batch_size == config.train.batch_size && state.seed == config.run.seed,
                "checkpoint {} was trained with batch_size {} and seed {}; the config says {} and {}: resuming would not reproduce the run",
                dir.display(),
                state.batch_size,
                state.seed,
                config.train.batch_size,
                config.run.seed
            );
            (SaeTrainer::new(sae, adam, since_fired, config, lambda), state.step)
        }
        _ => (SaeTrainer::fresh(config, spec.d_in, lambda, device)?, 0),
    };
    // The optimizer's hyper-parameters come from the config, its moments from the checkpoint.
    trainer.adam.beta1 = config.train.adam_betas[0];
    trainer.adam.beta2 = config.train.adam_betas[1];
    trainer.adam.eps = config.train.adam_eps;

    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    if start_step == 0 {
        crate::base::io::write_atomic(
            &run_dir.join("config.toml"),
            toml::to_string_pretty(config)?.as_bytes(),
        )?;
    }
    let metrics_path = run_dir.join(METRICS_FILE);
    run_dir::truncate_metrics(&metrics_path, start_step)?;
    let mut metrics_file =
        std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;

    let train = inputs.train;
    let (b, d) = (config.train.batch_size, train.dim());
    let steps_per_epoch = train.len() / b;
    let mut total_steps = steps_per_epoch * config.train.epochs;
    if let Some(cap) = config.train.max_steps {
        total_steps = total_steps.min(cap);
    }
    let source = json!({
        "features": train.dir().display().to_string(),
        "model": train.manifest().info.encoder.as_ref().and_then(|e| e.get("model")).cloned(),
        "output": train.manifest().info.encoder.as_ref().and_then(|e| e.get("output")).cloned(),
    });
    let bar = crate::base::progress::bar(total_steps as u64, "training");
    bar.set_position(start_step as u64);
    let started = Instant::now();
    let (mut x, mut sim) = (Vec::new(), Vec::new());
    let mut order: Option<(usize, Vec<u32>)> = None;

    for step in start_step..total_steps {
        let epoch = step / steps_per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((
                epoch,
                train.epoch_order(config.run.seed, epoch as u64, config.features.shuffle_buffer),
            ));
        }
        let rows = &order.as_ref().unwrap().1
            [(step % steps_per_epoch) * b..(step % steps_per_epoch + 1) * b];
        train.read_rows(rows, &mut x)?;
        let input = Tensor::from_slice(&x, (b, d), device)?;
        let similarity = match inputs.train_similarity {
            Some(judge) => {
                judge.read_rows(rows, &mut sim)?;
                Tensor::from_slice(&sim, (b, judge.dim()), device)?
            }
            None => input.clone(),
        };

        let full = if lambda > 0.0 && config.mono.period > 1 && (step + 1) % config.mono.period == 0
        {
            Some(full_mono::full_mono_gradient(
                trainer.sae.as_ref(),
                train,
                inputs.train_similarity,
                b,
                device,
            )?)
        } else {
            None
        };
        let lr = optim::scheduled_lr(
            config.train.lr,
            step,
            total_steps,
            config.train.warmup_steps,
            config.train.lr_decay,
        );
        let done = step + 1;
        let log = done % config.train.log_every == 0 || done == total_steps;
        let mut metrics = trainer
            .step(&input, &similarity, lr, full, log)
            .with_context(|| format!("training step {done}"))?;

        metrics.step = done;
        metrics.epoch = epoch;
        if log {
            writeln!(metrics_file, "{}", serde_json::to_string(&metrics)?)?;
        }
        if let Some(score) = metrics.mono_score {
            bar.set_prefix(format!(
                "loss {:.4} L0 {:.1} dead {} mono {score:.3}",
                metrics.loss, metrics.l0, metrics.dead
            ));
        }
        bar.inc(1);
        if (config.train.checkpoint_every > 0 && done % config.train.checkpoint_every == 0)
            || done == total_steps
        {
            metrics_file.flush()?;
            let state = TrainerState {
                step: done,
                lambda,
                batch_size: b,
                seed: config.run.seed,
                extra_state: trainer.sae.extra_state(),
            };
            save_checkpoint(
                run_dir,
                trainer.sae.as_ref(),
                &trainer.adam,
                &trainer.since_fired,
                &state,
                &source,
            )?;
        }
    }
    bar.finish_and_clear();
    metrics_file.flush()?;
    let seconds = started.elapsed().as_secs_f64();
    checkpoint::save(&run_dir.join(FINAL_SAE_DIR), trainer.sae.as_ref(), &source)?;

    let results = match inputs.eval {
        Some(store) => Some(evaluate_into(
            run_dir,
            trainer.sae.as_ref(),
            store,
            inputs.eval_similarity,
            config,
            lambda,
            seconds,
            device,
        )?),
        None => None,
    };
    Ok(TrainReport { steps: total_steps, results })
}

/// Evaluates and writes results.json and latent_stats.safetensors into `run_dir`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_into(
    run_dir: &Path,
    sae: &dyn Sae,
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    config: &Config,
    lambda: f64,
    train_seconds: f64,
    device: &Device,
) -> Result<EvalResults> {
    let (results, latents) =
        eval::evaluate(sae, store, similarity, config.train.batch_size, device)?;
    let doc = json!({
        "results": results,
        "sae": sae.spec(),
        "lambda": lambda,
        "train_seconds": train_seconds,
        "features": store.dir().display().to_string(),
    });
    write_latent_stats(run_dir, &latents)?;
    crate::base::io::write_json_atomic(&run_dir.join(RESULTS_FILE), &doc)?;
    Ok(results)
}

/// `mono train CONFIG`: opens the config's stores and device, then trains and evaluates.
pub fn train_from_config(config: &Config, resume: bool) -> Result<TrainReport> {
    let sets = crate::data::sets::open_feature_sets(config)?;
    let device = crate::base::device::open_device(&config.run.device)?;
    let inputs = SaeTrainInputs {
        train: &sets.train,
        train_similarity: sets.train_similarity.as_ref(),
        eval: Some(&sets.eval),
        eval_similarity: sets.eval_similarity.as_ref(),
    };
    train_sae(config, &inputs, &config.run_dir(), resume, &device)
}

/// `mono eval RUN_DIR|CONFIG [--split S]`: evaluates a run's final SAE (or its newest checkpoint)
/// and writes results.json (results-S.json for another split). Returns the file and the results.
pub fn eval_run(target: &Path, split: Option<&str>) -> Result<(PathBuf, EvalResults)> {
    let (config, run_dir) = if target.is_file() {
        let config = Config::load(target)?;
        let dir = config.run_dir();
        (config, dir)
    } else {
        let path = target.join("config.toml");
        ensure!(
            path.is_file(),
            "{} is neither a config file nor a run directory (no config.toml)",
            target.display()
        );
        (Config::load(&path)?, target.to_path_buf())
    };
    let device = crate::base::device::open_device(&config.run.device)?;
    let sae_dir = match run_dir.join(FINAL_SAE_DIR) {
        d if d.is_dir() => d,
        _ => latest_checkpoint(&run_dir)?.with_context(|| {
            format!("{} has no trained SAE (no sae/ and no checkpoint)", run_dir.display())
        })?,
    };
    let sae = checkpoint::load(&sae_dir, &device)?;
    let split = split.unwrap_or(&config.data.eval_split).to_string();
    let dir = crate::data::sets::features_dir(&config);
    let store = crate::data::store::open_split(&dir, &split)?;
    let judge = config
        .mono
        .similarity_store
        .as_ref()
        .map(|j| crate::data::store::open_split(j, &split))
        .transpose()?;
    let lambda = config.lambda().unwrap_or(0.0);
    let (results, latents) =
        eval::evaluate(sae.as_ref(), &store, judge.as_ref(), config.train.batch_size, &device)?;
    let name = if split == config.data.eval_split {
        RESULTS_FILE.to_string()
    } else {
        format!("results-{split}.json")
    };
    let doc = json!({"results": results, "sae": sae.spec(), "lambda": lambda, "checkpoint": sae_dir.display().to_string()});
    crate::base::io::write_json_atomic(&run_dir.join(&name), &doc)?;
    if name == RESULTS_FILE {
        write_latent_stats(&run_dir, &latents)?;
    }
    Ok((run_dir.join(name), results))
}

fn write_latent_stats(run_dir: &Path, latents: &eval::LatentStats) -> Result<()> {
    let tmp = run_dir.join(format!(".{LATENT_STATS_FILE}.tmp"));
    candle_core::safetensors::save(&latents.tensors()?, &tmp)?;
    std::fs::rename(&tmp, run_dir.join(LATENT_STATS_FILE))?;
    Ok(())
}
