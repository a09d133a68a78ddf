//! LayerNorm and quick GELU as single CPU ops with closed-form backward passes, for the CLIP
//! tower's training step. Built from candle ops, a LayerNorm is nine graph nodes and quick GELU
//! three, each a pass over the activations forward and more backward (plus a zeroed gradient
//! buffer per node); these are one pass forward and one or two backward. Host kernels only: the
//! portable path (CUDA, Metal, `run.ops = "portable"`) keeps the composed ops of `layers`, and
//! tests hold the two equal in value and every gradient.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::base::cpu::{contiguous, cpu_tensor, with_cpu_slices, CResult};
use crate::base::gemm::{gemm_f32, gemm_f32_plus_row, Strided};
use crate::base::grad_sink::GradSink;
use crate::base::simd::{exp_in_range, lane_sum, vectorized};

/// Rows handled by one task when summing the weight and bias gradients: a fixed split, so the
/// sums do not depend on the thread count (resumed runs stay bit-identical).
const ROWS_PER_TASK: usize = 32;

/// LayerNorm over the last dimension of a contiguous f32 tensor with weight and bias (D,).
pub struct LayerNormOp {
    pub eps: f64,
    /// Per row (mean, 1/√(var + eps)), from the forward pass for the backward pass.
    stats: Arc<Mutex<Vec<(f32, f32)>>>,
    /// Where the weight and bias gradients go when they are variables (`GradSink::active`).
    sink: Option<GradSink>,
}

impl LayerNormOp {
    pub fn new(eps: f64) -> Self {
        Self { eps, stats: Default::default(), sink: GradSink::active() }
    }
}

/// Mean and 1/√(biased variance + eps) of one row, accumulated in f64 over vector lanes.
#[inline(always)]
fn row_stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = lane_sum(row, |v| v as f64) / n;
    let var = lane_sum(row, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let x = contiguous(self.name(), s1, l1)?;
        let (w, b) = (contiguous(self.name(), s2, l2)?, contiguous(self.name(), s3, l3)?);
        let d = w.len();
        if b.len() != d || l1.shape().dims().last() != Some(&d) {
            candle_core::bail!(
                "layer-norm of {:?} with weight {} and bias {}",
                l1.shape(),
                d,
                b.len()
            );
        }
        let (out, stats) = layer_norm_rows(x, w, b, self.eps);
        *self.stats.lock().unwrap() = stats;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().unwrap().clone();
        let grad = grad.contiguous()?;
        let (dx, dw, db) =
            with_cpu_slices([x, w, &grad], |[x, w, g]| layer_norm_backward(x, w, g, &stats))??;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            GradSink::route(self.sink.as_ref(), w, dw)?,
            GradSink::route(self.sink.as_ref(), b, db)?,
        ))
    }
}

/// LayerNorm of each `w.len()`-wide row of `x`, and each row's (mean, 1/√(var + eps)).
pub(crate) fn layer_norm_rows(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<(f32, f32)>) {
    let d = w.len();
    crate::base::cpu::par_filled_with(x.len(), d, |r, y| {
        let row = &x[r * d..(r + 1) * d];
        vectorized!({
            let (mean, inv) = row_stats(row, eps);
            for (((o, &v), &wj), &bj) in y.iter_mut().zip(row).zip(w).zip(b) {
                *o = (v - mean) * inv * wj + bj;
            }
            (mean, inv)
        })
    })
}

/// (Σ g·w, Σ g·w·x̂) over one row, x̂ = (x − mean)·inv, in f64 over eight lanes: a single
/// running sum would keep the loop scalar. The f32 terms go through `terms` (2 × the row) first:
/// computed in place of their sums, LLVM assembled the f64 lanes one float at a time.
#[inline(always)]
fn weighted_grad_sums(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    (mean, inv): (f32, f32),
    terms: &mut [f32],
) -> (f64, f64) {
    let (gw, gwx) = terms.split_at_mut(x.len());
    for (((a, b), (&xv, &gv)), &wv) in gw.iter_mut().zip(gwx.iter_mut()).zip(x.iter().zip(g)).zip(w)
    {
        *a = gv * wv;
        *b = *a * ((xv - mean) * inv);
    }
    (lanes_then_tail(gw), lanes_then_tail(gwx))
}

