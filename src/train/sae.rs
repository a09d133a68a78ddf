//! The SAE trainer: an SAE on a feature store with reconstruction + λ·MonoLoss.
//!
//! Each step: a batch in the epoch's seeded order → forward → losses → backward → gradients to
//! the host → decoder gradients made tangent to the unit sphere → clipping → Adam → decoder rows
//! renormalised. Dead-latent counters advance on training steps only. Checkpoints hold every bit
//! of state, so a resumed run equals an uninterrupted one. Evaluation is the caller's (`eval`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::full_mono::{self, FullMonoGradient};
use super::optim::{self, Adam, Gradients, Optimizer, UnitRows};
use super::run_dir::{self, MetricsLog, RunDir};
use super::schedule::Schedule;
use crate::base::config::Config;
use crate::base::cpu::with_cpu_slice;
use crate::base::grad_sink::GradSink;
use crate::base::host::{self, Kernels};
use crate::data::store::FeatureStore;
use crate::layout::FINAL_SAE_DIR;
use crate::monoscore::{batch_mono_loss, BatchMono};
use crate::sae::{self, checkpoint, ops, ForwardPass, Sae, SaeSpec};

/// The stores a training run reads.
pub struct SaeTrainInputs<'a> {
    pub train: &'a FeatureStore,
    /// Judge embeddings of the same rows; None = the SAE input judges similarity.
    pub train_similarity: Option<&'a FeatureStore>,
}

/// What a training step does, resolved from the config once.
#[derive(Clone, Debug)]
pub struct StepSettings {
    /// λ of the MonoLoss (batch or full-dataset form).
    pub lambda: f64,
    /// 1: batch MonoLoss every step; P > 1: the full-dataset MonoLoss every P steps instead.
    pub period: usize,
    pub eps: f64,
    pub clip: Option<f64>,
    pub dead_after: u64,
    /// Steps between dead-latent restarts (0 = never).
    pub reinit_dead_every: usize,
    pub seed: u64,
}

impl StepSettings {
    pub fn from_config(config: &Config) -> Result<Self> {
        Ok(Self {
            lambda: config.lambda()?,
            period: config.mono.period,
            eps: config.mono.eps,
            clip: config.train.grad_clip(config.sae.kind()),
            dead_after: config.sae.dead_after(),
            reinit_dead_every: config.sae.reinit_dead_every(),
            seed: config.run.seed,
        })
    }

    /// λ of the batch MonoLoss (0 when the full-dataset form is used instead).
    fn batch_lambda(&self) -> f64 {
        if self.period == 1 {
            self.lambda
        } else {
            0.0
        }
    }
}

/// What one step measured, read to the host (on logged steps).
#[derive(Clone, Debug, Serialize)]
pub struct StepOutcome {
    pub loss: f64,
    pub reconstruction: f64,
    /// Loss terms beyond reconstruction (auxk, l0, l1), already weighted.
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

/// What one step measured, as scalar tensors on the device: nothing is read to the host until
/// `read` (logged steps), so a GPU step does not wait for the host.
pub struct StepScalars {
    loss: Tensor,
    reconstruction: Tensor,
    terms: Vec<(&'static str, Tensor)>,
    mono: Option<BatchMono>,
    /// Whether the MonoLoss was trained on (else only measured).
    mono_trained: bool,
    l0: Tensor,
    dead: Tensor,
    grad_norm: Tensor,
    full_mono_score: Option<Tensor>,
}

impl StepScalars {
    pub fn read(&self) -> Result<StepOutcome> {
        let read = |t: &Tensor| host::read_scalar(t);
        let mut terms = HashMap::new();
        for (name, t) in &self.terms {
            terms.insert(name.to_string(), read(t)?);
        }
        let mono = self.mono.as_ref();
        Ok(StepOutcome {
            loss: read(&self.loss)?,
            reconstruction: read(&self.reconstruction)?,
            terms,
            mono_loss: mono.filter(|_| self.mono_trained).map(|m| read(&m.loss)).transpose()?,
            mono_score: mono.map(|m| read(&m.mean_score)).transpose()?,
            mono_active: mono.map(|m| read(&m.n_active).map(|n| n as usize)).transpose()?,
            l0: read(&self.l0)?,
            dead: read(&self.dead)? as usize,
            grad_norm: read(&self.grad_norm)?,
            full_mono_score: self.full_mono_score.as_ref().map(read).transpose()?,
        })
    }
}

/// A metrics.jsonl line.
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub outcome: StepOutcome,
}

/// Scalar state saved with each checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct TrainerState {
    step: usize,
    lambda: f64,
    batch_size: usize,
    seed: u64,
    /// Architecture state outside the parameters (BatchTopK's threshold average).
    extra_state: Vec<f64>,
}

