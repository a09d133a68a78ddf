//! `mono features import`: a feature store from features computed elsewhere (an .npy or
//! .safetensors matrix), with optional labels, label names and image paths, into one split or
//! a seeded train/val/test division. The stores are built in a temporary directory beside the
//! output and renamed into place at the end, so a failure leaves nothing behind.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::store::{BatchLabels, LabelKind, StoreInfo, StoreWriter};
use crate::base::config::FloatType;
use crate::base::io::labels::{read_labels, read_lines, LabelFile};
use crate::base::io::matrix::MatrixFile;

/// Which split(s) the rows go to.
#[derive(Clone, Debug, PartialEq)]
pub enum SplitPlan {
    /// Every row into one store of this name.
    Single(String),
    /// A seeded random division into train, val and test.
    Fractions { val: f64, test: f64, seed: u64 },
}

impl SplitPlan {
    /// `--split` alone, or the fractions (the other one defaulting to 0); not both.
    pub fn from_args(
        split: Option<String>,
        val: Option<f64>,
        test: Option<f64>,
        seed: u64,
    ) -> Result<Self> {
        match (split, val.is_some() || test.is_some()) {
            (Some(_), true) => {
                bail!("give either --split or --val-fraction/--test-fraction, not both")
            }
            (split, false) => Ok(SplitPlan::Single(split.unwrap_or_else(|| "train".into()))),
            (None, true) => Ok(SplitPlan::Fractions {
                val: val.unwrap_or(0.0),
                test: test.unwrap_or(0.0),
                seed,
            }),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// `file.npy`, `file.safetensors` or `file.safetensors:name` (rows × dim).
    pub features: String,
    /// Integer .npy (one class per row) or text (comma-separated labels per line).
    pub labels: Option<PathBuf>,
    /// One class name per line; default "0".."C-1".
    pub label_names: Option<PathBuf>,
    /// One image path per line; default `row-{i}`.
    pub paths: Option<PathBuf>,
    /// The feature set directory; stores go to `out/<split>`.
    pub out: PathBuf,
    pub plan: SplitPlan,
    pub shard_size: usize,
    pub dtype: FloatType,
    /// Rows read from the features file at a time.
    pub batch_rows: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SplitSummary {
    pub split: String,
    pub dir: PathBuf,
    pub rows: usize,
    pub dim: usize,
    pub dtype: FloatType,
    pub labels: LabelKind,
    pub classes: usize,
    pub shards: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImportSummary {
    pub splits: Vec<SplitSummary>,
}

/// `f32` | `f16` | `bf16`.
pub fn parse_dtype(text: &str) -> Result<FloatType> {
    match text {
        "f32" => Ok(FloatType::F32),
        "f16" => Ok(FloatType::F16),
        "bf16" => Ok(FloatType::Bf16),
        other => bail!("unknown dtype `{other}`; expected f32, f16 or bf16"),
    }
}

pub fn dtype_name(dtype: FloatType) -> &'static str {
    match dtype {
        FloatType::F32 => "f32",
        FloatType::F16 => "f16",
        FloatType::Bf16 => "bf16",
    }
}

pub fn import_features(opts: &ImportOptions) -> Result<ImportSummary> {
    ensure!(opts.shard_size > 0, "--shard-size must be > 0");
    ensure!(opts.batch_rows > 0, "batch rows must be > 0");
    let matrix = MatrixFile::open(&opts.features)?;
    let n = matrix.rows();
    ensure!(
        n <= u32::MAX as usize,
        "{}: {n} rows is more than a feature store indexes (2^32 - 1)",
        matrix.label()
    );
    let labels = load_labels(opts, &matrix)?;
    let label_names = load_label_names(opts, labels.as_ref())?;
    let paths = match &opts.paths {
        Some(p) => {
            let lines = read_lines(p, "paths")?;
            ensure!(
                lines.len() == n,
                "{} lists {} paths but {} has {n} rows",
                p.display(),
                lines.len(),
                matrix.label()
            );
            lines
        }
        None => (0..n).map(|i| format!("row-{i}")).collect(),
    };
    let (names, split_of) = assign_splits(&opts.plan, n)?;
    let _lock = crate::base::lock::lock_dir(&opts.out)?;
    for name in &names {
        let target = opts.out.join(name);
        ensure!(!target.exists(), "{}: already exists; not overwriting it", target.display());
    }
    let built = |staging: &Path| {
        build(opts, &matrix, labels.as_ref(), &label_names, &paths, &names, &split_of, staging)
    };
    if !opts.out.exists() {
        // A new feature set is built whole beside its place and renamed there once, so an
        // interruption leaves nothing (its staging is removed by the next command that locks it).
        let parent = parent_of(&opts.out);
        let name = opts.out.file_name().context("--out needs a directory name")?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.tmp-import", name.to_string_lossy()))
            .tempdir_in(parent)
            .with_context(|| {
                format!("cannot create a temporary directory in {}", parent.display())
            })?;
        let summary = built(staging.path())?;
        std::fs::rename(staging.keep(), &opts.out).with_context(|| {
            format!("cannot move the new feature set to {}", opts.out.display())
        })?;
        return Ok(summary);
    }
    // Into an existing feature set: each split renamed into place (all or nothing on errors).
    let staging =
        tempfile::Builder::new().prefix(".mono-import-").tempdir_in(&opts.out).with_context(
            || format!("cannot create a temporary directory in {}", opts.out.display()),
        )?;
    let summary = built(staging.path())?;
    move_into_place(staging.path(), &opts.out, &names)?;
    Ok(summary)
}

/// The directory `path` is in ("." for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn load_labels(opts: &ImportOptions, matrix: &MatrixFile) -> Result<Option<LabelFile>> {
    let Some(path) = &opts.labels else { return Ok(None) };
    let labels = read_labels(path)?;
    ensure!(
        labels.rows() == matrix.rows(),
        "{} holds labels for {} rows but {} has {} rows",
        path.display(),
        labels.rows(),
        matrix.label(),
        matrix.rows()
    );
    Ok(Some(labels))
}

fn load_label_names(opts: &ImportOptions, labels: Option<&LabelFile>) -> Result<Vec<String>> {
    let Some(labels) = labels else {
        ensure!(opts.label_names.is_none(), "--label-names needs --labels");
        return Ok(Vec::new());
    };
    let labels_path = opts.labels.as_deref().unwrap_or(Path::new("labels")).display().to_string();
    let max = labels.max_label();
    match &opts.label_names {
        Some(path) => {
            let names = read_lines(path, "label names")?;
            ensure!(!names.is_empty(), "{}: no label names", path.display());
            if let Some(i) = names.iter().position(|n| n.trim().is_empty()) {
                bail!("{}: line {} is an empty label name", path.display(), i + 1);
            }
            if let Some(max) = max {
                ensure!(
                    (max as usize) < names.len(),
                    "{labels_path} uses label {max} but {} lists only {} names",
                    path.display(),
                    names.len()
                );
            }
            Ok(names)
        }
        None => {
            let max = max.with_context(|| format!("{labels_path}: no row has a label"))?;
            Ok((0..=max).map(|c| c.to_string()).collect())
        }
    }
}

/// Split names (those with rows, in train/val/test order) and the split index of every row.
fn assign_splits(plan: &SplitPlan, n: usize) -> Result<(Vec<String>, Vec<u8>)> {
    match plan {
        SplitPlan::Single(name) => {
            ensure!(
                crate::base::config::is_plain_name(name) && !name.contains(['[', ':', ']']),
                "--split {name:?} must be a plain directory name (a split is read back by that name)"
            );
            Ok((vec![name.clone()], vec![0; n]))
        }
        &SplitPlan::Fractions { val, test, seed } => {
            for (flag, f) in [("--val-fraction", val), ("--test-fraction", test)] {
                ensure!(f.is_finite() && (0.0..1.0).contains(&f), "{flag} = {f} must be in [0, 1)");
            }
            ensure!(
                val + test < 1.0,
                "--val-fraction + --test-fraction = {} must be < 1",
                val + test
            );
            let n_test = (n as f64 * test).round() as usize;
            let n_val = ((n as f64 * val).round() as usize).min(n - n_test);
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut StdRng::seed_from_u64(seed));
            // 0 = train, 1 = val, 2 = test.
            let mut split_of = vec![0u8; n];
            for (i, &row) in order.iter().enumerate() {
                split_of[row] = if i < n_test {
                    2
                } else if i < n_test + n_val {
                    1
                } else {
                    0
                };
            }
            let counts = [n - n_test - n_val, n_val, n_test];
            let all = ["train", "val", "test"];
            let mut names = Vec::new();
            let mut index = [u8::MAX; 3];
            for s in 0..3 {
                if counts[s] > 0 {
                    index[s] = names.len() as u8;
                    names.push(all[s].to_string());
                }
            }
            Ok((names, split_of.into_iter().map(|s| index[s as usize]).collect()))
        }
    }
}

/// Writes every split into `staging/<split>`; `summary` names their final places in `opts.out`.
#[allow(clippy::too_many_arguments)]
fn build(
    opts: &ImportOptions,
    matrix: &MatrixFile,
    labels: Option<&LabelFile>,
    label_names: &[String],
    paths: &[String],
    names: &[String],
    split_of: &[u8],
    staging: &Path,
) -> Result<ImportSummary> {
    let kind = match labels {
        None => LabelKind::None,
        Some(LabelFile::Class(_)) => LabelKind::Class,
        Some(LabelFile::Multi { .. }) => LabelKind::Multi,
    };
    let mut writers = names
        .iter()
        .map(|name| {
            let mut info = StoreInfo::new(matrix.cols(), name);
            info.dtype = opts.dtype;
            info.labels = kind;
            info.label_names = label_names.to_vec();
            StoreWriter::create(&staging.join(name), info, opts.shard_size)
        })
        .collect::<Result<Vec<_>>>()?;

    let n = matrix.rows();
    let dim = matrix.cols();
    let bar = crate::base::progress::bar(n as u64, "importing");
    let mut batch = Vec::new();
    for start in (0..n).step_by(opts.batch_rows) {
        let end = (start + opts.batch_rows).min(n);
        matrix.read_rows(start, end, &mut batch)?;
        for (s, writer) in writers.iter_mut().enumerate() {
            let rows: Vec<usize> = (start..end).filter(|&r| split_of[r] as usize == s).collect();
            if rows.is_empty() {
                continue;
            }
            let mut features = Vec::with_capacity(rows.len() * dim);
            for &r in &rows {
                features.extend_from_slice(&batch[(r - start) * dim..(r - start + 1) * dim]);
            }
            let row_paths: Vec<String> = rows.iter().map(|&r| paths[r].clone()).collect();
            let push = match labels {
                None => writer.push(&features, BatchLabels::None, &row_paths),
                Some(LabelFile::Class(c)) => {
                    let ids: Vec<u32> = rows.iter().map(|&r| c[r]).collect();
                    writer.push(&features, BatchLabels::Class(&ids), &row_paths)
                }
                Some(LabelFile::Multi { offsets, values }) => {
                    let lists: Vec<Vec<u32>> =
                        rows.iter().map(|&r| values[offsets[r]..offsets[r + 1]].to_vec()).collect();
                    writer.push(&features, BatchLabels::Multi(&lists), &row_paths)
                }
            };
            push.with_context(|| format!("{}: cannot store rows {start}..{end}", matrix.label()))?;
        }
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();

    let mut summaries = Vec::new();
    for writer in writers {
        let manifest = writer.finish()?;
        let split = manifest.info.split.clone();
        summaries.push(SplitSummary {
            dir: opts.out.join(&split),
            split,
            rows: manifest.count,
            dim,
            dtype: opts.dtype,
            labels: kind,
            classes: label_names.len(),
            shards: manifest.shards.len(),
        });
    }
    Ok(ImportSummary { splits: summaries })
}

/// Renames `staging/<split>` to `out/<split>` for each split; if one fails, the ones already
/// moved are removed again, so the import is all or nothing.
fn move_into_place(staging: &Path, out: &Path, names: &[String]) -> Result<()> {
    let mut moved: Vec<PathBuf> = Vec::new();
    for name in names {
        let target = out.join(name);
        let step = if target.exists() {
            Err(anyhow::anyhow!(
                "{}: appeared during the import; not overwriting it",
                target.display()
            ))
        } else {
            std::fs::rename(staging.join(name), &target)
                .with_context(|| format!("cannot move the new store to {}", target.display()))
        };
        if let Err(e) = step {
            for dir in &moved {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(e);
        }
        moved.push(target);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_divide_every_row_once_and_skip_empty_splits() {
        let plan = SplitPlan::Fractions { val: 0.2, test: 0.1, seed: 3 };
        let (names, split_of) = assign_splits(&plan, 100).unwrap();
        assert_eq!(names, vec!["train", "val", "test"]);
        let count = |s: u8| split_of.iter().filter(|&&x| x == s).count();
        assert_eq!((count(0), count(1), count(2)), (70, 20, 10));
        assert_eq!(assign_splits(&plan, 100).unwrap().1, split_of, "seeded");

        let (names, split_of) =
            assign_splits(&SplitPlan::Fractions { val: 0.0, test: 0.25, seed: 1 }, 8).unwrap();
        assert_eq!(names, vec!["train", "test"]);
        assert_eq!(split_of.iter().filter(|&&x| x == 1).count(), 2);
    }

    #[test]
    fn rejects_bad_fractions_and_split_names() {
        assert!(assign_splits(&SplitPlan::Fractions { val: 0.6, test: 0.4, seed: 0 }, 10).is_err());
        assert!(assign_splits(&SplitPlan::Fractions { val: -0.1, test: 0.0, seed: 0 }, 10).is_err());
        assert!(assign_splits(&SplitPlan::Single("../x".into()), 10).is_err());
        assert!(SplitPlan::from_args(Some("val".into()), Some(0.1), None, 0).is_err());
        assert_eq!(
            SplitPlan::from_args(None, None, None, 0).unwrap(),
            SplitPlan::Single("train".into())
        );
    }
}
