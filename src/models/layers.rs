//! Differentiable building blocks. candle's fused LayerNorm and softmax_last_dim have no
//! backward (docs/candle.md), so these are compositions of ops that all have one; with host
//! kernels several run as single CPU ops instead (`fused`, the convolution and BatchNorm here).

use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::{DType, IndexOp, Tensor, D};

use crate::base::host::Kernels;

/// LayerNorm over the last dimension: (x − mean) / √(var + eps) · w + b.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// One fused op with host kernels (`fused::LayerNormOp`), the composed graph otherwise.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.for_tensor(x).is_host() {
            let op = super::fused::LayerNormOp::new(self.eps);
            return Ok(x.contiguous()?.apply_op3(&self.weight, &self.bias, op)?);
        }
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
    /// With host kernels and a bias, one fused op (`fused::LinearOp`) on the rows of `x`.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let mut y = match &self.bias {
            Some(b) if kernels.for_tensor(x).is_host() => {
                let (rows, inp) = (x.elem_count() / x.dim(D::Minus1)?, x.dim(D::Minus1)?);
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
                x.contiguous()?
                    .reshape((rows, inp))?
                    .apply_op3(&self.weight.contiguous()?, b, super::fused::LinearOp)?
                    .reshape(dims)?
            }
            Some(b) => x.broadcast_matmul(&self.weight.t()?)?.broadcast_add(b)?,
            None => x.broadcast_matmul(&self.weight.t()?)?,
        };
        if let Some(l) = &self.lora {
            let low = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        Ok(y)
    }
}

/// How the planes of a 4-D activation are ordered in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planes {
    /// (B, C, H, W): candle's and PyTorch's layout.
    ImageMajor,
    /// (C, B, H, W): each channel's planes side by side. A convolution's batch-wide product
    /// (O, B·OH·OW) is then the output itself, a 1×1 convolution multiplies the input as it
    /// lies, and BatchNorm reduces contiguous rows — no layout copies. ResNet's CPU training
    /// path keeps its activations this way.
    ChannelMajor,
}

impl Planes {
    /// (B, C) from the first two dimensions.
    fn batch_channels(self, d0: usize, d1: usize) -> (usize, usize) {
        match self {
            Planes::ImageMajor => (d0, d1),
            Planes::ChannelMajor => (d1, d0),
        }
    }

    /// The position of plane (image `bi`, channel `ch`) among the b·c planes.
    fn index(self, bi: usize, ch: usize, b: usize, c: usize) -> usize {
        match self {
            Planes::ImageMajor => bi * c + ch,
            Planes::ChannelMajor => ch * b + bi,
        }
    }

    /// (image, channel) of plane `p`.
    fn plane(self, p: usize, b: usize, c: usize) -> (usize, usize) {
        match self {
            Planes::ImageMajor => (p / c, p % c),
            Planes::ChannelMajor => (p % b, p / b),
        }
    }
}

