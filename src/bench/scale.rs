//! `mono bench scale`: an ImageNet-size rehearsal on synthetic features. Builds (once) a
//! class-sorted 1,281,167 × 768 f16 store of 1,000 classes and a 50,000-row held-out store through
//! the import path, measures the store reader cold and warm, trains the paper's BatchTopK SAE
//! for a bounded number of steps through the real training loop, and evaluates it on the
//! held-out rows; each phase reports its seconds, rate, peak heap and resident memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Result};
use serde::Serialize;

use super::synthetic::{ensure_store, BuildRecord, Stream, SyntheticSpec};
use crate::base::config::{BatchTopkConfig, Config, SaeConfig};
use crate::base::memory::{begin_phase, mib, phase_memory, PhaseMemory};
use crate::data::store::FeatureStore;
use crate::layout::EvalResults;
use crate::train::sae::{train_sae, SaeTrainInputs};

#[derive(Clone, Debug, clap::Args)]
pub struct ScaleBenchArgs {
    /// Where the synthetic stores are built once and reused (≈ 2 GB at the default size).
    #[arg(long, default_value = "bench-scale")]
    pub dir: PathBuf,
    /// Training rows (ImageNet-1k train: 1,281,167).
    #[arg(long, default_value_t = 1_281_167)]
    pub rows: usize,
    /// Held-out rows the SAE is evaluated on.
    #[arg(long, default_value_t = 50_000)]
    pub heldout: usize,
    #[arg(long, default_value_t = 768)]
    pub dim: usize,
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
    #[arg(long, default_value_t = 8192)]
    pub latents: usize,
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    #[arg(long, default_value_t = 2048, value_parser = crate::base::config::positive)]
    pub batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lambda: f64,
    /// Training steps (the paper's 50 epochs of ImageNet are 31,250).
    #[arg(long, default_value_t = 200, value_parser = crate::base::config::positive)]
    pub steps: usize,
    /// Batches the reader is timed on from a warm and a cold page cache (a tenth of them with
    /// the cache evicted before every batch).
    #[arg(long, default_value_t = 100, value_parser = crate::base::config::positive)]
    pub read_batches: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Device: cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One phase of the rehearsal.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    /// Rows (import, read, evaluation) or samples (training) per second.
    pub per_second: f64,
    pub memory: PhaseMemory,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleReport {
    pub rows: usize,
    pub heldout: usize,
    pub dim: usize,
    pub latents: usize,
    pub k: usize,
    pub batch: usize,
    pub lambda: f64,
    pub steps: usize,
    pub threads: usize,
    /// Whether the cold read really started from the disk (page cache eviction worked).
    pub cold_read_evicted: bool,
    pub phases: Vec<Phase>,
    pub eval: EvalResults,
}

pub fn run(args: &ScaleBenchArgs) -> Result<ScaleReport> {
    ensure!(args.steps > 0, "--steps must be > 0");
    ensure!(
        args.batch <= args.rows,
        "--batch {} is larger than the {} training rows",
        args.batch,
        args.rows
    );
    let device = crate::base::device::open_device(&args.device)?;
    let spec = |rows, stream| SyntheticSpec {
        rows,
        dim: args.dim,
        classes: args.classes,
        seed: args.seed,
        stream,
    };
    let (train_spec, heldout_spec) =
        (spec(args.rows, Stream::Train), spec(args.heldout, Stream::Heldout));
    println!(
        "scale rehearsal: {} × {} f16 class-sorted training rows ({} classes), {} held-out rows, in {}",
        args.rows,
        args.dim,
        args.classes,
        args.heldout,
        args.dir.display()
    );
    let mut phases = Vec::new();
    for spec in [&train_spec, &heldout_spec] {
        let (_, record) = ensure_store(&args.dir, spec)?;
        phases.extend(build_phases(&record));
    }

    let train_dir = train_spec.dir(&args.dir).join(Stream::Train.split());
    let mut evicted = true;
    for cache in [
        Cache::ColdEveryBatch { prefetch: false },
        Cache::ColdEveryBatch { prefetch: true },
        Cache::ColdStart,
        Cache::Warm,
    ] {
        let (phase, ok) = read_phase(&train_dir, args, cache)?;
        phases.push(phase);
        evicted &= ok || cache == Cache::Warm;
    }

    let train = FeatureStore::open(&train_dir)?;
    let heldout = FeatureStore::open(&heldout_spec.dir(&args.dir).join(Stream::Heldout.split()))?;
    let config = rehearsal_config(args);
    let run_dir = tempfile::Builder::new().prefix(".mono-run-").tempdir_in(&args.dir)?;
    begin_phase();
    let inputs = SaeTrainInputs { train: &train, train_similarity: None };
    let trained = train_sae(&config, &inputs, run_dir.path(), false, &device)?;
    let samples = (trained.steps * args.batch) as f64;
    phases.push(Phase {
        name: format!("train ({} steps)", trained.steps),
        seconds: trained.seconds,
        per_second: samples / trained.seconds,
        memory: phase_memory(),
    });

    begin_phase();
    let started = Instant::now();
    let (eval, _) =
        crate::eval::evaluate(trained.sae.as_ref(), &heldout, None, args.batch, &device)?;
    let seconds = started.elapsed().as_secs_f64();
    phases.push(Phase {
        name: format!("evaluate ({} rows)", heldout.len()),
        seconds,
        per_second: heldout.len() as f64 / seconds,
        memory: phase_memory(),
    });

    let report = ScaleReport {
        rows: args.rows,
        heldout: args.heldout,
        dim: args.dim,
        latents: args.latents,
        k: args.k,
        batch: args.batch,
        lambda: args.lambda,
        steps: trained.steps,
        threads: rayon::current_num_threads(),
        cold_read_evicted: evicted,
        phases,
        eval,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        super::write_json(path, serde_json::to_value(&report)?)?;
    }
    Ok(report)
}

/// The paper's BatchTopK SAE at the rehearsal's sizes, stopped after `steps`.
fn rehearsal_config(args: &ScaleBenchArgs) -> Config {
    let mut config = Config {
        sae: SaeConfig::BatchTopk(BatchTopkConfig {
            n_latents: args.latents,
            k: args.k,
            ..BatchTopkConfig::default()
        }),
        ..Config::default()
    };
    config.train.batch_size = args.batch;
    config.train.max_steps = Some(args.steps);
    config.train.checkpoint_every = 0;
    config.mono.lambda = Some(args.lambda);
    config.run.seed = args.seed;
    config.run.device = args.device.clone();
    config.run.log_every = args.steps.min(50);
    config
}

/// Writing the synthetic .npy and importing it (as measured when the store was built).
fn build_phases(record: &BuildRecord) -> [Phase; 2] {
    let (split, rows) = (record.spec.stream.split(), record.spec.rows);
    [
        Phase {
            name: format!("generate {split} .npy ({rows} rows)"),
            seconds: record.generate_seconds,
            per_second: rows as f64 / record.generate_seconds,
            memory: PhaseMemory::default(),
        },
        Phase {
            name: format!("import {split} ({rows} rows)"),
            seconds: record.import_seconds,
            per_second: record.import_rows_per_second,
            memory: record.import_memory,
        },
    ]
}

/// How warm the page cache is when the reader is timed.
#[derive(Clone, Copy, PartialEq)]
enum Cache {
    /// The store's pages are evicted once: the pass starts from the disk (an epoch's start).
    ColdStart,
    /// Evicted before every batch (store closed, evicted, reopened, untimed): every row comes
    /// from the disk, as from a store much larger than memory. With `prefetch`, the batch's rows
    /// are requested all at once first, as training does for such a store.
    ColdEveryBatch { prefetch: bool },
    /// Whatever the previous passes left: a store that fits in memory.
    Warm,
}

/// Rows/s of gathering training batches (the first batches of epoch 0's order) from the store
/// alone, and whether the eviction the pass asked for worked.
fn read_phase(dir: &Path, args: &ScaleBenchArgs, cache: Cache) -> Result<(Phase, bool)> {
    let mut evicted = cache != Cache::Warm && evict_store(dir)?;
    begin_phase();
    let mut store = FeatureStore::open(dir)?;
    let order = store.epoch_order(args.seed, 0);
    let batches = match cache {
        Cache::ColdEveryBatch { .. } => args.read_batches.div_ceil(10),
        _ => args.read_batches,
    };
    let batches = batches.min(store.len() / args.batch).max(1);
    let mut out = Vec::new();
    let mut seconds = 0.0;
    for b in 0..batches {
        if matches!(cache, Cache::ColdEveryBatch { .. }) && b > 0 {
            drop(store);
            evicted &= evict_store(dir)?;
            store = FeatureStore::open(dir)?;
        }
        let rows = order.rows(b * args.batch..((b + 1) * args.batch).min(order.len()));
        let started = Instant::now();
        if cache == (Cache::ColdEveryBatch { prefetch: true }) {
            store.prefetch_rows(&rows);
        }
        store.read_rows(&rows, &mut out)?;
        seconds += started.elapsed().as_secs_f64();
    }
    let rows = (batches * args.batch).min(store.len());
    let name = match cache {
        Cache::ColdStart => "read, cold start",
        Cache::ColdEveryBatch { prefetch: false } => "read from disk",
        Cache::ColdEveryBatch { prefetch: true } => "read from disk, prefetched",
        Cache::Warm => "read, warm",
    };
    let phase = Phase {
        name: format!("{name} ({batches} batches)"),
        seconds,
        per_second: rows as f64 / seconds,
        memory: phase_memory(),
    };
    Ok((phase, evicted))
}

/// Drops the store's files from the page cache; false where the platform cannot.
fn evict_store(dir: &Path) -> Result<bool> {
    let mut all = true;
    for entry in std::fs::read_dir(dir)? {
        all &= crate::base::io::evict_from_page_cache(&entry?.path())?;
    }
    Ok(all)
}

fn print_report(r: &ScaleReport) {
    println!(
        "\n{:<40} {:>9} {:>12} {:>10} {:>10} {:>9} {:>9}",
        "phase", "seconds", "rows/s", "heap MiB", "RSS MiB", "anon MiB", "file MiB"
    );
    for p in &r.phases {
        println!(
            "{:<40} {:>9.2} {:>12.0} {:>10} {:>10} {:>9} {:>9}",
            p.name,
            p.seconds,
            p.per_second,
            mib(Some(p.memory.peak_heap).filter(|&h| h > 0)),
            mib(p.memory.peak_rss),
            mib(p.memory.rss_anon),
            mib(p.memory.rss_file),
        );
    }
    let e = &r.eval;
    println!(
        "\nheld-out: R² {:.4}, L0 {:.1}, dead {} of {}, MonoScore {}, purity {}",
        e.r2,
        e.l0,
        e.dead_latents,
        r.latents,
        e.monoscore.mean.map_or("-".into(), |s| format!("{s:.4}")),
        e.purity.as_ref().map_or("-".into(), |p| format!("{:.4}", p.binary)),
    );
    println!(
        "heap and RSS are peaks of each phase; anon/file: resident at its end (file = mapped \
         store pages, page cache the kernel reclaims). {} threads.{}",
        r.threads,
        if r.cold_read_evicted { "" } else { " The cold read could not evict the page cache." }
    );
}
