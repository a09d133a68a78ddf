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

    /// Every (column entry, input position) pair of one (image, channel) plane of h × w, in a
    /// fixed order: `f(index in the plane's KH·KW × OH·OW columns, index in the plane)`.
    /// Padding positions have no pair.
    fn for_each_pair(&self, h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
        let (oh, ow) = self.output(h, w);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let row = (ky * self.kw + kx) * oh * ow;
                for oy in 0..oh {
                    let Some(iy) = self.source(oy, ky, h) else { continue };
                    for ox in 0..ow {
                        if let Some(ix) = self.source(ox, kx, w) {
                            f(row + oy * ow + ox, iy * w + ix);
                        }
                    }
                }
            }
        }
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
            self.for_each_pair(h, w, |col, input| cols[col] = src[input]);
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
            g.for_each_pair(h, w, |col, input| dst[input] += src[col]);
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
            self.update_running(&mean.detach().flatten_all()?, &var.detach().flatten_all()?, n)?;
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

    /// `forward`, with training-mode normalisation as one fused CPU op when `host` (f32 on the
    /// CPU with host kernels): two passes over x forward and two backward, per channel in
    /// parallel, where the candle graph makes a dozen. Statistics in f64; equal to `forward` to
    /// float rounding (tested in value, gradients and running statistics).
    pub fn forward_with(&self, x: &Tensor, train: bool, host: bool) -> Result<Tensor> {
        if !(host && train && self.trainable) {
            return self.forward(x, train);
        }
        let op = BatchNormTrain { eps: self.eps, stats: Default::default() };
        let stats = op.stats.clone();
        let y = x.contiguous()?.apply_op3(&self.weight, &self.bias, op)?;
        let (b, c, h, w) = x.dims4()?;
        let n = (b * h * w) as f64;
        let stats = stats.lock().unwrap().clone();
        anyhow::ensure!(stats.len() == c, "batch-norm statistics missing");
        let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        let var: Vec<f32> = stats.iter().map(|s| s.1 as f32).collect();
        let device = x.device();
        self.update_running(
            &Tensor::from_vec(mean, c, device)?,
            &Tensor::from_vec(var, c, device)?,
            n,
        )?;
        Ok(y)
    }
}

/// Per-channel (mean, biased variance) of one batch, shared between a forward and its backward.
type ChannelStats = std::sync::Arc<Mutex<Vec<(f64, f64)>>>;

/// Training-mode BatchNorm of (B, C, H, W) with weight and bias (C,) on the CPU.
struct BatchNormTrain {
    eps: f64,
    stats: ChannelStats,
}

impl BatchNormTrain {
    /// (1/√(var + eps)) per channel.
    fn inverse_std(&self, stats: &[(f64, f64)]) -> Vec<f64> {
        stats.iter().map(|&(_, var)| 1.0 / (var + self.eps).sqrt()).collect()
    }
}

