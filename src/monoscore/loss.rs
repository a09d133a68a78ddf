//! The batch MonoLoss: one entry point (`batch_mono_loss`) over two implementations, the
//! differentiable candle graph below (every device) and the sparse CPU kernels of
//! `sparse_loss.rs` for mostly-zero latents.
//!
//! Within a batch: ã = (a − min)/(max − min + eps) per neuron, the O(B) MonoScore per neuron,
//! neurons with den ≤ eps (firing on < 2 images of the batch) excluded, and
//! L = 1 − mean over the remaining neurons. Every op used here has a backward in candle,
//! so gradients reach the activations, through the min and the max as well.

use candle_core::{DType, Result, Tensor, D};

use super::sparse_loss::{sparse_batch_mono_loss, MonoLossStats};
use crate::base::cpu::with_cpu_slice;
use crate::base::sparse::{self, SPARSE_LIMIT};

/// Batch MonoLoss of (B, M) latents judged by (B, D) similarity embeddings. On the CPU with
/// sparse latents it runs in O(nnz·D) with gradients on the non-zeros and `grad_support`;
/// otherwise it is the dense candle graph. Returns the loss and the statistics of this batch.
pub fn batch_mono_loss(
    latents: &Tensor,
    similarity: &Tensor,
    eps: f64,
    grad_support: Option<&[bool]>,
) -> Result<(Tensor, MonoLossStats)> {
    let sparse_cpu = latents.device().is_cpu()
        && latents.dtype() == DType::F32
        && with_cpu_slice(latents, |l| sparse::density(l) <= SPARSE_LIMIT)?;
    if sparse_cpu {
        sparse_batch_mono_loss(latents, similarity, eps, grad_support)
    } else {
        let out = dense_batch_mono_loss(latents, similarity, eps)?;
        let mean_score = out.mean_score()?;
        Ok((out.loss, MonoLossStats { n_active: out.n_active, mean_score }))
    }
}

pub struct BatchMonoLoss {
    /// Scalar 1 − mean score over active neurons (1 when no neuron is active).
    pub loss: Tensor,
    /// (M,) per-neuron batch scores, 0 where a neuron is inactive in this batch.
    pub scores: Tensor,
    /// Number of neurons that entered the mean.
    pub n_active: usize,
}

impl BatchMonoLoss {
    /// Mean batch MonoScore over active neurons (= 1 − loss), for logging.
    pub fn mean_score(&self) -> Result<f64> {
        Ok(1.0 - self.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
}

/// The dense graph. `activations`: (B, M), the representation being made monosemantic;
/// `similarity`: (B, D) embeddings that judge similarity (treated as constants).
pub fn dense_batch_mono_loss(
    activations: &Tensor,
    similarity: &Tensor,
    eps: f64,
) -> Result<BatchMonoLoss> {
    let dtype = activations.dtype();
    let similarity = similarity.detach().to_dtype(dtype)?;
    let norms = similarity.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    let unit = similarity.broadcast_div(&norms)?; // (B, D)

    let lo = activations.min_keepdim(0)?; // (1, M)
    let hi = activations.max_keepdim(0)?;
    let range = ((hi - &lo)? + eps)?;
    let scaled = activations.broadcast_sub(&lo)?.broadcast_div(&range)?; // (B, M)

    let u = scaled.sum(0)?; // (M,)
    let v = scaled.sqr()?.sum(0)?;
    let w_sq = unit.t()?.matmul(&scaled)?.sqr()?.sum(0)?; // ‖Σ_i ã_ik p_i‖², (M,)
    let numerator = ((w_sq - &v)? * 0.5)?;
    let denominator = ((u.sqr()? - &v)? * 0.5)?;

    let active = denominator.gt(eps)?;
    let n_active = active.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let ones = denominator.ones_like()?;
    let safe_denominator = active.where_cond(&(&denominator + eps)?, &ones)?;
    let scores = active.where_cond(&(numerator / safe_denominator)?, &denominator.zeros_like()?)?;
    let mean = (scores.sum_all()? / n_active.max(1) as f64)?;
    let loss = (mean.neg()? + 1.0)?;
    Ok(BatchMonoLoss { loss, scores, n_active })
}
