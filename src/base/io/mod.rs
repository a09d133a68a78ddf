//! File formats and safe writing.

pub mod labels;
pub mod matrix;
pub mod npy;
pub mod tensors;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees a half-written file and an existing file survives a failed write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    // Temporary files are created 0600; results are meant to be shared like any other file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    }
    tmp.persist(path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Writes named tensors as a safetensors file atomically (temporary file, sync, rename).
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    candle_core::safetensors::save(tensors, tmp.path())
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    }
    tmp.persist(path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// `write_atomic` for a pretty-printed JSON value.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Fills `dir` atomically: `write` fills a sibling temporary directory, which then replaces `dir`.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name =
        dir.file_name().context("the directory path has no name")?.to_string_lossy().to_string();
    let tmp = tempfile::Builder::new().prefix(&format!(".{name}.tmp")).tempdir_in(parent)?;
    write(tmp.path())?;
    let staged: PathBuf = tmp.keep();
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).with_context(|| format!("cannot replace {}", dir.display()))?;
        std::fs::rename(&staged, dir)
            .with_context(|| format!("cannot move the new directory into {}", dir.display()))?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        std::fs::rename(&staged, dir)
            .with_context(|| format!("cannot move the new directory into {}", dir.display()))?;
    }
    Ok(())
}

/// Asks the kernel to drop `path`'s pages from the page cache (those no process maps), so that
/// the next reads come from the disk: how a benchmark reads a store as if it were larger than
/// memory. False where the platform has no such request (only Linux is asked).
pub fn evict_from_page_cache(path: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: a valid open descriptor; the call only advises the kernel.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(rc == 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Ok(false)
    }
}

/// The keys (dotted paths) whose values differ between two JSON documents, each as
/// "key: old → new" ("absent" where a side lacks it); arrays compare as whole values.
pub fn json_differences(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "absent".into());
            format!("{k}: {} → {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// The file in a stage's directory that records what the stage depends on (its inputs'
/// identity, docs/reliability.md), written when the stage starts.
pub const INPUTS_FILE: &str = "inputs.json";

/// How `identity` compares with the one recorded in `dir`: None when nothing is recorded,
/// else the differences (empty when the same).
pub fn recorded_input_differences(
    dir: &Path,
    identity: &serde_json::Value,
) -> Result<Option<Vec<String>>> {
    let path = dir.join(INPUTS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let recorded: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!("{}: not valid JSON (delete the directory to start over)", path.display())
    })?;
    Ok(Some(json_differences(&recorded, identity)))
}

/// Records `identity` in `dir` (atomically).
pub fn record_inputs(dir: &Path, identity: &serde_json::Value) -> Result<()> {
    write_json_atomic(&dir.join(INPUTS_FILE), identity)
}
