//! `mono bench ...`: benchmarks that print timings and ratios (never asserted in tests).

pub mod decode;
pub mod extract;
pub mod finetune;
pub mod gemm;
pub mod growth;
pub mod monoscore;
pub mod scale;
pub mod synthetic;
pub mod train;

/// The median of timings (the upper one of an even count): robust to the one-off page faults
/// and machine noise that a mean carries into a handful of steps.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
