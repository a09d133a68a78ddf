//! mono: MonoScore and MonoLoss for vision representations, on candle.

pub mod alloc;
pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod encoders;
pub mod eval;
pub mod extract;
pub mod finetune;
pub mod io;
pub mod monoscore;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod sae;
pub mod sparse;
pub mod train;

pub use config::Config;
