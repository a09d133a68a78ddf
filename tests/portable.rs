//! The portable kernels — the code path CUDA and Metal run; on the CPU with
//! `run.ops = "portable"`, or on MONO_TEST_DEVICE (scripts/gpu_check.sh sets it to cuda) —
//! against the host kernels on the CPU: the same losses and gradients on fixed batches (1e-4
//! relative), the same held-out metrics after short runs, and steps that move nothing between
//! host and device and run no host kernel.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mono::base::grad_sink::GradSink;
use mono::base::host::{self, Kernels};
use mono::config::SaeKind;
use mono::models::params::Weights;
use mono::models::Trainable;
use mono::sae::{self, ops, SaeSpec};
use mono::train::finetune::model::{cross_entropy, FinetuneModel, HeadSpec};
use mono::train::optim::Gradients;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

const KERNELS: [Kernels; 2] = [Kernels::Host, Kernels::Portable];

/// Host kernels run on the CPU; the portable ones on the test device.
fn device_of(kernels: Kernels) -> Device {
    match kernels {
        Kernels::Host => Device::Cpu,
        Kernels::Portable => crate::common::test_device(),
    }
}

fn unit_rows(rows: usize, d: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v: Vec<f32> = (0..rows * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    for row in v.chunks_mut(d) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    Tensor::from_vec(v, (rows, d), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// max |a − b| ≤ tol · max |b|.
fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= tol * scale, "{what}: max difference {worst:e} vs scale {scale:e}");
}

/// The SAE objective of one batch with λ·MonoLoss and some dead latents (AuxK on): the loss and
/// every parameter's gradient. `sink`: the trainer's route, weight gradients past candle's store.
fn sae_loss_and_grads(
    spec: &SaeSpec,
    kernels: Kernels,
    x: &Tensor,
    sink: bool,
) -> (f64, Vec<Vec<f32>>) {
    let device = device_of(kernels);
    let x = &x.to_device(&device).unwrap();
    let model = sae::build(spec, 7, &device, kernels).unwrap();
    let lambda = 0.5;
    let term = ops::MonoTerm { similarity: x, lambda, eps: 1e-8 };
    let sink = sink.then(GradSink::default);
    let dead: Vec<u8> = (0..spec.n_latents).map(|k| (k % 3 == 0) as u8).collect();
    let dead = Tensor::from_vec(dead, spec.n_latents, &device).unwrap();
    let forward = || {
        let pass = sae::forward_with_mono(model.as_ref(), x, true, Some(term)).unwrap();
        let mut total = model.reconstruction_loss(&pass).unwrap();
        for (_, term) in model.extra_losses(&pass, &dead).unwrap() {
            total = (total + term).unwrap();
        }
        (pass, total)
    };
    let (pass, mut total) = match &sink {
        Some(sink) => sink.during(forward),
        None => forward(),
    };
    total = (total + (&pass.mono.as_ref().unwrap().loss * lambda).unwrap()).unwrap();
    let grads = total.backward().unwrap();
    let named = model.params().named();
    let g = match &sink {
        Some(sink) => {
            let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
            let g = Gradients::from_store(&grads, Some(sink), &vars, kernels).unwrap();
            g.to_host().unwrap()
        }
        None => named
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).map(flat).unwrap_or_default())
            .collect(),
    };
    (scalar(&total), g)
}

#[test]
fn every_sae_kind_has_the_same_loss_and_gradients_with_both_kernels() {
    let (b, d, m) = (64, 24, 200);
    let x = unit_rows(b, d, 1);
    for kind in [SaeKind::Topk, SaeKind::BatchTopk, SaeKind::Jumprelu, SaeKind::Relu] {
        let mut spec = SaeSpec::from_config(&mono::config::SaeConfig::of_kind(kind), d);
        (spec.n_latents, spec.k, spec.k_aux) = (m, 6, 16);
        spec.jumprelu_init_log_threshold = -2.0;
        spec.jumprelu_bandwidth = 0.05;
        let (loss_h, grads_h) = sae_loss_and_grads(&spec, Kernels::Host, &x, false);
        let (loss_p, grads_p) = sae_loss_and_grads(&spec, Kernels::Portable, &x, false);
        assert!((loss_h - loss_p).abs() <= 1e-5 * loss_h.abs(), "{kind:?}: {loss_h} vs {loss_p}");
        for (i, (gh, gp)) in grads_h.iter().zip(&grads_p).enumerate() {
            assert_close(gp, gh, 1e-4, &format!("{kind:?} parameter {i}"));
        }
        // The weight gradients through the sink (W_dec's AuxK use included) are the store's.
        for kernels in [Kernels::Host, Kernels::Portable] {
            let (_, through_sink) = sae_loss_and_grads(&spec, kernels, &x, true);
            let plain = if kernels.is_host() { &grads_h } else { &grads_p };
            for (i, (s, g)) in through_sink.iter().zip(plain).enumerate() {
                let g = if g.is_empty() { vec![0.0; s.len()] } else { g.clone() };
                assert_eq!(s, &g, "{kind:?} ({kernels:?}) parameter {i} through the sink");
            }
        }
    }
}