/// Σ v in f64: eight interleaved partial sums over whole groups of eight, added in lane order,
/// then the tail one by one.
#[inline(always)]
fn lanes_then_tail(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let whole = xs.len() / 8 * 8;
    for c in xs[..whole].chunks_exact(8) {
        for l in 0..8 {
            lanes[l] += c[l] as f64;
        }
    }
    let mut sum = lanes.iter().sum::<f64>();
    for &v in &xs[whole..] {
        sum += v as f64;
    }
    sum
}

/// dx = inv · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)) per row; dw = Σ g·x̂, db = Σ g over rows.
pub(crate) fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    stats: &[(f32, f32)],
) -> CResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let d = w.len();
    if stats.len() * d != x.len() {
        candle_core::bail!("layer-norm backward without its forward statistics");
    }
    let (dx, partials) =
        crate::base::cpu::par_filled_with(x.len(), d * ROWS_PER_TASK, |t, dx_rows| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            let mut terms = vec![0f32; 2 * d];
            for (i, dxr) in dx_rows.chunks_mut(d).enumerate() {
                let r = t * ROWS_PER_TASK + i;
                let (mean, inv) = stats[r];
                let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                vectorized!({
                    let (sum_gw, sum_gwx) = weighted_grad_sums(xr, gr, w, (mean, inv), &mut terms);
                    let (mg, mgx) = ((sum_gw / d as f64) as f32, (sum_gwx / d as f64) as f32);
                    // Zipped, not indexed: bounds checks kept this loop scalar.
                    let sums = dw.iter_mut().zip(db.iter_mut());
                    let rows = dxr.iter_mut().zip(xr).zip(gr).zip(w).zip(sums);
                    for ((((o, &xv), &gv), &wv), (dwj, dbj)) in rows {
                        let xhat = (xv - mean) * inv;
                        *o = inv * (gv * wv - mg - xhat * mgx);
                        *dwj += gv * xhat;
                        *dbj += gv;
                    }
                });
            }
            (dw, db)
        });
    let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
    for (pw, pb) in &partials {
        dw.iter_mut().zip(pw).for_each(|(s, v)| *s += v);
        db.iter_mut().zip(pb).for_each(|(s, v)| *s += v);
    }
    Ok((dx, dw, db))
}

/// A ReLU's backward from its output y: the gradient where y > 0, 0 where it clipped (PyTorch's
/// rule at 0).
pub(crate) fn relu_backward(grad: &Tensor, y: &Tensor) -> CResult<Tensor> {
    let grad = grad.contiguous()?;
    let masked =
        with_cpu_slices([&grad, y], |[g, y]| map2(g, y, |gv, yv| if yv > 0.0 { gv } else { 0.0 }))?;
    cpu_tensor(masked, y.shape())
}

/// `f(a[i], b[i])` for every i, in parallel chunks run in vector registers, written once (no
/// zero fill first: these buffers are activation-sized).
pub(crate) fn map2<B: Copy + Sync>(
    a: &[f32],
    b: &[B],
    f: impl Fn(f32, B) -> f32 + Sync,
) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    assert_eq!(a.len(), b.len(), "element-wise operands differ in length");
    crate::base::cpu::par_filled(a.len(), CHUNK, |c, o| {
        let n = o.len();
        let (a, b) = (&a[c * CHUNK..][..n], &b[c * CHUNK..][..n]);
        vectorized!(for i in 0..n {
            o[i] = f(a[i], b[i]);
        })
    })
}

/// x · σ(1.702·x) (CLIP's activation) on a contiguous f32 tensor.
pub struct QuickGelu;

/// σ(z) = 1 / (1 + e^(−z)) with e^t written out ([`exp_in_range`]) so that the loops calling it
/// vectorise (libm's `expf` is a scalar call per element).
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp_in_range(-z))
}

