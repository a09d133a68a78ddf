//! Reading a config's TOML so that every error is one line naming the dotted key and its line:
//! `unknown key `sae.kk` (line 3)`, `train.lr (line 2): invalid type: …`. Keys renamed in an
//! earlier release say what they became.

use anyhow::{anyhow, Result};

use super::Config;

/// Separates a key path carried inside an error message from the message (see `mark_path`).
const PATH_MARK: char = '\u{1f}';

/// Keys that were renamed: the old dotted key and what to write instead.
const RENAMED: [(&str, &str); 3] = [
    (
        "features.shuffle_buffer",
        "nothing (removed: every epoch visits the rows in a full random order)",
    ),
    ("train.lr_decay", "train.schedule (constant | linear | cosine)"),
    ("train.log_every", "run.log_every"),
];

/// An error message that carries the path of the failing key below the current one, for
/// sections deserialised in two steps (`[sae]`): `deserialize` splits it off again.
pub(super) fn mark_path(path: &str, message: &str) -> String {
    if path.is_empty() || path == "." {
        message.to_string()
    } else {
        format!("{path}{PATH_MARK}{message}")
    }
}

/// A serde error about the key `key` below the current one.
pub(super) fn nested_error<E: serde::de::Error>(key: &str, error: &dyn std::fmt::Display) -> E {
    E::custom(mark_path(key, &error.to_string()))
}

/// The 1-based line of the dotted key `path` in `text`, when it is written there.
fn line_of(text: &str, path: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    for part in path.split('.') {
        let (key, item) = table.get_key_value(part)?;
        span = key.span().or(span);
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}

/// Parses `text` into a Config, tracking the key path of any error. `show_line`: whether line
/// numbers mean anything to the user (not for generated text).
pub(super) fn deserialize(text: &str, show_line: bool) -> Result<Config> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let outer = e.path().to_string();
        let inner = e.into_inner();
        let raw: String = inner
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        // A section read in two steps put the rest of the path into the message.
        let (path, message) = match raw.split_once(PATH_MARK) {
            Some((below, message)) => (join(&outer, below), message.to_string()),
            None => (outer.clone(), raw.clone()),
        };
        let unknown = message.strip_prefix("unknown field `").and_then(|r| r.split('`').next());
        let key = match unknown {
            Some(field) if !path.ends_with(field) => join(&path, field),
            _ => path.clone(),
        };
        let line = match (inner.span(), raw.contains(PATH_MARK) || unknown.is_some()) {
            (Some(span), false) => {
                Some(text[..span.start.min(text.len())].matches('\n').count() + 1)
            }
            _ => line_of(text, &key),
        };
        let at = line.filter(|_| show_line).map(|l| format!(" (line {l})")).unwrap_or_default();
        if unknown.is_some() {
            let (head, expected) = message.split_once(", expected ").unwrap_or((&message, ""));
            let why = head.split_once("`: ").map(|(_, why)| format!(": {why}")).unwrap_or_default();
            let hint = match RENAMED.iter().find(|(old, _)| *old == key) {
                Some((_, new)) => format!("; renamed: use {new}"),
                None if expected.is_empty() => String::new(),
                None => format!("; expected {expected}"),
            };
            anyhow!("unknown key `{key}`{at}{why}{hint}")
        } else if path == "." {
            anyhow!("TOML error{at}: {message}")
        } else {
            anyhow!("{path}{at}: {message}")
        }
    })
}

fn join(base: &str, rest: &str) -> String {
    if base.is_empty() || base == "." {
        rest.to_string()
    } else {
        format!("{base}.{rest}")
    }
}
