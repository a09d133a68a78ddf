//! A trainer's run directory (layout in `crate::layout`): the start checks, config.toml, the
//! metrics log of a possibly resumed run, and numbered checkpoints written atomically, of which the
//! newest few are kept. Shared by the SAE trainer and the finetuner.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::base::config::Config;
use crate::base::io::{record_inputs, recorded_input_differences, write_atomic, write_dir_atomic};
use crate::layout::{CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, STATE_JSON, STATE_TENSORS};

/// Checkpoints kept on disk (the newest ones).
const KEEP_CHECKPOINTS: usize = 2;

pub struct RunDir {
    path: PathBuf,
    /// Checkpoint directory names: `<prefix><number, zero-padded to width>`.
    prefix: &'static str,
    width: usize,
}

impl RunDir {
    /// `prefix` and `width` name the checkpoints, e.g. "step-" and 8 → `step-00000120`.
    pub fn new(path: &Path, prefix: &'static str, width: usize) -> Self {
        Self { path: path.to_path_buf(), prefix, width }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `checkpoints/<prefix>N` directories with their numbers, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(usize, PathBuf)>> {
        let dir = self.path.join(CHECKPOINTS_DIR);
        let mut found = Vec::new();
        if dir.is_dir() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
            {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(n) = name.strip_prefix(self.prefix).and_then(|s| s.parse().ok()) {
                    found.push((n, entry.path()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Checks the directory against `resume` before anything is written: a fresh start needs a
    /// directory without a run (no checkpoint, none of `finished`), a resume needs a checkpoint
    /// and the same inputs (`inputs`, as recorded when the run started: every difference is
    /// named). Returns whether the run resumes. `what` names the run in errors ("training").
    pub fn start(
        &self,
        what: &str,
        finished: &[&str],
        resume: bool,
        inputs: &serde_json::Value,
    ) -> Result<bool> {
        let has_checkpoint = !self.checkpoints()?.is_empty();
        let done = finished.iter().any(|f| self.path.join(f).exists());
        if !resume && (has_checkpoint || done) {
            bail!(
                "{} already holds a {what} run; pass --resume to continue it, or choose another run.name",
                self.path.display()
            );
        }
        if resume && !has_checkpoint {
            bail!("--resume: {} has no checkpoint to resume from", self.path.display());
        }
        if resume {
            let differences = recorded_input_differences(&self.path, inputs)?.unwrap_or_default();
            if !differences.is_empty() {
                bail!(
                    "--resume: the {what} run in {} was started with other settings or inputs \
                     ({}); resuming would mix two runs. Start a new run instead: choose another \
                     run.name, or remove {}",
                    self.path.display(),
                    differences.join("; "),
                    self.path.display()
                );
            }
        }
        Ok(resume)
    }

    /// Loads the newest checkpoint that `load` accepts, saying which newer ones it skipped and
    /// why (a checkpoint damaged after it was written, e.g. by a full disk or a bad copy).
    pub fn load_newest<T>(&self, mut load: impl FnMut(&Path) -> Result<T>) -> Result<T> {
        let mut failures = Vec::new();
        for (_, dir) in self.checkpoints()?.into_iter().rev() {
            match load(&dir) {
                Ok(state) => {
                    for (skipped, why) in &failures {
                        crate::base::progress::note(&format!(
                            "skipped checkpoint {skipped}: {why}; resuming from {}",
                            dir.display()
                        ));
                    }
                    return Ok(state);
                }
                Err(e) => failures.push((dir.display().to_string(), format!("{e:#}"))),
            }
        }
        let reasons: Vec<String> = failures.iter().map(|(d, why)| format!("{d}: {why}")).collect();
        bail!(
            "--resume: no checkpoint of {} can be read ({})",
            self.path.display(),
            reasons.join("; ")
        )
    }

    /// Creates the directory, writes config.toml and the inputs' identity when the run starts
    /// at step 0, keeps the metrics lines up to `step` (a resumed run rewrites what followed its
    /// checkpoint) and opens the metrics log for appending.
    pub fn begin(
        &self,
        config: &Config,
        inputs: &serde_json::Value,
        step: usize,
    ) -> Result<MetricsLog> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create {}", self.path.display()))?;
        if step == 0 {
            write_atomic(&self.path.join(CONFIG_FILE), toml::to_string_pretty(config)?.as_bytes())?;
            record_inputs(&self.path, inputs)?;
        }
        let path = self.path.join(METRICS_FILE);
        truncate_metrics(&path, step)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { file, path })
    }

    /// Writes checkpoint `n` (`write` fills the directory) atomically, then removes all but the
    /// newest checkpoints.
    pub fn save_checkpoint(&self, n: usize, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let name = format!("{}{:0width$}", self.prefix, n, width = self.width);
        write_dir_atomic(&self.path.join(CHECKPOINTS_DIR).join(name), write)?;
        for (_, old) in self.checkpoints()?.iter().rev().skip(KEEP_CHECKPOINTS) {
            std::fs::remove_dir_all(old).ok();
        }
        Ok(())
    }
}

/// Keeps the metrics lines whose `step` is at most `step`.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// metrics.jsonl, one JSON object per line.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn write<T: Serialize>(&mut self, line: &T) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(line)?)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Writes a trainer's state into a checkpoint directory: scalars as JSON, tensors as safetensors.
pub fn write_state<T: Serialize>(
    dir: &Path,
    scalars: &T,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let path = dir.join(STATE_TENSORS);
    candle_core::safetensors::save(tensors, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let path = dir.join(STATE_JSON);
    std::fs::write(&path, serde_json::to_string_pretty(scalars)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads what `write_state` wrote (tensors on the CPU); errors name the file.
pub fn read_state<T: DeserializeOwned>(dir: &Path) -> Result<(T, HashMap<String, Tensor>)> {
    let json = dir.join(STATE_JSON);
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("cannot read {}", json.display()))?;
    let scalars = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a trainer state", json.display()))?;
    let path = dir.join(STATE_TENSORS);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((scalars, tensors))
}
