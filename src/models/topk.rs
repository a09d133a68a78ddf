//! TopK activations without sorting: the k largest positive entries of each row (TopK) or the n
//! largest of a whole batch (BatchTopK), and the masked ReLU that keeps them with the right
//! gradient.
//!
//! Host kernels select by `select_nth_unstable` (ties broken by position, so exactly k are kept).
//! The portable kernels find each row's threshold — the k-th largest value — by bisection with
//! candle ops only (compare, count, where), converging to adjacent floats, so they keep exactly
//! the entries ≥ that value: the same set, except that entries tied with the k-th value are all
//! kept. No sort, no host round trip, any width (the counts are u32: up to 2^32 entries).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::base::cpu::{contiguous, with_cpu_slice, CResult};
use crate::base::host::Kernels;
use crate::base::simd::vectorized;
use crate::base::sparse::SparseBatch;

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
    let (kept, min) = select_entries(values, cols, how, allowed, positive_only);
    let mut mask = vec![false; values.len()];
    kept.iter().for_each(|&i| mask[i as usize] = true);
    (mask, min)
}

/// `select_mask`'s kept entries as flat indices in increasing order, and the smallest kept value.
pub fn select_entries(
    values: &[f32],
    cols: usize,
    how: &Selection,
    allowed: Option<&[bool]>,
    positive_only: bool,
) -> (Vec<u32>, Option<f32>) {
    let eligible = |c: usize, v: f32| {
        allowed.is_none_or(|a| a[c]) && (!positive_only || v > 0.0) && !v.is_nan()
    };
    // Order: larger value first, then lower flat index.
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let smallest = |kept: &[(f32, u32)]| kept.iter().map(|e| e.0).reduce(f32::min);
    match *how {
        Selection::PerRow(k) => {
            let rows: Vec<(Vec<u32>, Option<f32>)> = values
                .par_chunks(cols.max(1))
                .enumerate()
                .map_init(Vec::new, |scratch: &mut Vec<(f32, u32)>, (r, vrow)| {
                    scratch.clear();
                    scratch.extend(
                        vrow.iter()
                            .enumerate()
                            .filter(|(c, v)| eligible(*c, **v))
                            .map(|(c, &v)| (v, (r * cols + c) as u32)),
                    );
                    if scratch.len() > k && k > 0 {
                        scratch.select_nth_unstable_by(k - 1, better);
                        scratch.truncate(k);
                    } else if k == 0 {
                        scratch.clear();
                    }
                    let mut kept: Vec<u32> = scratch.iter().map(|e| e.1).collect();
                    kept.sort_unstable();
                    (kept, smallest(scratch))
                })
                .collect();
            let min = rows.iter().filter_map(|r| r.1).reduce(f32::min);
            (rows.into_iter().flat_map(|r| r.0).collect(), min)
        }
        Selection::Batch(n) => best_of_candidates(batch_candidates(values, cols, n, &eligible), n),
    }
}

/// The `n` largest of `candidates` (value, flat index), ties to the lower index, as flat
/// indices in increasing order, and the smallest kept value: a batch selection when the
/// candidates, in flat-index order, hold every eligible entry that can be among the n largest.
pub fn best_of_candidates(candidates: Vec<(f32, u32)>, n: usize) -> (Vec<u32>, Option<f32>) {
    // Order: larger value first, then lower flat index.
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    // The n best are those no worse than the n-th, found by a selection on a copy, and a
    // filter keeps them in index order.
    let kept: Vec<(f32, u32)> = if candidates.len() > n && n > 0 {
        let mut order = candidates.clone();
        let (_, nth, _) = order.select_nth_unstable_by(n - 1, better);
        let nth = *nth;
        candidates.into_iter().filter(|e| better(e, &nth).is_le()).collect()
    } else if n == 0 {
        Vec::new()
    } else {
        candidates
    };
    debug_assert!(kept.windows(2).all(|w| w[0].1 < w[1].1), "kept out of index order");
    (kept.iter().map(|e| e.1).collect(), kept.iter().map(|e| e.0).reduce(f32::min))
}

