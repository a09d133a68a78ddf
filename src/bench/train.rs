//! `mono bench train`: samples/s of one SAE training step per architecture, with λ = 0 and with
//! the paper's λ, and the MonoLoss overhead. Synthetic unit-norm features held in memory.

use std::time::Instant;

use super::median;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::base::config::{
    paper_lambda, BatchTopkConfig, Config, DatasetKind, EncoderKind, JumpReluConfig, ReluConfig,
    SaeConfig, SaeKind, TopkConfig,
};
use crate::base::gemm::gemm_f32;
use crate::base::host::Kernels;
use crate::train::sae::SaeTrainer;

#[derive(Clone, Debug, clap::Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value_t = 768)]
    pub d: usize,
    #[arg(long, default_value_t = 8192)]
    pub m: usize,
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    #[arg(long, default_value_t = 2048, value_parser = crate::base::config::positive)]
    pub batch: usize,
    /// Timed steps per configuration (after one untimed warm-up step); medians are reported.
    #[arg(long, default_value_t = 5, value_parser = crate::base::config::positive)]
    pub steps: usize,
    /// Architectures, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "batch_topk,topk,jumprelu,relu")]
    pub kinds: Vec<String>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Device: cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Kernels: auto (host kernels on the CPU) or portable (the GPU path).
    #[arg(long, value_enum, default_value = "auto")]
    pub ops: crate::base::host::OpsMode,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainTiming {
    pub kind: String,
    pub lambda: f64,
    pub seconds_per_step: f64,
    pub samples_per_second: f64,
    /// Encoder-GEMM floor time / step time.
    pub fraction_of_floor: f64,
}

fn parse_kind(name: &str) -> Result<SaeKind> {
    Ok(match name.trim() {
        "topk" => SaeKind::Topk,
        "batch_topk" => SaeKind::BatchTopk,
        "jumprelu" => SaeKind::Jumprelu,
        "relu" => SaeKind::Relu,
        other => {
            anyhow::bail!("unknown SAE kind `{other}`; expected topk, batch_topk, jumprelu or relu")
        }
    })
}

/// Unit-norm Gaussian rows, like L2-normalised encoder features.
fn batch(rows: usize, d: usize, rng: &mut StdRng) -> Tensor {
    let mut data: Vec<f32> = (0..rows * d).map(|_| StandardNormal.sample(rng)).collect();
    crate::base::cpu::normalize_rows(&mut data, d);
    Tensor::from_vec(data, (rows, d), &Device::Cpu).expect("shape matches")
}

fn trainer(
    args: &TrainBenchArgs,
    kind: SaeKind,
    lambda: f64,
    device: &Device,
) -> Result<SaeTrainer> {
    let sae = match SaeConfig::of_kind(kind) {
        SaeConfig::Topk(c) => SaeConfig::Topk(TopkConfig { n_latents: args.m, k: args.k, ..c }),
        SaeConfig::BatchTopk(c) => {
            SaeConfig::BatchTopk(BatchTopkConfig { n_latents: args.m, k: args.k, ..c })
        }
        SaeConfig::Jumprelu(c) => SaeConfig::Jumprelu(JumpReluConfig { n_latents: args.m, ..c }),
        SaeConfig::Relu(c) => SaeConfig::Relu(ReluConfig { n_latents: args.m, ..c }),
    };
    let mut config = Config { sae, ..Config::default() };
    config.train.batch_size = args.batch;
    config.mono.lambda = Some(lambda);
    config.run.ops = args.ops;
    let spec = crate::sae::SaeSpec::from_config(&config.sae, args.d);
    SaeTrainer::new(&config, &spec, device)
}

