//! The batch MonoLoss on sparse latents in O(nnz·D): forward and backward kernels over the
//! latents' non-zeros (CSR/CSC), a custom op for the loss alone, and the pieces the SAE decoder
//! uses to fuse the loss into its own pass. Tested against the dense graph (`loss.rs`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::loss::BatchMono;
use crate::base::cpu::{contiguous, cpu_tensor, dims2, CResult};
use crate::base::simd::{lane_sum, vectorized};
use crate::base::sparse::{self, SparseBatch};

/// What a forward pass of the sparse MonoLoss measured.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MonoLossStats {
    pub n_active: usize,
    pub mean_score: f64,
}

impl MonoLossStats {
    /// As the scalar tensors of a `BatchMono` (on the CPU, where this kernel runs).
    pub(crate) fn into_batch_mono(self, loss: f32) -> CResult<BatchMono> {
        let cpu = &candle_core::Device::Cpu;
        Ok(BatchMono {
            loss: Tensor::new(loss, cpu)?,
            mean_score: Tensor::new(self.mean_score as f32, cpu)?,
            n_active: Tensor::new(self.n_active as f32, cpu)?,
        })
    }
}

/// No entry: the column's extreme is attained first by an implicit zero.
const IMPLICIT: usize = usize::MAX;

/// Per-neuron scalars of the batch MonoScore, kept for the backward pass.
#[derive(Clone, Copy)]
struct NeuronBatchStats {
    min: f32,
    range: f32,
    u: f32,
    v: f32,
    num: f32,
    den: f32,
    active: bool,
    /// CSC positions of the entries that receive the min's and the max's gradient: the first row
    /// attaining each (PyTorch's `min(dim)`), or IMPLICIT when that row is an implicit zero.
    min_at: usize,
    max_at: usize,
}

impl Default for NeuronBatchStats {
    fn default() -> Self {
        Self {
            min: 0.0,
            range: 0.0,
            u: 0.0,
            v: 0.0,
            num: 0.0,
            den: 0.0,
            active: false,
            min_at: IMPLICIT,
            max_at: IMPLICIT,
        }
    }
}

/// The CSC position (offset by `first`) of the first row attaining `target` in a column with
/// explicit `rows` (ascending) and `values`, or IMPLICIT when an implicit zero comes first.
fn first_at(rows: &[u32], values: &[f32], target: f32, first: usize, b: usize) -> usize {
    let explicit = values.iter().position(|&v| v == target);
    // The first implicit row: the first gap in the ascending explicit rows.
    let implicit_row = (rows.len() < b && target == 0.0).then(|| {
        rows.iter().enumerate().find(|(i, &r)| r as usize != *i).map_or(rows.len(), |(i, _)| i)
    });
    match (explicit, implicit_row) {
        (Some(j), Some(r)) if (rows[j] as usize) > r => IMPLICIT,
        (Some(j), _) => first + j,
        (None, _) => IMPLICIT,
    }
}

/// What the MonoLoss forward pass keeps for the backward pass.
pub(crate) struct MonoLossSaved {
    pub(crate) cols: sparse::SparseColumns,
    /// With w_k = Σ_i ã_ik p_i over the unit similarity rows p_i: p_i · w_k for every entry,
    /// w_k · w_k and (Σ_i p_i) · w_k for every neuron.
    gram: sparse::SelfGram,
    neurons: Vec<NeuronBatchStats>,
}

/// Unit rows of the (B, D) similarity embeddings, and their sum.
fn unit_rows(sim: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut unit = sim.to_vec();
    unit.par_chunks_mut(d).for_each(|row| {
        vectorized!({
            let norm = (lane_sum(row, |x| x as f64 * x as f64).sqrt() as f32).max(1e-12);
            row.iter_mut().for_each(|x| *x /= norm);
        })
    });
    let mut total = vec![0f32; d];
    for row in unit.chunks_exact(d) {
        total.iter_mut().zip(row).for_each(|(t, x)| *t += x);
    }
    (unit, total)
}

