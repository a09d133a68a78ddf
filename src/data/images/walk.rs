//! Directory listing for the file-based sets: class subdirectories and image files, sorted.
//!
//! Names starting with '.' are skipped (`.DS_Store`, macOS `._x.jpg` resource forks, editor and
//! notebook folders), and so are files whose extension is not an image one. Symbolic links are
//! followed; a link back to a directory already being walked is skipped rather than looping.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Extensions of the formats the image crate is built with here, compared case-insensitively.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The name without its image extension ("a.JPEG" → "a"); other names unchanged.
pub fn strip_image_extension(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((stem, _)) if is_image_file(Path::new(name)) => stem,
        _ => name,
    }
}

/// Visible subdirectories of `dir`, by name (byte order, as Python's `sorted` orders them).
pub fn subdirectories(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> =
        read_dir(dir)?.into_iter().filter(|e| e.is_dir).map(|e| e.name).collect();
    names.sort();
    Ok(names)
}

/// Image files directly inside `dir`, as file names, sorted.
pub fn image_files_flat(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = read_dir(dir)?
        .into_iter()
        .filter(|e| !e.is_dir && is_image_file(&e.path))
        .map(|e| e.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Image files anywhere below `dir`, as paths relative to it, sorted component by component.
pub fn image_files_nested(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut walking = HashSet::new();
    walk(dir, Path::new(""), &mut walking, &mut found)?;
    found.sort();
    Ok(found)
}

fn walk(
    dir: &Path,
    rel: &Path,
    walking: &mut HashSet<PathBuf>,
    found: &mut Vec<PathBuf>,
) -> Result<()> {
    let real = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    if !walking.insert(real.clone()) {
        return Ok(());
    }
    for entry in read_dir(dir)? {
        if entry.is_dir {
            walk(&entry.path, &rel.join(&entry.name), walking, found)?;
        } else if is_image_file(&entry.path) {
            found.push(rel.join(&entry.name));
        }
    }
    walking.remove(&real);
    Ok(())
}

struct Entry {
    path: PathBuf,
    name: String,
    /// A directory, or a link to one.
    is_dir: bool,
}

/// The visible entries of `dir`. A name that is not UTF-8 is an error: it could not be written
/// into the feature store and found again.
fn read_dir(dir: &Path) -> Result<Vec<Entry>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list directory {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list directory {}", dir.display()))?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .with_context(|| {
                format!("{}: the name {:?} is not UTF-8", dir.display(), entry.file_name())
            })?
            .to_string();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // The entry's own type needs no extra system call on most file systems; only links are
        // followed with a stat.
        let kind = entry.file_type().with_context(|| format!("cannot stat {}", path.display()))?;
        let is_dir = kind.is_dir() || (kind.is_symlink() && path.is_dir());
        out.push(Entry { path, name, is_dir });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions() {
        for ok in ["a.jpg", "b.JPEG", "c.Png", "d.webp", "e.bmp", "f.gif", "g.tif", "h.TIFF"] {
            assert!(is_image_file(Path::new(ok)), "{ok}");
        }
        for no in ["a.txt", "jpg", "a.jpg.txt", "a.csv"] {
            assert!(!is_image_file(Path::new(no)), "{no}");
        }
        assert_eq!(strip_image_extension("x_1.JPEG"), "x_1");
        assert_eq!(strip_image_extension("x_1"), "x_1");
        assert_eq!(strip_image_extension("x.1"), "x.1");
    }

    #[test]
    fn nested_listing_sorted_hidden_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("b/inner")).unwrap();
        std::fs::create_dir_all(d.join(".hidden")).unwrap();
        for f in ["z.png", "a.jpg", "b/inner/c.gif", "b/a.txt", ".x.jpg", ".hidden/y.png"] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let found = image_files_nested(d).unwrap();
        assert_eq!(
            found,
            vec![PathBuf::from("a.jpg"), PathBuf::from("b/inner/c.gif"), PathBuf::from("z.png")]
        );
        assert_eq!(image_files_flat(d).unwrap(), vec!["a.jpg", "z.png"]);
        assert_eq!(subdirectories(d).unwrap(), vec!["b"]);
        assert!(subdirectories(&d.join("nope")).unwrap_err().to_string().contains("nope"));
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_end() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("a")).unwrap();
        std::fs::write(d.join("a/x.png"), b"").unwrap();
        std::os::unix::fs::symlink(d, d.join("a/loop")).unwrap();
        assert_eq!(image_files_nested(d).unwrap(), vec![PathBuf::from("a/x.png")]);
    }
}
