//! The stages as whole jobs: what `mono train` and `mono finetune` do, and what `mono run` does
//! for each stage directory of its plan.

use std::path::Path;

use anyhow::{Context, Result};

use crate::base::config::Config;
use crate::data::sets::open_feature_sets;
use crate::layout::{FinetuneResults, TrainResults, RESULTS_FILE};
use crate::train::sae::{train_sae, SaeTrainInputs};

/// What `mono train` reports.
pub struct TrainOutcome {
    pub steps: usize,
    pub results: TrainResults,
}

/// Trains an SAE on the config's feature stores into `run_dir`, then evaluates it on the
/// evaluation split (results.json, latent_stats.safetensors).
pub fn train(config: &Config, run_dir: &Path, resume: bool) -> Result<TrainOutcome> {
    let _lock = crate::base::lock::lock_dir(run_dir)?;
    let sets = open_feature_sets(config)?;
    let device = crate::base::device::open_device(&config.run.device)?;
    if let (Some(judge), eval) = (&sets.eval_similarity, &sets.eval) {
        eval.check_same_rows(judge)?;
    }
    let inputs =
        SaeTrainInputs { train: &sets.train, train_similarity: sets.train_similarity.as_ref() };
    let trained = train_sae(config, &inputs, run_dir, resume, &device)?;
    let results = crate::eval::evaluate_into(
        run_dir,
        RESULTS_FILE,
        trained.sae.as_ref(),
        &sets.eval,
        sets.eval_similarity.as_ref(),
        config.lambda()?,
        Some(trained.seconds),
        None,
        config.train.batch_size,
        &device,
    )?;
    Ok(TrainOutcome { steps: trained.steps, results })
}

/// Finetunes the config's backbone into `run_dir`.
pub fn finetune(config: &Config, run_dir: &Path, resume: bool) -> Result<FinetuneResults> {
    let _lock = crate::base::lock::lock_dir(run_dir)?;
    crate::train::finetune::finetune(config, run_dir, resume)
}

/// After finetuning, the run directory doubles as an encoder directory: the base model's
/// config.json and preprocessor_config.json sit beside the finetuned model.safetensors.
pub fn make_encoder_dir(finetune_dir: &Path, config: &Config) -> Result<()> {
    let files = crate::encoders::hub::resolve(&config.encoder.model, &config.encoder.revision)?;
    for (src, name) in
        [(&files.config, "config.json"), (&files.preprocessor, "preprocessor_config.json")]
    {
        if let Some(src) = src {
            std::fs::copy(src, finetune_dir.join(name)).with_context(|| {
                format!("cannot copy {} into {}", src.display(), finetune_dir.display())
            })?;
        }
    }
    Ok(())
}
