//! MonoScore (Pach et al., 2025) and MonoLoss (Nasiri-Sarvi et al., 2026): the metric, its exact
//! linear-time streaming form, the pairwise reference, and the differentiable batch loss.

mod accumulator;
pub mod files;
mod loss;
mod reference;
pub(crate) mod sparse_loss;

pub use crate::base::sparse::{SparseBatch, SparseRows};
pub use accumulator::{MonoScoreAccumulator, NeuronStats, ScorePath, SPARSE_DENSITY_LIMIT};
pub use loss::{batch_mono_loss, dense_batch_mono_loss, BatchMono, BatchMonoLoss};
pub use reference::pairwise_monoscore;

use serde::{Deserialize, Serialize};

/// Per-neuron MonoScores over N images; `None` marks a dead neuron (fewer than two images
/// above its minimum, constant neurons included). Dead neurons are never averaged in.
#[derive(Clone, Debug, PartialEq)]
pub struct MonoScores {
    pub n: u64,
    pub d: usize,
    pub scores: Vec<Option<f64>>,
}

/// Mean and median over live neurons, with the dead ones counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonoScoreSummary {
    pub mean: Option<f64>,
    pub median: Option<f64>,
    pub live: usize,
    pub dead: usize,
}

impl MonoScores {
    pub fn m(&self) -> usize {
        self.scores.len()
    }

    pub fn live_scores(&self) -> Vec<f64> {
        self.scores.iter().flatten().copied().collect()
    }

    pub fn summary(&self) -> MonoScoreSummary {
        let mut live = self.live_scores();
        let dead = self.scores.len() - live.len();
        if live.is_empty() {
            return MonoScoreSummary { mean: None, median: None, live: 0, dead };
        }
        let mean = live.iter().sum::<f64>() / live.len() as f64;
        live.sort_by(f64::total_cmp);
        let mid = live.len() / 2;
        let median =
            if live.len() % 2 == 1 { live[mid] } else { 0.5 * (live[mid - 1] + live[mid]) };
        MonoScoreSummary { mean: Some(mean), median: Some(median), live: live.len(), dead }
    }

    /// The `mono score` JSON document: `{n, d, m, mean, median, live, dead, scores}`.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.summary();
        serde_json::json!({
            "n": self.n,
            "d": self.d,
            "m": self.m(),
            "mean": s.mean,
            "median": s.median,
            "live": s.live,
            "dead": s.dead,
            "scores": self.scores,
        })
    }

    /// Largest |a − b| / max(|b|, floor) over neurons live in both; errors if liveness differs.
    pub fn max_relative_difference(
        &self,
        reference: &MonoScores,
        floor: f64,
    ) -> anyhow::Result<f64> {
        anyhow::ensure!(self.scores.len() == reference.scores.len(), "different neuron counts");
        let mut worst = 0.0f64;
        for (k, (a, b)) in self.scores.iter().zip(&reference.scores).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => worst = worst.max((a - b).abs() / b.abs().max(floor)),
                (None, None) => {}
                _ => anyhow::bail!(
                    "neuron {k} is live in one result and dead in the other ({a:?} vs {b:?})"
                ),
            }
        }
        Ok(worst)
    }
}
