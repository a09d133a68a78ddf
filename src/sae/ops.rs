//! Custom candle ops that keep SAE training sparse on the CPU.
//!
//! Dense autograd would spend four (B × M × D) GEMMs per step on TopK latents that are 99 % zeros.
//! These ops compute the same values and the same gradients *where they matter*: the gradient
//! w.r.t. a sparse input is exact on its support and reported as 0 elsewhere. Every caller feeds
//! outputs of ReLU / TopK / JumpReLU, whose zeros pass no gradient upstream, so the chain rule
//! result is unchanged (tests compare against the dense graph).
//!
//! Each public function dispatches: the custom op on the CPU, plain candle ops elsewhere (CUDA,
//! Metal), so models are written once and run on every device.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use crate::sparse::{self, SparseBatch};

type CResult<T> = candle_core::Result<T>;

/// Above this share of non-zeros the dense GEMM is faster than the sparse kernels.
const SPARSE_LIMIT: f64 = 0.1;

fn contiguous<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// Runs `f` on the f32 data of a CPU tensor without copying (when already contiguous).
fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous("tensor", cpu, layout)?)),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

fn cpu_tensor(data: Vec<f32>, shape: impl Into<Shape>) -> CResult<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn dims2(l: &Layout) -> CResult<(usize, usize)> {
    l.shape().dims2()
}

// ---------------------------------------------------------------------------------------------
// Encoder: pre = xc · Wᵀ + b, with a backward that exploits a sparse upstream gradient.

struct EncoderLinear;

