//! MNIST and Fashion-MNIST from their idx files (read by `crate::data::idx`), held in memory.
//!
//! Files: `train-images-idx3-ubyte` + `train-labels-idx1-ubyte` and `t10k-…` for the test split,
//! each plain or `.gz`, also under the `.idx3-ubyte` spelling some mirrors use; looked for in
//! `root` and in torchvision's `root/<MNIST|FashionMNIST>/raw/`. Splits: "train", "test"
//! ("val"/"validation" = "test").

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::memory::{MemoryDataset, PixelLayout};
use super::split::train_or_test;
use crate::data::idx::{read_idx_pair, FASHION_MNIST_CLASSES};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mnist {
    Digits,
    Fashion,
}

impl Mnist {
    /// The path prefix of items, as the config spells the kind.
    fn set_name(self) -> &'static str {
        match self {
            Mnist::Digits => "mnist",
            Mnist::Fashion => "fashion_mnist",
        }
    }

    fn torchvision_dir(self) -> &'static str {
        match self {
            Mnist::Digits => "MNIST",
            Mnist::Fashion => "FashionMNIST",
        }
    }

    fn class_names(self) -> Vec<String> {
        match self {
            Mnist::Digits => (0..10).map(|d| d.to_string()).collect(),
            Mnist::Fashion => FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

pub fn open_mnist(which: Mnist, root: &Path, split: &str) -> Result<MemoryDataset> {
    let set = which.set_name();
    let split = train_or_test(set, split)?;
    let prefix = if split == "train" { "train" } else { "t10k" };
    let dirs = [root.to_path_buf(), root.join(which.torchvision_dir()).join("raw")];
    let images = find_file(&dirs, prefix, "images", "idx3")?;
    let labels = find_file(&dirs, prefix, "labels", "idx1")?;
    let (images, labels) = read_idx_pair(&images, &labels)?;
    let size = (images.cols as u32, images.rows as u32);
    let labels = labels.into_iter().map(u32::from).collect();
    MemoryDataset::new(
        set,
        split,
        PixelLayout::Grey,
        size,
        images.pixels,
        labels,
        which.class_names(),
    )
}

/// The first existing spelling of `<prefix>-<what>-<idx>-ubyte[.gz]` in `dirs`.
fn find_file(dirs: &[PathBuf], prefix: &str, what: &str, idx: &str) -> Result<PathBuf> {
    let names = [
        format!("{prefix}-{what}-{idx}-ubyte.gz"),
        format!("{prefix}-{what}-{idx}-ubyte"),
        format!("{prefix}-{what}.{idx}-ubyte.gz"),
        format!("{prefix}-{what}.{idx}-ubyte"),
    ];
    for dir in dirs {
        for name in &names {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    bail!("{}: no {}[.gz] (also looked in {})", dirs[0].display(), names[1], dirs[1].display())
}