/// The eligible entries that can be among the batch's `n` largest, in flat-index order (which
/// `select_entries` keeps): a sampled lower bound on the n-th largest value keeps the candidate
/// set near 2n instead of the whole batch.
fn batch_candidates(
    values: &[f32],
    cols: usize,
    n: usize,
    eligible: &(dyn Fn(usize, f32) -> bool + Sync),
) -> Vec<(f32, u32)> {
    let total = values.len();
    // Blocks of 16 with nothing ≥ t (nearly all of them) are skipped after one vector test.
    let collect_above = |t: f32| -> Vec<(f32, u32)> {
        let per_row: Vec<Vec<(f32, u32)>> = values
            .par_chunks(cols)
            .enumerate()
            .map(|(r, row)| {
                let mut found = Vec::new();
                vectorized!(for (b, block) in row.chunks(16).enumerate() {
                    if !block.iter().fold(false, |any, &v| any | (v >= t)) {
                        continue;
                    }
                    for (j, &v) in block.iter().enumerate() {
                        let c = b * 16 + j;
                        if v >= t && eligible(c, v) {
                            found.push((v, (r * cols + c) as u32));
                        }
                    }
                });
                found
            })
            .collect();
        per_row.concat()
    };
    // A stride coprime to the row length, so the sample visits every column (a stride of 256
    // over rows of 8,192 visited 32 latents).
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut stride = (total / 65536).max(1);
    while gcd(stride, cols) != 1 {
        stride += 1;
    }
    let taken = total.div_ceil(stride);
    let mut sample: Vec<f32> = (0..taken)
        .into_par_iter()
        .map(|j| j * stride)
        .filter(|&i| eligible(i % cols, values[i]))
        .map(|i| values[i])
        .collect();
    sample.par_sort_unstable_by(|a, b| b.total_cmp(a));
    // Expected rank of the n-th largest within the sample, with a margin of a quarter and 32
    // (≈ 5 standard deviations of the sampled count at n = 131,072 of 16.8 M), then widening.
    // The sample is one entry in `stride` of all of them, eligible or not: scaling by the
    // eligible ones instead (fewer) aimed below n, and one step in three scanned twice.
    let mut rank = (1.25 * n as f64 * taken as f64 / total as f64).ceil() as usize + 32;
    while rank < sample.len() {
        let found = collect_above(sample[rank]);
        if found.len() >= n {
            return found;
        }
        rank *= 4;
    }
    collect_above(f32::NEG_INFINITY)
}

/// The entries a masked ReLU keeps (where they are also positive).
enum Keep {
    Mask(Vec<bool>),
    Above(f32),
    /// Flat indices in increasing order (a selection's few entries): the output is written as
    /// zeros and these, without reading the rest of the input.
    Entries(Vec<u32>),
}

struct MaskedRelu {
    keep: Keep,
    /// The output's non-zeros as CSR rows, built in the forward pass, for the caller.
    csr: Arc<Mutex<Option<SparseBatch>>>,
}

impl CustomOp1 for MaskedRelu {
    fn name(&self) -> &'static str {
        "sae-masked-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(self.name(), s, l)?;
        let cols = l.shape().dims().last().copied().unwrap_or(1);
        let (out, csr) = match &self.keep {
            Keep::Mask(mask) => {
                if x.len() != mask.len() {
                    candle_core::bail!(
                        "{}: {} values, {} mask entries",
                        self.name(),
                        x.len(),
                        mask.len()
                    );
                }
                SparseBatch::map2_with_csr(x, mask, cols, relu_where)
            }
            // The values stand in for the mask operand (same memory: no extra traffic).
            &Keep::Above(t) => SparseBatch::map2_with_csr(x, x, cols, |v, _| relu_where(v, v > t)),
            Keep::Entries(kept) => {
                if kept.last().is_some_and(|&i| i as usize >= x.len()) {
                    candle_core::bail!("{}: an entry beyond {} values", self.name(), x.len());
                }
                scatter_with_csr(x, kept, cols, |v| relu_where(v, true))
            }
        };
        *self.csr.lock().unwrap() = Some(csr);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// The gradient where the latent is kept (> 0; kept latents are positive).
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(super::fused::relu_backward(grad, res)?))
    }
}