impl CustomOp3 for EncoderLinear {
    fn name(&self) -> &'static str {
        "sae-encoder-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, d) = dims2(l1)?;
        let (m, d2) = dims2(l2)?;
        if d != d2 || l3.shape().elem_count() != m {
            candle_core::bail!(
                "encoder shapes disagree: x {b}×{d}, W {m}×{d2}, b {:?}",
                l3.shape()
            );
        }
        let (x, w, bias) = (
            contiguous(self.name(), s1, l1)?,
            contiguous(self.name(), s2, l2)?,
            contiguous(self.name(), s3, l3)?,
        );
        let mut out = sparse::gemm_f32(b, m, d, x, d, 1, w, 1, d);
        out.par_chunks_mut(m).for_each(|row| row.iter_mut().zip(bias).for_each(|(o, &c)| *o += c));
        Ok((CpuStorage::F32(out), Shape::from((b, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, d) = x.dims2()?;
        let m = w.dim(0)?;
        let grad = grad.contiguous()?;
        let (dx, dw, db) = with_cpu_slice(&grad, |g| {
            with_cpu_slice(x, |xs| {
                with_cpu_slice(w, |ws| {
                    if sparse::density(g) <= SPARSE_LIMIT {
                        let csr = SparseBatch::from_dense(g, m);
                        let dx = sparse::csr_matmul(csr.as_rows(), ws, d);
                        let dw = sparse::csr_transpose_matmul(csr.as_rows(), xs, d, m);
                        let db = sparse::csr_column_sums(csr.as_rows(), m);
                        (dx, dw, db)
                    } else {
                        let dx = sparse::gemm_f32(b, d, m, g, m, 1, ws, d, 1);
                        let dw = sparse::gemm_f32(m, d, b, g, 1, m, xs, d, 1);
                        let mut db = vec![0f32; m];
                        for row in g.chunks_exact(m) {
                            db.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                        }
                        (dx, dw, db)
                    }
                })
            })
        })???;
        Ok((Some(cpu_tensor(dx, (b, d))?), Some(cpu_tensor(dw, (m, d))?), Some(cpu_tensor(db, m)?)))
    }
}

/// (B, D) · (M, D)ᵀ + (M,) → (B, M).
pub fn encoder_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, EncoderLinear)
    } else {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder: (B, M) sparse latents · (M, D) dictionary.

struct SupportMatmul {
    /// Zero entries that still need their gradient (see `Activation::grad_support`).
    grad_support: Option<Arc<Vec<bool>>>,
    /// CSR of the latents, kept from the forward pass for the backward pass.
    cached: Arc<Mutex<Option<SparseBatch>>>,
    /// λ·MonoLoss of the same latents, computed on the same CSR; its gradient is added to the
    /// latents' gradient in the backward pass (saving a dense gradient and its accumulation).
    mono: Option<MonoInjection>,
}

struct MonoInjection {
    /// Host copy of the (B, D) similarity embeddings.
    similarity: Vec<f32>,
    lambda: f32,
    eps: f32,
    /// (loss, stats) of the forward pass, for the caller.
    result: Arc<Mutex<Option<(f32, MonoLossStats)>>>,
    saved: Mutex<Option<MonoLossSaved>>,
}

impl CustomOp2 for SupportMatmul {
    fn name(&self) -> &'static str {
        "sae-support-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, m) = dims2(l1)?;
        let (m2, d) = dims2(l2)?;
        if m != m2 {
            candle_core::bail!("decoder shapes disagree: latents {b}×{m}, W {m2}×{d}");
        }
        let (lat, w) = (contiguous(self.name(), s1, l1)?, contiguous(self.name(), s2, l2)?);
        let out = if self.mono.is_some() || sparse::density(lat) <= SPARSE_LIMIT {
            let csr = SparseBatch::from_dense_with(
                lat,
                m,
                self.grad_support.as_deref().map(|v| v.as_slice()),
            );
            let out = sparse::csr_matmul(csr.as_rows(), w, d);
            if let Some(mono) = &self.mono {
                let sim_dim = mono.similarity.len() / b;
                let (saved, loss, stats) =
                    mono_forward(&csr, b, m, &mono.similarity, sim_dim, mono.eps);
                *mono.result.lock().unwrap() = Some((loss, stats));
                *mono.saved.lock().unwrap() = Some(saved);
            }
            *self.cached.lock().unwrap() = Some(csr);
            out
        } else {
            *self.cached.lock().unwrap() = None;
            sparse::gemm_f32(b, d, m, lat, m, 1, w, d, 1)
        };
        Ok((CpuStorage::F32(out), Shape::from((b, d))))
    }

    fn bwd(
        &self,
        lat: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (b, m) = lat.dims2()?;
        let d = w.dim(1)?;
        let cached = self.cached.lock().unwrap().take();
        let (dlat, dw) = with_cpu_slice(grad, |g| {
            with_cpu_slice(w, |ws| match &cached {
                Some(csr) => {
                    let saved = self
                        .mono
                        .as_ref()
                        .map(|mono| mono.saved.lock().unwrap().take().expect("mono forward ran"));
                    let own_cols;
                    let cols = match &saved {
                        Some(s) => &s.cols,
                        None => {
                            own_cols = sparse::to_columns(csr.as_rows(), m);
                            &own_cols
                        }
                    };
                    let (dw, mut dots) = sparse::decoder_backward(cols, g, ws, d);
                    if let (Some(mono), Some(saved)) = (&self.mono, &saved) {
                        let extra = mono_backward(saved, b, mono.lambda, mono.eps);
                        dots.iter_mut().zip(extra).for_each(|(v, e)| *v += e);
                    }
                    let vals = sparse::to_row_order(cols, &dots);
                    Ok::<_, candle_core::Error>((csr.with_values(vals).to_dense(m), dw))
                }
                None => with_cpu_slice(lat, |ls| {
                    let dlat = sparse::gemm_f32(b, m, d, g, d, 1, ws, 1, d);
                    let dw = sparse::gemm_f32(m, d, b, ls, 1, m, g, d, 1);
                    (dlat, dw)
                }),
            })
        })???;
        Ok((Some(cpu_tensor(dlat, (b, m))?), Some(cpu_tensor(dw, (m, d))?)))
    }
}

/// (B, M) · (M, D) → (B, D); sparse on the CPU when the latents are. The latents' gradient is
/// exact on their non-zeros and on `grad_support`, and 0 on the other zeros.
pub fn support_matmul(
    latents: &Tensor,
    w: &Tensor,
    grad_support: Option<&[bool]>,
) -> CResult<Tensor> {
    if latents.device().is_cpu() && latents.dtype() == DType::F32 {
        let op = SupportMatmul {
            grad_support: grad_support.map(|g| Arc::new(g.to_vec())),
            cached: Arc::new(Mutex::new(None)),
            mono: None,
        };
        latents.contiguous()?.apply_op2(&w.contiguous()?, op)
    } else {
        latents.matmul(w)
    }
}

/// The MonoLoss to compute with a decoder pass.
#[derive(Clone, Copy)]
pub struct MonoTerm<'a> {
    /// (B, D') similarity embeddings of the batch.
    pub similarity: &'a Tensor,
    pub lambda: f64,
    pub eps: f64,
}