/// A 2-D convolution (one group, no dilation) on the CPU as one matrix product over the whole
/// batch, so that training's backward runs through GEMMs and a col2im instead of candle's
/// convolution backward (its input gradient is a direct transposed convolution, many times
/// slower on the CPU). Equal to `conv2d` up to the order of float sums (tested in value and
/// gradients). w: (O, C, KH, KW); x: (B, C, H, W) → (B, O, OH, OW), or with
/// `Planes::ChannelMajor` (C, B, H, W) → (O, B, OH, OW); f32 on the CPU.
pub fn conv2d_gemm(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    planes: Planes,
) -> Result<Tensor> {
    let (d0, d1, _, _) = x.dims4()?;
    let (_, c) = planes.batch_channels(d0, d1);
    let (_, ci, kh, kw) = w.dims4()?;
    anyhow::ensure!(ci == c, "convolution of {c} channels with a kernel for {ci}");
    let op = ConvGemm {
        geometry: ConvGeometry { kh, kw, stride, padding },
        planes,
        columns: Default::default(),
    };
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// Kernel size, stride and zero padding of a convolution.
#[derive(Clone, Copy)]
struct ConvGeometry {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl ConvGeometry {
    fn output(&self, h: usize, w: usize) -> (usize, usize) {
        let out = |n: usize, k: usize| (n + 2 * self.padding - k) / self.stride + 1;
        (out(h, self.kh), out(w, self.kw))
    }

    /// The input position of output `o` under tap `k` along an axis of length `n`, if inside.
    fn source(&self, o: usize, k: usize, n: usize) -> Option<usize> {
        (o * self.stride + k).checked_sub(self.padding).filter(|&i| i < n)
    }

    /// Every (tap, output position, input position) triple of one h × w plane, in a fixed
    /// order (tap, output row, output column), padding positions left out, as runs along an
    /// output row: `f(tap, first output position, first input position, count)` covers output
    /// positions p + i and input positions q + i·stride for i < count. Taps count ky·KW + kx,
    /// positions oy·OW + ox.
    #[inline(always)]
    fn for_each_run(&self, h: usize, w: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (oh, ow) = self.output(h, w);
        let s = self.stride;
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let tap = ky * self.kw + kx;
                // Output columns whose input column ox·s + kx − padding lies in 0..w.
                let first = self.padding.saturating_sub(kx).div_ceil(s);
                let end = ((w + self.padding).saturating_sub(kx)).div_ceil(s).min(ow);
                if first >= end {
                    continue;
                }
                for oy in 0..oh {
                    let Some(iy) = self.source(oy, ky, h) else { continue };
                    let ix = first * s + kx - self.padding;
                    f(tap, oy * ow + first, iy * w + ix, end - first);
                }
            }
        }
    }

    /// im2col of the batch: (B, C, H, W) → (C·KH·KW) × (B·OH·OW), row c·KH·KW + tap holding
    /// what that tap of channel c sees at every output position of every image (0 in padding).
    fn columns(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        planes: Planes,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        let (oh, ow) = self.output(h, w);
        let (taps, l, s) = (self.kh * self.kw, oh * ow, self.stride);
        let n = b * l;
        let mut cols = vec![0f32; c * taps * n];
        cols.par_chunks_mut(taps * n).enumerate().for_each(|(ch, rows)| {
            crate::base::simd::vectorized!(for bi in 0..b {
                let src = &x[planes.index(bi, ch, b, c) * h * w..][..h * w];
                self.for_each_run(h, w, |tap, pos, input, count| {
                    let dst = &mut rows[tap * n + bi * l + pos..][..count];
                    if s == 1 {
                        dst.copy_from_slice(&src[input..input + count]);
                    } else {
                        dst.iter_mut().enumerate().for_each(|(i, d)| *d = src[input + i * s]);
                    }
                });
            })
        });
        cols
    }

    /// The adjoint of [`ConvGeometry::columns`]: each column entry added back to the input
    /// position it came from, one thread per (image, channel) plane in a fixed order.
    fn col2im(
        &self,
        cols: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        planes: Planes,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        let (oh, ow) = self.output(h, w);
        let (taps, l, s) = (self.kh * self.kw, oh * ow, self.stride);
        let n = b * l;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(plane, dst)| {
            let (bi, ch) = planes.plane(plane, b, c);
            let rows = &cols[ch * taps * n..(ch + 1) * taps * n];
            crate::base::simd::vectorized!(self.for_each_run(h, w, |tap, pos, input, count| {
                let src = &rows[tap * n + bi * l + pos..][..count];
                if s == 1 {
                    dst[input..input + count].iter_mut().zip(src).for_each(|(d, v)| *d += v);
                } else {
                    src.iter().enumerate().for_each(|(i, v)| dst[input + i * s] += v);
                }
            }))
        });
        out
    }
}

