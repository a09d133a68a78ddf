//! Image encoders by name (CLIP, SigLIP2, ViT, ResNet-50) over candle-transformers, their weights
//! from a local directory or the Hugging Face hub.

mod clip;
pub mod hub;
mod resnet;
mod siglip;
mod vit;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::base::config::{EncoderConfig, EncoderKind, EncoderOutput, FloatType};
use crate::data::preprocess::Preprocessor;

/// An image encoder: (B, 3, H, W) pixel values → (B, dim) features.
pub trait ImageEncoder: Send + Sync {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor>;
    fn dim(&self) -> usize;
    /// The (height, width) its position embeddings expect.
    fn input_size(&self) -> (usize, usize);
}

pub fn dtype(t: FloatType) -> DType {
    match t {
        FloatType::F32 => DType::F32,
        FloatType::F16 => DType::F16,
        FloatType::Bf16 => DType::BF16,
    }
}

/// Builds an encoder of `kind` from resolved model files.
pub fn load_from_files(
    kind: EncoderKind,
    output: EncoderOutput,
    files: &hub::ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn ImageEncoder>> {
    crate::base::device::check_dtype(device, dtype, &format!("encoder.dtype = {dtype:?}"))?;
    let config = files.config_json()?;
    // SAFETY: the weight files are memory-mapped read-only.
    let vb: VarBuilder<'static> =
        unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
            .with_context(|| format!("cannot read the weights of {}", files.source))?;
    let encoder: Box<dyn ImageEncoder> = match kind {
        EncoderKind::Clip => Box::new(clip::Clip::load(&config, vb, output)?),
        EncoderKind::Siglip2 => Box::new(siglip::Siglip::load(&config, vb, output)?),
        EncoderKind::Vit => Box::new(vit::Vit::load(&config, vb, output)?),
        EncoderKind::Resnet50
            if resnet::stage_depths(&vb) == [3, 4, 6, 3] && vb.contains_tensor("conv1.weight") =>
        {
            Box::new(resnet::Resnet50::load(vb, output)?)
        }
        EncoderKind::Resnet50 => {
            resnet::Resnet50::check(&vb, output)?;
            Box::new(resnet::GenericResnet::load(&files.weights, device)?)
        }
    };
    Ok(encoder)
}

/// Resolves and loads the encoder a config names.
pub fn load(
    cfg: &EncoderConfig,
    device: &Device,
) -> Result<(Box<dyn ImageEncoder>, hub::ModelFiles)> {
    let files = hub::resolve(&cfg.model, &cfg.revision)?;
    let encoder = load_from_files(cfg.kind, cfg.output(), &files, dtype(cfg.dtype), device)
        .with_context(|| format!("encoder.model = {:?} ({:?})", cfg.model, cfg.kind))?;
    Ok((encoder, files))
}

/// A fingerprint of the encoder's files (docs/reliability.md): their canonical paths (a hub
/// cache path names the commit) and the signature (size, modification time, first and last MiB) of config.json,
/// preprocessor_config.json and every weights file.
pub fn fingerprint(files: &hub::ModelFiles) -> Result<String> {
    let mut fp = crate::base::fingerprint::Fingerprint::new();
    fp.str(&files.source);
    for path in files.config.iter().chain(&files.preprocessor).chain(&files.weights) {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        fp.str(&canonical.display().to_string()).file_signed(path)?;
    }
    Ok(fp.finish())
}

/// The preprocessing of the encoder's family, from its preprocessor_config.json when present.
pub fn preprocessor_for(kind: EncoderKind, files: &hub::ModelFiles) -> Result<Preprocessor> {
    match (&files.preprocessor, kind) {
        (Some(path), _) => Preprocessor::from_hf_json(path),
        // torchvision's ImageNet evaluation transform, for torchvision-layout ResNet-50 weights.
        (None, EncoderKind::Resnet50) => Ok(Preprocessor::torchvision_imagenet(256, 224)),
        (None, _) => bail!("{}: no preprocessor_config.json; the image size, resampling and normalisation come from it", files.source),
    }
}
