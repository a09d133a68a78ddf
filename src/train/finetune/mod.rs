//! The finetuner: CE (label smoothing) + λ·MonoLoss on the TopK layer, SGD/AdamW with decay
//! groups, warm-up + cosine/step schedules, clipping, EMA, per-epoch evaluation (top-1, top-5, the
//! TopK layer's MonoScore), a checkpoint after every epoch and `--resume`.

pub mod ema;
pub mod model;

use crate::base::grad_sink::GradSink;
use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::sync_channel;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use ema::Ema;
use model::{cross_entropy, topk_hits, Backbone, FinetuneModel, HeadSpec};

use super::optim::{AdamW, Gradients, Optimizer, Sgd};
use super::run_dir::{self, MetricsLog, RunDir};
use super::schedule::Schedule;
use crate::base::config::{Config, EncoderKind, FinetuneConfig, OptimizerKind};
use crate::base::host::{self, Kernels};
use crate::data::augment::Augment;
use crate::data::batch::{load_pixels, shuffled_items};
use crate::data::images::{class_labels, open_dataset, ImageDataset};
use crate::data::preprocess::{Preprocessor, ResizeTo};
use crate::data::store::{open_split, SimilarityLookup};
use crate::layout::{
    EncoderIdentity, EpochEval, EpochRecord, FinetuneResults, TopkLayer, MODEL_FILE, RESULTS_FILE,
};
use crate::models::params::{DecayGroup, Weights};
use crate::models::Trainable;
use crate::monoscore::{batch_mono_loss, BatchMono, MonoScoreAccumulator, ScorePath};

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

/// What one training step measured, as scalar tensors on the device (read on logged steps).
pub struct StepOutcome {
    pub loss: Tensor,
    pub ce: Tensor,
    /// The batch MonoLoss, when trained on or measured.
    pub mono: Option<BatchMono>,
    pub grad_norm: Tensor,
    /// Top-1 accuracy of the batch (only when measured; reading the logits is a host transfer).
    pub top1: Option<f64>,
}

/// A metrics.jsonl line of a logged step.
#[derive(Serialize)]
struct StepLine {
    step: usize,
    epoch: usize,
    lr: f64,
    loss: f64,
    ce: f64,
    mono_score: f64,
    mono_active: usize,
    batch_top1: f64,
    grad_norm: f64,
}

impl StepLine {
    fn read(step: usize, epoch: usize, lr: f64, out: &StepOutcome) -> Result<Self> {
        let read = host::read_scalar;
        let mono = out.mono.as_ref().context("logged steps measure the MonoScore")?;
        Ok(Self {
            step,
            epoch,
            lr,
            loss: read(&out.loss)?,
            ce: read(&out.ce)?,
            mono_score: read(&mono.mean_score)?,
            mono_active: read(&mono.n_active)? as usize,
            batch_top1: out.top1.unwrap_or(f64::NAN),
            grad_norm: read(&out.grad_norm)?,
        })
    }
}

/// A metrics.jsonl line after each epoch.
#[derive(Serialize)]
struct EpochLine<'a> {
    step: usize,
    epoch: usize,
    eval: &'a EpochEval,
}

/// Scalar state saved with each checkpoint.
#[derive(Serialize, Deserialize)]
struct TrainerState {
    epoch: usize,
    step: usize,
    history: Vec<EpochRecord>,
    /// Updates of the EMA since its last copy (torch's `n_averaged`).
    ema_updates: u64,
}

/// What a step does, from the config.
struct StepSettings {
    lambda: f64,
    eps: f64,
    smoothing: f64,
    clip: Option<f64>,
}

/// The model and everything its training changes.
pub struct Finetuner {
    pub model: FinetuneModel,
    optimizer: Box<dyn Optimizer>,
    /// The weights the optimiser updates: the model's own Vars in f32, or f32 copies when the
    /// model computes in half precision (copied back after every step).
    masters: Vec<Var>,
    ema: Option<Ema>,
    settings: StepSettings,
    /// Epochs and steps done, and the evaluation after each epoch.
    epoch: usize,
    step: usize,
    history: Vec<EpochRecord>,
}

fn optimizer_for(
    f: &FinetuneConfig,
    params: &[&Var],
    decay: Vec<f64>,
    kernels: Kernels,
) -> Result<Box<dyn Optimizer>> {
    Ok(match f.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(params, f.momentum, f.nesterov, decay, kernels)?),
        OptimizerKind::Adamw => Box::new(AdamW::new(params, [0.9, 0.999], 1e-8, decay, kernels)?),
    })
}