/// (R, C, L) → (C, R, L): between the batch-wide product's (O, B·L) layout and the tensor's
/// (B, O, L), both ways.
fn swap_outer(src: &[f32], r: usize, c: usize, l: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(l).enumerate().for_each(|(p, dst)| {
        let (ci, ri) = (p / r, p % r);
        dst.copy_from_slice(&src[(ri * c + ci) * l..][..l]);
    });
    out
}

/// The convolution as a custom op: y = W · im2col(x) for the whole batch at once, so each of
/// the three products (forward, weight gradient, input gradient) is one large GEMM with the
/// batch in its long dimension, and the kernel is never copied per image.
struct ConvGemm {
    geometry: ConvGeometry,
    planes: Planes,
    /// im2col of the forward input, kept for the weight gradient (None when the input is its
    /// own im2col: a channel-major 1×1 convolution).
    columns: Arc<Mutex<Option<Vec<f32>>>>,
}

impl ConvGemm {
    /// Whether im2col is the identity: a 1×1, stride-1, unpadded convolution of channel-major
    /// planes, whose (C, B·H·W) input already is the product's right-hand side.
    fn columns_are_input(&self) -> bool {
        let g = &self.geometry;
        self.planes == Planes::ChannelMajor && (g.kh, g.kw, g.stride, g.padding) == (1, 1, 1, 0)
    }

    /// (B, C, H, W) and (OH, OW) from the input's shape.
    fn sizes(
        &self,
        dims: (usize, usize, usize, usize),
    ) -> ((usize, usize, usize, usize), (usize, usize)) {
        let (d0, d1, h, w) = dims;
        let (b, c) = self.planes.batch_channels(d0, d1);
        ((b, c, h, w), self.geometry.output(h, w))
    }
}

impl candle_core::CustomOp2 for ConvGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let ((b, c, h, w), (oh, ow)) = self.sizes(l1.shape().dims4()?);
        let (o, ci, kh, kw) = l2.shape().dims4()?;
        if ci != c || (kh, kw) != (self.geometry.kh, self.geometry.kw) {
            candle_core::bail!(
                "conv2d-gemm: input {:?} and kernel {:?} disagree",
                l1.shape(),
                (o, ci, kh, kw)
            );
        }
        let x = crate::base::cpu::contiguous(self.name(), s1, l1)?;
        let weight = crate::base::cpu::contiguous(self.name(), s2, l2)?;
        let (k, n) = (c * kh * kw, b * oh * ow);
        let y = if self.columns_are_input() {
            crate::base::sparse::gemm_f32(o, n, k, weight, k, 1, x, n, 1)
        } else {
            let cols = self.geometry.columns(x, (b, c, h, w), self.planes);
            let y = crate::base::sparse::gemm_f32(o, n, k, weight, k, 1, &cols, n, 1);
            *self.columns.lock().unwrap() = Some(cols);
            y
        };
        Ok(match self.planes {
            Planes::ImageMajor => {
                (candle_core::CpuStorage::F32(swap_outer(&y, o, b, oh * ow)), (b, o, oh, ow).into())
            }
            Planes::ChannelMajor => (candle_core::CpuStorage::F32(y), (o, b, oh, ow).into()),
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::base::cpu::{cpu_tensor, with_cpu_slice};
        use crate::base::sparse::gemm_f32;
        let (dims, (oh, ow)) = self.sizes(x.dims4()?);
        let (b, c, _, _) = dims;
        let (o, _, kh, kw) = weight.dims4()?;
        let (k, n) = (c * kh * kw, b * oh * ow);
        let grad = grad.contiguous()?;
        let kept = self.columns.lock().unwrap().take();
        let (dw, dx) = with_cpu_slice(&grad, |g| {
            with_cpu_slice(x, |xs| {
                // G as the (O, B·OH·OW) product it is the gradient of.
                let swapped;
                let g = match self.planes {
                    Planes::ImageMajor => {
                        swapped = swap_outer(g, b, o, oh * ow);
                        &swapped[..]
                    }
                    Planes::ChannelMajor => g,
                };
                let recomputed;
                let cols = match (&kept, self.columns_are_input()) {
                    (_, true) => xs,
                    (Some(cols), false) => &cols[..],
                    (None, false) => {
                        recomputed = self.geometry.columns(xs, dims, self.planes);
                        &recomputed[..]
                    }
                };
                // dW = G · colsᵀ; d(cols) = Wᵀ · G, folded back onto the input (only when it
                // needs one).
                let dw = gemm_f32(o, k, n, g, n, 1, cols, 1, n);
                let dx = x
                    .track_op()
                    .then(|| {
                        with_cpu_slice(weight, |wt| gemm_f32(k, n, o, wt, 1, k, g, n, 1)).map(
                            |dcols| match self.columns_are_input() {
                                true => dcols,
                                false => self.geometry.col2im(&dcols, dims, self.planes),
                            },
                        )
                    })
                    .transpose()?;
                Ok::<_, candle_core::Error>((dw, dx))
            })
        })???;
        drop(kept);
        Ok((
            dx.map(|dx| cpu_tensor(dx, x.shape())).transpose()?,
            Some(cpu_tensor(dw, (o, c, kh, kw))?),
        ))
    }
}

