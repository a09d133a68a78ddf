//! One `shard-NNNNN.safetensors` file: `features` (rows × dim), the label tensors of the store's
//! label kind, and the image paths as a JSON array in the metadata key `paths`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::labels::Labels;
use super::manifest::{LabelKind, Skipped, StoreInfo};
use crate::base::config::FloatType;
use crate::base::io::matrix::ElementType;

pub const FEATURES: &str = "features";
pub const LABELS: &str = "labels";
pub const LABEL_OFFSETS: &str = "label_offsets";
pub const LABEL_VALUES: &str = "label_values";
pub const PATHS_KEY: &str = "paths";
/// Shard metadata key: the inputs skipped while the shard was filled (JSON list).
pub const SKIPPED_KEY: &str = "skipped";

/// `shard-00003.safetensors`.
pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

/// The shard index of a file name made by `shard_file_name`.
pub fn parse_shard_file_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("shard-")?.strip_suffix(".safetensors")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn element_type(dtype: FloatType) -> ElementType {
    match dtype {
        FloatType::F32 => ElementType::F32,
        FloatType::F16 => ElementType::F16,
        FloatType::Bf16 => ElementType::BF16,
    }
}

fn safetensors_dtype(dtype: FloatType) -> Dtype {
    match dtype {
        FloatType::F32 => Dtype::F32,
        FloatType::F16 => Dtype::F16,
        FloatType::Bf16 => Dtype::BF16,
    }
}

/// Appends `v` in the store dtype; false when it does not fit (f16 overflows past 65504).
pub fn encode_value(dtype: FloatType, v: f32, out: &mut Vec<u8>) -> bool {
    match dtype {
        FloatType::F32 => out.extend(v.to_le_bytes()),
        FloatType::F16 => {
            let h = f16::from_f32(v);
            out.extend(h.to_le_bytes());
            return h.is_finite();
        }
        FloatType::Bf16 => {
            let h = bf16::from_f32(v);
            out.extend(h.to_le_bytes());
            return h.is_finite();
        }
    }
    v.is_finite()
}

/// The bytes of a shard file holding `rows` rows.
/// `skipped` lists the inputs left out since the previous shard (kept for resumed writers).
pub fn encode_shard(
    info: &StoreInfo,
    rows: usize,
    features: &[u8],
    labels: &Labels,
    paths: &[String],
    skipped: &[Skipped],
) -> Result<Vec<u8>> {
    ensure!(paths.len() == rows, "{} paths for {rows} rows", paths.len());
    let i64_bytes =
        |v: &mut dyn Iterator<Item = i64>| v.flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
    let label_bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = match labels {
        Labels::None => vec![],
        Labels::Class(v) => {
            ensure!(v.len() == rows, "{} labels for {rows} rows", v.len());
            vec![(LABELS, vec![rows], i64_bytes(&mut v.iter().map(|&x| x as i64)))]
        }
        Labels::Multi { offsets, values } => {
            ensure!(offsets.len() == rows + 1, "{} label offsets for {rows} rows", offsets.len());
            vec![
                (LABEL_OFFSETS, vec![rows + 1], i64_bytes(&mut offsets.iter().map(|&x| x as i64))),
                (
                    LABEL_VALUES,
                    vec![values.len()],
                    i64_bytes(&mut values.iter().map(|&x| x as i64)),
                ),
            ]
        }
    };
    tensors.push((
        FEATURES.into(),
        TensorView::new(safetensors_dtype(info.dtype), vec![rows, info.dim], features)?,
    ));
    for (name, shape, bytes) in &label_bytes {
        tensors.push((name.to_string(), TensorView::new(Dtype::I64, shape.clone(), bytes)?));
    }
    let mut metadata = HashMap::from([(PATHS_KEY.to_string(), serde_json::to_string(paths)?)]);
    if !skipped.is_empty() {
        metadata.insert(SKIPPED_KEY.to_string(), serde_json::to_string(skipped)?);
    }
    Ok(safetensors::serialize(tensors, Some(metadata))?)
}

/// A mapped shard whose header agrees with the store's manifest. Only offsets are kept: features,
/// labels and paths are read from the map when asked for, so an open store holds O(shards) memory.
pub struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of `features` in the file.
    features_offset: usize,
    rows: usize,
    dim: usize,
    dtype: ElementType,
    /// Byte offsets of the label tensors in the file (by label kind).
    labels: LabelOffsets,
}

/// Where a shard's I64 label tensors start in its file.
enum LabelOffsets {
    None,
    Class { labels: usize },
    Multi { offsets: usize, values: usize, nnz: usize },
}

