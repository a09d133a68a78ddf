//! `mono score` end to end on files written here, and every kind of bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::mono;
use candle_core::{DType, Device, Tensor};
use mono::monoscore::pairwise_monoscore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

fn data(n: usize, d: usize, m: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let e: Vec<f32> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let a: Vec<f32> = (0..n * m)
        .map(|i| {
            // Column 0 never fires (a dead neuron); the others fire on ~40 % of the rows.
            if i % m == 0 || rng.random::<f32>() < 0.6 {
                0.0
            } else {
                rng.random_range(0.0..3.0)
            }
        })
        .collect();
    (e, a)
}

fn tensor(v: &[f32], rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).unwrap()
}

fn save_one(path: &Path, name: &str, t: &Tensor) {
    candle_core::safetensors::save(&HashMap::from([(name.to_string(), t.clone())]), path).unwrap();
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Checks the JSON document against in-process pairwise scores of the given values.
fn assert_scores(
    doc: &serde_json::Value,
    e: &[f32],
    a: &[f32],
    n: usize,
    d: usize,
    m: usize,
    tol: f64,
) {
    let reference = pairwise_monoscore(e, a, n, d, m).unwrap();
    assert_eq!(doc["n"], n);
    assert_eq!(doc["d"], d);
    assert_eq!(doc["m"], m);
    let s = reference.summary();
    assert_eq!(doc["live"], s.live);
    assert_eq!(doc["dead"], s.dead);
    assert!((doc["mean"].as_f64().unwrap() - s.mean.unwrap()).abs() < tol);
    assert!((doc["median"].as_f64().unwrap() - s.median.unwrap()).abs() < tol);
    let scores = doc["scores"].as_array().unwrap();
    assert_eq!(scores.len(), m);
    for (k, r) in reference.scores.iter().enumerate() {
        match r {
            Some(r) => assert!(
                (scores[k].as_f64().unwrap() - r).abs() <= tol * r.abs().max(1e-3),
                "neuron {k}"
            ),
            None => assert!(scores[k].is_null(), "dead neuron {k} must be null"),
        }
    }
}

#[test]
fn scores_safetensors_and_npy_files() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d, m) = (120, 10, 16);
    let (e, a) = data(n, d, m, 1);
    let emb = dir.path().join("emb.safetensors");
    save_one(&emb, "features", &tensor(&e, n, d));
    let acts = dir.path().join("acts.npy");
    tensor(&a, n, m).write_npy(&acts).unwrap();
    let out = dir.path().join("sub/scores.json");
    let r = mono(&[
        "score",
        "--embeddings",
        path_str(&emb),
        "--activations",
        path_str(&acts),
        "--out",
        path_str(&out),
        "--batch-rows",
        "17",
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("MonoScore over N = 120"), "{}", r.stdout);
    let doc = read_json(&out);
    assert_scores(&doc, &e, &a, n, d, m, 1e-6);
    assert!(doc["scores"][0].is_null(), "a never-firing neuron is reported as null");

    // --reference: the pairwise scores go to the file, the agreement is printed.
    let out2 = dir.path().join("ref.json");
    let r = mono(&[
        "score",
        "--embeddings",
        path_str(&emb),
        "--activations",
        path_str(&acts),
        "--reference",
        "--out",
        path_str(&out2),
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("max relative difference"), "{}", r.stdout);
    assert_scores(&read_json(&out2), &e, &a, n, d, m, 1e-12);
}

#[test]
fn picks_named_tensors_and_reads_half_precision() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d, m) = (64, 6, 9);
    let (e, a) = data(n, d, m, 2);
    for (dtype, name) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        let file = dir.path().join(format!("both-{name}.safetensors"));
        let et = tensor(&e, n, d).to_dtype(dtype).unwrap();
        let at = tensor(&a, n, m).to_dtype(dtype).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("emb".to_string(), et.clone()), ("acts".to_string(), at.clone())]),
            &file,
        )
        .unwrap();
        let out = dir.path().join(format!("{name}.json"));
        let r = mono(&[
            "score",
            "--embeddings",
            &format!("{}:emb", file.display()),
            "--activations",
            &format!("{}:acts", file.display()),
            "--out",
            path_str(&out),
        ]);
        assert!(r.ok, "{name}: {}", r.stderr);
        // Scores of the values as stored (rounded to half precision).
        let e16 = et.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a16 = at.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_scores(&read_json(&out), &e16, &a16, n, d, m, 1e-6);
    }
}