/// f(x[i]) at the flat indices `kept` (increasing), zeros elsewhere, and the non-zeros as CSR
/// rows: the output zeroed in parallel blocks, then the few entries written.
fn scatter_with_csr(
    x: &[f32],
    kept: &[u32],
    cols: usize,
    f: impl Fn(f32) -> f32 + Sync,
) -> (Vec<f32>, SparseBatch) {
    let csr = entries_csr(x, kept, cols, f);
    let mut dense = crate::base::cpu::par_filled(x.len(), 1 << 16, |_, part| part.fill(0.0));
    for r in 0..csr.row_offsets.len() - 1 {
        let entries = csr.row_offsets[r]..csr.row_offsets[r + 1];
        for (&c, &v) in csr.columns[entries.clone()].iter().zip(&csr.values[entries]) {
            dense[r * cols + c as usize] = v;
        }
    }
    (dense, csr)
}

/// The non-zeros of f(x[i]) at the flat indices `kept` (increasing) as CSR rows of `cols`. The
/// reads of x, scattered over the whole batch, run in parallel; the rows are laid out after.
fn entries_csr(x: &[f32], kept: &[u32], cols: usize, f: impl Fn(f32) -> f32 + Sync) -> SparseBatch {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let mapped: Vec<f32> = kept.par_iter().with_min_len(4096).map(|&i| f(x[i as usize])).collect();
    let mut row_offsets = Vec::with_capacity(rows + 1);
    let (mut columns, mut values) =
        (Vec::with_capacity(kept.len()), Vec::with_capacity(kept.len()));
    row_offsets.push(0);
    for (&i, &value) in kept.iter().zip(&mapped) {
        if value == 0.0 {
            continue;
        }
        let i = i as usize;
        while row_offsets.len() <= i / cols {
            row_offsets.push(columns.len());
        }
        columns.push((i % cols) as u32);
        values.push(value);
    }
    row_offsets.resize(rows + 1, columns.len());
    SparseBatch { row_offsets, columns, values }
}

