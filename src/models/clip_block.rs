//! One CLIP encoder block as a single host op with a closed-form backward pass, for the
//! finetuning step:
//!
//! y = x + out(attention(q(ln1 x), k(ln1 x), v(ln1 x))),   z = y + fc2(gelu(fc1(ln2 y))).
//!
//! As a chain of host ops (`fused`, `attention`) a block is a dozen graph nodes, and candle's
//! backward pass gives every node's output gradient a zero-filled buffer and an addition: about
//! 44 MiB per block of ViT-B/32 at batch 16, zeroed on one thread while the pool waits. Here the
//! gradients pass from kernel to kernel. The kernels are the chain's own, called in the order
//! candle calls them, so values and gradients are the chain's bit for bit (tested).
//!
//! The op keeps its forward intermediates for its backward pass, as the chain's graph kept them
//! as node outputs, and only when a gradient will be asked for. Its weights are not inputs of
//! the graph: their gradients go to the trainer's `GradSink`, so the tower uses the op only when
//! one is active or the weights are frozen (`BlockOp::new`), and the chain of ops otherwise.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::attention::AttentionOp;
use super::fused::{
    affine_rows, layer_norm_backward, layer_norm_rows, linear_backward, quick_gelu_backward,
    quick_gelu_rows,
};
use crate::base::cpu::{add_assign, contiguous, cpu_tensor, with_cpu_slices, CResult};
use crate::base::grad_sink::GradSink;

/// A block's parameters, in the order of `BlockOp::params`: LayerNorm 1 (weight, bias), the
/// query, key, value and output projections (weight, bias each), LayerNorm 2, fc1, fc2.
pub const PARAMS: usize = 16;
const LN1: usize = 0;
const Q: usize = 2;
const K: usize = 4;
const V: usize = 6;
const OUT: usize = 8;
const LN2: usize = 10;
const FC1: usize = 12;
const FC2: usize = 14;

pub struct BlockOp {
    params: [Tensor; PARAMS],
    heads: usize,
    eps: f64,
    sink: Option<GradSink>,
    /// Whether a backward pass may follow (the input or a weight needs a gradient).
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// The forward pass's intermediates that the backward pass reads.
struct Saved {
    xn1: Vec<f32>,
    stats1: Vec<(f32, f32)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
    y: Vec<f32>,
    xn2: Vec<f32>,
    stats2: Vec<(f32, f32)>,
    hidden: Vec<f32>,
    gelu: Vec<f32>,
}

/// The input's gradient, if asked for, and each parameter's, where it trains.
type Gradients = (Option<Vec<f32>>, Vec<Option<Vec<f32>>>);

/// Rows, width and MLP width of one call.
#[derive(Clone, Copy)]
struct Sizes {
    rows: usize,
    dim: usize,
    inter: usize,
}

impl BlockOp {
    /// The op over `params` (in the order of `PARAMS`) for input `x`, or None when a weight needs
    /// a gradient the op cannot deliver: no `GradSink` is active, or the weight is not a
    /// variable (its gradient would have to flow on through candle's graph).
    pub fn new(params: [Tensor; PARAMS], heads: usize, eps: f64, x: &Tensor) -> Option<Self> {
        let sink = GradSink::active();
        let deliverable = |p: &Tensor| !p.track_op() || (p.is_variable() && sink.is_some());
        if !params.iter().all(deliverable) {
            return None;
        }
        let keep = x.track_op() || params.iter().any(|p| p.track_op());
        Some(Self { params, heads, eps, sink, keep, saved: Mutex::new(None) })
    }

    fn attention(&self, dim: usize) -> AttentionOp {
        let head_dim = dim / self.heads.max(1);
        AttentionOp { heads: self.heads, scale: (head_dim as f64).powf(-0.5) as f32 }
    }

