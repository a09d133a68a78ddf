//! `mono bench finetune`: images/s of one finetuning step (forward, CE + λ·MonoLoss on the TopK
//! layer, backward, SGD) for ResNet-50 and CLIP-ViT-B/32 at 224×224, random weights.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;

use super::extract::{architecture, write_random_weights};
use super::median;
use crate::base::config::FinetuneConfig;
use crate::models::params::Weights;
use crate::models::Trainable;
use crate::train::finetune::model::{FinetuneModel, HeadSpec};
use crate::train::finetune::Finetuner;

#[derive(Clone, Debug, clap::Args)]
pub struct FinetuneBenchArgs {
    /// Models, comma-separated: resnet50, clip-b32.
    #[arg(long, value_delimiter = ',', default_value = "resnet50,clip-b32")]
    pub models: Vec<String>,
    #[arg(long, default_value_t = 16, value_parser = crate::base::config::positive)]
    pub batch: usize,
    /// Timed steps (after one untimed warm-up step); the median step is reported.
    #[arg(long, default_value_t = 2, value_parser = crate::base::config::positive)]
    pub steps: usize,
    /// MonoLoss weight.
    #[arg(long, default_value_t = 0.1)]
    pub lambda: f64,
    /// Device: cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// bf16 compute with f32 master weights (GPUs).
    #[arg(long)]
    pub mixed_precision: bool,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FinetuneTiming {
    pub model: String,
    /// The median of `step_seconds`.
    pub seconds_per_step: f64,
    pub step_seconds: Vec<f64>,
    pub images_per_second: f64,
}

pub fn run(args: &FinetuneBenchArgs) -> Result<Vec<FinetuneTiming>> {
    let device = crate::base::device::open_device(&args.device)?;
    let dtype = if args.mixed_precision { DType::BF16 } else { DType::F32 };
    crate::base::device::check_dtype(&device, dtype, "--mixed-precision")?;
    println!(
        "Finetuning step (forward + CE + {}·MonoLoss + backward + SGD), batch {}, {} timed steps, {} threads, {:?} on {}, random weights",
        args.lambda,
        args.batch,
        args.steps,
        rayon::current_num_threads(),
        dtype,
        args.device
    );
    println!("{:<10} {:>10} {:>10}", "model", "s/step", "images/s");
    let mut timings = Vec::new();
    for name in &args.models {
        let (kind, _, config, size) = architecture(name.trim())?;
        let dir = tempfile::tempdir()?;
        write_random_weights(kind, &config, dir.path())?;
        let weights = Weights::load(&[dir.path().join("model.safetensors")], &device)?;
        let head =
            HeadSpec { topk_layer: true, reuse_head: false, expansion: 1, k: None, classes: 1000 };
        let model =
            FinetuneModel::new(kind, &config, &weights, &Trainable::All, &head, 0, dtype, &device)?;
        let f = FinetuneConfig::default();
        let mut finetuner = Finetuner::new(model, &f, args.lambda, 1e-8)?;
        let x = Tensor::randn(0f32, 1.0, (args.batch, 3, size, size), &Device::Cpu)?
            .to_device(&device)?
            .to_dtype(dtype)?;
        let labels: Vec<u32> = (0..args.batch as u32).map(|i| i * 37 % 1000).collect();
        finetuner.step(&x, &labels, None, 1e-3, false)?;
        device.synchronize()?;
        // Each step timed to the end of its device work. The median, not the mean: on a VM the
        // first step after warm-up can still page-fault memory the allocator grows into.
        let mut step_seconds = Vec::with_capacity(args.steps);
        for _ in 0..args.steps {
            let start = Instant::now();
            finetuner.step(&x, &labels, None, 1e-3, false)?;
            device.synchronize()?;
            step_seconds.push(start.elapsed().as_secs_f64());
        }
        let per = median(step_seconds.clone());
        let t = FinetuneTiming {
            model: name.clone(),
            seconds_per_step: per,
            step_seconds,
            images_per_second: args.batch as f64 / per,
        };
        println!("{:<10} {:>10.3} {:>10.2}", t.model, t.seconds_per_step, t.images_per_second);
        timings.push(t);
    }
    if let Some(path) = &args.json {
        super::write_json(
            path,
            json!({"benchmark": "finetune", "batch": args.batch, "lambda": args.lambda, "timings": timings}),
        )?;
    }
    Ok(timings)
}
