//! Writes a feature store: rows are buffered and written a shard at a time (each shard atomically),
//! and `manifest.json` last, so a directory without a manifest is an unfinished store.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::labels::Labels;
use super::manifest::{LabelKind, Manifest, ShardEntry, Skipped, StoreInfo, FORMAT, MANIFEST_FILE};
use super::shard::{encode_shard, encode_value, parse_shard_file_name, shard_file_name, Shard};

/// The labels of a batch of rows pushed to a writer; the variant must match the store's kind.
#[derive(Clone, Copy, Debug)]
pub enum BatchLabels<'a> {
    None,
    /// One class id per row.
    Class(&'a [u32]),
    /// Any number of class ids per row.
    Multi(&'a [Vec<u32>]),
}

pub struct StoreWriter {
    dir: PathBuf,
    info: StoreInfo,
    shard_size: usize,
    shards: Vec<ShardEntry>,
    /// Rows in finished shards.
    written: usize,
    resumed_rows: usize,
    /// Buffered rows, already in the store dtype.
    buf_features: Vec<u8>,
    buf_labels: Labels,
    buf_paths: Vec<String>,
    skipped: Vec<Skipped>,
    /// How many of `skipped` are already recorded in a written shard.
    skipped_written: usize,
    /// The path of the last row kept from before a restart.
    resumed_last_path: Option<String>,
}

impl StoreWriter {
    /// Starts a new store in `dir` (created if needed). Refuses a directory holding a finished
    /// store or the shards of an unfinished one.
    pub fn create(dir: &Path, info: StoreInfo, shard_size: usize) -> Result<Self> {
        let writer = Self::new(dir, info, shard_size)?;
        if let Some(name) = shard_files(dir)?.into_iter().next() {
            bail!(
                "{}: holds shards of an unfinished store ({name}); resume it or delete them",
                dir.display()
            );
        }
        Ok(writer)
    }

    /// Continues an unfinished store in `dir`: the complete shards already there (consecutive from
    /// shard-00000) are checked against `info` and kept; stray temporary files are removed.
    /// `resumed_rows()` says how many input rows to skip. Rows skipped before the restart are
    /// not remembered: call `skip` again for them if they should be listed.
    pub fn resume(dir: &Path, info: StoreInfo, shard_size: usize) -> Result<Self> {
        let mut writer = Self::new(dir, info, shard_size)?;
        remove_temp_files(dir)?;
        let mut names = shard_files(dir)?;
        names.sort_by_key(|n| parse_shard_file_name(n));
        for (i, name) in names.iter().enumerate() {
            ensure!(
                parse_shard_file_name(name) == Some(i),
                "{}: {} is missing but later shards exist; the directory is not a resumable store",
                dir.display(),
                shard_file_name(i)
            );
            let shard = Shard::open(&dir.join(name), &writer.info, None)?;
            let extras = shard.extras()?;
            writer.shards.push(ShardEntry { file: name.clone(), rows: shard.rows() });
            writer.written += shard.rows();
            writer.skipped.extend(extras.skipped);
            writer.resumed_last_path =
                extras.paths.last().cloned().or(writer.resumed_last_path.take());
        }
        writer.resumed_rows = writer.written;
        writer.skipped_written = writer.skipped.len();
        Ok(writer)
    }

    fn new(dir: &Path, info: StoreInfo, shard_size: usize) -> Result<Self> {
        info.validate()
            .with_context(|| format!("cannot write a feature store in {}", dir.display()))?;
        ensure!(shard_size > 0, "shard size must be > 0");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let manifest = dir.join(MANIFEST_FILE);
        ensure!(
            !manifest.exists(),
            "{}: already exists; a finished feature store is never overwritten",
            manifest.display()
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            buf_labels: Labels::empty(info.labels),
            info,
            shard_size,
            shards: Vec::new(),
            written: 0,
            resumed_rows: 0,
            buf_features: Vec::new(),
            buf_paths: Vec::new(),
            skipped: Vec::new(),
            skipped_written: 0,
            resumed_last_path: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn info(&self) -> &StoreInfo {
        &self.info
    }

    /// Rows kept from before a restart (0 for a new store).
    pub fn resumed_rows(&self) -> usize {
        self.resumed_rows
    }

    /// The path of the last row kept from before a restart: inputs up to it are done. The
    /// inputs skipped before it are restored too (each shard records its own).
    pub fn resumed_last_path(&self) -> Option<&str> {
        self.resumed_last_path.as_deref()
    }

    /// Rows accepted so far, resumed ones included.
    pub fn rows(&self) -> usize {
        self.written + self.buf_paths.len()
    }

    /// Adds rows: `features` is (rows, dim) row-major, one path per row. Checks the whole batch
    /// (finite values that fit the dtype, label kind and range) before taking any of it.
    pub fn push(
        &mut self,
        features: &[f32],
        labels: BatchLabels<'_>,
        paths: &[String],
    ) -> Result<()> {
        let (rows, dim) = (paths.len(), self.info.dim);
        ensure!(
            features.len() == rows * dim,
            "{} feature values for {rows} rows of dim {dim}",
            features.len()
        );
        // Rows are addressed by u32 (`read_rows`, `epoch_order`).
        ensure!(
            self.rows() + rows <= u32::MAX as usize,
            "a feature store holds at most 2^32 - 1 rows"
        );
        self.check_labels(labels, paths)?;
        let mut scratch = Vec::with_capacity(4);
        for (i, &v) in features.iter().enumerate() {
            scratch.clear();
            if !encode_value(self.info.dtype, v, &mut scratch) {
                bail!(
                    "row {} ({}), column {}: value {v} is not finite in {}",
                    self.rows() + i / dim,
                    paths[i / dim],
                    i % dim,
                    super::shard::element_type(self.info.dtype)
                );
            }
        }
        let mut at = 0;
        while at < rows {
            let take = (self.shard_size - self.buf_paths.len()).min(rows - at);
            for v in &features[at * dim..(at + take) * dim] {
                encode_value(self.info.dtype, *v, &mut self.buf_features);
            }
            for r in at..at + take {
                match labels {
                    BatchLabels::None => {}
                    BatchLabels::Class(c) => self.buf_labels.push_row(&c[r..r + 1])?,
                    BatchLabels::Multi(m) => self.buf_labels.push_row(&m[r])?,
                }
            }
            self.buf_paths.extend_from_slice(&paths[at..at + take]);
            at += take;
            if self.buf_paths.len() == self.shard_size {
                self.write_shard()?;
            }
        }
        Ok(())
    }

    /// Records an input that was left out, e.g. an image that failed to decode.
    pub fn skip(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.skipped.push(Skipped { path: path.into(), reason: reason.into() });
    }

    /// Writes the last partial shard, then the manifest. A store needs at least one row.
    pub fn finish(mut self) -> Result<Manifest> {
        if !self.buf_paths.is_empty() {
            self.write_shard()?;
        }
        ensure!(
            self.written > 0,
            "{}: no rows to write; a feature store needs at least one",
            self.dir.display()
        );
        let manifest = Manifest {
            format: FORMAT.into(),
            info: self.info,
            count: self.written,
            shards: self.shards,
            skipped: self.skipped,
        };
        let path = self.dir.join(MANIFEST_FILE);
        ensure!(!path.exists(), "{}: appeared while writing; not overwriting it", path.display());
        // Serialised from the struct, not a `Value`, so the keys keep their declared order.
        let mut text = serde_json::to_string_pretty(&manifest)?;
        text.push('\n');
        crate::base::io::write_atomic(&path, text.as_bytes())?;
        Ok(manifest)
    }

    fn check_labels(&self, labels: BatchLabels<'_>, paths: &[String]) -> Result<()> {
        let rows = paths.len();
        let n_classes = self.info.label_names.len();
        let check_id = |id: u32, row: usize| {
            ensure!(
                (id as usize) < n_classes,
                "row {} ({}): label {id} is outside 0..{n_classes} ({n_classes} label names)",
                self.rows() + row,
                paths[row],
            );
            Ok(())
        };
        match (self.info.labels, labels) {
            (LabelKind::None, BatchLabels::None) => {}
            (LabelKind::Class, BatchLabels::Class(c)) => {
                ensure!(c.len() == rows, "{} class labels for {rows} rows", c.len());
                for (r, &id) in c.iter().enumerate() {
                    check_id(id, r)?;
                }
            }
            (LabelKind::Multi, BatchLabels::Multi(m)) => {
                ensure!(m.len() == rows, "{} label lists for {rows} rows", m.len());
                for (r, ids) in m.iter().enumerate() {
                    for &id in ids {
                        check_id(id, r)?;
                    }
                }
            }
            (kind, given) => {
                bail!("the store has labels = \"{kind}\" but the batch came with {given:?}")
            }
        }
        Ok(())
    }

    fn write_shard(&mut self) -> Result<()> {
        let rows = self.buf_paths.len();
        let name = shard_file_name(self.shards.len());
        let path = self.dir.join(&name);
        let bytes = encode_shard(
            &self.info,
            rows,
            &self.buf_features,
            &self.buf_labels,
            &self.buf_paths,
            &self.skipped[self.skipped_written..],
        )
        .with_context(|| format!("cannot encode {}", path.display()))?;
        crate::base::io::write_atomic(&path, &bytes)?;
        self.skipped_written = self.skipped.len();
        self.shards.push(ShardEntry { file: name, rows });
        self.written += rows;
        self.buf_features.clear();
        self.buf_labels.clear();
        self.buf_paths.clear();
        Ok(())
    }
}

/// Names of the `shard-NNNNN.safetensors` files in `dir`.
fn shard_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry.with_context(|| format!("cannot list {}", dir.display()))?.file_name();
        if let Some(name) = name.to_str().filter(|n| parse_shard_file_name(n).is_some()) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// Removes temporary files left by a write that was cut off (`write_atomic` names them `.tmp*`).
fn remove_temp_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(".tmp"))
            && entry.path().is_file()
        {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}
