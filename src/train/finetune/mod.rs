//! `mono finetune`: CE (label smoothing) + λ·MonoLoss on the TopK layer, SGD/AdamW with
//! decay groups, warm-up + cosine/step schedules, clipping, EMA, per-epoch evaluation (top-1,
//! top-5, the TopK layer's MonoScore), checkpoints at every epoch and `--resume`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::sync_channel;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

pub mod model;

use model::{cross_entropy, topk_hits, Backbone, FinetuneModel, HeadSpec};

use crate::base::config::{Config, LrSchedule, Optimizer};
use crate::base::io::write_dir_atomic;
use crate::data::augment::Augment;
use crate::data::batch::{load_pixels, shuffled_items as epoch_order};
use crate::data::images::{class_labels, open_dataset, ImageDataset};
use crate::data::preprocess::Preprocessor;
use crate::data::store::{open_split, FeatureStore, SimilarityLookup};
use crate::models::params::{DecayGroup, Weights};
use crate::models::Trainable;
use crate::monoscore::{self as ops, MonoScoreAccumulator, ScorePath};
use crate::train::optim::{self, AdamW, Sgd};
use crate::train::run_dir;

/// One prepared batch.
pub struct Batch {
    /// (rows, 3·H·W) pixel values.
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    /// Dataset item indices.
    pub items: Vec<usize>,
}

/// Prepares the items `items` (training augmentation when `augment` is given, seeded by
/// (seed, epoch, item)). Unreadable images are errors here: a classifier cannot skip labels.
pub fn prepare(
    dataset: &dyn ImageDataset,
    labels: &[u32],
    items: &[usize],
    eval: &Preprocessor,
    augment: Option<(&Augment, u64, usize)>,
) -> Result<Batch> {
    let pixels = load_pixels(dataset, items, |i, image| match augment {
        Some((aug, seed, epoch)) => {
            let mut rng = StdRng::seed_from_u64(
                seed ^ ((epoch as u64) << 40) ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
            );
            aug.apply(image, &mut rng)
        }
        None => eval.process(&image::DynamicImage::ImageRgb8(image)),
    });
    let pixels: Vec<Vec<f32>> = items
        .iter()
        .zip(pixels)
        .map(|(&i, p)| p.with_context(|| dataset.path(i)))
        .collect::<Result<_>>()?;
    Ok(Batch {
        pixels: pixels.concat(),
        labels: items.iter().map(|&i| labels[i]).collect(),
        items: items.to_vec(),
    })
}

const METRICS: &str = "metrics.jsonl";
const RESULTS: &str = "results.json";
const KEEP_CHECKPOINTS: usize = 2;

enum Opt {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Opt {
    fn step(
        &mut self,
        vars: &[&candle_core::Var],
        grads: &[Vec<f32>],
        decay: &[f64],
        lr: f64,
    ) -> Result<()> {
        match self {
            Opt::Sgd(o) => o.step(vars, grads, decay, lr),
            Opt::AdamW(o) => o.step(vars, grads, decay, lr),
        }
    }

    /// State tensors for checkpoints: one or two buffers per parameter.
    fn buffers(&self) -> Vec<&Vec<f32>> {
        match self {
            Opt::Sgd(o) => o.buffers.iter().collect(),
            Opt::AdamW(o) => o.adam.moments.iter().flat_map(|(m, v)| [m, v]).collect(),
        }
    }

    fn buffers_mut(&mut self) -> Vec<&mut Vec<f32>> {
        match self {
            Opt::Sgd(o) => o.buffers.iter_mut().collect(),
            Opt::AdamW(o) => o.adam.moments.iter_mut().flat_map(|(m, v)| [m, v]).collect(),
        }
    }

