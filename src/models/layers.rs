//! Differentiable building blocks. candle's fused LayerNorm and softmax_last_dim have no
//! backward (docs/candle.md), so these are compositions of ops that all have one.

use std::sync::Mutex;

use anyhow::Result;
use candle_core::{IndexOp, Tensor, D};

/// LayerNorm over the last dimension: (x − mean) / √(var + eps) · w + b.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.broadcast_matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let low = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        Ok(y)
    }
}

/// x · sigmoid(1.702 x), OpenAI CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// BatchNorm2d over (B, C, H, W): batch statistics in training (running statistics updated with
/// PyTorch's momentum and unbiased variance), running statistics in evaluation.
pub struct BatchNorm {
    /// Checkpoint prefix, e.g. `layer1.0.bn2`.
    pub name: String,
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Mutex<Tensor>,
    pub running_var: Mutex<Tensor>,
    pub eps: f64,
    pub momentum: f64,
    /// False for frozen layers: always evaluation mode.
    pub trainable: bool,
}

impl BatchNorm {
    /// Works on a channel-major (C, B·H·W) copy: every reduction, and the backward of every
    /// per-channel broadcast, then runs over contiguous rows (strided ones are several times
    /// slower in candle).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let rows = x.transpose(0, 1)?.reshape((c, b * h * w))?;
        let (mean, var) = if train && self.trainable {
            let n = (b * h * w) as f64;
            let mean = rows.mean_keepdim(1)?;
            let var = rows.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            let mut rm = self.running_mean.lock().unwrap();
            let mut rv = self.running_var.lock().unwrap();
            *rm = ((&*rm * (1.0 - self.momentum))?
                + (mean.detach().flatten_all()? * self.momentum)?)?;
            *rv = ((&*rv * (1.0 - self.momentum))?
                + (var.detach().flatten_all()? * (self.momentum * n / (n - 1.0).max(1.0)))?)?;
            (mean, var)
        } else {
            (
                self.running_mean.lock().unwrap().reshape((c, 1))?,
                self.running_var.lock().unwrap().reshape((c, 1))?,
            )
        };
        let scale =
            (var + self.eps)?.sqrt()?.recip()?.broadcast_mul(&self.weight.reshape((c, 1))?)?;
        let normed = rows
            .broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape((c, 1))?)?;
        Ok(normed.reshape((c, b, h, w))?.transpose(0, 1)?.contiguous()?)
    }
}

/// 3×3 max-pool, stride 2, padding 1, on non-negative input (after ReLU), built from narrow,
/// reshape and elementwise maximum so that its backward works (candle's max_pool2d backward
/// needs kernel == stride). Zero padding equals PyTorch's −∞ padding on non-negative input.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
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