/// The H·W values of channel `ch` in image `bi`.
fn plane(x: &[f32], bi: usize, ch: usize, c: usize, hw: usize) -> &[f32] {
    &x[(bi * c + ch) * hw..][..hw]
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
        let (b, c, h, w) = l1.shape().dims4()?;
        let x = crate::base::cpu::contiguous("batch-norm", s1, l1)?;
        let gamma = crate::base::cpu::contiguous("batch-norm", s2, l2)?;
        let beta = crate::base::cpu::contiguous("batch-norm", s3, l3)?;
        let (hw, n) = (h * w, (b * h * w) as f64);
        let stats: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let sum: f64 =
                    (0..b).flat_map(|bi| plane(x, bi, ch, c, hw)).map(|&v| v as f64).sum();
                let mean = sum / n;
                let sq: f64 = (0..b)
                    .flat_map(|bi| plane(x, bi, ch, c, hw))
                    .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                    .sum();
                (mean, sq / n)
            })
            .collect();
        let inv = self.inverse_std(&stats);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw.max(1)).enumerate().for_each(|(p, dst)| {
            let ch = p % c;
            let scale = gamma[ch] as f64 * inv[ch];
            let (scale, shift) = (scale as f32, (beta[ch] as f64 - stats[ch].0 * scale) as f32);
            crate::base::simd::vectorized(|| {
                for (d, &v) in dst.iter_mut().zip(&x[p * hw..(p + 1) * hw]) {
                    *d = v * scale + shift;
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
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::base::cpu::with_cpu_slice;
        use rayon::prelude::*;
        let (b, c, h, w) = x.dims4()?;
        let (hw, n) = (h * w, (b * h * w) as f64);
        let stats = self.stats.lock().unwrap().clone();
        let inv = self.inverse_std(&stats);
        let gamma = with_cpu_slice(gamma, <[f32]>::to_vec)?;
        let grad = grad.contiguous()?;
        let (dx, dgamma, dbeta) = with_cpu_slice(x, |x| {
            with_cpu_slice(&grad, |g| {
                // Per channel: Σ g and Σ g·x̂.
                let sums: Vec<(f64, f64)> = (0..c)
                    .into_par_iter()
                    .map(|ch| {
                        let (mean, mut sg, mut sgx) = (stats[ch].0, 0f64, 0f64);
                        for bi in 0..b {
                            let (xp, gp) = (plane(x, bi, ch, c, hw), plane(g, bi, ch, c, hw));
                            for (&v, &gv) in xp.iter().zip(gp) {
                                sg += gv as f64;
                                sgx += gv as f64 * (v as f64 - mean) * inv[ch];
                            }
                        }
                        (sg, sgx)
                    })
                    .collect();
                // dx = γ/σ · (g − Σg/N − x̂·Σ(g·x̂)/N)
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(hw.max(1)).enumerate().for_each(|(p, dst)| {
                    let ch = p % c;
                    let (mean, k) = (stats[ch].0, gamma[ch] as f64 * inv[ch]);
                    let (mg, mgx) = (sums[ch].0 / n, sums[ch].1 / n);
                    let (xp, gp) = (&x[p * hw..(p + 1) * hw], &g[p * hw..(p + 1) * hw]);
                    for ((d, &v), &gv) in dst.iter_mut().zip(xp).zip(gp) {
                        let xhat = (v as f64 - mean) * inv[ch];
                        *d = (k * (gv as f64 - mg - xhat * mgx)) as f32;
                    }
                });
                let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
                let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
                (dx, dgamma, dbeta)
            })
        })??;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, c, h, w), device)?),
            Some(Tensor::from_vec(dgamma, c, device)?),
            Some(Tensor::from_vec(dbeta, c, device)?),
        ))
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

    /// The fused op against the candle graph: output, the three gradients, running statistics.
    #[test]
    fn fused_training_batch_norm_equals_the_graph() {
        let dev = Device::Cpu;
        let (bn, weight, bias) = layer(4, &dev);
        let x =
            Var::from_tensor(&(Tensor::randn(0.5f32, 2.0, (3, 4, 5, 6), &dev).unwrap())).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 4, 5, 6), &dev).unwrap();
        let (rm0, rv0) =
            (bn.running_mean.lock().unwrap().clone(), bn.running_var.lock().unwrap().clone());
        let graph = bn.forward(x.as_tensor(), true).unwrap();
        let (rm1, rv1) =
            (bn.running_mean.lock().unwrap().clone(), bn.running_var.lock().unwrap().clone());
        *bn.running_mean.lock().unwrap() = rm0;
        *bn.running_var.lock().unwrap() = rv0;
        let fused = bn.forward_with(x.as_tensor(), true, true).unwrap();
        assert!(gap(&graph, &fused) < 1e-5, "values differ by {}", gap(&graph, &fused));
        assert!(gap(&rm1, &bn.running_mean.lock().unwrap()) < 1e-6);
        assert!(gap(&rv1, &bn.running_var.lock().unwrap()) < 1e-5);
        let g1 = (graph * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("weight", &weight), ("bias", &bias)] {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(gap(a, b) < 1e-4, "{name}: gradients differ by {}", gap(a, b));
        }
    }
}
