//! TopK activations without sorting rows: the k largest entries of each row (TopK) or the n
//! largest of a whole batch (BatchTopK), found by selection (`select_nth_unstable`) on the CPU,
//! and the masked ReLU that keeps them with the right gradient.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::base::cpu::{contiguous, cpu_tensor, with_cpu_slice, CResult};

/// Which entries a TopK selection keeps.
#[derive(Clone, Debug)]
pub enum Selection {
    /// The k largest entries of each row.
    PerRow(usize),
    /// The `n` largest entries of the whole batch (BatchTopK: n = k·B).
    Batch(usize),
}

/// The kept entries as a dense 0/1 mask over (rows × cols), plus the smallest kept value.
/// Ties are broken by position, so exactly the requested count is kept when enough entries are
/// eligible. Only entries > 0 are eligible when `positive_only` (ReLU before selection), and only
/// columns with `allowed[c]` when given.
pub fn select_mask(
    values: &[f32],
    cols: usize,
    how: &Selection,
    allowed: Option<&[bool]>,
    positive_only: bool,
) -> (Vec<bool>, Option<f32>) {
    let eligible = |c: usize, v: f32| {
        allowed.is_none_or(|a| a[c]) && (!positive_only || v > 0.0) && !v.is_nan()
    };
    let mut mask = vec![false; values.len()];
    // Order: larger value first, then lower flat index.
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    match *how {
        Selection::PerRow(k) => {
            let mins: Vec<Option<f32>> = mask
                .par_chunks_mut(cols)
                .zip(values.par_chunks(cols))
                .map_init(Vec::new, |scratch: &mut Vec<(f32, u32)>, (mrow, vrow)| {
                    scratch.clear();
                    scratch.extend(
                        vrow.iter()
                            .enumerate()
                            .filter(|(c, v)| eligible(*c, **v))
                            .map(|(c, &v)| (v, c as u32)),
                    );
                    if scratch.len() > k && k > 0 {
                        scratch.select_nth_unstable_by(k - 1, better);
                        scratch.truncate(k);
                    } else if k == 0 {
                        scratch.clear();
                    }
                    let mut min: Option<f32> = None;
                    for &(v, c) in scratch.iter() {
                        mrow[c as usize] = true;
                        min = Some(min.map_or(v, |m: f32| m.min(v)));
                    }
                    min
                })
                .collect();
            let min = mins.into_iter().flatten().reduce(f32::min);
            (mask, min)
        }
        Selection::Batch(n) => {
            let candidates = batch_candidates(values, cols, n, &eligible);
            let mut candidates = candidates;
            if candidates.len() > n && n > 0 {
                candidates.select_nth_unstable_by(n - 1, better);
                candidates.truncate(n);
            } else if n == 0 {
                candidates.clear();
            }
            let mut min: Option<f32> = None;
            for &(v, i) in &candidates {
                mask[i as usize] = true;
                min = Some(min.map_or(v, |m: f32| m.min(v)));
            }
            (mask, min)
        }
    }
}

/// The eligible entries that can be among the batch's `n` largest: a sampled lower bound on the
/// n-th largest value keeps the candidate set near 2n instead of the whole batch.
fn batch_candidates(
    values: &[f32],
    cols: usize,
    n: usize,
    eligible: &(dyn Fn(usize, f32) -> bool + Sync),
) -> Vec<(f32, u32)> {
    let total = values.len();
    let collect_above = |t: f32| -> Vec<(f32, u32)> {
        values
            .par_chunks(cols)
            .enumerate()
            .flat_map_iter(|(r, row)| {
                row.iter()
                    .enumerate()
                    .filter(move |(c, v)| **v >= t && eligible(*c, **v))
                    .map(move |(c, &v)| (v, (r * cols + c) as u32))
            })
            .collect()
    };
    let stride = (total / 65536).max(1);
    let mut sample: Vec<f32> = (0..total)
        .step_by(stride)
        .filter(|&i| eligible(i % cols, values[i]))
        .map(|i| values[i])
        .collect();
    sample.sort_unstable_by(|a, b| b.total_cmp(a));
    // Expected rank of the n-th largest within the sample, with a 2× margin, then widening.
    let mut rank = ((2 * n) as f64 * sample.len() as f64 / total as f64).ceil() as usize + 8;
    while rank < sample.len() {
        let found = collect_above(sample[rank]);
        if found.len() >= n {
            return found;
        }
        rank *= 4;
    }
    collect_above(f32::NEG_INFINITY)
}

struct MaskedRelu {
    mask: Arc<Vec<bool>>,
}

impl CustomOp1 for MaskedRelu {
    fn name(&self) -> &'static str {
        "sae-masked-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(self.name(), s, l)?;
        let out: Vec<f32> = x
            .par_iter()
            .zip(self.mask.par_iter())
            .map(|(&v, &keep)| if keep && v > 0.0 { v } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let out = with_cpu_slice(res, |r| {
            with_cpu_slice(grad, |g| {
                r.par_iter()
                    .zip(g.par_iter())
                    .map(|(&y, &dg)| if y != 0.0 { dg } else { 0.0 })
                    .collect::<Vec<f32>>()
            })
        })??;
        Ok(Some(cpu_tensor(out, res.shape().clone())?))
    }
}

/// ReLU of the entries the mask keeps, zero elsewhere; gradient = the kept (positive) mask.
pub fn masked_relu(pre: &Tensor, mask: Vec<bool>) -> CResult<Tensor> {
    if pre.device().is_cpu() && pre.dtype() == DType::F32 {
        pre.contiguous()?.apply_op1(MaskedRelu { mask: Arc::new(mask) })
    } else {
        let m: Vec<f32> = mask.iter().map(|&k| k as u8 as f32).collect();
        let m = Tensor::from_vec(m, pre.shape(), pre.device())?.to_dtype(pre.dtype())?;
        pre.relu()?.mul(&m)
    }
}

/// TopK / BatchTopK latents: the selected entries of `pre` (ReLU'd), zeros elsewhere.
/// Returns the latents and the smallest selected value (BatchTopK's threshold estimate).
pub fn topk_latents(
    pre: &Tensor,
    how: &Selection,
    allowed: Option<&[bool]>,
) -> CResult<(Tensor, Option<f32>)> {
    let (_, cols) = pre.dims2()?;
    let host = pre.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (mask, min) = with_cpu_slice(&host, |v| select_mask(v, cols, how, allowed, true))?;
    Ok((masked_relu(pre, mask)?, min))
}
