//! SAE training end to end: MonoLoss on real labelled data, checkpoints, resume, bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use mono::config::{BatchTopkConfig, SaeConfig};
use mono::data::idx::read_idx_pair;
use mono::data::store::{BatchLabels, FeatureStore, LabelKind, StoreInfo, StoreWriter};
use mono::Config;

const FM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist");

/// Fashion-MNIST t10k pixels (unit-norm rows) as a feature set: 8000 train, 2000 val rows.
pub(crate) fn fashion_mnist_features(root: &Path, rows: usize) -> PathBuf {
    let (images, labels) = read_idx_pair(
        &Path::new(FM).join("t10k-images-idx3-ubyte.gz"),
        &Path::new(FM).join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let d = images.rows * images.cols;
    let dir = root.join("features");
    let train_rows = rows * 4 / 5;
    for (split, range) in [("train", 0..train_rows), ("val", train_rows..rows)] {
        let mut info = StoreInfo::new(d, split);
        info.labels = LabelKind::Class;
        info.label_names =
            mono::data::idx::FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
        let mut writer = StoreWriter::create(&dir.join(split), info, 3000).unwrap();
        let mut feats = Vec::new();
        let mut labs = Vec::new();
        let mut paths = Vec::new();
        for i in range {
            let px = &images.pixels[i * d..(i + 1) * d];
            let norm = px.iter().map(|&p| (p as f32).powi(2)).sum::<f32>().sqrt();
            feats.extend(px.iter().map(|&p| p as f32 / norm));
            labs.push(labels[i] as u32);
            paths.push(format!("t10k/{i}"));
        }
        writer.push(&feats, BatchLabels::Class(&labs), &paths).unwrap();
        writer.finish().unwrap();
    }
    dir
}

pub(crate) fn config(root: &Path, features: &Path, name: &str, extra: &str) -> Config {
    let text = format!(
        "[run]\nname = \"{name}\"\noutput = \"{}\"\n[data]\nkind = \"fashion_mnist\"\n[features]\ndir = \"{}\"\n{extra}",
        root.join("runs").display(),
        features.display()
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
}

const SMALL_SAE: &str = "[sae]\nkind = \"batch_topk\"\nn_latents = 256\nk = 8\n[train]\nepochs = 10\nbatch_size = 256\nlr = 0.001\n";

#[test]
fn monoloss_raises_monoscore_and_purity_at_comparable_reconstruction() {
    let tmp = tempfile::tempdir().unwrap();
    let features = fashion_mnist_features(tmp.path(), 10000);
    let train = |name: &str, lambda: f64| {
        let c =
            config(tmp.path(), &features, name, &format!("{SMALL_SAE}[mono]\nlambda = {lambda}\n"));
        mono::pipeline::stages::train(&c, &c.run_dir(), false).unwrap().results.results
    };
    let (b, m) = (train("base", 0.0), train("mono", 0.0003));
    let (bs, ms) = (b.monoscore.mean.unwrap(), m.monoscore.mean.unwrap());
    let (bp, mp) = (b.purity.as_ref().unwrap(), m.purity.as_ref().unwrap());
    eprintln!("λ=0: MS {bs:.3} purity {:.3}/{:.3} R²tot {:.4}; λ>0: MS {ms:.3} purity {:.3}/{:.3} R²tot {:.4}", bp.binary, bp.weighted, b.r2_total, mp.binary, mp.weighted, m.r2_total);
    assert!(ms > bs + 0.05, "MonoScore {bs:.3} → {ms:.3}");
    assert!(
        mp.binary > bp.binary + 0.03 && mp.weighted > bp.weighted + 0.03,
        "purity {:?} → {:?}",
        bp,
        mp
    );
    assert!(
        (m.r2_total - b.r2_total).abs() < 0.02,
        "reconstruction must stay comparable: R² {} vs {}",
        b.r2_total,
        m.r2_total
    );
    assert!(b.r2_total > 0.6, "the SAE reconstructs: R² {}", b.r2_total);
}

/// Every file of a run directory and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn read_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn checkpoints_are_saelens_shaped_resume_equals_uninterrupted_and_decoder_rows_stay_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let features = fashion_mnist_features(tmp.path(), 2000);
    let sae = "[sae]\nkind = \"batch_topk\"\nn_latents = 96\nk = 6\n[train]\nepochs = 2\nbatch_size = 128\nlr = 0.001\ncheckpoint_every = 4\n[mono]\nlambda = 0.001\n";
    let mut full = config(tmp.path(), &features, "full", sae);
    full.run.log_every = 1;
    mono::pipeline::stages::train(&full, &full.run_dir(), false).unwrap();

    // Interrupted after 8 steps, then resumed to the end.
    let mut part = config(tmp.path(), &features, "part", sae);
    part.run.log_every = 1;
    let mut part_first = part.clone();
    part_first.train.max_steps = Some(8);
    mono::pipeline::stages::train(&part_first, &part_first.run_dir(), false).unwrap();
    let mut part_rest = part.clone();
    part_rest.train.max_steps = None;
    mono::pipeline::stages::train(&part_rest, &part_rest.run_dir(), true).unwrap();

    let a = read_tensors(&full.run_dir().join("sae/sae_weights.safetensors"));
    let b = read_tensors(&part.run_dir().join("sae/sae_weights.safetensors"));
    for name in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"] {
        let (x, y) = (
            a[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{name}: resumed run differs from the uninterrupted one");
    }
    let metrics = |c: &Config| std::fs::read_to_string(c.run_dir().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&full), metrics(&part), "metrics.jsonl of the resumed run");

    // SAELens names and shapes; the threshold is one value; decoder rows are unit norm.
    let (d, m) = (784, 96);
    assert_eq!(a["W_enc"].dims(), &[d, m]);
    assert_eq!(a["W_dec"].dims(), &[m, d]);
    assert_eq!(a["b_enc"].dims(), &[m]);
    assert_eq!(a["b_dec"].dims(), &[d]);
    assert_eq!(a["threshold"].dims(), &[m]);
    let norms = a["W_dec"].sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        norms.iter().all(|n| (n - 1.0).abs() < 1e-5),
        "decoder rows must stay unit norm: {norms:?}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.run_dir().join("sae/cfg.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["d_in"], d);
    assert_eq!(cfg["d_sae"], m);
    assert_eq!(cfg["architecture"], "jumprelu");
    assert_eq!(cfg["mono"]["spec"]["kind"], "batch_topk");
    // Kept checkpoints: the newest two.
    let ckpts: Vec<String> = std::fs::read_dir(full.run_dir().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");

    // A loaded checkpoint gives the same latents as the final SAE; eval reproduces results.json.
    let loaded = mono::sae::checkpoint::load(
        &full.run_dir().join("sae"),
        &Device::Cpu,
        mono::base::host::Kernels::Host,
    )
    .unwrap();
    let store = FeatureStore::open(&features.join("val")).unwrap();
    let mut x = Vec::new();
    store.read_range(0, 10, &mut x).unwrap();
    let lat =
        mono::sae::encode(loaded.as_ref(), &Tensor::from_vec(x, (10, d), &Device::Cpu).unwrap())
            .unwrap();
    assert_eq!(lat.dtype(), DType::F32);
    let before = std::fs::read_to_string(full.run_dir().join("results.json")).unwrap();
    mono::eval::eval_run(&full.run_dir(), None).unwrap();
    let after = std::fs::read_to_string(full.run_dir().join("results.json")).unwrap();
    let strip = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["results"].clone()
    };
    assert_eq!(
        strip(&before),
        strip(&after),
        "mono eval reproduces the end-of-training evaluation"
    );
}