/// x · sigmoid(1.702 x), OpenAI CLIP's activation.
pub fn quick_gelu(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.for_tensor(x).is_host() {
        return Ok(x.contiguous()?.apply_op1(super::fused::QuickGelu)?);
    }
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
        let normed = self.normalize_rows(&rows, train)?;
        Ok(normed.reshape((c, b, h, w))?.transpose(0, 1)?.contiguous()?)
    }

    /// BatchNorm of (C, N) rows, one channel per row, with candle ops.
    fn normalize_rows(&self, rows: &Tensor, train: bool) -> Result<Tensor> {
        let (c, n) = rows.dims2()?;
        let (mean, var) = if train && self.trainable {
            let mean = rows.mean_keepdim(1)?;
            let var = rows.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            let flat = |t: &Tensor| t.detach().flatten_all();
            self.update_running(&flat(&mean)?, &flat(&var)?, n as f64)?;
            (mean, var)
        } else {
            (
                self.running_mean.lock().unwrap().reshape((c, 1))?,
                self.running_var.lock().unwrap().reshape((c, 1))?,
            )
        };
        let scale =
            (var + self.eps)?.sqrt()?.recip()?.broadcast_mul(&self.weight.reshape((c, 1))?)?;
        Ok(rows
            .broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape((c, 1))?)?)
    }

    /// Folds a batch's per-channel mean and biased variance (over `n` values each) into the
    /// running statistics, as PyTorch does (the variance made unbiased).
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: f64) -> Result<()> {
        let mut rm = self.running_mean.lock().unwrap();
        let mut rv = self.running_var.lock().unwrap();
        *rm = ((&*rm * (1.0 - self.momentum))? + (mean * self.momentum)?)?;
        *rv =
            ((&*rv * (1.0 - self.momentum))? + (var * (self.momentum * n / (n - 1.0).max(1.0)))?)?;
        Ok(())
    }

    /// `forward` (then a ReLU when `relu`) of channel-major (C, B, H, W) activations, ResNet's
    /// CPU training layout (`Planes::ChannelMajor`). Training-mode normalisation of f32 on the
    /// CPU is one fused op: two passes over x forward and two backward, per channel in
    /// parallel, where the candle graph makes a dozen; statistics in f64; equal to `forward` to
    /// float rounding (tested in value, gradients and running statistics). The ReLU runs inside
    /// it, which saves the ReLU's graph nodes.
    pub fn forward_channel_major(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (c, b, h, w) = x.dims4()?;
        let fused = train && self.trainable && x.device().is_cpu() && x.dtype() == DType::F32;
        if !fused {
            let y = self.normalize_rows(&x.reshape((c, b * h * w))?, train)?.reshape(x.shape())?;
            return Ok(if relu { y.relu()? } else { y });
        }
        let op = BatchNormTrain { eps: self.eps, relu, stats: Default::default() };
        let stats = op.stats.clone();
        let y = x.contiguous()?.apply_op3(&self.weight, &self.bias, op)?;
        let stats = stats.lock().unwrap().clone();
        anyhow::ensure!(stats.len() == c, "batch-norm statistics missing");
        let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        let var: Vec<f32> = stats.iter().map(|s| s.1 as f32).collect();
        let device = x.device();
        self.update_running(
            &Tensor::from_vec(mean, c, device)?,
            &Tensor::from_vec(var, c, device)?,
            (b * h * w) as f64,
        )?;
        Ok(y)
    }
}

