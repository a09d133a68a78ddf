//! BatchTopK SAE (Bussmann et al., 2024): in training the k·B largest activations of the whole
//! batch are kept, so a sample may use more or fewer than k latents; at inference a threshold
//! learned during training replaces the batch, so latents never depend on batch composition.
//! The threshold is a running average of the smallest kept activation (EMA, β = 0.999, bias
//! corrected so that short runs have a threshold too).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{auxk_loss, Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::models::topk as select;

const THRESHOLD_BETA: f64 = 0.999;

pub struct BatchTopKSae {
    spec: SaeSpec,
    params: SaeParams,
    /// Bias-uncorrected EMA of the batch thresholds and the number of updates.
    ema: f64,
    updates: u64,
}

impl BatchTopKSae {
    pub fn new(spec: SaeSpec, seed: u64, device: &Device) -> Result<Self> {
        let bound = (6.0 / spec.n_latents as f64).sqrt();
        let params = SaeParams::init(&spec, bound, false, seed, device)?;
        Ok(Self { spec, params, ema: 0.0, updates: 0 })
    }

    /// A loaded SAE with a fixed inference threshold.
    pub fn from_params(spec: SaeSpec, params: SaeParams, threshold: Option<f32>) -> Self {
        let (ema, updates) = match threshold {
            Some(t) => (t as f64 * (1.0 - THRESHOLD_BETA), 1),
            None => (0.0, 0),
        };
        Self { spec, params, ema, updates }
    }

    /// The inference threshold (None before the first training step).
    pub fn inference_threshold(&self) -> Option<f32> {
        (self.updates > 0).then(|| {
            (self.ema / (1.0 - THRESHOLD_BETA.powi(self.updates.min(i32::MAX as u64) as i32)))
                as f32
        })
    }
}

impl Sae for BatchTopKSae {
    fn spec(&self) -> &SaeSpec {
        &self.spec
    }

    fn params(&self) -> &SaeParams {
        &self.params
    }

    fn activate(&self, pre: &Tensor, training: bool) -> Result<Activation> {
        let (rows, _) = pre.dims2()?;
        match (training, self.inference_threshold()) {
            (false, Some(threshold)) => {
                let host = pre
                    .detach()
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mask = host.iter().map(|&v| v > threshold).collect();
                Ok(Activation {
                    latents: select::masked_relu(pre, mask)?,
                    grad_support: None,
                    batch_threshold: None,
                })
            }
            _ => {
                let (latents, min) =
                    select::topk_latents(pre, &select::Selection::Batch(self.spec.k * rows), None)?;
                Ok(Activation { latents, grad_support: None, batch_threshold: min })
            }
        }
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        dead: &[bool],
    ) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(auxk_loss(self, pass, dead, false)?.map(|l| vec![("auxk", l)]).unwrap_or_default())
    }

    fn observe_step(&mut self, pass: &ForwardPass) {
        if let Some(t) = pass.activation.batch_threshold {
            self.ema = THRESHOLD_BETA * self.ema + (1.0 - THRESHOLD_BETA) * t as f64;
            self.updates += 1;
        }
    }

    fn threshold(&self) -> Result<Option<Tensor>> {
        let device = self.params.b_enc.device();
        Ok(self
            .inference_threshold()
            .map(|t| Tensor::full(t, self.spec.n_latents, device))
            .transpose()?)
    }

    fn extra_state(&self) -> Vec<f64> {
        vec![self.ema, self.updates as f64]
    }

    fn restore_extra_state(&mut self, state: &[f64]) -> Result<()> {
        anyhow::ensure!(state.len() == 2, "BatchTopK state needs 2 values, found {}", state.len());
        self.ema = state[0];
        self.updates = state[1] as u64;
        Ok(())
    }
}
