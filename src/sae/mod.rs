//! Sparse autoencoders: one file per architecture behind one small trait, sharing the encoder,
//! the decoder, input standardisation and the AuxK loss defined here.
//!
//! Shapes: x (B, D); W_enc and W_dec are stored neuron-major, (M, D) each, so a latent's encoder
//! and decoder directions are contiguous rows (checkpoints write W_enc transposed, as SAELens).

pub mod batch_topk;
pub mod checkpoint;
pub mod jumprelu;
pub mod ops;
pub mod reconstruction;
pub mod relu;
pub mod topk;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::base::config::{BatchTopkConfig, JumpReluConfig, ReluConfig, SaeConfig, SaeKind};
use crate::base::cpu::normalize_rows_sequential;
use crate::base::host::{self, Kernels};
use crate::models::topk::{self as select, Latents, Mask};
use crate::monoscore::BatchMono;

/// Everything that defines an SAE's shape and training losses (written to cfg.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaeSpec {
    pub kind: SaeKind,
    pub d_in: usize,
    pub n_latents: usize,
    pub k: usize,
    pub k_aux: usize,
    pub aux_coef: f64,
    pub normalize_input: bool,
    pub jumprelu_bandwidth: f64,
    pub jumprelu_init_log_threshold: f64,
    pub l0_coef: f64,
    pub l1_coef: f64,
    /// TopK: W_dec is W_enc at every step (one shared matrix, trained with the sum of both
    /// gradients). Absent in older cfg.json files: untied.
    #[serde(default)]
    pub tied_decoder: bool,
    /// Whether the encoder has a (trained) bias; false keeps b_enc at zero. Absent in older
    /// cfg.json files: true.
    #[serde(default = "yes")]
    pub encoder_bias: bool,
    /// Whether the encoder sees x − b_dec (SAELens' `apply_b_dec_to_input`); None = the kind's
    /// own choice (all but JumpReLU). Set for SAEs written elsewhere.
    #[serde(default)]
    pub apply_b_dec_to_input: Option<bool>,
}

fn yes() -> bool {
    true
}

impl SaeSpec {
    /// Whether the encoder sees x − b_dec (all kinds but JumpReLU, unless the spec says).
    pub fn centers_input(&self) -> bool {
        self.apply_b_dec_to_input.unwrap_or(self.kind != SaeKind::Jumprelu)
    }

    /// The spec of `[sae]` on `d_in`-dimensional inputs. Keys of other kinds, which the
    /// architecture never reads, keep their defaults (cfg.json has one flat shape).
    pub fn from_config(c: &SaeConfig, d_in: usize) -> Self {
        let n_latents = c.n_latents();
        let (k, k_aux, aux_coef) = c.topk().unwrap_or_else(|| {
            let d = BatchTopkConfig::default();
            (d.k, d.k_aux, d.aux_coef)
        });
        let jump = match c {
            SaeConfig::Jumprelu(j) => j.clone(),
            _ => JumpReluConfig::default(),
        };
        let l1_coef = match c {
            SaeConfig::Relu(r) => r.l1_coef,
            _ => ReluConfig::default().l1_coef,
        };
        let (tied_decoder, encoder_bias) = match c {
            SaeConfig::Topk(t) => (t.tied_decoder, true),
            SaeConfig::BatchTopk(b) => (false, b.encoder_bias),
            _ => (false, true),
        };
        Self {
            tied_decoder,
            encoder_bias,
            apply_b_dec_to_input: None,
            kind: c.kind(),
            d_in,
            n_latents,
            k,
            k_aux: k_aux.min(n_latents),
            aux_coef,
            normalize_input: c.normalize_input(),
            jumprelu_bandwidth: jump.jumprelu_bandwidth,
            jumprelu_init_log_threshold: jump.jumprelu_init_log_threshold,
            l0_coef: jump.l0_coef,
            l1_coef,
        }
    }
}

