//! `mono bench gemm`: GFLOP/s of the three products a layer trains with, through the host
//! kernels' GEMM entry point (`base::gemm::gemm_f32`). For ResNet-50 (the default) the distinct
//! convolution shapes at 224² — forward W · cols, weight gradient G · colsᵀ, input gradient
//! Wᵀ · G, channel-major; for CLIP-ViT-B/32 the linear layers of a block on its B·50 token rows —
//! forward x · Wᵀ, weight gradient Gᵀ · x, input gradient G · W, row-major. The weight gradient is
//! also timed over output tiles only (`gemm_f32_tiled`), as it ran before thin products with long
//! contractions were split (see `base::gemm`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::base::gemm::{gemm_f32, gemm_f32_tiled, splits_contraction, Strided};

#[derive(Clone, Debug, clap::Args)]
pub struct GemmBenchArgs {
    /// Whose layer shapes: resnet50 (convolutions) or clip-b32 (linear layers).
    #[arg(long, default_value = "resnet50", value_parser = ["resnet50", "clip-b32"])]
    pub model: String,
    /// Images per batch (B in B·OH·OW or B·50 tokens, the products' long side).
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
    /// Output channels (features), C·KH·KW (input features) and B·OH·OW (token rows).
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

/// (layer, out features, in features) of a CLIP-ViT-B/32 block; q, k, v and out are alike.
const CLIP_B32: [(&str, usize, usize); 3] =
    [("attention q/k/v/out", 768, 768), ("mlp fc1", 3072, 768), ("mlp fc2", 768, 3072)];
/// Tokens per CLIP-ViT-B/32 image at 224²: 7 × 7 patches and the class token.
const CLIP_TOKENS: usize = 50;

pub fn run(args: &GemmBenchArgs) -> Result<Vec<GemmTiming>> {
    // Linear layers' operands are row-major, convolutions' channel-major.
    type Shapes<'a> = Vec<(&'a str, usize, usize, usize)>;
    let (what, row_major, shapes): (&str, bool, Shapes) = match args.model.as_str() {
        "clip-b32" => (
            "Linear-layer products of CLIP-ViT-B/32 training",
            true,
            CLIP_B32.iter().map(|&(l, o, i)| (l, o, i, args.batch * CLIP_TOKENS)).collect(),
        ),
        _ => (
            "Convolution products of ResNet-50 training",
            false,
            SHAPES
                .iter()
                .map(|&(l, c, o, kernel, side)| {
                    (l, o, c * kernel * kernel, args.batch * side * side)
                })
                .collect(),
        ),
    };
    println!(
        "{what}, batch {}, {} threads, best of {}; GFLOP/s",
        args.batch,
        rayon::current_num_threads(),
        args.reps.max(1)
    );
    println!(
        "{:<22} {:>5} {:>5} {:>7} {:>8} {:>8} {:>13} {:>8}",
        "layer", "O", "K", "N", "forward", "dW", "dW (tiled)", "dX"
    );
    let mut out = Vec::new();
    for (layer, o, k, n) in shapes {
        // Channel-major (convolution): cols (k × n), grad (o × n). Row-major (linear): the input
        // rows x (n × k), grad (n × o). The weight is (o × k) in both.
        let cols = values(k * n, 1.0);
        let grad = values(o * n, 2.0);
        let weight = values(o * k, 3.0);
        let gflops = |seconds: f64| 2.0 * (o * k * n) as f64 / seconds / 1e9;
        let (cols_s, grad_s) = match row_major {
            true => ((1, k), (1, o)),
            false => ((n, 1), (n, 1)),
        };
        let cols_t = Strided { data: &cols, rs: cols_s.0, cs: cols_s.1 };
        let grad_t = Strided { data: &grad, rs: grad_s.0, cs: grad_s.1 };
        // The products as the layer computes them: forward and input gradient in the layer's own
        // output layout, the weight gradient as the (o × k) weight.
        let forward = match row_major {
            true => best_of(args.reps, || gemm_f32(n, o, k, &cols, k, 1, &weight, 1, k)),
            false => best_of(args.reps, || gemm_f32(o, n, k, &weight, k, 1, &cols, n, 1)),
        };
        let dw = best_of(args.reps, || {
            gemm_f32(o, k, n, &grad, grad_s.0, grad_s.1, &cols, cols_s.1, cols_s.0)
        });
        let (g, c) = (grad_t, Strided { data: &cols, rs: cols_t.cs, cs: cols_t.rs });
        let dw_tiled = best_of(args.reps, || gemm_f32_tiled(o, k, n, g, c));
        let dx = match row_major {
            true => best_of(args.reps, || gemm_f32(n, k, o, &grad, o, 1, &weight, k, 1)),
            false => best_of(args.reps, || gemm_f32(k, n, o, &weight, 1, k, &grad, n, 1)),
        };
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
        let doc = serde_json::json!({
            "benchmark": "gemm", "model": args.model, "batch": args.batch, "timings": out
        });
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
