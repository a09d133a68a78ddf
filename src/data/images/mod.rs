//! Image data sets behind one trait: the readers list items (identity, labels) at open time and
//! decode one item at a time, so the extraction loop can decode in parallel and skip broken files.
//!
//! Every reader hands out 8-bit RGB (`decode::to_rgb8` says how other pixel formats are converted)
//! and lists its items in a fixed, sorted order, so item `i` is the same image on every run.

mod cifar;
mod decode;
mod files;
mod folder;
mod imagenet;
mod jpeg;
mod memory;
mod mnist;
mod openimages;
mod slice;
mod split;
mod walk;

use std::path::Path;

use anyhow::{bail, Context, Result};

pub use decode::{decode_image_bytes, load_image_file, to_rgb8, DECODING};
pub use files::FileDataset;
pub use jpeg::is_jpeg;
pub use memory::{MemoryDataset, PixelLayout};
pub use walk::{is_image_file, IMAGE_EXTENSIONS};

use crate::base::config::DatasetKind;
use crate::base::fingerprint::Fingerprint;
use crate::data::store::LabelKind;

pub trait ImageDataset: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Identity of item i written into the feature store: a file path relative to the data set
    /// root ('/'-separated), or `<set>/<split>/<index>` for sets held in one file (e.g.
    /// "cifar10/test/000123").
    fn path(&self, i: usize) -> String;

    /// Class ids of item i: exactly one for single-label sets, any number for OpenImages.
    fn labels(&self, i: usize) -> Vec<u32>;

    /// `Class` (one id per item) or `Multi`.
    fn label_kind(&self) -> LabelKind;

    /// Name of every class id.
    fn class_names(&self) -> &[String];

    /// Decodes item i as an 8-bit RGB image. Errors (unreadable/corrupt file) name the path; the
    /// caller skips such items and counts them, so this never panics.
    fn load(&self, i: usize) -> Result<image::RgbImage>;

    /// Items the data set's index lists but that were left out at open because their file is
    /// absent (OpenImages); 0 for the others.
    fn missing(&self) -> usize {
        0
    }

    /// What open left out or assumed, one line each, for the caller to show.
    fn notes(&self) -> &[String] {
        &[]
    }

    /// A fingerprint of what the items come from (docs/reliability.md): every item's identity
    /// and labels and the class names (all that the data set's index or metadata files gave),
    /// plus, for image files, the canonical root and each file's size and modification time,
    /// and for sets held in memory, their pixels.
    fn fingerprint(&self) -> Result<String>;
}

/// The identity of the data a stage reads (docs/reliability.md): the data set kind, its
/// canonical root, and each split's fingerprint.
pub fn data_identity(kind: DatasetKind, root: &Path, splits: &[&str]) -> Result<serde_json::Value> {
    let canonical = root.canonicalize().with_context(|| {
        format!("data.root = {:?}: cannot resolve it", root.display().to_string())
    })?;
    let mut identity = serde_json::json!({"kind": kind, "root": canonical.display().to_string()});
    for &split in splits {
        let dataset = open_dataset(kind, root, split).with_context(|| {
            format!("data.root = {:?}, split {split:?}", root.display().to_string())
        })?;
        identity["splits"][split] = dataset.fingerprint()?.into();
    }
    Ok(identity)
}

/// `dataset`'s items (identity, labels, and whatever `per_item` adds) and class names, hashed in
/// parallel blocks of items.
pub fn fingerprint_items(
    dataset: &dyn ImageDataset,
    per_item: impl Fn(usize, &mut Fingerprint) + Sync,
) -> Fingerprint {
    use rayon::prelude::*;
    const BLOCK: usize = 4096;
    let n = dataset.len();
    let blocks: Vec<String> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut fp = Fingerprint::new();
            for i in b * BLOCK..((b + 1) * BLOCK).min(n) {
                fp.str(&dataset.path(i)).u32s(&dataset.labels(i));
                per_item(i, &mut fp);
            }
            fp.finish()
        })
        .collect();
    let mut fp = Fingerprint::new();
    fp.u64(n as u64).str(&format!("{:?}", dataset.label_kind()));
    for name in dataset.class_names() {
        fp.str(name);
    }
    for block in &blocks {
        fp.str(block);
    }
    fp
}

/// Opens split `split` of the data set of `kind` under `root`.
///
/// | kind | splits | layout under `root` |
/// | --- | --- | --- |
/// | folder | any subdirectory name, or "." for `root` itself | `<split>/<class>/**/<image>` |
/// | imagenet | train, val, or any other subdirectory | `<split>/<wnid>/*.JPEG`, or flat `val/` + labels file |
/// | openimages | train, validation (alias val), test | `images/<split>/<ImageID>.jpg` + `labels/`, `metadata/` CSVs |
/// | cifar10, cifar100 | train, test (aliases val, validation) | extracted batches or the original `.tar.gz` |
/// | mnist, fashion_mnist | train, test (aliases val, validation) | idx files, gzipped or not |
pub fn open_dataset(kind: DatasetKind, root: &Path, split: &str) -> Result<Box<dyn ImageDataset>> {
    let (name, range) = slice::parse(split)?;
    let whole = open_whole(kind, root, name)?;
    Ok(match range {
        Some((start, end)) => Box::new(slice::Slice::new(whole, start, end, split)?),
        None => whole,
    })
}

fn open_whole(kind: DatasetKind, root: &Path, split: &str) -> Result<Box<dyn ImageDataset>> {
    anyhow::ensure!(root.exists(), "data set root {} does not exist", root.display());
    Ok(match kind {
        DatasetKind::Folder => Box::new(folder::open_folder(root, split)?),
        DatasetKind::Imagenet => Box::new(imagenet::open_imagenet(root, split)?),
        DatasetKind::Openimages => Box::new(openimages::open_openimages(root, split)?),
        DatasetKind::Cifar10 => Box::new(cifar::open_cifar(cifar::Cifar::Ten, root, split)?),
        DatasetKind::Cifar100 => Box::new(cifar::open_cifar(cifar::Cifar::Hundred, root, split)?),
        DatasetKind::FashionMnist => {
            Box::new(mnist::open_mnist(mnist::Mnist::Fashion, root, split)?)
        }
        DatasetKind::Mnist => Box::new(mnist::open_mnist(mnist::Mnist::Digits, root, split)?),
    })
}

/// Single-label classes of every item, checked against the class count.
pub fn class_labels(dataset: &dyn ImageDataset) -> Result<Vec<u32>> {
    let n_classes = dataset.class_names().len();
    (0..dataset.len())
        .map(|i| match dataset.labels(i).as_slice() {
            [c] if (*c as usize) < n_classes => Ok(*c),
            [c] => bail!("{}: class {c} is outside the {n_classes} classes", dataset.path(i)),
            other => bail!(
                "{}: a classifier needs exactly one class per image, found {other:?}",
                dataset.path(i)
            ),
        })
        .collect()
}
