//! ImageNet-1k (ILSVRC-2012) as laid out on disk by its usual distributions.
//!
//! Images: `root/<split>/`, or Kaggle's `root/ILSVRC/Data/CLS-LOC/<split>/`. A split directory is
//! either class folders (`train/n01440764/*.JPEG`, also a `val/` sorted into folders) or flat
//! files (`val/ILSVRC2012_val_00000001.JPEG`) with labels from, in this order:
//! - `root/LOC_<split>_solution.csv` (Kaggle): `ImageId,PredictionString`, the class is the first
//!   wnid of the prediction string ("n01751748 47 84 368 352 …");
//! - `root/<split>_labels.txt`: `<file name> <label>` per line, the label a wnid or a 0-based index
//!   into the sorted wnids (Caffe's `val.txt` convention; not the devkit's 1-based ILSVRC2012_ID,
//!   whose order differs).
//!
//! Class ids are the wnids in sorted order, as torchvision's `ImageFolder` gives on `train/`, so
//! ids agree with ImageNet-1k classifier heads. The wnids come from `root/LOC_synset_mapping.txt`
//! when present (lines "n01440764 tench, Tinca tinca"; its descriptions become the class names,
//! whole, since first synonyms repeat: two "crane"s, two "maillot"s), else from the class folders
//! of `train/` (so every split gets the same ids), else from the split itself. Without the mapping
//! the class names are the wnids. Item paths are relative to `root`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::files::FileDataset;
use super::folder::{list_class_folders, split_dir};
use super::walk::{image_files_flat, strip_image_extension, subdirectories};
use crate::data::store::LabelKind;

pub const SYNSET_MAPPING: &str = "LOC_synset_mapping.txt";
const KAGGLE_IMAGES: &str = "ILSVRC/Data/CLS-LOC";

pub fn open_imagenet(root: &Path, split: &str) -> Result<FileDataset> {
    ensure!(!split.is_empty() && split != ".", "imagenet needs a split name (train, val, …)");
    let base = if root.join(split).is_dir() || !root.join(KAGGLE_IMAGES).join(split).is_dir() {
        root.to_path_buf()
    } else {
        root.join(KAGGLE_IMAGES)
    };
    let (dir, rel) = split_dir(&base, split, "")?;
    let rel = base.strip_prefix(root).unwrap_or(Path::new("")).join(rel);
    let classes = Classes::find(root, &base, split)?;
    let folders = subdirectories(&dir)?;
    let set = if folders.is_empty() {
        from_flat_files(root, split, &dir, &rel, classes)?
    } else {
        from_class_folders(root, &dir, &rel, &folders, classes)?
    };
    set.ensure_not_empty(&dir)
}

/// The class list every split shares, when one can be found outside the split itself.
struct Classes {
    /// Sorted wnids.
    wnids: Option<Vec<String>>,
    /// `(wnid, description)` of the synset mapping, sorted.
    synsets: Option<Vec<(String, String)>>,
    /// Where the wnids came from, for messages.
    source: Option<PathBuf>,
}

impl Classes {
    fn find(root: &Path, base: &Path, split: &str) -> Result<Self> {
        let mapping = root.join(SYNSET_MAPPING);
        if let Some(synsets) = read_synset_mapping(&mapping)? {
            let wnids = synsets.iter().map(|(w, _)| w.clone()).collect();
            return Ok(Self { wnids: Some(wnids), synsets: Some(synsets), source: Some(mapping) });
        }
        let train = base.join("train");
        if split != "train" && train.is_dir() {
            let wnids = subdirectories(&train)?;
            if !wnids.is_empty() {
                return Ok(Self { wnids: Some(wnids), synsets: None, source: Some(train) });
            }
        }
        Ok(Self { wnids: None, synsets: None, source: None })
    }

    /// Names of `wnids` (the known list, or one found in the split): descriptions or the wnids.
    fn names(&self, wnids: &[String]) -> Vec<String> {
        match &self.synsets {
            Some(s) => s.iter().map(|(_, name)| name.clone()).collect(),
            None => wnids.to_vec(),
        }
    }

    fn source_or(&self, fallback: &Path) -> String {
        self.source.as_deref().unwrap_or(fallback).display().to_string()
    }
}

/// `dir/<wnid>/…` image files; the wnid of each folder must be a known class.
fn from_class_folders(
    root: &Path,
    dir: &Path,
    rel: &Path,
    folders: &[String],
    classes: Classes,
) -> Result<FileDataset> {
    let wnids = classes.wnids.clone().unwrap_or_else(|| folders.to_vec());
    let index = index_of(&wnids);
    let mut set = FileDataset::new(root, LabelKind::Class, classes.names(&wnids));
    for (folder, files) in folders.iter().zip(list_class_folders(dir, folders)?) {
        let id = *index.get(folder.as_str()).with_context(|| {
            format!(
                "{}: folder `{folder}` is not a class of {}",
                dir.display(),
                classes.source_or(dir)
            )
        })?;
        for file in files {
            set.push(rel.join(folder).join(file), &[id])?;
        }
    }
    Ok(set)
}