const SINCE_FIRED: &str = "samples_since_fired";

/// The state one training step changes, and the step itself.
pub struct SaeTrainer {
    pub sae: Box<dyn Sae>,
    optimizer: Adam,
    /// (M,) training samples since each latent last fired, capped at `dead_after` (f32 on the
    /// SAE's device: exact, since `sae.dead_after` ≤ 2^24).
    since_fired: Tensor,
    /// Steps done.
    step: usize,
    settings: StepSettings,
    kernels: Kernels,
    /// Training rows (B, D) that dead latents restart from (drawn once per run), when they do.
    pub restart_rows: Option<Tensor>,
}

/// The losses of one forward pass: the total (a graph), and the measurements.
struct Losses {
    total: Tensor,
    reconstruction: Tensor,
    terms: Vec<(&'static str, Tensor)>,
    mono: Option<BatchMono>,
}

impl SaeTrainer {
    /// A fresh SAE of `spec` and its optimiser, as `config` says.
    pub fn new(config: &Config, spec: &SaeSpec, device: &Device) -> Result<Self> {
        let kernels = Kernels::choose(config.run.ops, device);
        let sae = sae::build(spec, config.run.seed, device, kernels)?;
        let named = sae.params().named();
        let vars: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
        let optimizer = Adam::new(&vars, config.train.adam_betas, config.train.adam_eps, kernels)?;
        let mut trainer = Self {
            optimizer,
            since_fired: Tensor::zeros(spec.n_latents, DType::F32, device)?,
            step: 0,
            settings: StepSettings::from_config(config)?,
            kernels,
            restart_rows: None,
            sae,
        };
        if let Some(dir) = config.sae.init() {
            trainer
                .start_from(dir, device)
                .with_context(|| format!("sae.init = {}", dir.display()))?;
        }
        Ok(trainer)
    }

