//! Named tensors of a memory-mapped .safetensors file, decoded straight into f32 vectors.
//!
//! Each tensor is copied once, from the page cache into the vector its caller keeps (a
//! `Var::from_vec` on the CPU takes it without a copy). Reading the whole file and building
//! candle tensors from it made three or four copies of every weight, each a first touch of fresh
//! memory: on a VM whose page faults are slow, 1.3 s of loading a 50 MB SAE.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;

use super::matrix::{decode_le, ElementType};

/// Values decoded per parallel task: page faults of the output spread over the threads.
const CHUNK: usize = 1 << 16;
/// Output rows per task of the transposing read (a 64-row block of the output stays in L2).
const ROW_BLOCK: usize = 64;

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: safetensors::tensor::Metadata,
}

impl SafetensorsFile {
    /// Maps `path` and checks its header (every tensor's offsets inside the file).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        // SAFETY: the map is read-only; a file truncated underneath us is the user's doing.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
            .with_context(|| format!("{}: not a readable .safetensors file", path.display()))?;
        Ok(Self { path: path.to_path_buf(), mmap, data_start: 8 + header_len, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shape of tensor `name`, None when the file has no such tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.metadata.info(name).map(|info| info.shape.as_slice())
    }

    /// Tensor `name`'s bytes and element type; errors name the file and the tensor.
    fn raw(&self, name: &str) -> Result<(&[u8], ElementType)> {
        let info = self
            .metadata
            .info(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))?;
        let dtype = ElementType::of_safetensors(info.dtype).with_context(|| {
            format!(
                "{}: tensor `{name}` has dtype {:?}; expected f16, bf16, f32 or f64",
                self.path.display(),
                info.dtype
            )
        })?;
        let (begin, end) = info.data_offsets;
        Ok((&self.mmap[self.data_start + begin..self.data_start + end], dtype))
    }

    /// Tensor `name`'s values as f32, in the file's (row-major) order.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (bytes, dtype) = self.raw(name)?;
        let n = bytes.len() / dtype.size();
        let size = dtype.size();
        // Written once: decode_le writes every element of its chunk.
        Ok(crate::base::cpu::par_filled(n, CHUNK, |c, chunk| {
            decode_le(dtype, &bytes[c * CHUNK * size..][..chunk.len() * size], chunk)
        }))
    }

    /// The 2-D tensor `name` (R × C) transposed: C × R values as f32, row-major.
    pub fn read_f32_transposed(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        let (bytes, dtype) = self.raw(name)?;
        anyhow::ensure!(
            shape.len() == 2,
            "{}: tensor `{name}` has shape {shape:?}; expected a 2-D one",
            self.path.display()
        );
        let (rows, cols) = (shape[0], shape[1]);
        let size = dtype.size();
        let mut out = vec![0f32; rows * cols];
        if rows == 0 {
            return Ok(out);
        }
        out.par_chunks_mut(ROW_BLOCK * rows).enumerate().for_each(|(b, block)| {
            // Output rows c0.. are input columns c0..: each input row gives one value to each.
            let c0 = b * ROW_BLOCK;
            let width = block.len() / rows;
            let mut column_values = vec![0f32; width];
            for r in 0..rows {
                let raw = &bytes[(r * cols + c0) * size..][..width * size];
                decode_le(dtype, raw, &mut column_values);
                for (i, &v) in column_values.iter().enumerate() {
                    block[i * rows + r] = v;
                }
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;

    #[test]
    fn reads_and_transposes_what_candle_wrote_in_every_float_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        // 70 × 150: more columns than one row block, a partial last block, > one CHUNK of values
        // once repeated below.
        let (r, c) = (70usize, 150usize);
        let values: Vec<f32> = (0..r * c).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let big: Vec<f32> = (0..3 * CHUNK + 5).map(|i| i as f32).collect();
        let t = Tensor::from_vec(values.clone(), (r, c), &Device::Cpu).unwrap();
        let mut tensors = HashMap::new();
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            tensors.insert(format!("{dtype:?}"), t.to_dtype(dtype).unwrap());
        }
        tensors
            .insert("big".into(), Tensor::from_vec(big.clone(), big.len(), &Device::Cpu).unwrap());
        tensors.insert("ints".into(), Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.read_f32("big").unwrap(), big);
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let name = format!("{dtype:?}");
            assert_eq!(file.shape(&name), Some(&[r, c][..]));
            // The reference: candle's own conversion of the same tensor.
            let expected = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let plain = file.read_f32(&name).unwrap();
            assert_eq!(plain, expected.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let transposed = file.read_f32_transposed(&name).unwrap();
            let expected_t = expected.t().unwrap().contiguous().unwrap();
            assert_eq!(transposed, expected_t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let err = file.read_f32("ints").unwrap_err().to_string();
        assert!(err.contains("t.safetensors") && err.contains("`ints`"), "{err}");
        let err = file.read_f32("nope").unwrap_err().to_string();
        assert!(err.contains("missing tensor `nope`"), "{err}");
        assert!(file.read_f32_transposed("big").is_err());
        assert_eq!(file.shape("nope"), None);

        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("t.safetensors") && err.contains("not a readable"), "{err}");
    }
}
