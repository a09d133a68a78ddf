//! `mono score`: the MonoScore of any representation stored in files, streamed in row batches.

use anyhow::{ensure, Context, Result};

use super::{pairwise_monoscore, MonoScoreAccumulator, MonoScores, ScorePath};
use crate::base::io::matrix::MatrixFile;

/// Beyond this many rows the O(N²) reference is refused (its cosine table alone is N²·8 bytes).
pub const REFERENCE_MAX_ROWS: usize = 8192;

/// Checks that the two files describe the same images.
pub fn check_pair(embeddings: &MatrixFile, activations: &MatrixFile) -> Result<()> {
    ensure!(
        embeddings.rows() == activations.rows(),
        "{} has {} rows but {} has {}: both must hold one row per image, in the same order",
        embeddings.label(),
        embeddings.rows(),
        activations.label(),
        activations.rows()
    );
    Ok(())
}

/// One pass over both files, `batch_rows` rows at a time.
pub fn score_files(
    embeddings: &MatrixFile,
    activations: &MatrixFile,
    batch_rows: usize,
    path: ScorePath,
) -> Result<MonoScores> {
    check_pair(embeddings, activations)?;
    let n = embeddings.rows();
    let mut acc = MonoScoreAccumulator::new(embeddings.cols(), activations.cols());
    let bar = crate::base::progress::bar(n as u64, "scoring");
    let (mut e, mut a) = (Vec::new(), Vec::new());
    let mut start = 0;
    // Sparse-looking activations are read straight into CSR rows (one pass over the file);
    // a batch denser than the sparse path's limit is read densely instead.
    let max_density = match path {
        ScorePath::Dense => None,
        ScorePath::Sparse => Some(1.0),
        ScorePath::Auto => Some(super::SPARSE_DENSITY_LIMIT),
    };
    while start < n {
        let end = (start + batch_rows.max(1)).min(n);
        embeddings.read_rows(start, end, &mut e)?;
        let context =
            || format!("rows {start}..{end} of {} / {}", embeddings.label(), activations.label());
        let sparse = match max_density {
            Some(limit) => activations.read_rows_sparse(start, end, limit)?,
            None => None,
        };
        match sparse {
            Some(batch) => acc.add_sparse(&e, batch.as_rows()).with_context(context)?,
            None => {
                activations.read_rows(start, end, &mut a)?;
                acc.add(&e, &a, ScorePath::Dense).with_context(context)?;
            }
        }
        bar.inc((end - start) as u64);
        start = end;
    }
    bar.finish_and_clear();
    Ok(acc.finish())
}

/// The pairwise reference on whole files (small N only).
pub fn score_files_pairwise(
    embeddings: &MatrixFile,
    activations: &MatrixFile,
) -> Result<MonoScores> {
    check_pair(embeddings, activations)?;
    let n = embeddings.rows();
    ensure!(
        n <= REFERENCE_MAX_ROWS,
        "the pairwise reference is O(N²) in time and memory; N = {n} exceeds its limit of {REFERENCE_MAX_ROWS} rows"
    );
    let (mut e, mut a) = (Vec::new(), Vec::new());
    embeddings.read_rows(0, n, &mut e)?;
    activations.read_rows(0, n, &mut a)?;
    if let Some(row) = e.chunks_exact(embeddings.cols()).position(|r| r.iter().all(|&x| x == 0.0)) {
        anyhow::bail!(
            "{}: similarity embedding of row {row} has zero norm (cosine is undefined)",
            embeddings.label()
        );
    }
    pairwise_monoscore(&e, &a, n, embeddings.cols(), activations.cols())
}