    fn steps(&mut self) -> &mut u64 {
        match self {
            Opt::Sgd(o) => &mut o.steps,
            Opt::AdamW(o) => &mut o.adam.steps,
        }
    }
}

/// What one training step measured.
pub struct StepOutcome {
    pub loss: f64,
    pub ce: f64,
    pub mono: ops::MonoLossStats,
    pub grad_norm: f64,
    /// Top-1 accuracy of the batch (only when measured).
    pub top1: f64,
}

/// One finetuning step: forward, CE + λ·MonoLoss, backward, clipping, optimizer (on f32 master
/// weights when the model computes in half precision).
pub struct Stepper {
    opt: Opt,
    masters: Vec<candle_core::Var>,
    decay: Vec<f64>,
    lambda: f64,
    eps: f64,
    smoothing: f64,
    clip: Option<f64>,
}

impl Stepper {
    pub fn new(
        model: &FinetuneModel,
        f: &crate::base::config::FinetuneConfig,
        lambda: f64,
        eps: f64,
    ) -> Result<Self> {
        let half = model.params.dtype != DType::F32;
        let masters: Vec<candle_core::Var> = model
            .params
            .trainable()
            .map(|p| {
                if half {
                    candle_core::Var::from_tensor(
                        &p.get().to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
                    )
                } else {
                    Ok(p.var.clone().unwrap())
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let sizes: Vec<usize> = masters.iter().map(|v| v.elem_count()).collect();
        let decay =
            model
                .params
                .trainable()
                .map(|p| {
                    if p.group == DecayGroup::Weights {
                        f.weight_decay
                    } else {
                        f.norm_weight_decay
                    }
                })
                .collect();
        let opt = match f.optimizer {
            Optimizer::Sgd => Opt::Sgd(Sgd::new(&sizes, f.momentum, f.nesterov)),
            Optimizer::Adamw => Opt::AdamW(AdamW::new(&sizes, [0.9, 0.999], 1e-8)),
        };
        Ok(Self {
            opt,
            masters,
            decay,
            lambda,
            eps,
            smoothing: f.label_smoothing,
            clip: f.grad_clip,
        })
    }

    /// Copies the model's current values into the f32 master weights (after a restore).
    fn sync_masters(&self, model: &FinetuneModel) -> Result<()> {
        if model.params.dtype != DType::F32 {
            for (m, p) in self.masters.iter().zip(model.params.trainable()) {
                m.set(&p.get().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
            }
        }
        Ok(())
    }

    /// `similarity`: the batch's judge embeddings; None = the backbone's own detached features.
    pub fn step(
        &mut self,
        model: &FinetuneModel,
        x: &Tensor,
        labels: &[u32],
        similarity: Option<&Tensor>,
        lr: f64,
        measure: bool,
    ) -> Result<StepOutcome> {
        let out = model.forward(x, true)?;
        let ce = cross_entropy(&out.logits.to_dtype(DType::F32)?, labels, self.smoothing)?;
        let similarity = match similarity {
            Some(s) => s.to_dtype(DType::F32)?,
            None => out.features.detach().to_dtype(DType::F32)?,
        };
        // Without λ the MonoScore is only measured for the log, without a graph.
        let trained = self.lambda > 0.0;
        let (mono_loss, mono) = if trained || measure {
            let topk = if trained {
                out.topk.to_dtype(DType::F32)?
            } else {
                out.topk.detach().to_dtype(DType::F32)?
            };
            ops::batch_mono_loss(&topk, &similarity, self.eps, None)?
        } else {
            (Tensor::new(0f32, x.device())?, ops::MonoLossStats::default())
        };
        let loss = if trained { (&ce + (&mono_loss * self.lambda)?)? } else { ce.clone() };
        let loss_value = loss.to_scalar::<f32>()? as f64;
        ensure!(loss_value.is_finite(), "finetuning diverged: loss {loss_value}");
        let grads = loss.backward()?;
        let mut host: Vec<Vec<f32>> = model
            .params
            .trainable()
            .map(|p| optim::host_grad(&grads, p.var.as_ref().unwrap()))
            .collect::<Result<_>>()?;
        drop(grads);
        let grad_norm = match self.clip {
            Some(max) => optim::clip_global_norm(&mut host, max),
            None => optim::global_norm(&host),
        };
        let vars: Vec<&candle_core::Var> = self.masters.iter().collect();
        self.opt.step(&vars, &host, &self.decay, lr)?;
        if model.params.dtype != DType::F32 {
            for (m, p) in self.masters.iter().zip(model.params.trainable()) {
                p.var
                    .as_ref()
                    .unwrap()
                    .set(&m.as_tensor().to_device(x.device())?.to_dtype(model.params.dtype)?)?;
            }
        }
        let top1 = if measure {
            topk_hits(&out.logits, labels)?.0 as f64 / labels.len() as f64
        } else {
            f64::NAN
        };
        Ok(StepOutcome {
            loss: loss_value,
            ce: ce.to_scalar::<f32>()? as f64,
            mono,
            grad_norm,
            top1,
        })
    }
}

/// Learning rate at global step `step`: linear warm-up from lr/100, then the schedule.
pub fn finetune_lr(config: &Config, step: usize, steps_per_epoch: usize) -> f64 {
    let f = &config.finetune;
    let warmup = f.warmup_epochs * steps_per_epoch;
    if step < warmup {
        let t = step as f64 / warmup as f64;
        return f.lr * (0.01 + 0.99 * t);
    }
    let epoch = step / steps_per_epoch.max(1);
    match f.schedule {
        LrSchedule::Constant => f.lr,
        LrSchedule::Step => f.lr * f.gamma.powi((epoch / f.step_size) as i32),
        LrSchedule::Cosine => {
            let total = (f.epochs * steps_per_epoch).saturating_sub(warmup).max(1);
            let progress = (step - warmup) as f64 / total as f64;
            f.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}

/// Everything the run reads, opened and checked before anything is written.
struct Inputs {
    train: Box<dyn ImageDataset>,
    eval: Box<dyn ImageDataset>,
    train_labels: Vec<u32>,
    eval_labels: Vec<u32>,
    similarity: Option<(FeatureStore, FeatureStore)>,
    eval_pre: Preprocessor,
    size: (u32, u32),
    weights: Weights,
    model_config: serde_json::Value,
}

fn open_inputs(config: &Config, device: &Device) -> Result<Inputs> {
    let root = config.data.root.as_ref().context("data.root is not set: where are the images?")?;
    let train = open_dataset(config.data.kind, root, &config.data.train_split)?;
    let eval = open_dataset(config.data.kind, root, &config.data.eval_split)?;
    ensure!(
        train.class_names() == eval.class_names(),
        "data.train_split has {} classes and data.eval_split {}: a classifier needs the same classes",
        train.class_names().len(),
        eval.class_names().len()
    );
    let (train_labels, eval_labels) = (class_labels(train.as_ref())?, class_labels(eval.as_ref())?);
    let files = crate::encoders::hub::resolve(&config.encoder.model, &config.encoder.revision)?;
    let eval_pre = crate::encoders::preprocessor_for(config.encoder.kind, &files)?;
    let size =
        eval_pre.output_size().context("the encoder's preprocessing must give one image size")?;
    let weights = Weights::load(&files.weights, device)?;
    let model_config = files.config_json()?;
    let similarity = match &config.finetune.similarity_store {
        Some(dir) => Some((
            open_split(dir, &config.data.train_split).context("finetune.similarity_store")?,
            open_split(dir, &config.data.eval_split).context("finetune.similarity_store")?,
        )),
        None => None,
    };
    Ok(Inputs {
        train,
        eval,
        train_labels,
        eval_labels,
        similarity,
        eval_pre,
        size,
        weights,
        model_config,
    })
}

/// The run's mutable state, saved at every epoch.
struct State {
    epoch: usize,
    step: usize,
    history: Vec<serde_json::Value>,
}

/// Trainable parameter values, BatchNorm statistics, optimizer buffers and EMA, by name.
fn state_tensors(
    model: &FinetuneModel,
    opt: &Opt,
    ema: &Option<HashMap<String, Tensor>>,
) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    for p in model.params.trainable() {
        t.insert(format!("param.{}", p.name), p.get().detach().to_device(&Device::Cpu)?);
    }
    if let Backbone::Resnet(r) = &model.backbone {
        for (i, (m, v)) in r.running_stats().into_iter().enumerate() {
            t.insert(format!("bn.{i}.running_mean"), m.lock().unwrap().to_device(&Device::Cpu)?);
            t.insert(format!("bn.{i}.running_var"), v.lock().unwrap().to_device(&Device::Cpu)?);
        }
    }
    for (i, b) in opt.buffers().into_iter().enumerate() {
        t.insert(format!("optimizer.{i}"), Tensor::from_slice(b, b.len(), &Device::Cpu)?);
    }
    if let Some(ema) = ema {
        for (name, v) in ema {
            t.insert(format!("ema.{name}"), v.to_device(&Device::Cpu)?);
        }
    }
    Ok(t)
}

fn restore(
    dir: &Path,
    model: &FinetuneModel,
    opt: &mut Opt,
    ema: &mut Option<HashMap<String, Tensor>>,
    device: &Device,
) -> Result<State> {
    let path = dir.join("state.safetensors");
    let t = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let get = |k: &str| {
        t.get(k).with_context(|| {
            format!("{}: missing `{k}` (checkpoint of another model?)", path.display())
        })
    };
    for p in model.params.trainable() {
        let v = get(&format!("param.{}", p.name))?;
        ensure!(
            v.dims() == p.get().dims(),
            "{}: `{}` has another shape than the model's",
            path.display(),
            p.name
        );
        p.var.as_ref().unwrap().set(&v.to_dtype(p.get().dtype())?)?;
    }
    if let Backbone::Resnet(r) = &model.backbone {
        for (i, (m, v)) in r.running_stats().into_iter().enumerate() {
            *m.lock().unwrap() = get(&format!("bn.{i}.running_mean"))?.clone();
            *v.lock().unwrap() = get(&format!("bn.{i}.running_var"))?.clone();
        }
    }
    for (i, b) in opt.buffers_mut().into_iter().enumerate() {
        *b = get(&format!("optimizer.{i}"))?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    }
    if let Some(ema) = ema {
        for (name, v) in ema.iter_mut() {
            *v = get(&format!("ema.{name}"))?.clone();
        }
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
    *opt.steps() = doc["optimizer_steps"].as_u64().unwrap_or(0);
    Ok(State {
        epoch: doc["epoch"].as_u64().context("state.json: no epoch")? as usize,
        step: doc["step"].as_u64().context("state.json: no step")? as usize,
        history: doc["history"].as_array().cloned().unwrap_or_default(),
    })
}

/// EMA targets: trainable parameters (and BatchNorm statistics, which follow the same average).
fn ema_update(model: &FinetuneModel, ema: &mut HashMap<String, Tensor>, decay: f64) -> Result<()> {
    for p in model.params.trainable() {
        if let Some(e) = ema.get_mut(&p.name) {
            *e = ((&*e * decay)? + (p.get().detach() * (1.0 - decay))?)?;
        }
    }
    Ok(())
}

/// Runs `f` with the EMA weights in place of the trained ones.
fn with_ema<R>(
    model: &FinetuneModel,
    ema: &Option<HashMap<String, Tensor>>,
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let Some(ema) = ema else { return f() };
    let saved: Vec<Tensor> = model
        .params
        .trainable()
        .map(|p| p.get().detach().copy())
        .collect::<candle_core::Result<_>>()?;
    for p in model.params.trainable() {
        p.var.as_ref().unwrap().set(&ema[&p.name])?;
    }
    let result = f();
    for (p, v) in model.params.trainable().zip(saved) {
        p.var.as_ref().unwrap().set(&v)?;
    }
    result
}

/// Top-1, top-5 and the TopK layer's MonoScore on the eval split.
fn evaluate(
    model: &FinetuneModel,
    inputs: &Inputs,
    judge: Option<&SimilarityLookup>,
    batch_size: usize,
    device: &Device,
) -> Result<serde_json::Value> {
    let n = inputs.eval.len();
    let (h, w) = inputs.size;
    let width = model.monitored_width()?;
    let mut acc: Option<MonoScoreAccumulator> = None;
    let (mut top1, mut top5) = (0, 0);
    let mut sim = Vec::new();
    for start in (0..n).step_by(batch_size.max(1)) {
        let items: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let batch =
            prepare(inputs.eval.as_ref(), &inputs.eval_labels, &items, &inputs.eval_pre, None)?;
        let x = Tensor::from_vec(batch.pixels, (items.len(), 3, h as usize, w as usize), device)?
            .to_dtype(model.params.dtype)?;
        let out = model.forward(&x, false)?;
        let (t1, t5) = topk_hits(&out.logits, &batch.labels)?;
        top1 += t1;
        top5 += t5;
        let similarity = match judge {
            Some(j) => {
                j.read(&items, &mut sim)?;
                sim.clone()
            }
            None => out
                .features
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        };
        let acts = out
            .topk
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let acc = acc.get_or_insert_with(|| {
            MonoScoreAccumulator::new(similarity.len() / items.len(), width)
        });
        acc.add(&similarity, &acts, ScorePath::Auto)?;
    }
    let scores = acc.context("the eval split is empty")?.finish().summary();
    Ok(
        json!({"top1": top1 as f64 / n as f64, "top5": top5 as f64 / n as f64, "monoscore": scores, "n_images": n}),
    )
}

pub struct FinetuneReport {
    pub epochs: usize,
    pub results: serde_json::Value,
}

/// `mono finetune CONFIG [--resume]`.
pub fn finetune_from_config(config: &Config, resume: bool) -> Result<FinetuneReport> {
    let f = &config.finetune;
    let lambda = f.lambda.or(config.mono.lambda).context("finetune.lambda (or mono.lambda) must be set for finetuning (the paper uses 0, 0.03, 0.05, 0.07 and 0.1)")?;
    let device = crate::base::device::open_device(&config.run.device)?;
    let inputs = open_inputs(config, &device)?;
    let classes = inputs.train.class_names().len();
    let train_judge = inputs
        .similarity
        .as_ref()
        .map(|(s, _)| SimilarityLookup::new(s, inputs.train.as_ref()))
        .transpose()?;
    let eval_judge = inputs
        .similarity
        .as_ref()
        .map(|(_, s)| SimilarityLookup::new(s, inputs.eval.as_ref()))
        .transpose()?;
    let steps_per_epoch = inputs.train.len() / f.batch_size;
    ensure!(
        steps_per_epoch > 0,
        "finetune.batch_size = {} exceeds the {} training images",
        f.batch_size,
        inputs.train.len()
    );
    // Mixed precision: bf16 compute with f32 master weights on GPUs; the CPU has no bf16 matmul.
    let mixed = f.mixed_precision && !device.is_cpu();
    let dtype = if mixed { DType::BF16 } else { DType::F32 };
    let head = HeadSpec {
        topk_layer: f.topk_layer,
        reuse_head: f.reuse_head,
        expansion: f.expansion,
        k: f.k,
        classes,
    };
    let model = FinetuneModel::new(
        config.encoder.kind,
        &inputs.model_config,
        &inputs.weights,
        &Trainable::from_config(f),
        &head,
        config.run.seed,
        dtype,
        &device,
    )?;

    let run_dir = config.run_dir();
    let existing = run_dir::checkpoint_dirs(&run_dir, "epoch-")?;
    if !resume && (!existing.is_empty() || run_dir.join(RESULTS).exists()) {
        bail!("{} already holds a finetuning run; pass --resume to continue it, or choose another run.name", run_dir.display());
    }
    if resume && existing.is_empty() {
        bail!("--resume: {} has no checkpoint to resume from", run_dir.display());
    }

    let mut stepper = Stepper::new(&model, f, lambda, config.mono.eps)?;
    let mut ema: Option<HashMap<String, Tensor>> = f
        .ema_decay
        .map(|_| model.params.trainable().map(|p| (p.name.clone(), p.get().detach())).collect());
    let mut state = match existing.last() {
        Some((_, dir)) if resume => restore(dir, &model, &mut stepper.opt, &mut ema, &device)?,
        _ => State { epoch: 0, step: 0, history: Vec::new() },
    };
    stepper.sync_masters(&model)?;

    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    if state.epoch == 0 {
        crate::base::io::write_atomic(
            &run_dir.join("config.toml"),
            toml::to_string_pretty(config)?.as_bytes(),
        )?;
    }
    let metrics_path = run_dir.join(METRICS);
    run_dir::truncate_metrics(&metrics_path, state.step)?;
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;

    let (h, w) = inputs.size;
    let augment = Augment::new(&inputs.eval_pre, inputs.size);
    let total_steps = f.epochs * steps_per_epoch;
    let bar = crate::base::progress::bar(total_steps as u64, "finetuning");
    bar.set_position(state.step as u64);
    while state.epoch < f.epochs {
        let epoch = state.epoch;
        let order = epoch_order(inputs.train.len(), config.run.seed, epoch);
        let (tx, rx) = sync_channel::<Result<Batch>>(2);
        let train: &dyn ImageDataset = inputs.train.as_ref();
        let (labels, pre, aug, seed, bs) =
            (&inputs.train_labels, &inputs.eval_pre, &augment, config.run.seed, f.batch_size);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || {
                for chunk in order.chunks_exact(bs) {
                    if tx
                        .send(prepare(
                            train,
                            labels,
                            chunk,
                            pre,
                            if f.augment { Some((aug, seed, epoch)) } else { None },
                        ))
                        .is_err()
                    {
                        break;
                    }
                }
            });
            let mut sim = Vec::new();
            for batch in rx {
                let batch = batch?;
                let x = Tensor::from_vec(batch.pixels, (bs, 3, h as usize, w as usize), &device)?
                    .to_dtype(dtype)?;
                let similarity = match &train_judge {
                    Some(j) => {
                        j.read(&batch.items, &mut sim)?;
                        Some(Tensor::from_slice(&sim, (bs, j.dim()), &device)?)
                    }
                    None => None,
                };
                let log = (state.step + 1) % config.train.log_every == 0;
                let lr = finetune_lr(config, state.step, steps_per_epoch);
                let step = stepper
                    .step(&model, &x, &batch.labels, similarity.as_ref(), lr, log)
                    .with_context(|| format!("finetuning step {}", state.step + 1))?;
                if let (Some(ema), Some(d)) = (ema.as_mut(), f.ema_decay) {
                    ema_update(&model, ema, d)?;
                }
                state.step += 1;
                bar.inc(1);
                if log {
                    let line = json!({"step": state.step, "epoch": epoch, "lr": lr, "loss": step.loss, "ce": step.ce,
                        "mono_score": step.mono.mean_score, "mono_active": step.mono.n_active, "batch_top1": step.top1, "grad_norm": step.grad_norm});
                    writeln!(metrics, "{line}")?;
                    bar.set_prefix(format!(
                        "loss {:.3} mono {:.3}",
                        step.loss, step.mono.mean_score
                    ));
                }
            }
            Ok(())
        })?;
        let eval = with_ema(&model, &ema, || {
            evaluate(&model, &inputs, eval_judge.as_ref(), f.batch_size, &device)
        })?;
        let line = json!({"step": state.step, "epoch": epoch, "eval": eval});
        writeln!(metrics, "{line}")?;
        metrics.flush()?;
        bar.suspend(|| {
            if !crate::base::progress::is_quiet() {
                eprintln!(
                    "epoch {}: top-1 {:.4} top-5 {:.4} MonoScore {:?}",
                    epoch + 1,
                    eval["top1"],
                    eval["top5"],
                    eval["monoscore"]["mean"]
                );
            }
        });
        state.history.push(json!({"epoch": epoch + 1, "eval": eval}));
        state.epoch += 1;
        // Checkpoint: everything a resumed run needs to continue identically.
        let tensors = state_tensors(&model, &stepper.opt, &ema)?;
        let doc = json!({"epoch": state.epoch, "step": state.step, "optimizer_steps": *stepper.opt.steps(), "history": state.history});
        write_dir_atomic(
            &run_dir.join(run_dir::CHECKPOINTS_DIR).join(format!("epoch-{:03}", state.epoch)),
            |tmp| {
                candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
                std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(&doc)?)?;
                Ok(())
            },
        )?;
        run_dir::prune_checkpoints(&run_dir, "epoch-", KEEP_CHECKPOINTS)?;
    }
    bar.finish_and_clear();

    // The final model (EMA weights when enabled) with every parameter, and the results.
    let mut values = with_ema(&model, &ema, || Ok(model.params.values()))?;
    // BatchNorm statistics too, so the run directory loads as an encoder (torchvision names).
    if let Backbone::Resnet(r) = &model.backbone {
        values.extend(r.named_running_stats());
    }
    let cpu: HashMap<String, Tensor> = values
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let model_path = run_dir.join("model.safetensors");
    let tmp = run_dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&cpu, &tmp)?;
    std::fs::rename(&tmp, &model_path)?;
    let last = state.history.last().cloned().unwrap_or(json!(null));
    let results = json!({
        "final": last["eval"],
        "history": state.history,
        "lambda": lambda,
        "encoder": {"kind": config.encoder.kind, "model": config.encoder.model},
        "classes": classes,
        "topk": {"layer": model.hidden.is_some(), "width": model.monitored_width()?, "k": model.k},
        "mixed_precision": mixed,
        "ema": f.ema_decay.is_some(),
    });
    crate::base::io::write_json_atomic(&run_dir.join(RESULTS), &results)?;
    Ok(FinetuneReport { epochs: state.epoch, results })
}
