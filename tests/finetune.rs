//! `mono finetune` on real Fashion-MNIST images with tiny backbones: above-chance accuracy,
//! MonoLoss raises the TopK layer's MonoScore, resume equals uninterrupted, bad input fails.

use crate::common;

use std::path::{Path, PathBuf};

use mono::data::idx::{read_idx_pair, FASHION_MNIST_CLASSES};
use mono::Config;

const FM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist");

/// Fashion-MNIST t10k images as PNG class folders: `root/train` (first `n_train`) and `root/val`.
pub(crate) fn fashion_folders(root: &Path, n_train: usize, n_val: usize) -> PathBuf {
    let (images, labels) = read_idx_pair(
        &Path::new(FM).join("t10k-images-idx3-ubyte.gz"),
        &Path::new(FM).join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let data = root.join("fashion");
    for (split, range) in [("train", 0..n_train), ("val", n_train..n_train + n_val)] {
        for class in FASHION_MNIST_CLASSES {
            std::fs::create_dir_all(data.join(split).join(class.replace('/', "-"))).unwrap();
        }
        for i in range {
            let px = images.pixels[i * 784..(i + 1) * 784].to_vec();
            let img = image::GrayImage::from_raw(28, 28, px).unwrap();
            let class = FASHION_MNIST_CLASSES[labels[i] as usize].replace('/', "-");
            img.save(data.join(split).join(class).join(format!("{i:05}.png"))).unwrap();
        }
    }
    data
}

/// A tiny torchvision ResNet that preprocesses to 32×32.
pub(crate) fn tiny_resnet_dir(root: &Path) -> PathBuf {
    let dir = root.join("tiny-resnet");
    common::tiny_resnet(&dir, 8, 11);
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "resample": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
    )
    .unwrap();
    dir
}

fn config(root: &Path, name: &str, kind: &str, model: &Path, data: &Path, extra: &str) -> Config {
    let text = format!(
        "[run]\nname = \"{name}\"\noutput = \"{}\"\nlog_every = 5\n[encoder]\nkind = \"{kind}\"\nmodel = \"{}\"\n\
         [data]\nkind = \"folder\"\nroot = \"{}\"\ntrain_split = \"train\"\neval_split = \"val\"\n\
         [finetune]\nepochs = 3\nbatch_size = 50\noptimizer = \"adamw\"\nlr = 0.003\nweight_decay = 0.0\n\
         warmup_epochs = 0\nlabel_smoothing = 0.0\nema_decay = 0.9\nk = 16\n{extra}",
        root.join("runs").display(),
        model.display(),
        data.display()
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
}

fn finetune_from_config(c: &Config, resume: bool) -> anyhow::Result<mono::layout::FinetuneResults> {
    mono::pipeline::stages::finetune(c, &c.run_dir(), resume)
}

fn final_metric(results: &mono::layout::FinetuneResults, key: &str) -> f64 {
    let results = &serde_json::to_value(results).unwrap();
    match key {
        "monoscore" => results["final"]["monoscore"]["mean"].as_f64().unwrap(),
        k => results["final"][k].as_f64().unwrap(),
    }
}

#[test]
fn tiny_resnet_and_tiny_vit_learn_and_monoloss_raises_topk_monoscore() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_folders(tmp.path(), 1000, 300);
    let resnet = tiny_resnet_dir(tmp.path());
    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders/clip_vision");
    for (kind, model) in [("resnet50", &resnet), ("clip", &clip)] {
        let run = |name: &str, lambda: f64| {
            let mut c = config(
                tmp.path(),
                &format!("{kind}-{name}"),
                kind,
                model,
                &data,
                &format!("[mono]\nlambda = {lambda}\n"),
            );
            c.finetune.epochs = 4;
            c.finetune.augment = false;
            finetune_from_config(&c, false).unwrap()
        };
        let (base, mono) = (run("base", 0.0), run("mono", 1.0));
        let (b, m) = (&base, &mono);
        eprintln!(
            "{kind}: λ=0 top-1 {:.3} MonoScore {:.3}; λ=1 top-1 {:.3} MonoScore {:.3}",
            final_metric(b, "top1"),
            final_metric(b, "monoscore"),
            final_metric(m, "top1"),
            final_metric(m, "monoscore")
        );
        assert!(
            final_metric(b, "top1") > 0.4,
            "{kind}: top-1 {} is not clearly above chance (0.1)",
            final_metric(b, "top1")
        );
        assert!(
            final_metric(m, "top1") > 0.3,
            "{kind}: with MonoLoss top-1 {}",
            final_metric(m, "top1")
        );
        assert!(final_metric(b, "top5") >= final_metric(b, "top1"));
        assert!(
            final_metric(m, "monoscore") > final_metric(b, "monoscore") + 0.02,
            "{kind}: MonoScore must rise with λ"
        );
    }
}

