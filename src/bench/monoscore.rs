//! `mono bench monoscore`: the one-pass engine (sparse and dense paths) against the pairwise
//! reference, on synthetic TopK-like activations generated batch by batch (memory stays flat).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp1, StandardNormal};
use serde::Serialize;

use crate::base::alloc;
use crate::monoscore::{pairwise_monoscore, MonoScoreAccumulator, ScorePath, SparseBatch};

#[derive(Clone, Debug, clap::Args)]
pub struct MonoScoreBenchArgs {
    /// Images.
    #[arg(long, default_value_t = 65536)]
    pub n: usize,
    /// Similarity embedding width.
    #[arg(long, default_value_t = 768)]
    pub d: usize,
    /// Neurons (latents).
    #[arg(long, default_value_t = 8192)]
    pub m: usize,
    /// Active latents per image.
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    /// Rows per batch fed to the accumulator.
    #[arg(long, default_value_t = 4096, value_parser = crate::base::config::positive)]
    pub batch: usize,
    /// Rows timed on the dense path (extrapolated linearly to N when fewer).
    #[arg(long, default_value_t = 8192)]
    pub dense_rows: usize,
    /// Rows timed on the pairwise reference (extrapolated quadratically to N).
    #[arg(long, default_value_t = 1024)]
    pub reference_rows: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub method: String,
    pub rows_timed: usize,
    pub seconds_timed: f64,
    /// Seconds for all N rows: measured when rows_timed = N, else extrapolated.
    pub seconds_at_n: f64,
    pub extrapolated: Option<String>,
    pub peak_heap_bytes: Option<usize>,
}

/// Synthetic batch `b`: Gaussian embeddings and k distinct random latents per row with
/// exponential values, regenerated from (seed, b) so every path sees the same data.
fn synthetic_batch(args: &MonoScoreBenchArgs, b: usize, rows: usize) -> (Vec<f32>, SparseBatch) {
    let mut rng = StdRng::seed_from_u64(args.seed ^ (b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let embeddings: Vec<f32> =
        (0..rows * args.d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let mut indices = Vec::with_capacity(rows * args.k);
    let mut values = Vec::with_capacity(rows * args.k);
    for _ in 0..rows {
        for c in sample(&mut rng, args.m, args.k) {
            indices.push(c as u32);
            let v: f32 = Exp1.sample(&mut rng);
            values.push(v + rng.random::<f32>() * 1e-3);
        }
    }
    (embeddings, SparseBatch::from_fixed_k(indices, values, args.k))
}

fn densify(sparse: &SparseBatch, m: usize) -> Vec<f32> {
    let rows = sparse.row_offsets.len() - 1;
    let mut dense = vec![0f32; rows * m];
    for r in 0..rows {
        for e in sparse.row_offsets[r]..sparse.row_offsets[r + 1] {
            dense[r * m + sparse.columns[e] as usize] = sparse.values[e];
        }
    }
    dense
}

/// Runs the one-pass engine over the first `rows` rows; returns (time in the engine, peak heap).
fn time_one_pass(
    args: &MonoScoreBenchArgs,
    rows: usize,
    path: ScorePath,
) -> Result<(Duration, usize)> {
    alloc::reset_peak();
    let mut acc = MonoScoreAccumulator::new(args.d, args.m);
    let mut spent = Duration::ZERO;
    let bar = crate::base::progress::bar(
        rows as u64,
        if path == ScorePath::Sparse { "sparse" } else { "dense" },
    );
    for (b, start) in (0..rows).step_by(args.batch).enumerate() {
        let len = args.batch.min(rows - start);
        let (embeddings, sparse) = synthetic_batch(args, b, len);
        let t = Instant::now();
        match path {
            ScorePath::Sparse => acc.add_sparse(&embeddings, sparse.as_rows())?,
            _ => {
                let dense = densify(&sparse, args.m);
                acc.add(&embeddings, &dense, ScorePath::Dense)?;
            }
        }
        spent += t.elapsed();
        bar.inc(len as u64);
    }
    let t = Instant::now();
    let scores = acc.finish();
    spent += t.elapsed();
    bar.finish_and_clear();
    ensure!(scores.summary().live > 0, "benchmark data produced no live neuron");
    Ok((spent, alloc::peak_bytes()))
}

pub fn run(args: &MonoScoreBenchArgs) -> Result<Vec<Timing>> {
    ensure!(args.k <= args.m, "--k {} must be ≤ --m {}", args.k, args.m);
    ensure!(args.n >= 2 && args.batch > 0, "--n must be ≥ 2 and --batch > 0");
    let tracking = alloc::is_tracking();
    let peak = |bytes: usize| tracking.then_some(bytes);
    let n = args.n;
    let mut timings = Vec::new();

    let (t, mem) = time_one_pass(args, n, ScorePath::Sparse)?;
    timings.push(Timing {
        method: "one-pass, sparse path".into(),
        rows_timed: n,
        seconds_timed: t.as_secs_f64(),
        seconds_at_n: t.as_secs_f64(),
        extrapolated: None,
        peak_heap_bytes: peak(mem),
    });

    let dense_rows = args.dense_rows.clamp(2, n);
    let (t, mem) = time_one_pass(args, dense_rows, ScorePath::Dense)?;
    let scale = n as f64 / dense_rows as f64;
    timings.push(Timing {
        method: "one-pass, dense path".into(),
        rows_timed: dense_rows,
        seconds_timed: t.as_secs_f64(),
        seconds_at_n: t.as_secs_f64() * scale,
        extrapolated: (dense_rows < n).then(|| format!("linear in N, ×{scale:.1}")),
        peak_heap_bytes: peak(mem),
    });

    // The reference and the engine on the same rows: also a correctness check.
    let ref_rows = args.reference_rows.clamp(2, n);
    let (embeddings, sparse) = synthetic_batch(args, 0, ref_rows);
    let dense = densify(&sparse, args.m);
    alloc::reset_peak();
    let t0 = Instant::now();
    let reference = pairwise_monoscore(&embeddings, &dense, ref_rows, args.d, args.m)?;
    let t_ref = t0.elapsed();
    let ref_mem = alloc::peak_bytes();
    let mut acc = MonoScoreAccumulator::new(args.d, args.m);
    acc.add_sparse(&embeddings, sparse.as_rows())?;
    let diff = acc.finish().max_relative_difference(&reference, 1e-3)?;
    ensure!(
        diff <= 1e-6,
        "one-pass and pairwise disagree on the benchmark data (max relative difference {diff:.2e})"
    );
    let scale = (n as f64 / ref_rows as f64).powi(2);
    timings.push(Timing {
        method: "pairwise reference O(N²)".into(),
        rows_timed: ref_rows,
        seconds_timed: t_ref.as_secs_f64(),
        seconds_at_n: t_ref.as_secs_f64() * scale,
        extrapolated: (ref_rows < n).then(|| format!("quadratic in N, ×{scale:.0}")),
        peak_heap_bytes: peak(ref_mem),
    });

    print_table(args, &timings, diff);
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "benchmark": "monoscore",
            "n": args.n, "d": args.d, "m": args.m, "k": args.k, "batch": args.batch,
            "threads": rayon::current_num_threads(),
            "max_relative_difference_vs_reference": diff,
            "timings": timings,
        });
        super::write_json(path, doc)?;
    }
    Ok(timings)
}