/// Held-out metrics of a short training run of `kind` with `ops`, over the Fashion-MNIST
/// features in `features`.
fn short_run(root: &Path, features: &Path, kind: &str, ops: &str, period: usize) -> [f64; 4] {
    let sae = match kind {
        "topk" | "batch_topk" => format!("[sae]\nkind = \"{kind}\"\nn_latents = 96\nk = 6\n"),
        "jumprelu" => {
            "[sae]\nkind = \"jumprelu\"\nn_latents = 96\njumprelu_init_log_threshold = -3.0\n"
                .into()
        }
        _ => "[sae]\nkind = \"relu\"\nn_latents = 96\n".into(),
    };
    let text = format!(
        "{sae}[train]\nepochs = 3\nbatch_size = 128\nlr = 0.001\n[mono]\nlambda = 0.01\nperiod = {period}\n"
    );
    let mut c = crate::train::config(root, features, &format!("{kind}-{ops}-{period}"), &text);
    if ops == "portable" {
        c.run.ops = host::OpsMode::Portable;
        c.run.device = crate::common::test_device_spec();
    } else {
        c.run.device = "cpu".into();
    }
    let r = mono::pipeline::stages::train(&c, &c.run_dir(), false).unwrap().results.results;
    [r.r2_total, r.monoscore.mean.unwrap(), r.purity.unwrap().binary, r.l0]
}

/// Tolerance of the held-out metrics (R² total, MonoScore, purity; L0 relative): both runs start
/// from the same weights and see the same batches; their float sums differ in order only.
const RUN_TOLERANCE: f64 = 0.01;

#[test]
fn short_training_runs_give_the_same_held_out_metrics_with_both_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let features = crate::train::fashion_mnist_features(tmp.path(), 2000);
    for (kind, period) in
        [("topk", 1), ("batch_topk", 1), ("jumprelu", 1), ("relu", 1), ("batch_topk", 4)]
    {
        let auto = short_run(tmp.path(), &features, kind, "auto", period);
        let portable = short_run(tmp.path(), &features, kind, "portable", period);
        eprintln!("{kind} period {period}: auto {auto:?} portable {portable:?}");
        for (i, (a, p)) in auto.iter().zip(&portable).enumerate() {
            let tol = if i == 3 { RUN_TOLERANCE * a.abs().max(1.0) } else { RUN_TOLERANCE };
            assert!((a - p).abs() <= tol, "{kind} period {period} metric {i}: {a} vs {p}");
        }
    }
}

fn tiny_model(root: &Path, kind: &str, kernels: Kernels) -> FinetuneModel {
    let (encoder, dir) = match kind {
        "resnet50" => (mono::config::EncoderKind::Resnet50, crate::finetune::tiny_resnet_dir(root)),
        _ => (
            mono::config::EncoderKind::Clip,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders/clip_vision"),
        ),
    };
    let files = mono::encoders::hub::resolve(dir.to_str().unwrap(), "main").unwrap();
    let device = device_of(kernels);
    let weights = Weights::load(&files.weights, &device).unwrap();
    let head =
        HeadSpec { topk_layer: true, reuse_head: false, expansion: 2, k: Some(8), classes: 5 };
    FinetuneModel::new(
        encoder,
        &files.config_json().unwrap(),
        &weights,
        &Trainable::All,
        &head,
        3,
        DType::F32,
        &device,
    )
    .unwrap()
    .with_kernels(kernels)
}

