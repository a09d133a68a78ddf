//! BatchNorm2d: the candle-graph layer (any device, image-major) and, for ResNet's CPU training
//! on channel-major activations, one fused op with a closed-form backward.

use crate::base::grad_sink::GradSink;
use std::sync::Mutex;

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::conv::Planes;
use crate::base::cpu::par_filled;
use crate::base::simd::{lane_dot, lane_sum};

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
        if !self.fuses(x, train) {
            let y = self.normalize_rows(&x.reshape((c, b * h * w))?, train)?.reshape(x.shape())?;
            return Ok(if relu { y.relu()? } else { y });
        }
        let op = BatchNormTrain {
            eps: self.eps,
            relu,
            stats: Default::default(),
            sink: GradSink::active(),
        };
        let stats = op.stats.clone();
        let y = x.contiguous()?.apply_op3(&self.weight, &self.bias, op)?;
        self.update_running_from(&stats, c, (b * h * w) as f64, x.device())?;
        Ok(y)
    }

    /// `forward_channel_major` of the convolution `conv2d_gemm(x, kernel, padding, stride)`
    /// (channel-major in and out). In training on the CPU the two are one op (`ConvBatchNorm`),
    /// equal to the pair to float rounding (unit test); otherwise the pair.
    pub fn conv_forward_channel_major(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        (padding, stride): (usize, usize),
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        if !self.fuses(x, train) {
            let y = super::conv::conv2d_gemm(x, kernel, padding, stride, Planes::ChannelMajor)?;
            return self.forward_channel_major(&y, train, relu);
        }
        let (o, ci, kh, kw) = kernel.dims4()?;
        let (c, b, _, _) = x.dims4()?;
        anyhow::ensure!(ci == c, "convolution of {c} channels with a kernel for {ci}");
        let op = ConvBatchNorm {
            conv: super::conv::ConvGemm::new((kh, kw), padding, stride, Planes::ChannelMajor),
            eps: self.eps,
            relu,
            stats: Default::default(),
            saved: Default::default(),
        };
        let stats = op.stats.clone();
        let affine = Tensor::cat(&[&self.weight, &self.bias], 0)?;
        let y = x.contiguous()?.apply_op3(&kernel.contiguous()?, &affine, op)?;
        let (_, _, oh, ow) = y.dims4()?;
        self.update_running_from(&stats, o, (b * oh * ow) as f64, x.device())?;
        Ok(y)
    }

    /// Whether training on `x` runs as one of the fused CPU ops (f32 on the CPU, a trained layer).
    fn fuses(&self, x: &Tensor, train: bool) -> bool {
        train && self.trainable && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// `update_running` from a fused op's per-channel (mean, biased variance).
    fn update_running_from(
        &self,
        stats: &ChannelStats,
        c: usize,
        n: f64,
        device: &candle_core::Device,
    ) -> Result<()> {
        let stats = stats.lock().unwrap().clone();
        anyhow::ensure!(stats.len() == c, "batch-norm statistics missing");
        let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        let var: Vec<f32> = stats.iter().map(|s| s.1 as f32).collect();
        self.update_running(
            &Tensor::from_vec(mean, c, device)?,
            &Tensor::from_vec(var, c, device)?,
            n,
        )
    }
}

/// Per-channel (mean, biased variance) of one batch, shared between a forward and its backward.
type ChannelStats = std::sync::Arc<Mutex<Vec<(f64, f64)>>>;

/// Channel-major activations: C channels, each one contiguous row of B planes of H·W values.
#[derive(Clone, Copy)]
struct Rows {
    c: usize,
    b: usize,
    hw: usize,
}

impl Rows {
    fn len(&self) -> usize {
        self.b * self.hw
    }
}

/// Training-mode normalisation of channel-major rows: (output, per-channel (mean, biased
/// variance)); statistics in f64, the ReLU applied when asked.
fn normalize_channels(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: Rows,
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Vec<(f64, f64)>) {
    use rayon::prelude::*;
    let (len, hw, b) = (rows.len(), rows.hw, rows.b);
    let n = len as f64;
    let stats: Vec<(f64, f64)> = (0..rows.c)
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
    let inv = inverse_std(&stats, eps);
    let out = par_filled(x.len(), hw, |p, dst| {
        let ch = p / b.max(1);
        let scale = gamma[ch] as f64 * inv[ch];
        let (scale, shift) = (scale as f32, (beta[ch] as f64 - stats[ch].0 * scale) as f32);
        crate::base::simd::vectorized!({
            for (d, &v) in dst.iter_mut().zip(&x[p * hw..(p + 1) * hw]) {
                *d = v * scale + shift;
            }
            if relu {
                dst.iter_mut().for_each(|d| *d = d.max(0.0));
            }
        })
    });
    (out, stats)
}