fn print_table(args: &MonoScoreBenchArgs, timings: &[Timing], diff: f64) {
    println!(
        "MonoScore benchmark: N = {}, D = {}, M = {}, k = {} active per row, batch {}, {} threads",
        args.n,
        args.d,
        args.m,
        args.k,
        args.batch,
        rayon::current_num_threads()
    );
    println!(
        "{:<28} {:>8} {:>12} {:>14} {:>12}  note",
        "method", "rows", "timed", "at N", "peak heap"
    );
    for t in timings {
        println!(
            "{:<28} {:>8} {:>12} {:>14} {:>12}  {}",
            t.method,
            t.rows_timed,
            human_seconds(t.seconds_timed),
            human_seconds(t.seconds_at_n),
            t.peak_heap_bytes.map(human_bytes).unwrap_or_else(|| "n/a".into()),
            t.extrapolated
                .as_deref()
                .map(|e| format!("extrapolated: {e}"))
                .unwrap_or_else(|| "measured".into())
        );
    }
    let sparse = timings[0].seconds_at_n;
    println!("dense / sparse      = {:.1}×", timings[1].seconds_at_n / sparse);
    println!("pairwise / one-pass = {:.0}× (sparse path)", timings[2].seconds_at_n / sparse);
    println!(
        "one-pass vs pairwise on {} rows: max relative difference {diff:.2e}",
        timings[2].rows_timed
    );
}

pub fn human_seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 600.0 {
        format!("{s:.2} s")
    } else if s < 3.0 * 86400.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} days", s / 86400.0)
    }
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b < 1024.0 * 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else {
        format!("{:.2} GiB", b / 1073741824.0)
    }
}