    /// Replaces the fresh weights with those of the SAE in `dir` (SAELens layout), which must
    /// be the same architecture on the same inputs: kind, d_in, n_latents, input normalisation
    /// and centring equal, a tied decoder equal to its encoder, no encoder bias where the
    /// config has none. Training settings (k, losses) stay the config's.
    fn start_from(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let init = checkpoint::load(dir, device, self.kernels)?;
        let (want, have) = (self.sae.spec(), init.spec());
        ensure!(
            have.kind == want.kind,
            "it holds a {:?} SAE; the config trains sae.kind = {:?}",
            have.kind,
            want.kind
        );
        ensure!(
            (have.d_in, have.n_latents) == (want.d_in, want.n_latents),
            "it has d_in = {} and {} latents; the features have {} columns and sae.n_latents = {}",
            have.d_in,
            have.n_latents,
            want.d_in,
            want.n_latents
        );
        ensure!(
            have.normalize_input == want.normalize_input,
            "its inputs are {}standardised; set sae.normalize_input = {}",
            if have.normalize_input { "" } else { "not " },
            have.normalize_input
        );
        ensure!(
            have.centers_input() == want.centers_input(),
            "it {} b_dec from its input (apply_b_dec_to_input), which sae.kind = {:?} does not",
            if have.centers_input() { "subtracts" } else { "does not subtract" },
            want.kind
        );
        let (from, to) = (init.params(), self.sae.params());
        let max_abs = |t: &Tensor| -> Result<f64> { host::read_scalar(&t.abs()?.max_all()?) };
        if want.tied_decoder {
            let gap = max_abs(&(from.w_dec.as_tensor() - from.w_enc.as_tensor())?)?;
            ensure!(
                gap <= 1e-6,
                "its decoder is not its encoder (they differ by up to {gap:.2e}); set sae.tied_decoder = false"
            );
        }
        if !want.encoder_bias {
            ensure!(
                max_abs(from.b_enc.as_tensor())? == 0.0,
                "it has an encoder bias; set sae.encoder_bias = true"
            );
        }
        to.w_enc.set(from.w_enc.as_tensor())?;
        to.w_dec.set(from.w_dec.as_tensor())?;
        to.b_enc.set(from.b_enc.as_tensor())?;
        to.b_dec.set(from.b_dec.as_tensor())?;
        if let (Some(a), Some(b)) = (&from.log_threshold, &to.log_threshold) {
            b.set(a.as_tensor())?;
        }
        // BatchTopK: its inference threshold carries over as the running average's start.
        self.sae.restore_extra_state(&init.extra_state()?)?;
        Ok(())
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// `since_fired` ≥ this counts as dead.
    fn dead_after(&self) -> Result<Tensor> {
        Ok(self.since_fired.ones_like()?.affine(0.0, self.settings.dead_after as f64)?)
    }

    /// Reconstruction + extra terms + λ·batch MonoLoss. With λ = 0 the batch MonoScore is
    /// measured (no graph) only when `measure_mono`.
    fn losses(
        &self,
        pass: &ForwardPass,
        similarity: &Tensor,
        dead: &Tensor,
        measure_mono: bool,
    ) -> Result<Losses> {
        let reconstruction = self.sae.reconstruction_loss(pass)?;
        let mut total = reconstruction.clone();
        let terms = self.sae.extra_losses(pass, dead)?;
        for (_, term) in &terms {
            total = (total + term)?;
        }
        let terms = terms.into_iter().map(|(n, t)| (n, t.detach())).collect();
        let mono = match &pass.mono {
            Some(mono) => {
                total = (total + (&mono.loss * self.settings.batch_lambda())?)?;
                Some(BatchMono {
                    loss: mono.loss.detach(),
                    mean_score: mono.mean_score.clone(),
                    n_active: mono.n_active.clone(),
                })
            }
            None if measure_mono => {
                let latents = pass.latents()?.detach();
                Some(batch_mono_loss(&latents, similarity, self.settings.eps, None, self.kernels)?)
            }
            None => None,
        };
        Ok(Losses { total, reconstruction: reconstruction.detach(), terms, mono })
    }

    /// One optimisation step on a batch `input` (B, D) with its similarity embeddings (B, D');
    /// `full` adds λ times the full-dataset MonoLoss gradient; `measure_mono` asks for the
    /// batch MonoScore even when it is not trained on (for logging). Nothing is read to the host.
    pub fn step(
        &mut self,
        input: &Tensor,
        similarity: &Tensor,
        lr: f64,
        full: Option<FullMonoGradient>,
        measure_mono: bool,
    ) -> Result<StepScalars> {
        let kernels = self.kernels;
        kernels.run(|| {
            let (b, d) = input.dims2()?;
            let cap = self.dead_after()?;
            let dead = self.since_fired.ge(&cap)?;
            let batch_lambda = self.settings.batch_lambda();
            let mono = (batch_lambda > 0.0).then_some(ops::MonoTerm {
                similarity,
                lambda: batch_lambda,
                eps: self.settings.eps,
            });
            // The weight gradients skip candle's store (a zero-filled buffer and an addition each),
            // AuxK's decoder included.
            let sink = GradSink::default();
            let (pass, losses) = sink.during(|| -> Result<_> {
                let pass = sae::forward_with_mono(self.sae.as_ref(), input, true, mono)?;
                let losses = self.losses(&pass, similarity, &dead, measure_mono)?;
                Ok((pass, losses))
            })?;

            let named = self.sae.params().named();
            let vars: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
            // The store (and the graph it holds) is dropped before the optimiser runs.
            let mut grads =
                Gradients::from_store(&losses.total.backward()?, Some(&sink), &vars, self.kernels)?;
            // The weights change from here on: the pass may no longer build its pre-activations.
            pass.pre.seal();
            let full_mono_score = match full {
                Some(full) => {
                    grads.add_scaled(&full.grads, self.settings.lambda)?;
                    Some(full.mean_score)
                }
                None => None,
            };
            let index =
                |name: &str| named.iter().position(|(n, _)| *n == name).expect("SAE tensor");
            let (enc, dec) = (index("W_enc"), index("W_dec"));
            let (tied, encoder_bias) = (self.sae.spec().tied_decoder, self.sae.spec().encoder_bias);
            if !encoder_bias {
                grads.zero(index("b_enc"))?;
            }
            if tied {
                grads.fold_into(dec, enc)?;
            }
            // As the reference trainers: clip the raw gradients, then constrain the decoder.
            let p = self.sae.params();
            if tied {
                // The reference TopK: rows renormalised after the backward, before the step, and
                // no gradient projection.
                optim::normalize_rows(&p.w_enc, d, self.kernels)?;
            }
            let unit_rows = (!tied).then_some(UnitRows { index: dec, d });
            let grad_norm =
                self.optimizer.clipped_step(&vars, grads, lr, self.settings.clip, unit_rows)?;
            if tied {
                p.w_dec.set(p.w_enc.as_tensor())?;
            }
            self.sae.observe_step(&pass)?;

            // Dead-latent counters: reset where a latent fired, else + B (capped).
            let fired = fired_counts(&pass, self.kernels)?;
            let grown = (&self.since_fired + b as f64)?.minimum(&cap)?;
            self.since_fired =
                fired.gt(&fired.zeros_like()?)?.where_cond(&fired.zeros_like()?, &grown)?;
            let every = self.settings.reinit_dead_every;
            if every > 0 && self.step > 0 && self.step.is_multiple_of(every) {
                self.restart_dead()?;
            }
            self.step += 1;
            Ok(StepScalars {
                loss: losses.total.detach(),
                reconstruction: losses.reconstruction,
                terms: losses.terms,
                mono: losses.mono,
                mono_trained: batch_lambda > 0.0,
                l0: (fired.sum_all()? / b as f64)?,
                dead: dead.to_dtype(DType::F32)?.sum_all()?,
                grad_norm,
                full_mono_score,
            })
        })
    }

    /// The reference TopK's dead-latent restart: each dead latent's encoder (and decoder) row
    /// becomes 0.1 × a unit-norm training row of `restart_rows` (distinct rows while there are
    /// enough), its encoder bias 0 and its counter 0; the optimiser state is kept. Row choice
    /// is seeded by (seed, step), so a resumed run restarts the same way.
    fn restart_dead(&mut self) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let Some(rows) = &self.restart_rows else { return Ok(()) };
        let dead = self.since_fired.ge(&self.dead_after()?)?;
        let latents: Vec<usize> = host::read_f32(&dead.to_dtype(DType::F32)?)?
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| (v != 0.0).then_some(i))
            .collect();
        if latents.is_empty() {
            return Ok(());
        }
        let samples = host::read_f32(rows)?;
        let (b, d) = rows.dims2()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.settings.seed ^ (self.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDEAD,
        );
        let picks: Vec<usize> = if latents.len() <= b {
            rand::seq::index::sample(&mut rng, b, latents.len()).into_vec()
        } else {
            (0..latents.len()).map(|_| rng.random_range(0..b)).collect()
        };
        let p = self.sae.params();
        let (mut w_enc, mut w_dec, mut b_enc) =
            (optim::host_data(&p.w_enc)?, optim::host_data(&p.w_dec)?, optim::host_data(&p.b_enc)?);
        for (&latent, &row) in latents.iter().zip(&picks) {
            let sample = &samples[row * d..(row + 1) * d];
            let norm = sample.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            for t in 0..d {
                w_enc[latent * d + t] = 0.1 * sample[t] / norm;
                w_dec[latent * d + t] = 0.1 * sample[t] / norm;
            }
            b_enc[latent] = 0.0;
        }
        let device = p.w_enc.device().clone();
        let m = b_enc.len();
        p.w_enc.set(&Tensor::from_vec(w_enc, (m, d), &device)?)?;
        p.w_dec.set(&Tensor::from_vec(w_dec, (m, d), &device)?)?;
        p.b_enc.set(&Tensor::from_vec(b_enc, m, &device)?)?;
        self.since_fired = dead.where_cond(&self.since_fired.zeros_like()?, &self.since_fired)?;
        Ok(())
    }

