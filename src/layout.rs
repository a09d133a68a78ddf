//! The layout of run directories: every output file name, and the typed results written there.
//! Trainers and evaluation write these types; the report, the pipeline and the command line read
//! them back (`read_json`), so a field is named in one place.
//!
//! A training or finetuning run directory (`run.output/run.name`, or a stage directory of
//! `mono run`):
//! ```text
//! config.toml        the resolved config the run was started with
//! metrics.jsonl      one JSON line per logged step (and per epoch when finetuning)
//! checkpoints/       step-NNNNNNNN/ (SAE) or epoch-NNN/ (finetuning): trainer_state.* (+ SAE files)
//! sae/               the final SAE, SAELens layout (SAE runs)
//! model.safetensors  every parameter of the finetuned model (finetuning runs)
//! results.json       TrainResults (SAE) or FinetuneResults
//! latent_stats.safetensors  per-latent MonoScore, purity and firing counts (SAE runs)
//! ```
//! A `mono run` directory adds `results.json` (a RunSummary), the report and the sweep tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::base::config::{EncoderKind, Stage};
use crate::monoscore::MonoScoreSummary;
use crate::sae::SaeSpec;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const RESULTS_FILE: &str = "results.json";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Inside each checkpoint: the trainer's scalar state and its tensors.
pub const STATE_JSON: &str = "trainer_state.json";
pub const STATE_TENSORS: &str = "trainer_state.safetensors";
pub const FINAL_SAE_DIR: &str = "sae";
pub const LATENT_STATS_FILE: &str = "latent_stats.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
pub const REPORT_FILE: &str = "report.html";
pub const SWEEP_CSV: &str = "sweep.csv";
pub const SWEEP_MD: &str = "sweep.md";
pub const SWEEP_PNG: &str = "sweep.png";
pub const MONOSCORE_HIST_PNG: &str = "monoscore_hist.png";

/// `results-<split>.json`: `mono eval` on a split other than the run's evaluation split.
pub fn split_results_file(split: &str) -> String {
    format!("results-{split}.json")
}

/// Class purity of the live latents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Purity {
    /// Mean over live latents of the share of its activating images in its dominant class.
    pub binary: f64,
    /// The same with each image weighted by its activation.
    pub weighted: f64,
    pub latents: usize,
}

/// An SAE evaluated on one split of a feature store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    pub split: String,
    pub n_images: usize,
    /// Per-feature explained variance, averaged over features (the paper's R²).
    pub r2: f64,
    /// 1 − Σ SS_res / Σ SS_tot: the share of total variance explained (robust to features that
    /// barely vary, such as border pixels).
    pub r2_total: f64,
    pub mse: f64,
    pub l0: f64,
    /// Latents that fire on no image of the split.
    pub dead_latents: usize,
    pub live_latents: usize,
    pub monoscore: MonoScoreSummary,
    pub purity: Option<Purity>,
}

/// `results.json` of an SAE run: the evaluation and what produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainResults {
    pub results: EvalResults,
    pub sae: SaeSpec,
    pub lambda: f64,
    /// Wall-clock seconds of training (absent when `mono eval` wrote the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    /// The evaluated feature store.
    pub features: String,
    /// The evaluated SAE directory (absent at the end of training: the run's final SAE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Top-1, top-5 and the TopK layer's MonoScore on the evaluation split after an epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochEval {
    pub top1: f64,
    pub top5: f64,
    pub monoscore: MonoScoreSummary,
    pub n_images: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based: the number of epochs trained.
    pub epoch: usize,
    pub eval: EpochEval,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderIdentity {
    pub kind: EncoderKind,
    pub model: String,
}

/// The layer MonoLoss acted on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopkLayer {
    /// Whether the model has a TopK layer (else MonoLoss acts on the backbone features).
    pub layer: bool,
    pub width: usize,
    pub k: usize,
}

/// `results.json` of a finetuning run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneResults {
    /// The evaluation after the last epoch.
    #[serde(rename = "final")]
    pub final_eval: EpochEval,
    pub history: Vec<EpochRecord>,
    pub lambda: f64,
    pub encoder: EncoderIdentity,
    pub classes: usize,
    pub topk: TopkLayer,
    pub mixed_precision: bool,
    pub ema: bool,
}

/// What one child of `mono run` produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChildResults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneResults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainResults>,
}

/// One child of `mono run` (a sweep point, or the only run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildSummary {
    pub label: String,
    /// The swept keys and their values for this child.
    pub overrides: BTreeMap<String, serde_json::Value>,
    pub finetune_dir: Option<PathBuf>,
    pub features_dir: Option<PathBuf>,
    pub train_dir: Option<PathBuf>,
    pub results: ChildResults,
}

/// `results.json` of a `mono run` directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run: String,
    pub stages: Vec<Stage>,
    pub runs: Vec<ChildSummary>,
}

/// Reads a JSON result file; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid result file", path.display()))
}

/// Writes a JSON result file atomically (pretty-printed).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    crate::base::io::write_json_atomic(path, &serde_json::to_value(value)?)
}