    /// The sizes of a (batch, tokens, dim) input, checked against the weights.
    fn sizes(&self, batch: usize, tokens: usize, dim: usize) -> CResult<Sizes> {
        let inter = self.params[FC1 + 1].elem_count();
        let expected = [
            dim,
            dim,
            dim * dim,
            dim,
            dim * dim,
            dim,
            dim * dim,
            dim,
            dim * dim,
            dim,
            dim,
            dim,
            inter * dim,
            inter,
            dim * inter,
            dim,
        ];
        for (i, (p, &n)) in self.params.iter().zip(&expected).enumerate() {
            if p.elem_count() != n {
                candle_core::bail!(
                    "clip block: parameter {i} has {} values, {n} expected for width {dim}",
                    p.elem_count()
                );
            }
        }
        Ok(Sizes { rows: batch * tokens, dim, inter })
    }

    fn forward(
        &self,
        x: &[f32],
        (batch, tokens): (usize, usize),
        s: Sizes,
        w: [&[f32]; PARAMS],
    ) -> CResult<(Vec<f32>, Saved)> {
        let (rows, dim, inter) = (s.rows, s.dim, s.inter);
        let attention = self.attention(dim);
        let dims = attention.shape(batch, tokens, dim)?;
        let (xn1, stats1) = layer_norm_rows(x, w[LN1], w[LN1 + 1], self.eps);
        let q = affine_rows(&xn1, w[Q], w[Q + 1], rows, dim);
        let k = affine_rows(&xn1, w[K], w[K + 1], rows, dim);
        let v = affine_rows(&xn1, w[V], w[V + 1], rows, dim);
        let context = attention.forward_rows(dims, &q, &k, &v);
        let mut y = affine_rows(&context, w[OUT], w[OUT + 1], rows, dim);
        add_assign(&mut y, x);
        let (xn2, stats2) = layer_norm_rows(&y, w[LN2], w[LN2 + 1], self.eps);
        let hidden = affine_rows(&xn2, w[FC1], w[FC1 + 1], rows, dim);
        let gelu = quick_gelu_rows(&hidden);
        let mut z = affine_rows(&gelu, w[FC2], w[FC2 + 1], rows, inter);
        add_assign(&mut z, &y);
        Ok((z, Saved { xn1, stats1, q, k, v, context, y, xn2, stats2, hidden, gelu }))
    }

