//! The trainable towers equal candle-transformers' forward on the same weights, every trainable
//! parameter gets a gradient, and gradients match finite differences.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use mono::base::host::Kernels;
use mono::config::EncoderKind;
use mono::models::clip::{ClipShape, ClipTower};
use mono::models::layers::max_pool_3x3_s2;
use mono::models::params::{ParamSet, Weights};
use mono::models::resnet::ResNet;
use mono::models::Trainable;
use mono::train::finetune::model::{FinetuneModel, HeadSpec};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders").join(name)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn flat64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0f32, f32::max)
}

fn head(expansion: usize, k: Option<usize>, classes: usize) -> HeadSpec {
    HeadSpec { topk_layer: true, reuse_head: false, expansion, k, classes }
}

fn config(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
        .unwrap()
}

#[test]
fn clip_tower_equals_candle_transformers_and_pytorch() {
    for name in ["clip_vision", "clip_full"] {
        let weights =
            Weights::load(&[fixture(name).join("model.safetensors")], &Device::Cpu).unwrap();
        let mut params = ParamSet::default();
        let tower = ClipTower::load(
            &ClipShape::from_config(&config(name)).unwrap(),
            &weights,
            &mut params,
            &Trainable::All,
            0,
        )
        .unwrap();
        let reference = candle_core::safetensors::load(
            fixture(name).join("reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let pixels = &reference["pixel_values"];
        // candle-transformers on the same file.
        let files = mono::encoders::hub::resolve(fixture(name).to_str().unwrap(), "main").unwrap();
        let theirs = mono::encoders::load_from_files(
            EncoderKind::Clip,
            mono::config::EncoderOutput::Pooler,
            &files,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .forward(pixels)
        .unwrap();
        // Both the fused CPU ops (LayerNorm, quick GELU) and the composed graph.
        for kernels in [Kernels::Host, Kernels::Portable] {
            let ours = tower.forward(pixels, kernels).unwrap();
            assert!(
                max_rel(&ours, &theirs) <= 1e-5,
                "{name} {kernels:?}: vs candle-transformers {}",
                max_rel(&ours, &theirs)
            );
            assert!(
                max_rel(&ours, &reference["pooler_output"]) <= 1e-4,
                "{name} {kernels:?}: vs PyTorch"
            );
        }
    }
}

#[test]
fn resnet50_layout_equals_candle_transformers() {
    // Full ResNet-50 layout with small random weights, through both implementations.
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_transformers::models::resnet::resnet50_no_final_layer(vb).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        let t = if name.ends_with("running_var") {
            (t.ones_like().unwrap() + (t.abs().unwrap() * 0.1).unwrap()).unwrap()
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            (t * 0.05).unwrap()
        } else if name.contains("bn") || name.contains("downsample.1") {
            (t.ones_like().unwrap() + (t * 0.05).unwrap()).unwrap()
        } else {
            (t * 0.5).unwrap()
        };
        tensors.insert(name.clone(), t);
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let weights = Weights::load(&[dir.path().join("model.safetensors")], &Device::Cpu).unwrap();
    let mut params = ParamSet::default();
    let ours = ResNet::load(&weights, &mut params, &Trainable::All).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let theirs = candle_transformers::models::resnet::resnet50_no_final_layer(vb).unwrap();
    let x = common::seeded_randn(&[2, 3, 72, 100], 1.0, DType::F32, 1);
    let (a, b) = (ours.forward(&x, false).unwrap(), theirs.forward(&x).unwrap());
    assert!(max_rel(&a, &b) <= 1e-5, "ResNet-50 vs candle-transformers: {}", max_rel(&a, &b));
}

#[test]
fn max_pool_matches_a_plain_loop_and_has_a_gradient() {
    let (b, c, h, w) = (2, 3, 7, 10);
    let x = common::seeded_randn(&[b, c, h, w], 1.0, DType::F32, 2).abs().unwrap();
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let xs = flat(&x);
    // The plain loop: each output's maximum and the first position holding it.
    let mut expected = vec![0f32; b * c * ho * wo];
    let mut expected_grad = vec![0f32; b * c * h * w];
    for n in 0..b * c {
        for i in 0..ho {
            for j in 0..wo {
                let (mut m, mut at) = (f32::NEG_INFINITY, 0);
                for di in 0..3 {
                    for dj in 0..3 {
                        let (r, s) = ((2 * i + di) as isize - 1, (2 * j + dj) as isize - 1);
                        if r >= 0 && s >= 0 && (r as usize) < h && (s as usize) < w {
                            let q = n * h * w + r as usize * w + s as usize;
                            if xs[q] > m {
                                (m, at) = (xs[q], q);
                            }
                        }
                    }
                }
                expected[n * ho * wo + i * wo + j] = m;
                expected_grad[at] += 1.0;
            }
        }
    }
    for kernels in [Kernels::Host, Kernels::Portable] {
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let y = max_pool_3x3_s2(var.as_tensor(), kernels).unwrap();
        assert_eq!(y.dims(), &[b, c, ho, wo]);
        assert_eq!(flat(&y), expected, "{kernels:?}");
        let grads = y.sum_all().unwrap().backward().unwrap();
        // Each output's gradient lands on its window's maximum (no ties in this input).
        assert_eq!(flat(grads.get(var.as_tensor()).unwrap()), expected_grad, "{kernels:?}");
    }
    // Ties: the host op gives the whole gradient to the first maximum, as PyTorch does.
    let tied = Tensor::new(&[[[[1f32, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]], &Device::Cpu)
        .unwrap();
    let var = candle_core::Var::from_tensor(&tied).unwrap();
    let y = max_pool_3x3_s2(var.as_tensor(), Kernels::Host).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = flat(grads.get(var.as_tensor()).unwrap());
    assert_eq!(g, [1.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
}

/// Every trainable parameter of the model gets a non-zero gradient, and a few entries match
/// central finite differences of the loss.
fn check_gradients(model: &FinetuneModel, pixels: &Tensor, labels: &[u32], train: bool) {
    // The similarity embeddings are constants of the loss (as in training).
    let similarity = model.forward(pixels, false).unwrap().features.detach();
    let loss = |m: &FinetuneModel| -> Tensor {
        let out = m.forward(pixels, train).unwrap();
        let ce = mono::train::finetune::model::cross_entropy(&out.logits, labels, 0.1).unwrap();
        let mono = mono::monoscore::batch_mono_loss(&out.topk, &similarity, 1e-8, None, m.kernels)
            .unwrap();
        (ce + (mono.loss * 0.5).unwrap()).unwrap()
    };
    let grads = loss(model).backward().unwrap();
    for p in model.params.trainable() {
        let g = grads
            .get(p.var.as_ref().unwrap().as_tensor())
            .unwrap_or_else(|| panic!("{} gets no gradient", p.name));
        assert!(flat(g).iter().any(|v| *v != 0.0), "{}: zero gradient", p.name);
    }
    for p in model.params.trainable().step_by(7) {
        let var = p.var.as_ref().unwrap();
        let g = flat64(grads.get(var.as_tensor()).unwrap());
        let base = flat64(var.as_tensor());
        let i = g
            .iter()
            .enumerate()
            .fold(0, |best, (i, v)| if v.abs() > g[best].abs() { i } else { best });
        let at = |delta: f64| -> f64 {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            let l = loss(model).to_scalar::<f64>().unwrap();
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            l
        };
        // Small steps, so that TopK selections, ReLUs and max-pool winners do not flip within ±h;
        // a step that still straddles such a kink shows up as a result that depends on h.
        let err = |h: f64| {
            let fd = (at(h) - at(-h)) / (2.0 * h);
            ((fd - g[i]).abs() / fd.abs().max(1e-3), fd)
        };
        let h = 1e-6 * base[i].abs().max(0.1);
        let (e1, fd) = err(h);
        let (e2, _) = err(h / 10.0);
        assert!(e1.min(e2) <= 1e-4, "{}[{i}]: fd {fd} vs {}", p.name, g[i]);
    }
}

#[test]
fn clip_model_gradients_reach_every_parameter_and_match_finite_differences() {
    let weights =
        Weights::load(&[fixture("clip_vision").join("model.safetensors")], &Device::Cpu).unwrap();
    // f64 so that finite differences are meaningful.
    let model = FinetuneModel::new(
        EncoderKind::Clip,
        &config("clip_vision"),
        &weights,
        &Trainable::All,
        &head(2, Some(16), 5),
        1,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let pixels = common::seeded_randn(&[6, 3, 32, 32], 1.0, DType::F64, 3);
    check_gradients(&model, &pixels, &[0, 1, 2, 3, 4, 0], true);
    // LoRA: only the adapters and the head train.
    let lora = FinetuneModel::new(
        EncoderKind::Clip,
        &config("clip_vision"),
        &weights,
        &Trainable::Lora { rank: 2, alpha: 4.0 },
        &head(1, None, 5),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let names: Vec<&str> = lora.params.trainable().map(|p| p.name.as_str()).collect();
    assert!(names.iter().all(|n| n.contains("lora_") || n.starts_with("head.")), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.contains("lora_")).count(),
        2 * 2 * 2,
        "A and B for q and v (PEFT's target_modules of the paper) in 2 layers"
    );
    assert!(names
        .iter()
        .filter(|n| n.contains("lora_"))
        .all(|n| n.contains("q_proj") || n.contains("v_proj")));
}

#[test]
fn resnet_model_gradients_in_train_mode_and_running_stats_update() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_resnet(dir.path(), 8, 5);
    let weights = Weights::load(&[dir.path().join("model.safetensors")], &Device::Cpu).unwrap();
    let model = FinetuneModel::new(
        EncoderKind::Resnet50,
        &serde_json::json!({}),
        &weights,
        &Trainable::All,
        &head(1, Some(40), 4),
        2,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let pixels = common::seeded_randn(&[4, 3, 32, 32], 1.0, DType::F64, 4);
    let backbone = &model.backbone;
    let before = match backbone {
        mono::train::finetune::model::Backbone::Resnet(r) => {
            flat(&r.batch_norms()[0].running_mean.lock().unwrap())
        }
        _ => unreachable!(),
    };
    check_gradients(&model, &pixels, &[0, 1, 2, 3], true);
    let after = match backbone {
        mono::train::finetune::model::Backbone::Resnet(r) => {
            flat(&r.batch_norms()[0].running_mean.lock().unwrap())
        }
        _ => unreachable!(),
    };
    assert_ne!(before, after, "train-mode BatchNorm updates its running mean");
    // Frozen backbone: only the head trains.
    let frozen = FinetuneModel::new(
        EncoderKind::Resnet50,
        &serde_json::json!({}),
        &weights,
        &Trainable::LastBlocks(0),
        &head(1, None, 4),
        2,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(frozen.params.trainable().all(|p| p.name.starts_with("head.")));
    let last = FinetuneModel::new(
        EncoderKind::Resnet50,
        &serde_json::json!({}),
        &weights,
        &Trainable::LastBlocks(1),
        &head(1, None, 4),
        2,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(last
        .params
        .trainable()
        .all(|p| p.name.starts_with("head.") || p.name.starts_with("layer4.")));
    // k larger than the layer fails clearly.
    let err = FinetuneModel::new(
        EncoderKind::Resnet50,
        &serde_json::json!({}),
        &weights,
        &Trainable::All,
        &head(1, Some(10_000), 4),
        2,
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("finetune.k = 10000"), "{err}");
}

#[test]
fn resnet_head_reuse_starts_from_the_checkpoint_fc() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_resnet(dir.path(), 8, 7);
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert("fc.weight".into(), common::seeded_randn(&[6, 128], 0.1, DType::F32, 5));
    tensors.insert("fc.bias".into(), common::seeded_randn(&[6], 0.1, DType::F32, 6));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let weights = Weights::load(&[path], &Device::Cpu).unwrap();
    let spec = HeadSpec { topk_layer: false, reuse_head: true, expansion: 1, k: None, classes: 6 };
    let model = FinetuneModel::new(
        EncoderKind::Resnet50,
        &serde_json::json!({}),
        &weights,
        &Trainable::All,
        &spec,
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = common::seeded_randn(&[3, 3, 32, 32], 1.0, DType::F32, 7);
    let out = model.forward(&x, false).unwrap();
    let expected = out
        .features
        .matmul(&tensors["fc.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&tensors["fc.bias"])
        .unwrap();
    assert!(max_rel(&out.logits, &expected) < 1e-6);
    let wrong = HeadSpec { classes: 10, ..spec };
    let err = FinetuneModel::new(
        EncoderKind::Resnet50,
        &serde_json::json!({}),
        &weights,
        &Trainable::All,
        &wrong,
        0,
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("fc head is [6, 128]"), "{err}");
}

/// The finetuning step's route to the weight gradients — the host layers leave them in a
/// `GradSink` active during the forward pass, past candle's store — gives every trainable
/// parameter the store's gradient, bit for bit, on both towers (f32, host kernels).
#[test]
fn weight_gradients_through_the_sink_equal_the_stores() {
    use mono::base::grad_sink::GradSink;
    use mono::train::optim::Gradients;
    let clip_weights =
        Weights::load(&[fixture("clip_vision").join("model.safetensors")], &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::tiny_resnet(dir.path(), 8, 5);
    let resnet_weights =
        Weights::load(&[dir.path().join("model.safetensors")], &Device::Cpu).unwrap();
    let towers = [
        (EncoderKind::Clip, config("clip_vision"), &clip_weights, 6),
        (EncoderKind::Resnet50, serde_json::json!({}), &resnet_weights, 4),
    ];
    for (kind, config, weights, batch) in towers {
        let model = FinetuneModel::new(
            kind,
            &config,
            weights,
            &Trainable::All,
            &head(1, Some(16), 5),
            1,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(model.kernels, Kernels::Host);
        let pixels = common::seeded_randn(&[batch, 3, 32, 32], 1.0, DType::F32, 5);
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 5).collect();
        let vars: Vec<_> = model.params.trainable().map(|p| p.var.as_ref().unwrap()).collect();
        let loss = |out: mono::train::finetune::model::Outputs| {
            mono::train::finetune::model::cross_entropy(&out.logits, &labels, 0.1).unwrap()
        };
        let plain_store = loss(model.forward(&pixels, true).unwrap()).backward().unwrap();
        let plain = Gradients::from_store(&plain_store, None, &vars, Kernels::Host).unwrap();
        let sink = GradSink::default();
        let out = sink.during(|| model.forward(&pixels, true)).unwrap();
        let store = loss(out).backward().unwrap();
        // The layers' weights (all but embeddings, the class token and the BatchNorms fused
        // with a convolution) bypass the store.
        let sizes = |stored: bool| -> usize {
            let pick = vars.iter().filter(|v| store.get(v.as_tensor()).is_some() == stored);
            pick.map(|v| v.elem_count()).sum()
        };
        let (sunk, stored) = (sizes(false), sizes(true));
        assert!(sunk > 9 * stored, "{kind:?}: {sunk} values sunk, {stored} in the store");
        let through_sink =
            Gradients::from_store(&store, Some(&sink), &vars, Kernels::Host).unwrap();
        let names: Vec<&str> = model.params.trainable().map(|p| p.name.as_str()).collect();
        for ((name, a), b) in
            names.iter().zip(plain.to_host().unwrap()).zip(through_sink.to_host().unwrap())
        {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{kind:?} {name}");
        }
    }
}
