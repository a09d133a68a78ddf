//! Advisory locks on the directories a command writes (a run, a stage, a feature set being
//! extracted, imported or merged), so that two processes never write the same outputs.
//!
//! The lock of directory `D` is the file `.D.lock` beside it, locked with the operating system's
//! whole-file lock (flock): the kernel releases it when its holder exits in any way, so a lock
//! left by a killed process is taken over at once. The file names the holder (pid and command)
//! for the message a second process prints; it is emptied on a clean release, so finding it
//! non-empty means the previous holder died, which is said once. Holding the lock of `D` also
//! owns the staging entries of interrupted writes inside `D` and beside it, which are removed.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

static WAIT: AtomicBool = AtomicBool::new(false);

/// `--wait`: wait for a held lock instead of failing.
pub fn set_wait(wait: bool) {
    WAIT.store(wait, Ordering::Relaxed);
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Emptied first, so the next holder knows the release was clean; closing unlocks.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

impl DirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of `dir`: `.<name>.lock` in its parent.
pub fn lock_file(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{}: a directory to lock needs a name", dir.display()))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.lock", name.to_string_lossy())))
}

/// Locks `dir` (which need not exist yet) for this process: fails at once naming the holder,
/// or with `--wait` waits for it. Then removes what interrupted writes left in and beside `dir`.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    let path = lock_file(dir)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = holder(&mut file);
            if !WAIT.load(Ordering::Relaxed) {
                bail!(
                    "{} is in use by another mono process ({holder}); wait for it with --wait, \
                     or stop that process",
                    dir.display()
                );
            }
            crate::base::progress::note(&format!(
                "waiting for {} to be released ({holder})",
                dir.display()
            ));
            file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| {
                format!("cannot lock {} (the file system must support file locks)", path.display())
            })
        }
    }
    let previous = holder(&mut file);
    if !previous.is_empty() && previous != "unknown" {
        crate::base::progress::note(&format!(
            "took over {} from a process that ended without releasing it ({previous})",
            dir.display()
        ));
    }
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    let command: Vec<String> = std::env::args().collect();
    write!(file, "pid {}: {}", std::process::id(), command.join(" "))
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.flush()?;
    remove_staging(dir)?;
    Ok(DirLock { file, path })
}

/// Who holds (or last held) a lock file, as written there; "" for none.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_string(&mut text));
    let text = text.trim().to_string();
    if text.is_empty() {
        return text;
    }
    if text.starts_with("pid ") {
        text
    } else {
        "unknown".into()
    }
}

/// Whether `name` is a staging entry of an interrupted write: temporary files of atomic writes
/// (`.tmp…`, `.<name>.tmp…`), replaced directories (`.<name>.old-…`), import and merge staging.
fn is_staging(name: &str) -> bool {
    name.starts_with('.')
        && !name.ends_with(".lock")
        && (name.starts_with(".tmp")
            || name.starts_with(".mono-import-")
            || name.contains(".tmp")
            || name.contains(".old-")
            || name.contains(".merge"))
}

/// Removes staging entries inside `dir` (two levels deep: a run's checkpoints, a feature set's
/// stores) and those of `dir` itself beside it, naming each.
fn remove_staging(dir: &Path) -> Result<()> {
    let mut found = Vec::new();
    let own_prefix = dir.file_name().map(|n| format!(".{}.", n.to_string_lossy()));
    if let (Some(parent), Some(prefix)) = (dir.parent(), own_prefix) {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        found.extend(
            staging_in(parent).into_iter().filter(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            }),
        );
    }
    for entry in staging_in(dir) {
        found.push(entry);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for sub in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            found.extend(staging_in(&sub));
        }
    }
    for path in found {
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot remove the leftover {}", path.display()))?;
        crate::base::progress::note(&format!(
            "removed {} (left by an interrupted write)",
            path.display()
        ));
    }
    Ok(())
}

fn staging_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| is_staging(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_recognised_and_nothing_else() {
        for name in [
            ".tmpA1b2",
            ".step-00000004.tmpXyZ",
            ".sae.old-123",
            ".mono-import-ab",
            ".train.merge9",
        ] {
            assert!(is_staging(name), "{name}");
        }
        for name in ["shard-00000.safetensors", "manifest.json", ".train.lock", ".hidden", "tmp"] {
            assert!(!is_staging(name), "{name}");
        }
    }

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_released_one_is_taken_quietly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = lock_dir(&dir).unwrap();
        let err = format!("{:#}", lock_dir(&dir).unwrap_err());
        assert!(err.contains("in use by another mono process (pid "), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        assert_eq!(std::fs::read_to_string(lock_file(&dir).unwrap()).unwrap(), "");
        let again = lock_dir(&dir).unwrap();
        assert!(again.path().ends_with(".run.lock"));
    }

    #[test]
    fn staging_left_by_interrupted_writes_is_removed_when_locking() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("features");
        std::fs::create_dir_all(dir.join("train/.tmpQw12")).unwrap();
        std::fs::create_dir_all(dir.join(".mono-import-x1")).unwrap();
        std::fs::write(dir.join("train/shard-00000.safetensors"), b"kept").unwrap();
        std::fs::create_dir_all(tmp.path().join(".features.merge12")).unwrap();
        std::fs::create_dir_all(tmp.path().join(".other.merge12")).unwrap();
        let _lock = lock_dir(&dir).unwrap();
        assert!(!dir.join("train/.tmpQw12").exists());
        assert!(!dir.join(".mono-import-x1").exists());
        assert!(!tmp.path().join(".features.merge12").exists());
        assert!(tmp.path().join(".other.merge12").exists(), "another directory's staging");
        assert!(dir.join("train/shard-00000.safetensors").exists());
    }
}
