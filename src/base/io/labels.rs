//! Per-row labels and names in plain files: a 1-D integer .npy (one class per row), a text file of
//! comma-separated integers (multi-label, one line per row), and one-item-per-line text files.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// Labels read from a file, one entry per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelFile {
    /// One class id per row.
    Class(Vec<u32>),
    /// Row i holds `values[offsets[i]..offsets[i + 1]]`; `offsets` has rows + 1 entries.
    Multi { offsets: Vec<usize>, values: Vec<u32> },
}

impl LabelFile {
    pub fn rows(&self) -> usize {
        match self {
            LabelFile::Class(v) => v.len(),
            LabelFile::Multi { offsets, .. } => offsets.len() - 1,
        }
    }

    /// The largest label, if any row has one.
    pub fn max_label(&self) -> Option<u32> {
        match self {
            LabelFile::Class(v) => v.iter().copied().max(),
            LabelFile::Multi { values, .. } => values.iter().copied().max(),
        }
    }
}

/// An integer .npy is class labels; anything else is read as multi-label text.
pub fn read_labels(path: &Path) -> Result<LabelFile> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read labels {}", path.display()))?;
    if super::npy::is_npy(&bytes) {
        let labels = parse_npy_labels(&bytes)
            .with_context(|| format!("{}: not a readable label .npy", path.display()))?;
        Ok(LabelFile::Class(labels))
    } else {
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            anyhow::anyhow!("{}: neither an .npy file nor UTF-8 text", path.display())
        })?;
        let (offsets, values) =
            parse_multi_labels(text).with_context(|| path.display().to_string())?;
        Ok(LabelFile::Multi { offsets, values })
    }
}

/// One class per row from a 1-D (or N×1) little-endian integer array.
pub fn parse_npy_labels(bytes: &[u8]) -> Result<Vec<u32>> {
    let header = super::npy::parse_header(bytes)?;
    let rows = match header.shape.as_slice() {
        [n] | [n, 1] => *n,
        other => bail!("expected a 1-D array of class ids, found shape {other:?}"),
    };
    let descr = header.descr.as_str();
    let (signed, size) = match descr.trim_start_matches(['<', '|', '=']) {
        "i1" => (true, 1),
        "u1" => (false, 1),
        "i2" => (true, 2),
        "u2" => (false, 2),
        "i4" => (true, 4),
        "u4" => (false, 4),
        "i8" => (true, 8),
        "u8" => (false, 8),
        _ => bail!("dtype '{descr}' is not supported; expected a little-endian integer type (int32, int64, uint8, …)"),
    };
    let data = &bytes[header.data_offset..];
    ensure!(
        data.len() >= rows * size,
        "file is truncated ({} data bytes, {rows} labels of {size} bytes need {})",
        data.len(),
        rows * size
    );
    data[..rows * size]
        .chunks_exact(size)
        .enumerate()
        .map(|(i, b)| {
            let mut le = [0u8; 8];
            le[..size].copy_from_slice(b);
            // Sign-extend so that negative values are caught below.
            if signed && b[size - 1] & 0x80 != 0 {
                le[size..].fill(0xff);
            }
            let v = i64::from_le_bytes(le);
            let v = if signed { v } else { u64::from_le_bytes(le).min(i64::MAX as u64) as i64 };
            u32::try_from(v).map_err(|_| {
                anyhow::anyhow!("label at row {i} is {v}; class ids must be in 0..2^32")
            })
        })
        .collect()
}

/// Multi-label text: line i lists row i's labels, comma-separated; an empty line is a row without
/// labels. Returns CSR offsets (rows + 1) and values.
pub fn parse_multi_labels(text: &str) -> Result<(Vec<usize>, Vec<u32>)> {
    let mut offsets = vec![0];
    let mut values = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if !line.is_empty() {
            for item in line.split(',') {
                let item = item.trim();
                let v = item.parse::<u32>().map_err(|_| {
                    anyhow::anyhow!("line {}: `{item}` is not a non-negative integer label", i + 1)
                })?;
                values.push(v);
            }
        }
        offsets.push(values.len());
    }
    Ok((offsets, values))
}

/// The lines of a text file (one item per line, e.g. paths or class names); a trailing newline
/// adds no item, and a `\r` before it is dropped.
pub fn read_lines(path: &Path, what: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    Ok(text.lines().map(|l| l.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    #[test]
    fn reads_integer_npy_of_each_width() {
        assert_eq!(parse_npy_labels(&npy("|u1", "(3,)", &[0, 7, 255])).unwrap(), vec![0, 7, 255]);
        let i32s: Vec<u8> = [3i32, 0, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(parse_npy_labels(&npy("<i4", "(3,)", &i32s)).unwrap(), vec![3, 0, 9]);
        let i64s: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(parse_npy_labels(&npy("<i8", "(2, 1)", &i64s)).unwrap(), vec![1, 2]);
    }

    #[test]
    fn rejects_negative_float_truncated_and_2d() {
        let neg: Vec<u8> = [1i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = parse_npy_labels(&npy("<i8", "(2,)", &neg)).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("-1"), "{e}");
        assert!(parse_npy_labels(&npy("<f4", "(1,)", &[0; 4])).is_err());
        assert!(parse_npy_labels(&npy("<i4", "(3,)", &[0; 8]))
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(parse_npy_labels(&npy("<i4", "(2, 2)", &[0; 16])).is_err());
    }

    #[test]
    fn parses_multi_label_text() {
        let (o, v) = parse_multi_labels("1,2\n\n 3 \n0, 4,5\n").unwrap();
        assert_eq!(o, vec![0, 2, 2, 3, 6]);
        assert_eq!(v, vec![1, 2, 3, 0, 4, 5]);
        let e = parse_multi_labels("1\n2,x\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`x`"), "{e}");
        assert!(parse_multi_labels("-1\n").is_err());
    }
}