/// The trainable tensors.
pub struct SaeParams {
    /// (M, D): row k is latent k's encoder direction.
    pub w_enc: Var,
    /// (M, D): row k is latent k's dictionary vector, kept at unit norm.
    pub w_dec: Var,
    pub b_enc: Var,
    pub b_dec: Var,
    /// JumpReLU only: (M,) log-thresholds.
    pub log_threshold: Option<Var>,
    /// The kernels the SAE's forward and backward passes run with.
    pub kernels: Kernels,
}

impl SaeParams {
    /// (name, var) pairs in a fixed order (optimizer state and checkpoints follow it).
    pub fn named(&self) -> Vec<(&'static str, &Var)> {
        let mut v = vec![
            ("W_enc", &self.w_enc),
            ("W_dec", &self.w_dec),
            ("b_enc", &self.b_enc),
            ("b_dec", &self.b_dec),
        ];
        if let Some(t) = &self.log_threshold {
            v.push(("log_threshold", t));
        }
        v
    }

    /// Kaiming-uniform W_enc with bound `enc_bound`, W_dec = W_encᵀ rows at unit norm; zero biases.
    pub fn init(
        spec: &SaeSpec,
        enc_bound: f64,
        unit_encoder: bool,
        seed: u64,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let (m, d) = (spec.n_latents, spec.d_in);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut enc: Vec<f32> =
            (0..m * d).map(|_| rng.random_range(-enc_bound..enc_bound) as f32).collect();
        let mut dec = enc.clone();
        normalize_rows_sequential(&mut dec, d);
        if unit_encoder {
            normalize_rows_sequential(&mut enc, d);
        }
        let log_threshold = (spec.kind == SaeKind::Jumprelu)
            .then(|| {
                Var::from_tensor(&Tensor::full(spec.jumprelu_init_log_threshold as f32, m, device)?)
            })
            .transpose()?;
        Ok(Self {
            w_enc: Var::from_tensor(&Tensor::from_vec(enc, (m, d), device)?)?,
            w_dec: Var::from_tensor(&Tensor::from_vec(dec, (m, d), device)?)?,
            b_enc: Var::zeros(m, DType::F32, device)?,
            b_dec: Var::zeros(d, DType::F32, device)?,
            log_threshold,
            kernels,
        })
    }
}

/// Output of `activate`.
pub struct Activation {
    /// (B, M) latents.
    pub latents: Latents,
    /// Entries whose gradient matters although the latent is 0 (JumpReLU's pseudo-gradient band).
    pub grad_support: Option<Mask>,
    /// BatchTopK: the smallest value kept in this batch (its threshold estimate), a scalar.
    pub batch_threshold: Option<Tensor>,
    /// Host kernels: the latents' non-zeros as CSR rows when the activation built them on the
    /// way (TopK kinds), handed to the decoder. Only a host `Selected` of `pre` sets it: the
    /// latents are then a masked ReLU of `pre`, and these entries are exactly where a gradient
    /// passes from them to `pre` unchanged, so the decoder differentiates into `pre` directly.
    pub latents_csr: Option<crate::base::sparse::SparseBatch>,
}

/// One forward pass over a batch.
pub struct ForwardPass {
    /// The input as given, (B, D): the reconstruction target.
    pub input: Tensor,
    /// The input in the SAE's working space (standardised when `normalize_input`), (B, D).
    pub working_input: Tensor,
    /// Per-row (mean, std) used to standardise, when it was.
    pub scale: Option<(Tensor, Tensor)>,
    /// (B, M) encoder outputs before the activation (built when first read; see `ops::Pre`).
    pub pre: ops::Pre,
    /// Host kernels in training: the port through which sparse ops pass `pre`'s gradient.
    pub pre_port: Option<ops::PrePort>,
    pub activation: Activation,
    /// The decoder's output (latents · W_dec), (B, D).
    pub output: Tensor,
    /// Reconstruction in the working space and in the input space, (B, D). With host kernels
    /// these are values without a graph: the reconstruction loss differentiates through
    /// `output` (`reconstruction::error`).
    pub working_recon: Tensor,
    pub recon: Tensor,
    /// The batch MonoLoss (and its statistics) when the pass was asked for one.
    pub mono: Option<BatchMono>,
    /// With host kernels, the latents' non-zeros as CSR rows: in inference as the decoder built
    /// them (see `ops::Decoded::latents_csr`), in training a copy of the activation's own (the
    /// decoder keeps its CSR for the backward pass). None when neither had one.
    pub latents_csr: Option<crate::base::sparse::SparseBatch>,
}

