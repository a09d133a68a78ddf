//! Synthetic ImageNet-like feature stores for the scale benchmarks: `rows` unit-norm rows of
//! `dim` columns in `classes` classes, stored sorted by class (the order extraction writes an
//! ImageNet-style folder in, and the worst case for batch mixing). Each store is built once,
//! through the same import `mono features import` runs (from a temporary .npy), and reused.
//!
//! Row r of class c is normalize(2·μ_c + g_r) with μ_c a random unit direction per class and
//! g_r ~ N(0, I/dim): a class signal that SAEs, MonoScore and purity can find. The train and
//! held-out streams share the class directions and differ in noise.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use half::f16;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::base::config::FloatType;
use crate::base::memory::{begin_phase, phase_memory, PhaseMemory};
use crate::data::import::{import_features, ImportOptions, SplitPlan};
use crate::data::store::FeatureStore;

/// Which rows of the synthetic distribution a store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Train,
    Heldout,
}

impl Stream {
    pub fn split(self) -> &'static str {
        match self {
            Stream::Train => "train",
            Stream::Heldout => "heldout",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub rows: usize,
    pub dim: usize,
    pub classes: usize,
    pub seed: u64,
    pub stream: Stream,
}

/// How building a store went (kept beside it, so a reused store still reports its import).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildRecord {
    pub spec: SyntheticSpec,
    /// Writing the temporary .npy of features and labels.
    pub generate_seconds: f64,
    /// `mono features import` of that .npy into an f16 store.
    pub import_seconds: f64,
    pub import_rows_per_second: f64,
    pub import_memory: PhaseMemory,
}

const RECORD_FILE: &str = "synthetic.json";
const ROWS_PER_CHUNK: usize = 16384;

impl SyntheticSpec {
    /// The feature set directory under `root` (the store is its `split()` subdirectory).
    pub fn dir(&self, root: &Path) -> PathBuf {
        root.join(format!(
            "{}-{}x{}-c{}-s{}",
            self.stream.split(),
            self.rows,
            self.dim,
            self.classes,
            self.seed
        ))
    }

    /// Rows are class-sorted: class c holds rows [c·rows/classes, (c+1)·rows/classes).
    pub fn class_of(&self, row: usize) -> u32 {
        (row as u128 * self.classes as u128 / self.rows as u128) as u32
    }

    /// classes × dim unit rows, shared by both streams of a seed.
    fn class_directions(&self) -> Vec<f32> {
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut means: Vec<f32> =
            (0..self.classes * self.dim).map(|_| StandardNormal.sample(&mut rng)).collect();
        crate::base::cpu::normalize_rows(&mut means, self.dim);
        means
    }

    /// Rows start..end into `out` ((end - start) × dim).
    fn fill(&self, directions: &[f32], start: usize, out: &mut [f32]) {
        out.par_chunks_mut(self.dim)
            .enumerate()
            .for_each(|(i, x)| self.row(directions, start + i, x));
    }

    /// The given rows (e.g. a training batch) without a store: rows.len() × dim.
    pub fn sample_rows(&self, rows: &[u32]) -> Vec<f32> {
        let directions = self.class_directions();
        let mut out = vec![0f32; rows.len() * self.dim];
        out.par_chunks_mut(self.dim)
            .zip(rows)
            .for_each(|(x, &row)| self.row(&directions, row as usize, x));
        out
    }

    /// One unit-norm row from its own seeded generator, so that a row does not depend on how
    /// the rows are chunked.
    fn row(&self, directions: &[f32], row: usize, x: &mut [f32]) {
        let d = self.dim;
        let stream = self.stream as u64 + 1;
        let mut rng = SmallRng::seed_from_u64(
            self.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((row as u64) << 20),
        );
        let c = self.class_of(row) as usize;
        let mean = &directions[c * d..(c + 1) * d];
        let scale = 1.0 / (d as f32).sqrt();
        for (v, &m) in x.iter_mut().zip(mean) {
            let g: f32 = StandardNormal.sample(&mut rng);
            *v = 2.0 * m + scale * g;
        }
        crate::base::cpu::normalize_rows(x, d);
    }
}

/// The store of `spec` under `root`, built if it is missing (or an earlier build did not
/// finish), with the record of its build.
pub fn ensure_store(root: &Path, spec: &SyntheticSpec) -> Result<(FeatureStore, BuildRecord)> {
    ensure!(spec.rows > 0 && spec.dim > 0 && spec.classes > 0, "synthetic store {spec:?} is empty");
    ensure!(spec.classes <= spec.rows, "{} classes need at least as many rows", spec.classes);
    let dir = spec.dir(root);
    let record_path = dir.join(RECORD_FILE);
    if let Ok(text) = std::fs::read_to_string(&record_path) {
        if let Ok(record) = serde_json::from_str::<BuildRecord>(&text) {
            let store = FeatureStore::open(&dir.join(spec.stream.split()))?;
            if record.spec == *spec && store.len() == spec.rows && store.dim() == spec.dim {
                return Ok((store, record));
            }
        }
    }
    if dir.exists() {
        // Ours, and unfinished (no record) or from another spec: built again from scratch.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove the unfinished {}", dir.display()))?;
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".mono-synthetic-")
        .tempdir_in(root)
        .with_context(|| format!("cannot create a temporary directory in {}", root.display()))?;
    let (features, labels) =
        (scratch.path().join("features.npy"), scratch.path().join("labels.npy"));

    let started = Instant::now();
    write_npy_files(spec, &features, &labels)?;
    let generate_seconds = started.elapsed().as_secs_f64();

    begin_phase();
    let started = Instant::now();
    import_features(&ImportOptions {
        features: features.display().to_string(),
        labels: Some(labels),
        label_names: None,
        paths: None,
        out: dir.clone(),
        plan: SplitPlan::Single(spec.stream.split().into()),
        shard_size: ROWS_PER_CHUNK,
        dtype: FloatType::F16,
        batch_rows: 4096,
    })?;
    let import_seconds = started.elapsed().as_secs_f64();
    let record = BuildRecord {
        spec: *spec,
        generate_seconds,
        import_seconds,
        import_rows_per_second: spec.rows as f64 / import_seconds,
        import_memory: phase_memory(),
    };
    crate::base::io::write_json_atomic(&record_path, &serde_json::to_value(&record)?)?;
    Ok((FeatureStore::open(&dir.join(spec.stream.split()))?, record))
}

