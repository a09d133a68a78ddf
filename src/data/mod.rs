//! Data sets and the feature store.

pub mod idx;
pub mod images;
pub mod import;
pub mod merge;
pub mod sets;
pub mod store;
