//! Fingerprints of inputs, for the keys that decide whether a finished stage can be reused:
//! SHA-256 over a stream of typed fields (each length-prefixed, so no two different streams
//! collide by concatenation), shown as 16 hex digits.
//!
//! Files are fingerprinted by metadata, not by their whole content, so that keying a run over a
//! million images or gigabytes of weights stays cheap: a listed file contributes its size and
//! modification time; a signed file (weights, manifests) also the SHA-256 of its first and last
//! MiB. Rewriting a file in place with the same size and an old timestamp and the same first and
//! last MiB is the one change this does not see.

use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Bytes hashed at each end of a signed file.
const END_BYTES: u64 = 1 << 20;

pub struct Fingerprint(Sha256);

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    pub fn new() -> Self {
        Self(Sha256::new())
    }

    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn str(&mut self, text: &str) -> &mut Self {
        self.bytes(text.as_bytes())
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.0.update(value.to_le_bytes());
        self
    }

    /// u32 values, hashed as one field.
    pub fn u32s(&mut self, values: &[u32]) -> &mut Self {
        self.u64(values.len() as u64);
        for v in values {
            self.0.update(v.to_le_bytes());
        }
        self
    }

    /// A file's size and modification time (following symbolic links); a missing file counts
    /// as such rather than failing, so that a listing taken while files vanish still differs.
    pub fn file_stat(&mut self, path: &Path) -> &mut Self {
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as u64);
                self.u64(1).u64(meta.len()).u64(mtime)
            }
            Err(_) => self.u64(0),
        }
    }

    /// Size, modification time and the first and last MiB of a file that must exist.
    pub fn file_signed(&mut self, path: &Path) -> Result<&mut Self> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        self.file_stat(path);
        let mut head = Vec::new();
        (&mut file).take(END_BYTES).read_to_end(&mut head)?;
        self.bytes(&head);
        if len > END_BYTES {
            let tail_start = (len - END_BYTES).max(END_BYTES);
            file.seek(SeekFrom::Start(tail_start))?;
            let mut tail = Vec::new();
            file.take(END_BYTES).read_to_end(&mut tail)?;
            self.bytes(&tail);
        }
        Ok(self)
    }

    /// 16 hex digits (64 bits) of the digest.
    pub fn finish(&self) -> String {
        let digest = self.0.clone().finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The signature of one file (see `Fingerprint::file_signed`).
pub fn file_signature(path: &Path) -> Result<String> {
    Ok(Fingerprint::new().file_signed(path)?.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_do_not_run_together_and_files_are_seen_changing() {
        let a = Fingerprint::new().str("ab").str("c").finish();
        let b = Fingerprint::new().str("a").str("bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, Fingerprint::new().str("ab").str("c").finish());

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("weights.bin");
        let mut data = vec![7u8; 3 << 20];
        std::fs::write(&path, &data).unwrap();
        let before = file_signature(&path).unwrap();
        assert_eq!(before, file_signature(&path).unwrap());
        // The same size and a restored timestamp: the last MiB still tells them apart.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        *data.last_mut().unwrap() = 8;
        std::fs::write(&path, &data).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        assert_ne!(before, file_signature(&path).unwrap());
        assert!(file_signature(&tmp.path().join("absent")).is_err());
        let listed = |p: &Path| Fingerprint::new().file_stat(p).finish();
        assert_ne!(listed(&path), listed(&tmp.path().join("absent")));
    }
}