#[test]
fn finetuning_has_the_same_loss_and_gradients_with_both_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let labels: Vec<u32> = (0..12).map(|i| i % 5).collect();
    for kind in ["resnet50", "clip"] {
        let size = 32;
        let x = crate::common::seeded_randn(&[12, 3, size, size], 1.0, DType::F32, 4);
        let mut results = Vec::new();
        for kernels in KERNELS {
            let model = tiny_model(tmp.path(), kind, kernels);
            let x = x.to_device(&device_of(kernels)).unwrap();
            let out = model.forward(&x, true).unwrap();
            let ce = cross_entropy(&out.logits, &labels, 0.1).unwrap();
            let sim = out.features.detach();
            let mono =
                mono::monoscore::batch_mono_loss(&out.topk, &sim, 1e-8, None, kernels).unwrap();
            let loss = (ce + (mono.loss * 0.5).unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<(String, Vec<f32>)> = model
                .params
                .trainable()
                .map(|p| {
                    (p.name.clone(), flat(grads.get(p.var.as_ref().unwrap().as_tensor()).unwrap()))
                })
                .collect();
            results.push((scalar(&loss), g));
        }
        let ((lh, gh), (lp, gp)) = (&results[0], &results[1]);
        assert!((lh - lp).abs() <= 1e-5 * lh.abs(), "{kind}: {lh} vs {lp}");
        let largest = gh.iter().flat_map(|(_, g)| g).fold(0f32, |m, x| m.max(x.abs()));
        for ((name, h), (_, p)) in gh.iter().zip(gp) {
            if name.ends_with("k_proj.bias") {
                // Exactly 0 in exact arithmetic (a key bias shifts a whole softmax row): both
                // sides are rounding noise, which only has to be negligible.
                let worst = h.iter().chain(p).fold(0f32, |m, x| m.max(x.abs()));
                assert!(worst <= 1e-6 * largest, "{kind} {name}: {worst:e} is not ≈ 0");
            } else {
                assert_close(p, h, 1e-4, &format!("{kind} {name}"));
            }
        }
    }
}

#[test]
fn a_short_finetuning_run_gives_the_same_results_with_both_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::finetune::fashion_folders(tmp.path(), 400, 100);
    let resnet = crate::finetune::tiny_resnet_dir(tmp.path());
    let run = |ops: host::OpsMode, name: &str| {
        let text = format!(
            "[run]\nname = \"{name}\"\noutput = \"{}\"\n[encoder]\nkind = \"resnet50\"\nmodel = \"{}\"\n\
             [data]\nkind = \"folder\"\nroot = \"{}\"\ntrain_split = \"train\"\neval_split = \"val\"\n\
             [finetune]\nepochs = 4\nbatch_size = 40\noptimizer = \"adamw\"\nlr = 0.003\nweight_decay = 0.0\nwarmup_epochs = 0\n\
             k = 16\naugment = false\nlambda = 0.5\n",
            tmp.path().join("runs").display(),
            resnet.display(),
            data.display()
        );
        let mut c = mono::Config::parse(&text).unwrap();
        c.run.ops = ops;
        if ops == host::OpsMode::Portable {
            c.run.device = crate::common::test_device_spec();
        } else {
            c.run.device = "cpu".into();
        }
        mono::pipeline::stages::finetune(&c, &c.run_dir(), false).unwrap().final_eval
    };
    let (a, p) = (run(host::OpsMode::Auto, "auto"), run(host::OpsMode::Portable, "portable"));
    eprintln!(
        "top-1 {} vs {}, MonoScore {:?} vs {:?}",
        a.top1, p.top1, a.monoscore.mean, p.monoscore.mean
    );
    assert!((a.top1 - p.top1).abs() <= 3.0 / 100.0, "top-1 {} vs {}", a.top1, p.top1);
    let (ma, mp) = (a.monoscore.mean.unwrap(), p.monoscore.mean.unwrap());
    assert!((ma - mp).abs() <= RUN_TOLERANCE, "TopK MonoScore {ma} vs {mp}");
}

