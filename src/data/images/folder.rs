//! Any directory with one subdirectory per class, like torchvision's `ImageFolder`: class ids are
//! the subdirectory names in sorted order, items are the image files below each class folder
//! (nested folders allowed), class by class, each class's files sorted by relative path.
//!
//! The split is a subdirectory of `root` (`root/train/<class>/…`), or "." for `root` itself.
//! Item paths are relative to `root`, so they include the split folder. Files are picked by
//! extension and not opened: a broken one is still listed, and fails in `load`. A class folder
//! with no images keeps its id (so the ids of the others do not shift), as long as some class
//! has images. Train and eval split folders should hold the same class folders.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::files::FileDataset;
use super::walk::{image_files_nested, subdirectories};
use crate::data::store::LabelKind;

pub fn open_folder(root: &Path, split: &str) -> Result<FileDataset> {
    let (dir, prefix) =
        split_dir(root, split, "; use split \".\" for a folder without split subdirectories")?;
    let classes = subdirectories(&dir)?;
    ensure!(
        !classes.is_empty(),
        "{}: no class subdirectories (expected one folder per class)",
        dir.display()
    );
    let per_class = list_class_folders(&dir, &classes)?;
    let mut set = FileDataset::new(root, LabelKind::Class, classes.clone());
    for (id, (class, files)) in classes.iter().zip(per_class).enumerate() {
        for file in files {
            set.push(prefix.join(class).join(file), &[id as u32])?;
        }
    }
    set.ensure_not_empty(&dir)
}

/// The split's directory and its path relative to `root`; `hint` ends the error when it is absent.
pub(super) fn split_dir(root: &Path, split: &str, hint: &str) -> Result<(PathBuf, PathBuf)> {
    if split.is_empty() || split == "." {
        return Ok((root.to_path_buf(), PathBuf::new()));
    }
    ensure!(
        !split.contains(['/', '\\']) && split != "..",
        "split {split:?} must be a plain directory name"
    );
    let dir = root.join(split);
    if !dir.is_dir() {
        let present = subdirectories(root).unwrap_or_default();
        bail!(
            "{}: no split directory `{split}` (subdirectories: {}){hint}",
            root.display(),
            if present.is_empty() { "none".to_string() } else { present.join(", ") }
        );
    }
    Ok((dir, PathBuf::from(split)))
}

/// The image files below each `dir/<class>`, relative to that class folder; listed in parallel
/// (ImageNet has 1000 folders, often on a network file system).
pub(super) fn list_class_folders(dir: &Path, classes: &[String]) -> Result<Vec<Vec<PathBuf>>> {
    classes.par_iter().map(|class| image_files_nested(&dir.join(class))).collect()
}