/// x · σ(1.702·x) element by element.
pub(crate) fn quick_gelu_rows(x: &[f32]) -> Vec<f32> {
    crate::base::cpu::par_filled(x.len(), 4096, |c, y| {
        let xs = &x[c * 4096..][..y.len()];
        vectorized!(for (o, &v) in y.iter_mut().zip(xs) {
            *o = v * sigmoid(1.702 * v);
        })
    })
}

/// The gradient through quick GELU at inputs `x` for upstream gradient `g`:
/// g · (σ + 1.702·x·σ·(1 − σ)), σ = σ(1.702·x).
pub(crate) fn quick_gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    crate::base::cpu::par_filled(x.len(), 4096, |c, out| {
        let (xs, gs) = (&x[c * 4096..][..out.len()], &g[c * 4096..][..out.len()]);
        vectorized!(for ((o, &v), &gv) in out.iter_mut().zip(xs).zip(gs) {
            let s = sigmoid(1.702 * v);
            *o = gv * (s + 1.702 * v * s * (1.0 - s));
        })
    })
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(self.name(), s, l)?;
        let out = quick_gelu_rows(x);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// d/dx = σ + 1.702·x·σ·(1 − σ), σ = σ(1.702·x).
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = with_cpu_slices([x, &grad], |[x, g]| quick_gelu_backward(x, g))?;
        Ok(Some(cpu_tensor(dx, x.shape())?))
    }
}

/// y = x·Wᵀ + b for x (…, in), W (out, in), b (out): one op whose backward is two GEMMs and a
/// column sum, in place of a product, a broadcast bias and the reductions of their backward
/// (candle sums a broadcast bias's gradient with a strided loop). Leading dimensions are rows
/// as they lie, so no reshape nodes surround it (each would cost the backward pass a zeroed
/// gradient buffer and an addition). Gradients are skipped for inputs that need none (frozen
/// weights, the first layer's input). The weight and bias gradients go to the sink that was
/// active when the op was built, if any (`GradSink`).
pub struct LinearOp {
    sink: Option<GradSink>,
}

impl LinearOp {
    pub fn new() -> Self {
        Self { sink: GradSink::active() }
    }
}