/// features.npy (rows × dim, f16) and labels.npy (rows, i4), written in chunks.
fn write_npy_files(spec: &SyntheticSpec, features: &Path, labels: &Path) -> Result<()> {
    let directions = spec.class_directions();
    let file = std::fs::File::create(features)
        .with_context(|| format!("cannot create {}", features.display()))?;
    let mut out = BufWriter::with_capacity(1 << 22, file);
    out.write_all(&npy_header("<f2", &[spec.rows, spec.dim]))?;
    let bar = crate::base::progress::bar(spec.rows as u64, "generating");
    let mut rows = vec![0f32; ROWS_PER_CHUNK * spec.dim];
    let mut bytes = Vec::new();
    for start in (0..spec.rows).step_by(ROWS_PER_CHUNK) {
        let end = (start + ROWS_PER_CHUNK).min(spec.rows);
        let chunk = &mut rows[..(end - start) * spec.dim];
        spec.fill(&directions, start, chunk);
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()));
        out.write_all(&bytes).with_context(|| format!("cannot write {}", features.display()))?;
        bar.inc((end - start) as u64);
    }
    out.flush().with_context(|| format!("cannot write {}", features.display()))?;
    bar.finish_and_clear();

    let mut label_bytes = npy_header("<i4", &[spec.rows]);
    label_bytes.extend((0..spec.rows).flat_map(|r| (spec.class_of(r) as i32).to_le_bytes()));
    std::fs::write(labels, label_bytes)
        .with_context(|| format!("cannot write {}", labels.display()))
}

/// An .npy v1.0 header for a C-order array, padded to a multiple of 64 bytes.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend((dict.len() as u16).to_le_bytes());
    header.extend(dict.as_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_store_is_class_sorted_unit_norm_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let spec =
            SyntheticSpec { rows: 1000, dim: 16, classes: 10, seed: 3, stream: Stream::Train };
        let (store, first) = ensure_store(tmp.path(), &spec).unwrap();
        assert_eq!((store.len(), store.dim(), store.n_classes()), (1000, 16, 10));
        let labels: Vec<u32> = (0..1000).map(|r| store.row_labels(r)[0]).collect();
        assert!(labels.windows(2).all(|w| w[0] <= w[1]), "class-sorted");
        assert_eq!((labels[0], labels[99], labels[100], labels[999]), (0, 0, 1, 9));
        let mut x = Vec::new();
        store.read_range(0, 1000, &mut x).unwrap();
        for row in x.chunks(16) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 2e-3, "norm {norm}");
        }
        // Rows of a class lean the same way; rows of different classes do not.
        // Rows sampled without a store are the stored rows.
        let sampled = spec.sample_rows(&[0, 999]);
        for (r, row) in [0usize, 999].into_iter().zip(sampled.chunks(16)) {
            for (s, v) in row.iter().zip(&x[r * 16..r * 16 + 16]) {
                assert!((s - v).abs() < 1e-3, "row {r}: {s} vs stored {v}");
            }
        }
        let dot = |a: usize, b: usize| -> f32 {
            x[a * 16..a * 16 + 16].iter().zip(&x[b * 16..b * 16 + 16]).map(|(p, q)| p * q).sum()
        };
        assert!(dot(0, 50) > 0.6 && dot(0, 950).abs() < dot(0, 50));
        // Built once: a second call reads the record instead of building again.
        let (_, again) = ensure_store(tmp.path(), &spec).unwrap();
        assert_eq!(again.import_seconds, first.import_seconds);
        // No temporary files are left beside the store (only the import's released lock file).
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".train-1000x16-c10-s3.lock", "train-1000x16-c10-s3"]);
        // The held-out stream shares the class directions and differs in noise.
        let held = SyntheticSpec { stream: Stream::Heldout, ..spec };
        let (h, _) = ensure_store(tmp.path(), &held).unwrap();
        let mut y = Vec::new();
        h.read_range(0, 1, &mut y).unwrap();
        assert_ne!(y[..], x[..16]);
        let cos: f32 = y.iter().zip(&x[..16]).map(|(p, q)| p * q).sum();
        assert!(cos > 0.6, "same class, cos {cos}");
    }
}
