//! The feature store: a directory of `shard-NNNNN.safetensors` files and a `manifest.json`,
//! readable from Python with `safetensors` and `json` alone. A "feature set" is a directory with
//! one store per split (`DIR/train`, `DIR/val`, `DIR/test`).

mod labels;
mod lookup;
mod manifest;
mod order;
mod shard;
mod writer;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

pub use labels::Labels;
pub use lookup::SimilarityLookup;
pub use manifest::{LabelKind, Manifest, ShardEntry, Skipped, StoreInfo, FORMAT, MANIFEST_FILE};
pub use order::EpochOrder;
pub use shard::{shard_file_name, FEATURES, LABELS, LABEL_OFFSETS, LABEL_VALUES, PATHS_KEY};
pub use writer::{BatchLabels, StoreWriter};

use shard::Shard;

/// Rows decoded per parallel task (≈ 1.5 MB of f32 at 768 columns).
const READ_BLOCK_ROWS: usize = 512;
/// Fewest gathered rows per parallel task.
const GATHER_MIN_ROWS: usize = 64;

/// A finished store, opened for reading: every shard mapped and checked against the manifest up
/// front (tensors, labels, paths). Features, labels and paths stay in the mapped files and are
/// read when asked for, so an open store takes O(shards) memory, not O(rows).
pub struct FeatureStore {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// Store row of each shard's first row, then the row count.
    starts: Vec<usize>,
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FeatureStore({} {}×{} {} shards)",
            self.dir.display(),
            self.len(),
            self.dim(),
            self.shards.len()
        )
    }
}

impl FeatureStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        ensure!(manifest.count > 0, "{}: the feature store holds no rows", dir.display());
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut starts = Vec::with_capacity(manifest.shards.len() + 1);
        let mut row = 0;
        let canonical_dir =
            dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
        for entry in &manifest.shards {
            let path = dir.join(&entry.file);
            inside_store(&path, &canonical_dir)?;
            let shard = Shard::open(&path, &manifest.info, Some(entry.rows))?;
            starts.push(row);
            row += shard.rows();
            shards.push(shard);
        }
        starts.push(row);
        Ok(Self { dir: dir.to_path_buf(), manifest, shards, starts })
    }

    /// Rows in the store.
    pub fn len(&self) -> usize {
        self.manifest.count
    }

    /// Never true for an opened store (an empty one is refused at open); here for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> usize {
        self.manifest.info.dim
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The row order of training epoch `epoch`: a seeded permutation of every row.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> EpochOrder {
        EpochOrder::new(self.len(), seed, epoch)
    }

    /// Rows `start..end` as f32, (end - start) × dim, into `out` (cleared first).
    pub fn read_range(&self, start: usize, end: usize, out: &mut Vec<f32>) -> Result<()> {
        ensure!(
            start <= end && end <= self.len(),
            "{}: rows {start}..{end} out of range (the store has {})",
            self.dir.display(),
            self.len()
        );
        let d = self.dim();
        out.clear();
        out.resize((end - start) * d, 0.0);
        // Shard segments, each decoded in parallel in blocks of rows.
        let mut segments = Vec::new();
        let mut rest = &mut out[..];
        let mut row = start;
        while row < end {
            let s = self.shard_of(row);
            let stop = end.min(self.starts[s + 1]);
            let (here, tail) = rest.split_at_mut((stop - row) * d);
            segments.push((s, row, here));
            (rest, row) = (tail, stop);
        }
        segments.into_par_iter().try_for_each(|(s, first, segment)| {
            segment.par_chunks_mut(READ_BLOCK_ROWS * d).enumerate().try_for_each(|(b, block)| {
                let local = first - self.starts[s] + b * READ_BLOCK_ROWS;
                self.shards[s].read_into(local, local + block.len() / d, self.starts[s], block)
            })
        })
    }

    /// The given store rows (any order, repeats allowed) as f32, rows.len() × dim, into `out`
    /// (cleared first). Rows are decoded in parallel straight from the memory maps.
    pub fn read_rows(&self, rows: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let d = self.dim();
        if let Some(&row) = rows.iter().find(|&&r| r as usize >= self.len()) {
            bail!("{}: row {row} out of range (the store has {})", self.dir.display(), self.len());
        }
        out.clear();
        out.resize(rows.len() * d, 0.0);
        out.par_chunks_mut(d).zip(rows).with_min_len(GATHER_MIN_ROWS).try_for_each(|(x, &row)| {
            let (s, row) = (self.shard_of(row as usize), row as usize);
            let local = row - self.starts[s];
            self.shards[s].read_into(local, local + 1, self.starts[s], x)
        })
    }

    /// Starts reading `rows` from the disk in the background (one request per row, all at once,
    /// so the disk sees a deep queue instead of one page fault at a time); a later `read_rows`
    /// of them then finds them in memory. Worth it only when the store does not fit in memory
    /// (`fits_in_memory`): otherwise the pages are cached after the first touch and the requests
    /// cost more than they save.
    pub fn prefetch_rows(&self, rows: &[u32]) {
        for &row in rows.iter().filter(|&&r| (r as usize) < self.len()) {
            let s = self.shard_of(row as usize);
            self.shards[s].prefetch(row as usize - self.starts[s]);
        }
    }

    /// Bytes of feature data in the shards.
    pub fn feature_bytes(&self) -> u64 {
        let value = shard::element_type(self.manifest.info.dtype).size() as u64;
        self.len() as u64 * self.dim() as u64 * value
    }

    /// The labels of one row (`row < len()`): empty without labels, one id for class labels.
    pub fn row_labels(&self, row: usize) -> Vec<u32> {
        let s = self.shard_of(row);
        self.shards[s].row_labels(row - self.starts[s])
    }

    /// Number of label names (0 without labels).
    pub fn n_classes(&self) -> usize {
        self.manifest.info.label_names.len()
    }

    pub fn label_names(&self) -> &[String] {
        &self.manifest.info.label_names
    }

    /// The image paths of rows `start..end`, read from the shards' headers.
    pub fn paths(&self, start: usize, end: usize) -> Result<Vec<String>> {
        ensure!(start <= end && end <= self.len(), "rows {start}..{end} out of range");
        let mut out = Vec::with_capacity(end - start);
        let mut row = start;
        while row < end {
            let s = self.shard_of(row);
            let (first, last) = (self.starts[s], self.starts[s + 1].min(end));
            let paths = self.shards[s].paths()?;
            out.extend(paths[row - first..last - first].iter().cloned());
            row = last;
        }
        Ok(out)
    }

    /// The image path of one row (`row < len()`).
    pub fn path(&self, row: usize) -> Result<String> {
        Ok(self.paths(row, row + 1)?.remove(0))
    }

    /// Checks that `judge` (a similarity store) embeds the same images, in the same order.
    pub fn check_same_rows(&self, judge: &FeatureStore) -> Result<()> {
        ensure!(
            judge.len() == self.len(),
            "similarity store {} has {} rows but {} has {}: it must embed the same images in the same order",
            judge.dir().display(),
            judge.len(),
            self.dir().display(),
            self.len()
        );
        for range in self.shard_ranges() {
            let (mine, theirs) =
                (self.paths(range.start, range.end)?, judge.paths(range.start, range.end)?);
            if let Some(i) = (0..mine.len()).find(|&i| mine[i] != theirs[i]) {
                let row = range.start + i;
                bail!(
                    "similarity store {} row {row} is {:?} but {} row {row} is {:?}: not the same images",
                    judge.dir().display(),
                    theirs[i],
                    self.dir().display(),
                    mine[i]
                );
            }
        }
        Ok(())
    }

    /// Rows of each shard, in order: the units in which `paths` reads cheaply.
    pub fn shard_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.starts.windows(2).map(|w| w[0]..w[1]).collect()
    }

    fn shard_of(&self, row: usize) -> usize {
        self.starts.partition_point(|&s| s <= row) - 1
    }
}

