//! `mono bench` arguments and the gemm benchmark's report (timings are never asserted).

use mono::bench::gemm::{run, GemmBenchArgs};

#[test]
fn gemm_bench_reports_every_shape_and_which_products_split() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("gemm.json");
    let args =
        GemmBenchArgs { model: "resnet50".into(), batch: 1, reps: 1, json: Some(json.clone()) };
    let rows = run(&args).unwrap();
    assert_eq!(rows.len(), 10);
    for r in &rows {
        for g in [
            r.forward_gflops,
            r.weight_gradient_gflops,
            r.weight_gradient_tiled_gflops,
            r.input_gradient_gflops,
        ] {
            assert!(g.is_finite() && g > 0.0, "{}: {g}", r.layer);
        }
    }
    // One image: the stem's 112² output pixels are a long contraction, layer 4's 7² are not.
    assert_eq!((rows[0].n, rows[0].weight_gradient_split), (112 * 112, true));
    assert_eq!((rows[9].n, rows[9].weight_gradient_split), (49, false));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["timings"].as_array().unwrap().len(), 10);
    // What it ran on: the CPU, its vector instructions and the thread count.
    let machine = doc["machine"].as_str().unwrap();
    assert!(machine.ends_with(&format!(", {} threads", rayon::current_num_threads())), "{machine}");
    assert_eq!(machine, mono::bench::machine());
}

/// CLIP's linear layers: the three distinct (out, in) shapes on batch × 50 token rows.
#[test]
fn gemm_bench_times_the_clip_linear_layers() {
    let args = GemmBenchArgs { model: "clip-b32".into(), batch: 1, reps: 1, json: None };
    let rows = run(&args).unwrap();
    let shapes: Vec<(usize, usize, usize)> = rows.iter().map(|r| (r.o, r.k, r.n)).collect();
    assert_eq!(shapes, [(768, 768, 50), (3072, 768, 50), (768, 3072, 50)]);
    assert!(rows.iter().all(|r| r.forward_gflops > 0.0 && r.input_gradient_gflops > 0.0));
}

/// A benchmark's timed counts must be at least 1: refused by name before anything runs (a
/// median or mean of no steps has no value).
#[test]
fn bench_counts_of_zero_are_refused_by_flag() {
    for (command, flag) in [
        (["bench", "train", "--steps", "0"], "--steps"),
        (["bench", "finetune", "--steps", "0"], "--steps"),
        (["bench", "gemm", "--reps", "0"], "--reps"),
        (["bench", "extract", "--batches", "0"], "--batches"),
    ] {
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_mono")).args(command).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains("must be at least 1"), "{stderr}");
    }
}