/// A decoder pass and, when asked for, the batch MonoLoss of the same latents.
pub struct Decoded {
    /// (B, D) latents · W.
    pub output: Tensor,
    /// The MonoLoss (scalar) and its statistics. Add λ·loss to the objective: on the CPU with
    /// sparse latents the loss is a constant and the decoder's backward already adds its
    /// gradient (times λ); elsewhere it is an ordinary graph node.
    pub mono: Option<(Tensor, MonoLossStats)>,
}

/// `support_matmul` with an optional MonoLoss on the same latents, fused on the CPU.
pub fn decode(
    latents: &Tensor,
    w: &Tensor,
    grad_support: Option<&[bool]>,
    mono: Option<MonoTerm>,
) -> CResult<Decoded> {
    let Some(term) = mono else {
        return Ok(Decoded { output: support_matmul(latents, w, grad_support)?, mono: None });
    };
    let fused = latents.device().is_cpu()
        && latents.dtype() == DType::F32
        && with_cpu_slice(latents, |l| sparse::density(l) <= SPARSE_LIMIT)?;
    if !fused {
        let output = support_matmul(latents, w, grad_support)?;
        let mono = batch_mono_loss(latents, term.similarity, term.eps, grad_support)?;
        return Ok(Decoded { output, mono: Some(mono) });
    }
    let similarity =
        term.similarity.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let result = Arc::new(Mutex::new(None));
    let op = SupportMatmul {
        grad_support: grad_support.map(|g| Arc::new(g.to_vec())),
        cached: Arc::new(Mutex::new(None)),
        mono: Some(MonoInjection {
            similarity,
            lambda: term.lambda as f32,
            eps: term.eps as f32,
            result: result.clone(),
            saved: Mutex::new(None),
        }),
    };
    let output = latents.contiguous()?.apply_op2(&w.contiguous()?, op)?;
    let (loss, stats) =
        result.lock().unwrap().take().expect("decoder forward computed the MonoLoss");
    Ok(Decoded { output, mono: Some((Tensor::new(loss, &Device::Cpu)?, stats)) })
}

// ---------------------------------------------------------------------------------------------
// TopK selection without sorting rows.

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

// ---------------------------------------------------------------------------------------------
// Batch MonoLoss on sparse latents.

/// What the last forward pass of the sparse MonoLoss saw (for logging).
#[derive(Clone, Copy, Debug, Default)]
pub struct MonoLossStats {
    pub n_active: usize,
    pub mean_score: f64,
}

/// Per-neuron scalars of the batch MonoScore, kept for the backward pass.
#[derive(Clone, Copy, Default)]
struct NeuronBatchStats {
    min: f32,
    max: f32,
    range: f32,
    u: f32,
    v: f32,
    num: f32,
    den: f32,
    active: bool,
}

/// What the MonoLoss forward pass keeps for the backward pass.
struct MonoLossSaved {
    cols: sparse::SparseColumns,
    /// Unit similarity rows (B × D) and their sum.
    unit: Vec<f32>,
    unit_sum: Vec<f32>,
    /// w_k = Σ_i ã_ik p_i, neuron-major (M × D).
    w: Vec<f32>,
    neurons: Vec<NeuronBatchStats>,
}

/// Unit rows of the (B, D) similarity embeddings, and their sum.
fn unit_rows(sim: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut unit = sim.to_vec();
    unit.par_chunks_mut(d).for_each(|row| {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    });
    let mut total = vec![0f32; d];
    for row in unit.chunks_exact(d) {
        total.iter_mut().zip(row).for_each(|(t, x)| *t += x);
    }
    (unit, total)
}