impl Finetuner {
    pub fn new(model: FinetuneModel, f: &FinetuneConfig, lambda: f64, eps: f64) -> Result<Self> {
        let half = model.params.dtype != DType::F32;
        // f32 master weights beside half-precision ones, on the same device.
        let masters: Vec<Var> = model
            .params
            .trainable()
            .map(|p| match &p.var {
                Some(v) if !half => Ok(v.clone()),
                _ => Var::from_tensor(&p.get().to_dtype(DType::F32)?),
            })
            .collect::<candle_core::Result<_>>()?;
        let master_refs: Vec<&Var> = masters.iter().collect();
        let decay = model
            .params
            .trainable()
            .map(|p| match p.group {
                DecayGroup::Weights => f.weight_decay,
                DecayGroup::NormAndBias => f.norm_weight_decay,
            })
            .collect();
        let ema = match f.ema_decay {
            Some(decay) => Some(Ema::new(
                decay,
                f.ema_steps,
                f.batch_size,
                f.epochs,
                f.warmup_epochs,
                averaged_values(&model, &masters)?,
            )),
            None => None,
        };
        Ok(Self {
            optimizer: optimizer_for(f, &master_refs, decay, model.kernels)?,
            model,
            masters,
            ema,
            settings: StepSettings { lambda, eps, smoothing: f.label_smoothing, clip: f.grad_clip },
            epoch: 0,
            step: 0,
            history: Vec::new(),
        })
    }

    fn trainable_vars(&self) -> Vec<&Var> {
        self.model.params.trainable().map(|p| p.var.as_ref().expect("trainable")).collect()
    }

    fn trainable_names(&self) -> Vec<&str> {
        self.model.params.trainable().map(|p| p.name.as_str()).collect()
    }

    /// One step on pixels `x` with `labels`; `similarity`: the batch's judge embeddings (None =
    /// the backbone's own detached features). `measure` asks for the batch MonoScore and top-1
    /// even when they are not trained on (for the log).
    pub fn step(
        &mut self,
        x: &Tensor,
        labels: &[u32],
        similarity: Option<&Tensor>,
        lr: f64,
        measure: bool,
    ) -> Result<StepOutcome> {
        let kernels = self.model.kernels;
        kernels.run(|| {
            let s = &self.settings;
            let kernels = self.model.kernels;
            // The host layers leave their weights' gradients here, past candle's store.
            let sink = GradSink::default();
            let out = sink.during(|| self.model.forward(x, true))?;
            let ce = cross_entropy(&out.logits.to_dtype(DType::F32)?, labels, s.smoothing)?;
            let similarity = match similarity {
                Some(t) => t.to_dtype(DType::F32)?,
                None => out.features.detach().to_dtype(DType::F32)?,
            };
            // Without λ the MonoScore is only measured for the log, without a graph.
            let trained = s.lambda > 0.0;
            let mono = if trained || measure {
                let topk = out.topk.to_dtype(DType::F32)?;
                let topk = if trained { topk } else { topk.detach() };
                Some(batch_mono_loss(&topk, &similarity, s.eps, None, kernels)?)
            } else {
                None
            };
            let loss = match &mono {
                Some(m) if trained => (&ce + (&m.loss * s.lambda)?)?,
                _ => ce.clone(),
            };
            let grads = Gradients::from_store(
                &loss.backward()?,
                Some(&sink),
                &self.trainable_vars(),
                kernels,
            )?;
            let masters: Vec<&Var> = self.masters.iter().collect();
            let grad_norm = self.optimizer.clip_and_step(&masters, grads, lr, s.clip)?;
            if self.model.params.dtype != DType::F32 {
                for (m, v) in self.masters.iter().zip(self.trainable_vars()) {
                    v.set(&m.as_tensor().to_dtype(self.model.params.dtype)?)?;
                }
            }
            self.step += 1;
            let top1 = measure
                .then(|| topk_hits(&out.logits, labels))
                .transpose()?
                .map(|(hits, _)| hits as f64 / labels.len() as f64);
            Ok(StepOutcome { loss: loss.detach(), ce: ce.detach(), mono, grad_norm, top1 })
        })
    }

