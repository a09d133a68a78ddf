//! Rows of a feature store looked up by image path, e.g. the similarity embeddings of the images
//! of a data set, in the data set's item order.

use std::collections::HashMap;

use anyhow::{ensure, Result};

use super::FeatureStore;
use crate::data::images::ImageDataset;

/// Rows of a similarity feature store, by image path.
pub struct SimilarityLookup {
    store: FeatureStore,
    /// dataset item → store row.
    rows: Vec<u32>,
}

impl SimilarityLookup {
    /// Maps every item of `dataset` to its row in `store`; every image must be there.
    pub fn new(store: FeatureStore, dataset: &dyn ImageDataset) -> Result<Self> {
        let mut by_path: HashMap<String, u32> = HashMap::with_capacity(store.len());
        for range in store.shard_ranges() {
            let first = range.start;
            for (i, path) in store.paths(range.start, range.end)?.into_iter().enumerate() {
                by_path.insert(path, (first + i) as u32);
            }
        }
        let mut rows = Vec::with_capacity(dataset.len());
        let mut missing = Vec::new();
        for i in 0..dataset.len() {
            let path = dataset.path(i);
            match by_path.get(path.as_str()) {
                Some(&r) => rows.push(r),
                None => {
                    missing.push(path);
                    rows.push(0);
                }
            }
        }
        ensure!(
            missing.is_empty(),
            "similarity store {} lacks {} of the {} images of the data set (e.g. {}); extract it from the same images",
            store.dir().display(),
            missing.len(),
            dataset.len(),
            missing[0]
        );
        Ok(Self { store, rows })
    }

    pub fn dim(&self) -> usize {
        self.store.dim()
    }

    /// (items, D) embeddings of the given items.
    pub fn read(&self, items: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let rows: Vec<u32> = items.iter().map(|&i| self.rows[i]).collect();
        self.store.read_rows(&rows, out)
    }
}