    /// Writes the SAE (SAELens files), optimiser, counters and scalars into checkpoint `dir`.
    fn save_state(&self, dir: &Path, config: &Config, source: &serde_json::Value) -> Result<()> {
        let names: Vec<&str> = self.sae.params().named().iter().map(|(n, _)| *n).collect();
        let mut tensors = self.optimizer.state(&names)?;
        let fired = self.since_fired.to_dtype(DType::I64)?.to_device(&Device::Cpu)?;
        tensors.insert(SINCE_FIRED.into(), fired);
        let state = TrainerState {
            step: self.step,
            lambda: self.settings.lambda,
            batch_size: config.train.batch_size,
            seed: config.run.seed,
            extra_state: self.sae.extra_state()?,
        };
        checkpoint::write_into(
            dir,
            &checkpoint::weight_tensors(self.sae.as_ref())?,
            &checkpoint::cfg_json(self.sae.as_ref(), source),
        )?;
        run_dir::write_state(dir, &state, &tensors)
    }

    /// A trainer continuing from checkpoint `dir` (written by `save_state` for `spec`).
    fn load_state(dir: &Path, config: &Config, spec: &SaeSpec, device: &Device) -> Result<Self> {
        let saved_spec = checkpoint::read_spec(dir)?;
        ensure!(
            saved_spec == *spec,
            "checkpoint {} does not match the config: it has d_in = {}, n_latents = {}, kind = {:?}, \
             the config gives d_in = {}, n_latents = {}, kind = {:?}",
            dir.display(),
            saved_spec.d_in,
            saved_spec.n_latents,
            saved_spec.kind,
            spec.d_in,
            spec.n_latents,
            spec.kind
        );
        let (state, tensors): (TrainerState, _) = run_dir::read_state(dir)?;
        ensure!(
            state.batch_size == config.train.batch_size && state.seed == config.run.seed,
            "checkpoint {} was trained with batch_size {} and seed {}; the config says {} and {}: \
             resuming would not reproduce the run",
            dir.display(),
            state.batch_size,
            state.seed,
            config.train.batch_size,
            config.run.seed
        );
        let mut trainer = Self::new(config, spec, device)?;
        trainer.sae = checkpoint::load(dir, device, trainer.kernels)?;
        trainer.sae.restore_extra_state(&state.extra_state)?;
        let names: Vec<&str> = trainer.sae.params().named().iter().map(|(n, _)| *n).collect();
        let source = dir.join(crate::layout::STATE_TENSORS).display().to_string();
        trainer.optimizer.load_state(&names, &tensors, &source)?;
        let fired = tensors
            .get(SINCE_FIRED)
            .with_context(|| format!("{source}: missing `{SINCE_FIRED}`"))?;
        ensure!(
            fired.dims() == [spec.n_latents],
            "{source}: dead-latent counters have the wrong size"
        );
        let cap = trainer.dead_after()?;
        trainer.since_fired = fired.to_dtype(DType::F32)?.to_device(device)?.minimum(&cap)?;
        trainer.step = state.step;
        Ok(trainer)
    }

