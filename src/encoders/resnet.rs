//! ResNet-50 with torchvision tensor names (torchvision / timm `resnet50.tv_in1k` checkpoints):
//! the 2048-d global-average-pooled features, BatchNorm in eval mode.

use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Func, VarBuilder};
use candle_transformers::models::resnet;

use super::ImageEncoder;
use crate::config::EncoderOutput;

pub struct Resnet50 {
    model: Func<'static>,
}

impl Resnet50 {
    pub fn load(vb: VarBuilder<'static>, output: EncoderOutput) -> Result<Self> {
        if output != EncoderOutput::Pooled {
            bail!("encoder.output = {output:?} is not a ResNet-50 output (pooled)");
        }
        if !vb.contains_tensor("conv1.weight") || !vb.contains_tensor("layer4.2.bn3.running_var") {
            if vb.contains_tensor("embedder.embedder.convolution.weight") || vb.contains_tensor("resnet.embedder.embedder.convolution.weight") {
                bail!("this is a transformers ResNetModel checkpoint (microsoft/resnet-50 names); mono reads torchvision names, e.g. timm/resnet50.tv_in1k");
            }
            bail!("weights are not a torchvision ResNet-50 (need conv1.weight … layer4.2.bn3.running_var)");
        }
        Ok(Self { model: resnet::resnet50_no_final_layer(vb)? })
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
