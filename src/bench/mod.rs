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
