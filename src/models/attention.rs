//! Multi-head scaled dot-product attention as one CPU op with a closed-form backward pass, for
//! the CLIP tower's training step. Composed from candle ops it is a dozen graph nodes per layer —
//! the query scaling, three head-splitting copies, two batched products that candle runs one
//! (image, head) at a time, five softmax passes and a merging copy — each with a zero-filled
//! gradient buffer in the backward pass. Host kernels only: the portable path keeps the composed
//! ops (`clip::ClipTower::attention`), and a test holds the two equal in value and gradients.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::base::cpu::{contiguous, cpu_tensor, with_cpu_slices, CResult};
use crate::base::gemm::{gemm_f32_into, Strided};
use crate::base::simd::{exp_in_range, lane_dot, lane_sum, vectorized};

/// softmax(scale · q_h k_hᵀ) v_h for every image and head h, on (B, N, D) queries, keys and
/// values whose heads lie side by side along D; the output has the same layout.
///
/// The backward pass recomputes the attention weights instead of keeping them: (B · H · N · N)
/// floats per layer would outgrow the activations at ViT-L/14's 257 or 577 tokens.
pub struct AttentionOp {
    pub heads: usize,
    pub scale: f32,
}

/// Shape facts of one call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    batch: usize,
    tokens: usize,
    dim: usize,
    head_dim: usize,
    heads: usize,
}

impl Dims {
    /// Head h of image b of a (B, N, D) tensor: an (N × head_dim) strided matrix.
    fn head<'a>(&self, data: &'a [f32], b: usize, h: usize) -> Strided<'a> {
        Strided {
            data: &data[b * self.tokens * self.dim + h * self.head_dim..],
            rs: self.dim,
            cs: 1,
        }
    }

    /// The same matrix transposed (head_dim × N).
    fn head_t<'a>(&self, data: &'a [f32], b: usize, h: usize) -> Strided<'a> {
        let m = self.head(data, b, h);
        Strided { rs: 1, cs: self.dim, ..m }
    }

    /// Copies the (N × head_dim) block of each (image, head) — `block(b * heads + h)` — into
    /// (B, N, D).
    fn merge<'a>(&self, block: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<f32> {
        let (n, d, dh) = (self.tokens, self.dim, self.head_dim);
        // Every element is written: the heads tile each row.
        crate::base::cpu::par_filled(self.batch * n * d, n * d, |b, image| {
            for h in 0..self.heads {
                let block = block(b * self.heads + h);
                for (row, src) in image.chunks_exact_mut(d).zip(block.chunks_exact(dh)) {
                    row[h * dh..(h + 1) * dh].copy_from_slice(src);
                }
            }
        })
    }
}

/// Each row of an (N × N) matrix replaced by its softmax (max subtracted, as candle's softmax),
/// in vector registers: e^t written out and the sum over f64 lanes (libm's `expf` and a running
/// sum kept it scalar, a fifth of the op's time).
fn softmax_rows(s: &mut [f32], n: usize) {
    vectorized!(for row in s.chunks_exact_mut(n) {
        let max = row_max(row);
        row.iter_mut().for_each(|v| *v = exp_in_range(*v - max));
        let sum = lane_sum(row, |v| v as f64) as f32;
        row.iter_mut().for_each(|v| *v /= sum);
    })
}

/// The largest value of a row, NaNs skipped (as `f32::max`), over sixteen lanes: `f32::max`'s
/// NaN rule kept a plain fold scalar.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let whole = row.len() / 16 * 16;
    for c in row[..whole].chunks_exact(16) {
        lanes = std::array::from_fn(|l| larger(lanes[l], c[l]));
    }
    row[whole..].iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| larger(m, v))
}

impl AttentionOp {
    fn dims(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> CResult<Dims> {
        let (batch, tokens, dim) = l1.shape().dims3()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} differ",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        self.shape(batch, tokens, dim)
    }

    /// The shape facts of (batch, tokens, dim) inputs split into this op's heads.
    pub(crate) fn shape(&self, batch: usize, tokens: usize, dim: usize) -> CResult<Dims> {
        if self.heads == 0 || !dim.is_multiple_of(self.heads) {
            candle_core::bail!("attention: width {dim} does not split into {} heads", self.heads);
        }
        Ok(Dims { batch, tokens, dim, head_dim: dim / self.heads, heads: self.heads })
    }

    /// The op's output on contiguous (B, N, D) queries, keys and values.
    pub(crate) fn forward_rows(&self, dims: Dims, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (n, dh) = (dims.tokens, dims.head_dim);
        let blocks: Vec<Vec<f32>> = (0..dims.batch * dims.heads)
            .into_par_iter()
            .map(|i| {
                let (b, h) = (i / dims.heads, i % dims.heads);
                let p = self.weights(dims, q, k, b, h);
                let mut out = vec![0f32; n * dh];
                let p_m = Strided { data: &p, rs: n, cs: 1 };
                gemm_f32_into(&mut out, dh, (n, dh, n), p_m, dims.head(v, b, h), 1.0);
                out
            })
            .collect();
        dims.merge(|i| &blocks[i])
    }

