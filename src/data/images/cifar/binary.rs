//! The CIFAR binary format: fixed-size records of label byte(s) then 3072 pixel bytes, and class
//! names one per line.

use anyhow::{ensure, Result};

use super::IMAGE_BYTES;

/// Pixels (records × 3072) and the label at byte `label_at` of each record's `label_bytes`.
pub fn parse_records(
    bytes: &[u8],
    label_bytes: usize,
    label_at: usize,
    name: &str,
) -> Result<(Vec<u8>, Vec<u32>)> {
    let record = label_bytes + IMAGE_BYTES;
    ensure!(
        !bytes.is_empty() && bytes.len().is_multiple_of(record),
        "{name}: {} bytes is not a whole number of {record}-byte records ({label_bytes} label byte(s) + {IMAGE_BYTES} pixels)",
        bytes.len()
    );
    let count = bytes.len() / record;
    let mut pixels = Vec::with_capacity(count * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(count);
    for r in bytes.chunks_exact(record) {
        labels.push(u32::from(r[label_at]));
        pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok((pixels, labels))
}

/// Non-empty lines, trimmed (`batches.meta.txt` ends in blank lines).
pub fn parse_label_names(bytes: &[u8], name: &str) -> Result<Vec<String>> {
    let text = std::str::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{name}: not UTF-8 text"))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_lengths() {
        let mut bytes = vec![3u8, 7];
        bytes.extend((0..IMAGE_BYTES).map(|i| (i % 251) as u8));
        let (p, l) = parse_records(&bytes, 2, 1, "x").unwrap();
        assert_eq!(l, vec![7]);
        assert_eq!(p.len(), IMAGE_BYTES);
        assert_eq!(p[300], (300 % 251) as u8);
        let (_, l) = parse_records(&bytes[1..], 1, 0, "x").unwrap();
        assert_eq!(l, vec![7]);
        assert!(parse_records(&bytes[2..], 1, 0, "x")
            .unwrap_err()
            .to_string()
            .contains("x: 3072 bytes"));
        assert!(parse_records(&[], 1, 0, "x").is_err());
        assert_eq!(parse_label_names(b"cat\r\ndog\n\n", "m").unwrap(), vec!["cat", "dog"]);
    }
}