/// The backward pass of `normalize_channels` given `g` (already through the ReLU's mask):
/// (dx, dγ, dβ).
fn normalize_channels_backward(
    x: &[f32],
    g: &[f32],
    gamma: &[f32],
    stats: &[(f64, f64)],
    rows: Rows,
    eps: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let (len, hw, b) = (rows.len(), rows.hw, rows.b);
    let n = len as f64;
    let inv = inverse_std(stats, eps);
    // Per channel: Σ g and Σ g·x̂.
    let sums: Vec<(f64, f64)> = (0..rows.c)
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
    let dx = par_filled(x.len(), hw, |p, dst| {
        let ch = p / b.max(1);
        let k = gamma[ch] as f64 * inv[ch];
        let (mg, mgx) = (sums[ch].0 / n, sums[ch].1 / n);
        let (kf, shift, slope, mean) =
            (k as f32, (-k * mg) as f32, (-k * inv[ch] * mgx) as f32, stats[ch].0 as f32);
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
}

/// (1/√(var + eps)) per channel.
fn inverse_std(stats: &[(f64, f64)], eps: f64) -> Vec<f64> {
    stats.iter().map(|&(_, var)| 1.0 / (var + eps).sqrt()).collect()
}

/// The gradient reaching a fused op's normalisation: through the op's ReLU (from its output
/// `res`) when it has one.
fn through_relu(relu: bool, grad: &Tensor, res: &Tensor) -> candle_core::Result<Tensor> {
    match relu {
        true => super::fused::relu_backward(grad, res),
        false => grad.contiguous(),
    }
}

/// Training-mode BatchNorm of channel-major (C, B, H, W) with weight and bias (C,) on the CPU.
struct BatchNormTrain {
    eps: f64,
    /// max(0, ·) on the output; the backward then passes gradient only where the output is > 0.
    relu: bool,
    stats: ChannelStats,
    /// Where γ's and β's gradients go when they are variables (`GradSink::active`).
    sink: Option<GradSink>,
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
        let (c, b, h, w) = l1.shape().dims4()?;
        let x = crate::base::cpu::contiguous(self.name(), s1, l1)?;
        let gamma = crate::base::cpu::contiguous(self.name(), s2, l2)?;
        let beta = crate::base::cpu::contiguous(self.name(), s3, l3)?;
        let rows = Rows { c, b, hw: h * w };
        let (out, stats) = normalize_channels(x, gamma, beta, rows, self.eps, self.relu);
        *self.stats.lock().unwrap() = stats;
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::base::cpu::{cpu_tensor, with_cpu_slices};
        let (c, b, h, w) = x.dims4()?;
        let rows = Rows { c, b, hw: h * w };
        let stats = self.stats.lock().unwrap().clone();
        let grad = through_relu(self.relu, grad, res)?;
        let (dx, dgamma, dbeta) = with_cpu_slices([x, &grad, gamma], |[x, g, gm]| {
            normalize_channels_backward(x, g, gm, &stats, rows, self.eps)
        })?;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            GradSink::route(self.sink.as_ref(), gamma, dgamma)?,
            GradSink::route(self.sink.as_ref(), beta, dbeta)?,
        ))
    }
}

/// A convolution and the training-mode BatchNorm after it (and its ReLU) as one op on
/// channel-major activations: the convolution's output and its gradient stay inside the op,
/// which saves candle a graph node — a zero-filled gradient buffer the size of the activation,
/// the add into it, and a tensor per pass. Inputs: x (C, B, H, W), the kernel, [γ; β] (2·O).
struct ConvBatchNorm {
    conv: super::conv::ConvGemm,
    eps: f64,
    relu: bool,
    stats: ChannelStats,
    /// From the forward pass for the backward pass.
    saved: Mutex<Option<ConvOutput>>,
}

/// A convolution's output (O, B·OH·OW) and its im2col (None when the input is its own).
type ConvOutput = (Vec<f32>, Option<Vec<f32>>);

