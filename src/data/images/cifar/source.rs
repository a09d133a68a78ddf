//! Where a CIFAR distribution is: an extracted directory or the original `.tar.gz`, and reading
//! its member files from either.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Cifar;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Binary,
    Pickle,
}

#[derive(Debug)]
enum Place {
    Dir(PathBuf),
    /// The archive and the directory its members sit in.
    Archive(PathBuf, &'static str),
}

#[derive(Debug)]
pub struct Source {
    pub format: Format,
    place: Place,
}

/// One member file: a name for messages (its path, or `archive:member`) and its bytes.
pub struct Member {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The first distribution of `which` found at `root` (order in the module documentation of cifar).
pub fn locate(which: Cifar, root: &Path) -> Result<Source> {
    let formats = [Format::Binary, Format::Pickle];
    for format in formats {
        let (dir, _) = which.names(format);
        let first = &which.batches(format, "test")[0];
        if root.join(dir).join(first).is_file() {
            return Ok(Source { format, place: Place::Dir(root.join(dir)) });
        }
        if root.join(first).is_file() {
            return Ok(Source { format, place: Place::Dir(root.to_path_buf()) });
        }
    }
    for format in formats {
        let (dir, archive) = which.names(format);
        if root.join(archive).is_file() {
            return Ok(Source { format, place: Place::Archive(root.join(archive), dir) });
        }
        if root.is_file() && root.file_name().is_some_and(|n| n == archive) {
            return Ok(Source { format, place: Place::Archive(root.to_path_buf(), dir) });
        }
    }
    let wanted: Vec<String> = formats
        .iter()
        .flat_map(|&f| {
            let (dir, archive) = which.names(f);
            [format!("{dir}/"), archive.to_string()]
        })
        .collect();
    bail!(
        "{}: no {} data found (looked for {})",
        root.display(),
        which.set_name(),
        wanted.join(", ")
    )
}

impl Source {
    /// The named member files, in the order asked; a missing one is an error naming it.
    pub fn read(&self, names: &[&str]) -> Result<Vec<Member>> {
        match &self.place {
            Place::Dir(dir) => names
                .iter()
                .map(|n| {
                    let path = dir.join(n);
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    Ok(Member { name: path.display().to_string(), bytes })
                })
                .collect(),
            Place::Archive(archive, dir) => read_from_archive(archive, dir, names),
        }
    }
}

/// One pass over the gzipped tar, keeping the wanted members of `dir/`.
fn read_from_archive(archive: &Path, dir: &str, names: &[&str]) -> Result<Vec<Member>> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let mut found: Vec<Option<Vec<u8>>> = vec![None; names.len()];
    let broken = || format!("{}: corrupt or truncated archive", archive.display());
    for entry in tar.entries().with_context(broken)? {
        let mut entry = entry.with_context(broken)?;
        let path = entry.path().with_context(broken)?.into_owned();
        let path = path.strip_prefix(".").unwrap_or(&path);
        let Ok(inside) = path.strip_prefix(dir) else { continue };
        let Some(slot) = names.iter().position(|n| inside == Path::new(n)) else { continue };
        // The header's size only sizes the buffer; a lying header cannot make it huge.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 28) as usize);
        entry.read_to_end(&mut bytes).with_context(broken)?;
        found[slot] = Some(bytes);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    names
        .iter()
        .zip(found)
        .map(|(n, bytes)| {
            let name = format!("{}:{dir}/{n}", archive.display());
            match bytes {
                Some(bytes) => Ok(Member { name, bytes }),
                None => bail!("{name}: not in the archive"),
            }
        })
        .collect()
}
