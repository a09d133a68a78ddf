//! `mono features merge`: joins the feature sets written by `mono extract --shard i/n` into one,
//! split by split, parts in the order given (so the result equals a single extraction).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::store::{list_splits, open_split, BatchLabels, FeatureStore, LabelKind, StoreWriter};

/// Rows copied at a time.
const CHUNK: usize = 4096;

#[derive(Clone, Debug)]
pub struct MergedSplit {
    pub split: String,
    pub dir: PathBuf,
    pub rows: usize,
    pub skipped: usize,
}

/// The parts must describe the same encoder, data set and labels.
fn check_compatible(first: &FeatureStore, other: &FeatureStore) -> Result<()> {
    let (a, b) = (&first.manifest().info, &other.manifest().info);
    let same = a.dim == b.dim
        && a.dtype == b.dtype
        && a.encoder == b.encoder
        && a.dataset == b.dataset
        && a.labels == b.labels
        && a.label_names == b.label_names;
    ensure!(
        same,
        "{} and {} are not parts of one extraction (dim, dtype, encoder, data set or labels differ)",
        first.dir().display(),
        other.dir().display()
    );
    Ok(())
}

fn copy_rows(store: &FeatureStore, writer: &mut StoreWriter) -> Result<()> {
    let mut features = Vec::new();
    let mut start = 0;
    while start < store.len() {
        let end = (start + CHUNK).min(store.len());
        store.read_range(start, end, &mut features)?;
        let paths = store.paths(start, end)?;
        match store.manifest().info.labels {
            LabelKind::None => writer.push(&features, BatchLabels::None, &paths)?,
            LabelKind::Class => {
                let ids: Vec<u32> = (start..end).map(|r| store.row_labels(r)[0]).collect();
                writer.push(&features, BatchLabels::Class(&ids), &paths)?;
            }
            LabelKind::Multi => {
                let lists: Vec<Vec<u32>> =
                    (start..end).map(|r| store.row_labels(r).to_vec()).collect();
                writer.push(&features, BatchLabels::Multi(&lists), &paths)?;
            }
        }
        start = end;
    }
    for s in &store.manifest().skipped {
        writer.skip(s.path.clone(), s.reason.clone());
    }
    Ok(())
}

/// Merges every split of `parts` into the new feature set `out`, built whole in a staging
/// directory beside it and renamed into place once: an interrupted or failed merge leaves no
/// half-merged output (its staging is removed by the next command that locks `out`).
pub fn merge_feature_sets(
    parts: &[PathBuf],
    out: &Path,
    shard_size: usize,
) -> Result<Vec<MergedSplit>> {
    ensure!(!parts.is_empty(), "give the part directories to merge");
    let splits = list_splits(&parts[0])?;
    ensure!(!splits.is_empty(), "{}: no finished split to merge", parts[0].display());
    let _lock = crate::base::lock::lock_dir(out)?;
    if out.exists() {
        bail!("{}: already exists; merge into a new directory", out.display());
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().context("--out needs a directory name")?.to_string_lossy();
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.merge"))
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
    let mut merged = Vec::new();
    for split in &splits {
        let stores: Vec<FeatureStore> =
            parts.iter().map(|p| open_split(p, split)).collect::<Result<_>>()?;
        for other in &stores[1..] {
            check_compatible(&stores[0], other)?;
        }
        let mut writer = StoreWriter::create(
            &staging.path().join(split),
            stores[0].manifest().info.clone(),
            shard_size,
        )?;
        for store in &stores {
            copy_rows(store, &mut writer)
                .with_context(|| format!("copying {}", store.dir().display()))?;
        }
        let manifest = writer.finish()?;
        merged.push(MergedSplit {
            split: split.clone(),
            dir: out.join(split),
            rows: manifest.count,
            skipped: manifest.skipped.len(),
        });
    }
    std::fs::rename(staging.keep(), out)
        .with_context(|| format!("cannot move the merged feature set to {}", out.display()))?;
    Ok(merged)
}
