//! SigLIP / SigLIP2 fixed-resolution vision tower (candle-transformers' `siglip::VisionModel`
//! with its attention-pooling head): the pooled output.

use anyhow::{bail, Context, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::siglip::{VisionConfig, VisionModel};

use super::ImageEncoder;
use crate::base::config::EncoderOutput;

pub struct Siglip {
    model: VisionModel,
    dim: usize,
    image_size: usize,
}

impl Siglip {
    pub fn load(config: &serde_json::Value, vb: VarBuilder, output: EncoderOutput) -> Result<Self> {
        if output != EncoderOutput::Pooled {
            bail!("encoder.output = {output:?} is not a SigLIP2 output (pooled)");
        }
        if config.get("model_type").and_then(|t| t.as_str()) == Some("siglip2_vision_model")
            || vb.contains_tensor("embeddings.patch_embedding.weight")
                && !vb.contains_tensor("embeddings.position_embedding.weight")
        {
            bail!("this is a NaFlex SigLIP2 checkpoint (variable resolution); use a fixed-resolution one such as google/siglip2-base-patch16-224");
        }
        let vision_json = config.get("vision_config").unwrap_or(config);
        let cfg: VisionConfig = serde_json::from_value(vision_json.clone())
            .context("config.json: bad SigLIP vision config")?;
        let tower = if vb.contains_tensor("vision_model.embeddings.patch_embedding.weight") {
            vb.pp("vision_model")
        } else if vb.contains_tensor("embeddings.patch_embedding.weight") {
            vb
        } else {
            bail!("weights hold no SigLIP vision tower (no `[vision_model.]embeddings.patch_embedding.weight`)");
        };
        if !tower.contains_tensor("head.probe") {
            bail!(
                "weights have no attention-pooling head (head.probe): the pooled output needs it"
            );
        }
        let model = VisionModel::new(&cfg, true, tower)?;
        Ok(Self { model, dim: cfg.hidden_size, image_size: cfg.image_size })
    }
}

impl ImageEncoder for Siglip {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.model.forward(pixels)?)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn input_size(&self) -> (usize, usize) {
        (self.image_size, self.image_size)
    }
}
