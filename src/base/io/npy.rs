//! The header of an .npy file (format versions 1–3), shared by the float-matrix and label readers.

use anyhow::{bail, ensure, Context, Result};

/// What an .npy header says: where the data starts, its shape and its dtype string (e.g. `<f4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub data_offset: usize,
    pub shape: Vec<usize>,
    /// The `descr` value without quotes, e.g. `<f4`, `|u1`, `<i8`.
    pub descr: String,
}

/// True when the bytes start with the .npy magic string.
pub fn is_npy(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x93NUMPY")
}

/// Parses the header; C order only (a Fortran-ordered array is an error).
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader> {
    ensure!(is_npy(bytes), "no .npy magic string");
    ensure!(bytes.len() >= 10, "too short for an .npy header");
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "too short for an .npy v{major} header");
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => bail!("unsupported .npy format version {v}"),
    };
    ensure!(bytes.len() >= start + header_len, "truncated .npy header");
    let header =
        std::str::from_utf8(&bytes[start..start + header_len]).context("non-UTF-8 .npy header")?;

    let descr = field(header, "descr").context("header lacks 'descr'")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"').to_string();
    let fortran = field(header, "fortran_order").context("header lacks 'fortran_order'")?;
    ensure!(
        fortran.trim() == "False",
        "Fortran-ordered arrays are not supported; save np.ascontiguousarray(x)"
    );
    let shape_text = field(header, "shape").context("header lacks 'shape'")?;
    let shape = shape_text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().with_context(|| format!("bad shape entry '{s}'")))
        .collect::<Result<Vec<_>>>()?;
    Ok(NpyHeader { data_offset: start + header_len, shape, descr })
}

/// The raw text of `'key': value` in an .npy header dict (value up to the next top-level comma).
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str) -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes
    }

    #[test]
    fn parses_one_and_two_dimensional_headers() {
        let h = parse_header(&npy("{'descr': '<i8', 'fortran_order': False, 'shape': (7,), }\n"))
            .unwrap();
        assert_eq!(h.shape, vec![7]);
        assert_eq!(h.descr, "<i8");
        let text = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }\n";
        let h = parse_header(&npy(text)).unwrap();
        assert_eq!(h.shape, vec![3, 4]);
        assert_eq!(h.data_offset, 10 + text.len());
    }

    #[test]
    fn rejects_fortran_order_and_bad_versions() {
        assert!(parse_header(&npy("{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4), }"))
            .is_err());
        let mut bytes = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }");
        bytes[6] = 9;
        assert!(parse_header(&bytes).is_err());
        assert!(parse_header(b"\x93NUMPY").is_err());
    }
}
