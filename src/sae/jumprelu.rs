//! JumpReLU SAE (Rajamanoharan et al., 2024): z = ReLU(pre), latents = z · H(z − θ) with a
//! learned per-latent threshold θ = exp(log θ), and an L0 penalty. H has no useful derivative, so
//! the thresholds get the rectangle-kernel pseudo-derivatives (bandwidth ε, K(u) = 1 for |u| < ½)
//!   −(θ/ε)·K((z − θ)/ε) for a latent,   −(1/ε)·K((z − θ)/ε) for H,
//! applied to the trained parameter log θ directly, as the reference code does (its autograd
//! function returns them as log θ's gradient, without the chain factor θ; at the paper's initial
//! θ = 1 the two readings agree). z gets H(z − θ). Implemented as value + (c·log θ −
//! detach(c·log θ)): exact values, those gradients, on every device.
//! Input is not centred by b_dec (as in the reference code).

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::ops::{KeepAbove, Pre};
use super::{Activation, ForwardPass, Sae, SaeParams, SaeSpec};
use crate::base::cpu::with_cpu_slice;
use crate::base::host::Kernels;
use crate::models::topk::{self as select, Mask};

pub struct JumpReluSae {
    spec: SaeSpec,
    params: SaeParams,
}

/// One batch: which entries pass the threshold (z > θ), which lie in the kernel's band
/// (K((z − θ)/ε) = 1), and the entries of the band below the threshold (zero, but with a
/// gradient). Host kernels compute it in one pass on the CPU; portable ones with tensor ops.
struct Band {
    pass: Mask,
    /// (B, M) K as f32.
    kernel: Tensor,
    below: Mask,
    /// Entries that pass, a scalar.
    count: Tensor,
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
        if self.params.kernels.for_tensor(z).is_host() {
            return self.host_band(z);
        }
        let diff = z.detach().broadcast_sub(&self.theta()?)?;
        let pass = diff.gt(&diff.zeros_like()?)?;
        let u = diff.broadcast_div(&self.bandwidth(&diff)?)?.abs()?;
        let kernel = u.lt(&u.ones_like()?.affine(0.0, 0.5)?)?.to_dtype(z.dtype())?;
        let not_passed = pass.to_dtype(kernel.dtype())?.affine(-1.0, 1.0)?;
        let below = kernel.mul(&not_passed)?.gt(&kernel.zeros_like()?)?;
        let count = pass.to_dtype(z.dtype())?.sum_all()?;
        Ok(Band { pass: Mask::Device(pass), kernel, below: Mask::Device(below), count })
    }

    /// The band in one pass over CPU memory (the same float operations as the portable one).
    fn host_band(&self, z: &Tensor) -> Result<Band> {
        let cols = z.dim(1)?;
        let theta = self.log_threshold().detach().exp()?;
        let theta = with_cpu_slice(&theta, <[f32]>::to_vec)?;
        let eps = self.spec.jumprelu_bandwidth as f32;
        let (pass, kernel) = with_cpu_slice(&z.detach(), |z| {
            let mut pass = vec![false; z.len()];
            let mut kernel = vec![0f32; z.len()];
            for (i, &v) in z.iter().enumerate() {
                let diff = v - theta[i % cols];
                pass[i] = diff > 0.0;
                kernel[i] = ((diff / eps).abs() < 0.5) as u8 as f32;
            }
            (pass, kernel)
        })?;
        let below = pass.iter().zip(&kernel).map(|(&p, &k)| k > 0.0 && !p).collect();
        let count = Tensor::new(pass.iter().filter(|p| **p).count() as f32, z.device())?;
        let kernel = Tensor::from_vec(kernel, z.shape(), z.device())?;
        Ok(Band { pass: Mask::Host(pass), kernel, below: Mask::Host(below), count })
    }

    /// c·log θ − detach(c·log θ): zero-valued, with ∂/∂(log θ)_k = Σ_i c_ik · upstream_ik.
    fn pseudo_gradient(&self, coefficient: Tensor) -> Result<Tensor> {
        let log_theta = self.log_threshold().unsqueeze(0)?;
        let term = coefficient.broadcast_mul(&log_theta)?;
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

    fn activate(&self, pre: &Pre, training: bool) -> Result<Activation> {
        let pre = pre.tensor()?;
        let z = pre.relu()?;
        let band = self.band(&z)?;
        let passed = select::masked_relu(pre, band.pass)?;
        if !training {
            return Ok(Activation {
                latents: passed.latents.tensor()?.detach().into(),
                latents_csr: passed.csr,
                grad_support: None,
                batch_threshold: None,
            });
        }
        let passed = passed.latents.tensor()?.clone();
        // −K·θ/ε, a constant.
        let coefficient = band
            .kernel
            .broadcast_mul(&self.theta()?)?
            .neg()?
            .broadcast_div(&self.bandwidth(&band.kernel)?)?;
        let latents = (passed + self.pseudo_gradient(coefficient)?)?;
        Ok(Activation {
            latents: latents.into(),
            latents_csr: None,
            grad_support: Some(band.below),
            batch_threshold: None,
        })
    }

    /// θ = exp(log θ), as the band computes it: relu(pre) − θ > 0 keeps the same entries as
    /// pre > θ (a difference of floats is 0 only between equal ones).
    fn inference_keep(&self) -> Result<Option<KeepAbove>> {
        let theta = self.log_threshold().detach().exp()?;
        Ok(Some(KeepAbove::PerLatent(with_cpu_slice(&theta, <[f32]>::to_vec)?)))
    }

    fn extra_losses(
        &self,
        pass: &ForwardPass,
        _dead: &Tensor,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let z = pass.pre.tensor()?.relu()?;
        let band = self.band(&z)?;
        let rows = z.dim(0)? as f64;
        // ∂H/∂θ = −(1/ε)K.
        let coefficient = band.kernel.neg()?.broadcast_div(&self.bandwidth(&band.kernel)?)?;
        let l0 = ((self.pseudo_gradient(coefficient)?.sum_all()? + band.count)? / rows)?;
        Ok(vec![("l0", (l0 * self.spec.l0_coef)?)])
    }

    fn threshold(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.log_threshold().detach().exp()?))
    }
}
