//! Model resolution from the Hugging Face cache, offline (HF_HOME, HF_HUB_OFFLINE, revisions).
//! One test per binary: it sets process-wide environment variables.

use std::path::Path;

use candle_core::{DType, Device};
use mono::config::{EncoderKind, EncoderOutput};
use mono::encoders::{self, hub};

/// Lays out `files` as the hub cache does: hub/models--org--name/{refs/<rev>, snapshots/<hash>/…}.
fn cache_model(home: &Path, id: &str, revision: &str, hash: &str, files: &Path) {
    let repo = home.join("hub").join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(revision), hash).unwrap();
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    for name in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(files.join(name), snapshot.join(name)).unwrap();
    }
}

#[test]
fn cached_models_load_offline_and_missing_ones_say_how_to_provide_them() {
    let home = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders");
    cache_model(home.path(), "tiny/clip", "main", "0123abcd", &fixtures.join("clip_vision_proj"));
    cache_model(home.path(), "tiny/clip", "v-old", "4567ef01", &fixtures.join("clip_full"));
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let files = hub::resolve("tiny/clip", "main").unwrap();
    assert!(files.weights[0].to_string_lossy().contains("0123abcd"));
    assert!(files.preprocessor.is_some());
    let encoder = encoders::load_from_files(
        EncoderKind::Clip,
        EncoderOutput::ImageEmbeds,
        &files,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(encoder.dim(), 16);
    // Revision pinning picks the other snapshot.
    let old = hub::resolve("tiny/clip", "v-old").unwrap();
    assert!(old.weights[0].to_string_lossy().contains("4567ef01"));

    let err = format!("{:#}", hub::resolve("openai/clip-vit-base-patch32", "main").unwrap_err());
    assert!(
        err.contains("HF_HUB_OFFLINE")
            && err.contains("huggingface-cli download openai/clip-vit-base-patch32"),
        "{err}"
    );
    assert!(err.contains("local directory"), "{err}");
    let err = format!("{:#}", hub::resolve("./no/such/dir", "main").unwrap_err());
    assert!(err.contains("neither an existing directory nor a hub id"), "{err}");
}