/// What a shard's header holds besides tensors (read on demand, e.g. by a resuming writer).
pub struct ShardExtras {
    pub paths: Vec<String>,
    /// Inputs left out while this shard was filled.
    pub skipped: Vec<Skipped>,
}

impl Shard {
    /// Maps and checks `path` against `info` (and `rows`, when the manifest gives it): every
    /// tensor's dtype and shape, every label's range, the number of paths. Every error names the
    /// file.
    pub fn open(path: &Path, info: &StoreInfo, rows: Option<usize>) -> Result<Shard> {
        let file =
            File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
        // SAFETY: read-only map of a finished shard, which the store never rewrites.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| {
            format!(
                "cannot map {} (feature stores are read through memory maps: keep them on a \
                     file system that supports them, e.g. a local disk)",
                path.display()
            )
        })?;
        Self::check(path, mmap, info, rows).with_context(|| path.display().to_string())
    }

    fn check(path: &Path, mmap: Mmap, info: &StoreInfo, rows: Option<usize>) -> Result<Shard> {
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| anyhow::anyhow!("corrupt safetensors header: {e}"))?;
        let data_start = 8 + header_len;
        let tensors = metadata.tensors();
        let expected: &[&str] = match info.labels {
            LabelKind::None => &[FEATURES],
            LabelKind::Class => &[FEATURES, LABELS],
            LabelKind::Multi => &[FEATURES, LABEL_OFFSETS, LABEL_VALUES],
        };
        for name in tensors.keys() {
            ensure!(
                expected.contains(&name.as_str()),
                "holds a tensor `{name}` that a store with labels = \"{}\" does not have",
                info.labels
            );
        }
        for name in expected {
            ensure!(
                tensors.contains_key(*name),
                "lacks the tensor `{name}` (the manifest says labels = \"{}\")",
                info.labels
            );
        }

        let features = tensors[FEATURES];
        ensure!(
            features.dtype == safetensors_dtype(info.dtype),
            "`features` has dtype {:?} but the manifest says {}",
            features.dtype,
            element_type(info.dtype)
        );
        let [n, cols] = features.shape[..] else {
            bail!("`features` has shape {:?}; expected (rows, {})", features.shape, info.dim);
        };
        ensure!(
            cols == info.dim,
            "expected {} columns (the manifest's dim) but the shard has {cols}",
            info.dim
        );
        if let Some(rows) = rows {
            ensure!(n == rows, "holds {n} rows but the manifest says {rows}");
        }
        ensure!(n > 0, "holds no rows");

        let i64_tensor = |name: &str, len: usize| -> Result<usize> {
            let t = tensors[name];
            ensure!(t.dtype == Dtype::I64, "`{name}` has dtype {:?}; expected I64", t.dtype);
            ensure!(t.shape == [len], "`{name}` has shape {:?}; expected ({len},)", t.shape);
            Ok(data_start + t.data_offsets.0)
        };
        let labels = match info.labels {
            LabelKind::None => LabelOffsets::None,
            LabelKind::Class => LabelOffsets::Class { labels: i64_tensor(LABELS, n)? },
            LabelKind::Multi => {
                let nnz = tensors[LABEL_VALUES].shape.first().copied().unwrap_or(0);
                LabelOffsets::Multi {
                    offsets: i64_tensor(LABEL_OFFSETS, n + 1)?,
                    values: i64_tensor(LABEL_VALUES, nnz)?,
                    nnz,
                }
            }
        };
        let paths = paths_of(&metadata)?;
        ensure!(
            paths.len() == n,
            "metadata `{PATHS_KEY}` lists {} paths for {n} rows",
            paths.len()
        );
        let shard = Shard {
            path: path.to_path_buf(),
            features_offset: data_start + features.data_offsets.0,
            mmap,
            rows: n,
            dim: cols,
            dtype: element_type(info.dtype),
            labels,
        };
        // Every label once, streaming: in range, offsets consistent.
        shard.labels(info.label_names.len())?;
        Ok(shard)
    }

    fn i64_at(&self, offset: usize, index: usize) -> i64 {
        let at = offset + 8 * index;
        i64::from_le_bytes(self.mmap[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The labels of local row `row` (unchecked: `open` checked them all).
    pub fn row_labels(&self, row: usize) -> Vec<u32> {
        match self.labels {
            LabelOffsets::None => Vec::new(),
            LabelOffsets::Class { labels } => vec![self.i64_at(labels, row) as u32],
            LabelOffsets::Multi { offsets, values, .. } => {
                let (a, b) = (self.i64_at(offsets, row), self.i64_at(offsets, row + 1));
                (a..b).map(|i| self.i64_at(values, i as usize) as u32).collect()
            }
        }
    }

    /// Every row's labels, checked against `n_classes` and the CSR offsets.
    fn labels(&self, n_classes: usize) -> Result<Labels> {
        let n = self.rows;
        let class_id = |v: i64, row: usize| -> Result<u32> {
            ensure!(
                v >= 0 && (v as u64) < n_classes as u64,
                "label {v} at row {row} is outside 0..{n_classes} (the manifest has {n_classes} label_names)"
            );
            Ok(v as u32)
        };
        Ok(match self.labels {
            LabelOffsets::None => Labels::None,
            LabelOffsets::Class { labels } => Labels::Class(
                (0..n).map(|r| class_id(self.i64_at(labels, r), r)).collect::<Result<_>>()?,
            ),
            LabelOffsets::Multi { offsets, values, nnz } => {
                let o: Vec<i64> = (0..=n).map(|r| self.i64_at(offsets, r)).collect();
                ensure!(o[0] == 0, "`label_offsets` must start at 0, found {}", o[0]);
                ensure!(
                    o.windows(2).all(|w| w[0] <= w[1]),
                    "`label_offsets` is not non-decreasing"
                );
                ensure!(
                    o[n] as usize == nnz,
                    "`label_offsets` ends at {} but `label_values` holds {nnz}",
                    o[n]
                );
                let mut out = Vec::with_capacity(o[n] as usize);
                for r in 0..n {
                    for i in o[r]..o[r + 1] {
                        out.push(class_id(self.i64_at(values, i as usize), r)?);
                    }
                }
                Labels::Multi { offsets: o.iter().map(|&x| x as usize).collect(), values: out }
            }
        })
    }

    /// The image path of every row.
    pub fn paths(&self) -> Result<Vec<String>> {
        let (_, metadata) = SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            anyhow::anyhow!("{}: corrupt safetensors header: {e}", self.path.display())
        })?;
        paths_of(&metadata).with_context(|| self.path.display().to_string())
    }

    /// Paths and skipped inputs of the whole shard.
    pub fn extras(&self) -> Result<ShardExtras> {
        let (_, metadata) = SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            anyhow::anyhow!("{}: corrupt safetensors header: {e}", self.path.display())
        })?;
        let skipped: Vec<Skipped> =
            match metadata.metadata().as_ref().and_then(|m| m.get(SKIPPED_KEY)) {
                Some(text) => serde_json::from_str(text).with_context(|| {
                    format!(
                        "{}: metadata `{SKIPPED_KEY}` is not a list of skipped inputs",
                        self.path.display()
                    )
                })?,
                None => Vec::new(),
            };
        Ok(ShardExtras { paths: self.paths()?, skipped })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Asks the kernel to start reading local row `row` from the disk, without waiting.
    pub fn prefetch(&self, row: usize) {
        let row_bytes = self.dim * self.dtype.size();
        let _ = self.mmap.advise_range(
            memmap2::Advice::WillNeed,
            self.features_offset + row * row_bytes,
            row_bytes,
        );
    }

    /// Local rows `start..end` as f32 into `out` ((end - start) × dim); NaN/Inf is an error
    /// naming this file and the row (`first_global` is the store row of local row 0).
    pub fn read_into(
        &self,
        start: usize,
        end: usize,
        first_global: usize,
        out: &mut [f32],
    ) -> Result<()> {
        debug_assert!(start <= end && end <= self.rows);
        let row_bytes = self.dim * self.dtype.size();
        let begin = self.features_offset + start * row_bytes;
        crate::base::io::matrix::decode_le(
            self.dtype,
            &self.mmap[begin..begin + (end - start) * row_bytes],
            out,
        );
        if let Some(pos) = out.iter().position(|v| !v.is_finite()) {
            let local = start + pos / self.dim;
            bail!(
                "{}: row {local} (store row {}), column {} is {} (NaN/Inf are not allowed)",
                self.path.display(),
                first_global + local,
                pos % self.dim,
                out[pos]
            );
        }
        Ok(())
    }
}

/// The `paths` metadata of a shard header.
fn paths_of(metadata: &safetensors::tensor::Metadata) -> Result<Vec<String>> {
    let text = metadata.metadata().as_ref().and_then(|m| m.get(PATHS_KEY)).with_context(|| {
        format!("lacks the metadata key `{PATHS_KEY}` (the image path of each row)")
    })?;
    serde_json::from_str(text)
        .with_context(|| format!("metadata `{PATHS_KEY}` is not a JSON array of strings"))
}
