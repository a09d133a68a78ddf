//! CIFAR-10 and CIFAR-100, 32×32 RGB, held in memory (a train split is 50,000 × 3072 bytes).
//!
//! Read from any of the four original distributions, extracted under `root` or as the archive
//! itself (read straight from the `.tar.gz`, decompressed once), looked for in this order:
//!
//! | set | binary | python pickle |
//! | --- | --- | --- |
//! | CIFAR-10 | `cifar-10-batches-bin/` or `cifar-10-binary.tar.gz`: `data_batch_1..5.bin`, `test_batch.bin`, `batches.meta.txt` | `cifar-10-batches-py/` or `cifar-10-python.tar.gz`: `data_batch_1..5`, `test_batch`, `batches.meta` |
//! | CIFAR-100 | `cifar-100-binary/` or `cifar-100-binary.tar.gz`: `train.bin`, `test.bin`, `fine_label_names.txt` | `cifar-100-python/` or `cifar-100-python.tar.gz`: `train`, `test`, `meta` |
//!
//! Extracted directories win over archives, binary over pickle; `root` may also be the extracted
//! directory or the archive file itself. CIFAR-100 uses the 100 fine labels. Splits: "train",
//! "test" ("val"/"validation" = "test"). Item i of the train split is record i of the batches
//! taken in order.

mod binary;
mod pickle;
mod source;

use std::path::Path;

use anyhow::{ensure, Result};

use self::source::{locate, Format};
use super::memory::{MemoryDataset, PixelLayout};
use super::split::train_or_test;

/// Bytes of one 32×32 RGB image: the red plane, the green plane, the blue plane.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

impl Cifar {
    fn set_name(self) -> &'static str {
        match self {
            Cifar::Ten => "cifar10",
            Cifar::Hundred => "cifar100",
        }
    }

    fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred => 100,
        }
    }

    /// Directory inside the archive (and when extracted), and the archive's file name.
    fn names(self, format: Format) -> (&'static str, &'static str) {
        match (self, format) {
            (Cifar::Ten, Format::Binary) => ("cifar-10-batches-bin", "cifar-10-binary.tar.gz"),
            (Cifar::Ten, Format::Pickle) => ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
            (Cifar::Hundred, Format::Binary) => ("cifar-100-binary", "cifar-100-binary.tar.gz"),
            (Cifar::Hundred, Format::Pickle) => ("cifar-100-python", "cifar-100-python.tar.gz"),
        }
    }

    /// The batch files of a split ("train" or "test").
    fn batches(self, format: Format, split: &str) -> Vec<String> {
        let ext = if format == Format::Binary { ".bin" } else { "" };
        match (self, split) {
            (Cifar::Ten, "train") => (1..=5).map(|b| format!("data_batch_{b}{ext}")).collect(),
            (Cifar::Ten, _) => vec![format!("test_batch{ext}")],
            (Cifar::Hundred, split) => vec![format!("{split}{ext}")],
        }
    }

    /// The file of class names.
    fn meta(self, format: Format) -> &'static str {
        match (self, format) {
            (Cifar::Ten, Format::Binary) => "batches.meta.txt",
            (Cifar::Ten, Format::Pickle) => "batches.meta",
            (Cifar::Hundred, Format::Binary) => "fine_label_names.txt",
            (Cifar::Hundred, Format::Pickle) => "meta",
        }
    }
}

pub fn open_cifar(which: Cifar, root: &Path, split: &str) -> Result<MemoryDataset> {
    let set = which.set_name();
    let split = train_or_test(set, split)?;
    let source = locate(which, root)?;
    let format = source.format;
    let batches = which.batches(format, split);
    let mut wanted: Vec<&str> = batches.iter().map(String::as_str).collect();
    wanted.push(which.meta(format));
    let mut members = source.read(&wanted)?;
    let meta = members.pop().expect("one member per wanted name");

    let class_names = match (which, format) {
        (_, Format::Binary) => binary::parse_label_names(&meta.bytes, &meta.name)?,
        (Cifar::Ten, Format::Pickle) => {
            pickle::parse_label_names(&meta.bytes, "label_names", &meta.name)?
        }
        (Cifar::Hundred, Format::Pickle) => {
            pickle::parse_label_names(&meta.bytes, "fine_label_names", &meta.name)?
        }
    };
    ensure!(
        class_names.len() == which.classes(),
        "{}: {} class names; {set} has {}",
        meta.name,
        class_names.len(),
        which.classes()
    );

    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for member in members {
        let (p, l) = match (which, format) {
            (Cifar::Ten, Format::Binary) => {
                binary::parse_records(&member.bytes, 1, 0, &member.name)?
            }
            // Coarse label byte, then the fine one.
            (Cifar::Hundred, Format::Binary) => {
                binary::parse_records(&member.bytes, 2, 1, &member.name)?
            }
            (Cifar::Ten, Format::Pickle) => {
                pickle::parse_batch(&member.bytes, "labels", &member.name)?
            }
            (Cifar::Hundred, Format::Pickle) => {
                pickle::parse_batch(&member.bytes, "fine_labels", &member.name)?
            }
        };
        if let Some(bad) = l.iter().find(|&&x| x as usize >= class_names.len()) {
            anyhow::bail!(
                "{}: label {bad}, but {set} has {} classes",
                member.name,
                class_names.len()
            );
        }
        pixels.extend_from_slice(&p);
        labels.extend_from_slice(&l);
    }
    MemoryDataset::new(set, split, PixelLayout::PlanarRgb, (32, 32), pixels, labels, class_names)
}
