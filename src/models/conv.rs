//! 2-D convolution on the CPU as batch-wide GEMMs (im2col / col2im), with the activation layout
//! it works in. Training uses it for ResNet (channel-major activations, no layout copies) and
//! CLIP's patch embedding; GPUs and inference keep candle's `conv2d`.

use crate::base::grad_sink::GradSink;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::Tensor;

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
    let op = ConvGemm::new((kh, kw), padding, stride, planes);
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

    /// im2col of the batch (its B·C planes ordered as `planes` says) → (C·KH·KW) × (B·OH·OW),
    /// row c·KH·KW + tap holding what that tap of channel c sees at every output position of
    /// every image (0 in padding).
    fn columns(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        planes: Planes,
    ) -> Vec<f32> {
        let (oh, ow) = self.output(h, w);
        let (taps, l, s) = (self.kh * self.kw, oh * ow, self.stride);
        let n = b * l;
        // Written once: the runs copy the input, and the padding between them (and after the
        // last) is zeroed as the runs pass it, so the buffer needs no zero-fill first.
        crate::base::cpu::par_filled(c * taps * n, taps * n, |ch, rows| {
            crate::base::simd::vectorized!(for bi in 0..b {
                let src = &x[planes.index(bi, ch, b, c) * h * w..][..h * w];
                // Next unwritten (tap, position) of this image's segments.
                let mut at = (0, 0);
                self.for_each_run(h, w, |tap, pos, input, count| {
                    zero_gap(rows, (n, l, bi), &mut at, (tap, pos));
                    let dst = &mut rows[tap * n + bi * l + pos..][..count];
                    if s == 1 {
                        dst.copy_from_slice(&src[input..input + count]);
                    } else {
                        dst.iter_mut().enumerate().for_each(|(i, d)| *d = src[input + i * s]);
                    }
                    at = (tap, pos + count);
                });
                zero_gap(rows, (n, l, bi), &mut at, (taps, 0));
            })
        })
    }

    /// The adjoint of [`ConvGeometry::columns`]: each column entry added back to the input
    /// position it came from, one thread per (image, channel) plane in a fixed order.
    fn col2im(
        &self,
        cols: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        planes: Planes,
    ) -> Vec<f32> {
        let (oh, ow) = self.output(h, w);
        let (taps, l, s) = (self.kh * self.kw, oh * ow, self.stride);
        let n = b * l;
        // Each plane zeroed by its own task (a zero-filled buffer would be one serial memset).
        crate::base::cpu::par_filled(b * c * h * w, h * w, |plane, dst| {
            dst.fill(0.0);
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
        })
    }
}

/// (R, C, L) → (C, R, L): between the batch-wide product's (O, B·L) layout and the tensor's
/// (B, O, L), both ways.
fn swap_outer(src: &[f32], r: usize, c: usize, l: usize) -> Vec<f32> {
    crate::base::cpu::par_filled(src.len(), l, |p, dst| {
        let (ci, ri) = (p / r, p % r);
        dst.copy_from_slice(&src[(ri * c + ci) * l..][..l]);
    })
}

/// The convolution as a custom op: y = W · im2col(x) for the whole batch at once, so each of
/// the three products (forward, weight gradient, input gradient) is one large GEMM with the
/// batch in its long dimension, and the kernel is never copied per image.
pub(crate) struct ConvGemm {
    geometry: ConvGeometry,
    planes: Planes,
    /// im2col of the forward input, kept for the weight gradient (None when the input is its
    /// own im2col: a channel-major 1×1 convolution).
    columns: Arc<Mutex<Option<Vec<f32>>>>,
    /// Where the kernel's gradient goes when it is a variable (`GradSink::active`).
    pub(crate) sink: Option<GradSink>,
}

impl ConvGemm {
    /// The op for a kernel (O, C, KH, KW) at `padding` and `stride`.
    pub(crate) fn new(
        kernel: (usize, usize),
        padding: usize,
        stride: usize,
        planes: Planes,
    ) -> Self {
        let (kh, kw) = kernel;
        ConvGemm {
            geometry: ConvGeometry { kh, kw, stride, padding },
            planes,
            columns: Default::default(),
            sink: GradSink::active(),
        }
    }

    /// The batch-wide product W · im2col(x), (O, B·OH·OW), and the columns to keep for the
    /// backward pass (None when the input is its own im2col).
    pub(crate) fn product(
        &self,
        x: &[f32],
        weight: &[f32],
        dims: (usize, usize, usize, usize),
        o: usize,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let (b, c, h, w) = dims;
        let (oh, ow) = self.geometry.output(h, w);
        let (k, n) = (c * self.geometry.kh * self.geometry.kw, b * oh * ow);
        if self.columns_are_input() {
            return (crate::base::gemm::gemm_f32(o, n, k, weight, k, 1, x, n, 1), None);
        }
        let cols = self.geometry.columns(x, dims, self.planes);
        (crate::base::gemm::gemm_f32(o, n, k, weight, k, 1, &cols, n, 1), Some(cols))
    }

