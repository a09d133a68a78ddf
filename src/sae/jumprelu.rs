//! JumpReLU SAE (Rajamanoharan et al., 2024): z = ReLU(pre), latents = z · H(z − θ) with a
//! learned per-latent threshold θ = exp(log θ), and an L0 penalty. H has no useful derivative, so
//! θ gets the rectangle-kernel pseudo-derivatives (bandwidth ε, K(u) = 1 for |u| < ½):
//!   ∂latent/∂θ = −(θ/ε)·K((z − θ)/ε),   ∂H/∂θ = −(1/ε)·K((z − θ)/ε),
//! and z gets H(z − θ). Implemented as value + (c·θ − detach(c·θ)): exact values, those
//! gradients, on every device; the band is computed with tensor ops for both kinds of kernels.
//! Input is not centred by b_dec (as in the reference code).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::base::cpu::with_cpu_slice;
use crate::base::host::Kernels;
use crate::models::topk::{self as select, Mask};

pub struct JumpReluSae {
    spec: SaeSpec,
    params: SaeParams,
}

/// One batch: which entries pass the threshold, which lie in the kernel's band.
struct Band {
    /// (B, M) 0/1: z > θ.
    pass: Tensor,
    /// (B, M) K((z − θ)/ε), 0 or 1, as f32.
    kernel: Tensor,
}

impl JumpReluSae {
    pub fn new(spec: SaeSpec, seed: u64, device: &Device, kernels: Kernels) -> Result<Self> {
        let bound = (6.0 / spec.n_latents as f64).sqrt();
        let params = SaeParams::init(&spec, bound, false, seed, device, kernels)?;
        Ok(Self { spec, params })
    }

    pub fn from_params(spec: SaeSpec, params: SaeParams) -> Self {
        Self { spec, params }
    }

    fn log_threshold(&self) -> &Tensor {
        self.params.log_threshold.as_ref().expect("JumpReLU has log-thresholds").as_tensor()
    }

    /// θ as a (1, M) constant.
    fn theta(&self) -> Result<Tensor> {
        Ok(self.log_threshold().detach().exp()?.unsqueeze(0)?)
    }

    /// ε as a (1, 1) constant on the device (no scalar upload).
    fn bandwidth(&self, like: &Tensor) -> Result<Tensor> {
        let eps = self.spec.jumprelu_bandwidth as f32;
        Ok(Tensor::full(eps, (1, 1), like.device())?.to_dtype(like.dtype())?)
    }

    fn band(&self, z: &Tensor) -> Result<Band> {
        let diff = z.detach().broadcast_sub(&self.theta()?)?;
        let pass = diff.gt(&diff.zeros_like()?)?;
        let u = diff.broadcast_div(&self.bandwidth(&diff)?)?.abs()?;
        let kernel = u.lt(&u.ones_like()?.affine(0.0, 0.5)?)?.to_dtype(z.dtype())?;
        Ok(Band { pass, kernel })
    }

    /// A 0/1 tensor as a mask for this SAE's kernels.
    fn mask(&self, t: &Tensor) -> Result<Mask> {
        Ok(if self.params.kernels.is_host() {
            let t = t.to_dtype(DType::F32)?;
            Mask::Host(with_cpu_slice(&t, |m| m.iter().map(|&v| v != 0.0).collect())?)
        } else {
            Mask::Device(t.clone())
        })
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
        let passed = select::masked_relu(pre, self.mask(&band.pass)?)?;
        if !training {
            return Ok(Activation {
                latents: passed.detach(),
                grad_support: None,
                batch_threshold: None,
            });
        }
        // −K·θ/ε, a constant.
        let coefficient = band
            .kernel
            .broadcast_mul(&self.theta()?)?
            .neg()?
            .broadcast_div(&self.bandwidth(&band.kernel)?)?;
        let latents = (passed + self.pseudo_gradient(coefficient)?)?;
        // In the band but below the threshold: 0, yet with a gradient.
        let below = band.pass.to_dtype(band.kernel.dtype())?.affine(-1.0, 1.0)?;
        let support = band.kernel.mul(&below)?.gt(&band.kernel.zeros_like()?)?;
        Ok(Activation { latents, grad_support: Some(self.mask(&support)?), batch_threshold: None })
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        _dead: &Tensor,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let z = pass.pre.relu()?;
        let band = self.band(&z)?;
        let rows = z.dim(0)? as f64;
        let count = band.pass.to_dtype(z.dtype())?.sum_all()?;
        // ∂H/∂θ = −(1/ε)K.
        let coefficient = band.kernel.neg()?.broadcast_div(&self.bandwidth(&band.kernel)?)?;
        let l0 = ((self.pseudo_gradient(coefficient)?.sum_all()? + count)? / rows)?;
        Ok(vec![("l0", (l0 * self.spec.l0_coef)?)])
    }

    fn threshold(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.log_threshold().detach().exp()?))
    }
}
