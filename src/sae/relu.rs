//! ReLU SAE with an L1 penalty on the latents (decoder rows are unit norm, so plain L1).

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::ops::{KeepAbove, Pre};
use super::{Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::base::host::Kernels;

pub struct ReluSae {
    spec: SaeSpec,
    params: SaeParams,
}

impl ReluSae {
    pub fn new(spec: SaeSpec, seed: u64, device: &Device, kernels: Kernels) -> Result<Self> {
        let bound = (6.0 / spec.n_latents as f64).sqrt();
        let params = SaeParams::init(&spec, bound, false, seed, device, kernels)?;
        Ok(Self { spec, params })
    }

    pub fn from_params(spec: SaeSpec, params: SaeParams) -> Self {
        Self { spec, params }
    }
}

impl Sae for ReluSae {
    fn spec(&self) -> &SaeSpec {
        &self.spec
    }

    fn params(&self) -> &SaeParams {
        &self.params
    }

    fn activate(&self, pre: &Pre, _training: bool) -> Result<Activation> {
        Ok(Activation {
            latents: pre.tensor()?.relu()?.into(),
            latents_csr: None,
            grad_support: None,
            batch_threshold: None,
        })
    }

    /// ReLU keeps what is above 0.
    fn inference_keep(&self) -> Result<Option<KeepAbove>> {
        Ok(Some(KeepAbove::All(0.0)))
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        _dead: &Tensor,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let rows = pass.latents()?.dim(0)? as f64;
        let l1 = (pass.latents()?.sum_all()? / rows)?;
        Ok(vec![("l1", (l1 * self.spec.l1_coef)?)])
    }
}