    /// (dW, dx) from `g`, the gradient of the product (O, B·OH·OW): dW = G · colsᵀ and, when
    /// `need_dx`, d(cols) = Wᵀ · G folded back onto the input. `kept`: the forward's columns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product_backward(
        &self,
        g: &[f32],
        x: &[f32],
        weight: &[f32],
        kept: Option<&[f32]>,
        dims: (usize, usize, usize, usize),
        o: usize,
        need_dx: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        use crate::base::gemm::gemm_f32;
        let (b, c, h, w) = dims;
        let (oh, ow) = self.geometry.output(h, w);
        let (k, n) = (c * self.geometry.kh * self.geometry.kw, b * oh * ow);
        let recomputed;
        let cols = match (kept, self.columns_are_input()) {
            (_, true) => x,
            (Some(cols), false) => cols,
            (None, false) => {
                recomputed = self.geometry.columns(x, dims, self.planes);
                &recomputed[..]
            }
        };
        let dw = gemm_f32(o, k, n, g, n, 1, cols, 1, n);
        let dx = need_dx.then(|| {
            let dcols = gemm_f32(k, n, o, weight, 1, k, g, n, 1);
            match self.columns_are_input() {
                true => dcols,
                false => self.geometry.col2im(&dcols, dims, self.planes),
            }
        });
        (dw, dx)
    }

    /// Whether im2col is the identity: a 1×1, stride-1, unpadded convolution of channel-major
    /// planes, whose (C, B·H·W) input already is the product's right-hand side.
    fn columns_are_input(&self) -> bool {
        let g = &self.geometry;
        self.planes == Planes::ChannelMajor && (g.kh, g.kw, g.stride, g.padding) == (1, 1, 1, 0)
    }

    /// (B, C, H, W) and (OH, OW) from the input's shape.
    pub(crate) fn sizes(
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
        let (y, cols) = self.product(x, weight, (b, c, h, w), o);
        *self.columns.lock().unwrap() = cols;
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
        let (dims, (oh, ow)) = self.sizes(x.dims4()?);
        let b = dims.0;
        let o = weight.dim(0)?;
        let grad = grad.contiguous()?;
        let kept = self.columns.lock().unwrap().take();
        let (dw, dx) = with_cpu_slice(&grad, |g| {
            with_cpu_slice(x, |xs| {
                with_cpu_slice(weight, |wt| {
                    // G as the (O, B·OH·OW) product it is the gradient of.
                    let swapped;
                    let g = match self.planes {
                        Planes::ImageMajor => {
                            swapped = swap_outer(g, b, o, oh * ow);
                            &swapped[..]
                        }
                        Planes::ChannelMajor => g,
                    };
                    self.product_backward(g, xs, wt, kept.as_deref(), dims, o, x.track_op())
                })
            })
        })???;
        Ok((
            dx.map(|dx| cpu_tensor(dx, x.shape())).transpose()?,
            GradSink::route(self.sink.as_ref(), weight, dw)?,
        ))
    }
}

/// Zeroes image `bi`'s column entries from `at` up to `to` ((tap, position) pairs, in order)
/// and moves `at` there: the padding `ConvGeometry::columns` does not copy. `rows` holds a
/// channel's taps, each `n` = B·L wide, image `bi`'s L positions at `bi`·L.
#[inline(always)]
fn zero_gap(
    rows: &mut [f32],
    (n, l, bi): (usize, usize, usize),
    at: &mut (usize, usize),
    to: (usize, usize),
) {
    while *at < to {
        let end = if at.0 == to.0 { to.1 } else { l };
        rows[at.0 * n + bi * l + at.1..at.0 * n + bi * l + end].fill(0.0);
        *at = if at.0 == to.0 { to } else { (at.0 + 1, 0) };
    }
}

#[cfg(test)]
mod conv_tests {
    use super::*;
    use crate::models::test_util::gap;
    use candle_core::{Device, Var};

    /// im2col writes every entry — what the tap sees, 0 in padding — into a buffer it does not
    /// zero first: against the entry-by-entry definition, the allocator holding NaNs before.
    #[test]
    fn columns_write_every_entry_and_zero_the_padding() {
        let (b, c) = (2, 3);
        for (k, stride, padding, side) in [(3, 1, 1, 5), (7, 2, 3, 9), (5, 1, 2, 2), (1, 2, 0, 5)] {
            let g = ConvGeometry { kh: k, kw: k, stride, padding };
            let x: Vec<f32> = (0..b * c * side * side).map(|i| i as f32 + 1.0).collect();
            let (oh, ow) = g.output(side, side);
            let (l, n) = (oh * ow, b * oh * ow);
            for planes in [Planes::ImageMajor, Planes::ChannelMajor] {
                drop(std::hint::black_box(vec![f32::NAN; c * k * k * n]));
                let cols = g.columns(&x, (b, c, side, side), planes);
                assert_eq!(cols.len(), c * k * k * n);
                for (ch, tap, bi, o) in (0..c * k * k * b * l)
                    .map(|i| (i / (k * k * b * l), i / (b * l) % (k * k), i / l % b, i % l))
                {
                    let at = |o: usize, t: usize| (o * stride + t).checked_sub(padding);
                    let want = match (at(o / ow, tap / k), at(o % ow, tap % k)) {
                        (Some(iy), Some(ix)) if iy < side && ix < side => {
                            x[planes.index(bi, ch, b, c) * side * side + iy * side + ix]
                        }
                        _ => 0.0,
                    };
                    let got = cols[(ch * k * k + tap) * n + bi * l + o];
                    assert_eq!(got, want, "k {k} s {stride} {planes:?}: ({ch}, {tap}, {bi}, {o})");
                }
            }
        }
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
            // B·OH·OW = 8192: the weight gradient's long contraction is split (base::gemm).
            (2, 3, 3, 1, 1, 64),
            (4, 5, 1, 1, 0, 64),
        ];
        for (ci, co, k, s, p, n) in shapes {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, ci, n, n), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev).unwrap()).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
            let long_sums = theirs.dims()[0] * theirs.dims()[2] * theirs.dims()[3] >= 8192;
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
                    // Sums over ≥ 8,192 pixels round by more than 1e-4 in both
                    // implementations: there the bound is relative to the gradient's size.
                    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    let tol = if long_sums { 1e-4 * scale.max(1.0) } else { 1e-4 };
                    assert!(gap(a, b) < tol, "{what}: gradients differ by {}", gap(a, b));
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