impl candle_core::CustomOp3 for ConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv-batch-norm-train"
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
        let (dims, (oh, ow)) = self.conv.sizes(l1.shape().dims4()?);
        let (o, ci, _, _) = l2.shape().dims4()?;
        if ci != dims.1 || l3.shape().elem_count() != 2 * o {
            candle_core::bail!(
                "{}: input {:?}, kernel {:?}, [γ; β] {:?} disagree",
                self.name(),
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let x = crate::base::cpu::contiguous(self.name(), s1, l1)?;
        let weight = crate::base::cpu::contiguous(self.name(), s2, l2)?;
        let affine = crate::base::cpu::contiguous(self.name(), s3, l3)?;
        let (y, cols) = self.conv.product(x, weight, dims, o);
        let rows = Rows { c: o, b: dims.0, hw: oh * ow };
        let (out, stats) =
            normalize_channels(&y, &affine[..o], &affine[o..], rows, self.eps, self.relu);
        *self.stats.lock().unwrap() = stats;
        *self.saved.lock().unwrap() = Some((y, cols));
        Ok((candle_core::CpuStorage::F32(out), (o, dims.0, oh, ow).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        affine: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::base::cpu::{cpu_tensor, with_cpu_slices};
        let (dims, (oh, ow)) = self.conv.sizes(x.dims4()?);
        let o = weight.dim(0)?;
        let rows = Rows { c: o, b: dims.0, hw: oh * ow };
        let stats = self.stats.lock().unwrap().clone();
        let Some((y, cols)) = self.saved.lock().unwrap().take() else {
            candle_core::bail!("{}: backward without its forward pass", self.name())
        };
        let grad = through_relu(self.relu, grad, res)?;
        let (dx, dw, daffine) = with_cpu_slices([&grad, affine, x, weight], |[g, af, xs, wt]| {
            let (dy, mut dgamma, dbeta) =
                normalize_channels_backward(&y, g, &af[..o], &stats, rows, self.eps);
            let (dw, dx) =
                self.conv.product_backward(&dy, xs, wt, cols.as_deref(), dims, o, x.track_op());
            dgamma.extend(dbeta);
            (dx, dw, dgamma)
        })?;
        Ok((
            dx.map(|dx| cpu_tensor(dx, x.shape())).transpose()?,
            GradSink::route(self.conv.sink.as_ref(), weight, dw)?,
            Some(cpu_tensor(daffine, 2 * o)?),
        ))
    }
}

#[cfg(test)]
mod batch_norm_tests {
    use super::*;
    use crate::models::test_util::gap;
    use candle_core::{Device, Var};

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

    /// The fused convolution + BatchNorm op against the two ops it replaces: output, the
    /// gradients of the input, kernel, γ and β, and running statistics; a 1×1 convolution (its
    /// input is its own im2col) and a strided padded 3×3, with and without the ReLU.
    #[test]
    fn fused_convolution_and_batch_norm_equal_the_pair() {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(1, 1, 0), (3, 2, 1)] {
            for relu in [false, true] {
                let (bn, weight, bias) = layer(5, &dev);
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2, 7, 7), &dev).unwrap())
                    .unwrap();
                let kernel =
                    Var::from_tensor(&Tensor::randn(0f32, 0.4, (5, 3, k, k), &dev).unwrap())
                        .unwrap();
                let (rm0, rv0) = (
                    bn.running_mean.lock().unwrap().clone(),
                    bn.running_var.lock().unwrap().clone(),
                );
                let conv = crate::models::conv::conv2d_gemm(
                    x.as_tensor(),
                    kernel.as_tensor(),
                    padding,
                    stride,
                    Planes::ChannelMajor,
                )
                .unwrap();
                let pair = bn.forward_channel_major(&conv, true, relu).unwrap();
                let (rm1, rv1) = (
                    bn.running_mean.lock().unwrap().clone(),
                    bn.running_var.lock().unwrap().clone(),
                );
                *bn.running_mean.lock().unwrap() = rm0;
                *bn.running_var.lock().unwrap() = rv0;
                let fused = bn
                    .conv_forward_channel_major(
                        x.as_tensor(),
                        kernel.as_tensor(),
                        (padding, stride),
                        true,
                        relu,
                    )
                    .unwrap();
                let what = format!("k {k} relu {relu}");
                assert_eq!(pair.dims(), fused.dims(), "{what}");
                assert!(gap(&pair, &fused) < 1e-5, "{what}: values differ");
                assert!(gap(&rm1, &bn.running_mean.lock().unwrap()) < 1e-6, "{what}");
                assert!(gap(&rv1, &bn.running_var.lock().unwrap()) < 1e-5, "{what}");
                let up = Tensor::randn(0f32, 1.0, pair.dims(), &dev).unwrap();
                let g1 = (pair * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, v) in
                    [("x", &x), ("kernel", &kernel), ("weight", &weight), ("bias", &bias)]
                {
                    let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                    assert!(gap(a, b) < 1e-4, "{what} {name}: gradients differ by {}", gap(a, b));
                }
            }
        }
    }
}