    /// Updates the EMA (when kept and due) after the step with batch index `index` of the epoch.
    pub fn update_ema(&mut self, index: usize) -> Result<()> {
        let Some(ema) = &mut self.ema else { return Ok(()) };
        if ema.due(index) {
            ema.update(self.epoch, averaged_values(&self.model, &self.masters)?)?;
        }
        Ok(())
    }

    /// Runs `f` with the EMA weights and BatchNorm statistics (when kept) in place of the
    /// trained ones.
    fn with_ema<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Some(ema) = &self.ema else { return f() };
        let vars = self.trainable_vars();
        let saved: Vec<Tensor> =
            vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
        let norms = self.model.backbone.batch_norms();
        let saved_stats: Vec<(Tensor, Tensor)> = norms
            .iter()
            .map(|bn| {
                (bn.running_mean.lock().unwrap().clone(), bn.running_var.lock().unwrap().clone())
            })
            .collect();
        for (p, v) in self.model.params.trainable().zip(&vars) {
            v.set(&ema.get(&p.name)?.to_dtype(v.dtype())?)?;
        }
        for bn in &norms {
            *bn.running_mean.lock().unwrap() =
                ema.get(&format!("{}.running_mean", bn.name))?.clone();
            *bn.running_var.lock().unwrap() = ema.get(&format!("{}.running_var", bn.name))?.clone();
        }
        let result = f();
        for (v, value) in vars.iter().zip(saved) {
            v.set(&value)?;
        }
        for (bn, (mean, var)) in norms.iter().zip(saved_stats) {
            *bn.running_mean.lock().unwrap() = mean;
            *bn.running_var.lock().unwrap() = var;
        }
        result
    }

    /// Top-1, top-5 and the TopK layer's MonoScore on the eval split (EMA weights when kept).
    fn evaluate(&self, inputs: &Inputs, batch: usize, device: &Device) -> Result<EpochEval> {
        self.with_ema(|| evaluate(&self.model, inputs, batch, device))
    }

    /// Trainable values, BatchNorm statistics, optimiser state and EMA, by name.
    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut t = self.optimizer.state(&self.trainable_names())?;
        for p in self.model.params.trainable() {
            t.insert(format!("param.{}", p.name), p.get().detach().to_device(&Device::Cpu)?);
        }
        if let Backbone::Resnet(r) = &self.model.backbone {
            for (name, value) in r.named_running_stats() {
                t.insert(format!("bn.{name}"), value.to_device(&Device::Cpu)?);
            }
        }
        if let Some(ema) = &self.ema {
            for (name, v) in &ema.values {
                t.insert(format!("ema.{name}"), v.to_device(&Device::Cpu)?);
            }
        }
        Ok(t)
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        let state = TrainerState {
            epoch: self.epoch,
            step: self.step,
            history: self.history.clone(),
            ema_updates: self.ema.as_ref().map_or(0, |e| e.updates),
        };
        run_dir::write_state(dir, &state, &self.state_tensors()?)
    }

    /// Continues from checkpoint `dir` (written by `save_state` for the same model).
    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let (state, t): (TrainerState, _) = run_dir::read_state(dir)?;
        let source = dir.join(crate::layout::STATE_TENSORS).display().to_string();
        let device = self.model.params.device();
        let get = |k: &str| {
            t.get(k)
                .with_context(|| format!("{source}: missing `{k}` (checkpoint of another model?)"))
        };
        for p in self.model.params.trainable() {
            let v = get(&format!("param.{}", p.name))?;
            ensure!(
                v.dims() == p.get().dims(),
                "{source}: `{}` has another shape than the model's",
                p.name
            );
            p.var
                .as_ref()
                .expect("trainable")
                .set(&v.to_device(&device)?.to_dtype(p.get().dtype())?)?;
        }
        for bn in self.model.backbone.batch_norms() {
            *bn.running_mean.lock().unwrap() =
                get(&format!("bn.{}.running_mean", bn.name))?.to_device(&device)?;
            *bn.running_var.lock().unwrap() =
                get(&format!("bn.{}.running_var", bn.name))?.to_device(&device)?;
        }
        let names: Vec<String> = self.trainable_names().iter().map(|n| n.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.optimizer.load_state(&names, &t, &source)?;
        if let Some(ema) = &mut self.ema {
            for (name, v) in ema.values.iter_mut() {
                *v = get(&format!("ema.{name}"))?.to_device(&device)?;
            }
            ema.updates = state.ema_updates;
        }
        // Half-precision models: the masters start from the restored values.
        if self.model.params.dtype != DType::F32 {
            for (m, p) in self.masters.iter().zip(self.model.params.trainable()) {
                m.set(&p.get().to_dtype(DType::F32)?)?;
            }
        }
        (self.epoch, self.step, self.history) = (state.epoch, state.step, state.history);
        Ok(())
    }

    /// Trains the remaining epochs, logging into `log` and checkpointing into `run` after each.
    fn fit(
        &mut self,
        config: &Config,
        inputs: &Inputs,
        run: &RunDir,
        log: &mut MetricsLog,
        device: &Device,
    ) -> Result<()> {
        let f = &config.finetune;
        let steps_per_epoch = inputs.train.len() / f.batch_size;
        let total = f.epochs * steps_per_epoch;
        // torchvision's recipe steps its schedulers once per epoch: the rate is constant
        // within an epoch, so the schedule counts epochs.
        let schedule = Schedule::new(
            f.lr,
            f.schedule,
            f.warmup_epochs,
            WARMUP_START,
            f.epochs,
            f.step_size,
            f.gamma,
        );
        let bar = crate::base::progress::bar(total as u64, "finetuning");
        bar.set_position(self.step as u64);
        while self.epoch < f.epochs {
            self.train_epoch(config, inputs, &schedule, log, &bar, device)?;
            let eval = self.evaluate(inputs, f.batch_size, device)?;
            log.write(&EpochLine { step: self.step, epoch: self.epoch, eval: &eval })?;
            log.flush()?;
            bar.suspend(|| {
                if !crate::base::progress::is_quiet() {
                    eprintln!(
                        "epoch {}: top-1 {:.4} top-5 {:.4} MonoScore {:?}",
                        self.epoch + 1,
                        eval.top1,
                        eval.top5,
                        eval.monoscore.mean
                    );
                }
            });
            self.epoch += 1;
            self.history.push(EpochRecord { epoch: self.epoch, eval });
            run.save_checkpoint(self.epoch, |dir| self.save_state(dir))?;
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// One epoch: batches prepared on a producer thread (decoding and augmentation in parallel)
    /// while the steps run on this one.
    fn train_epoch(
        &mut self,
        config: &Config,
        inputs: &Inputs,
        schedule: &Schedule,
        log: &mut MetricsLog,
        bar: &indicatif::ProgressBar,
        device: &Device,
    ) -> Result<()> {
        let (f, epoch) = (&config.finetune, self.epoch);
        let order = shuffled_items(inputs.train.len(), config.run.seed, epoch);
        let augment = Augment::new(&inputs.eval_pre, inputs.train_size);
        let aug = f.augment.then_some((&augment, config.run.seed, epoch));
        let train: &dyn ImageDataset = inputs.train.as_ref();
        let (labels, pre, bs) = (&inputs.train_labels, &inputs.eval_pre, f.batch_size);
        // Without augmentation the training images take the evaluation transform.
        let size = if f.augment { inputs.train_size } else { inputs.size };
        let (h, w) = (size.0 as usize, size.1 as usize);
        let (tx, rx) = sync_channel::<Result<Batch>>(2);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || {
                for chunk in order.chunks_exact(bs) {
                    if tx.send(prepare(train, labels, chunk, pre, aug)).is_err() {
                        break; // the steps stopped on an error
                    }
                }
            });
            let mut sim = Vec::new();
            for (index, batch) in rx.into_iter().enumerate() {
                let batch = batch?;
                let x = Tensor::from_vec(batch.pixels, (bs, 3, h, w), device)?
                    .to_dtype(self.model.params.dtype)?;
                let similarity = match &inputs.train_judge {
                    Some(j) => {
                        j.read(&batch.items, &mut sim)?;
                        Some(Tensor::from_slice(&sim, (bs, j.dim()), device)?)
                    }
                    None => None,
                };
                let done = self.step + 1;
                let log_now = done.is_multiple_of(config.run.log_every);
                let lr = schedule.lr(epoch);
                let out = self
                    .step(&x, &batch.labels, similarity.as_ref(), lr, log_now)
                    .with_context(|| format!("finetuning step {done}"))?;
                self.update_ema(index)?;
                bar.inc(1);
                if log_now {
                    // Scalars come to the host on logged steps only.
                    let line = StepLine::read(done, epoch, lr, &out)?;
                    ensure!(
                        line.loss.is_finite(),
                        "finetuning diverged: the loss at step {done} is {}",
                        line.loss
                    );
                    bar.set_prefix(format!("loss {:.3} mono {:.3}", line.loss, line.mono_score));
                    log.write(&line)?;
                }
            }
            Ok(())
        })
    }

    /// Every parameter of the final model (EMA weights when kept) and, for ResNets, the
    /// BatchNorm statistics under torchvision names, so the file loads as an encoder.
    fn final_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut values = self.with_ema(|| Ok(self.model.params.values()))?;
        if let Backbone::Resnet(r) = &self.model.backbone {
            values.extend(r.named_running_stats());
        }
        values.into_iter().map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?))).collect()
    }
}