/// Median seconds of the encoder's product alone, (B × D) · (D × M), through the product the
/// step would run for all pre-activations: the host kernels' f32 GEMM on the CPU, candle's
/// matmul otherwise. A step that computes every pre-activation in f32 cannot beat it; with AMX
/// tiles the BatchTopK step screens the product instead and recomputes only its candidates.
fn encoder_gemm_floor(args: &TrainBenchArgs, device: &Device, kernels: Kernels) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let x = batch(args.batch, args.d, &mut rng).to_device(device)?;
    let w = batch(args.m, args.d, &mut rng).to_device(device)?;
    let host = kernels.for_tensor(&x).is_host();
    let (xs, ws) = match host {
        true => (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?),
        false => (Vec::new(), Vec::new()),
    };
    let (b, d, m) = (args.batch, args.d, args.m);
    let mut times = Vec::new();
    for i in 0..args.steps + 1 {
        let t = Instant::now();
        if host {
            drop(std::hint::black_box(gemm_f32(b, m, d, &xs, d, 1, &ws, 1, d)));
        } else {
            let product = x.matmul(&w.t()?)?;
            device.synchronize()?;
            drop(product);
        }
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Median seconds per step without and with MonoLoss: both trainers warm up, then their steps
/// alternate on the same batches so that machine noise hits both alike.
/// Each timed step ends when the device has finished it (steps are asynchronous on GPUs).
fn time_pair(
    args: &TrainBenchArgs,
    kind: SaeKind,
    lambda: f64,
    device: &Device,
) -> Result<(f64, f64)> {
    let lr = Config::default().train.lr;
    let mut base = trainer(args, kind, 0.0, device)?;
    let mut mono = trainer(args, kind, lambda, device)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let batches: Vec<Tensor> = (0..args.steps + 1)
        .map(|_| batch(args.batch, args.d, &mut rng).to_device(device))
        .collect::<candle_core::Result<_>>()?;
    base.step(&batches[0], &batches[0], lr, None, false)?;
    mono.step(&batches[0], &batches[0], lr, None, false)?;
    device.synchronize()?;
    let (mut tb, mut tm) = (Vec::new(), Vec::new());
    for x in &batches[1..] {
        let t = Instant::now();
        base.step(x, x, lr, None, false)?;
        device.synchronize()?;
        tb.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        mono.step(x, x, lr, None, false)?;
        device.synchronize()?;
        tm.push(t.elapsed().as_secs_f64());
    }
    Ok((median(tb), median(tm)))
}

pub fn run(args: &TrainBenchArgs) -> Result<Vec<TrainTiming>> {
    let kinds: Vec<SaeKind> = args.kinds.iter().map(|k| parse_kind(k)).collect::<Result<_>>()?;
    let device = crate::base::device::open_device(&args.device)?;
    let kernels = Kernels::choose(args.ops, &device);
    println!(
        "SAE training step: D = {}, M = {}, k = {}, batch {}, {} timed steps, {} threads, {} ({:?} kernels)",
        args.d,
        args.m,
        args.k,
        args.batch,
        args.steps,
        rayon::current_num_threads(),
        args.device,
        kernels
    );
    let floor = encoder_gemm_floor(args, &device, kernels)?;
    println!(
        "encoder GEMM floor (B × D by D × M in f32, every pre-activation): {:.3} s = {:.0} samples/s",
        floor,
        args.batch as f64 / floor
    );
    println!(
        "{:<12} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "sae", "λ", "s/step", "samples/s", "overhead", "of floor"
    );
    let mut timings = Vec::new();
    for kind in kinds {
        let lambda = paper_lambda(DatasetKind::Imagenet, EncoderKind::Clip, kind)
            .expect("paper λ for CLIP on ImageNet");
        let (base, with_mono) = time_pair(args, kind, lambda, &device)?;
        let name = serde_json::to_value(kind)?.as_str().unwrap_or("?").to_string();
        for (l, t) in [(0.0, base), (lambda, with_mono)] {
            let overhead = if l > 0.0 {
                format!("{:+.1} %", 100.0 * (with_mono / base - 1.0))
            } else {
                String::new()
            };
            println!(
                "{:<12} {:>10} {:>12.3} {:>12.0} {:>10} {:>9.0} %",
                name,
                l,
                t,
                args.batch as f64 / t,
                overhead,
                100.0 * floor / t
            );
            timings.push(TrainTiming {
                kind: name.clone(),
                lambda: l,
                seconds_per_step: t,
                samples_per_second: args.batch as f64 / t,
                fraction_of_floor: floor / t,
            });
        }
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "benchmark": "train", "d": args.d, "m": args.m, "k": args.k, "batch": args.batch,
            "threads": rayon::current_num_threads(), "encoder_gemm_floor_seconds": floor,
            "timings": timings,
        });
        super::write_json(path, doc)?;
    }
    Ok(timings)
}