    /// Trains to the end of `config`'s schedule, logging and checkpointing into `run`.
    pub fn fit(
        &mut self,
        config: &Config,
        inputs: &SaeTrainInputs,
        run: &RunDir,
        log: &mut MetricsLog,
        source: &serde_json::Value,
        device: &Device,
    ) -> Result<()> {
        let train = inputs.train;
        let (b, d) = (config.train.batch_size, train.dim());
        let steps_per_epoch = train.len() / b;
        let total = total_steps(config, train.len());
        let t = &config.train;
        // The schedule spans the epochs; max_steps only stops early (a stopped run can be
        // continued to the end with --resume).
        let scheduled = steps_per_epoch * t.epochs;
        let schedule = Schedule::new(
            t.lr,
            t.schedule,
            t.warmup_steps,
            WARMUP_START,
            scheduled,
            usize::MAX,
            1.0,
        );
        let bar = crate::base::progress::bar(total as u64, "training");
        bar.set_position(self.step as u64);
        let (mut x, mut sim) = (Vec::new(), Vec::new());
        if self.settings.reinit_dead_every > 0 {
            // One batch of training rows drawn once, as the reference keeps one.
            let rows = train.epoch_order(config.run.seed ^ 0x005E_ED0F_DEAD, 0).rows(0..b);
            train.read_rows(&rows, &mut x)?;
            self.restart_rows = Some(Tensor::from_slice(&x, (b, d), device)?);
        }
        let prefetch = larger_than_memory(train, inputs.train_similarity);
        let batch_rows = |step: usize| {
            let (epoch, at) = (step / steps_per_epoch, step % steps_per_epoch);
            (epoch, train.epoch_order(config.run.seed, epoch as u64).rows(at * b..(at + 1) * b))
        };
        while self.step < total {
            let (epoch, rows) = batch_rows(self.step);
            let rows = &rows;
            train.read_rows(rows, &mut x)?;
            if prefetch && self.step + 1 < total {
                // The next batch's rows come from the disk while this step computes.
                let (_, next) = batch_rows(self.step + 1);
                train.prefetch_rows(&next);
                inputs.train_similarity.inspect(|judge| judge.prefetch_rows(&next));
            }
            let input = Tensor::from_slice(&x, (b, d), device)?;
            let similarity = match inputs.train_similarity {
                Some(judge) => {
                    judge.read_rows(rows, &mut sim)?;
                    Tensor::from_slice(&sim, (b, judge.dim()), device)?
                }
                None => input.clone(),
            };
            let step = self.step;
            let full = self
                .full_mono_due()
                .then(|| {
                    full_mono::full_mono_gradient(
                        self.sae.as_ref(),
                        train,
                        inputs.train_similarity,
                        &train.epoch_order(config.run.seed, epoch as u64),
                        b,
                        device,
                    )
                })
                .transpose()?;
            let done = step + 1;
            let log_now = done.is_multiple_of(config.run.log_every) || done == total;
            let lr = schedule.lr(step);
            let scalars = self
                .step(&input, &similarity, lr, full, log_now)
                .with_context(|| format!("training step {done}"))?;
            // Scalars come to the host on logged steps only (the last step is always logged).
            if log_now {
                let outcome = scalars.read()?;
                ensure!(
                    outcome.loss.is_finite(),
                    "training diverged: the loss at step {done} is {}",
                    outcome.loss
                );
                bar.set_prefix(format!(
                    "loss {:.4} L0 {:.1} dead {} mono {}",
                    outcome.loss,
                    outcome.l0,
                    outcome.dead,
                    outcome.mono_score.map_or("-".into(), |s| format!("{s:.3}"))
                ));
                log.write(&StepMetrics { step: done, epoch, lr, outcome })?;
            }
            bar.inc(1);
            self.checkpoint_if_due(config, run, log, total, source)?;
        }
        bar.finish_and_clear();
        log.flush()
    }

