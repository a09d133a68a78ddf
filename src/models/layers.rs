//! Differentiable building blocks. candle's fused LayerNorm and softmax_last_dim have no
//! backward (docs/candle.md), so these are compositions of ops that all have one; with host
//! kernels several run as single CPU ops instead (`fused`). The GEMM convolution and BatchNorm
//! have modules of their own (`conv`, `batch_norm`).

use anyhow::Result;
use candle_core::{IndexOp, Tensor, D};

use crate::base::host::Kernels;

/// LayerNorm over the last dimension: (x − mean) / √(var + eps) · w + b.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// One fused op with host kernels (`fused::LayerNormOp`), the composed graph otherwise.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.for_tensor(x).is_host() {
            let op = super::fused::LayerNormOp::new(self.eps);
            return Ok(x.contiguous()?.apply_op3(&self.weight, &self.bias, op)?);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Low-rank adapter: W x + (alpha / rank) · B A x, with A (rank × in) and B (out × rank).
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// y = x Wᵀ + b (+ LoRA), on inputs of any leading shape.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// With host kernels and a bias, one fused op (`fused::LinearOp`) on `x` as it is shaped.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let mut y = match &self.bias {
            Some(b) if kernels.for_tensor(x).is_host() => x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                b,
                super::fused::LinearOp::new(),
            )?,
            Some(b) => x.broadcast_matmul(&self.weight.t()?)?.broadcast_add(b)?,
            None => x.broadcast_matmul(&self.weight.t()?)?,
        };
        if let Some(l) = &self.lora {
            let low = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        Ok(y)
    }
}

/// x · sigmoid(1.702 x), OpenAI CLIP's activation.
pub fn quick_gelu(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.for_tensor(x).is_host() {
        return Ok(x.contiguous()?.apply_op1(super::fused::QuickGelu)?);
    }
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// 3×3 max-pool, stride 2, padding 1, on non-negative input (after ReLU), built from narrow,
/// reshape and elementwise maximum so that its backward works (candle's max_pool2d backward
/// needs kernel == stride). Zero padding equals PyTorch's −∞ padding on non-negative input.
///
/// With host kernels, one op (`fused::MaxPool3x3S2`: PyTorch's −∞ padding and first-maximum
/// gradient) instead.
pub fn max_pool_3x3_s2(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.for_tensor(x).is_host() {
        return Ok(x.contiguous()?.apply_op1(super::fused::MaxPool3x3S2)?);
    }
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let padded = x.pad_with_zeros(2, 1, 2 * ho + 1 - h)?.pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
    let mut out: Option<Tensor> = None;
    for di in 0..3 {
        let rows = padded.narrow(2, di, 2 * ho)?.reshape((b, c, ho, 2, 2 * wo + 2))?.i((
            ..,
            ..,
            ..,
            0,
            ..,
        ))?;
        for dj in 0..3 {
            let view =
                rows.narrow(3, dj, 2 * wo)?.reshape((b, c, ho, wo, 2))?.i((.., .., .., .., 0))?;
            out = Some(match out {
                Some(m) => m.maximum(&view)?,
                None => view,
            });
        }
    }
    Ok(out.expect("nine views"))
}