/// The masked ReLU of one value: `v` where kept and positive, else 0.
fn relu_where(v: f32, keep: bool) -> f32 {
    if keep && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// A selection mask: host booleans for the host kernel, a 0/1 tensor like `pre` otherwise.
pub enum Mask {
    Host(Vec<bool>),
    Device(Tensor),
}

/// (B, M) latents, as a tensor built on first use. A host TopK / BatchTopK selection holds its
/// kept entries and builds the tensor (the masked ReLU of `pre`, a node of its graph) only when
/// something reads it: a training step that decodes through the selection's CSR and the port of
/// `pre` never does, and so never zero-fills (B × M) floats.
pub struct Latents {
    dims: (usize, usize),
    tensor: OnceLock<Tensor>,
    /// `pre` and the flat indices kept of it (increasing), while the tensor is not built.
    entries: Option<(Arc<dyn PreActivations>, Vec<u32>)>,
}

/// The pre-activations a selection was made of, as a tensor built when first asked for (the
/// SAE encoder's output may not exist until then).
pub trait PreActivations: Send + Sync {
    fn pre_tensor(&self) -> CResult<Tensor>;
}

impl PreActivations for Tensor {
    fn pre_tensor(&self) -> CResult<Tensor> {
        Ok(self.clone())
    }
}

impl Latents {
    /// (B, M).
    pub fn dims(&self) -> (usize, usize) {
        self.dims
    }

    /// Latents of the entries `kept` (flat indices, increasing) of `pre` (dims (B, M)), built as
    /// a tensor only when read.
    pub fn of_entries(pre: Arc<dyn PreActivations>, dims: (usize, usize), kept: Vec<u32>) -> Self {
        Self { dims, tensor: OnceLock::new(), entries: Some((pre, kept)) }
    }

    /// The tensor when it is built.
    pub fn built(&self) -> Option<&Tensor> {
        self.tensor.get()
    }

    /// The latents as a (B, M) tensor (built on the first call).
    pub fn tensor(&self) -> CResult<&Tensor> {
        if let Some(t) = self.tensor.get() {
            return Ok(t);
        }
        let (pre, kept) = self.entries.as_ref().expect("latents without entries are built");
        let (built, _) = apply_masked_relu(&pre.pre_tensor()?, Keep::Entries(kept.clone()))?;
        Ok(self.tensor.get_or_init(|| built))
    }
}

impl From<Tensor> for Latents {
    fn from(t: Tensor) -> Self {
        let dims = t.dims2().unwrap_or((t.elem_count(), 1));
        Self { dims, tensor: OnceLock::from(t), entries: None }
    }
}

/// Latents of a selection.
pub struct Selected {
    /// (B, M): the kept positive entries, zeros elsewhere.
    pub latents: Latents,
    /// Host kernels: the latents' non-zeros as CSR rows, built in the same pass (so the sparse
    /// decoder need not read the latents back to find them).
    pub csr: Option<SparseBatch>,
    /// The smallest selected value as a scalar tensor (BatchTopK's threshold estimate; None
    /// when nothing was selected — host kernels only; the portable value is then +∞). Only
    /// `topk_latents` sets it.
    pub min: Option<Tensor>,
}

fn host_masked_relu(pre: &Tensor, keep: Keep) -> CResult<Selected> {
    let (latents, csr) = apply_masked_relu(pre, keep)?;
    Ok(Selected { latents: latents.into(), csr, min: None })
}

/// The host masked ReLU op on `pre`, and the CSR of its output.
fn apply_masked_relu(pre: &Tensor, keep: Keep) -> CResult<(Tensor, Option<SparseBatch>)> {
    let csr = Arc::new(Mutex::new(None));
    let latents = pre.contiguous()?.apply_op1(MaskedRelu { keep, csr: csr.clone() })?;
    let csr = csr.lock().unwrap().take();
    Ok((latents, csr))
}

/// ReLU of the entries the mask keeps, zero elsewhere; gradient = the kept (positive) mask.
pub fn masked_relu(pre: &Tensor, mask: Mask) -> CResult<Selected> {
    match mask {
        Mask::Host(mask) => host_masked_relu(pre, Keep::Mask(mask)),
        Mask::Device(mask) => {
            let latents = pre.relu()?.mul(&mask.to_dtype(pre.dtype())?)?;
            Ok(Selected { latents: latents.into(), csr: None, min: None })
        }
    }
}

/// `masked_relu` of the entries above `threshold`, in one pass without a mask (host kernels;
/// the portable kernels build the mask with `broadcast_gt`).
pub fn relu_above(pre: &Tensor, threshold: f32) -> CResult<Selected> {
    host_masked_relu(pre, Keep::Above(threshold))
}

/// TopK / BatchTopK latents: the selected positive entries of `pre` (B, M), zeros elsewhere,
/// with the smallest selected value. `allowed`: an (M,) 0/1 tensor of the columns that may be
/// selected (AuxK: dead latents).
pub fn topk_latents(
    pre: &Tensor,
    how: &Selection,
    allowed: Option<&Tensor>,
    kernels: Kernels,
) -> CResult<Selected> {
    if kernels.for_tensor(pre).is_host() {
        let (_, cols) = pre.dims2()?;
        let allowed: Option<Vec<bool>> = allowed
            .map(|a| {
                let a = a.to_dtype(DType::F32)?;
                with_cpu_slice(&a, |v| v.iter().map(|&x| x != 0.0).collect())
            })
            .transpose()?;
        let pre = pre.contiguous()?;
        let (csr, kept, min) = with_cpu_slice(&pre, |v| {
            let (kept, min) = select_entries(v, cols, how, allowed.as_deref(), true);
            // The masked ReLU's CSR, as its forward pass would build it.
            (entries_csr(v, &kept, cols, |v| relu_where(v, true)), kept, min)
        })?;
        let min = min.map(|m| Tensor::new(m, pre.device())).transpose()?;
        let dims = pre.dims2()?;
        let latents = Latents::of_entries(Arc::new(pre), dims, kept);
        return Ok(Selected { latents, csr: Some(csr), min });
    }
    let (mask, threshold) = portable_select(&pre.detach(), how, allowed)?;
    Ok(Selected { min: Some(threshold), ..masked_relu(pre, Mask::Device(mask))? })
}

/// Bisection steps of the portable selection: enough to reach adjacent f32 values from any
/// starting range (about 8 geometric steps to a ratio of 4, then 25 halvings to one ulp).
const BISECTION_STEPS: usize = 40;

/// The portable selection: a 0/1 mask like `values` and the threshold (the smallest selected
/// value; a scalar for `Batch`, (B, 1) for `PerRow`).
fn portable_select(
    values: &Tensor,
    how: &Selection,
    allowed: Option<&Tensor>,
) -> CResult<(Tensor, Tensor)> {
    let (rows, cols) = values.dims2()?;
    let values = values.to_dtype(DType::F32)?;
    let zeros = values.zeros_like()?;
    // Eligible: positive and in an allowed column; the others become -∞ (never ≥ a threshold).
    let mut eligible = values.gt(&zeros)?;
    if let Some(allowed) = allowed {
        let allowed =
            allowed.to_dtype(DType::U8)?.reshape((1, cols))?.broadcast_as((rows, cols))?;
        eligible = allowed.where_cond(&eligible, &eligible.zeros_like()?)?;
    }
    let (grouped, k) = match *how {
        Selection::PerRow(k) => ((rows, cols), k),
        Selection::Batch(n) => ((1, rows * cols), n),
    };
    let eligible = eligible.reshape(grouped)?;
    let values = values.reshape(grouped)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, grouped, values.device())?;
    let pos_inf = Tensor::full(f32::INFINITY, grouped, values.device())?;
    let candidates = eligible.where_cond(&values, &neg_inf)?;
    let lowest = eligible.where_cond(&values, &pos_inf)?.min_keepdim(1)?;
    let count = |t: &Tensor| -> CResult<Tensor> {
        candidates.broadcast_ge(t)?.to_dtype(DType::U32)?.sum_keepdim(1)
    };
    let need = Tensor::full(k.max(1) as u32, (grouped.0, 1), values.device())?;
    // Invariant: at least k entries ≥ lo, fewer than k entries ≥ hi.
    let mut lo = lowest.clone();
    let mut hi = (candidates.max_keepdim(1)? * 2.0)?;
    for _ in 0..BISECTION_STEPS {
        let far = hi.gt(&(&lo * 4.0)?)?;
        let geometric = (lo.sqrt()? * hi.sqrt()?)?;
        let halfway = (&lo + ((&hi - &lo)? * 0.5)?)?;
        let mid = far.where_cond(&geometric, &halfway)?;
        let take = count(&mid)?.ge(&need)?;
        lo = take.where_cond(&mid, &lo)?;
        hi = take.where_cond(&hi, &mid)?;
    }
    // With at most k eligible entries, all of them are selected.
    let few = eligible.to_dtype(DType::U32)?.sum_keepdim(1)?.le(&need)?;
    let mut threshold = few.where_cond(&lowest, &lo)?;
    if k == 0 {
        threshold = threshold.ones_like()?.affine(0.0, f64::INFINITY)?;
    }
    let mask = candidates.broadcast_ge(&threshold)?.reshape((rows, cols))?;
    let threshold = match how {
        Selection::Batch(_) => threshold.reshape(())?,
        Selection::PerRow(_) => threshold,
    };
    Ok((mask, threshold))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scattered output and its CSR equal the masked map over the whole input for the same
    /// entries: empty first, middle and last rows, and a kept entry that is not positive
    /// (dropped from both).
    #[test]
    fn scattering_the_kept_entries_equals_the_masked_map() {
        let (rows, cols) = (6, 7);
        let x: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let kept: Vec<u32> = vec![8, 9, 12, 22, 23, 24, 34];
        assert!(x[kept[1] as usize] <= 0.0 || x[kept[3] as usize] <= 0.0, "a non-positive one");
        let mut mask = vec![false; x.len()];
        kept.iter().for_each(|&i| mask[i as usize] = true);
        let want = SparseBatch::map2_with_csr(&x, &mask, cols, relu_where);
        let got = scatter_with_csr(&x, &kept, cols, |v| relu_where(v, true));
        assert_eq!(got.0, want.0);
        assert_eq!(got.1, want.1);
    }

    /// The AMX screen's batch candidates select what the dense selection does, bit for bit:
    /// spread values, latents duplicated (exact ties across columns, broken by index), few
    /// positive entries (all kept), and cuts the sample guesses too high (the sampled blocks of
    /// rows are the only large ones).
    #[test]
    fn screened_batch_selection_equals_the_dense_one() {
        use crate::base::gemm::{gemm_f32_plus_row, Strided};
        use crate::base::screen::{self, Prepared};
        use crate::base::sparse::KeptBlock;
        let (rows, n, k) = (600, 300, 96);
        let val = |i: usize, s: f32| ((i as f32 * 0.7 + s).sin() * 43758.547).fract() - 0.5;
        let x: Vec<f32> = (0..rows * k)
            .map(|i| val(i, 0.3) * if (i / k / 32) % 16 == 0 { 1.0 } else { 0.05 })
            .collect();
        let mut w: Vec<f32> = (0..n * k).map(|i| val(i, 1.9)).collect();
        w.copy_within(5 * k..6 * k, 17 * k); // latent 17 = latent 5
        w.copy_within(5 * k..6 * k, 250 * k);
        for (name, shift) in [("spread", 0.0), ("few positive", -1.6)] {
            let mut bias: Vec<f32> = (0..n).map(|j| val(j, 4.1) * 0.2 + shift).collect();
            (bias[17], bias[250]) = (bias[5], bias[5]);
            let Some(prepared) = Prepared::new(&w, k) else {
                eprintln!("skipped: no AMX bf16 on this machine");
                return;
            };
            let (a, b) = (Strided { data: &x, rs: k, cs: 1 }, Strided { data: &w, rs: 1, cs: k });
            let dense = gemm_f32_plus_row(rows, n, k, a, b, &bias);
            let positive = dense.iter().filter(|&&v| v > 0.0).count();
            for take in [1, 64, 640, 6400, positive + 10] {
                let want = select_entries(&dense, n, &Selection::Batch(take), None, true);
                let blocks = screen::batch_candidates(&x, &w, &prepared, &bias, take).unwrap();
                let candidates = KeptBlock::merge(&blocks, rows).flat_entries(n);
                for &(v, i) in &candidates {
                    assert_eq!(v.to_bits(), dense[i as usize].to_bits(), "{name}: value at {i}");
                }
                let got = best_of_candidates(candidates, take);
                assert_eq!(got, want, "{name}, n = {take}");
            }
        }
        assert!(screen::WIDENED.load(std::sync::atomic::Ordering::Relaxed) > 0, "a guess too high");
    }

    /// A batch selection over more entries than its sample takes equals a full sort (larger
    /// first, then lower index), whatever the sample sees: spread values, values large only in
    /// a few columns, ties, and too few positive entries (the widening and the full scan).
    #[test]
    fn a_sampled_batch_selection_equals_a_full_sort() {
        let brute = |values: &[f32], n: usize| -> (Vec<u32>, Option<f32>) {
            let mut order: Vec<u32> =
                (0..values.len() as u32).filter(|&i| values[i as usize] > 0.0).collect();
            order.sort_by(|&a, &b| {
                values[b as usize].total_cmp(&values[a as usize]).then(a.cmp(&b))
            });
            order.truncate(n);
            let min = order.iter().map(|&i| values[i as usize]).reduce(f32::min);
            order.sort_unstable();
            (order, min)
        };
        let (rows, cols) = (144, 2048); // 294,912 entries: a stride of 4, made 5 (coprime)
        let hash = |i: usize| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32;
        let spread: Vec<f32> = (0..rows * cols).map(|i| (hash(i) / 8e6) - 0.5).collect();
        // Large values only in columns 3 and 7 (mod 1024), which a stride of 4 never samples:
        // then the estimate is far too low and only the widening finds them.
        let columns: Vec<f32> = (0..rows * cols)
            .map(|i| if matches!(i % 1024, 3 | 7) { 100.0 + hash(i) / 1e7 } else { hash(i) / 1e9 })
            .collect();
        let ties: Vec<f32> = (0..rows * cols).map(|i| (i % 3) as f32).collect();
        let few: Vec<f32> =
            (0..rows * cols).map(|i| if i % 5000 == 0 { 1.0 } else { -1.0 }).collect();
        for (name, values) in
            [("spread", &spread), ("columns", &columns), ("ties", &ties), ("few", &few)]
        {
            for n in [1, 64, 640, 5000, 40_000] {
                let got = select_entries(values, cols, &Selection::Batch(n), None, true);
                assert_eq!(got, brute(values, n), "{name}, n = {n}");
            }
        }
    }
}
