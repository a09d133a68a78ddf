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
    /// The float types mono reads; None for the others (integers, bool, f8...).
    pub fn of_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F16 => Some(ElementType::F16),
            safetensors::Dtype::BF16 => Some(ElementType::BF16),
            safetensors::Dtype::F32 => Some(ElementType::F32),
            safetensors::Dtype::F64 => Some(ElementType::F64),
            _ => None,
        }
    }

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

    /// The bytes of rows `start..end`.
    fn row_bytes(&self, start: usize, end: usize) -> Result<&[u8]> {
        ensure!(
            start <= end && end <= self.rows,
            "{}: rows {start}..{end} out of range",
            self.label
        );
        let row = self.cols * self.dtype.size();
        let begin = self.data_offset + start * row;
        Ok(&self.mmap[begin..begin + (end - start) * row])
    }

    /// The error for a NaN/Inf at (row, column).
    fn non_finite(&self, row: usize, column: usize, value: f32) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: value at row {row}, column {column} is {value} (NaN/Inf are not allowed)",
            self.label
        )
    }

    /// Rows `start..end` as CSR, in one parallel pass over the file's bytes (each row decoded,
    /// checked finite and its non-zeros kept), or None as soon as more than `max_density` of the
    /// values are non-zero (the caller reads them densely instead).
    pub fn read_rows_sparse(
        &self,
        start: usize,
        end: usize,
        max_density: f64,
    ) -> Result<Option<crate::base::sparse::SparseBatch>> {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (size, cols) = (self.dtype.size(), self.cols);
        let bytes = self.row_bytes(start, end)?;
        let budget = (max_density * ((end - start) * cols) as f64) as usize;
        let kept = AtomicUsize::new(0);
        /// One row's non-zeros (columns, values); None once the batch turned out dense.
        type Row = Option<Result<(Vec<u32>, Vec<f32>)>>;
        let rows: Vec<Row> = bytes
            .par_chunks(cols * size)
            .enumerate()
            .map_init(
                || vec![0f32; cols],
                |row, (i, raw)| {
                    if kept.load(Ordering::Relaxed) > budget {
                        return None; // dense after all: stop early
                    }
                    decode_le(self.dtype, raw, row);
                    Some(crate::base::simd::vectorized!({
                        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
                            return Err(self.non_finite(start + i, c, row[c]));
                        }
                        let (mut columns, mut values) = (Vec::new(), Vec::new());
                        for (c, &v) in row.iter().enumerate() {
                            if v != 0.0 {
                                columns.push(c as u32);
                                values.push(v);
                            }
                        }
                        kept.fetch_add(values.len(), Ordering::Relaxed);
                        Ok((columns, values))
                    }))
                },
            )
            .collect();
        if kept.into_inner() > budget || rows.iter().any(Option::is_none) {
            return Ok(None);
        }
        let mut batch = crate::base::sparse::SparseBatch {
            row_offsets: Vec::with_capacity(rows.len() + 1),
            columns: Vec::new(),
            values: Vec::new(),
        };
        batch.row_offsets.push(0);
        for row in rows {
            let (columns, values) = row.expect("checked")?;
            batch.columns.extend_from_slice(&columns);
            batch.values.extend_from_slice(&values);
            batch.row_offsets.push(batch.columns.len());
        }
        Ok(Some(batch))
    }

    /// Rows `start..end` as f32 into `out`; NaN/Inf is an error naming the row and column.
    pub fn read_rows(&self, start: usize, end: usize, out: &mut Vec<f32>) -> Result<()> {
        let bytes = self.row_bytes(start, end)?;
        out.clear();
        decode_le_into(self.dtype, bytes, out);
        if let Some(pos) = out.iter().position(|v| !v.is_finite()) {
            return Err(self.non_finite(start + pos / self.cols, pos % self.cols, out[pos]));
        }
        Ok(())
    }
}

/// Appends little-endian values of `dtype` in `bytes` to `out` as f32.
pub fn decode_le_into(dtype: ElementType, bytes: &[u8], out: &mut Vec<f32>) {
    let old = out.len();
    out.resize(old + bytes.len() / dtype.size(), 0.0);
    decode_le(dtype, bytes, &mut out[old..]);
}

/// Decodes the little-endian values of `dtype` in `bytes` into `out` (as many) as f32. Aligned
/// f16/bf16 input goes through `half`'s slice conversion (F16C instructions where the CPU has
/// them): the store reader's inner loop.
pub fn decode_le(dtype: ElementType, bytes: &[u8], out: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        ElementType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        ElementType::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32;
            }
        }
        ElementType::F16 => match native_u16s(bytes) {
            Some(bits) => bits.reinterpret_cast::<f16>().convert_to_f32_slice(out),
            None => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        ElementType::BF16 => match native_u16s(bytes) {
            Some(bits) => bits.reinterpret_cast::<bf16>().convert_to_f32_slice(out),
            None => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
    }
}

/// `bytes` as u16 values when they are 2-byte aligned and the machine is little-endian.
fn native_u16s(bytes: &[u8]) -> Option<&[u16]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid u16; align_to only reinterprets the aligned middle.
    let (head, middle, tail) = unsafe { bytes.align_to::<u16>() };
    (head.is_empty() && tail.is_empty()).then_some(middle)
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
    let dtype = ElementType::of_safetensors(info.dtype).with_context(|| {
        format!("tensor `{tensor_name}` has dtype {:?}; expected f16, bf16, f32 or f64", info.dtype)
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice conversion (aligned input) and the per-value one (unaligned) both give
    /// `half`'s value for every f16 and bf16 bit pattern.
    #[test]
    fn aligned_and_unaligned_half_decoding_agree() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut buffer = vec![0u8; bytes.len() + 1];
        let odd = (buffer.as_ptr() as usize).is_multiple_of(2) as usize;
        buffer[odd..odd + bytes.len()].copy_from_slice(&bytes);
        let aligned = &bits_as_bytes(&bits);
        let unaligned = &buffer[odd..odd + bytes.len()];
        assert!(native_u16s(aligned).is_some() && native_u16s(unaligned).is_none());
        for dtype in [ElementType::F16, ElementType::BF16] {
            let expected = |b: u16| match dtype {
                ElementType::F16 => f16::from_bits(b).to_f32(),
                _ => bf16::from_bits(b).to_f32(),
            };
            for input in [aligned, unaligned] {
                let mut out = vec![0f32; bits.len()];
                decode_le(dtype, input, &mut out);
                for (&b, v) in bits.iter().zip(&out) {
                    let e = expected(b);
                    assert!(v.to_bits() == e.to_bits() || (v.is_nan() && e.is_nan()), "{b:#06x}");
                }
            }
        }
    }

    /// The u16 values' own memory, as bytes (2-byte aligned).
    fn bits_as_bytes(bits: &[u16]) -> &[u8] {
        // SAFETY: u8 has no alignment or validity requirements; same memory, twice the count.
        unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len() * 2) }
    }
}