/// Per-channel (mean, biased variance) of one batch, shared between a forward and its backward.
type ChannelStats = std::sync::Arc<Mutex<Vec<(f64, f64)>>>;

/// Training-mode BatchNorm of channel-major (C, B, H, W) with weight and bias (C,) on the CPU:
/// each channel is one contiguous row of B·H·W values.
struct BatchNormTrain {
    eps: f64,
    /// max(0, ·) on the output; the backward then passes gradient only where the output is > 0.
    relu: bool,
    stats: ChannelStats,
}

impl BatchNormTrain {
    /// (1/√(var + eps)) per channel.
    fn inverse_std(&self, stats: &[(f64, f64)]) -> Vec<f64> {
        stats.iter().map(|&(_, var)| 1.0 / (var + self.eps).sqrt()).collect()
    }
}

/// Σ f(v) in f64 over eight interleaved partial sums (vectorisable; a fixed order).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    lane_dot(xs, xs, |v, _| f(v))
}

/// Σ f(a_i, b_i) in f64 over eight interleaved partial sums.
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let whole = a.len() / 8 * 8;
    for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += f(ca[j], cb[j]);
        }
    }
    let tail: f64 = a[whole..].iter().zip(&b[whole..]).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f64>() + tail
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (c, b, h, w) = l1.shape().dims4()?;
        let x = crate::base::cpu::contiguous("batch-norm", s1, l1)?;
        let gamma = crate::base::cpu::contiguous("batch-norm", s2, l2)?;
        let beta = crate::base::cpu::contiguous("batch-norm", s3, l3)?;
        let (hw, len) = (h * w, b * h * w);
        let n = len as f64;
        let stats: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let row = &x[ch * len..(ch + 1) * len];
                crate::base::simd::vectorized!({
                    let mean = lane_sum(row, |v| v as f64) / n;
                    let sq = lane_sum(row, |v| (v as f64 - mean) * (v as f64 - mean));
                    (mean, sq / n)
                })
            })
            .collect();
        let inv = self.inverse_std(&stats);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw.max(1)).enumerate().for_each(|(p, dst)| {
            let ch = p / b.max(1);
            let scale = gamma[ch] as f64 * inv[ch];
            let (scale, shift) = (scale as f32, (beta[ch] as f64 - stats[ch].0 * scale) as f32);
            crate::base::simd::vectorized!({
                for (d, &v) in dst.iter_mut().zip(&x[p * hw..(p + 1) * hw]) {
                    *d = v * scale + shift;
                }
                if self.relu {
                    dst.iter_mut().for_each(|d| *d = d.max(0.0));
                }
            })
        });
        *self.stats.lock().unwrap() = stats;
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::base::cpu::with_cpu_slice;
        use rayon::prelude::*;
        let (c, b, h, w) = x.dims4()?;
        let (hw, len) = (h * w, b * h * w);
        let n = len as f64;
        let stats = self.stats.lock().unwrap().clone();
        let inv = self.inverse_std(&stats);
        let gamma = with_cpu_slice(gamma, <[f32]>::to_vec)?;
        let grad = match self.relu {
            true => super::fused::relu_backward(grad, res)?,
            false => grad.contiguous()?,
        };
        let (dx, dgamma, dbeta) = with_cpu_slice(x, |x| {
            with_cpu_slice(&grad, |g| {
                // Per channel: Σ g and Σ g·x̂.
                let sums: Vec<(f64, f64)> = (0..c)
                    .into_par_iter()
                    .map(|ch| {
                        let mean = stats[ch].0;
                        let (xr, gr) = (&x[ch * len..(ch + 1) * len], &g[ch * len..(ch + 1) * len]);
                        let (sg, sgx) = crate::base::simd::vectorized!((
                            lane_sum(gr, |gv| gv as f64),
                            lane_dot(gr, xr, |gv, v| gv as f64 * (v as f64 - mean))
                        ));
                        (sg, sgx * inv[ch])
                    })
                    .collect();
                // dx = γ/σ · (g − Σg/N − x̂·Σ(g·x̂)/N) = k·g − k·Σg/N − (k·σ⁻¹·Σ(g·x̂)/N)·(x − mean),
                // per-channel constants in f64, the pass in f32.
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(hw.max(1)).enumerate().for_each(|(p, dst)| {
                    let ch = p / b.max(1);
                    let k = gamma[ch] as f64 * inv[ch];
                    let (mg, mgx) = (sums[ch].0 / n, sums[ch].1 / n);
                    let (kf, shift, slope, mean) = (
                        k as f32,
                        (-k * mg) as f32,
                        (-k * inv[ch] * mgx) as f32,
                        stats[ch].0 as f32,
                    );
                    let (xp, gp) = (&x[p * hw..(p + 1) * hw], &g[p * hw..(p + 1) * hw]);
                    crate::base::simd::vectorized!({
                        for ((d, &v), &gv) in dst.iter_mut().zip(xp).zip(gp) {
                            *d = kf * gv + shift + slope * (v - mean);
                        }
                    })
                });
                let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
                let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
                (dx, dgamma, dbeta)
            })
        })??;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (c, b, h, w), device)?),
            Some(Tensor::from_vec(dgamma, c, device)?),
            Some(Tensor::from_vec(dbeta, c, device)?),
        ))
    }
}