/// The batch MonoLoss of CSR latents (B × M; absent entries are zeros) judged by `sim` (B × D):
/// the state for the backward pass, the loss and its statistics.
fn mono_forward(
    csr: &SparseBatch,
    b: usize,
    m: usize,
    sim: &[f32],
    d: usize,
    eps: f32,
) -> (MonoLossSaved, f32, MonoLossStats) {
    let (unit, unit_sum) = unit_rows(sim, d);
    let cols = sparse::to_columns(csr.as_rows(), m);
    // Column order: each neuron's w_k (a D-row) stays in cache while its rows are gathered.
    let mut w = vec![0f32; m * d];
    let mut neurons = vec![NeuronBatchStats::default(); m];
    w.par_chunks_mut(d).zip(neurons.par_iter_mut()).enumerate().with_min_len(16).for_each(
        |(k, (w, n))| {
            let span = cols.col_offsets[k]..cols.col_offsets[k + 1];
            let (rows, vals) = (&cols.rows[span.clone()], &cols.values[span]);
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
            for (&r, &l) in rows.iter().zip(vals) {
                let a = (l - min) / range;
                u += a;
                v += a * a;
                // Explicit entries carry (a − zero_scaled); every row's zero_scaled share is added below.
                let p = &unit[r as usize * d..(r as usize + 1) * d];
                let coef = a - zero_scaled;
                w.iter_mut().zip(p).for_each(|(wi, &pi)| *wi += coef * pi);
            }
            if zero_scaled != 0.0 {
                w.iter_mut().zip(&unit_sum).for_each(|(wi, &s)| *wi += zero_scaled * s);
            }
            let num = 0.5 * (sparse::dot(w, w) - v);
            let den = 0.5 * (u * u - v);
            *n = NeuronBatchStats { min, max, range, u, v, num, den, active: den > eps };
        },
    );
    let n_active = neurons.iter().filter(|n| n.active).count();
    let total: f64 =
        neurons.iter().filter(|n| n.active).map(|n| (n.num / (n.den + eps)) as f64).sum();
    let mean = if n_active > 0 { total / n_active as f64 } else { 0.0 };
    let loss = if n_active > 0 { 1.0 - mean } else { 1.0 };
    (
        MonoLossSaved { cols, unit, unit_sum, w, neurons },
        loss as f32,
        MonoLossStats { n_active, mean_score: mean },
    )
}

/// g_out · ∂loss/∂latents on the support, in CSC order (`saved.cols`).
fn mono_backward(saved: &MonoLossSaved, b: usize, g_out: f32, eps: f32) -> Vec<f32> {
    let MonoLossSaved { cols, unit, unit_sum, w, neurons } = saved;
    let n_active = neurons.iter().filter(|n| n.active).count();
    if n_active == 0 {
        return vec![0.0; cols.rows.len()];
    }
    let d = unit_sum.len();
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
            let wk = &w[k * d..(k + 1) * d];
            let den = n.den + eps;
            let dnum = g_score / den;
            let dden = -g_score * n.num / (den * den);
            let sum_g = dnum * (sparse::dot(unit_sum, wk) - n.u) + dden * (b as f32 * n.u - n.u);
            let sum_ga = dnum * (sparse::dot(wk, wk) - n.v) + dden * (n.u * n.u - n.v);
            Coef { dnum, dden, dmin: (sum_ga - sum_g) / n.range, dmax: -sum_ga / n.range }
        })
        .collect();
    // ∂L/∂l = ∂L/∂ã / range, plus the min/max terms on tied entries.
    let mut grads = sparse::csc_dots(cols, unit, w, d);
    for k in 0..neurons.len() {
        let (n, c) = (&neurons[k], &coefs[k]);
        for j in cols.col_offsets[k]..cols.col_offsets[k + 1] {
            if !n.active {
                grads[j] = 0.0;
                continue;
            }
            let l = cols.values[j];
            let a = (l - n.min) / n.range;
            let da = c.dnum * (grads[j] - a) + c.dden * (n.u - a);
            let mut g = da / n.range;
            if l == n.min {
                g += c.dmin;
            }
            if l == n.max {
                g += c.dmax;
            }
            grads[j] = g;
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
        let (saved, loss, stats) = mono_forward(&csr, b, m, sim, d, self.eps);
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
        let vals = sparse::to_row_order(&saved.cols, &mono_backward(&saved, b, g_out, self.eps));
        Ok((Some(cpu_tensor(csr.with_values(vals).to_dense(m), (b, m))?), None))
    }
}

/// Batch MonoLoss of (B, M) latents judged by (B, D) similarity embeddings. On the CPU with
/// sparse latents it runs in O(nnz·D) with gradients on the non-zeros and `grad_support`;
/// otherwise it is the dense candle graph. Returns the loss and the statistics of this batch.
pub fn batch_mono_loss(
    latents: &Tensor,
    similarity: &Tensor,
    eps: f64,
    grad_support: Option<&[bool]>,
) -> CResult<(Tensor, MonoLossStats)> {
    let sparse_cpu = latents.device().is_cpu()
        && latents.dtype() == DType::F32
        && with_cpu_slice(latents, |l| sparse::density(l) <= SPARSE_LIMIT)?;
    if sparse_cpu {
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
        Ok((loss, s))
    } else {
        let out = crate::monoscore::batch_mono_loss(similarity, latents, eps)?;
        let mean_score = out.mean_score()?;
        Ok((out.loss, MonoLossStats { n_active: out.n_active, mean_score }))
    }
}
