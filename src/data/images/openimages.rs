//! OpenImages V7 with its human-verified image-level labels: a multi-label set.
//!
//! Layout under `root` (the names of the official downloads):
//! - `images/<split>/<ImageID>.jpg`;
//! - labels: `labels/<split>-annotations-human-imagelabels-boxable.csv`, else
//!   `labels/oidv7-<split>-annotations-human-imagelabels.csv` (`ImageID,Source,LabelName,Confidence`);
//! - class names: `metadata/oidv7-class-descriptions.csv`, else `metadata/class-descriptions-boxable.csv`
//!   (`LabelName,DisplayName`; the boxable file has no header line).
//!
//! Splits: "train", "validation" ("val" is taken as "validation"), "test".
//!
//! Labels: only rows with Confidence 1 (a verified positive; 0 marks a verified absence). Class ids
//! are the MIDs of the class-description file in sorted order, all of them, whether or not the
//! split uses them: the ids then agree between splits, which ids taken from the labels of one split
//! would not. With the 600-class boxable descriptions, labels naming other classes are dropped,
//! which restricts the set to the boxable classes. Items are the images with at least one kept
//! label whose file is present, sorted by ImageID; images the CSV lists but that are missing on
//! disk are counted (`missing()`) and noted.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::files::FileDataset;
use super::walk::{image_files_flat, strip_image_extension};
use crate::data::store::LabelKind;

pub fn open_openimages(root: &Path, split: &str) -> Result<FileDataset> {
    let split = match split {
        "train" => "train",
        "validation" | "val" => "validation",
        "test" => "test",
        other => bail!("openimages has no split {other:?}; use train, validation (or val) or test"),
    };
    let labels_path = first_existing(&[
        root.join("labels").join(format!("{split}-annotations-human-imagelabels-boxable.csv")),
        root.join("labels").join(format!("oidv7-{split}-annotations-human-imagelabels.csv")),
    ])?;
    let descriptions_path = first_existing(&[
        root.join("metadata/oidv7-class-descriptions.csv"),
        root.join("metadata/class-descriptions-boxable.csv"),
    ])?;
    let (mids, names) = read_class_descriptions(&descriptions_path)?;
    let index: HashMap<&str, u32> =
        mids.iter().enumerate().map(|(i, m)| (m.as_str(), i as u32)).collect();
    let positives = read_positive_labels(&labels_path, &index)?;

    let image_dir = root.join("images").join(split);
    let on_disk: HashMap<String, String> = image_files_flat(&image_dir)?
        .into_iter()
        .map(|name| (strip_image_extension(&name).to_string(), name))
        .collect();
    let mut ids: Vec<&String> = positives.images.keys().collect();
    ids.sort();

    let mut set = FileDataset::new(root, LabelKind::Multi, names);
    let mut missing = 0;
    for id in ids {
        match on_disk.get(id.as_str()) {
            Some(name) => {
                set.push(PathBuf::from("images").join(split).join(name), &positives.images[id])?
            }
            None => missing += 1,
        }
    }
    if missing > 0 {
        let note = format!(
            "{missing} images with labels in {} are missing from {}",
            labels_path.display(),
            image_dir.display()
        );
        set.set_missing(missing, note);
    }
    if positives.dropped_labels > 0 {
        set.add_note(format!(
            "{} positive labels in {} name classes that {} does not list; dropped ({} images kept no label)",
            positives.dropped_labels,
            labels_path.display(),
            descriptions_path.display(),
            positives.emptied_images
        ));
    }
    set.ensure_not_empty(&image_dir)
}

fn first_existing(candidates: &[PathBuf]) -> Result<PathBuf> {
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => {
            let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            bail!("none of these files exists: {}", names.join(", "))
        }
    }
}

/// MIDs sorted, and the display name of each.
pub fn read_class_descriptions(path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut classes = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{}: line {}", path.display(), row + 1))?;
        let (mid, name) = (record.get(0).unwrap_or("").trim(), record.get(1).map(str::trim));
        if row == 0 && mid == "LabelName" {
            continue;
        }
        let name = name.with_context(|| {
            format!("{}: line {}: expected `LabelName,DisplayName`", path.display(), row + 1)
        })?;
        ensure!(!mid.is_empty(), "{}: line {}: empty LabelName", path.display(), row + 1);
        classes.push((mid.to_string(), name.to_string()));
    }
    ensure!(!classes.is_empty(), "{}: no classes", path.display());
    classes.sort();
    if let Some(w) = classes.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("{}: class {} is listed twice", path.display(), w[0].0);
    }
    Ok(classes.into_iter().unzip())
}

struct Positives {
    /// ImageID → sorted, distinct class ids (never empty).
    images: HashMap<String, Vec<u32>>,
    /// Confidence-1 rows whose class is not in the descriptions.
    dropped_labels: usize,
    /// Images whose every positive label was dropped.
    emptied_images: usize,
}

/// The Confidence-1 labels of every image, streamed (the train files have tens of millions of rows).
fn read_positive_labels(path: &Path, index: &HashMap<&str, u32>) -> Result<Positives> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader
        .byte_headers()
        .with_context(|| format!("{}: cannot read the header", path.display()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name.as_bytes())
            .with_context(|| format!("{}: no `{name}` column", path.display()))
    };
    let (id_col, label_col, conf_col) =
        (column("ImageID")?, column("LabelName")?, column("Confidence")?);
    let mut images: HashMap<String, Vec<u32>> = HashMap::new();
    let mut emptied: HashSet<String> = HashSet::new();
    let mut dropped_labels = 0;
    let mut record = csv::ByteRecord::new();
    let mut line = 1;
    loop {
        line += 1;
        let more = reader
            .read_byte_record(&mut record)
            .with_context(|| format!("{}: line {line}", path.display()))?;
        if !more {
            break;
        }
        let field = |col: usize| {
            std::str::from_utf8(record.get(col).unwrap_or(b""))
                .map(str::trim)
                .with_context(|| format!("{}: line {line}: not UTF-8", path.display()))
        };
        let confidence = field(conf_col)?;
        let positive = confidence == "1"
            || confidence.parse::<f64>().with_context(|| {
                format!(
                    "{}: line {line}: Confidence {confidence:?} is not a number",
                    path.display()
                )
            })? == 1.0;
        if !positive {
            continue;
        }
        let id = field(id_col)?;
        ensure!(!id.is_empty(), "{}: line {line}: empty ImageID", path.display());
        match index.get(field(label_col)?) {
            Some(&class) => {
                emptied.remove(id);
                images.entry(id.to_string()).or_default().push(class);
            }
            None => {
                dropped_labels += 1;
                if !images.contains_key(id) {
                    emptied.insert(id.to_string());
                }
            }
        }
    }
    for labels in images.values_mut() {
        labels.sort_unstable();
        labels.dedup();
    }
    Ok(Positives { images, dropped_labels, emptied_images: emptied.len() })
}
