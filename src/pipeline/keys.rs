//! The keys that name `mono run`'s stage directories: a hash of exactly the settings and inputs a
//! stage depends on (each stage defines its inputs' identity beside its code; docs/reliability.md
//! lists them), so a rerun reuses a finished stage only when nothing it read has changed.

use std::path::Path;

use anyhow::{Context, Result};

use crate::base::config::Config;
use crate::data::store::feature_set_identity;
use crate::extract::ExtractOptions;

/// FNV-1a 64 of the canonical JSON of `value` (keys sorted), as 12 hex digits.
pub fn stable_key(value: &serde_json::Value) -> String {
    let text = serde_json::to_string(value).expect("JSON values serialise");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

/// The finetuning stage's key: its inputs' identity (`train::finetune::inputs_identity`).
pub fn finetune_key(c: &Config) -> Result<String> {
    Ok(stable_key(&crate::train::finetune::inputs_identity(c)?))
}

/// The extraction stage's key: its inputs' identity, with the finetuning run's key standing
/// for the model when the features come from a finetuned backbone (not there yet when planning).
pub fn extract_key(c: &Config, finetune: Option<&str>) -> Result<String> {
    let identity = crate::extract::inputs_identity(c, &ExtractOptions::default(), finetune)?;
    Ok(stable_key(&identity))
}

/// A user-provided feature set as a training input: its stores' fingerprints.
pub fn feature_set(dir: &Path, c: &Config) -> Result<serde_json::Value> {
    let splits = [c.data.train_split.as_str(), c.data.eval_split.as_str()];
    feature_set_identity(dir, &splits).context("features.dir")
}

/// The training stage's key: its settings with `features`, the identity of the features it
/// reads (a feature set's fingerprints, or the key of the extraction that makes them).
pub fn train_key(c: &Config, features: serde_json::Value) -> Result<String> {
    Ok(stable_key(&crate::train::sae::inputs_identity(c, features)?))
}