    /// Whether this step takes the full-dataset MonoLoss.
    fn full_mono_due(&self) -> bool {
        let s = &self.settings;
        s.lambda > 0.0 && s.period > 1 && (self.step + 1).is_multiple_of(s.period)
    }

    /// A checkpoint every `train.checkpoint_every` steps and at the last step.
    fn checkpoint_if_due(
        &self,
        config: &Config,
        run: &RunDir,
        log: &mut MetricsLog,
        total: usize,
        source: &serde_json::Value,
    ) -> Result<()> {
        let every = config.train.checkpoint_every;
        if (every > 0 && self.step.is_multiple_of(every)) || self.step == total {
            log.flush()?;
            run.save_checkpoint(self.step, |dir| self.save_state(dir, config, source))?;
        }
        Ok(())
    }
}

/// Whether the training stores exceed the memory available (then every batch is prefetched
/// from the disk one step ahead), said once on stderr.
fn larger_than_memory(train: &FeatureStore, similarity: Option<&FeatureStore>) -> bool {
    let stores = std::iter::once(train).chain(similarity);
    let bytes: u64 = stores.clone().map(|s| s.feature_bytes()).sum();
    let larger = crate::base::memory::available_bytes().is_some_and(|free| bytes > free);
    if larger {
        crate::base::progress::note(&format!(
            "{}: {:.1} GiB of features exceed the {:.1} GiB of available memory; rows are read \
             from the disk at random (each batch requested one step ahead), so the disk's \
             random-read rate bounds training speed",
            train.dir().display(),
            bytes as f64 / (1u64 << 30) as f64,
            crate::base::memory::available_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64,
        ));
    }
    larger
}

