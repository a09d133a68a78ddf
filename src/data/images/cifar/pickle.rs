//! The CIFAR "python version": pickled dicts (written by Python 2's cPickle) holding a numpy uint8
//! array `data` (N × 3072) and a list of labels, and a meta dict of class names.
//!
//! serde-pickle cannot build numpy objects, but with `keep_restore_state` it hands back the state
//! numpy pickles an array with (shape, order and raw bytes), which is all that is needed. Keys
//! are bytes (Python 2 `str`) in the originals, text when re-pickled by Python 3; both are
//! accepted.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_pickle::{DeOptions, HashableValue, Value};

use super::IMAGE_BYTES;

/// Pixels (N × 3072) and labels (under `labels_key`) of one batch.
pub fn parse_batch(bytes: &[u8], labels_key: &str, name: &str) -> Result<(Vec<u8>, Vec<u32>)> {
    let value = unpickle(bytes, name)?;
    let dict = as_dict(&value, name)?;
    let (rows, cols, pixels) =
        uint8_matrix(get(dict, "data", name)?).with_context(|| format!("{name}: `data`"))?;
    ensure!(
        cols == IMAGE_BYTES,
        "{name}: `data` is {rows} × {cols}; CIFAR images are {IMAGE_BYTES} bytes"
    );
    let labels = int_list(get(dict, labels_key, name)?)
        .with_context(|| format!("{name}: `{labels_key}`"))?;
    ensure!(labels.len() == rows, "{name}: {} labels for {rows} images", labels.len());
    Ok((pixels, labels))
}

/// The list of class names under `key`.
pub fn parse_label_names(bytes: &[u8], key: &str, name: &str) -> Result<Vec<String>> {
    let value = unpickle(bytes, name)?;
    let Value::List(items) = get(as_dict(&value, name)?, key, name)? else {
        bail!("{name}: `{key}` is not a list");
    };
    items
        .iter()
        .map(|v| match v {
            Value::Bytes(b) => String::from_utf8(b.clone())
                .map_err(|_| anyhow!("{name}: a name in `{key}` is not UTF-8")),
            Value::String(s) => Ok(s.clone()),
            other => bail!("{name}: `{key}` holds {other:?}, not a name"),
        })
        .collect()
}

fn unpickle(bytes: &[u8], name: &str) -> Result<Value> {
    let options = DeOptions::new().keep_restore_state().replace_unresolved_globals();
    serde_pickle::value_from_slice(bytes, options)
        .map_err(|e| anyhow!("{name}: not a readable pickle: {e}"))
}

fn as_dict<'a>(value: &'a Value, name: &str) -> Result<&'a BTreeMap<HashableValue, Value>> {
    match value {
        Value::Dict(d) => Ok(d),
        _ => bail!("{name}: the pickle holds no dict"),
    }
}

fn get<'a>(dict: &'a BTreeMap<HashableValue, Value>, key: &str, name: &str) -> Result<&'a Value> {
    dict.get(&HashableValue::Bytes(key.as_bytes().to_vec()))
        .or_else(|| dict.get(&HashableValue::String(key.to_string())))
        .with_context(|| format!("{name}: no `{key}` entry"))
}

/// Rows, columns and bytes of a pickled 2-d C-order numpy array of 1-byte elements.
fn uint8_matrix(value: &Value) -> Result<(usize, usize, Vec<u8>)> {
    let Value::Tuple(state) = value else { bail!("not a pickled numpy array") };
    // Protocols 0-4 (the originals): `_reconstruct` then BUILD with (version, shape, dtype,
    // is_fortran, data), or without the version. Protocol 5 (Python 3's default):
    // `_frombuffer(data, dtype, shape, order)`.
    let (shape, c_order, data) = match &state[..] {
        [_, shape, _, fortran, data] | [shape, _, fortran, data]
            if matches!(shape, Value::Tuple(_)) =>
        {
            (shape, matches!(fortran, Value::Bool(false)), data)
        }
        [data @ Value::Bytes(_), _, shape, order] => {
            (shape, matches!(order, Value::String(o) if o == "C"), data)
        }
        _ => bail!("not a pickled numpy array"),
    };
    let Value::Tuple(shape) = shape else { bail!("not a pickled numpy array (no shape)") };
    let shape: Vec<usize> =
        shape.iter().map(|d| as_usize(d).context("bad shape")).collect::<Result<_>>()?;
    let [rows, cols] = shape[..] else { bail!("shape {shape:?}, expected 2 dimensions") };
    ensure!(c_order, "Fortran-order arrays are not supported");
    let Value::Bytes(data) = data else { bail!("not a pickled numpy array (no raw data)") };
    // Exactly one byte per element: anything but a (u)int8 array fails here.
    ensure!(
        rows.checked_mul(cols) == Some(data.len()),
        "{} data bytes for shape {rows} × {cols}; expected 1-byte (uint8) elements",
        data.len()
    );
    Ok((rows, cols, data.clone()))
}

fn int_list(value: &Value) -> Result<Vec<u32>> {
    let (Value::List(items) | Value::Tuple(items)) = value else { bail!("not a list") };
    items
        .iter()
        .map(|v| as_usize(v).and_then(|n| u32::try_from(n).ok()).context("not a label"))
        .collect()
}

fn as_usize(value: &Value) -> Option<usize> {
    match value {
        Value::I64(n) => usize::try_from(*n).ok(),
        _ => None,
    }
}
