//! `split[a:b]`: a contiguous range of another split's items (Python slice syntax without
//! steps; either bound may be omitted), e.g. `test[0:8000]` and `test[8000:]`.

use anyhow::{bail, ensure, Context, Result};

use super::ImageDataset;
use crate::data::store::LabelKind;

/// The bounds of `[a:b]`, each optional.
pub type Bounds = (Option<usize>, Option<usize>);

/// Splits `name[a:b]` into the split name and the optional bounds.
pub fn parse(split: &str) -> Result<(&str, Option<Bounds>)> {
    let Some(open) = split.find('[') else { return Ok((split, None)) };
    let inner = split[open + 1..]
        .strip_suffix(']')
        .with_context(|| format!("split {split:?}: expected name[a:b]"))?;
    let Some((a, b)) = inner.split_once(':') else { bail!("split {split:?}: expected name[a:b]") };
    let bound = |t: &str| -> Result<Option<usize>> {
        let t = t.trim();
        if t.is_empty() {
            Ok(None)
        } else {
            Ok(Some(
                t.parse().with_context(|| format!("split {split:?}: `{t}` is not a row index"))?,
            ))
        }
    };
    Ok((&split[..open], Some((bound(a)?, bound(b)?))))
}

pub struct Slice {
    inner: Box<dyn ImageDataset>,
    start: usize,
    len: usize,
}

impl Slice {
    pub fn new(
        inner: Box<dyn ImageDataset>,
        start: Option<usize>,
        end: Option<usize>,
        split: &str,
    ) -> Result<Self> {
        let n = inner.len();
        let (start, end) = (start.unwrap_or(0), end.unwrap_or(n).min(n));
        ensure!(start < end, "split {split:?}: the range is empty (the split has {n} items)");
        Ok(Self { inner, start, len: end - start })
    }
}

impl ImageDataset for Slice {
    fn len(&self) -> usize {
        self.len
    }

    fn path(&self, i: usize) -> String {
        self.inner.path(self.start + i)
    }

    fn labels(&self, i: usize) -> Vec<u32> {
        self.inner.labels(self.start + i)
    }

    fn label_kind(&self) -> LabelKind {
        self.inner.label_kind()
    }

    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }

    fn load(&self, i: usize) -> Result<image::RgbImage> {
        self.inner.load(self.start + i)
    }

    fn fingerprint(&self) -> Result<String> {
        let whole = self.inner.fingerprint()?;
        Ok(crate::base::fingerprint::Fingerprint::new()
            .str(&whole)
            .u64(self.start as u64)
            .u64(self.len as u64)
            .finish())
    }
}