/// What the EMA averages: the f32 master weights under the parameters' names and, for ResNets,
/// the BatchNorm running statistics under their torchvision names.
fn averaged_values(model: &FinetuneModel, masters: &[Var]) -> Result<HashMap<String, Tensor>> {
    let mut values: HashMap<String, Tensor> = model
        .params
        .trainable()
        .zip(masters)
        .map(|(p, m)| (p.name.clone(), m.as_tensor().detach()))
        .collect();
    if let Backbone::Resnet(r) = &model.backbone {
        values.extend(r.named_running_stats());
    }
    Ok(values)
}

/// The factor of lr at the first warm-up step (torchvision's recipes: 0.01).
const WARMUP_START: f64 = 0.01;

/// What a finetuning run depends on (docs/reliability.md): the encoder settings and files, the
/// data set's splits, the finetuning settings (a similarity store by its fingerprint), λ, eps
/// and the seed. Recorded when the run starts; a resume with other values is refused.
pub fn inputs_identity(config: &Config) -> Result<serde_json::Value> {
    let mut encoder = serde_json::to_value(&config.encoder)?;
    encoder["batch_size"] = serde_json::json!(null); // the extraction batch size
    encoder["model"] = crate::extract::canonical_model(&config.encoder.model).into();
    encoder["output"] = serde_json::json!(config.encoder.output()); // the default, resolved
    let files = crate::encoders::hub::resolve(&config.encoder.model, &config.encoder.revision)?;
    let mut data = serde_json::to_value(&config.data)?;
    data["root"] = serde_json::json!(null); // in data_files, resolved
    let root = config.data.root.as_ref().context("data.root is not set: where are the images?")?;
    let splits = [config.data.train_split.as_str(), config.data.eval_split.as_str()];
    let mut finetune = serde_json::to_value(&config.finetune)?;
    if let Some(dir) = &config.finetune.similarity_store {
        finetune["similarity_store"] = crate::data::store::feature_set_identity(dir, &splits)
            .context("finetune.similarity_store")?;
    }
    Ok(serde_json::json!({
        "stage": "finetune",
        "encoder": encoder,
        "model_files": crate::encoders::fingerprint(&files)?,
        "data": data,
        "data_files": crate::data::images::data_identity(config.data.kind, root, &splits)?,
        "finetune": finetune,
        "lambda": config.finetune_lambda()?,
        "eps": config.mono.eps,
        "seed": config.run.seed,
        "log_every": config.run.log_every,
    }))
}

