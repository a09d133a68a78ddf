//! `mono bench extract`: images/s of each encoder's forward pass at batch 32 on this machine,
//! with the real architectures (CLIP B/32 and L/14, SigLIP2 B/16, ViT-B/16, ResNet-50) and random
//! weights (no hub here). The weights go through a safetensors file and the normal loading path.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;
use serde_json::json;

use crate::base::config::{EncoderKind, EncoderOutput};
use crate::encoders::{self, hub::ModelFiles};

#[derive(Clone, Debug, clap::Args)]
pub struct ExtractBenchArgs {
    /// Encoders, comma-separated: clip-b32, clip-l14, siglip2-b16, vit-b16, resnet50.
    #[arg(long, value_delimiter = ',', default_value = "clip-b32,siglip2-b16,vit-b16,resnet50")]
    pub encoders: Vec<String>,
    #[arg(long, default_value_t = 32, value_parser = crate::base::config::positive)]
    pub batch: usize,
    /// Timed batches (after one untimed warm-up batch).
    #[arg(long, default_value_t = 3, value_parser = crate::base::config::positive)]
    pub batches: usize,
    /// Device: cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExtractTiming {
    pub encoder: String,
    pub dim: usize,
    pub seconds_per_batch: f64,
    pub images_per_second: f64,
}

/// (kind, output, config.json, image size) of a named architecture.
pub(crate) fn architecture(
    name: &str,
) -> Result<(EncoderKind, EncoderOutput, serde_json::Value, usize)> {
    let vit_like = |hidden: usize, layers: usize, heads: usize, inter: usize, patch: usize| {
        json!({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": inter,
               "patch_size": patch, "image_size": 224, "num_channels": 3})
    };
    Ok(match name {
        "clip-b32" => {
            let mut v = vit_like(768, 12, 12, 3072, 32);
            v["hidden_act"] = json!("quick_gelu");
            (EncoderKind::Clip, EncoderOutput::ImageEmbeds, json!({"vision_config": v, "projection_dim": 512}), 224)
        }
        "clip-l14" => {
            let mut v = vit_like(1024, 24, 16, 4096, 14);
            v["hidden_act"] = json!("quick_gelu");
            (EncoderKind::Clip, EncoderOutput::ImageEmbeds, json!({"vision_config": v, "projection_dim": 768}), 224)
        }
        "siglip2-b16" => {
            let mut v = vit_like(768, 12, 12, 3072, 16);
            v["hidden_act"] = json!("gelu_pytorch_tanh");
            v["layer_norm_eps"] = json!(1e-6);
            (EncoderKind::Siglip2, EncoderOutput::Pooled, json!({"vision_config": v}), 224)
        }
        "vit-b16" => {
            let mut v = vit_like(768, 12, 12, 3072, 16);
            v["hidden_act"] = json!("gelu");
            v["layer_norm_eps"] = json!(1e-12);
            v["qkv_bias"] = json!(true);
            (EncoderKind::Vit, EncoderOutput::Cls, v, 224)
        }
        "resnet50" => (EncoderKind::Resnet50, EncoderOutput::Pooled, json!({}), 224),
        other => bail!("unknown encoder `{other}`; expected clip-b32, clip-l14, siglip2-b16, vit-b16 or resnet50"),
    })
}

/// Random weights with the architecture's real tensor names, written to `dir/model.safetensors`.
pub(crate) fn write_random_weights(
    kind: EncoderKind,
    config: &serde_json::Value,
    dir: &Path,
) -> Result<()> {
    use candle_transformers::models::{clip, resnet, siglip, vit};
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let v = config.get("vision_config").unwrap_or(config);
    let u = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
    match kind {
        EncoderKind::Clip => {
            let cfg = clip::vision_model::ClipVisionConfig {
                embed_dim: u("hidden_size"),
                activation: clip::text_model::Activation::QuickGelu,
                intermediate_size: u("intermediate_size"),
                num_hidden_layers: u("num_hidden_layers"),
                num_attention_heads: u("num_attention_heads"),
                projection_dim: config["projection_dim"].as_u64().unwrap_or(512) as usize,
                num_channels: 3,
                image_size: u("image_size"),
                patch_size: u("patch_size"),
            };
            clip::vision_model::ClipVisionTransformer::new(vb.pp("vision_model"), &cfg)?;
            candle_nn::linear_no_bias(
                cfg.embed_dim,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?;
            // candle draws this one without registering it.
            let class = Var::from_tensor(&Tensor::randn(0f32, 1.0, cfg.embed_dim, &Device::Cpu)?)?;
            varmap
                .data()
                .lock()
                .unwrap()
                .insert("vision_model.embeddings.class_embedding".into(), class);
        }
        EncoderKind::Siglip2 => {
            let cfg: siglip::VisionConfig = serde_json::from_value(v.clone())?;
            siglip::VisionModel::new(&cfg, true, vb.pp("vision_model"))?;
        }
        EncoderKind::Vit => {
            let cfg: vit::Config = serde_json::from_value(v.clone())?;
            vit::Embeddings::new(&cfg, false, vb.pp("embeddings"))?;
            vit::Encoder::new(&cfg, vb.pp("encoder"))?;
            candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?;
        }
        EncoderKind::Resnet50 => {
            resnet::resnet50_no_final_layer(vb)?;
        }
    }
    // Random BatchNorm statistics would blow activations up; use the identity normalisation.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        let t = if name.ends_with("running_var") {
            t.ones_like()?
        } else if name.ends_with("running_mean") {
            t.zeros_like()?
        } else {
            (t * 0.02)?
        };
        tensors.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

pub fn run(args: &ExtractBenchArgs) -> Result<Vec<ExtractTiming>> {
    let device = crate::base::device::open_device(&args.device)?;
    println!(
        "Encoder forward pass, batch {}, {} timed batches, {} threads, f32, random weights",
        args.batch,
        args.batches,
        rayon::current_num_threads()
    );
    println!("{:<14} {:>6} {:>12} {:>10}", "encoder", "dim", "s/batch", "images/s");
    let mut timings = Vec::new();
    for name in &args.encoders {
        let (kind, output, config, size) = architecture(name.trim())?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("config.json"), config.to_string())?;
        write_random_weights(kind, &config, dir.path())?;
        let files = ModelFiles {
            config: Some(dir.path().join("config.json")),
            weights: vec![dir.path().join("model.safetensors")],
            preprocessor: None,
            source: name.clone(),
        };
        let encoder = encoders::load_from_files(kind, output, &files, DType::F32, &device)?;
        let pixels = Tensor::randn(0f32, 1.0, (args.batch, 3, size, size), &Device::Cpu)?
            .to_device(&device)?;
        encoder.forward(&pixels)?;
        device.synchronize()?;
        let start = Instant::now();
        for _ in 0..args.batches {
            encoder.forward(&pixels)?;
        }
        device.synchronize()?;
        let per_batch = start.elapsed().as_secs_f64() / args.batches as f64;
        let t = ExtractTiming {
            encoder: name.clone(),
            dim: encoder.dim(),
            seconds_per_batch: per_batch,
            images_per_second: args.batch as f64 / per_batch,
        };
        println!(
            "{:<14} {:>6} {:>12.3} {:>10.1}",
            t.encoder, t.dim, t.seconds_per_batch, t.images_per_second
        );
        timings.push(t);
    }
    if let Some(path) = &args.json {
        super::write_json(
            path,
            json!({"benchmark": "extract", "batch": args.batch, "threads": rayon::current_num_threads(), "timings": timings}),
        )?;
    }
    Ok(timings)
}
