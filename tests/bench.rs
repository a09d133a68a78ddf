//! `mono bench gemm` runs and reports every ResNet-50 shape (timings are never asserted).

use mono::bench::gemm::{run, GemmBenchArgs};

#[test]
fn gemm_bench_reports_every_shape_and_which_products_split() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("gemm.json");
    let args = GemmBenchArgs { batch: 1, reps: 1, json: Some(json.clone()) };
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
}