/// Image files directly in `dir`, labelled by the split's labels file.
fn from_flat_files(
    root: &Path,
    split: &str,
    dir: &Path,
    rel: &Path,
    classes: Classes,
) -> Result<FileDataset> {
    let (labels_file, labels) = read_flat_labels(root, split)?;
    let wnids = match &classes.wnids {
        Some(w) => w.clone(),
        None => wnids_of_labels(&labels_file, &labels)?,
    };
    let source = classes.source_or(&labels_file);
    let index = index_of(&wnids);
    let mut set = FileDataset::new(root, LabelKind::Class, classes.names(&wnids));
    for name in image_files_flat(dir)? {
        let label = labels.get(strip_image_extension(&name)).with_context(|| {
            format!(
                "{}: no label for this image in {}",
                dir.join(&name).display(),
                labels_file.display()
            )
        })?;
        let id = match label {
            Label::Wnid(w) => *index.get(w.as_str()).with_context(|| {
                format!("{}: wnid {w} of {name} is not a class of {source}", labels_file.display())
            })?,
            Label::Index(i) => {
                ensure!(
                    (*i as usize) < wnids.len(),
                    "{}: label {i} of {name} is past the {} classes of {source}",
                    labels_file.display(),
                    wnids.len()
                );
                *i
            }
        };
        set.push(rel.join(&name), &[id])?;
    }
    Ok(set)
}

/// `(wnid, description)` sorted by wnid, or None when the file is absent.
pub fn read_synset_mapping(path: &Path) -> Result<Option<Vec<(String, String)>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut synsets = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let line = line.trim();
        let (wnid, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let name = name.trim();
        synsets.push((
            wnid.to_string(),
            if name.is_empty() { wnid.to_string() } else { name.to_string() },
        ));
    }
    ensure!(!synsets.is_empty(), "{}: no synsets", path.display());
    synsets.sort();
    if let Some(w) = synsets.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("{}: wnid {} is listed twice", path.display(), w[0].0);
    }
    Ok(Some(synsets))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Label {
    Wnid(String),
    /// 0-based index into the sorted wnids.
    Index(u32),
}

/// Labels of a flat split by image name without extension, and the file they came from.
fn read_flat_labels(root: &Path, split: &str) -> Result<(PathBuf, HashMap<String, Label>)> {
    let csv_path = root.join(format!("LOC_{split}_solution.csv"));
    let txt_path = root.join(format!("{split}_labels.txt"));
    if csv_path.is_file() {
        let labels = read_solution_csv(&csv_path)?;
        Ok((csv_path, labels))
    } else if txt_path.is_file() {
        let labels = read_labels_txt(&txt_path)?;
        Ok((txt_path, labels))
    } else {
        bail!(
            "{}: split `{split}` has no class folders and no labels file ({} or {})",
            root.display(),
            csv_path.display(),
            txt_path.display()
        )
    }
}

fn read_solution_csv(path: &Path) -> Result<HashMap<String, Label>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header", path.display()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| format!("{}: no `{name}` column", path.display()))
    };
    let (id_col, pred_col) = (column("ImageId")?, column("PredictionString")?);
    let mut labels = HashMap::new();
    for (row, record) in reader.records().enumerate() {
        let line = row + 2;
        let record = record.with_context(|| format!("{}: line {line}", path.display()))?;
        let (id, prediction) =
            (record.get(id_col).unwrap_or("").trim(), record.get(pred_col).unwrap_or(""));
        let wnid = prediction
            .split_whitespace()
            .next()
            .with_context(|| format!("{}: line {line}: empty PredictionString", path.display()))?;
        ensure!(!id.is_empty(), "{}: line {line}: empty ImageId", path.display());
        insert_label(
            &mut labels,
            strip_image_extension(id),
            Label::Wnid(wnid.to_string()),
            path,
            line,
        )?;
    }
    Ok(labels)
}

fn read_labels_txt(path: &Path) -> Result<HashMap<String, Label>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut labels = HashMap::new();
    for (row, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line_no = row + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, label] = fields[..] else {
            bail!(
                "{}: line {line_no}: expected `<file name> <wnid or index>`, got {line:?}",
                path.display()
            );
        };
        let label = if label.bytes().all(|b| b.is_ascii_digit()) {
            Label::Index(label.parse().with_context(|| {
                format!("{}: line {line_no}: label {label} too large", path.display())
            })?)
        } else {
            Label::Wnid(label.to_string())
        };
        let key = Path::new(name).file_name().and_then(|n| n.to_str()).unwrap_or(name);
        insert_label(&mut labels, strip_image_extension(key), label, path, line_no)?;
    }
    Ok(labels)
}

fn insert_label(
    labels: &mut HashMap<String, Label>,
    key: &str,
    label: Label,
    path: &Path,
    line: usize,
) -> Result<()> {
    if let Some(old) = labels.insert(key.to_string(), label.clone()) {
        ensure!(
            old == label,
            "{}: line {line}: {key} is labelled twice, {old:?} and {label:?}",
            path.display()
        );
    }
    Ok(())
}

/// The sorted wnids a labels file uses; index labels need a class list from elsewhere.
fn wnids_of_labels(path: &Path, labels: &HashMap<String, Label>) -> Result<Vec<String>> {
    let mut wnids = BTreeSet::new();
    for label in labels.values() {
        match label {
            Label::Wnid(w) => {
                wnids.insert(w.clone());
            }
            Label::Index(_) => bail!(
                "{}: class indices need the class list: add {SYNSET_MAPPING} or a train/ split with class folders",
                path.display()
            ),
        }
    }
    Ok(wnids.into_iter().collect())
}

fn index_of(wnids: &[String]) -> HashMap<&str, u32> {
    wnids.iter().enumerate().map(|(i, w)| (w.as_str(), i as u32)).collect()
}
