//! The feature stores a config names: features.dir (or <run dir>/features) holds one store per
//! split, and mono.similarity_store, when set, a judge encoder's stores of the same images.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::store::{open_split, FeatureStore};
use crate::base::config::Config;

pub struct FeatureSets {
    pub train: FeatureStore,
    pub train_similarity: Option<FeatureStore>,
    pub eval: FeatureStore,
    pub eval_similarity: Option<FeatureStore>,
}

/// Where the config's features live.
pub fn features_dir(config: &Config) -> PathBuf {
    config.features.dir.clone().unwrap_or_else(|| config.run_dir().join("features"))
}

/// Opens the train and eval splits (and their judges) before any work starts.
pub fn open_feature_sets(config: &Config) -> Result<FeatureSets> {
    let dir = features_dir(config);
    let (train_split, eval_split) = (&config.data.train_split, &config.data.eval_split);
    let train = open_split(&dir, train_split)
        .with_context(|| format!("features.dir: data.train_split = {train_split:?}"))?;
    let eval = open_split(&dir, eval_split)
        .with_context(|| format!("features.dir: data.eval_split = {eval_split:?}"))?;
    let (train_similarity, eval_similarity) = match &config.mono.similarity_store {
        Some(judge) => (
            Some(open_split(judge, train_split).context("mono.similarity_store")?),
            Some(open_split(judge, eval_split).context("mono.similarity_store")?),
        ),
        None => (None, None),
    };
    Ok(FeatureSets { train, train_similarity, eval, eval_similarity })
}