impl ForwardPass {
    /// The (B, M) latents as a tensor (built on the first call; see `Latents`).
    pub fn latents(&self) -> Result<&Tensor> {
        Ok(self.activation.latents.tensor()?)
    }
}

/// A sparse autoencoder architecture.
pub trait Sae: Send {
    fn spec(&self) -> &SaeSpec;
    fn params(&self) -> &SaeParams;

    /// Latents from pre-activations. `training` selects batch-dependent behaviour (BatchTopK).
    fn activate(&self, pre: &ops::Pre, training: bool) -> Result<Activation>;

    /// Training loss terms beyond reconstruction (sparsity penalties, AuxK), by name.
    /// `dead`: (M,) 0/1 on the SAE's device, the latents that count as dead.
    fn extra_losses(
        &self,
        pass: &ForwardPass,
        dead: &Tensor,
    ) -> Result<Vec<(&'static str, Tensor)>>;

    /// Reconstruction loss; plain MSE unless an architecture says otherwise.
    fn reconstruction_loss(&self, pass: &ForwardPass) -> Result<Tensor> {
        Ok(reconstruction::error(self.params(), pass, reconstruction::ErrorNorm::Elements)?)
    }

    /// The inference latents as a threshold of the pre-activations, when they are one (then
    /// `infer` need not store pre-activations or dense latents); None otherwise (TopK, or a
    /// BatchTopK SAE before its first training step).
    fn inference_keep(&self) -> Result<Option<ops::KeepAbove>> {
        Ok(None)
    }

    /// Called after each optimizer step with that step's forward pass.
    fn observe_step(&mut self, _pass: &ForwardPass) -> Result<()> {
        Ok(())
    }

    /// The per-latent inference threshold written to checkpoints (BatchTopK, JumpReLU).
    fn threshold(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Architecture state outside the parameters, for resuming (BatchTopK's running threshold).
    fn extra_state(&self) -> Result<Vec<f64>> {
        Ok(Vec::new())
    }

    fn restore_extra_state(&mut self, _state: &[f64]) -> Result<()> {
        Ok(())
    }
}

/// Builds a freshly initialised SAE.
pub fn build(spec: &SaeSpec, seed: u64, device: &Device, kernels: Kernels) -> Result<Box<dyn Sae>> {
    check_size(spec, device)?;
    let spec = spec.clone();
    Ok(match spec.kind {
        SaeKind::Topk => Box::new(topk::TopKSae::new(spec, seed, device, kernels)?),
        SaeKind::BatchTopk => Box::new(batch_topk::BatchTopKSae::new(spec, seed, device, kernels)?),
        SaeKind::Jumprelu => Box::new(jumprelu::JumpReluSae::new(spec, seed, device, kernels)?),
        SaeKind::Relu => Box::new(relu::ReluSae::new(spec, seed, device, kernels)?),
    })
}

/// Refuses an SAE too large to allocate, before allocating: one line instead of an abort.
fn check_size(spec: &SaeSpec, device: &Device) -> Result<()> {
    let weights = spec.n_latents as u128 * spec.d_in as u128;
    // f32 W_enc and W_dec, each with a gradient and two Adam moments.
    let training_bytes = weights * 2 * 4 * 4;
    let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
    anyhow::ensure!(
        weights <= 1 << 33,
        "sae.n_latents = {} with d_in = {}: {weights} weights per matrix is beyond any device \
         (at most 2^33)",
        spec.n_latents,
        spec.d_in
    );
    if let (true, Some(available)) = (device.is_cpu(), crate::base::memory::available_bytes()) {
        anyhow::ensure!(
            training_bytes <= available as u128,
            "sae.n_latents = {} with d_in = {}: training needs {:.1} GiB for the weights, their \
             gradients and Adam state, but {:.1} GiB of memory are available",
            spec.n_latents,
            spec.d_in,
            gib(training_bytes),
            gib(available as u128)
        );
    }
    Ok(())
}

/// Per-row standardisation (x − mean) / (std + 1e-5), std unbiased, as the reference (OpenAI's
/// `LN`) and SAELens do; returns (standardised, mean, std). Reconstructions are restored with
/// the std alone (× std + mean), as both of them do.
fn standardize(x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / (d.max(2) - 1) as f64)?;
    let std = var.sqrt()?;
    Ok((centered.broadcast_div(&(&std + 1e-5)?)?, mean, std))
}

/// The forward pass shared by every architecture. `training` selects batch-dependent behaviour
/// and a gradient graph; an inference pass (false) reads the encoder and decoder weights
/// detached, so nothing upstream of the latents records a graph for them.
pub fn forward(sae: &dyn Sae, x: &Tensor, training: bool) -> Result<ForwardPass> {
    forward_with_mono(sae, x, training, None)
}

/// The forward pass, with the batch MonoLoss of the latents computed alongside the decoder
/// (fused with it on the CPU). Add λ·`pass.mono.0` to the objective. A `GradSink` active during
/// the call (`GradSink::during`) receives the gradients of W_enc and W_dec from the host ops
/// instead of candle's store; the caller must read them back (`Gradients::from_store`).
pub fn forward_with_mono(
    sae: &dyn Sae,
    x: &Tensor,
    training: bool,
    mono: Option<ops::MonoTerm>,
) -> Result<ForwardPass> {
    let p = sae.params();
    let (working_input, scale) = working_space(sae, x)?;
    let weight = |v: &Var| if training { v.as_tensor().clone() } else { v.as_tensor().detach() };
    let (w_enc, w_dec, b_enc, b_dec) =
        (weight(&p.w_enc), weight(&p.w_dec), weight(&p.b_enc), weight(&p.b_dec));
    let centre = sae.spec().centers_input().then_some(&b_dec);
    let ops::Encoded { pre, port: pre_port } =
        ops::encoder_linear(&working_input, &w_enc, &b_enc, centre, p.kernels)?;
    let mut activation = sae.activate(&pre, training)?;
    let activation_csr = activation.latents_csr.take();
    // The trainer's dead-latent counters read it instead of scanning the (B × M) latents.
    let training_csr = if training { activation_csr.clone() } else { None };
    let decoded = ops::decode(
        &activation.latents,
        activation_csr,
        pre_port.as_ref(),
        &w_dec,
        activation.grad_support.as_ref(),
        mono,
        p.kernels,
    )?;
    let (working_recon, recon) =
        reconstruction::reconstruct(&decoded.output, &b_dec, scale.as_ref(), p.kernels)?;
    Ok(ForwardPass {
        input: x.clone(),
        working_input,
        scale,
        pre,
        pre_port,
        activation,
        output: decoded.output,
        working_recon,
        recon,
        mono: decoded.mono,
        latents_csr: decoded.latents_csr.or(training_csr),
    })
}

/// The input in the SAE's working space, and the (mean, std) it was standardised with.
fn working_space(sae: &dyn Sae, x: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    Ok(if sae.spec().normalize_input {
        let (xs, mean, std) = standardize(x)?;
        (xs, Some((mean, std)))
    } else {
        (x.clone(), None)
    })
}

/// An inference pass as evaluation reads it.
pub struct Inference {
    /// The latents' non-zeros, (B, M) as CSR rows.
    pub latents: crate::base::sparse::SparseBatch,
    /// (B, D) reconstruction in the input space.
    pub recon: Tensor,
}

/// Sparse latents and the reconstruction of `x`: the values of `forward(sae, x, false)`. With
/// host kernels and a thresholded activation (`Sae::inference_keep`) the encoder's output is
/// thresholded block by block, so no (B × M) buffer is written; otherwise a forward pass.
pub fn infer(sae: &dyn Sae, x: &Tensor) -> Result<Inference> {
    Inferrer::new(sae)?.infer(x)
}

/// `infer` over many batches of one SAE: what does not depend on the batch (the threshold,
/// the encoder's screen) is read and prepared once.
pub struct Inferrer<'a> {
    sae: &'a dyn Sae,
    /// The thresholded activation and the encoder's screen, with host kernels.
    above: Option<(ops::KeepAbove, ops::EncoderScreen)>,
}

impl<'a> Inferrer<'a> {
    pub fn new(sae: &'a dyn Sae) -> Result<Self> {
        let p = sae.params();
        let above =
            match (p.kernels.for_tensor(p.w_enc.as_tensor()).is_host(), sae.inference_keep()?) {
                (true, Some(keep)) => Some((keep, ops::EncoderScreen::new(p.w_enc.as_tensor())?)),
                _ => None,
            };
        Ok(Self { sae, above })
    }