/// The batch MonoLoss of CSR latents (B × M; absent entries are zeros) judged by `sim` (B × D):
/// the state for the backward pass, the loss and its statistics.
pub(crate) fn forward(
    csr: &SparseBatch,
    b: usize,
    m: usize,
    sim: &[f32],
    d: usize,
    eps: f32,
) -> (MonoLossSaved, f32, MonoLossStats) {
    let (unit, unit_sum) = unit_rows(sim, d);
    let cols = sparse::to_columns(csr.as_rows(), m);
    // Each neuron's scaling, and each entry's coefficient of its row's unit vector in w_k.
    let mut coefs = vec![0f32; cols.rows.len()];
    let mut neurons: Vec<NeuronBatchStats> = cols
        .col_offsets
        .par_windows(2)
        .zip(sparse::column_slices(&cols, &mut coefs))
        .enumerate()
        .with_min_len(16)
        .map(|(k, (span, coefs))| {
            let (rows, vals) = (&cols.rows[span[0]..span[1]], &cols.values[span[0]..span[1]]);
            let implicit = b - vals.len();
            let mut min = vals.iter().copied().fold(f32::INFINITY, f32::min);
            let mut max = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if implicit > 0 {
                min = min.min(0.0);
                max = max.max(0.0);
            }
            let range = max - min + eps;
            // Scaled value of the implicit zeros: 0 unless the minimum is negative.
            let zero_scaled = -min / range;
            let (mut u, mut v) =
                (implicit as f32 * zero_scaled, implicit as f32 * zero_scaled * zero_scaled);
            for (&l, coef) in vals.iter().zip(coefs.iter_mut()) {
                let a = (l - min) / range;
                u += a;
                v += a * a;
                // Explicit entries carry (a − zero_scaled); every row's zero_scaled share is added below.
                *coef = a - zero_scaled;
            }
            let first = cols.col_offsets[k];
            NeuronBatchStats {
                min,
                range,
                u,
                v,
                num: 0.0,
                den: 0.5 * (u * u - v),
                active: false,
                min_at: first_at(rows, vals, min, first, b),
                max_at: first_at(rows, vals, max, first, b),
            }
        })
        .collect();
    // w_k = Σ coef · unit row, plus the implicit zeros' share: only its dots are needed, so
    // each block of D of w_k is dotted while in registers and w is never written.
    let shifts: Vec<f32> = neurons.iter().map(|n| -n.min / n.range).collect();
    let gram = sparse::csc_self_gram(&cols, &coefs, &unit, &shifts, &unit_sum, d);
    for (n, &square) in neurons.iter_mut().zip(&gram.squares) {
        n.num = 0.5 * (square - n.v);
        n.active = n.den > eps;
    }
    let n_active = neurons.iter().filter(|n| n.active).count();
    let total: f64 =
        neurons.iter().filter(|n| n.active).map(|n| (n.num / (n.den + eps)) as f64).sum();
    let mean = if n_active > 0 { total / n_active as f64 } else { 0.0 };
    let loss = if n_active > 0 { 1.0 - mean } else { 1.0 };
    (
        MonoLossSaved { cols, gram, neurons },
        loss as f32,
        MonoLossStats { n_active, mean_score: mean },
    )
}

/// g_out · ∂loss/∂latents on the support, in CSC order (`saved.cols`).
pub(crate) fn backward(saved: &MonoLossSaved, b: usize, g_out: f32, eps: f32) -> Vec<f32> {
    let MonoLossSaved { cols, gram, neurons } = saved;
    let n_active = neurons.iter().filter(|n| n.active).count();
    if n_active == 0 {
        return vec![0.0; cols.rows.len()];
    }
    let g_score = -g_out / n_active as f32; // ∂L/∂MS_k for active k
                                            // Per neuron: ∂L/∂num, ∂L/∂den and the min/max gradients, closed forms over all rows.
    struct Coef {
        dnum: f32,
        dden: f32,
        dmin: f32,
        dmax: f32,
    }
    let coefs: Vec<Coef> = neurons
        .par_iter()
        .enumerate()
        .map(|(k, n)| {
            if !n.active {
                return Coef { dnum: 0.0, dden: 0.0, dmin: 0.0, dmax: 0.0 };
            }
            let den = n.den + eps;
            let dnum = g_score / den;
            let dden = -g_score * n.num / (den * den);
            let sum_g = dnum * (gram.with_base[k] - n.u) + dden * (b as f32 * n.u - n.u);
            let sum_ga = dnum * (gram.squares[k] - n.v) + dden * (n.u * n.u - n.v);
            Coef { dnum, dden, dmin: (sum_ga - sum_g) / n.range, dmax: -sum_ga / n.range }
        })
        .collect();
    // ∂L/∂l = ∂L/∂ã / range, plus the min/max terms on the one entry each goes to.
    let mut grads = gram.dots.clone();
    for k in 0..neurons.len() {
        let (n, c) = (&neurons[k], &coefs[k]);
        let span = cols.col_offsets[k]..cols.col_offsets[k + 1];
        let first = span.start;
        for (j, (grad, &l)) in grads[span.clone()].iter_mut().zip(&cols.values[span]).enumerate() {
            if !n.active {
                *grad = 0.0;
                continue;
            }
            let a = (l - n.min) / n.range;
            let da = c.dnum * (*grad - a) + c.dden * (n.u - a);
            let mut g = da / n.range;
            if first + j == n.min_at {
                g += c.dmin;
            }
            if first + j == n.max_at {
                g += c.dmax;
            }
            *grad = g;
        }
    }
    grads
}

