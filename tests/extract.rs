//! `mono extract` end to end with a tiny real-layout CLIP checkpoint: features equal direct
//! encoding, corrupt images are skipped and counted, resumed and sharded runs equal a single run.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use mono::data::images::open_dataset;
use mono::data::store::{FeatureStore, Manifest};
use mono::extract::{extract, ExtractOptions};
use mono::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn clip_dir() -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/encoders/clip_vision_proj")
}

fn config(out: &Path, name: &str, data: &str) -> Config {
    let text = format!(
        "[run]\nname = \"{name}\"\noutput = \"{}\"\n[encoder]\nkind = \"clip\"\nmodel = \"{}\"\nbatch_size = 8\n{data}\n[features]\nshard_size = 16\n",
        out.display(),
        clip_dir().display()
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
}

fn fashion(out: &Path, name: &str, limit: usize) -> Config {
    config(
        out,
        name,
        &format!("[data]\nkind = \"fashion_mnist\"\nroot = \"{ROOT}/data/fashion-mnist\"\ntrain_split = \"test\"\neval_split = \"test\"\nlimit = {limit}\n"),
    )
}

/// Everything a store holds, for comparisons.
fn contents(dir: &Path) -> (Vec<f32>, Vec<String>, Vec<Vec<u32>>, Vec<String>) {
    let store = FeatureStore::open(dir).unwrap();
    let mut x = Vec::new();
    store.read_range(0, store.len(), &mut x).unwrap();
    let paths = (0..store.len()).map(|r| store.path(r).unwrap()).collect();
    let labels = (0..store.len()).map(|r| store.row_labels(r).to_vec()).collect();
    let skipped = store.manifest().skipped.iter().map(|s| s.path.clone()).collect();
    (x, paths, labels, skipped)
}

#[test]
fn features_equal_direct_encoding_with_labels_and_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let c = fashion(tmp.path(), "fm", 40);
    let reports = extract(&c, &ExtractOptions::default()).unwrap();
    assert_eq!(reports.len(), 1, "train and eval split are the same here");
    let dir = c.run_dir().join("features/test");
    let (x, paths, labels, skipped) = contents(&dir);
    assert_eq!((paths.len(), x.len()), (40, 40 * 16));
    assert!(skipped.is_empty());
    let manifest = Manifest::load(&dir).unwrap();
    assert_eq!(manifest.info.encoder.as_ref().unwrap()["output"], "image_embeds");
    assert_eq!(manifest.info.label_names.len(), 10);

    // The same images, preprocessed and encoded by hand.
    let dataset = open_dataset(c.data.kind, c.data.root.as_ref().unwrap(), "test").unwrap();
    let files = mono::encoders::hub::resolve(clip_dir().to_str().unwrap(), "main").unwrap();
    let pre = mono::encoders::preprocessor_for(c.encoder.kind, &files).unwrap();
    let encoder = mono::encoders::load_from_files(
        c.encoder.kind,
        c.encoder.output(),
        &files,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut pixels = Vec::new();
    for i in 0..40 {
        assert_eq!(paths[i], dataset.path(i));
        assert_eq!(labels[i], dataset.labels(i));
        pixels.extend(
            pre.process(&image::DynamicImage::ImageRgb8(dataset.load(i).unwrap())).unwrap(),
        );
    }
    let direct =
        encoder.forward(&Tensor::from_vec(pixels, (40, 3, 32, 32), &Device::Cpu).unwrap()).unwrap();
    let norms = direct.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let direct =
        direct.broadcast_div(&norms).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = x.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "extracted vs direct: {worst}");
    for row in x.chunks(16) {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "rows are L2-normalised");
    }
    // A second run reuses the finished split.
    let again = extract(&c, &ExtractOptions::default()).unwrap();
    assert!(again[0].already_done);
    // …but not by another encoder output.
    let mut other = c.clone();
    other.encoder.output = Some(mono::config::EncoderOutput::Pooler);
    let err = format!("{:#}", extract(&other, &ExtractOptions::default()).unwrap_err());
    assert!(
        err.contains(
            "holds features of other inputs (encoder.output: \"image_embeds\" → \"pooler\")"
        ),
        "{err}"
    );
}