/// Runs a failing `mono score`, checks one error line, no panic, and that `--out` is untouched.
fn assert_fails(emb: &str, acts: &str, expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.json");
    std::fs::write(&out, "previous result").unwrap();
    let r = mono(&["score", "--embeddings", emb, "--activations", acts, "--out", path_str(&out)]);
    assert!(!r.ok, "expected failure for {emb} / {acts}");
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{}", r.stderr);
    for e in expect {
        assert!(lines[0].contains(e), "`{e}` missing from: {}", lines[0]);
    }
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "previous result",
        "existing output was touched"
    );
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    let (e, a) = data(20, 4, 5, 3);
    save_one(&p("emb.safetensors"), "x", &tensor(&e, 20, 4));
    save_one(&p("acts.safetensors"), "x", &tensor(&a, 20, 5));
    save_one(&p("acts19.safetensors"), "x", &tensor(&a[..19 * 5], 19, 5));
    let mut nan = a.clone();
    nan[7 * 5 + 2] = f32::NAN;
    save_one(&p("nan.safetensors"), "x", &tensor(&nan, 20, 5));
    let mut inf = e.clone();
    inf[3] = f32::INFINITY;
    tensor(&inf, 20, 4).write_npy(p("inf.npy")).unwrap();
    save_one(
        &p("empty.safetensors"),
        "x",
        &Tensor::zeros((0, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    save_one(&p("rank1.safetensors"), "x", &Tensor::ones(20, DType::F32, &Device::Cpu).unwrap());
    save_one(
        &p("rank3.safetensors"),
        "x",
        &Tensor::ones((20, 5, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(
        &HashMap::from([
            ("a".to_string(), tensor(&a, 20, 5)),
            ("b".to_string(), tensor(&a, 20, 5)),
        ]),
        p("two.safetensors"),
    )
    .unwrap();
    save_one(
        &p("ints.safetensors"),
        "x",
        &Tensor::zeros((20, 5), DType::U32, &Device::Cpu).unwrap(),
    );
    std::fs::write(p("garbage.bin"), b"not a tensor file at all").unwrap();
    let npy = p("trunc.npy");
    tensor(&a, 20, 5).write_npy(&npy).unwrap();
    let bytes = std::fs::read(&npy).unwrap();
    std::fs::write(&npy, &bytes[..bytes.len() - 40]).unwrap();

    let emb = p("emb.safetensors");
    let emb = path_str(&emb);
    let s = |name: &str| p(name).to_str().unwrap().to_string();
    assert_fails(emb, &s("acts19.safetensors"), &["acts19.safetensors", "20 rows", "19"]);
    assert_fails(emb, &s("nan.safetensors"), &["nan.safetensors", "row 7", "column 2", "NaN"]);
    assert_fails(&s("inf.npy"), &s("acts.safetensors"), &["inf.npy", "row 0", "column 3"]);
    assert_fails(emb, &s("empty.safetensors"), &["empty.safetensors", "empty"]);
    assert_fails(emb, &s("rank1.safetensors"), &["rank1.safetensors", "2-D", "[20]"]);
    assert_fails(emb, &s("rank3.safetensors"), &["rank3.safetensors", "2-D"]);
    assert_fails(emb, &s("two.safetensors"), &["two.safetensors", "2 tensors", "a, b"]);
    assert_fails(emb, &format!("{}:c", s("two.safetensors")), &["no tensor named `c`"]);
    assert_fails(emb, &s("ints.safetensors"), &["ints.safetensors", "dtype"]);
    assert_fails(emb, &s("garbage.bin"), &["garbage.bin", "not a readable"]);
    assert_fails(emb, &s("trunc.npy"), &["trunc.npy", "truncated"]);
    assert_fails(emb, &s("missing.npy"), &["missing.npy", "cannot open"]);
}

#[test]
fn config_subcommand_validates() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[sae]\nkind = \"topk\"\nk = 32\n").unwrap();
    let r = mono(&["config", path_str(&good)]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("kind = \"topk\"") && r.stdout.contains("n_latents = 8192"),
        "{}",
        r.stdout
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[sae]\nk = 9000\n").unwrap();
    let r = mono(&["config", path_str(&bad)]);
    assert!(!r.ok);
    assert!(r.stderr.contains("sae.k = 9000 must be ≤ sae.n_latents = 8192"), "{}", r.stderr);
    assert!(r.stderr.contains("bad.toml"), "{}", r.stderr);
}

/// TopK-like activations (≤ 5 % non-zero) are read straight into sparse rows; a file whose
/// batches are sparse in one part and dense in another scores exactly either way, and a NaN in
/// a sparse batch is reported by row and column.
#[test]
fn sparse_and_dense_batches_of_one_file_score_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d, m) = (200, 6, 64);
    let (e, _) = data(n, d, m, 5);
    let mut rng = StdRng::seed_from_u64(6);
    // Rows 0..100: 2 of 64 active (3 %); rows 100..200: 20 of 64 (31 %).
    let a: Vec<f32> = (0..n * m)
        .map(|i| {
            let (r, c) = (i / m, i % m);
            let active = if r < 100 { (c + r) % 32 == 0 } else { (c + r) % 3 == 0 };
            if active {
                rng.random_range(0.5..2.0)
            } else {
                0.0
            }
        })
        .collect();
    let emb = dir.path().join("emb.npy");
    tensor(&e, n, d).write_npy(&emb).unwrap();
    let acts = dir.path().join("acts.npy");
    tensor(&a, n, m).write_npy(&acts).unwrap();
    for path in ["auto", "sparse", "dense"] {
        let out = dir.path().join(format!("{path}.json"));
        let r = mono(&[
            "score",
            "--embeddings",
            path_str(&emb),
            "--activations",
            path_str(&acts),
            "--batch-rows",
            "50",
            "--path",
            path,
            "--out",
            path_str(&out),
        ]);
        assert!(r.ok, "{path}: {}", r.stderr);
        assert_scores(&read_json(&out), &e, &a, n, d, m, 1e-9);
    }
    let mut nan = a.clone();
    nan[30 * m + 5] = f32::NAN;
    let bad = dir.path().join("nan.npy");
    tensor(&nan, n, m).write_npy(&bad).unwrap();
    assert_fails(path_str(&emb), path_str(&bad), &["nan.npy", "row 30", "column 5", "NaN"]);
}