/// Everything the run reads, opened and checked before anything is written.
struct Inputs {
    train: Box<dyn ImageDataset>,
    eval: Box<dyn ImageDataset>,
    train_labels: Vec<u32>,
    eval_labels: Vec<u32>,
    /// Similarity embeddings of the training and evaluation images (finetune.similarity_store).
    train_judge: Option<SimilarityLookup>,
    eval_judge: Option<SimilarityLookup>,
    eval_pre: Preprocessor,
    /// (height, width) of evaluation and of training images.
    size: (u32, u32),
    train_size: (u32, u32),
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
    let mut eval_pre = crate::encoders::preprocessor_for(config.encoder.kind, &files)?;
    if let Some(edge) = config.finetune.eval_resize {
        ensure!(
            matches!(eval_pre.resize, Some(ResizeTo::ShortestEdge(_))) && eval_pre.crop.is_some(),
            "finetune.eval_resize: the model's preprocessing ({}) does not resize the shortest \
             edge and centre-crop",
            files.source
        );
        eval_pre.resize = Some(ResizeTo::ShortestEdge(edge));
    }
    let size =
        eval_pre.output_size().context("the encoder's preprocessing must give one image size")?;
    let train_size = config.finetune.train_size.map_or(size, |s| (s, s));
    ensure!(
        train_size == size || config.encoder.kind == EncoderKind::Resnet50,
        "finetune.train_size = {}: a {:?} tower takes {}×{} images (only ResNets take other sizes)",
        train_size.0,
        config.encoder.kind,
        size.0,
        size.1
    );
    let weights = Weights::load(&files.weights, device)?;
    let model_config = files.config_json()?;
    let judge = |split: &str, dataset: &dyn ImageDataset| -> Result<Option<SimilarityLookup>> {
        let Some(dir) = &config.finetune.similarity_store else { return Ok(None) };
        let store = open_split(dir, split).context("finetune.similarity_store")?;
        Ok(Some(SimilarityLookup::new(store, dataset)?))
    };
    let train_judge = judge(&config.data.train_split, train.as_ref())?;
    let eval_judge = judge(&config.data.eval_split, eval.as_ref())?;
    Ok(Inputs {
        train,
        eval,
        train_labels,
        eval_labels,
        train_judge,
        eval_judge,
        eval_pre,
        size,
        train_size,
        weights,
        model_config,
    })
}