/// A class-folder data set with real PNGs and one corrupt file.
fn folder_dataset(root: &Path) -> PathBuf {
    let data = root.join("images");
    for (class, n) in [("cats", 14), ("dogs", 13)] {
        std::fs::create_dir_all(data.join("all").join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(40 + i, 30, |x, y| {
                image::Rgb([(x * 5) as u8, (y * 7 + i * 11) as u8, (class.len() as u32 * 40) as u8])
            });
            img.save(data.join("all").join(class).join(format!("{i:02}.png"))).unwrap();
        }
    }
    std::fs::write(data.join("all/cats/05b-broken.jpg"), b"\xff\xd8\xff not really a jpeg")
        .unwrap();
    data
}

fn folder_config(tmp: &Path, data: &Path, name: &str) -> Config {
    config(tmp, name, &format!("[data]\nkind = \"folder\"\nroot = \"{}\"\ntrain_split = \"all\"\neval_split = \"all\"\n", data.display()))
}

#[test]
fn corrupt_images_are_skipped_counted_and_resumed_runs_equal_single_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = folder_dataset(tmp.path());
    let single = folder_config(tmp.path(), &data, "single");
    let report = &extract(&single, &ExtractOptions::default()).unwrap()[0];
    assert_eq!((report.rows, report.skipped), (27, 1));
    let expected = contents(&single.run_dir().join("features/all"));
    assert!(expected.3[0].ends_with("05b-broken.jpg"), "{:?}", expected.3);

    // Interrupted after the first shard (16 rows), with the skipped image before that point.
    let resumed = folder_config(tmp.path(), &data, "resumed");
    extract(&resumed, &ExtractOptions::default()).unwrap();
    let dir = resumed.run_dir().join("features/all");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    std::fs::remove_file(dir.join("shard-00001.safetensors")).unwrap();
    let report = &extract(&resumed, &ExtractOptions::default()).unwrap()[0];
    assert_eq!(report.resumed_rows, 16);
    assert_eq!(contents(&dir), expected, "resumed extraction differs from the uninterrupted one");

    // Two parts, merged, equal the single run.
    for i in 0..2 {
        extract(
            &single_named(tmp.path(), &data),
            &ExtractOptions { limit: None, part: Some((i, 2)) },
        )
        .unwrap();
    }
    let parts: Vec<PathBuf> =
        (0..2).map(|i| tmp.path().join(format!("parts/features-part-{i}-of-2"))).collect();
    let merged = tmp.path().join("merged");
    mono::data::merge::merge_feature_sets(&parts, &merged, 16).unwrap();
    assert_eq!(contents(&merged.join("all")), expected, "merged parts differ from the single run");
}

/// A flat class folder (`root/<class>/<image>`, no split subdirectories) with `train_split = "."`:
/// its store is `<features.dir>/root`, never the feature set's own directory.
#[test]
fn a_flat_class_folder_extracts_into_its_own_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = folder_dataset(tmp.path()).join("all");
    let c = config(
        tmp.path(),
        "flat",
        &format!(
            "[data]\nkind = \"folder\"\nroot = \"{}\"\ntrain_split = \".\"\neval_split = \".\"\n",
            data.display()
        ),
    );
    let report = &extract(&c, &ExtractOptions::default()).unwrap()[0];
    assert_eq!((report.rows, report.skipped), (27, 1));
    let features = c.run_dir().join("features");
    assert!(features.join("root/manifest.json").is_file());
    assert!(!features.join("manifest.json").exists());
    let store = mono::data::store::open_split(&features, ".").unwrap();
    assert_eq!(store.len(), 27);
    assert_eq!(store.label_names(), ["cats", "dogs"]);
}

fn single_named(tmp: &Path, data: &Path) -> Config {
    let mut c = folder_config(tmp, data, "parts");
    c.features.dir = Some(tmp.join("parts/features"));
    c
}

#[test]
fn an_unreachable_model_says_how_to_provide_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = fashion(tmp.path(), "offline", 8);
    c.encoder.model = "openai/clip-vit-base-patch32".into();
    let path = tmp.path().join("offline.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(["extract", path.to_str().unwrap(), "--quiet"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("hf"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("HF_HUB_OFFLINE")
            && err.contains("huggingface-cli download openai/clip-vit-base-patch32"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!c.run_dir().join("features").exists(), "nothing is written when the model is missing");
}