struct SparseMonoLoss {
    eps: f32,
    grad_support: Option<Arc<Vec<bool>>>,
    stats: Arc<Mutex<MonoLossStats>>,
    saved: Arc<Mutex<Option<(SparseBatch, MonoLossSaved)>>>,
}

impl CustomOp2 for SparseMonoLoss {
    fn name(&self) -> &'static str {
        "sparse-batch-mono-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, m) = dims2(l1)?;
        let (b2, d) = dims2(l2)?;
        if b != b2 {
            candle_core::bail!("mono loss: {b} rows of latents but {b2} of similarity embeddings");
        }
        let (lat, sim) = (contiguous(self.name(), s1, l1)?, contiguous(self.name(), s2, l2)?);
        let csr = SparseBatch::from_dense_with(
            lat,
            m,
            self.grad_support.as_deref().map(|v| v.as_slice()),
        );
        let (saved, loss, stats) = forward(&csr, b, m, sim, d, self.eps);
        *self.stats.lock().unwrap() = stats;
        *self.saved.lock().unwrap() = Some((csr, saved));
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        lat: &Tensor,
        _sim: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (b, m) = lat.dims2()?;
        let g_out = grad.to_dtype(DType::F32)?.to_vec0::<f32>()?;
        let Some((csr, saved)) = self.saved.lock().unwrap().take() else {
            candle_core::bail!("mono loss backward without forward");
        };
        let vals = sparse::to_row_order(&saved.cols, &backward(&saved, b, g_out, self.eps));
        Ok((Some(cpu_tensor(csr.with_values(vals).to_dense(m), (b, m))?), None))
    }
}

/// The sparse op: the loss of (B, M) CPU f32 latents judged by (B, D) similarity embeddings,
/// with gradients on the non-zeros and on `grad_support`.
pub(crate) fn sparse_batch_mono_loss(
    latents: &Tensor,
    similarity: &Tensor,
    eps: f64,
    grad_support: Option<&[bool]>,
) -> CResult<BatchMono> {
    let stats = Arc::new(Mutex::new(MonoLossStats::default()));
    let op = SparseMonoLoss {
        eps: eps as f32,
        grad_support: grad_support.map(|g| Arc::new(g.to_vec())),
        stats: stats.clone(),
        saved: Arc::new(Mutex::new(None)),
    };
    let sim = similarity.detach().to_dtype(DType::F32)?.contiguous()?;
    let loss = latents.contiguous()?.apply_op2(&sim, op)?;
    let s = *stats.lock().unwrap();
    let mut out = s.into_batch_mono(0.0)?;
    out.mean_score = loss.detach().affine(-1.0, 1.0)?;
    out.loss = loss;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward pass writes everything it reads: the allocator holding NaNs or zeros
    /// beforehand gives the same loss and the same dots, bit for bit.
    #[test]
    fn forward_does_not_depend_on_what_the_allocator_held() {
        let (b, m, d) = (30, 17, 21);
        let dense: Vec<f32> = (0..b * m)
            .map(|i| if (i * 11) % 7 < 2 && i % m != 5 { (i as f32 * 0.37).sin() } else { 0.0 })
            .collect();
        let csr = SparseBatch::from_dense(&dense, m);
        let sim: Vec<f32> = (0..b * d).map(|i| (i as f32 * 0.29).cos() + 0.1).collect();
        let run = |poison: f32| {
            // Many freed blocks of w's size, so that w is likely to be one of them.
            drop(std::hint::black_box((0..64).map(|_| vec![poison; m * d]).collect::<Vec<_>>()));
            let (saved, loss, _) = forward(&csr, b, m, &sim, d, 1e-8);
            let g = &saved.gram;
            let all = g.dots.iter().chain(&g.squares).chain(&g.with_base);
            (loss.to_bits(), all.map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        let (clean, poisoned) = (run(0.0), run(f32::NAN));
        assert!(f32::from_bits(clean.0).is_finite());
        assert_eq!(clean, poisoned);
    }
}
