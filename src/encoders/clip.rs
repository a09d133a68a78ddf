//! CLIP vision tower (candle-transformers' `ClipVisionTransformer`): the pooler output
//! (post-LayerNorm CLS token) or the projected image embedding.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use serde::Deserialize;

use super::ImageEncoder;
use crate::base::config::EncoderOutput;

/// The vision part of a CLIP config.json, with transformers' defaults for omitted keys.
#[derive(Deserialize)]
#[serde(default)]
struct VisionJson {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    projection_dim: usize,
}

impl Default for VisionJson {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

pub struct Clip {
    vision: ClipVisionTransformer,
    projection: Option<candle_nn::Linear>,
    dim: usize,
    image_size: usize,
}

impl Clip {
    pub fn load(config: &serde_json::Value, vb: VarBuilder, output: EncoderOutput) -> Result<Self> {
        // Full CLIPModel / CLIPVisionModelWithProjection files prefix the tower with `vision_model.`.
        let (tower, root) = if vb.contains_tensor("vision_model.embeddings.patch_embedding.weight")
        {
            (vb.pp("vision_model"), vb.clone())
        } else if vb.contains_tensor("embeddings.patch_embedding.weight") {
            (vb.clone(), vb.clone())
        } else {
            bail!("weights hold no CLIP vision tower (no `vision_model.embeddings.patch_embedding.weight` nor `embeddings.patch_embedding.weight`)");
        };
        let vision_json = config.get("vision_config").unwrap_or(config);
        let v: VisionJson = serde_json::from_value(vision_json.clone())
            .context("config.json: bad CLIP vision config")?;
        ensure!(
            v.hidden_act == "quick_gelu",
            "config.json: hidden_act = {:?}; candle's CLIP tower implements quick_gelu only",
            v.hidden_act
        );
        ensure!(
            (v.layer_norm_eps - 1e-5).abs() < 1e-12,
            "config.json: layer_norm_eps = {}; candle's CLIP tower uses 1e-5",
            v.layer_norm_eps
        );
        // candle silently draws a random class embedding when the tensor is missing: refuse instead.
        ensure!(
            tower.contains_tensor("embeddings.class_embedding"),
            "weights lack embeddings.class_embedding"
        );
        let projection_dim = config
            .get("projection_dim")
            .and_then(|p| p.as_u64())
            .map(|p| p as usize)
            .unwrap_or(v.projection_dim);
        let cfg = ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        };
        let vision = ClipVisionTransformer::new(tower, &cfg)?;
        let (projection, dim) = match output {
            EncoderOutput::Pooler => (None, v.hidden_size),
            EncoderOutput::ImageEmbeds => {
                ensure!(
                    root.contains_tensor("visual_projection.weight"),
                    "weights have no visual_projection (a CLIPVisionModel checkpoint): use encoder.output = \"pooler\""
                );
                (
                    Some(candle_nn::linear_no_bias(
                        v.hidden_size,
                        projection_dim,
                        root.pp("visual_projection"),
                    )?),
                    projection_dim,
                )
            }
            other => {
                bail!("encoder.output = {other:?} is not a CLIP output (pooler, image_embeds)")
            }
        };
        Ok(Self { vision, projection, dim, image_size: v.image_size })
    }
}

impl ImageEncoder for Clip {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(pixels)?;
        Ok(match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        })
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn input_size(&self) -> (usize, usize) {
        (self.image_size, self.image_size)
    }
}
