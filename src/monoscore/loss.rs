//! The batch MonoLoss: one entry point (`batch_mono_loss`) over two implementations, the
//! differentiable candle graph below (every device) and the sparse CPU kernels of
//! `sparse_loss.rs` for mostly-zero latents.
//!
//! Within a batch: ã = (a − min)/(max − min + eps) per neuron, the O(B) MonoScore per neuron,
//! neurons with den ≤ eps (firing on < 2 images of the batch) excluded, and
//! L = 1 − mean over the remaining neurons. Every op used here has a backward in candle,
//! so gradients reach the activations, through the min and the max as well.

use candle_core::{Result, Tensor, D};

use super::sparse_loss::sparse_batch_mono_loss;
use crate::base::cpu::with_cpu_slice;
use crate::base::host::Kernels;
use crate::base::sparse::{self, SPARSE_LIMIT};
use crate::models::topk::Mask;

/// The batch MonoLoss of one batch, and what it measured: scalar tensors on the latents'
/// device, read on logged steps only.
pub struct BatchMono {
    /// 1 − mean score over the neurons active in the batch (1 when none is). A graph node, or
    /// (fused into the SAE decoder) a constant whose gradient the decoder's backward adds.
    pub loss: Tensor,
    /// Mean batch MonoScore over active neurons (= 1 − loss).
    pub mean_score: Tensor,
    /// Neurons that entered the mean (den > eps).
    pub n_active: Tensor,
}

/// Batch MonoLoss of (B, M) latents judged by (B, D) similarity embeddings. Host kernels for
/// mostly-zero CPU latents run in O(nnz·D) with gradients on the non-zeros and `grad_support`;
/// otherwise it is the dense candle graph (every device, no host round trip).
pub fn batch_mono_loss(
    latents: &Tensor,
    similarity: &Tensor,
    eps: f64,
    grad_support: Option<&Mask>,
    kernels: Kernels,
) -> Result<BatchMono> {
    let host = kernels.for_tensor(latents).is_host()
        && with_cpu_slice(latents, |l| sparse::density(l) <= SPARSE_LIMIT)?;
    if host {
        let support = match grad_support {
            Some(Mask::Host(s)) => Some(s.as_slice()),
            _ => None,
        };
        sparse_batch_mono_loss(latents, similarity, eps, support)
    } else {
        let out = dense_batch_mono_loss(latents, similarity, eps)?;
        let mean_score = out.loss.detach().affine(-1.0, 1.0)?;
        Ok(BatchMono { loss: out.loss, mean_score, n_active: out.n_active })
    }
}

pub struct BatchMonoLoss {
    /// Scalar 1 − mean score over active neurons (1 when no neuron is active).
    pub loss: Tensor,
    /// (M,) per-neuron batch scores, 0 where a neuron is inactive in this batch.
    pub scores: Tensor,
    /// Number of neurons that entered the mean (a scalar).
    pub n_active: Tensor,
}

/// The value of `activations` at each column's first extreme (`argmin`/`argmax` over rows):
/// the gradient of the min or max goes to that one entry (PyTorch's `min(dim)`), not to every
/// tied one (candle's `min_keepdim` would give the whole gradient to each tie).
fn extreme(activations: &Tensor, max: bool) -> Result<Tensor> {
    let index = if max { activations.argmax_keepdim(0)? } else { activations.argmin_keepdim(0)? };
    activations.gather(&index, 0)
}

/// `t` with every value below `floor` raised to it, without a scalar upload to the device.
fn at_least(t: &Tensor, floor: f64) -> Result<Tensor> {
    t.maximum(&t.ones_like()?.affine(0.0, floor)?)
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
    let norms = at_least(&similarity.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?, 1e-12)?;
    let unit = similarity.broadcast_div(&norms)?; // (B, D)

    let lo = extreme(activations, false)?; // (1, M)
    let hi = extreme(activations, true)?;
    let range = ((hi - &lo)? + eps)?;
    let scaled = activations.broadcast_sub(&lo)?.broadcast_div(&range)?; // (B, M)

    let u = scaled.sum(0)?; // (M,)
    let v = scaled.sqr()?.sum(0)?;
    let w_sq = unit.t()?.matmul(&scaled)?.sqr()?.sum(0)?; // ‖Σ_i ã_ik p_i‖², (M,)
    let numerator = ((w_sq - &v)? * 0.5)?;
    let denominator = ((u.sqr()? - &v)? * 0.5)?;

    let active = denominator.gt(&denominator.ones_like()?.affine(0.0, eps)?)?;
    let n_active = active.to_dtype(dtype)?.sum_all()?;
    let ones = denominator.ones_like()?;
    let safe_denominator = active.where_cond(&(&denominator + eps)?, &ones)?;
    let scores = active.where_cond(&(numerator / safe_denominator)?, &denominator.zeros_like()?)?;
    let mean = scores.sum_all()?.div(&at_least(&n_active, 1.0)?)?;
    let loss = mean.affine(-1.0, 1.0)?;
    Ok(BatchMonoLoss { loss, scores, n_active })
}