#[test]
fn portable_steps_move_only_their_inputs_and_run_no_host_kernel() {
    let x = unit_rows(64, 24, 2);
    let device = crate::common::test_device();
    for kind in [SaeKind::Topk, SaeKind::BatchTopk, SaeKind::Jumprelu, SaeKind::Relu] {
        let mut config = mono::Config::default();
        config.sae = mono::config::SaeConfig::of_kind(kind);
        config.mono.lambda = Some(0.1);
        let mut spec = SaeSpec::from_config(&config.sae, 24);
        (spec.n_latents, spec.k) = (128, 4);
        for (ops, kernels_expected) in [(host::OpsMode::Portable, 0), (host::OpsMode::Auto, 1)] {
            config.run.ops = ops;
            let device = if ops == host::OpsMode::Portable { device.clone() } else { Device::Cpu };
            let x = x.to_device(&device).unwrap();
            let mut trainer = mono::train::sae::SaeTrainer::new(&config, &spec, &device).unwrap();
            let (transfers, kernels) = (host::transfers(), host::host_kernels());
            for _ in 0..3 {
                trainer.step(&x, &x, 1e-3, None, false).unwrap();
            }
            let ran = host::host_kernels() - kernels;
            if kernels_expected == 0 {
                assert_eq!(
                    host::transfers(),
                    transfers,
                    "{kind:?}: a portable step read to the host"
                );
                assert_eq!(ran, 0, "{kind:?}: a portable step ran a host kernel");
            } else {
                assert!(ran > 0, "the host-kernel counter counts (auto mode, {kind:?})");
            }
            // A logged step reads its scalars: a handful of transfers, nothing else.
            let scalars = trainer.step(&x, &x, 1e-3, None, true).unwrap();
            let before = host::transfers();
            let outcome = scalars.read().unwrap();
            assert!(outcome.loss.is_finite());
            assert!(host::transfers() - before <= 16);
        }
    }
}

#[test]
fn a_portable_finetuning_step_moves_only_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let labels: Vec<u32> = (0..8).map(|i| i % 5).collect();
    let x = crate::common::seeded_randn(&[8, 3, 32, 32], 1.0, DType::F32, 5)
        .to_device(&crate::common::test_device())
        .unwrap();
    let model = tiny_model(tmp.path(), "resnet50", Kernels::Portable);
    let f = mono::config::FinetuneConfig::default();
    let mut finetuner = mono::train::finetune::Finetuner::new(model, &f, 0.5, 1e-8).unwrap();
    let (transfers, kernels) = (host::transfers(), host::host_kernels());
    for _ in 0..2 {
        finetuner.step(&x, &labels, None, 1e-3, false).unwrap();
    }
    assert_eq!(host::transfers(), transfers);
    assert_eq!(host::host_kernels(), kernels);
}

#[test]
fn host_reads_in_the_step_code_go_through_the_counted_helpers() {
    // The files of the portable step path read tensors to the host only through
    // `base::host` (counted); raw candle reads here would escape the check above.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in [
        "sae/mod.rs",
        "sae/topk.rs",
        "sae/batch_topk.rs",
        "sae/jumprelu.rs",
        "sae/relu.rs",
        "models/topk.rs",
        "monoscore/loss.rs",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for pattern in [".to_vec0", ".to_vec1", ".to_vec2", ".to_scalar", "to_device(&Device::Cpu)"]
        {
            assert!(!text.contains(pattern), "src/{file} reads to the host with `{pattern}`");
        }
    }
}

