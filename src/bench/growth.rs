//! `mono bench growth`: how the time and peak heap of SAE training and evaluation grow with the
//! number of rows N, the latents M, k and the feature width D, each swept around the paper's
//! BatchTopK setup (N = 1.28 M, M = 8192, k = 64, D = 768, batch 2048) with the others held,
//! with the exponent of a log-log least-squares fit; then a projection of every SAE run in
//! configs/paper/ (50 epochs each) on this machine and on one H100.
//!
//! Training steps run on synthetic class-structured rows (bench::synthetic); the N sweep trains
//! through the real loop on class-sorted stores of N rows and the evaluation sweeps read
//! held-out stores, all built once under --dir and reused.

use std::path::PathBuf;
use std::time::Instant;

use super::median;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::synthetic::{ensure_store, Stream, SyntheticSpec};
use crate::base::config::{
    BatchTopkConfig, Config, DatasetKind, EncoderOutput, JumpReluConfig, ReluConfig, SaeConfig,
    SaeKind, Stage, TopkConfig,
};
use crate::base::memory::{begin_phase, phase_memory};
use crate::data::store::EpochOrder;
use crate::sae::Sae;
use crate::train::sae::{train_sae, SaeTrainInputs, SaeTrainer};

#[derive(Clone, Debug, clap::Args)]
pub struct GrowthBenchArgs {
    /// Where the synthetic stores are built once and reused (shared with `mono bench scale`).
    #[arg(long, default_value = "bench-scale")]
    pub dir: PathBuf,
    /// Training rows of the stores the N sweep trains on.
    #[arg(long, value_delimiter = ',', default_value = "100000,400000,1281167")]
    pub rows: Vec<usize>,
    /// Held-out rows of the stores the evaluation N sweep reads.
    #[arg(long, value_delimiter = ',', default_value = "12500,25000,50000,100000")]
    pub eval_rows: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
    pub latents: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    pub ks: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "512,768,1024,1152")]
    pub dims: Vec<usize>,
    /// Held-out rows of the M and k evaluation sweeps.
    #[arg(long, default_value_t = 25_000)]
    pub eval_reference_rows: usize,
    #[arg(long, default_value_t = 2048, value_parser = crate::base::config::positive)]
    pub batch: usize,
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
    /// Timed steps per point (after one untimed warm-up); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Steps an SAE trains before it is evaluated (so BatchTopK's threshold has settled).
    #[arg(long, default_value_t = 20)]
    pub train_steps: usize,
    /// The paper's configs to project (SAE runs only).
    #[arg(long, default_value = "configs/paper")]
    pub paper_configs: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The paper's BatchTopK setup, around which every sweep varies one quantity.
const REFERENCE: Setup = Setup { latents: 8192, k: 64, dim: 768 };
const IMAGENET_TRAIN: usize = 1_281_167;

#[derive(Clone, Copy, Debug, Serialize)]
struct Setup {
    latents: usize,
    k: usize,
    dim: usize,
}

/// One measured point of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub x: usize,
    pub seconds: f64,
    pub peak_heap: usize,
    /// Mean active latents per row (evaluation points).
    pub l0: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub name: String,
    /// What `seconds` is: one training step, or one evaluation.
    pub measures: String,
    pub points: Vec<Point>,
    pub time_exponent: f64,
    pub heap_exponent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    pub config: String,
    pub runs: usize,
    pub steps: usize,
    pub cpu_hours: f64,
    pub h100_hours: f64,
}

