//! The keys that name `mono run`'s stage directories: a hash of exactly the settings and inputs a
//! stage depends on, so a rerun reuses a finished stage only when nothing it read has changed.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use crate::base::config::Config;
use crate::data::store::open_split;

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

fn section<T: serde::Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).expect("config sections serialise")
}

pub fn finetune_key(c: &Config) -> String {
    stable_key(&json!({
        "encoder": section(&c.encoder), "data": section(&c.data), "finetune": section(&c.finetune),
        "lambda": c.finetune_lambda().ok(), "eps": c.mono.eps, "seed": c.run.seed,
        "log_every": c.run.log_every,
    }))
}

pub fn extract_key(c: &Config, finetune: Option<&str>) -> String {
    let mut encoder = section(&c.encoder);
    encoder["batch_size"] = json!(null); // does not change the features
    stable_key(&json!({
        "encoder": encoder, "finetuned": finetune, "data": section(&c.data),
        "dtype": section(&c.features.dtype), "shard_size": c.features.shard_size,
    }))
}

/// Manifests of a user-provided feature set: its identity for the training key.
pub fn manifests(dir: &Path, c: &Config) -> serde_json::Value {
    let read = |split: &str| {
        open_split(dir, split).ok().map(|s| section(&s.manifest().info)).unwrap_or(json!(null))
    };
    json!({"train": read(&c.data.train_split), "eval": read(&c.data.eval_split)})
}

pub fn train_key(c: &Config, features: &serde_json::Value) -> Result<String> {
    let mut mono = section(&c.mono);
    mono["lambda"] = json!(c.lambda()?);
    if let Some(judge) = &c.mono.similarity_store {
        mono["similarity_store"] = manifests(judge, c);
    }
    Ok(stable_key(&json!({
        "sae": section(&c.sae), "train": section(&c.train), "mono": mono, "seed": c.run.seed,
        "log_every": c.run.log_every,
        "features": features, "splits": [c.data.train_split, c.data.eval_split],
    })))
}