#[test]
fn full_dataset_monoloss_gradient_matches_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let features = fashion_mnist_features(tmp.path(), 400);
    let store = FeatureStore::open(&features.join("train")).unwrap();
    let c = config(
        tmp.path(),
        &features,
        "fd",
        "[sae]\nkind = \"relu\"\nn_latents = 24\n[mono]\nlambda = 1.0\n",
    );
    let spec = mono::sae::SaeSpec::from_config(&c.sae, store.dim());
    for kernels in [mono::base::host::Kernels::Host, mono::base::host::Kernels::Portable] {
        let sae = mono::sae::build(&spec, 3, &Device::Cpu, kernels).unwrap();
        let full = mono::train::full_mono::full_mono_gradient(
            sae.as_ref(),
            &store,
            None,
            &store.epoch_order(3, 0),
            64,
            &Device::Cpu,
        )
        .unwrap();
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!(scalar(&full.live) > 10.0);
        // Loss as a function of b_enc, recomputed exactly with the one-pass engine.
        let loss = |sae: &dyn mono::sae::Sae| -> f64 {
            let mut acc = mono::monoscore::MonoScoreAccumulator::new(store.dim(), 24);
            let mut x = Vec::new();
            store.read_range(0, store.len(), &mut x).unwrap();
            let lat = mono::sae::encode(
                sae,
                &Tensor::from_vec(x.clone(), (store.len(), store.dim()), &Device::Cpu).unwrap(),
            )
            .unwrap();
            acc.add(
                &x,
                &lat.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                mono::monoscore::ScorePath::Dense,
            )
            .unwrap();
            1.0 - acc.finish().summary().mean.unwrap()
        };
        let full_loss = 1.0 - scalar(&full.mean_score);
        assert!((loss(sae.as_ref()) - full_loss).abs() < 1e-6, "{kernels:?}");
        let b_enc = &sae.params().b_enc;
        let base = b_enc.as_tensor().to_vec1::<f32>().unwrap();
        let names: Vec<&str> = sae.params().named().iter().map(|(n, _)| *n).collect();
        let grads = full.grads.to_host().unwrap();
        let grad = &grads[names.iter().position(|n| *n == "b_enc").unwrap()];
        let mut checked = 0;
        let mut errors = Vec::new();
        for k in 0..24 {
            // Small steps: ReLU entries crossing zero put kinks into the loss at larger ones.
            let h = 1e-4f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[k] += delta;
                b_enc.set(&Tensor::from_vec(v, 24, &Device::Cpu).unwrap()).unwrap();
                let l = loss(sae.as_ref());
                b_enc.set(&Tensor::from_vec(base.clone(), 24, &Device::Cpu).unwrap()).unwrap();
                l
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            if grad[k].abs() > 1e-4 {
                checked += 1;
            }
            let err = (fd - grad[k] as f64).abs() / fd.abs().max(1e-3);
            assert!(err < 0.1, "b_enc[{k}]: fd {fd} vs {}", grad[k]);
            errors.push(err);
        }
        // A ReLU entry crossing zero within ±h puts a kink in a few finite differences.
        errors.sort_by(f64::total_cmp);
        assert!(
            errors[errors.len() / 2] < 0.005 && errors[errors.len() * 3 / 4] < 0.02,
            "relative errors {errors:?}"
        );
        assert!(checked > 5, "the gradient must be non-trivial");
    }
}