/// 3×3 max-pool, stride 2, padding 1, on non-negative input (after ReLU), built from narrow,
/// reshape and elementwise maximum so that its backward works (candle's max_pool2d backward
/// needs kernel == stride). Zero padding equals PyTorch's −∞ padding on non-negative input.
///
/// With host kernels, one op (`fused::MaxPool3x3S2`: PyTorch's −∞ padding and first-maximum
/// gradient) instead.
pub fn max_pool_3x3_s2(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.for_tensor(x).is_host() {
        return Ok(x.contiguous()?.apply_op1(super::fused::MaxPool3x3S2)?);
    }
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

#[cfg(test)]
mod conv_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn gap(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Against candle's `conv2d` (value and both gradients) on every shape ResNet-50 uses: 1×1,
    /// strided 1×1, 3×3, strided 3×3 and the strided 7×7 stem, odd sizes.
    #[test]
    fn gemm_convolution_equals_candles_in_value_and_gradient() {
        let dev = Device::Cpu;
        let shapes = [
            (5, 4, 1, 1, 0, 9),
            (5, 4, 1, 2, 0, 9),
            (3, 6, 3, 1, 1, 8),
            (4, 3, 3, 2, 1, 9),
            (3, 2, 7, 2, 3, 13),
            // Smaller than the kernel: some taps see only padding.
            (2, 3, 7, 2, 3, 3),
            (2, 3, 5, 1, 2, 2),
        ];
        for (ci, co, k, s, p, n) in shapes {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, ci, n, n), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev).unwrap()).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
            let up = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
            let g2 = (&theirs * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for planes in [Planes::ImageMajor, Planes::ChannelMajor] {
                // Channel-major in and out: transposed around the op, so the comparison (and
                // the gradient reaching x) is in candle's layout.
                let ours = match planes {
                    Planes::ImageMajor => conv2d_gemm(x.as_tensor(), w.as_tensor(), p, s, planes),
                    Planes::ChannelMajor => {
                        let xc = x.as_tensor().transpose(0, 1).unwrap();
                        conv2d_gemm(&xc, w.as_tensor(), p, s, planes)
                            .map(|y| y.transpose(0, 1).unwrap())
                    }
                }
                .unwrap();
                let what = format!("{planes:?} k {k} s {s}");
                assert_eq!(ours.dims(), theirs.dims(), "{what}");
                assert!(gap(&ours, &theirs) < 1e-5, "{what}: values differ");
                let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &w] {
                    let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                    assert!(gap(a, b) < 1e-4, "{what}: gradients differ by {}", gap(a, b));
                }
            }
        }
        // An input that needs no gradient (the pixels): the kernel's gradient alone, the same.
        let x = Tensor::randn(0f32, 1.0, (3, 3, 11, 11), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 3, 7, 7), &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 4, 3, 3), &dev).unwrap();
        let ours = conv2d_gemm(&x, w.as_tensor(), 3, 4, Planes::ImageMajor).unwrap();
        let theirs = x.conv2d(w.as_tensor(), 3, 4, 1, 1).unwrap();
        let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g1.get(&x).is_none());
        assert!(gap(g1.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap()) < 1e-4);
    }
}

