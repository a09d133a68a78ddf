//! A set of image files under one root, with their labels: what the folder, ImageNet and
//! OpenImages readers build. Files are only listed at open; `load` reads and decodes one.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::RgbImage;

use super::decode::load_image_file;
use super::ImageDataset;
use crate::data::store::{LabelKind, Labels};

#[derive(Debug)]
pub struct FileDataset {
    root: PathBuf,
    /// Relative to `root`.
    files: Vec<PathBuf>,
    labels: Labels,
    class_names: Vec<String>,
    missing: usize,
    notes: Vec<String>,
}

impl FileDataset {
    /// An empty set of the given label kind (`Class` or `Multi`).
    pub fn new(root: &Path, kind: LabelKind, class_names: Vec<String>) -> Self {
        Self {
            root: root.to_path_buf(),
            files: Vec::new(),
            labels: Labels::empty(kind),
            class_names,
            missing: 0,
            notes: Vec::new(),
        }
    }

    /// Appends one item; every id must name a class.
    pub fn push(&mut self, file: PathBuf, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.class_names.len()) {
            anyhow::bail!(
                "{}: label {bad} but there are {} classes",
                file.display(),
                self.class_names.len()
            );
        }
        self.labels.push_row(ids)?;
        self.files.push(file);
        Ok(())
    }

    /// Records items left out because their file is absent, and a line saying so.
    pub fn set_missing(&mut self, count: usize, note: String) {
        self.missing = count;
        self.notes.push(note);
    }

    pub fn add_note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The directory item paths are relative to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuses a set without items, naming where it looked.
    pub fn ensure_not_empty(self, looked_in: &Path) -> Result<Self> {
        ensure!(
            !self.files.is_empty(),
            "{}: no image files found ({})",
            looked_in.display(),
            super::walk::IMAGE_EXTENSIONS.join(", ")
        );
        Ok(self)
    }
}

impl ImageDataset for FileDataset {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn path(&self, i: usize) -> String {
        let parts: Vec<_> =
            self.files[i].components().map(|c| c.as_os_str().to_string_lossy()).collect();
        parts.join("/")
    }

    fn labels(&self, i: usize) -> Vec<u32> {
        self.labels.row(i).to_vec()
    }

    fn label_kind(&self) -> LabelKind {
        self.labels.kind()
    }

    fn class_names(&self) -> &[String] {
        &self.class_names
    }

    fn load(&self, i: usize) -> Result<RgbImage> {
        ensure!(
            i < self.len(),
            "{}: item {i} out of range (the set has {})",
            self.root.display(),
            self.len()
        );
        load_image_file(&self.root.join(&self.files[i]))
    }

    fn missing(&self) -> usize {
        self.missing
    }

    fn notes(&self) -> &[String] {
        &self.notes
    }

    fn fingerprint(&self) -> Result<String> {
        let root = self
            .root
            .canonicalize()
            .with_context(|| format!("cannot resolve the data set root {}", self.root.display()))?;
        let mut fp = super::fingerprint_items(self, |i, fp| {
            fp.file_stat(&root.join(&self.files[i]));
        });
        Ok(fp.str(&root.display().to_string()).u64(self.missing as u64).finish())
    }
}
