//! A trainable torchvision-layout bottleneck ResNet (ResNet-50 and relatives, any depth/width
//! read off the checkpoint): train-mode BatchNorm with running statistics, and a stem max-pool
//! whose backward works. Equals candle-transformers' `resnet50` in evaluation mode.

use std::sync::Mutex;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use crate::base::host::Kernels;

use super::batch_norm::BatchNorm;
use super::layers::max_pool_3x3_s2;
use super::params::{DecayGroup, ParamSet, Weights};
use super::Trainable;

struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// This convolution, then `bn` (and a ReLU). `host`: channel-major activations, the pair as
    /// one CPU op in training (im2col + GEMM, whose backward is much faster than candle's, with
    /// the fused BatchNorm); otherwise candle's convolution and BatchNorm on (B, C, H, W) (GPUs,
    /// portable kernels, inference).
    fn then_norm(
        &self,
        x: &Tensor,
        bn: &BatchNorm,
        relu: bool,
        train: bool,
        host: bool,
    ) -> Result<Tensor> {
        if host {
            let geometry = (self.padding, self.stride);
            return bn.conv_forward_channel_major(x, &self.weight, geometry, train, relu);
        }
        let y = bn.forward(&x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?, train)?;
        Ok(if relu { y.relu()? } else { y })
    }
}

struct Bottleneck {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
    bn3: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

pub struct ResNet {
    conv1: Conv,
    bn1: BatchNorm,
    blocks: Vec<Bottleneck>,
    pub dim: usize,
}

fn take_conv(
    weights: &Weights,
    params: &mut ParamSet,
    name: &str,
    stride: usize,
    padding: usize,
    train: bool,
) -> Result<Conv> {
    let key = format!("{name}.weight");
    let dims = weights.dims(&key)?;
    ensure!(dims.len() == 4, "{}: `{key}` is not a convolution kernel", weights.source);
    Ok(Conv {
        weight: params.add(&key, weights.get(&key, &dims)?, train, DecayGroup::Weights)?,
        stride,
        padding,
    })
}

fn take_bn(
    weights: &Weights,
    params: &mut ParamSet,
    name: &str,
    channels: usize,
    train: bool,
) -> Result<BatchNorm> {
    let dtype = params.dtype;
    let get = |k: &str| -> Result<Tensor> {
        Ok(weights.get(&format!("{name}.{k}"), &[channels])?.to_dtype(dtype)?)
    };
    Ok(BatchNorm {
        name: name.to_string(),
        weight: params.add(
            &format!("{name}.weight"),
            get("weight")?,
            train,
            DecayGroup::NormAndBias,
        )?,
        bias: params.add(&format!("{name}.bias"), get("bias")?, train, DecayGroup::NormAndBias)?,
        running_mean: Mutex::new(get("running_mean")?),
        running_var: Mutex::new(get("running_var")?),
        eps: 1e-5,
        momentum: 0.1,
        trainable: train,
    })
}

impl ResNet {
    /// Loads torchvision names (`conv1`, `bn1`, `layer{1..4}.{i}.…`); `trainable` counts the
    /// bottleneck blocks from the end.
    pub fn load(weights: &Weights, params: &mut ParamSet, trainable: &Trainable) -> Result<Self> {
        ensure!(
            weights.contains("conv1.weight") && weights.contains("layer1.0.conv1.weight"),
            "{}: not a torchvision-layout ResNet (need conv1.weight, layer1.0.conv1.weight, …)",
            weights.source
        );
        let mut layout = Vec::new(); // (stage, index) of every block
        for stage in 1..=4 {
            let mut i = 0;
            while weights.contains(&format!("layer{stage}.{i}.conv1.weight")) {
                layout.push((stage, i));
                i += 1;
            }
        }
        let first = if trainable.is_lora() {
            layout.len()
        } else {
            trainable.first_trainable_block(layout.len())
        };
        let stem_train = first == 0;
        let conv1 = take_conv(weights, params, "conv1", 2, 3, stem_train)?;
        let stem_channels = weights.dims("conv1.weight")?[0];
        let bn1 = take_bn(weights, params, "bn1", stem_channels, stem_train)?;
        let mut blocks = Vec::new();
        let mut dim = stem_channels;
        for (n, &(stage, i)) in layout.iter().enumerate() {
            let train = n >= first;
            let base = format!("layer{stage}.{i}");
            // torchvision v1.5: the stride sits on the 3×3 convolution of each stage's first block.
            let stride = if i == 0 && stage > 1 { 2 } else { 1 };
            let c =
                |k: &str| -> Result<usize> { Ok(weights.dims(&format!("{base}.{k}.weight"))?[0]) };
            let conv1 = take_conv(weights, params, &format!("{base}.conv1"), 1, 0, train)?;
            let bn1 = take_bn(weights, params, &format!("{base}.bn1"), c("conv1")?, train)?;
            let conv2 = take_conv(weights, params, &format!("{base}.conv2"), stride, 1, train)?;
            let bn2 = take_bn(weights, params, &format!("{base}.bn2"), c("conv2")?, train)?;
            let conv3 = take_conv(weights, params, &format!("{base}.conv3"), 1, 0, train)?;
            let out = c("conv3")?;
            let bn3 = take_bn(weights, params, &format!("{base}.bn3"), out, train)?;
            let downsample = if weights.contains(&format!("{base}.downsample.0.weight")) {
                Some((
                    take_conv(weights, params, &format!("{base}.downsample.0"), stride, 0, train)?,
                    take_bn(weights, params, &format!("{base}.downsample.1"), out, train)?,
                ))
            } else {
                None
            };
            blocks.push(Bottleneck { conv1, bn1, conv2, bn2, conv3, bn3, downsample });
            dim = out;
        }
        Ok(Self { conv1, bn1, blocks, dim })
    }