    /// [dq, dk, dv] for upstream gradient `g`, each (B, N, D) where `need` asks for it.
    ///
    /// With P = softmax(S), S = scale · q kᵀ and output P v: dv = Pᵀ G, dP = G vᵀ,
    /// dS = P ⊙ (dP − rowsum(P ⊙ dP)), dq = scale · dS k, dk = scale · dSᵀ q.
    pub(crate) fn backward_rows(
        &self,
        dims: Dims,
        [qs, ks, vs]: [&[f32]; 3],
        g: &[f32],
        need: [bool; 3],
    ) -> [Option<Vec<f32>>; 3] {
        let (n, dh) = (dims.tokens, dims.head_dim);
        let blocks: Vec<[Vec<f32>; 3]> = (0..dims.batch * dims.heads)
            .into_par_iter()
            .map(|i| {
                let (b, h) = (i / dims.heads, i % dims.heads);
                let p = self.weights(dims, qs, ks, b, h);
                let gh = dims.head(g, b, h);
                let mut dv = vec![0f32; n * dh];
                let p_t = Strided { data: &p, rs: 1, cs: n };
                gemm_f32_into(&mut dv, dh, (n, dh, n), p_t, gh, 1.0);
                let mut ds = vec![0f32; n * n];
                let vt = dims.head_t(vs, b, h);
                gemm_f32_into(&mut ds, n, (n, n, dh), gh, vt, 1.0);
                vectorized!(for (dp, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                    let dot = lane_dot(dp, pr, |a, b| (a * b) as f64) as f32;
                    dp.iter_mut().zip(pr).for_each(|(d, &pv)| *d = pv * (*d - dot));
                });
                let mut dq = vec![0f32; n * dh];
                let ds_m = Strided { data: &ds, rs: n, cs: 1 };
                let kh = dims.head(ks, b, h);
                gemm_f32_into(&mut dq, dh, (n, dh, n), ds_m, kh, self.scale);
                let mut dk = vec![0f32; n * dh];
                let ds_t = Strided { data: &ds, rs: 1, cs: n };
                let qh = dims.head(qs, b, h);
                gemm_f32_into(&mut dk, dh, (n, dh, n), ds_t, qh, self.scale);
                [dq, dk, dv]
            })
            .collect();
        let merged = |which: usize| need[which].then(|| dims.merge(|i| &blocks[i][which]));
        [merged(0), merged(1), merged(2)]
    }

    /// The (N × N) attention weights of image b, head h.
    fn weights(&self, dims: Dims, q: &[f32], k: &[f32], b: usize, h: usize) -> Vec<f32> {
        let n = dims.tokens;
        let mut p = vec![0f32; n * n];
        let (qh, kt) = (dims.head(q, b, h), dims.head_t(k, b, h));
        gemm_f32_into(&mut p, n, (n, n, dims.head_dim), qh, kt, self.scale);
        softmax_rows(&mut p, n);
        p
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
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
        let dims = self.dims(l1, l2, l3)?;
        let (q, k, v) = (
            contiguous(self.name(), s1, l1)?,
            contiguous(self.name(), s2, l2)?,
            contiguous(self.name(), s3, l3)?,
        );
        Ok((CpuStorage::F32(self.forward_rows(dims, q, k, v)), l1.shape().clone()))
    }

    /// See [`AttentionOp::backward_rows`].
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dims = self.dims(q.layout(), k.layout(), v.layout())?;
        let need = [q.track_op(), k.track_op(), v.track_op()];
        let [dq, dk, dv] = with_cpu_slices([q, k, v, &grad], |[qs, ks, vs, g]| {
            self.backward_rows(dims, [qs, ks, vs], g, need)
        })?;
        let tensor = |d: Option<Vec<f32>>, input: &Tensor| {
            d.map(|d| cpu_tensor(d, input.shape())).transpose()
        };
        Ok((tensor(dq, q)?, tensor(dk, k)?, tensor(dv, v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_util::gap;
    use candle_core::{Device, Var, D};

    /// The composed graph the CLIP tower's portable path runs.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, n, d) = q.dims3().unwrap();
        let split = |t: Tensor| {
            t.reshape((b, n, heads, d / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split((q * scale).unwrap()), split(k.clone()), split(v.clone()));
        let w = candle_nn::ops::softmax(&q.matmul(&k.t().unwrap()).unwrap(), D::Minus1).unwrap();
        w.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, n, d)).unwrap()
    }

    /// Value and the three gradients against the composed graph, on a shape whose head width
    /// is not a power of two (the scale is inexact) and with more tokens than heads.
    #[test]
    fn attention_equals_the_composed_graph() {
        let dev = Device::Cpu;
        let (b, n, d, heads) = (3, 11, 24, 4);
        let scale = (6f64).powf(-0.5);
        let var = |s: f64| {
            Var::from_tensor(&Tensor::randn(0f32, s as f32, (b, n, d), &dev).unwrap()).unwrap()
        };
        let (q, k, v) = (var(1.0), var(1.5), var(1.0));
        let graph = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, scale);
        let op = AttentionOp { heads, scale: scale as f32 };
        let fused = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op).unwrap();
        assert!(gap(&graph, &fused) < 1e-5, "values differ by {}", gap(&graph, &fused));
        let up = Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
        let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            assert!(gap(a, b) < 1e-5, "{name}: gradients differ by {}", gap(a, b));
        }
    }

    /// Inputs that need no gradient get none; mismatched shapes are refused.
    #[test]
    fn attention_skips_untracked_inputs_and_refuses_bad_shapes() {
        let dev = Device::Cpu;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap()).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
        let op = || AttentionOp { heads: 2, scale: 0.5 };
        let out = q.as_tensor().apply_op3(&kv, &kv, op()).unwrap();
        let g = out.sum_all().unwrap().backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some() && g.get(&kv).is_none());
        let short = Tensor::zeros((2, 4, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(q.as_tensor().apply_op3(&short, &kv, op()).is_err());
        let odd = AttentionOp { heads: 3, scale: 0.5 };
        assert!(q.as_tensor().apply_op3(&kv, &kv, odd).is_err());
    }
}
