//! A 2-D array in a .safetensors or .npy file, memory-mapped and read in row batches as f32,
//! so that scoring a file of any size needs memory for one batch only.
//!
//! `path.safetensors:name` picks one tensor of several; a file holding one tensor needs no name.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementType {
    F16,
    BF16,
    F32,
    F64,
}

impl ElementType {
    pub fn size(self) -> usize {
        match self {
            ElementType::F16 | ElementType::BF16 => 2,
            ElementType::F32 => 4,
            ElementType::F64 => 8,
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElementType::F16 => "f16",
            ElementType::BF16 => "bf16",
            ElementType::F32 => "f32",
            ElementType::F64 => "f64",
        })
    }
}

/// A row-major matrix inside a memory-mapped file.
pub struct MatrixFile {
    /// What the user named, e.g. `acts.safetensors:latents`; used in every error.
    label: String,
    mmap: Mmap,
    data_offset: usize,
    rows: usize,
    cols: usize,
    dtype: ElementType,
}

impl fmt::Debug for MatrixFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MatrixFile({} {}×{} {})", self.label, self.rows, self.cols, self.dtype)
    }
}

impl MatrixFile {
    /// Opens `path` or `path:tensor_name`.
    pub fn open(spec: &str) -> Result<Self> {
        let (path, name) = split_spec(spec);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file truncated underneath us is the user's doing.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let is_npy = super::npy::is_npy(&mmap);
        let (data_offset, shape, dtype, label) = if is_npy {
            ensure!(name.is_none(), "{spec}: a .npy file holds one array; drop the `:name` suffix");
            let (offset, shape, dtype) = parse_npy_header(&mmap)
                .with_context(|| format!("{}: not a readable .npy file", path.display()))?;
            (offset, shape, dtype, path.display().to_string())
        } else {
            let (offset, shape, dtype, tensor) = locate_safetensors(&mmap, name.as_deref())
                .with_context(|| {
                    format!("{}: not a readable .safetensors or .npy file", path.display())
                })?;
            (offset, shape, dtype, format!("{}:{tensor}", path.display()))
        };
        ensure!(
            shape.len() == 2,
            "{label}: expected a 2-D array (rows × columns), found shape {shape:?}"
        );
        let (rows, cols) = (shape[0], shape[1]);
        ensure!(rows > 0 && cols > 0, "{label}: the array is empty (shape {shape:?})");
        let bytes = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()))
            .with_context(|| format!("{label}: shape {shape:?} overflows"))?;
        ensure!(
            data_offset + bytes <= mmap.len(),
            "{label}: file is truncated ({} data bytes, shape {shape:?} needs {bytes})",
            mmap.len().saturating_sub(data_offset)
        );
        Ok(Self { label, mmap, data_offset, rows, cols, dtype })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> ElementType {
        self.dtype
    }

    /// Rows `start..end` as f32 into `out`; NaN/Inf is an error naming the row and column.
    pub fn read_rows(&self, start: usize, end: usize, out: &mut Vec<f32>) -> Result<()> {
        ensure!(
            start <= end && end <= self.rows,
            "{}: rows {start}..{end} out of range",
            self.label
        );
        let size = self.dtype.size();
        let begin = self.data_offset + start * self.cols * size;
        let bytes = &self.mmap[begin..begin + (end - start) * self.cols * size];
        out.clear();
        decode_le_into(self.dtype, bytes, out);
        if let Some(pos) = out.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: value at row {}, column {} is {} (NaN/Inf are not allowed)",
                self.label,
                start + pos / self.cols,
                pos % self.cols,
                out[pos]
            );
        }
        Ok(())
    }
}

/// Appends little-endian values of `dtype` in `bytes` to `out` as f32.
pub fn decode_le_into(dtype: ElementType, bytes: &[u8], out: &mut Vec<f32>) {
    out.reserve(bytes.len() / dtype.size());
    match dtype {
        ElementType::F32 => {
            out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
        ElementType::F64 => {
            out.extend(bytes.chunks_exact(8).map(|b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }))
        }
        ElementType::F16 => {
            out.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        ElementType::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
    }
}

/// `a/b.safetensors:name` → (path, Some(name)) unless the whole string is an existing file.
fn split_spec(spec: &str) -> (PathBuf, Option<String>) {
    if !Path::new(spec).exists() {
        if let Some((path, name)) = spec.rsplit_once(':') {
            if !path.is_empty() && !name.is_empty() && !name.contains('/') {
                return (PathBuf::from(path), Some(name.to_string()));
            }
        }
    }
    (PathBuf::from(spec), None)
}

fn locate_safetensors(
    bytes: &[u8],
    name: Option<&str>,
) -> Result<(usize, Vec<usize>, ElementType, String)> {
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(bytes)?;
    let tensors = metadata.tensors();
    let tensor_name = match name {
        Some(n) => {
            ensure!(
                tensors.contains_key(n),
                "no tensor named `{n}`; it holds {}",
                list_names(tensors.keys())
            );
            n.to_string()
        }
        None => {
            ensure!(!tensors.is_empty(), "the file holds no tensor");
            ensure!(
                tensors.len() == 1,
                "it holds {} tensors ({}); pick one with `file.safetensors:name`",
                tensors.len(),
                list_names(tensors.keys())
            );
            tensors.keys().next().unwrap().clone()
        }
    };
    let info = &tensors[&tensor_name];
    let dtype = match info.dtype {
        safetensors::Dtype::F16 => ElementType::F16,
        safetensors::Dtype::BF16 => ElementType::BF16,
        safetensors::Dtype::F32 => ElementType::F32,
        safetensors::Dtype::F64 => ElementType::F64,
        other => {
            bail!("tensor `{tensor_name}` has dtype {other:?}; expected f16, bf16, f32 or f64")
        }
    };
    let offset = 8 + header_len + info.data_offsets.0;
    Ok((offset, info.shape.clone(), dtype, tensor_name))
}

fn list_names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut names: Vec<&str> = names.map(|s| s.as_str()).collect();
    names.sort();
    names.join(", ")
}

/// Data offset, shape and float dtype of an .npy file.
fn parse_npy_header(bytes: &[u8]) -> Result<(usize, Vec<usize>, ElementType)> {
    let header = super::npy::parse_header(bytes)?;
    let dtype = match header.descr.as_str() {
        "<f2" | "=f2" | "f2" => ElementType::F16,
        "<f4" | "=f4" | "f4" => ElementType::F32,
        "<f8" | "=f8" | "f8" => ElementType::F64,
        other => bail!(
            "dtype '{other}' is not supported; expected little-endian float16, float32 or float64"
        ),
    };
    Ok((header.data_offset, header.shape, dtype))
}
