//! Image data sets and their decoding, preprocessing and augmentation; the feature store,
//! `features import` and `merge`.

pub mod augment;
pub mod batch;
pub mod idx;
pub mod images;
pub mod import;
pub mod merge;
pub mod preprocess;
pub mod sets;
pub mod store;