#[test]
fn resume_equals_uninterrupted_and_bad_input_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_folders(tmp.path(), 200, 100);
    let resnet = tiny_resnet_dir(tmp.path());
    let extra = "[mono]\nlambda = 0.5\n";
    let full = config(tmp.path(), "full", "resnet50", &resnet, &data, extra);
    finetune_from_config(&full, false).unwrap();
    let part = config(tmp.path(), "part", "resnet50", &resnet, &data, extra);
    finetune_from_config(&part, false).unwrap();
    // Crash after epoch 2: drop the last checkpoint and the final outputs, then resume.
    let dir = part.run_dir();
    std::fs::remove_dir_all(dir.join("checkpoints/epoch-003")).unwrap();
    std::fs::remove_file(dir.join("results.json")).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    finetune_from_config(&part, true).unwrap();
    let load = |c: &Config| {
        candle_core::safetensors::load(
            c.run_dir().join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load(&full), load(&part));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{name}: resumed run differs");
    }
    let metrics = |c: &Config| std::fs::read_to_string(c.run_dir().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&full), metrics(&part));

    // A similarity store lacking training images.
    let store_dir = tmp.path().join("judge");
    for split in ["train", "val"] {
        let mut info = mono::data::store::StoreInfo::new(4, split);
        info.labels = mono::data::store::LabelKind::None;
        let mut w =
            mono::data::store::StoreWriter::create(&store_dir.join(split), info, 100).unwrap();
        w.push(
            &[1.0, 0.0, 0.0, 0.0],
            mono::data::store::BatchLabels::None,
            &["train/Bag/00001.png".to_string()],
        )
        .unwrap();
        w.finish().unwrap();
    }
    let mut c = config(tmp.path(), "judge", "resnet50", &resnet, &data, extra);
    c.finetune.similarity_store = Some(store_dir);
    let err = format!("{:#}", finetune_from_config(&c, false).err().unwrap());
    assert!(err.contains("lacks") && err.contains("images of the data set"), "{err}");
    assert!(!c.run_dir().exists(), "nothing is written before the inputs check out");
    // Class-count mismatch between the splits.
    std::fs::create_dir_all(data.join("val/Extra-class")).unwrap();
    let c = config(tmp.path(), "classes", "resnet50", &resnet, &data, extra);
    let err = format!("{:#}", finetune_from_config(&c, false).err().unwrap());
    assert!(err.contains("classes"), "{err}");
    std::fs::remove_dir(data.join("val/Extra-class")).unwrap();
    // k larger than the TopK layer.
    let mut c = config(tmp.path(), "bigk", "resnet50", &resnet, &data, extra);
    c.finetune.k = Some(100_000);
    let err = format!("{:#}", finetune_from_config(&c, false).err().unwrap());
    assert!(err.contains("finetune.k = 100000"), "{err}");
    // Training into a finished run.
    let err = format!("{:#}", finetune_from_config(&full, false).err().unwrap());
    assert!(err.contains("already holds a finetuning run"), "{err}");
}

/// The EMA against torch's own `AveragedModel` run with torchvision's rule
/// (tests/fixtures/ema/ema.json, scripts/make_ema_fixture.py): adjusted decay, updates every
/// `ema_steps` batches of an epoch, first update a copy, resets during warm-up, buffers averaged.
#[test]
fn ema_follows_torchvisions_rule() {
    use candle_core::{Device, Tensor};
    use mono::train::finetune::ema::Ema;
    use std::collections::HashMap;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ema/ema.json");
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let int = |k: &str| fx[k].as_u64().unwrap() as usize;
    let names: Vec<String> =
        fx["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    let values = |f: &dyn Fn(usize, usize) -> f32| -> HashMap<String, Tensor> {
        names
            .iter()
            .enumerate()
            .map(|(t, n)| {
                let len: usize = fx["shapes"][n]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .product();
                (
                    n.clone(),
                    Tensor::new((0..len).map(|j| f(t, j)).collect::<Vec<f32>>(), &Device::Cpu)
                        .unwrap(),
                )
            })
            .collect()
    };
    let initial = values(&|t, j| fx["initial"][&names[t]][j].as_f64().unwrap() as f32);
    let mut ema = Ema::new(
        fx["ema_decay"].as_f64().unwrap(),
        int("ema_steps"),
        int("batch_size"),
        int("epochs"),
        int("warmup_epochs"),
        initial,
    );
    let mut step = 0usize;
    for epoch in 0..int("epochs") {
        for index in 0..int("steps_per_epoch") {
            let s = step as f64;
            let current = values(&|t, j| (0.37 * s + 1.3 * j as f64 + 0.5 * t as f64).sin() as f32);
            step += 1;
            if ema.due(index) {
                ema.update(epoch, current).unwrap();
            }
        }
        for n in &names {
            let ours: Vec<f32> = ema.get(n).unwrap().to_vec1().unwrap();
            let theirs = fx["after_epoch"][epoch][n].as_array().unwrap();
            for (o, t) in ours.iter().zip(theirs) {
                let t = t.as_f64().unwrap() as f32;
                assert!((o - t).abs() < 1e-6, "epoch {epoch} {n}: ours {o}, torch {t}");
            }
        }
    }
}

/// torchvision's recipe sizes: a ResNet trains on smaller crops than it is evaluated at
/// (`train_size`); a ViT tower refuses another size, and `eval_resize` needs a shortest-edge +
/// crop preprocessing.
#[test]
fn train_size_and_eval_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_folders(tmp.path(), 200, 50);
    let resnet = tiny_resnet_dir(tmp.path());
    let mut c = config(
        tmp.path(),
        "small-crops",
        "resnet50",
        &resnet,
        &data,
        "train_size = 24\nlambda = 0.1\n",
    );
    c.finetune.epochs = 1;
    let results = finetune_from_config(&c, false).unwrap();
    assert_eq!(results.history.len(), 1);

    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders/clip_vision");
    let c =
        config(tmp.path(), "clip-crops", "clip", &clip, &data, "train_size = 24\nlambda = 0.1\n");
    let err = format!("{:#}", finetune_from_config(&c, false).unwrap_err());
    assert!(err.contains("finetune.train_size = 24") && err.contains("32×32"), "{err}");

    let c = config(
        tmp.path(),
        "resize",
        "resnet50",
        &resnet,
        &data,
        "eval_resize = 36\nlambda = 0.1\n",
    );
    let err = format!("{:#}", finetune_from_config(&c, false).unwrap_err());
    assert!(err.contains("finetune.eval_resize"), "{err}");
}