impl Default for LinearOp {
    fn default() -> Self {
        Self::new()
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        linear_forward(self.name(), (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inp = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / inp.max(1);
        let out = w.dim(0)?;
        let grad = grad.contiguous()?;
        let need = [x.track_op(), w.track_op(), b.track_op()];
        let [dx, dw, db] = with_cpu_slices([&grad, x, w], |[g, xs, ws]| {
            linear_backward(xs, ws, g, (rows, inp, out), need)
        })?;
        let sink = self.sink.as_ref();
        Ok((
            dx.map(|v| cpu_tensor(v, x.shape())).transpose()?,
            dw.and_then(|v| GradSink::route(sink, w, v).transpose()).transpose()?,
            db.and_then(|v| GradSink::route(sink, b, v).transpose()).transpose()?,
        ))
    }
}

/// The gradients of y = x·Wᵀ + b (x: rows × inp, W: out × inp) for upstream gradient `g`
/// (rows × out): [dx, dW, db], each computed only where `need` asks for it.
pub(crate) fn linear_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (rows, inp, out): (usize, usize, usize),
    need: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    [
        need[0].then(|| gemm_f32(rows, inp, out, g, out, 1, w, inp, 1)),
        need[1].then(|| gemm_f32(out, inp, rows, g, 1, out, x, inp, 1)),
        need[2].then(|| column_sums(g, out)),
    ]
}

/// The forward of a CPU linear op (this one, the SAE encoder): x (…, in) · W (out, in)ᵀ + b.
pub(crate) fn linear_forward(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> CResult<(CpuStorage, Shape)> {
    let mut dims = l1.shape().dims().to_vec();
    let (out, inp2) = l2.shape().dims2()?;
    let inp = dims.last().copied().unwrap_or(0);
    if dims.is_empty() || inp != inp2 || l3.shape().elem_count() != out {
        candle_core::bail!("{op}: x {:?}, W {out}×{inp2}, b {:?} disagree", l1.shape(), l3.shape());
    }
    let rows = l1.shape().elem_count() / inp.max(1);
    let (x, w, b) = (contiguous(op, s1, l1)?, contiguous(op, s2, l2)?, contiguous(op, s3, l3)?);
    *dims.last_mut().expect("rank ≥ 1") = out;
    Ok((CpuStorage::F32(affine_rows(x, w, b, rows, inp)), Shape::from(dims)))
}

/// x (rows, inp) · W (out, inp)ᵀ + b (out) on slices.
pub(crate) fn affine_rows(x: &[f32], w: &[f32], b: &[f32], rows: usize, inp: usize) -> Vec<f32> {
    let (x, w) = (Strided { data: x, rs: inp, cs: 1 }, Strided { data: w, rs: 1, cs: inp });
    gemm_f32_plus_row(rows, b.len(), inp, x, w, b)
}

/// Σ over rows of a (rows, cols) matrix, each column summed in row order (deterministic), in
/// vector registers (twice as fast as the baseline loop at CLIP's 2,304 and 3,072 columns).
pub(crate) fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
    const WIDTH: usize = 128;
    let mut sums = vec![0f32; cols];
    sums.par_chunks_mut(WIDTH).enumerate().for_each(|(c, part)| {
        let start = c * WIDTH;
        vectorized!(for row in g.chunks_exact(cols) {
            part.iter_mut().zip(&row[start..]).for_each(|(s, &v)| *s += v);
        })
    });
    sums
}

/// max(0, a + b) of two contiguous f32 tensors of one shape (a residual connection and its
/// ReLU): one pass forward, one backward, where candle's graph makes an add, a ReLU and their
/// backward passes. Both inputs receive the same gradient: g where the output is positive.
pub struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("add-relu of {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (a, b) = (contiguous(self.name(), s1, l1)?, contiguous(self.name(), s2, l2)?);
        let out = map2(a, b, |x, y| (x + y).max(0.0));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let masked = relu_backward(&grad, res)?;
        let da = a.track_op().then(|| masked.clone());
        let db = b.track_op().then_some(masked);
        Ok((da, db))
    }
}

/// 3×3 max-pool, stride 2, padding 1 (ResNet's stem) over (B, C, H, W); padding never wins
/// (PyTorch's −∞). The backward gives each output's gradient to the first maximum of its window
/// in row-major order, as PyTorch does, found again from the input and the output.
pub struct MaxPool3x3S2;

