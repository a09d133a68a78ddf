//! ResNet-50 with torchvision tensor names (torchvision / timm `resnet50.tv_in1k` checkpoints):
//! the 2048-d global-average-pooled features, BatchNorm in eval mode.

use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Func, VarBuilder};
use candle_transformers::models::resnet;

use super::ImageEncoder;
use crate::base::config::EncoderOutput;

pub struct Resnet50 {
    model: Func<'static>,
}

impl Resnet50 {
    pub fn load(vb: VarBuilder<'static>, output: EncoderOutput) -> Result<Self> {
        Self::check(&vb, output)?;
        Ok(Self { model: resnet::resnet50_no_final_layer(vb)? })
    }

    /// The output is `pooled` and the weights use torchvision names.
    pub fn check(vb: &VarBuilder, output: EncoderOutput) -> Result<()> {
        if output != EncoderOutput::Pooled {
            bail!("encoder.output = {output:?} is not a ResNet-50 output (pooled)");
        }
        if !vb.contains_tensor("conv1.weight") || !vb.contains_tensor("layer1.0.bn3.running_var") {
            if vb.contains_tensor("embedder.embedder.convolution.weight")
                || vb.contains_tensor("resnet.embedder.embedder.convolution.weight")
            {
                bail!("this is a transformers ResNetModel checkpoint (microsoft/resnet-50 names); mono reads torchvision names, e.g. timm/resnet50.tv_in1k");
            }
            bail!("weights are not a torchvision-layout ResNet (need conv1.weight, layer1.0.bn3.running_var, …)");
        }
        Ok(())
    }
}

/// Blocks per stage of a torchvision ResNet checkpoint.
pub fn stage_depths(vb: &VarBuilder) -> [usize; 4] {
    let mut depths = [0; 4];
    for (s, d) in depths.iter_mut().enumerate() {
        while vb.contains_tensor(&format!("layer{}.{}.conv1.weight", s + 1, *d)) {
            *d += 1;
        }
    }
    depths
}

/// Other bottleneck ResNets (depths or widths candle-transformers does not build): mono's own
/// tower in evaluation mode, which equals candle-transformers' on the standard layout.
pub struct GenericResnet {
    net: crate::models::resnet::ResNet,
}

impl GenericResnet {
    pub fn load(weights: &[std::path::PathBuf], device: &candle_core::Device) -> Result<Self> {
        let weights = crate::models::params::Weights::load(weights, device)?;
        let mut params = crate::models::params::ParamSet::default();
        Ok(Self {
            net: crate::models::resnet::ResNet::load(
                &weights,
                &mut params,
                &crate::models::Trainable::LastBlocks(0),
            )?,
        })
    }
}

impl ImageEncoder for GenericResnet {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.net.forward(pixels, false)
    }

    fn dim(&self) -> usize {
        self.net.dim
    }

    fn input_size(&self) -> (usize, usize) {
        (224, 224)
    }
}

impl ImageEncoder for Resnet50 {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.model.forward(pixels)?)
    }

    fn dim(&self) -> usize {
        2048
    }

    fn input_size(&self) -> (usize, usize) {
        (224, 224)
    }
}
