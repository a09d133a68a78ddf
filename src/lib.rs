//! mono: MonoScore and MonoLoss for vision representations, on candle.
//!
//! The modules form layers; each imports only from the layers listed before it (a test checks
//! this, see docs/architecture.md):
//! base → data → models → encoders → extract → monoscore → sae → layout → train → eval →
//! report → pipeline → bench, and the `mono` binary (src/main.rs) on top.

pub mod base;
pub mod bench;
pub mod data;
pub mod encoders;
pub mod eval;
pub mod extract;
pub mod layout;
pub mod models;
pub mod monoscore;
pub mod pipeline;
pub mod report;
pub mod sae;
pub mod train;

pub use base::config::{self, Config};
