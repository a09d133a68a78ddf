//! BatchTopK SAE (Bussmann et al., 2024): in training the k·B largest activations of the whole
//! batch are kept, so a sample may use more or fewer than k latents; at inference a threshold
//! learned during training replaces the batch, so latents never depend on batch composition.
//! The threshold is a running average of the smallest kept activation (EMA, β = 0.999, bias
//! corrected so that short runs have a threshold too), kept on the SAE's device.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::ops::{KeepAbove, Pre};
use super::{auxk_loss, Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::base::host::{self, stat_dtype, Kernels};
use crate::models::topk::{self as select, Mask};

const THRESHOLD_BETA: f64 = 0.999;

pub struct BatchTopKSae {
    spec: SaeSpec,
    params: SaeParams,
    /// Bias-uncorrected EMA of the batch thresholds, and the number of updates (scalars).
    ema: Tensor,
    updates: Tensor,
}

impl BatchTopKSae {
    pub fn new(spec: SaeSpec, seed: u64, device: &Device, kernels: Kernels) -> Result<Self> {
        let bound = (6.0 / spec.n_latents as f64).sqrt();
        let params = SaeParams::init(&spec, bound, false, seed, device, kernels)?;
        let zero = Tensor::zeros((), stat_dtype(device), device)?;
        Ok(Self { spec, params, ema: zero.clone(), updates: zero })
    }

    /// A loaded SAE with a fixed inference threshold.
    pub fn from_params(spec: SaeSpec, params: SaeParams, threshold: Option<f32>) -> Result<Self> {
        let device = params.b_enc.device().clone();
        let (ema, updates) = match threshold {
            Some(t) => (t as f64 * (1.0 - THRESHOLD_BETA), 1.0),
            None => (0.0, 0.0),
        };
        let scalar = |v: f64| Tensor::new(v, &device)?.to_dtype(stat_dtype(&device));
        Ok(Self { spec, params, ema: scalar(ema)?, updates: scalar(updates)? })
    }

    /// The bias-corrected threshold as a scalar tensor: ema / (1 − β^updates).
    fn corrected(&self) -> Result<Tensor> {
        let decay = (&self.updates * THRESHOLD_BETA.ln())?.exp()?;
        Ok(self.ema.div(&decay.affine(-1.0, 1.0)?)?.to_dtype(DType::F32)?)
    }

    /// The inference threshold (None before the first training step). Reads the update count
    /// to the host: for inference, never inside a training step.
    pub fn inference_threshold(&self) -> Result<Option<Tensor>> {
        (host::read_scalar(&self.updates)? > 0.0).then(|| self.corrected()).transpose()
    }
}

impl Sae for BatchTopKSae {
    fn spec(&self) -> &SaeSpec {
        &self.spec
    }

    fn params(&self) -> &SaeParams {
        &self.params
    }

    fn activate(&self, pre: &Pre, training: bool) -> Result<Activation> {
        let (rows, _) = pre.dims();
        let threshold = if training { None } else { self.inference_threshold()? };
        match threshold {
            Some(threshold) => {
                let pre = pre.tensor()?;
                let selected = if self.params.kernels.for_tensor(pre).is_host() {
                    select::relu_above(pre, host::read_scalar(&threshold)? as f32)?
                } else {
                    let mask = pre.detach().broadcast_gt(&threshold.to_dtype(pre.dtype())?)?;
                    select::masked_relu(pre, Mask::Device(mask))?
                };
                Ok(Activation {
                    latents: selected.latents,
                    latents_csr: selected.csr,
                    grad_support: None,
                    batch_threshold: None,
                })
            }
            None => {
                let n = self.spec.k * rows;
                let selected = match super::ops::screened_batch_top(pre, n)? {
                    Some(selected) => selected,
                    None => {
                        let selection = select::Selection::Batch(n);
                        select::topk_latents(pre.tensor()?, &selection, None, self.params.kernels)?
                    }
                };
                Ok(Activation {
                    latents: selected.latents,
                    latents_csr: selected.csr,
                    grad_support: None,
                    batch_threshold: selected.min,
                })
            }
        }
    }

    /// The learned threshold, read as `activate` reads it.
    fn inference_keep(&self) -> Result<Option<KeepAbove>> {
        let threshold = self.inference_threshold()?;
        Ok(threshold.map(|t| host::read_scalar(&t)).transpose()?.map(|t| KeepAbove::All(t as f32)))
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        dead: &Tensor,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![("auxk", auxk_loss(self, pass, dead, false)?)])
    }

    /// The EMA takes the batch's smallest kept value; a batch that kept nothing (its portable
    /// threshold is +∞) leaves it as it is.
    fn observe_step(&mut self, pass: &ForwardPass) -> Result<()> {
        let Some(t) = &pass.activation.batch_threshold else { return Ok(()) };
        let t = t.to_dtype(self.ema.dtype())?;
        let kept = t.lt(&t.ones_like()?.affine(0.0, f64::INFINITY)?)?;
        let t = kept.where_cond(&t, &t.zeros_like()?)?;
        let updated = ((&self.ema * THRESHOLD_BETA)? + (t * (1.0 - THRESHOLD_BETA))?)?;
        self.ema = kept.where_cond(&updated, &self.ema)?;
        self.updates = (&self.updates + kept.to_dtype(self.updates.dtype())?)?;
        Ok(())
    }

    fn threshold(&self) -> Result<Option<Tensor>> {
        Ok(self
            .inference_threshold()?
            .map(|t| t.broadcast_as(self.spec.n_latents)?.contiguous())
            .transpose()?)
    }

    fn extra_state(&self) -> Result<Vec<f64>> {
        Ok(vec![host::read_scalar(&self.ema)?, host::read_scalar(&self.updates)?])
    }

    fn restore_extra_state(&mut self, state: &[f64]) -> Result<()> {
        anyhow::ensure!(state.len() == 2, "BatchTopK state needs 2 values, found {}", state.len());
        let device = self.params.b_enc.device().clone();
        let scalar = |v: f64| Tensor::new(v, &device)?.to_dtype(stat_dtype(&device));
        self.ema = scalar(state[0])?;
        self.updates = scalar(state[1])?;
        Ok(())
    }
}
