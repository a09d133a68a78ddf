//! Model files from a local directory or the Hugging Face hub, cache first.
//!
//! `encoder.model` is either a directory (used as is) or a hub id. Hub files are looked up in the
//! local cache (HF_HOME, else ~/.cache/huggingface) before any network access; with
//! HF_HUB_OFFLINE=1 the network is never tried. `encoder.revision` pins a branch, tag or commit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};

/// The files an encoder needs.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// config.json (absent for plain torchvision checkpoints in a local directory).
    pub config: Option<PathBuf>,
    /// model.safetensors, or every shard of a sharded checkpoint.
    pub weights: Vec<PathBuf>,
    pub preprocessor: Option<PathBuf>,
    /// Where they came from: a directory, or `id@revision`.
    pub source: String,
}

impl ModelFiles {
    /// The parsed config.json, or an empty object when there is none.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: not valid JSON", path.display()))
            }
            None => Ok(serde_json::json!({})),
        }
    }
}

/// Whether HF_HUB_OFFLINE asks for no network access.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
    })
}

fn how_to_provide(model: &str) -> String {
    format!(
        "download it where the hub is reachable (`huggingface-cli download {model}`) and copy the cache \
         (HF_HOME) here, or set encoder.model to a local directory holding config.json and model.safetensors"
    )
}

/// Resolves `model` (directory or hub id) at `revision`.
pub fn resolve(model: &str, revision: &str) -> Result<ModelFiles> {
    let dir = Path::new(model);
    if dir.is_dir() {
        return from_directory(dir);
    }
    if model.starts_with('.') || model.starts_with('/') || model.matches('/').count() > 1 {
        bail!("encoder.model = {model:?} is neither an existing directory nor a hub id like \"openai/clip-vit-base-patch32\"");
    }
    from_hub(model, revision)
}

fn from_directory(dir: &Path) -> Result<ModelFiles> {
    let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let weights = if let Some(index) = existing("model.safetensors.index.json") {
        shards_of_index(&index, |name| Ok(dir.join(name)))?
    } else if let Some(single) = existing("model.safetensors") {
        vec![single]
    } else {
        let found: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        match found.len() {
            1 => found,
            0 if existing("pytorch_model.bin").is_some() => bail!(
                "{}: only pytorch_model.bin; convert it to model.safetensors (e.g. `safetensors.torch.save_file(torch.load(...), ...)`)",
                dir.display()
            ),
            0 => bail!("{}: no model.safetensors (nor a sharded index)", dir.display()),
            _ => bail!("{}: several .safetensors files and no model.safetensors.index.json to say which", dir.display()),
        }
    };
    Ok(ModelFiles {
        config: existing("config.json"),
        weights,
        preprocessor: existing("preprocessor_config.json"),
        source: dir.display().to_string(),
    })
}

/// Shard file names listed in a `model.safetensors.index.json`.
fn shards_of_index(index: &Path, locate: impl Fn(&str) -> Result<PathBuf>) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = json["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort();
    names.dedup();
    names.into_iter().map(locate).collect()
}

fn from_hub(model: &str, revision: &str) -> Result<ModelFiles> {
    let repo = Repo::with_revision(model.to_string(), RepoType::Model, revision.to_string());
    let cache = hf_hub::Cache::from_env();
    let cached = cache.repo(repo.clone());
    let offline = offline();
    let api = if offline {
        None
    } else {
        Some(
            hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(!crate::base::progress::is_quiet())
                .build()
                .context("cannot set up the Hugging Face hub client")?,
        )
    };
    let fetch = |file: &str, required: bool| -> Result<Option<PathBuf>> {
        if let Some(path) = cached.get(file) {
            return Ok(Some(path));
        }
        match &api {
            None if required => bail!(
                "{model}@{revision}: {file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; {}",
                cache.path().display(),
                how_to_provide(model)
            ),
            None => Ok(None),
            Some(api) => match api.repo(repo.clone()).get(file) {
                Ok(path) => Ok(Some(path)),
                Err(_) if !required => Ok(None),
                Err(e) => bail!("{model}@{revision}: cannot download {file} ({e}); {}", how_to_provide(model)),
            },
        }
    };
    let config = fetch("config.json", true)?;
    let preprocessor = fetch("preprocessor_config.json", false)?;
    let weights = match fetch("model.safetensors.index.json", false)? {
        Some(index) => shards_of_index(&index, |name| Ok(fetch(name, true)?.expect("required")))?,
        None => vec![fetch("model.safetensors", true)?.expect("required")],
    };
    Ok(ModelFiles { config, weights, preprocessor, source: format!("{model}@{revision}") })
}
