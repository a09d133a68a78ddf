//! The trainers (SAE, finetuning) and the training support they share: optimisers, learning-rate
//! schedules and run directories.

pub mod finetune;
pub mod full_mono;
pub mod optim;
pub mod run_dir;
pub mod sae;
pub mod schedule;
