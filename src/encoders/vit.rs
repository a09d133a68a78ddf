//! Supervised ViT (google/vit-*): the CLS token after the final LayerNorm, composed from
//! candle-transformers' `vit::{Embeddings, Encoder}` (its `Model` returns logits only).

use anyhow::{bail, Context, Result};
use candle_core::{IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::vit;
use serde::Deserialize;

use super::ImageEncoder;
use crate::base::config::EncoderOutput;

/// ViTConfig with transformers' defaults for omitted keys (candle's Config has none).
#[derive(Deserialize)]
#[serde(default)]
struct VitJson {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: candle_nn::Activation,
    layer_norm_eps: f64,
    image_size: usize,
    patch_size: usize,
    num_channels: usize,
    qkv_bias: bool,
}

impl Default for VitJson {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: candle_nn::Activation::Gelu,
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

pub struct Vit {
    embeddings: vit::Embeddings,
    encoder: vit::Encoder,
    layernorm: candle_nn::LayerNorm,
    dim: usize,
    image_size: usize,
}

impl Vit {
    pub fn load(config: &serde_json::Value, vb: VarBuilder, output: EncoderOutput) -> Result<Self> {
        if output != EncoderOutput::Cls {
            bail!("encoder.output = {output:?} is not a ViT output (cls)");
        }
        let j: VitJson =
            serde_json::from_value(config.clone()).context("config.json: bad ViT config")?;
        let cfg = vit::Config {
            hidden_size: j.hidden_size,
            num_hidden_layers: j.num_hidden_layers,
            num_attention_heads: j.num_attention_heads,
            intermediate_size: j.intermediate_size,
            hidden_act: j.hidden_act,
            layer_norm_eps: j.layer_norm_eps,
            image_size: j.image_size,
            patch_size: j.patch_size,
            num_channels: j.num_channels,
            qkv_bias: j.qkv_bias,
        };
        // ViTForImageClassification files prefix the backbone with `vit.`; ViTModel files do not.
        let root = if vb.contains_tensor("vit.embeddings.cls_token") {
            vb.pp("vit")
        } else if vb.contains_tensor("embeddings.cls_token") {
            vb
        } else {
            bail!("weights hold no ViT backbone (no `[vit.]embeddings.cls_token`)");
        };
        let embeddings = vit::Embeddings::new(&cfg, false, root.pp("embeddings"))?;
        let encoder = vit::Encoder::new(&cfg, root.pp("encoder"))?;
        let layernorm =
            candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, root.pp("layernorm"))?;
        Ok(Self {
            embeddings,
            encoder,
            layernorm,
            dim: cfg.hidden_size,
            image_size: cfg.image_size,
        })
    }
}

impl ImageEncoder for Vit {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let hidden = self.encoder.forward(&self.embeddings.forward(pixels, None, false)?)?;
        Ok(hidden.i((.., 0, ..))?.apply(&self.layernorm)?)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn input_size(&self) -> (usize, usize) {
        (self.image_size, self.image_size)
    }
}