#[cfg(test)]
mod batch_norm_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn gap(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn layer(c: usize, dev: &Device) -> (BatchNorm, Var, Var) {
        let weight = Var::from_tensor(&Tensor::randn(1f32, 0.2, c, dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.2, c, dev).unwrap()).unwrap();
        let bn = BatchNorm {
            name: "bn".into(),
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
            running_mean: Mutex::new(Tensor::randn(0f32, 0.2, c, dev).unwrap()),
            running_var: Mutex::new(Tensor::ones(c, candle_core::DType::F32, dev).unwrap()),
            eps: 1e-5,
            momentum: 0.1,
            trainable: true,
        };
        (bn, weight, bias)
    }

    /// The fused (channel-major) op against the candle graph: output, the three gradients,
    /// running statistics; with and without the ReLU folded in.
    #[test]
    fn fused_training_batch_norm_equals_the_graph() {
        let dev = Device::Cpu;
        for relu in [false, true] {
            let (bn, weight, bias) = layer(4, &dev);
            let x = Var::from_tensor(&(Tensor::randn(0.5f32, 2.0, (3, 4, 5, 6), &dev).unwrap()))
                .unwrap();
            let up = Tensor::randn(0f32, 1.0, (3, 4, 5, 6), &dev).unwrap();
            let (rm0, rv0) =
                (bn.running_mean.lock().unwrap().clone(), bn.running_var.lock().unwrap().clone());
            let graph = bn.forward(x.as_tensor(), true).unwrap();
            let graph = if relu { graph.relu().unwrap() } else { graph };
            let (rm1, rv1) =
                (bn.running_mean.lock().unwrap().clone(), bn.running_var.lock().unwrap().clone());
            *bn.running_mean.lock().unwrap() = rm0;
            *bn.running_var.lock().unwrap() = rv0;
            let channel_major = x.as_tensor().transpose(0, 1).unwrap();
            let fused = bn.forward_channel_major(&channel_major, true, relu).unwrap();
            let fused = fused.transpose(0, 1).unwrap();
            assert!(gap(&graph, &fused) < 1e-5, "values differ by {}", gap(&graph, &fused));
            assert!(gap(&rm1, &bn.running_mean.lock().unwrap()) < 1e-6);
            assert!(gap(&rv1, &bn.running_var.lock().unwrap()) < 1e-5);
            let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("weight", &weight), ("bias", &bias)] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(gap(a, b) < 1e-4, "relu {relu} {name}: gradients differ by {}", gap(a, b));
            }
        }
    }
}
