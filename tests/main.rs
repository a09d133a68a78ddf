//! The integration tests, one binary (candle is linked once): one module per area.

mod common;

mod architecture;
mod bench;
mod cli_features;
mod cli_score;
mod config;
mod datasets;
mod docs;
mod encoders;
mod extract;
mod finetune;
mod finetune_towers;
mod hub;
mod idx;
mod jpeg;
mod monoscore;
mod pipeline;
mod portable;
mod preprocess;
mod reliability;
mod sae;
mod saelens;
mod scale;
mod store;
mod train;