/// The factor of lr at the first warm-up step.
const WARMUP_START: f64 = 0.01;

/// Steps of a run over `rows` training rows: whole batches per epoch, capped by max_steps.
pub fn total_steps(config: &Config, rows: usize) -> usize {
    let total = rows / config.train.batch_size * config.train.epochs;
    config.train.max_steps.map_or(total, |cap| total.min(cap))
}

/// (M,) f32: how many rows of the pass each latent fires on: from the latents' CSR when the
/// pass holds one (a host selection's), else by scanning the dense latents.
fn fired_counts(pass: &ForwardPass, kernels: Kernels) -> Result<Tensor> {
    let Some(csr) = &pass.latents_csr else { return column_counts(pass.latents()?, kernels) };
    // Not `pass.latents()`: that would build the dense latents a host selection skips.
    let m = pass.activation.latents.dims().1;
    let counts: Vec<f32> = csr.column_counts(m).into_iter().map(|c| c as f32).collect();
    Ok(Tensor::from_vec(counts, m, pass.pre.device())?)
}

/// (M,) f32: how many rows of `latents` each latent fires on (non-zero entries per column).
fn column_counts(latents: &Tensor, kernels: Kernels) -> Result<Tensor> {
    let latents = latents.detach();
    if !kernels.for_tensor(&latents).is_host() {
        return Ok(latents.ne(&latents.zeros_like()?)?.to_dtype(DType::F32)?.sum(0)?);
    }
    let (_, m) = latents.dims2()?;
    // Blocks of rows in parallel; whole numbers below 2^24 add exactly in any order.
    let counts = with_cpu_slice(&latents, |host| {
        host.par_chunks(m.max(1) * 256)
            .map(|rows| {
                let mut counts = vec![0f32; m];
                crate::base::simd::vectorized!(for row in rows.chunks_exact(m) {
                    for (c, &v) in counts.iter_mut().zip(row) {
                        *c += (v != 0.0) as u8 as f32;
                    }
                });
                counts
            })
            .reduce(
                || vec![0f32; m],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    })?;
    Ok(Tensor::from_vec(counts, m, &Device::Cpu)?)
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
    if let Some(judge) = inputs.train_similarity {
        train.check_same_rows(judge)?;
    }
    Ok(())
}

/// What an SAE training run depends on (docs/reliability.md): the SAE, training and MonoLoss
/// settings (λ resolved, a similarity store by its fingerprint), the seed, the log cadence and
/// `features`, the identity of the features it reads. Recorded when the run starts; a resume
/// with other values is refused.
pub fn inputs_identity(config: &Config, features: serde_json::Value) -> Result<serde_json::Value> {
    let mut train = serde_json::to_value(&config.train)?;
    // When state is saved and where the run stops, not what each step computes.
    train["checkpoint_every"] = json!(null);
    train["max_steps"] = json!(null);
    let mut mono = serde_json::to_value(&config.mono)?;
    mono["lambda"] = json!(config.lambda()?);
    if let Some(judge) = &config.mono.similarity_store {
        let splits = [config.data.train_split.as_str(), config.data.eval_split.as_str()];
        mono["similarity_store"] = crate::data::store::feature_set_identity(judge, &splits)
            .context("mono.similarity_store")?;
    }
    let init = match config.sae.init() {
        Some(dir) => {
            let mut fp = crate::base::fingerprint::Fingerprint::new();
            for file in [checkpoint::CFG_FILE, checkpoint::WEIGHTS_FILE] {
                fp.file_signed(&dir.join(file)).context("sae.init")?;
            }
            json!(fp.finish())
        }
        None => json!(null),
    };
    Ok(json!({
        "stage": "train",
        "sae": config.sae,
        "init": init,
        "train": train,
        "mono": mono,
        "seed": config.run.seed,
        "log_every": config.run.log_every,
        "features": features,
        "splits": [config.data.train_split, config.data.eval_split],
    }))
}

/// A finished training run.
pub struct Trained {
    pub sae: Box<dyn Sae>,
    pub steps: usize,
    pub seconds: f64,
}

/// Trains an SAE as `config` says, writing into `run_dir` (fresh, or continuing its newest
/// checkpoint when `resume`); the final SAE goes to `run_dir/sae`.
pub fn train_sae(
    config: &Config,
    inputs: &SaeTrainInputs,
    run_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<Trained> {
    check_inputs(config, inputs)?;
    let spec = SaeSpec::from_config(&config.sae, inputs.train.dim());
    let run = RunDir::new(run_dir, "step-", 8);
    let mut features = json!({ "train": crate::data::store::fingerprint(inputs.train.dir())? });
    if let Some(judge) = inputs.train_similarity {
        features["train_similarity"] = crate::data::store::fingerprint(judge.dir())?.into();
    }
    let identity = inputs_identity(config, features)?;
    let finished = [crate::layout::RESULTS_FILE, FINAL_SAE_DIR];
    let mut trainer = if run.start("training", &finished, resume, &identity)? {
        run.load_newest(|checkpoint| SaeTrainer::load_state(checkpoint, config, &spec, device))?
    } else {
        SaeTrainer::new(config, &spec, device)?
    };
    let mut log = run.begin(config, &identity, trainer.step)?;
    let manifest = &inputs.train.manifest().info;
    let encoder = |key: &str| manifest.encoder.as_ref().and_then(|e| e.get(key)).cloned();
    let source = json!({
        "features": inputs.train.dir().display().to_string(),
        "model": encoder("model"),
        "output": encoder("output"),
    });
    let started = Instant::now();
    trainer.fit(config, inputs, &run, &mut log, &source, device)?;
    let seconds = started.elapsed().as_secs_f64();
    checkpoint::save(&run.join(FINAL_SAE_DIR), trainer.sae.as_ref(), &source)?;
    Ok(Trained { steps: trainer.step, seconds, sae: trainer.sae })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host count (row blocks in parallel) equals the portable one, over several blocks.
    #[test]
    fn column_counts_count_the_non_zeros_of_each_latent() {
        let (b, m) = (600, 7);
        let data: Vec<f32> = (0..b * m)
            .map(|i| if (i * 7919) % 13 < 4 { (i % 5) as f32 - 2.0 } else { 0.0 })
            .collect();
        let latents = Tensor::from_vec(data.clone(), (b, m), &Device::Cpu).unwrap();
        let want: Vec<f32> =
            (0..m).map(|c| (0..b).filter(|r| data[r * m + c] != 0.0).count() as f32).collect();
        for kernels in [Kernels::Host, Kernels::Portable] {
            let got: Vec<f32> = column_counts(&latents, kernels).unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{kernels:?}");
        }
    }

    /// A training pass of a selection SAE carries its latents' CSR, and the counters read the
    /// same counts from it as from the dense latents, without building those.
    #[test]
    fn a_training_pass_counts_from_its_csr_what_the_latents_hold() {
        use crate::base::config::{SaeConfig, SaeKind};
        for kind in [SaeKind::Topk, SaeKind::BatchTopk] {
            let mut spec = crate::sae::SaeSpec::from_config(&SaeConfig::of_kind(kind), 12);
            (spec.n_latents, spec.k) = (40, 3);
            let sae = crate::sae::build(&spec, 7, &Device::Cpu, Kernels::Host).unwrap();
            let x: Vec<f32> = (0..50 * 12).map(|i| (i as f32 * 0.37).sin()).collect();
            let x = Tensor::from_vec(x, (50, 12), &Device::Cpu).unwrap();
            let pass = crate::sae::forward(sae.as_ref(), &x, true).unwrap();
            assert!(pass.latents_csr.is_some(), "a host selection's CSR");
            let got: Vec<f32> = fired_counts(&pass, Kernels::Host).unwrap().to_vec1().unwrap();
            assert!(pass.activation.latents.built().is_none(), "{kind:?}: dense latents built");
            let want: Vec<f32> =
                column_counts(pass.latents().unwrap(), Kernels::Host).unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{kind:?}");
            assert!(want.iter().sum::<f32>() > 0.0);
        }
    }
}
