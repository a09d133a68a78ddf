//! `manifest.json` of a feature store: what the rows are, and which shard files hold them.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::base::config::FloatType;

pub const FORMAT: &str = "mono-feature-store/1";
pub const MANIFEST_FILE: &str = "manifest.json";

/// Which labels the rows carry.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    None,
    /// One class id per row (`labels`, I64).
    Class,
    /// Any number of class ids per row (`label_offsets` + `label_values`, I64, CSR).
    Multi,
}

impl std::fmt::Display for LabelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LabelKind::None => "none",
            LabelKind::Class => "class",
            LabelKind::Multi => "multi",
        })
    }
}

/// Everything about a store except its shards: what a writer is created with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoreInfo {
    pub dim: usize,
    pub dtype: FloatType,
    /// "train" | "val" | "test" | any other name.
    pub split: String,
    #[serde(default)]
    pub dataset: Option<String>,
    /// Encoder identity (kind, model, revision, output, normalized), carried as given.
    #[serde(default)]
    pub encoder: Option<serde_json::Value>,
    pub labels: LabelKind,
    #[serde(default)]
    pub label_names: Vec<String>,
    #[serde(default)]
    pub preprocessing: Option<serde_json::Value>,
}

impl StoreInfo {
    /// A store of `dim`-wide f32 rows without labels.
    pub fn new(dim: usize, split: &str) -> Self {
        Self {
            dim,
            dtype: FloatType::F32,
            split: split.to_string(),
            dataset: None,
            encoder: None,
            labels: LabelKind::None,
            label_names: Vec::new(),
            preprocessing: None,
        }
    }

    /// Checks the fields that do not depend on shards.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.dim > 0, "dim must be > 0");
        ensure!(!self.split.trim().is_empty(), "split must not be empty");
        if self.labels != LabelKind::None {
            ensure!(!self.label_names.is_empty(), "labels = \"{}\" needs label_names", self.labels);
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardEntry {
    /// File name inside the store directory.
    pub file: String,
    pub rows: usize,
}

/// An input left out of the store (e.g. an image that failed to decode).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    #[serde(flatten)]
    pub info: StoreInfo,
    pub count: usize,
    pub shards: Vec<ShardEntry>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`; errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "{}: missing (the store is incomplete or not a feature store)",
                    path.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid feature-store manifest", path.display()))?;
        manifest.validate().with_context(|| format!("{}", path.display()))?;
        Ok(manifest)
    }

    /// Internal consistency: format, counts, shard file names.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.format == FORMAT, "format is {:?}; expected {FORMAT:?}", self.format);
        self.info.validate()?;
        let total: usize = self.shards.iter().map(|s| s.rows).sum();
        ensure!(total == self.count, "count = {} but the shards hold {total} rows", self.count);
        for s in &self.shards {
            ensure!(s.rows > 0, "shard {} has 0 rows", s.file);
            // A shard is a plain file inside the store, never a path elsewhere.
            ensure!(
                !s.file.is_empty()
                    && !s.file.contains(['/', '\\'])
                    && s.file != "."
                    && s.file != "..",
                "shard file name {:?} is not a plain file name",
                s.file
            );
        }
        Ok(())
    }

    pub fn to_json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_with_flat_fields() {
        let mut info = StoreInfo::new(4, "val");
        info.labels = LabelKind::Class;
        info.label_names = vec!["a".into(), "b".into()];
        info.encoder = Some(serde_json::json!({"kind": "clip", "model": "m", "normalized": true}));
        let m = Manifest {
            format: FORMAT.into(),
            info,
            count: 3,
            shards: vec![ShardEntry { file: "shard-00000.safetensors".into(), rows: 3 }],
            skipped: vec![Skipped { path: "x.jpg".into(), reason: "corrupt".into() }],
        };
        let v = m.to_json().unwrap();
        assert_eq!(v["dim"], 4);
        assert_eq!(v["dtype"], "f32");
        assert_eq!(v["labels"], "class");
        assert_eq!(v["split"], "val");
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
        back.validate().unwrap();
    }

    #[test]
    fn rejects_bad_counts_and_paths() {
        let mut m = Manifest {
            format: FORMAT.into(),
            info: StoreInfo::new(2, "train"),
            count: 5,
            shards: vec![ShardEntry { file: "shard-00000.safetensors".into(), rows: 3 }],
            skipped: vec![],
        };
        assert!(m.validate().unwrap_err().to_string().contains("count = 5"));
        m.count = 3;
        m.shards[0].file = "../x.safetensors".into();
        assert!(m.validate().is_err());
    }
}
