//! The idx format of MNIST and Fashion-MNIST (`*-images-idx3-ubyte`, `*-labels-idx1-ubyte`),
//! gzipped or not: a big-endian magic number (0, 0, type 0x08 = unsigned byte, number of
//! dimensions), one big-endian u32 per dimension, then the bytes.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// Class names of Fashion-MNIST, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Grey-scale images, `count` × `rows` × `cols` bytes, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i` (rows × cols).
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.rows * self.cols;
        &self.pixels[i * size..(i + 1) * size]
    }
}

/// Reads an `idx3-ubyte` image file (`.gz` or plain).
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let bytes = read_maybe_gzip(path)?;
    let (dims, data) = parse_idx(&bytes, 3)
        .with_context(|| format!("{}: not an idx3-ubyte image file", path.display()))?;
    Ok(IdxImages { count: dims[0], rows: dims[1], cols: dims[2], pixels: data.to_vec() })
}

/// Reads an `idx1-ubyte` label file (`.gz` or plain).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gzip(path)?;
    let (_, data) = parse_idx(&bytes, 1)
        .with_context(|| format!("{}: not an idx1-ubyte label file", path.display()))?;
    Ok(data.to_vec())
}

/// Images and their labels, checked to be the same count.
pub fn read_idx_pair(images: &Path, labels: &Path) -> Result<(IdxImages, Vec<u8>)> {
    let imgs = read_idx_images(images)?;
    let lbls = read_idx_labels(labels)?;
    ensure!(
        imgs.count == lbls.len(),
        "{} holds {} images but {} holds {} labels",
        images.display(),
        imgs.count,
        labels.display(),
        lbls.len()
    );
    Ok((imgs, lbls))
}

/// The whole file, gunzipped when it starts with the gzip magic bytes.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .with_context(|| format!("{}: corrupt or truncated gzip data", path.display()))?;
    Ok(out)
}

/// Dimensions and data of an unsigned-byte idx array with `ndim` dimensions; the data must be
/// exactly as long as the dimensions say.
fn parse_idx(bytes: &[u8], ndim: usize) -> Result<(Vec<usize>, &[u8])> {
    ensure!(bytes.len() >= 4, "file is {} bytes, too short for the idx magic number", bytes.len());
    ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "bad magic number {:02x?} (expected 00 00 08 0{ndim})",
        &bytes[..4]
    );
    if bytes[2] != 0x08 {
        bail!("element type 0x{:02x} is not supported; expected 0x08 (unsigned byte)", bytes[2]);
    }
    ensure!(
        bytes[3] as usize == ndim,
        "holds a {}-dimensional array; expected {ndim} dimensions",
        bytes[3]
    );
    let header = 4 + 4 * ndim;
    ensure!(bytes.len() >= header, "truncated header ({} bytes, {header} needed)", bytes.len());
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let size = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .context("dimensions overflow")?;
    let data = &bytes[header..];
    ensure!(
        data.len() >= size,
        "truncated: dimensions {dims:?} need {size} bytes but {} follow the header",
        data.len()
    );
    ensure!(
        data.len() == size,
        "{} unexpected bytes after the {size} that dimensions {dims:?} need",
        data.len() - size
    );
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(ndim: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, ndim];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn parses_a_small_array() {
        let bytes = idx(3, &[2, 1, 3], &[1, 2, 3, 4, 5, 6]);
        let (dims, data) = parse_idx(&bytes, 3).unwrap();
        assert_eq!(dims, vec![2, 1, 3]);
        assert_eq!(data, &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_bad_magic_type_dims_and_lengths() {
        let e = |b: Vec<u8>, n| parse_idx(&b, n).unwrap_err().to_string();
        assert!(e(vec![1, 0, 8, 1, 0, 0, 0, 0], 1).contains("magic"));
        assert!(e(vec![0, 0, 9, 1, 0, 0, 0, 0], 1).contains("element type"));
        assert!(e(idx(1, &[2], &[0, 1]), 3).contains("1-dimensional"));
        assert!(e(idx(1, &[3], &[0, 1]), 1).contains("truncated"));
        assert!(e(idx(1, &[1], &[0, 1]), 1).contains("unexpected bytes"));
        assert!(e(vec![0, 0, 8, 3, 0], 3).contains("truncated header"));
        assert!(e(vec![0, 0], 1).contains("too short"));
    }
}
