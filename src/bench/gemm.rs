//! `mono bench gemm`: GFLOP/s of the three products a convolution trains with — forward
//! W · cols, weight gradient G · colsᵀ, input gradient Wᵀ · G — on the distinct ResNet-50 shapes
//! at 224², through the host kernels' GEMM entry point (`base::gemm::gemm_f32`). The weight
//! gradient is also timed through the gemm crate's own tiled parallel product, which it used
//! before thin products with long contractions were split (see `base::gemm`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::base::gemm::{gemm_f32, gemm_f32_tiled, splits_contraction, Strided};

#[derive(Clone, Debug, clap::Args)]
pub struct GemmBenchArgs {
    /// Images per batch (B in B·OH·OW, the products' long side).
    #[arg(long, default_value_t = 16, value_parser = crate::base::config::positive)]
    pub batch: usize,
    /// Timed repetitions per product (after one untimed); the best is reported.
    #[arg(long, default_value_t = 3, value_parser = crate::base::config::positive)]
    pub reps: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GemmTiming {
    pub layer: String,
    /// Output channels, C·KH·KW and B·OH·OW.
    pub o: usize,
    pub k: usize,
    pub n: usize,
    pub forward_gflops: f64,
    pub weight_gradient_gflops: f64,
    pub weight_gradient_tiled_gflops: f64,
    pub weight_gradient_split: bool,
    pub input_gradient_gflops: f64,
}

/// (layer, in channels, out channels, kernel, output side) of ResNet-50 at 224².
const SHAPES: [(&str, usize, usize, usize, usize); 10] = [
    ("stem 7×7", 3, 64, 7, 112),
    ("layer1 3×3", 64, 64, 3, 56),
    ("layer1 1×1 64→256", 64, 256, 1, 56),
    ("layer1 1×1 256→64", 256, 64, 1, 56),
    ("layer2 3×3", 128, 128, 3, 28),
    ("layer2 1×1 128→512", 128, 512, 1, 28),
    ("layer3 3×3", 256, 256, 3, 14),
    ("layer3 1×1 256→1024", 256, 1024, 1, 14),
    ("layer4 3×3", 512, 512, 3, 7),
    ("layer4 1×1 512→2048", 512, 2048, 1, 7),
];

pub fn run(args: &GemmBenchArgs) -> Result<Vec<GemmTiming>> {
    println!(
        "Convolution products of ResNet-50 training, batch {}, {} threads, best of {}; GFLOP/s",
        args.batch,
        rayon::current_num_threads(),
        args.reps.max(1)
    );
    println!(
        "{:<22} {:>5} {:>5} {:>7} {:>8} {:>8} {:>13} {:>8}",
        "layer", "O", "K", "N", "forward", "dW", "dW (tiled)", "dX"
    );
    let mut out = Vec::new();
    for (layer, c, o, kernel, side) in SHAPES {
        let (k, n) = (c * kernel * kernel, args.batch * side * side);
        let cols = values(k * n, 1.0);
        let grad = values(o * n, 2.0);
        let weight = values(o * k, 3.0);
        let gflops = |seconds: f64| 2.0 * (o * k * n) as f64 / seconds / 1e9;
        let forward = best_of(args.reps, || gemm_f32(o, n, k, &weight, k, 1, &cols, n, 1));
        let dw = best_of(args.reps, || gemm_f32(o, k, n, &grad, n, 1, &cols, 1, n));
        let (g, c) = (Strided { data: &grad, rs: n, cs: 1 }, Strided { data: &cols, rs: 1, cs: n });
        let dw_tiled = best_of(args.reps, || gemm_f32_tiled(o, k, n, g, c));
        let dx = best_of(args.reps, || gemm_f32(k, n, o, &weight, 1, k, &grad, n, 1));
        let timing = GemmTiming {
            layer: layer.into(),
            o,
            k,
            n,
            forward_gflops: gflops(forward),
            weight_gradient_gflops: gflops(dw),
            weight_gradient_tiled_gflops: gflops(dw_tiled),
            weight_gradient_split: splits_contraction(o, k, n),
            input_gradient_gflops: gflops(dx),
        };
        println!(
            "{:<22} {:>5} {:>5} {:>7} {:>8.0} {:>8.0} {:>13.0} {:>8.0}{}",
            layer,
            o,
            k,
            n,
            timing.forward_gflops,
            timing.weight_gradient_gflops,
            timing.weight_gradient_tiled_gflops,
            timing.input_gradient_gflops,
            if timing.weight_gradient_split { "  (dW split)" } else { "" }
        );
        out.push(timing);
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({"benchmark": "gemm", "batch": args.batch, "timings": out});
        super::write_json(path, doc)?;
        println!("wrote {}", path.display());
    }
    Ok(out)
}

/// Seconds of the fastest of `reps` runs after one warm-up.
fn best_of(reps: usize, mut f: impl FnMut() -> Vec<f32>) -> f64 {
    std::hint::black_box(f());
    (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn values(len: usize, seed: f32) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}
