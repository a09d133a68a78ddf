//! Image encoders and their preprocessing.

pub mod preprocess;
