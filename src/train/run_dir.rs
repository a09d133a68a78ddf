//! Run-directory housekeeping shared by the SAE and finetuning loops: numbered checkpoint
//! directories and the metrics log of a resumed run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// `<run_dir>/checkpoints/<prefix>NNN…` directories with their numbers, oldest first.
pub fn checkpoint_dirs(run_dir: &Path, prefix: &str) -> Result<Vec<(usize, PathBuf)>> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    let mut found = Vec::new();
    if dir.is_dir() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            if let Some(n) = entry
                .file_name()
                .to_string_lossy()
                .strip_prefix(prefix)
                .and_then(|s| s.parse::<usize>().ok())
            {
                found.push((n, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune_checkpoints(run_dir: &Path, prefix: &str, keep: usize) -> Result<()> {
    for (_, old) in checkpoint_dirs(run_dir, prefix)?.iter().rev().skip(keep) {
        std::fs::remove_dir_all(old).ok();
    }
    Ok(())
}

/// Keeps the metrics lines up to `step` (a resumed run rewrites what followed its checkpoint).
pub fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
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
    crate::base::io::write_atomic(path, kept.as_bytes())
}
