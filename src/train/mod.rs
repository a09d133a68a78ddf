//! Training loops and their optimiser machinery.

pub mod optim;
