//! Training loops and their optimiser machinery.

pub mod full_mono;
pub mod optim;
pub mod runs;
pub mod sae;