fn mono_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mono")).args(args).arg("--quiet").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn write_config(path: &Path, c: &Config) {
    std::fs::write(path, toml::to_string(c).unwrap()).unwrap();
}

#[test]
fn bad_input_fails_clearly_and_leaves_runs_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let features = fashion_mnist_features(tmp.path(), 600);
    let sae = "[sae]\nn_latents = 64\nk = 4\n[train]\nepochs = 1\nbatch_size = 100\n[mono]\nlambda = 0.001\n";
    let good = config(tmp.path(), &features, "good", sae);
    let good_path = tmp.path().join("good.toml");
    write_config(&good_path, &good);
    let (ok, err) = mono_cli(&["train", good_path.to_str().unwrap()]);
    assert!(ok, "{err}");
    let before = snapshot(&good.run_dir());

    let expect_failure = |args: &[&str], expect: &str| {
        let (ok, err) = mono_cli(args);
        assert!(!ok, "expected failure: {args:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.lines().filter(|l| !l.is_empty()).count(), 1, "one error line: {err}");
        assert!(err.contains(expect), "`{expect}` not in: {err}");
    };
    // Training again into a finished run.
    expect_failure(&["train", good_path.to_str().unwrap()], "already holds a training run");
    // Resuming with a different SAE width: checkpoint/config mismatch.
    let mut wide = good.clone();
    wide.sae = match wide.sae {
        SaeConfig::BatchTopk(c) => SaeConfig::BatchTopk(BatchTopkConfig { n_latents: 128, ..c }),
        other => panic!("the test SAE is BatchTopK, not {other:?}"),
    };
    let wide_path = tmp.path().join("wide.toml");
    write_config(&wide_path, &wide);
    expect_failure(
        &["train", wide_path.to_str().unwrap(), "--resume"],
        "was started with other settings or inputs (sae.n_latents: 64 → 128)",
    );
    // Features of another width than the checkpoint.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for split in ["train", "val"] {
        let mut w =
            StoreWriter::create(&other.join(split), StoreInfo::new(10, split), 100).unwrap();
        let rows: Vec<f32> = (0..200 * 10).map(|i| ((i * 7 % 13) as f32) + 1.0).collect();
        let paths: Vec<String> = (0..200).map(|i| format!("r{i}")).collect();
        w.push(&rows, BatchLabels::None, &paths).unwrap();
        w.finish().unwrap();
    }
    let mut narrow = good.clone();
    narrow.features.dir = Some(other.clone());
    let narrow_path = tmp.path().join("narrow.toml");
    write_config(&narrow_path, &narrow);
    expect_failure(&["train", narrow_path.to_str().unwrap(), "--resume"], "(features.train: ");
    // A corrupt shard.
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for split in ["train", "val"] {
        let src = features.join(split);
        let dst = corrupt.join(split);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(corrupt.join("train/shard-00000.safetensors"), b"garbage").unwrap();
    let mut bad = good.clone();
    bad.run.name = "fresh".into();
    bad.features.dir = Some(corrupt.clone());
    let bad_path = tmp.path().join("bad.toml");
    write_config(&bad_path, &bad);
    expect_failure(&["train", bad_path.to_str().unwrap()], "shard-00000.safetensors");
    assert!(!bad.run_dir().exists(), "a failed start must not create the run directory");
    // NaN features: patch a value of the val shard (read during evaluation) to NaN.
    let nan_dir = tmp.path().join("nan");
    for split in ["train", "val"] {
        let dst = nan_dir.join(split);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(features.join(split)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    let shard = nan_dir.join("train/shard-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + header + 4 * (784 * 5 + 300); // row 5, column 300 of `features` (stored first)
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();
    let mut nan = good.clone();
    nan.run.name = "nan".into();
    nan.features.dir = Some(nan_dir.clone());
    let nan_path = tmp.path().join("nan.toml");
    write_config(&nan_path, &nan);
    expect_failure(&["train", nan_path.to_str().unwrap()], "NaN");
    // An unknown SAE kind.
    let kind_path = tmp.path().join("kind.toml");
    std::fs::write(&kind_path, "[sae]\nkind = \"gated\"\n").unwrap();
    expect_failure(&["train", kind_path.to_str().unwrap()], "sae.kind");
    // An empty store cannot be opened.
    let empty = tmp.path().join("empty/train");
    std::fs::create_dir_all(&empty).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(features.join("val/manifest.json")).unwrap())
            .unwrap();
    manifest["count"] = 0.into();
    manifest["shards"] = serde_json::json!([]);
    std::fs::write(empty.join("manifest.json"), manifest.to_string()).unwrap();
    let mut e = good.clone();
    e.run.name = "empty".into();
    e.features.dir = Some(tmp.path().join("empty"));
    let e_path = tmp.path().join("empty.toml");
    write_config(&e_path, &e);
    expect_failure(&["train", e_path.to_str().unwrap()], "no rows");

    assert_eq!(before, snapshot(&good.run_dir()), "the finished run must be left untouched");
}

/// One training step of TopK (tied decoder, standardised input), BatchTopK (no encoder bias) and
/// JumpReLU (θ's pseudo-gradient through MonoLoss, ties at the batch minimum) with λ·MonoLoss
/// against the reference formulas run by PyTorch on the same weights and batch
/// (tests/fixtures/sae_step, scripts/make_sae_step_fixture.py), with host and portable kernels.
/// Adam's eps = lr = 1e4 makes each update ≈ the processed gradient, so the weights after the
/// step compare the gradients, the clipping and the decoder constraint.
#[test]
fn one_step_equals_the_reference_saes() {
    use mono::sae::SaeSpec;
    use mono::train::sae::SaeTrainer;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sae_step");
    let to_rows = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    let unit_rows = |rows: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        rows.into_iter()
            .map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                r.into_iter().map(|v| v / n).collect()
            })
            .collect()
    };
    let close = |what: &str, ours: &[Vec<f32>], theirs: &[Vec<f32>]| {
        let worst = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-5, "{what}: max |ours − reference| = {worst}");
    };
    let cases = ["topk", "batch_topk", "jumprelu"]
        .into_iter()
        .flat_map(|name| [(name, "auto"), (name, "portable")]);
    for (name, ops) in cases {
        let t = read_tensors(&dir.join(format!("{name}.safetensors")));
        let x = t["x"].clone();
        let (b, d) = x.dims2().unwrap();
        let sae_keys = match name {
            "topk" => "kind = \"topk\"\nn_latents = 32\nk = 4\naux_coef = 0.0\nk_aux = 4\nnormalize_input = true\n",
            "batch_topk" => "kind = \"batch_topk\"\nn_latents = 32\nk = 4\naux_coef = 0.0\nk_aux = 4\n",
            _ => "kind = \"jumprelu\"\nn_latents = 32\nl0_coef = 0.0\njumprelu_bandwidth = 0.2\nnormalize_input = true\n",
        };
        let config = Config::parse(&format!(
            "[run]\nops = \"{ops}\"\n[sae]\n{sae_keys}[train]\nbatch_size = {b}\nlr = 10000.0\nadam_eps = 10000.0\n\
             [mono]\nlambda = 0.1\neps = 1e-8\n"
        ))
        .unwrap();
        let spec = SaeSpec::from_config(&config.sae, d);
        let mut trainer = SaeTrainer::new(&config, &spec, &Device::Cpu).unwrap();
        let p = trainer.sae.params();
        if name == "topk" {
            p.w_enc.set(&t["init.W"]).unwrap();
            p.w_dec.set(&t["init.W"]).unwrap();
            p.b_enc.set(&t["init.latent_bias"]).unwrap();
            p.b_dec.set(&t["init.pre_bias"]).unwrap();
        } else {
            p.w_enc.set(&t["init.W_enc"].t().unwrap().contiguous().unwrap()).unwrap();
            p.w_dec.set(&t["init.W_dec"]).unwrap();
            p.b_dec.set(&t["init.b_dec"]).unwrap();
            if name == "jumprelu" {
                p.b_enc.set(&t["init.b_enc"]).unwrap();
                p.log_threshold.as_ref().unwrap().set(&t["init.log_threshold"]).unwrap();
            }
        }
        trainer.step(&x, &x, 10000.0, None, false).unwrap();
        let p = trainer.sae.params();
        let what = |s: &str| format!("{name} ({ops}) {s}");
        let b_enc: Vec<f32> = p.b_enc.as_tensor().to_vec1().unwrap();
        if name == "topk" {
            close(&what("W"), &to_rows(p.w_enc.as_tensor()), &to_rows(&t["after.W"]));
            assert_eq!(to_rows(p.w_enc.as_tensor()), to_rows(p.w_dec.as_tensor()), "tied");
            let theirs: Vec<f32> = t["after.latent_bias"].to_vec1().unwrap();
            close(&what("latent_bias"), &[b_enc], &[theirs]);
            let ours: Vec<f32> = p.b_dec.as_tensor().to_vec1().unwrap();
            close(&what("pre_bias"), &[ours], &[t["after.pre_bias"].to_vec1().unwrap()]);
        } else {
            let theirs = to_rows(&t["after.W_enc"].t().unwrap());
            close(&what("W_enc"), &to_rows(p.w_enc.as_tensor()), &theirs);
            // The reference renormalises the decoder before its next step, mono right after
            // this one: the same rows up to their norm.
            let theirs = unit_rows(to_rows(&t["after.W_dec"]));
            close(&what("W_dec"), &to_rows(p.w_dec.as_tensor()), &theirs);
            if name == "batch_topk" {
                assert!(b_enc.iter().all(|&v| v == 0.0), "no encoder bias: b_enc stays 0");
            } else {
                // JumpReLU + MonoLoss: the θ pseudo-gradient with PyTorch's tie rule for the
                // batch minimum (many zeros in the band tie for it).
                close(&what("b_enc"), &[b_enc], &[t["after.b_enc"].to_vec1().unwrap()]);
                let ours: Vec<f32> =
                    p.log_threshold.as_ref().unwrap().as_tensor().to_vec1().unwrap();
                let theirs = t["after.log_threshold"].to_vec1().unwrap();
                close(&what("log_threshold"), &[ours], &[theirs]);
            }
            let ours: Vec<f32> = p.b_dec.as_tensor().to_vec1().unwrap();
            close(&what("b_dec"), &[ours], &[t["after.b_dec"].to_vec1().unwrap()]);
        }
    }
}