pub fn run(args: &GrowthBenchArgs) -> Result<(Vec<Sweep>, Vec<Projection>)> {
    ensure!(args.steps > 0 && args.train_steps > args.steps, "--train-steps must exceed --steps");
    let device = Device::Cpu;
    println!(
        "cost growth around N = {IMAGENET_TRAIN}, M = {}, k = {}, D = {}, batch {}, {} threads",
        REFERENCE.latents,
        REFERENCE.k,
        REFERENCE.dim,
        args.batch,
        rayon::current_num_threads()
    );
    let mut sweeps = Vec::new();
    let mut eval_m = Vec::new();
    let mut step_m = Vec::new();
    for &m in &args.latents {
        let setup = Setup { latents: m, ..REFERENCE };
        let (point, sae) = time_training(args, SaeKind::BatchTopk, setup, &device)?;
        step_m.push(point);
        eval_m.push(time_evaluation(args, sae.as_ref(), args.eval_reference_rows, m, &device)?);
    }
    let (mut step_k, mut eval_k) = (Vec::new(), Vec::new());
    for &k in &args.ks {
        let setup = Setup { k, ..REFERENCE };
        let (point, sae) = time_training(args, SaeKind::BatchTopk, setup, &device)?;
        step_k.push(Point { x: k, ..point });
        eval_k.push(time_evaluation(args, sae.as_ref(), args.eval_reference_rows, k, &device)?);
    }
    let mut step_d = Vec::new();
    for &dim in &args.dims {
        let (point, _) =
            time_training(args, SaeKind::BatchTopk, Setup { dim, ..REFERENCE }, &device)?;
        step_d.push(Point { x: dim, ..point });
    }
    let (reference_point, reference_sae) =
        time_training(args, SaeKind::BatchTopk, REFERENCE, &device)?;
    let mut eval_n = Vec::new();
    for &n in &args.eval_rows {
        eval_n.push(time_evaluation(args, reference_sae.as_ref(), n, n, &device)?);
    }
    let mut step_n = Vec::new();
    for &n in &args.rows {
        step_n.push(time_training_on_store(args, n, &device)?);
    }
    let mut kinds = vec![(SaeKind::BatchTopk, reference_point.seconds)];
    for kind in [SaeKind::Topk, SaeKind::Jumprelu, SaeKind::Relu] {
        kinds.push((kind, time_training(args, kind, REFERENCE, &device)?.0.seconds));
    }

    for (name, measures, points) in [
        ("training step vs N (rows of the store)", "s/step", step_n),
        ("training step vs M (latents)", "s/step", step_m),
        ("training step vs k", "s/step", step_k),
        ("training step vs D (feature width)", "s/step", step_d),
        ("evaluation vs N (held-out rows)", "s", eval_n),
        ("evaluation vs M (latents)", "s", eval_m),
        ("evaluation vs k", "s", eval_k),
    ] {
        sweeps.push(sweep(name, measures, points));
    }
    for s in &sweeps {
        print_sweep(s);
    }
    println!("\ntraining step at the reference by kind:");
    for (kind, seconds) in &kinds {
        println!("  {:<10} {seconds:.3} s/step", kind_name(*kind));
    }

    let projections = project(args, &sweeps, &kinds)?;
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "benchmark": "growth", "batch": args.batch, "threads": rayon::current_num_threads(),
            "sweeps": sweeps, "projections": projections,
            "kinds": kinds.iter().map(|(k, s)| (kind_name(*k), *s)).collect::<Vec<_>>(),
        });
        super::write_json(path, doc)?;
    }
    Ok((sweeps, projections))
}

