//! JumpReLU SAE (Rajamanoharan et al., 2024): z = ReLU(pre), latents = z · H(z − θ) with a
//! learned per-latent threshold θ = exp(log θ), and an L0 penalty. H has no useful derivative, so
//! θ gets the rectangle-kernel pseudo-derivatives (bandwidth ε, K(u) = 1 for |u| < ½):
//!   ∂latent/∂θ = −(θ/ε)·K((z − θ)/ε),   ∂H/∂θ = −(1/ε)·K((z − θ)/ε),
//! and z gets H(z − θ). Implemented as value + (c·θ − detach(c·θ)): exact values, those
//! gradients, on every device. Input is not centred by b_dec (as in the reference code).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::models::topk as select;

pub struct JumpReluSae {
    spec: SaeSpec,
    params: SaeParams,
}

/// Host-side view of one batch: which entries pass, which lie in the kernel's band.
struct Band {
    mask: Vec<bool>,
    /// K((z − θ)/ε) per entry, 0 or 1.
    kernel: Vec<f32>,
}

impl JumpReluSae {
    pub fn new(spec: SaeSpec, seed: u64, device: &Device) -> Result<Self> {
        let bound = (6.0 / spec.n_latents as f64).sqrt();
        let params = SaeParams::init(&spec, bound, false, seed, device)?;
        Ok(Self { spec, params })
    }

    pub fn from_params(spec: SaeSpec, params: SaeParams) -> Self {
        Self { spec, params }
    }

    fn log_threshold(&self) -> &Tensor {
        self.params.log_threshold.as_ref().expect("JumpReLU has log-thresholds").as_tensor()
    }

    fn band(&self, z: &Tensor) -> Result<Band> {
        let cols = z.dim(1)?;
        let z = z
            .detach()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let theta =
            self.log_threshold().detach().exp()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let eps = self.spec.jumprelu_bandwidth as f32;
        let mut mask = vec![false; z.len()];
        let mut kernel = vec![0f32; z.len()];
        for (i, &v) in z.iter().enumerate() {
            let t = theta[i % cols];
            mask[i] = v > t;
            kernel[i] = (((v - t) / eps).abs() < 0.5) as u8 as f32;
        }
        Ok(Band { mask, kernel })
    }

    /// c·θ − detach(c·θ): zero-valued, with ∂/∂θ_k = Σ_i c_ik · upstream_ik.
    fn pseudo_gradient(&self, coefficient: Tensor) -> Result<Tensor> {
        let theta = self.log_threshold().exp()?.unsqueeze(0)?;
        let term = coefficient.broadcast_mul(&theta)?;
        Ok((&term - term.detach())?)
    }
}

impl Sae for JumpReluSae {
    fn spec(&self) -> &SaeSpec {
        &self.spec
    }

    fn params(&self) -> &SaeParams {
        &self.params
    }

    fn centers_input(&self) -> bool {
        false
    }

    fn activate(&self, pre: &Tensor, training: bool) -> Result<Activation> {
        let z = pre.relu()?;
        let band = self.band(&z)?;
        let passed = select::masked_relu(pre, band.mask.clone())?;
        if !training {
            return Ok(Activation {
                latents: passed.detach(),
                grad_support: None,
                batch_threshold: None,
            });
        }
        let theta =
            self.log_threshold().detach().exp()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let cols = theta.len();
        let eps = self.spec.jumprelu_bandwidth as f32;
        let coefficient: Vec<f32> =
            band.kernel.iter().enumerate().map(|(i, &k)| -k * theta[i % cols] / eps).collect();
        let coefficient = Tensor::from_vec(coefficient, pre.shape(), pre.device())?;
        let latents = (passed + self.pseudo_gradient(coefficient)?)?;
        let grad_support =
            band.kernel.iter().zip(&band.mask).map(|(&k, &m)| k > 0.0 && !m).collect();
        Ok(Activation { latents, grad_support: Some(grad_support), batch_threshold: None })
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        _dead: &[bool],
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let z = pass.pre.relu()?;
        let band = self.band(&z)?;
        let rows = z.dim(0)? as f64;
        let count = band.mask.iter().filter(|m| **m).count() as f64;
        let eps = self.spec.jumprelu_bandwidth as f32;
        // ∂H/∂θ = −(1/ε)K.
        let coefficient: Vec<f32> = band.kernel.iter().map(|&k| -k / eps).collect();
        let coefficient = Tensor::from_vec(coefficient, z.shape(), z.device())?;
        let l0 = ((self.pseudo_gradient(coefficient)?.sum_all()? + count)? / rows)?;
        Ok(vec![("l0", (l0 * self.spec.l0_coef)?)])
    }

    fn threshold(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.log_threshold().detach().exp()?))
    }
}