/// The directory name of a split: slices such as `test[0:8000]` become `test_0-8000`.
pub fn split_dir(split: &str) -> String {
    if split == "." {
        // A folder data set's root itself: its store must not be the feature set's root.
        return "root".into();
    }
    split.replace('[', "_").replace(':', "-").replace(']', "")
}

/// Refuses a shard that resolves outside the store (a symbolic link elsewhere, or a manifest
/// entry with a path): a store is its directory, so that its fingerprint, locks and deletion
/// cover everything it reads.
fn inside_store(path: &Path, canonical_dir: &Path) -> Result<()> {
    let Ok(target) = path.canonicalize() else { return Ok(()) }; // Shard::open names it
    ensure!(
        target.parent() == Some(canonical_dir),
        "{}: resolves to {}, outside the store; a store's shards must be files in its directory",
        path.display(),
        target.display()
    );
    Ok(())
}

/// A fingerprint of the finished store in `dir` (docs/reliability.md): its manifest's content,
/// canonical location, and each shard's size and modification time.
pub fn fingerprint(dir: &Path) -> Result<String> {
    let manifest = Manifest::load(dir)?;
    let canonical =
        dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let mut fp = crate::base::fingerprint::Fingerprint::new();
    fp.str(&canonical.display().to_string()).file_signed(&dir.join(MANIFEST_FILE))?;
    for shard in &manifest.shards {
        fp.file_stat(&dir.join(&shard.file));
    }
    Ok(fp.finish())
}

/// The identity of a feature set's splits as a stage reads them: each store's fingerprint.
pub fn feature_set_identity(root: &Path, splits: &[&str]) -> Result<serde_json::Value> {
    let mut identity = serde_json::json!({});
    for &split in splits {
        identity[split] = fingerprint(&root.join(split_dir(split)))?.into();
    }
    Ok(identity)
}

/// Opens `root/split` of a feature set; when it is missing, the error lists the splits present.
pub fn open_split(root: &Path, split: &str) -> Result<FeatureStore> {
    let dir = root.join(split_dir(split));
    if dir.is_dir() {
        // Finished or not: `open` says what is wrong with it, if anything.
        return FeatureStore::open(&dir);
    }
    let present = list_splits(root)?;
    if present.is_empty() {
        bail!("{}: no split `{split}`, and no finished store in any subdirectory", root.display());
    }
    bail!("{}: no split `{split}`; it holds {}", root.display(), present.join(", "))
}

/// Subdirectories of `root` that hold a finished store, sorted.
pub fn list_splits(root: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("cannot open feature set {}", root.display()))?;
    let mut splits = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        if entry.path().join(MANIFEST_FILE).is_file() {
            if let Some(name) = entry.file_name().to_str() {
                splits.push(name.to_string());
            }
        }
    }
    splits.sort();
    Ok(splits)
}