fn kind_name(kind: SaeKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn config_for(args: &GrowthBenchArgs, kind: SaeKind, setup: Setup) -> Config {
    let (m, k) = (setup.latents, setup.k);
    let sae = match SaeConfig::of_kind(kind) {
        SaeConfig::Topk(c) => SaeConfig::Topk(TopkConfig { n_latents: m, k, ..c }),
        SaeConfig::BatchTopk(c) => SaeConfig::BatchTopk(BatchTopkConfig { n_latents: m, k, ..c }),
        SaeConfig::Jumprelu(c) => SaeConfig::Jumprelu(JumpReluConfig { n_latents: m, ..c }),
        SaeConfig::Relu(c) => SaeConfig::Relu(ReluConfig { n_latents: m, ..c }),
    };
    let mut config = Config { sae, ..Config::default() };
    config.train.batch_size = args.batch;
    config.mono.lambda = Some(3e-4);
    config.run.seed = args.seed;
    config
}

/// Median seconds of a training step and the peak heap, on class-structured synthetic batches
/// drawn in a random order from 1.28 M rows; the SAE after `train_steps` steps.
fn time_training(
    args: &GrowthBenchArgs,
    kind: SaeKind,
    setup: Setup,
    device: &Device,
) -> Result<(Point, Box<dyn Sae>)> {
    let spec = synthetic(args, IMAGENET_TRAIN, setup.dim, Stream::Train);
    let config = config_for(args, kind, setup);
    let sae_spec = crate::sae::SaeSpec::from_config(&config.sae, setup.dim);
    let order = EpochOrder::new(IMAGENET_TRAIN, args.seed, 0);
    let batches: Vec<Tensor> = (0..args.train_steps)
        .map(|s| {
            let rows = order.rows(s * args.batch..(s + 1) * args.batch);
            Tensor::from_vec(spec.sample_rows(&rows), (args.batch, setup.dim), device)
        })
        .collect::<candle_core::Result<_>>()?;
    begin_phase();
    let mut trainer = SaeTrainer::new(&config, &sae_spec, device)?;
    let lr = config.train.lr;
    let mut times = Vec::new();
    for (s, x) in batches.iter().enumerate() {
        let started = Instant::now();
        trainer.step(x, x, lr, None, false)?;
        if (1..=args.steps).contains(&s) {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let point = Point {
        x: setup.latents,
        seconds: median(times),
        peak_heap: phase_memory().peak_heap,
        l0: None,
    };
    Ok((point, trainer.sae))
}

/// Seconds per step and peak heap of the real training loop on a class-sorted store of `rows`.
fn time_training_on_store(args: &GrowthBenchArgs, rows: usize, device: &Device) -> Result<Point> {
    let (store, _) = ensure_store(&args.dir, &synthetic(args, rows, REFERENCE.dim, Stream::Train))?;
    let mut config = config_for(args, SaeKind::BatchTopk, REFERENCE);
    config.train.max_steps = Some(args.train_steps);
    config.train.checkpoint_every = 0;
    config.run.log_every = args.train_steps;
    let run_dir = tempfile::Builder::new().prefix(".mono-run-").tempdir_in(&args.dir)?;
    begin_phase();
    let inputs = SaeTrainInputs { train: &store, train_similarity: None };
    let trained = train_sae(&config, &inputs, run_dir.path(), false, device)?;
    Ok(Point {
        x: rows,
        seconds: trained.seconds / trained.steps as f64,
        peak_heap: phase_memory().peak_heap,
        l0: None,
    })
}

/// Seconds and peak heap of evaluating `sae` on a held-out store of `rows`.
fn time_evaluation(
    args: &GrowthBenchArgs,
    sae: &dyn Sae,
    rows: usize,
    x: usize,
    device: &Device,
) -> Result<Point> {
    let dim = sae.spec().d_in;
    let (store, _) = ensure_store(&args.dir, &synthetic(args, rows, dim, Stream::Heldout))?;
    begin_phase();
    let started = Instant::now();
    let (results, _) = crate::eval::evaluate(sae, &store, None, args.batch, device)?;
    Ok(Point {
        x,
        seconds: started.elapsed().as_secs_f64(),
        peak_heap: phase_memory().peak_heap,
        l0: Some(results.l0),
    })
}

fn synthetic(args: &GrowthBenchArgs, rows: usize, dim: usize, stream: Stream) -> SyntheticSpec {
    SyntheticSpec { rows, dim, classes: args.classes.min(rows), seed: args.seed, stream }
}

fn sweep(name: &str, measures: &str, points: Vec<Point>) -> Sweep {
    let fit = |y: &dyn Fn(&Point) -> f64| {
        fitted_exponent(&points.iter().map(|p| (p.x as f64, y(p))).collect::<Vec<_>>())
    };
    Sweep {
        name: name.into(),
        measures: measures.into(),
        time_exponent: fit(&|p| p.seconds),
        heap_exponent: fit(&|p| p.peak_heap as f64),
        points,
    }
}

/// The slope b of the least-squares line ln y = a + b·ln x (NaN with fewer than two points or
/// a non-positive value).
pub fn fitted_exponent(points: &[(f64, f64)]) -> f64 {
    if points.len() < 2 || points.iter().any(|&(x, y)| x <= 0.0 || y <= 0.0) {
        return f64::NAN;
    }
    let logs: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.ln(), y.ln())).collect();
    let n = logs.len() as f64;
    let (mx, my) = logs.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let sxy: f64 = logs.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = logs.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    sxy / sxx
}

fn print_sweep(s: &Sweep) {
    println!("\n{}", s.name);
    println!("{:>10} {:>10} {:>10} {:>8}", "x", s.measures, "heap MiB", "L0");
    for p in &s.points {
        println!(
            "{:>10} {:>10.3} {:>10.1} {:>8}",
            p.x,
            p.seconds,
            p.peak_heap as f64 / (1 << 20) as f64,
            p.l0.map_or("".into(), |l| format!("{l:.1}"))
        );
    }
    println!("fitted exponent: time {:.2}, heap {:.2}", s.time_exponent, s.heap_exponent);
}

/// One H100's projected step at the reference (docs/gpu.md: ≈ 10 ms, GEMM-bound), scaled by
/// M·D like its GEMMs.
const H100_REFERENCE_STEP_SECONDS: f64 = 0.010;

/// Training rows and evaluation rows of the paper's SAE datasets.
fn dataset_rows(kind: DatasetKind) -> Option<(usize, usize)> {
    match kind {
        DatasetKind::Imagenet => Some((IMAGENET_TRAIN, 50_000)),
        // OpenImagesV7 with image-level labels as the paper uses it: ≈ 1.74 M train, 41,620
        // validation images.
        DatasetKind::Openimages => Some((1_743_042, 41_620)),
        _ => None,
    }
}

/// Feature width of the paper's encoder outputs (their model cards).
fn feature_dim(model: &str, output: Option<EncoderOutput>) -> Option<usize> {
    match (model, output) {
        ("openai/clip-vit-large-patch14", Some(EncoderOutput::ImageEmbeds)) => Some(768),
        ("openai/clip-vit-large-patch14", _) => Some(1024),
        ("google/siglip2-so400m-patch14-384", _) => Some(1152),
        ("google/vit-large-patch16-224", _) => Some(1024),
        _ => None,
    }
}

/// Hours of every SAE run in `args.paper_configs` (each sweep child is a run: its epochs ×
/// steps per epoch × the step time modelled from the sweeps, plus one evaluation).
fn project(
    args: &GrowthBenchArgs,
    sweeps: &[Sweep],
    kinds: &[(SaeKind, f64)],
) -> Result<Vec<Projection>> {
    let exponent = |name: &str| {
        sweeps.iter().find(|s| s.name.starts_with(name)).map_or(1.0, |s| s.time_exponent)
    };
    let (a_m, a_k, a_d) = (
        exponent("training step vs M"),
        exponent("training step vs k"),
        exponent("training step vs D"),
    );
    let eval_n = sweeps.iter().find(|s| s.name.starts_with("evaluation vs N"));
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(&args.paper_configs) {
        Ok(dir) => dir.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => {
            println!("\n(no {} to project)", args.paper_configs.display());
            return Ok(Vec::new());
        }
    };
    entries.sort();
    let mut out = Vec::new();
    for path in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "toml")) {
        let config = Config::load(path)?;
        if !config.run.stages.contains(&Stage::Train) {
            continue;
        }
        let (Some((rows, eval_rows)), Some(dim)) = (
            dataset_rows(config.data.kind),
            feature_dim(&config.encoder.model, config.encoder.output),
        ) else {
            continue;
        };
        let runs =
            crate::pipeline::children(&config).with_context(|| path.display().to_string())?.len();
        let (m, k) =
            (config.sae.n_latents() as f64, config.sae.topk().map_or(REFERENCE.k, |t| t.0) as f64);
        let kind_seconds = kinds.iter().find(|(kind, _)| *kind == config.sae.kind()).map(|k| k.1);
        let step = kind_seconds.context("kind timing")?
            * (m / REFERENCE.latents as f64).powf(a_m)
            * (k / REFERENCE.k as f64).powf(a_k)
            * (dim as f64 / REFERENCE.dim as f64).powf(a_d);
        let steps = config.train.epochs * (rows / config.train.batch_size);
        let eval = eval_n.map_or(0.0, |s| {
            let last = s.points.last().expect("points");
            last.seconds * (eval_rows as f64 / last.x as f64).powf(s.time_exponent)
        });
        let h100_step = H100_REFERENCE_STEP_SECONDS
            * (m / REFERENCE.latents as f64)
            * (dim as f64 / REFERENCE.dim as f64);
        out.push(Projection {
            config: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            runs,
            steps: steps * runs,
            cpu_hours: runs as f64 * (steps as f64 * step + eval) / 3600.0,
            h100_hours: runs as f64 * steps as f64 * h100_step / 3600.0,
        });
    }
    println!("\nprojection of the paper's SAE runs (50 epochs each; every λ of each sweep):");
    println!(
        "{:<36} {:>5} {:>10} {:>12} {:>10}",
        "config", "runs", "steps", "this CPU h", "H100 h"
    );
    for p in &out {
        println!(
            "{:<36} {:>5} {:>10} {:>12.1} {:>10.2}",
            p.config, p.runs, p.steps, p.cpu_hours, p.h100_hours
        );
    }
    let (cpu, gpu): (f64, f64) =
        out.iter().fold((0.0, 0.0), |(c, g), p| (c + p.cpu_hours, g + p.h100_hours));
    println!("{:<36} {:>5} {:>10} {:>12.1} {:>10.2}", "all", "", "", cpu, gpu);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fitted_exponent_recovers_a_power_law() {
        let points: Vec<(f64, f64)> =
            [1.0, 2.0, 4.0, 8.0].iter().map(|&x: &f64| (x, 3.0 * x.powf(1.5))).collect();
        assert!((fitted_exponent(&points) - 1.5).abs() < 1e-12);
        let flat = [(1e5, 7.0), (4e5, 7.0), (1.28e6, 7.0)];
        assert!(fitted_exponent(&flat).abs() < 1e-12);
        assert!(fitted_exponent(&[(1.0, 1.0)]).is_nan());
        assert!(fitted_exponent(&[(1.0, 0.0), (2.0, 1.0)]).is_nan());
    }
}
