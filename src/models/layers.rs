//! Differentiable building blocks. candle's fused LayerNorm and softmax_last_dim have no
//! backward (docs/candle.md), so these are compositions of ops that all have one.

use std::sync::Mutex;

use anyhow::Result;
use candle_core::{IndexOp, Tensor, D};

/// LayerNorm over the last dimension: (x − mean) / √(var + eps) · w + b.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.broadcast_matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let low = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        Ok(y)
    }
}

/// A 2-D convolution (one group, no dilation) on the CPU as im2col + one matrix product per
/// image, so that training's backward runs through GEMMs and a col2im instead of candle's
/// convolution backward (its input gradient is a direct transposed convolution, many times
/// slower on the CPU). Equal to `conv2d` up to the order of float sums (tested in value and
/// gradients). x: (B, C, H, W) f32 on the CPU, w: (O, C, KH, KW) → (B, O, OH, OW).
pub fn conv2d_gemm(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, width) = x.dims4()?;
    let (o, ci, kh, kw) = w.dims4()?;
    anyhow::ensure!(ci == c, "convolution of {c} channels with a kernel for {ci}");
    let geometry = Im2Col { kh, kw, stride, padding };
    let (oh, ow) = geometry.output(h, width);
    let columns = if (kh, kw, stride, padding) == (1, 1, 1, 0) {
        x.reshape((b, c, h * width))?
    } else {
        x.contiguous()?.apply_op1(geometry)?
    };
    let y = w.reshape((o, c * kh * kw))?.broadcast_matmul(&columns)?;
    Ok(y.reshape((b, o, oh, ow))?)
}

/// (B, C, H, W) → (B, C·KH·KW, OH·OW): row c·KH·KW + ky·KW + kx holds what kernel tap (ky, kx)
/// of channel c sees at every output position (zeros in the padding). Its backward is
/// [`Col2Im`].
#[derive(Clone, Copy)]
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn output(&self, h: usize, w: usize) -> (usize, usize) {
        let out = |n: usize, k: usize| (n + 2 * self.padding - k) / self.stride + 1;
        (out(h, self.kh), out(w, self.kw))
    }

    /// The input position of output `o` under tap `k` along an axis of length `n`, if inside.
    fn source(&self, o: usize, k: usize, n: usize) -> Option<usize> {
        (o * self.stride + k).checked_sub(self.padding).filter(|&i| i < n)
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (b, c, h, w) = layout.shape().dims4()?;
        let data = crate::base::cpu::contiguous("im2col", storage, layout)?;
        let (oh, ow) = self.output(h, w);
        let (taps, n) = (self.kh * self.kw, oh * ow);
        let mut out = vec![0f32; b * c * taps * n];
        out.par_chunks_mut(taps * n).enumerate().for_each(|(plane, cols)| {
            let src = &data[plane * h * w..(plane + 1) * h * w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut cols[(ky * self.kw + kx) * n..][..n];
                    for oy in 0..oh {
                        let Some(iy) = self.source(oy, ky, h) else { continue };
                        let (line, dst) = (&src[iy * w..(iy + 1) * w], &mut row[oy * ow..][..ow]);
                        for (ox, d) in dst.iter_mut().enumerate() {
                            if let Some(ix) = self.source(ox, kx, w) {
                                *d = line[ix];
                            }
                        }
                    }
                }
            }
        });
        Ok((candle_core::CpuStorage::F32(out), (b, c * taps, n).into()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im { geometry: *self, h, w })?))
    }
}

/// The adjoint of [`Im2Col`]: (B, C·KH·KW, OH·OW) → (B, C, H, W), each column entry added
/// back to the input position it came from (one thread per (image, channel) plane, in a fixed
/// order: deterministic).
struct Col2Im {
    geometry: Im2Col,
    h: usize,
    w: usize,
}

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let g = &self.geometry;
        let (b, rows, n) = layout.shape().dims3()?;
        let (h, w) = (self.h, self.w);
        let (oh, ow) = g.output(h, w);
        let taps = g.kh * g.kw;
        let c = rows / taps;
        if rows != c * taps || n != oh * ow {
            candle_core::bail!("col2im: ({b}, {rows}, {n}) does not fit the geometry");
        }
        let cols = crate::base::cpu::contiguous("col2im", storage, layout)?;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(plane, dst)| {
            let src = &cols[plane * taps * n..(plane + 1) * taps * n];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = &src[(ky * g.kw + kx) * n..][..n];
                    for oy in 0..oh {
                        let Some(iy) = g.source(oy, ky, h) else { continue };
                        let line = &mut dst[iy * w..(iy + 1) * w];
                        for (ox, &v) in row[oy * ow..][..ow].iter().enumerate() {
                            if let Some(ix) = g.source(ox, kx, w) {
                                line[ix] += v;
                            }
                        }
                    }
                }
            }
        });
        Ok((candle_core::CpuStorage::F32(out), (b, c, h, w).into()))
    }
}

/// x · sigmoid(1.702 x), OpenAI CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
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
        let (mean, var) = if train && self.trainable {
            let n = (b * h * w) as f64;
            let mean = rows.mean_keepdim(1)?;
            let var = rows.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            let mut rm = self.running_mean.lock().unwrap();
            let mut rv = self.running_var.lock().unwrap();
            *rm = ((&*rm * (1.0 - self.momentum))?
                + (mean.detach().flatten_all()? * self.momentum)?)?;
            *rv = ((&*rv * (1.0 - self.momentum))?
                + (var.detach().flatten_all()? * (self.momentum * n / (n - 1.0).max(1.0)))?)?;
            (mean, var)
        } else {
            (
                self.running_mean.lock().unwrap().reshape((c, 1))?,
                self.running_var.lock().unwrap().reshape((c, 1))?,
            )
        };
        let scale =
            (var + self.eps)?.sqrt()?.recip()?.broadcast_mul(&self.weight.reshape((c, 1))?)?;
        let normed = rows
            .broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape((c, 1))?)?;
        Ok(normed.reshape((c, b, h, w))?.transpose(0, 1)?.contiguous()?)
    }
}

/// 3×3 max-pool, stride 2, padding 1, on non-negative input (after ReLU), built from narrow,
/// reshape and elementwise maximum so that its backward works (candle's max_pool2d backward
/// needs kernel == stride). Zero padding equals PyTorch's −∞ padding on non-negative input.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
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
        ];
        for (ci, co, k, s, p, n) in shapes {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, ci, n, n), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev).unwrap()).unwrap();
            let ours = conv2d_gemm(x.as_tensor(), w.as_tensor(), p, s).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k {k} s {s}");
            assert!(gap(&ours, &theirs) < 1e-5, "k {k} s {s}: values differ");
            let up = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(gap(a, b) < 1e-4, "k {k} s {s}: gradients differ by {}", gap(a, b));
            }
        }
    }
}