    pub fn infer(&self, x: &Tensor) -> Result<Inference> {
        let (sae, x) = (self.sae, x.detach());
        let p = sae.params();
        if let (true, Some((keep, screen))) = (p.kernels.for_tensor(&x).is_host(), &self.above) {
            let (working_input, scale) = working_space(sae, &x)?;
            let b_dec = p.b_dec.as_tensor().detach();
            let centre = sae.spec().centers_input().then_some(&b_dec);
            let (w_enc, b_enc) = (p.w_enc.as_tensor().detach(), p.b_enc.as_tensor().detach());
            let latents =
                ops::encode_above(&working_input, &w_enc, &b_enc, centre, keep, Some(screen))?;
            let w_dec = p.w_dec.as_tensor().detach();
            let recon = reconstruction::from_csr(&latents, &w_dec, &b_dec, scale.as_ref())?;
            return Ok(Inference { latents, recon });
        }
        let pass = forward(sae, &x, false)?;
        let latents = match pass.latents_csr {
            Some(csr) => csr,
            None => crate::base::sparse::SparseBatch::from_dense(
                &host::read_f32(pass.latents()?)?,
                sae.spec().n_latents,
            ),
        };
        Ok(Inference { latents, recon: pass.recon })
    }
}

/// Latents for inference (no graph).
pub fn encode(sae: &dyn Sae, x: &Tensor) -> Result<Tensor> {
    Ok(forward(sae, &x.detach(), false)?.latents()?.detach())
}

/// AuxK: reconstruct the (detached) residual from the top `k_aux` dead latents of each row
/// (all of them when fewer are dead); 0 when no latent is dead.
pub fn auxk_loss(
    sae: &dyn Sae,
    pass: &ForwardPass,
    dead: &Tensor,
    normalized: bool,
) -> Result<Tensor> {
    let (spec, p) = (sae.spec(), sae.params());
    let zero = Tensor::zeros((), pass.pre.dtype(), pass.pre.device())?;
    if spec.aux_coef == 0.0 {
        return Ok(zero);
    }
    // Host kernels skip the work when nothing is dead; portable ones multiply by (any dead).
    let any_dead = if p.kernels.is_host() {
        if crate::base::cpu::with_cpu_slice(&dead.to_dtype(DType::F32)?, |d| {
            d.iter().all(|&v| v == 0.0)
        })? {
            return Ok(zero);
        }
        None
    } else {
        Some(dead.to_dtype(DType::F32)?.max_keepdim(0)?.reshape(())?)
    };
    let selection = select::Selection::PerRow(spec.k_aux);
    let aux = select::topk_latents(pass.pre.tensor()?, &selection, Some(dead), p.kernels)?;
    // A host selection is a masked ReLU of `pre` with its CSR: the gradient may skip the latents.
    let aux_recon = ops::support_matmul(
        &aux.latents,
        aux.csr,
        pass.pre_port.as_ref(),
        p.w_dec.as_tensor(),
        None,
        p.kernels,
    )?;
    let residual = (&pass.working_input - &pass.working_recon)?.detach();
    let loss = if normalized {
        reconstruction::normalized_mse(&aux_recon, &residual)?
    } else {
        (aux_recon - residual)?.sqr()?.mean_all()?
    };
    let loss = (loss * spec.aux_coef)?;
    Ok(match any_dead {
        Some(factor) => (loss * factor)?,
        None => loss,
    })
}