    /// (B, 3, H, W) → (B, C) globally average-pooled features.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, train, Kernels::Portable)
    }

    /// `forward` with the convolutions as im2col + GEMM and BatchNorm as one fused op where
    /// `kernels` are host ones and the pass trains (f32 on the CPU). That path keeps the
    /// activations channel-major, (C, B, H, W), from the stem to the pooling, so no layer
    /// reorders memory (`Planes::ChannelMajor`).
    pub fn forward_with(&self, x: &Tensor, train: bool, kernels: Kernels) -> Result<Tensor> {
        let host = train && kernels.is_host() && x.device().is_cpu() && x.dtype() == DType::F32;
        let x = if host { x.transpose(0, 1)?.contiguous()? } else { x.clone() };
        let x = self.conv1.then_norm(&x, &self.bn1, true, train, host)?;
        let mut x = max_pool_3x3_s2(&x, kernels)?;
        for b in &self.blocks {
            let h = b.conv1.then_norm(&x, &b.bn1, true, train, host)?;
            let h = b.conv2.then_norm(&h, &b.bn2, true, train, host)?;
            let h = b.conv3.then_norm(&h, &b.bn3, false, train, host)?;
            let identity = match &b.downsample {
                Some((conv, norm)) => conv.then_norm(&x, norm, false, train, host)?,
                None => x.clone(),
            };
            x = match host {
                true => {
                    h.contiguous()?.apply_op2(&identity.contiguous()?, super::fused::AddRelu)?
                }
                false => (h + identity)?.relu()?,
            };
        }
        // Global average pooling; channel-major activations pool to (C, B).
        let pooled = x.mean(3)?.mean(2)?;
        Ok(if host { pooled.t()?.contiguous()? } else { pooled })
    }

    /// Every BatchNorm layer, stem first.
    pub fn batch_norms(&self) -> Vec<&BatchNorm> {
        let mut out = vec![&self.bn1];
        for b in &self.blocks {
            out.extend([&b.bn1, &b.bn2, &b.bn3]);
            if let Some((_, bn)) = &b.downsample {
                out.push(bn);
            }
        }
        out
    }

    /// The running statistics under their torchvision names (`….running_mean`, `….running_var`).
    pub fn named_running_stats(&self) -> Vec<(String, Tensor)> {
        self.batch_norms()
            .into_iter()
            .flat_map(|bn| {
                [
                    (format!("{}.running_mean", bn.name), bn.running_mean.lock().unwrap().clone()),
                    (format!("{}.running_var", bn.name), bn.running_var.lock().unwrap().clone()),
                ]
            })
            .collect()
    }
}