#[test]
fn portable_selection_keeps_the_same_entries_as_host_selection() {
    use mono::base::sparse::SparseBatch;
    use mono::models::topk::{topk_latents, Selection};
    let mut rng = StdRng::seed_from_u64(9);
    // Values over many orders of magnitude (and half of them negative, never selected), at the
    // widths users run: 65,536 latents per row, and a 2^20-value batch.
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let e: f32 = StandardNormal.sample(&mut rng);
                let s: f32 = StandardNormal.sample(&mut rng);
                s.signum() * (8.0 * e).exp()
            })
            .collect()
    };
    let device = crate::common::test_device();
    for (rows, cols, how) in [
        (4, 65_536, Selection::PerRow(64)),
        (256, 4096, Selection::Batch(64 * 256)),
        (64, 300, Selection::PerRow(290)), // k close to the number of positive entries
        (8, 50, Selection::Batch(1000)),   // more asked for than there are positive entries
    ] {
        let pre = Tensor::from_vec(values(rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let host = topk_latents(&pre, &how, None, Kernels::Host).unwrap();
        let on_device = pre.to_device(&device).unwrap();
        let portable = topk_latents(&on_device, &how, None, Kernels::Portable).unwrap();
        let dense = |s: &mono::models::topk::Selected| flat(s.latents.tensor().unwrap());
        assert_eq!(dense(&portable), dense(&host), "{how:?} on {rows}×{cols}");
        assert_eq!(
            host.csr,
            Some(SparseBatch::from_dense(&dense(&host), cols)),
            "{how:?}: the host selection's CSR holds exactly its non-zeros"
        );
        assert!(portable.csr.is_none());
        if let (Selection::Batch(_), Some(h)) = (&how, host.min) {
            assert_eq!(scalar(&portable.min.unwrap()), scalar(&h), "{how:?}: the batch threshold");
        }
    }
}

#[test]
fn full_dataset_gradients_are_the_same_with_both_kernels() {
    use mono::data::store::{BatchLabels, FeatureStore, StoreInfo, StoreWriter};
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (300, 16);
    let rows = flat(&unit_rows(n, d, 3));
    let paths: Vec<String> = (0..n).map(|i| format!("row{i}")).collect();
    let mut writer =
        StoreWriter::create(&tmp.path().join("train"), StoreInfo::new(d, "train"), 128).unwrap();
    writer.push(&rows, BatchLabels::None, &paths).unwrap();
    writer.finish().unwrap();
    let store = FeatureStore::open(&tmp.path().join("train")).unwrap();
    for kind in [SaeKind::Topk, SaeKind::BatchTopk, SaeKind::Jumprelu, SaeKind::Relu] {
        let mut spec = SaeSpec::from_config(&mono::config::SaeConfig::of_kind(kind), d);
        (spec.n_latents, spec.k) = (64, 4);
        spec.jumprelu_init_log_threshold = -2.0;
        spec.jumprelu_bandwidth = 0.05;
        let mut results = Vec::new();
        for kernels in KERNELS {
            let device = device_of(kernels);
            let model = sae::build(&spec, 5, &device, kernels).unwrap();
            let full = mono::train::full_mono::full_mono_gradient(
                model.as_ref(),
                &store,
                None,
                &store.epoch_order(3, 0),
                100,
                &device,
            )
            .unwrap();
            results.push((scalar(&full.mean_score), full.grads.to_host().unwrap()));
        }
        let ((mh, gh), (mp, gp)) = (&results[0], &results[1]);
        assert!((mh - mp).abs() < 1e-6, "{kind:?}: MonoScore {mh} vs {mp}");
        for (i, (h, p)) in gh.iter().zip(gp).enumerate() {
            assert_close(p, h, 1e-4, &format!("{kind:?} full-dataset gradient {i}"));
        }
    }
}

#[test]
fn extraction_gives_the_same_features_with_both_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut stores = Vec::new();
    for (name, ops) in [("auto", host::OpsMode::Auto), ("portable", host::OpsMode::Portable)] {
        let text = format!(
            "[run]\nname = \"{name}\"\noutput = \"{}\"\n[encoder]\nkind = \"clip\"\n\
             model = \"{root}/tests/fixtures/encoders/clip_vision_proj\"\nbatch_size = 8\n\
             [data]\nkind = \"fashion_mnist\"\nroot = \"{root}/data/fashion-mnist\"\n\
             train_split = \"test\"\neval_split = \"test\"\nlimit = 24\n",
            tmp.path().display()
        );
        let mut c = mono::Config::parse(&text).unwrap();
        c.run.ops = ops;
        if ops == host::OpsMode::Portable {
            c.run.device = crate::common::test_device_spec();
        }
        mono::extract::extract(&c, &mono::extract::ExtractOptions::default()).unwrap();
        let store =
            mono::data::store::FeatureStore::open(&c.run_dir().join("features/test")).unwrap();
        let mut x = Vec::new();
        store.read_range(0, store.len(), &mut x).unwrap();
        stores.push(x);
    }
    assert_close(&stores[1], &stores[0], 1e-5, "features");
}