/// The reference TopK's dead-latent restart: at every `reinit_dead_every`-th step the latents
/// that have not fired for `dead_after` samples restart as 0.1 × a unit-norm row of the
/// restart batch (distinct rows), with a zero encoder bias; the decoder follows (tied).
#[test]
fn dead_topk_latents_restart_from_training_rows() {
    use mono::sae::SaeSpec;
    use mono::train::sae::SaeTrainer;
    let (b, d) = (4, 6);
    let config = Config::parse(&format!(
        "[sae]\nkind = \"topk\"\nn_latents = 24\nk = 1\nk_aux = 4\ndead_after = {b}\n\
         reinit_dead_every = 2\n[train]\nbatch_size = {b}\n"
    ))
    .unwrap();
    let spec = SaeSpec::from_config(&config.sae, d);
    let mut trainer = SaeTrainer::new(&config, &spec, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (b, d), &Device::Cpu).unwrap();
    let restart = Tensor::randn(0f32, 1.0, (b * 4, d), &Device::Cpu).unwrap();
    trainer.restart_rows = Some(restart.clone());
    let unit: Vec<Vec<f32>> = restart
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.into_iter().map(|v| 0.1 * v / n).collect()
        })
        .collect();
    let restarted = |t: &SaeTrainer| -> Vec<usize> {
        let w = t.sae.params().w_enc.as_tensor().to_vec2::<f32>().unwrap();
        (0..w.len())
            .filter(|&j| {
                unit.iter().any(|u| u.iter().zip(&w[j]).all(|(a, b)| (a - b).abs() < 1e-7))
            })
            .collect()
    };
    for step in 0..2 {
        trainer.step(&x, &x, 1e-3, None, false).unwrap();
        assert!(restarted(&trainer).is_empty(), "no restart before step 2 (after step {step})");
    }
    trainer.step(&x, &x, 1e-3, None, false).unwrap();
    let rows = restarted(&trainer);
    // k = 1 on 4 rows: at most 4 of 24 latents fire per step, so many are dead.
    assert!(rows.len() >= 12, "{} latents restarted", rows.len());
    let p = trainer.sae.params();
    let b_enc: Vec<f32> = p.b_enc.as_tensor().to_vec1().unwrap();
    assert!(rows.iter().all(|&j| b_enc[j] == 0.0));
    assert_eq!(
        p.w_enc.as_tensor().to_vec2::<f32>().unwrap(),
        p.w_dec.as_tensor().to_vec2::<f32>().unwrap(),
        "the tied decoder follows"
    );
}