    /// The input's gradient (when `need_x`) and each parameter's (where it tracks a gradient),
    /// for the output's gradient `dz`. Contributions to one gradient are summed in the order
    /// candle's backward pass sums them over the chain of ops.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        dz: &[f32],
        (batch, tokens): (usize, usize),
        s: Sizes,
        w: [&[f32]; PARAMS],
        saved: &Saved,
        need_x: bool,
    ) -> CResult<Gradients> {
        let (rows, dim, inter) = (s.rows, s.dim, s.inter);
        let train = |i: usize| self.params[i].track_op();
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; PARAMS];
        // The input gradient of the linear layer `p` (weight, bias) with input `input` and
        // upstream gradient `g`; its weight and bias gradients where they train.
        let mut linear = |p: usize, input: &[f32], g: &[f32], (inp, out): (usize, usize)| {
            let need = [true, train(p), train(p + 1)];
            let [dx, dw, db] = linear_backward(input, w[p], g, (rows, inp, out), need);
            (grads[p], grads[p + 1]) = (dw, db);
            dx.expect("asked for")
        };
        // z = y + fc2(gelu(fc1(ln2 y)))
        let dgelu = linear(FC2, &saved.gelu, dz, (inter, dim));
        let dhidden = quick_gelu_backward(&saved.hidden, &dgelu);
        drop(dgelu);
        let dxn2 = linear(FC1, &saved.xn2, &dhidden, (dim, inter));
        drop(dhidden);
        let (mut dy, dw2, db2) = layer_norm_backward(&saved.y, w[LN2], &dxn2, &saved.stats2)?;
        add_assign(&mut dy, dz);
        // y = x + out(attention(q, k, v of ln1 x))
        let dcontext = linear(OUT, &saved.context, &dy, (dim, dim));
        let attention = self.attention(dim);
        let dims = attention.shape(batch, tokens, dim)?;
        let qkv = [&saved.q[..], &saved.k[..], &saved.v[..]];
        let [dq, dk, dv] = attention.backward_rows(dims, qkv, &dcontext, [true; 3]);
        drop(dcontext);
        // candle reaches the value projection first, then the key's, then the query's.
        let mut dxn1 = linear(V, &saved.xn1, &dv.expect("asked for"), (dim, dim));
        add_assign(&mut dxn1, &linear(K, &saved.xn1, &dk.expect("asked for"), (dim, dim)));
        add_assign(&mut dxn1, &linear(Q, &saved.xn1, &dq.expect("asked for"), (dim, dim)));
        let (mut dx, dw1, db1) = layer_norm_backward(x, w[LN1], &dxn1, &saved.stats1)?;
        add_assign(&mut dx, &dy);
        for (p, [dw, db]) in [(LN2, [dw2, db2]), (LN1, [dw1, db1])] {
            (grads[p], grads[p + 1]) = (train(p).then_some(dw), train(p + 1).then_some(db));
        }
        Ok((need_x.then_some(dx), grads))
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "clip-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (batch, tokens, dim) = l.shape().dims3()?;
        let sizes = self.sizes(batch, tokens, dim)?;
        let x = contiguous(self.name(), s, l)?;
        let (z, saved) = with_cpu_slices(self.params.each_ref(), |w| {
            self.forward(x, (batch, tokens), sizes, w)
        })??;
        if self.keep {
            *self.saved.lock().expect("block intermediates poisoned") = Some(saved);
        }
        Ok((CpuStorage::F32(z), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dz: &Tensor) -> CResult<Option<Tensor>> {
        let (batch, tokens, dim) = x.dims3()?;
        let sizes = self.sizes(batch, tokens, dim)?;
        let saved = self.saved.lock().expect("block intermediates poisoned");
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("clip block: backward pass without the forward's intermediates");
        };
        let (dx, grads) = with_cpu_slices(self.params.each_ref(), |w| {
            with_cpu_slices([x, dz], |[xs, dz]| {
                self.backward(xs, dz, (batch, tokens), sizes, w, saved, x.track_op())
            })
        })???;
        for (param, grad) in self.params.iter().zip(grads) {
            if let Some(grad) = grad {
                if GradSink::offer(self.sink.as_ref(), param, grad).is_some() {
                    candle_core::bail!("clip block: a weight gradient found no sink");
                }
            }
        }
        dx.map(|dx| cpu_tensor(dx, x.shape())).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused::{LayerNormOp, LinearOp, QuickGelu};
    use candle_core::{Device, Var};

    const HEADS: usize = 2;
    const EPS: f64 = 1e-5;

    /// The block as the chain of host ops the tower runs without the fused op.
    fn chain(x: &Tensor, p: &[Tensor]) -> Tensor {
        let ln = |x: &Tensor, i: usize| {
            x.contiguous().unwrap().apply_op3(&p[i], &p[i + 1], LayerNormOp::new(EPS)).unwrap()
        };
        let lin = |x: &Tensor, i: usize| {
            x.contiguous().unwrap().apply_op3(&p[i], &p[i + 1], LinearOp::new()).unwrap()
        };
        let xn1 = ln(x, LN1);
        let (q, k, v) = (lin(&xn1, Q), lin(&xn1, K), lin(&xn1, V));
        let dim = x.dim(2).unwrap();
        let op = AttentionOp { heads: HEADS, scale: ((dim / HEADS) as f64).powf(-0.5) as f32 };
        let y = (x + lin(&q.apply_op3(&k, &v, op).unwrap(), OUT)).unwrap();
        let gelu = lin(&ln(&y, LN2), FC1).apply_op1(QuickGelu).unwrap();
        (&y + lin(&gelu, FC2)).unwrap()
    }

    /// Random parameters for width `d` and MLP width `inter` (LayerNorm weights near 1).
    fn params(d: usize, inter: usize) -> Vec<Var> {
        let dev = Device::Cpu;
        let shapes: [&[usize]; PARAMS] = [
            &[d],
            &[d],
            &[d, d],
            &[d],
            &[d, d],
            &[d],
            &[d, d],
            &[d],
            &[d, d],
            &[d],
            &[d],
            &[d],
            &[inter, d],
            &[inter],
            &[d, inter],
            &[d],
        ];
        shapes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let t = Tensor::randn(0f32, 0.3, s, &dev).unwrap();
                let t = if i == LN1 || i == LN2 { (t + 1.0).unwrap() } else { t };
                Var::from_tensor(&t).unwrap()
            })
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// Value, input gradient and every weight gradient equal the chain's bit for bit; the
    /// weights' gradients arrive through the sink.
    #[test]
    fn the_block_op_equals_the_chain_of_ops_bit_for_bit() {
        let (b, n, d, inter) = (3, 5, 8, 12);
        let vars = params(d, inter);
        let p: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, d), &Device::Cpu).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (b, n, d), &Device::Cpu).unwrap();
        let want = chain(x.as_tensor(), &p);
        let want_grads = (&want * &up).unwrap().sum_all().unwrap().backward().unwrap();

        let sink = GradSink::default();
        let params: [Tensor; PARAMS] = p.clone().try_into().unwrap();
        let op = sink.during(|| BlockOp::new(params, HEADS, EPS, x.as_tensor())).unwrap();
        let got = x.as_tensor().apply_op1(op).unwrap();
        assert_eq!(bits(&got), bits(&want), "values");
        let got_grads = (&got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = |g: &candle_core::backprop::GradStore| bits(g.get(x.as_tensor()).unwrap());
        assert_eq!(dx(&got_grads), dx(&want_grads), "input gradient");
        for (i, param) in p.iter().enumerate() {
            assert!(got_grads.get(param).is_none(), "parameter {i} went to candle's store");
            let sunk = sink.take(param).unwrap_or_else(|| panic!("parameter {i}: no gradient"));
            let sunk: Vec<u32> = sunk.iter().map(|v| v.to_bits()).collect();
            assert_eq!(sunk, bits(want_grads.get(param).unwrap()), "parameter {i}");
        }
        sink.finish().unwrap();
    }

    /// Weights that are variables need a sink; frozen weights (plain tensors) need none and
    /// get no gradient, while the input still does; a second backward pass reads the same
    /// intermediates; weights of the wrong size are refused.
    #[test]
    fn the_block_op_needs_a_sink_for_trained_weights_only() {
        let (b, n, d, inter) = (2, 3, 4, 6);
        let vars = params(d, inter);
        let trained: [Tensor; PARAMS] =
            vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>().try_into().unwrap();
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, d), &Device::Cpu).unwrap()).unwrap();
        assert!(BlockOp::new(trained.clone(), HEADS, EPS, x.as_tensor()).is_none());

        let frozen = trained.clone().map(|t| t.detach());
        let op = BlockOp::new(frozen.clone(), HEADS, EPS, x.as_tensor()).unwrap();
        let z = x.as_tensor().apply_op1(op).unwrap().sum_all().unwrap();
        let (g1, g2) = (z.backward().unwrap(), z.backward().unwrap());
        let want = chain(x.as_tensor(), &frozen).sum_all().unwrap().backward().unwrap();
        for g in [&g1, &g2] {
            assert_eq!(bits(g.get(x.as_tensor()).unwrap()), bits(want.get(x.as_tensor()).unwrap()));
        }

        // Without a gradient anywhere, nothing is kept and the value is the chain's.
        let plain = x.as_tensor().detach();
        let op = BlockOp::new(frozen.clone(), HEADS, EPS, &plain).unwrap();
        assert!(!op.keep);
        assert_eq!(bits(&plain.apply_op1(op).unwrap()), bits(&chain(&plain, &frozen)));

        let mut wrong = frozen;
        wrong[FC2] = Tensor::zeros((d, inter + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = BlockOp::new(wrong, HEADS, EPS, &plain).unwrap();
        assert!(plain.apply_op1(op).is_err());
    }
}
