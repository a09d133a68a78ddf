//! The O(N²) pairwise MonoScore, written straight from the definition:
//!   MS_k = Σ_{i<j} ã_ik ã_jk cos(e_i, e_j) / Σ_{i<j} ã_ik ã_jk
//! with ã the per-neuron min-max scaled activations. Slow on purpose: it is the yardstick the
//! one-pass engine is tested against.

use anyhow::{ensure, Result};

use super::MonoScores;

/// `embeddings`: N×D row-major, `activations`: N×M row-major.
pub fn pairwise_monoscore(
    embeddings: &[f32],
    activations: &[f32],
    n: usize,
    d: usize,
    m: usize,
) -> Result<MonoScores> {
    ensure!(embeddings.len() == n * d, "embeddings are not {n}×{d}");
    ensure!(activations.len() == n * m, "activations are not {n}×{m}");

    let unit: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let row: Vec<f64> = embeddings[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect();
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            row.iter().map(|x| x / norm).collect()
        })
        .collect();
    let cosine =
        |i: usize, j: usize| -> f64 { unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum() };
    let mut cos = vec![0.0f64; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            cos[i * n + j] = cosine(i, j);
        }
    }

    let scores = (0..m)
        .map(|k| {
            let raw: Vec<f64> = (0..n).map(|i| activations[i * m + k] as f64).collect();
            let min = raw.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = raw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let scaled: Vec<f64> = raw.iter().map(|&a| (a - min) / (max - min)).collect();
            let activating = raw.iter().filter(|&&a| a > min).count();
            if activating < 2 {
                return None;
            }
            let (mut num, mut den) = (0.0, 0.0);
            for i in 0..n {
                for j in (i + 1)..n {
                    let weight = scaled[i] * scaled[j];
                    num += weight * cos[i * n + j];
                    den += weight;
                }
            }
            Some(num / den)
        })
        .collect();
    Ok(MonoScores { n: n as u64, d, scores })
}