/// Output size of the pool along an axis of n.
fn pooled(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// Row-major positions (in an h × w plane) of output (i, j)'s window, padding left out.
fn window(i: usize, j: usize, h: usize, w: usize) -> impl Iterator<Item = usize> {
    let rows = (2 * i).saturating_sub(1)..(2 * i + 2).min(h);
    rows.flat_map(move |r| ((2 * j).saturating_sub(1)..(2 * j + 2).min(w)).map(move |c| r * w + c))
}

impl CustomOp1 for MaxPool3x3S2 {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = contiguous(self.name(), s, l)?;
        let (ho, wo) = (pooled(h), pooled(w));
        let out = crate::base::cpu::par_filled(b * c * ho * wo, ho * wo, |p, dst| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for i in 0..ho {
                for j in 0..wo {
                    let best =
                        window(i, j, h, w).map(|q| plane[q]).fold(f32::NEG_INFINITY, f32::max);
                    dst[i * wo + j] = best;
                }
            }
        });
        Ok((CpuStorage::F32(out), (b, c, ho, wo).into()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let (ho, wo) = (pooled(h), pooled(w));
        let grad = grad.contiguous()?;
        let dx = with_cpu_slices([x, res, &grad], |[x, y, g]| {
            crate::base::cpu::par_filled(b * c * h * w, h * w, |p, dst| {
                dst.fill(0.0);
                let plane = &x[p * h * w..(p + 1) * h * w];
                for i in 0..ho {
                    for j in 0..wo {
                        let o = p * ho * wo + i * wo + j;
                        if let Some(q) = window(i, j, h, w).find(|&q| plane[q] == y[o]) {
                            dst[q] += g[o];
                        }
                    }
                }
            })
        })?;
        Ok(Some(cpu_tensor(dx, (b, c, h, w))?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::layers::{quick_gelu, LayerNorm};
    use crate::base::host::Kernels;
    use crate::models::test_util::gap;
    use candle_core::{Device, Tensor, Var};

    /// σ within 1e-38 of the exact value everywhere (±∞ and NaN included).
    #[test]
    fn sigmoid_is_exact_to_a_float() {
        for z in [f32::NEG_INFINITY, -1e30, -200.0, -88.5, -30.0, 0.0, 30.0, 88.5, f32::INFINITY] {
            let exact = 1.0 / (1.0 + (-(z as f64)).exp());
            assert!((super::sigmoid(z) as f64 - exact).abs() < 1e-38 + 1e-7 * exact, "σ({z})");
        }
        assert!(super::sigmoid(f32::NAN).is_nan());
    }

    /// The fused LayerNorm against the composed graph: value and the three gradients, over more
    /// rows than one backward task holds (so the partial sums are combined).
    #[test]
    fn fused_layer_norm_equals_the_graph() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.3f32, 2.0, (3, 25, 48), &dev).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(1f32, 0.3, 48, &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, 48, &dev).unwrap()).unwrap();
        let ln = LayerNorm {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
            eps: 1e-5,
        };
        let graph = ln.forward(x.as_tensor(), Kernels::Portable).unwrap();
        let fused = ln.forward(x.as_tensor(), Kernels::Host).unwrap();
        assert!(gap(&graph, &fused) < 1e-5, "values differ by {}", gap(&graph, &fused));
        let up = Tensor::randn(0f32, 1.0, (3, 25, 48), &dev).unwrap();
        let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("weight", &weight), ("bias", &bias)] {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(gap(a, b) < 1e-4, "{name}: gradients differ by {}", gap(a, b));
        }
    }

    #[test]
    fn fused_quick_gelu_equals_the_graph() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (7, 5000), &dev).unwrap()).unwrap();
        let graph = quick_gelu(x.as_tensor(), Kernels::Portable).unwrap();
        let fused = quick_gelu(x.as_tensor(), Kernels::Host).unwrap();
        assert!(gap(&graph, &fused) < 1e-5, "values differ by {}", gap(&graph, &fused));
        let up = Tensor::randn(0f32, 1.0, (7, 5000), &dev).unwrap();
        let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(gap(a, b) < 1e-5, "gradients differ by {}", gap(a, b));
    }

    /// The fused linear layer against matmul + broadcast bias: value and the three gradients,
    /// and no gradient for an input that needs none.
    #[test]
    fn fused_linear_equals_the_graph() {
        use super::super::layers::Linear;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70, 40), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.2, (90, 40), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 90, &dev).unwrap()).unwrap();
        let layer =
            Linear { weight: w.as_tensor().clone(), bias: Some(b.as_tensor().clone()), lora: None };
        let graph = layer.forward(x.as_tensor(), Kernels::Portable).unwrap();
        let fused = layer.forward(x.as_tensor(), Kernels::Host).unwrap();
        assert_eq!(graph.dims(), fused.dims());
        assert!(gap(&graph, &fused) < 1e-5, "values differ by {}", gap(&graph, &fused));
        let up = Tensor::randn(0f32, 1.0, (3, 70, 90), &dev).unwrap();
        let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(gap(a, b) < 1e-4, "{name}: gradients differ by {}", gap(a, b));
        }
        let pixels = Tensor::randn(0f32, 1.0, (5, 40), &dev).unwrap();
        let g =
            layer.forward(&pixels, Kernels::Host).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&pixels).is_none() && g.get(w.as_tensor()).is_some());
    }

    #[test]
    fn fused_add_relu_equals_the_graph() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 50, 50), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 50, 50), &dev).unwrap()).unwrap();
        let graph = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        let fused = a.as_tensor().apply_op2(b.as_tensor(), super::AddRelu).unwrap();
        assert_eq!(gap(&graph, &fused), 0.0);
        let up = Tensor::randn(0f32, 1.0, (3, 4, 50, 50), &dev).unwrap();
        let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            assert_eq!(gap(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()), 0.0);
        }
    }

    /// Column sums against a plain row-by-row loop, bit for bit, with widths around the task
    /// width (a partial last block) and in vector registers.
    #[test]
    fn column_sums_add_each_column_in_row_order() {
        for (rows, cols) in [(7, 300), (33, 128), (5, 1), (0, 9)] {
            let g: Vec<f32> =
                (0..rows * cols).map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 97.0).collect();
            let mut want = vec![0f32; cols];
            for row in g.chunks_exact(cols) {
                for (s, &v) in want.iter_mut().zip(row) {
                    *s += v;
                }
            }
            let got = super::column_sums(&g, cols);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{cols}");
            assert_eq!(got.len(), cols);
        }
    }

    /// The layer-norm backward against its formulas written plainly (f64 sums of eight
    /// interleaved lanes, then the tail), bit for bit, at widths with and without a tail.
    #[test]
    fn layer_norm_backward_matches_its_plain_formulas() {
        for d in [768usize, 37, 8, 5] {
            let rows = 70; // three tasks of ROWS_PER_TASK, the last one partial
            let x: Vec<f32> =
                (0..rows * d).map(|i| ((i * 7919) % 1003) as f32 / 251.0 - 2.0).collect();
            let g: Vec<f32> =
                (0..rows * d).map(|i| ((i * 31) % 997) as f32 / 503.0 - 1.0).collect();
            let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / 1000.0).collect();
            let b = vec![0.1f32; d];
            let stats = super::layer_norm_rows(&x, &w, &b, 1e-5).1;
            let (dx, dw, db) = super::layer_norm_backward(&x, &w, &g, &stats).unwrap();
            let lanes_then_tail = |f: &dyn Fn(usize) -> f32| {
                let mut lanes = [0f64; 8];
                let whole = d / 8 * 8;
                for j in 0..whole {
                    lanes[j % 8] += f(j) as f64;
                }
                let mut sum = lanes.iter().sum::<f64>();
                for j in whole..d {
                    sum += f(j) as f64;
                }
                sum
            };
            let (mut want_dx, mut want_dw, mut want_db) = (vec![], vec![0f32; d], vec![0f32; d]);
            let mut partial = (vec![0f32; d], vec![0f32; d]);
            for r in 0..rows {
                let (mean, inv) = stats[r];
                let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                let sum_gw = lanes_then_tail(&|j| gr[j] * w[j]);
                let sum_gwx = lanes_then_tail(&|j| gr[j] * w[j] * ((xr[j] - mean) * inv));
                let (mg, mgx) = ((sum_gw / d as f64) as f32, (sum_gwx / d as f64) as f32);
                for j in 0..d {
                    let xhat = (xr[j] - mean) * inv;
                    want_dx.push(inv * (gr[j] * w[j] - mg - xhat * mgx));
                    partial.0[j] += gr[j] * xhat;
                    partial.1[j] += gr[j];
                }
                // Each task's partial sums, added in task order.
                if (r + 1) % super::ROWS_PER_TASK == 0 || r + 1 == rows {
                    for j in 0..d {
                        want_dw[j] += partial.0[j];
                        want_db[j] += partial.1[j];
                    }
                    partial = (vec![0f32; d], vec![0f32; d]);
                }
            }
            let same = |a: &[f32], b: &[f32]| {
                a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
            };
            assert!(same(&dx, &want_dx), "dx at width {d}");
            assert!(same(&dw, &want_dw) && same(&db, &want_db), "dw, db at width {d}");
        }
    }
}
