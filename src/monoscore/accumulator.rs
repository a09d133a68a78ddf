//! Streaming, exact, one-pass MonoScore.
//!
//! For neuron k with raw activations l_ik, range r_k = max_k − min_k and unit similarity
//! embeddings p_i, the min-max scaled activations ã_ik = (l_ik − min_k)/r_k give
//!   u_k = Σ ã_ik,  v_k = Σ ã_ik²,  w_k = Σ ã_ik p_i,
//!   MS_k = ½(‖w_k‖² − v_k) / ½(u_k² − v_k).
//! Scaling is affine, so it folds out of the sums: we accumulate Σ l, Σ l², Σ l·p, Σ p and the
//! running min/max in ONE pass and apply the scaling at the end (all in f64: the subtractions
//! cancel). Memory is O(M·D), independent of N.
//!
//! Two input paths give the same numbers: a dense one (a B×M matrix, the Σ l·p term is one
//! f64 GEMM per batch) and a sparse one (CSR rows, e.g. TopK latents: O(nnz·D) work).

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::MonoScores;
use crate::base::simd::{lane_sum, vectorized};
use crate::base::sparse::{to_columns, SparseBatch, SparseRows};

/// Per-neuron running statistics of the raw activations.
#[derive(Clone, Debug)]
struct NeuronMoments {
    sum: f64,
    sum_sq: f64,
    min: f32,
    max: f32,
    /// How many values seen so far equal `min` (needed to tell "fires on < 2 images").
    count_at_min: u64,
    /// Values seen explicitly; the sparse path leaves the other rows as implicit zeros.
    explicit: u64,
}

impl NeuronMoments {
    fn new() -> Self {
        Self {
            sum: 0.0,
            sum_sq: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count_at_min: 0,
            explicit: 0,
        }
    }

    /// Folds `count` copies of `value` into the min/max/count-at-min state.
    #[inline]
    fn fold_extremes(&mut self, value: f32, count: u64) {
        if value < self.min {
            self.min = value;
            self.count_at_min = count;
        } else if value == self.min {
            self.count_at_min += count;
        }
        if value > self.max {
            self.max = value;
        }
    }
}

/// Which accumulation path a batch takes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ScorePath {
    /// Sparse when at most `SPARSE_DENSITY_LIMIT` of the entries are non-zero, else dense.
    Auto,
    Dense,
    Sparse,
}

/// Above this share of non-zeros the GEMM of the dense path beats scattered sparse work.
pub const SPARSE_DENSITY_LIMIT: f64 = 0.05;

/// The streaming accumulator. Feed batches of (similarity embeddings B×D, activations B×M).
#[derive(Clone, Debug)]
pub struct MonoScoreAccumulator {
    dim: usize,
    n_neurons: usize,
    n_rows: u64,
    /// Σ_i p_i, length D.
    embedding_sum: Vec<f64>,
    /// Σ_i l_ik p_i, neuron-major M × D.
    weighted_sum: Vec<f64>,
    neurons: Vec<NeuronMoments>,
}

