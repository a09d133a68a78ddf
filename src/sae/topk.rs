//! TopK SAE, OpenAI style (Gao et al., 2024): per-sample standardised input, the k largest
//! pre-activations of each row kept (then ReLU), normalised-MSE loss, AuxK on dead latents.
//! Initialisation: nn.Linear's uniform(±1/√D) encoder rows renormalised to unit norm, tied to
//! the decoder (W_dec = W_encᵀ).

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::base::host::Kernels;

use super::ops::Pre;
use super::{auxk_loss, reconstruction, Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::models::topk as select;

pub struct TopKSae {
    spec: SaeSpec,
    params: SaeParams,
}

impl TopKSae {
    pub fn new(spec: SaeSpec, seed: u64, device: &Device, kernels: Kernels) -> Result<Self> {
        let bound = 1.0 / (spec.d_in as f64).sqrt();
        let params = SaeParams::init(&spec, bound, true, seed, device, kernels)?;
        Ok(Self { spec, params })
    }

    pub fn from_params(spec: SaeSpec, params: SaeParams) -> Self {
        Self { spec, params }
    }
}

impl Sae for TopKSae {
    fn spec(&self) -> &SaeSpec {
        &self.spec
    }

    fn params(&self) -> &SaeParams {
        &self.params
    }

    fn activate(&self, pre: &Pre, _training: bool) -> Result<Activation> {
        let selection = select::Selection::PerRow(self.spec.k);
        let selected = select::topk_latents(pre.tensor()?, &selection, None, self.params.kernels)?;
        Ok(Activation {
            latents: selected.latents,
            latents_csr: selected.csr,
            grad_support: None,
            batch_threshold: None,
        })
    }

    fn reconstruction_loss(&self, pass: &ForwardPass) -> Result<Tensor> {
        Ok(reconstruction::error(&self.params, pass, reconstruction::ErrorNorm::RowNorms)?)
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        dead: &Tensor,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![("auxk", auxk_loss(self, pass, dead, true)?)])
    }
}