/// Top-1, top-5 and the TopK layer's MonoScore on the eval split.
fn evaluate(
    model: &FinetuneModel,
    inputs: &Inputs,
    batch_size: usize,
    device: &Device,
) -> Result<EpochEval> {
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
        let similarity = match &inputs.eval_judge {
            Some(j) => {
                j.read(&items, &mut sim)?;
                sim.clone()
            }
            None => host_vec(&out.features)?,
        };
        let acts = host_vec(&out.topk)?;
        let acc = acc.get_or_insert_with(|| {
            MonoScoreAccumulator::new(similarity.len() / items.len(), width)
        });
        acc.add(&similarity, &acts, ScorePath::Auto)?;
    }
    let monoscore = acc.context("the eval split is empty")?.finish().summary();
    Ok(EpochEval {
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
        monoscore,
        n_images: n,
    })
}

fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Finetunes as `config` says into `run_dir` (fresh, or continuing its newest checkpoint when
/// `resume`): model.safetensors and results.json at the end.
pub fn finetune(config: &Config, run_dir: &Path, resume: bool) -> Result<FinetuneResults> {
    let f = &config.finetune;
    let lambda = config.finetune_lambda()?;
    let device = crate::base::device::open_device(&config.run.device)?;
    let inputs = open_inputs(config, &device)?;
    let classes = inputs.train.class_names().len();
    ensure!(
        inputs.train.len() / f.batch_size > 0,
        "finetune.batch_size = {} exceeds the {} training images",
        f.batch_size,
        inputs.train.len()
    );
    // Mixed precision: bf16 compute with f32 master weights on GPUs; the CPU has no bf16 matmul.
    let mixed = f.mixed_precision && !device.is_cpu();
    let dtype = if mixed { DType::BF16 } else { DType::F32 };
    crate::base::device::check_dtype(&device, dtype, "finetune.mixed_precision = true")?;
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
    let model = model.with_kernels(Kernels::choose(config.run.ops, &device));
    let run = RunDir::new(run_dir, "epoch-", 3);
    let identity = inputs_identity(config)?;
    let resuming = run.start("finetuning", &[RESULTS_FILE], resume, &identity)?;
    let mut finetuner = Finetuner::new(model, f, lambda, config.mono.eps)?;
    if resuming {
        // A load that fails part-way is overwritten whole by the next (older) one.
        run.load_newest(|dir| finetuner.load_state(dir))?;
    }
    let mut log = run.begin(config, &identity, finetuner.step)?;
    finetuner.fit(config, &inputs, &run, &mut log, &device)?;

    crate::base::io::write_safetensors_atomic(&run.join(MODEL_FILE), &finetuner.final_tensors()?)?;
    let m = &finetuner.model;
    let results = FinetuneResults {
        final_eval: finetuner.history.last().context("no epoch was trained")?.eval.clone(),
        history: finetuner.history.clone(),
        lambda,
        encoder: EncoderIdentity { kind: config.encoder.kind, model: config.encoder.model.clone() },
        classes,
        topk: TopkLayer { layer: m.hidden.is_some(), width: m.monitored_width()?, k: m.k },
        mixed_precision: mixed,
        ema: f.ema_decay.is_some(),
    };
    crate::layout::write_json(&run.join(RESULTS_FILE), &results)?;
    Ok(results)
}