impl MonoScoreAccumulator {
    pub fn new(dim: usize, n_neurons: usize) -> Self {
        Self {
            dim,
            n_neurons,
            n_rows: 0,
            embedding_sum: vec![0.0; dim],
            weighted_sum: vec![0.0; dim * n_neurons],
            neurons: vec![NeuronMoments::new(); n_neurons],
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn n_neurons(&self) -> usize {
        self.n_neurons
    }

    pub fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// Adds a batch given as dense row-major matrices, choosing the path by `path`.
    pub fn add(&mut self, embeddings: &[f32], activations: &[f32], path: ScorePath) -> Result<()> {
        let rows = self.check_embeddings(embeddings)?;
        ensure!(
            activations.len() == rows * self.n_neurons,
            "activations hold {} values, expected {rows} rows × {} neurons",
            activations.len(),
            self.n_neurons
        );
        self.check_activations_finite(activations)?;
        let use_sparse = match path {
            ScorePath::Dense => false,
            ScorePath::Sparse => true,
            ScorePath::Auto => {
                let nnz = activations.par_iter().filter(|v| **v != 0.0).count();
                (nnz as f64) <= SPARSE_DENSITY_LIMIT * activations.len() as f64
            }
        };
        if use_sparse {
            let sparse = SparseBatch::from_dense(activations, self.n_neurons);
            self.add_sparse_unchecked(embeddings, rows, sparse.as_rows())
        } else {
            self.add_dense_unchecked(embeddings, rows, activations)
        }
    }

    /// Adds a batch whose activations are CSR rows (absent entries are zeros).
    pub fn add_sparse(&mut self, embeddings: &[f32], activations: SparseRows<'_>) -> Result<()> {
        let rows = self.check_embeddings(embeddings)?;
        ensure!(
            activations.row_offsets.len() == rows + 1,
            "sparse activations have {} rows, embeddings have {rows}",
            activations.row_offsets.len().saturating_sub(1)
        );
        ensure!(
            activations.columns.len() == activations.values.len()
                && activations.row_offsets.last() == Some(&activations.columns.len())
                && activations.row_offsets.windows(2).all(|w| w[0] <= w[1]),
            "malformed sparse activations (offsets, columns and values disagree)"
        );
        if let Some(&c) = activations.columns.iter().find(|&&c| c as usize >= self.n_neurons) {
            bail!("sparse activation column {c} is out of range for {} neurons", self.n_neurons);
        }
        self.check_activations_finite(activations.values)?;
        self.add_sparse_unchecked(embeddings, rows, activations)
    }

    fn check_embeddings(&self, embeddings: &[f32]) -> Result<usize> {
        ensure!(self.dim > 0, "similarity embeddings must have at least one column");
        ensure!(
            embeddings.len().is_multiple_of(self.dim),
            "embeddings hold {} values, not a multiple of D = {}",
            embeddings.len(),
            self.dim
        );
        Ok(embeddings.len() / self.dim)
    }

    fn check_activations_finite(&self, values: &[f32]) -> Result<()> {
        if let Some(pos) = values.par_iter().position_first(|v| !v.is_finite()) {
            bail!(
                "activation {} of this batch is {} (NaN/Inf activations cannot be scored)",
                pos,
                values[pos]
            );
        }
        Ok(())
    }

    /// 1/‖e_i‖ per row, in f64; rejects zero-norm and non-finite embeddings.
    fn inverse_norms(&self, embeddings: &[f32]) -> Result<Vec<f64>> {
        let first_row = self.n_rows;
        embeddings
            .par_chunks_exact(self.dim)
            .enumerate()
            .map(|(i, row)| {
                let sq = vectorized!(lane_sum(row, |x| x as f64 * x as f64));
                if !sq.is_finite() {
                    bail!("similarity embedding of row {} contains NaN/Inf", first_row + i as u64);
                }
                if sq == 0.0 {
                    bail!(
                        "similarity embedding of row {} has zero norm (cosine is undefined)",
                        first_row + i as u64
                    );
                }
                Ok(1.0 / sq.sqrt())
            })
            .collect()
    }

    fn add_embedding_sum(&mut self, embeddings: &[f32], inv_norms: &[f64]) {
        let sum = &mut self.embedding_sum;
        vectorized!(for (row, &s) in embeddings.chunks_exact(sum.len()).zip(inv_norms) {
            for (acc, &x) in sum.iter_mut().zip(row) {
                *acc += x as f64 * s;
            }
        })
    }

    fn add_dense_unchecked(
        &mut self,
        embeddings: &[f32],
        rows: usize,
        activations: &[f32],
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let inv_norms = self.inverse_norms(embeddings)?;
        let (dim, m) = (self.dim, self.n_neurons);

        // Moments, per column block so that each thread owns its neurons.
        const BLOCK: usize = 256;
        self.neurons.par_chunks_mut(BLOCK).enumerate().for_each(|(b, block)| {
            let c0 = b * BLOCK;
            let width = block.len();
            let mut lo = vec![f32::INFINITY; width];
            let mut hi = vec![f32::NEG_INFINITY; width];
            let mut sum = vec![0.0f64; width];
            let mut sum_sq = vec![0.0f64; width];
            for row in activations.chunks_exact(m) {
                let row = &row[c0..c0 + width];
                for j in 0..width {
                    let v = row[j];
                    lo[j] = lo[j].min(v);
                    hi[j] = hi[j].max(v);
                    sum[j] += v as f64;
                    sum_sq[j] += v as f64 * v as f64;
                }
            }
            let mut at_lo = vec![0u64; width];
            for row in activations.chunks_exact(m) {
                for (j, &v) in row[c0..c0 + width].iter().enumerate() {
                    at_lo[j] += (v == lo[j]) as u64;
                }
            }
            for (j, n) in block.iter_mut().enumerate() {
                n.sum += sum[j];
                n.sum_sq += sum_sq[j];
                n.fold_extremes(lo[j], at_lo[j]);
                n.max = n.max.max(hi[j]);
                n.explicit += rows as u64;
            }
        });

        // Σ_i l_ik p_i for all k: (M × B) · (B × D) as f64 GEMMs over row chunks, so the f64
        // copies stay small whatever the batch size.
        const GEMM_ROWS: usize = 1024;
        let cpu = candle_core::Device::Cpu;
        for start in (0..rows).step_by(GEMM_ROWS) {
            let end = (start + GEMM_ROWS).min(rows);
            let p: Vec<f64> = embeddings[start * dim..end * dim]
                .chunks_exact(dim)
                .zip(&inv_norms[start..end])
                .flat_map(|(row, &s)| row.iter().map(move |&x| x as f64 * s))
                .collect();
            let l: Vec<f64> = activations[start * m..end * m].iter().map(|&x| x as f64).collect();
            let p = candle_core::Tensor::from_vec(p, (end - start, dim), &cpu)?;
            let l = candle_core::Tensor::from_vec(l, (end - start, m), &cpu)?;
            let weighted = l.t()?.matmul(&p)?.flatten_all()?.to_vec1::<f64>()?;
            self.weighted_sum
                .par_iter_mut()
                .zip(weighted.par_iter())
                .for_each(|(acc, w)| *acc += w);
        }

        self.add_embedding_sum(embeddings, &inv_norms);
        self.n_rows += rows as u64;
        Ok(())
    }

    fn add_sparse_unchecked(
        &mut self,
        embeddings: &[f32],
        rows: usize,
        activations: SparseRows<'_>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let inv_norms = self.inverse_norms(embeddings)?;
        let dim = self.dim;

        // Column-major (CSC) so that each neuron's work is contiguous and owned by one thread.
        let cols = to_columns(activations, self.n_neurons);
        self.weighted_sum
            .par_chunks_mut(dim)
            .zip(self.neurons.par_iter_mut())
            .enumerate()
            .with_min_len(16)
            .for_each(|(c, (acc, moments))| {
                let span = cols.col_offsets[c]..cols.col_offsets[c + 1];
                let (rows, values) = (&cols.rows[span.clone()], &cols.values[span]);
                for &v in values {
                    moments.sum += v as f64;
                    moments.sum_sq += v as f64 * v as f64;
                    moments.fold_extremes(v, 1);
                    moments.explicit += 1;
                }
                add_weighted_rows(acc, rows, values, &inv_norms, embeddings);
            });

        self.add_embedding_sum(embeddings, &inv_norms);
        self.n_rows += rows as u64;
        Ok(())
    }

    /// The exact per-neuron MonoScore of everything added so far (None = dead neuron).
    pub fn finish(&self) -> MonoScores {
        let scores = self.neuron_stats(false).into_iter().map(|s| s.map(|s| s.score())).collect();
        MonoScores { n: self.n_rows, d: self.dim, scores }
    }

    /// Σ_i p_i over the rows added so far.
    pub fn embedding_sum(&self) -> &[f64] {
        &self.embedding_sum
    }

    /// Per-neuron quantities in the min-max scaled space (None = dead neuron). `keep_w` keeps
    /// the D-vector w_k, which the full-dataset MonoLoss gradient needs.
    pub fn neuron_stats(&self, keep_w: bool) -> Vec<Option<NeuronStats>> {
        let n = self.n_rows as f64;
        self.weighted_sum
            .par_chunks(self.dim.max(1))
            .zip(self.neurons.par_iter())
            .map(|(weighted, moments)| {
                let mut moments = moments.clone();
                let implicit_zeros = self.n_rows - moments.explicit;
                if implicit_zeros > 0 {
                    moments.fold_extremes(0.0, implicit_zeros);
                }
                // Dead: fewer than two images above the minimum (constant neurons included).
                if self.n_rows < 2 || self.n_rows - moments.count_at_min < 2 {
                    return None;
                }
                let (min, range) = (moments.min as f64, moments.max as f64 - moments.min as f64);
                let u = (moments.sum - n * min) / range;
                let v =
                    (moments.sum_sq - 2.0 * min * moments.sum + n * min * min) / (range * range);
                let w: Vec<f64> = weighted
                    .iter()
                    .zip(&self.embedding_sum)
                    .map(|(&w, &s)| (w - min * s) / range)
                    .collect();
                let w_sq: f64 = w.iter().map(|x| x * x).sum();
                Some(NeuronStats {
                    min: moments.min,
                    max: moments.max,
                    u,
                    v,
                    numerator: 0.5 * (w_sq - v),
                    denominator: 0.5 * (u * u - v),
                    w: if keep_w { w } else { Vec::new() },
                })
            })
            .collect()
    }
}

/// Dimensions of `acc` held in registers while one neuron's entries are summed into them
/// (8 AVX-512 or 16 AVX2 registers of f64).
const WEIGHTED_BLOCK: usize = 64;

/// `acc += Σ_e values[e] · inv_norms[r_e] · embeddings[r_e]` over one neuron's entries, one
/// block of dimensions at a time in registers: each element sums its terms in entry order, as
/// a plain loop over entries would, without loading and storing `acc` once per entry.
fn add_weighted_rows(
    acc: &mut [f64],
    rows: &[u32],
    values: &[f32],
    inv_norms: &[f64],
    embeddings: &[f32],
) {
    let dim = acc.len();
    let coef = |r: u32, v: f32| v as f64 * inv_norms[r as usize];
    vectorized!({
        for (start, out) in (0..dim).step_by(WEIGHTED_BLOCK).zip(acc.chunks_mut(WEIGHTED_BLOCK)) {
            let width = out.len();
            if let Ok(out) = <&mut [f64; WEIGHTED_BLOCK]>::try_from(&mut *out) {
                let mut sums = *out;
                for (&r, &v) in rows.iter().zip(values) {
                    let at = r as usize * dim + start;
                    let x: &[f32; WEIGHTED_BLOCK] =
                        embeddings[at..at + WEIGHTED_BLOCK].try_into().expect("block width");
                    let c = coef(r, v);
                    for (s, &x) in sums.iter_mut().zip(x) {
                        *s += c * x as f64;
                    }
                }
                *out = sums;
            } else {
                for (&r, &v) in rows.iter().zip(values) {
                    let at = r as usize * dim + start;
                    let c = coef(r, v);
                    for (s, &x) in out.iter_mut().zip(&embeddings[at..at + width]) {
                        *s += c * x as f64;
                    }
                }
            }
        }
    })
}

/// One live neuron over the whole set, in the scaled space ã = (l − min)/(max − min).
#[derive(Clone, Debug)]
pub struct NeuronStats {
    pub min: f32,
    pub max: f32,
    /// Σ ã, Σ ã², and w = Σ ã p (empty unless asked for).
    pub u: f64,
    pub v: f64,
    pub w: Vec<f64>,
    pub numerator: f64,
    pub denominator: f64,
}

impl NeuronStats {
    pub fn score(&self) -> f64 {
        self.numerator / self.denominator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_rows_sum_each_element_in_entry_order() {
        // Two full register blocks and a partial one; a neuron without entries.
        let (n, dim) = (30, 2 * WEIGHTED_BLOCK + 22);
        let embeddings: Vec<f32> = (0..n * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let inv_norms: Vec<f64> = (0..n).map(|r| 1.0 / (1.0 + r as f64 * 0.13)).collect();
        for entries in [0usize, 1, 17] {
            let rows: Vec<u32> = (0..entries).map(|e| (e * 7 % n) as u32).collect();
            let values: Vec<f32> = (0..entries).map(|e| (e as f32 * 0.91).cos()).collect();
            let start: Vec<f64> = (0..dim).map(|j| j as f64 * 1e-3).collect();
            let mut got = start.clone();
            add_weighted_rows(&mut got, &rows, &values, &inv_norms, &embeddings);
            let mut want = start;
            for (&r, &v) in rows.iter().zip(&values) {
                let coef = v as f64 * inv_norms[r as usize];
                for (j, w) in want.iter_mut().enumerate() {
                    *w += coef * embeddings[r as usize * dim + j] as f64;
                }
            }
            let (got, want): (Vec<u64>, Vec<u64>) = (
                got.iter().map(|x| x.to_bits()).collect(),
                want.iter().map(|x| x.to_bits()).collect(),
            );
            assert_eq!(got, want, "{entries} entries");
        }
    }
}
