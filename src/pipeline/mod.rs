//! `mono run CONFIG`: the stages a config names (finetune → extract → train → report), with
//! finished stages reused when their inputs are unchanged, and λ sweeps.
//!
//! Every stage writes into a directory named by a hash of exactly the config and inputs it
//! depends on (`finetune-<key>`, `features-<key>`, `train-<key>` under the run directory), so a
//! rerun after a crash or a tweak redoes only what changed, and sweep children share whatever
//! they have in common (e.g. the extracted features). Interrupted stages resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::base::config::{Config, Stage};
use crate::data::store::open_split;

/// FNV-1a 64 of the canonical JSON of `value` (keys sorted), as 12 hex digits.
pub fn stable_key(value: &serde_json::Value) -> String {
    let text = serde_json::to_string(value).expect("JSON values serialise");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

fn section<T: serde::Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).expect("config sections serialise")
}

/// One run of a sweep (or the only run).
#[derive(Clone, Debug)]
pub struct Child {
    /// e.g. "lambda=0.0003" or "base" when there is no sweep.
    pub label: String,
    pub overrides: Vec<(String, toml::Value)>,
    pub config: Config,
}

/// The sweep's children: the cartesian product of the `[sweep]` lists, in file order.
pub fn children(config: &Config) -> Result<Vec<Child>> {
    let mut out =
        vec![Child { label: String::new(), overrides: Vec::new(), config: config.clone() }];
    for (key, values) in &config.sweep {
        let mut next = Vec::new();
        for child in &out {
            for value in values {
                let mut c = child.clone();
                c.config = c
                    .config
                    .with_override(key, value.clone())
                    .with_context(|| format!("sweep.{key} = {value}"))?;
                c.overrides.push((key.clone(), value.clone()));
                next.push(c);
            }
        }
        out = next;
    }
    for c in &mut out {
        c.config.sweep.clear();
        c.label = if c.overrides.is_empty() {
            "base".into()
        } else {
            c.overrides.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        };
    }
    Ok(out)
}

/// Where each stage of a child lives, and whether it is already done.
#[derive(Clone, Debug)]
pub struct ChildPlan {
    pub child: Child,
    pub finetune_dir: Option<PathBuf>,
    pub features_dir: Option<PathBuf>,
    pub train_dir: Option<PathBuf>,
}

fn finetune_key(c: &Config) -> String {
    stable_key(&json!({
        "encoder": section(&c.encoder), "data": section(&c.data), "finetune": section(&c.finetune),
        "lambda": c.finetune.lambda.or(c.mono.lambda), "eps": c.mono.eps, "seed": c.run.seed,
        "log_every": c.train.log_every,
    }))
}

fn extract_key(c: &Config, finetune: Option<&str>) -> String {
    let mut encoder = section(&c.encoder);
    encoder["batch_size"] = json!(null); // does not change the features
    stable_key(&json!({
        "encoder": encoder, "finetuned": finetune, "data": section(&c.data),
        "dtype": section(&c.features.dtype), "shard_size": c.features.shard_size,
    }))
}

/// Manifests of a user-provided feature set: its identity for the training key.
fn manifests(dir: &Path, c: &Config) -> serde_json::Value {
    let read = |split: &str| {
        open_split(dir, split).ok().map(|s| section(&s.manifest().info)).unwrap_or(json!(null))
    };
    json!({"train": read(&c.data.train_split), "eval": read(&c.data.eval_split)})
}

fn train_key(c: &Config, features: &serde_json::Value) -> Result<String> {
    let mut mono = section(&c.mono);
    mono["lambda"] = json!(c.lambda()?);
    if let Some(judge) = &c.mono.similarity_store {
        mono["similarity_store"] = manifests(judge, c);
    }
    Ok(stable_key(&json!({
        "sae": section(&c.sae), "train": section(&c.train), "mono": mono, "seed": c.run.seed,
        "shuffle_buffer": c.features.shuffle_buffer, "features": features, "splits": [c.data.train_split, c.data.eval_split],
    })))
}

/// Computes every child's stage directories.
pub fn plan(config: &Config) -> Result<Vec<ChildPlan>> {
    let run_dir = config.run_dir();
    let stages = &config.run.stages;
    children(config)?
        .into_iter()
        .map(|child| {
            let c = &child.config;
            let finetune = stages.contains(&Stage::Finetune).then(|| finetune_key(c));
            let finetune_dir = finetune.as_ref().map(|k| run_dir.join(format!("finetune-{k}")));
            let (features_dir, features_identity) = match (&c.features.dir, stages.contains(&Stage::Extract)) {
                (Some(dir), false) => (Some(dir.clone()), manifests(dir, c)),
                (Some(dir), true) => (Some(dir.clone()), json!(extract_key(c, finetune.as_deref()))),
                (None, true) => {
                    let k = extract_key(c, finetune.as_deref());
                    (Some(run_dir.join(format!("features-{k}"))), json!(k))
                }
                (None, false) if stages.contains(&Stage::Train) => bail!("run.stages has \"train\" without \"extract\": set features.dir to an existing feature set"),
                (None, false) => (None, json!(null)),
            };
            let train_dir = if stages.contains(&Stage::Train) { Some(run_dir.join(format!("train-{}", train_key(c, &features_identity)?))) } else { None };
            Ok(ChildPlan { child, finetune_dir, features_dir, train_dir })
        })
        .collect()
}

fn status(done: bool, started: bool) -> &'static str {
    match (done, started) {
        (true, _) => "cached",
        (false, true) => "resume",
        _ => "run",
    }
}

fn has_checkpoints(dir: &Path) -> bool {
    dir.join("checkpoints").read_dir().is_ok_and(|mut d| d.next().is_some())
}

fn features_done(dir: &Path, c: &Config) -> bool {
    [&c.data.train_split, &c.data.eval_split]
        .iter()
        .all(|s| dir.join(crate::data::store::split_dir(s)).join("manifest.json").is_file())
}

/// The plan as the lines `mono run` prints first.
pub fn describe(config: &Config, plans: &[ChildPlan]) -> Vec<String> {
    let mut lines = vec![format!(
        "mono run → {} ({} run{})",
        config.run_dir().display(),
        plans.len(),
        if plans.len() == 1 { "" } else { "s" }
    )];
    let mut seen = std::collections::HashSet::new();
    for p in plans {
        let c = &p.child.config;
        let tag = if plans.len() > 1 { format!(" [{}]", p.child.label) } else { String::new() };
        if let Some(d) = &p.finetune_dir {
            if seen.insert(d.clone()) {
                lines.push(format!(
                    "  finetune{tag}: {} — {}",
                    d.display(),
                    status(d.join("results.json").is_file(), has_checkpoints(d))
                ));
            }
        }
        if let (Some(d), true) = (&p.features_dir, c.run.stages.contains(&Stage::Extract)) {
            if seen.insert(d.clone()) {
                lines.push(format!(
                    "  extract: {} — {}",
                    d.display(),
                    status(features_done(d, c), d.exists())
                ));
            }
        }
        if let Some(d) = &p.train_dir {
            lines.push(format!(
                "  train{tag}: {} — {}",
                d.display(),
                status(d.join("results.json").is_file(), has_checkpoints(d))
            ));
        }
    }
    if config.run.stages.contains(&Stage::Report) {
        lines.push(format!("  report: {}", config.run_dir().join("report.html").display()));
    }
    lines
}

/// After finetuning, the run directory doubles as an encoder directory: the base model's
/// config.json and preprocessor_config.json sit beside the finetuned model.safetensors.
fn make_encoder_dir(finetune_dir: &Path, config: &Config) -> Result<()> {
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

fn run_child(plan: &ChildPlan) -> Result<serde_json::Value> {
    let mut c = plan.child.config.clone();
    let stages = c.run.stages.clone();
    let mut results = serde_json::Map::new();
    if let Some(dir) = &plan.finetune_dir {
        if !dir.join("results.json").is_file() {
            let mut fc = c.clone();
            fc.run.output = dir.parent().expect("inside the run dir").to_path_buf();
            fc.run.name = dir.file_name().expect("named").to_string_lossy().to_string();
            crate::train::finetune::finetune_from_config(&fc, has_checkpoints(dir))?;
            make_encoder_dir(dir, &c)?;
        }
        results.insert("finetune".into(), read_json(&dir.join("results.json"))?);
        // Later stages extract with the finetuned backbone.
        c.encoder.model = dir.display().to_string();
    }
    if let Some(dir) = &plan.features_dir {
        c.features.dir = Some(dir.clone());
        if stages.contains(&Stage::Extract) && !features_done(dir, &c) {
            crate::extract::extract(&c, &crate::extract::ExtractOptions::default())?;
        }
    }
    if let Some(dir) = &plan.train_dir {
        if !dir.join(crate::train::sae::RESULTS_FILE).is_file() {
            let sets = crate::data::sets::open_feature_sets(&c)?;
            let device = crate::base::device::open_device(&c.run.device)?;
            let inputs = crate::train::sae::SaeTrainInputs {
                train: &sets.train,
                train_similarity: sets.train_similarity.as_ref(),
                eval: Some(&sets.eval),
                eval_similarity: sets.eval_similarity.as_ref(),
            };
            crate::train::sae::train_sae(&c, &inputs, dir, has_checkpoints(dir), &device)?;
        }
        results.insert("train".into(), read_json(&dir.join(crate::train::sae::RESULTS_FILE))?);
    }
    Ok(serde_json::Value::Object(results))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

pub const SUMMARY_FILE: &str = "results.json";

/// Runs the plan; returns the summary written to `<run dir>/results.json`.
pub fn run(config: &Config, plans: &[ChildPlan]) -> Result<serde_json::Value> {
    let run_dir = config.run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let mut runs = Vec::new();
    for p in plans {
        let results = run_child(p).with_context(|| format!("run {}", p.child.label))?;
        let overrides: BTreeMap<String, serde_json::Value> =
            p.child.overrides.iter().map(|(k, v)| (k.clone(), section(v))).collect();
        runs.push(json!({
            "label": p.child.label,
            "overrides": overrides,
            "finetune_dir": p.finetune_dir,
            "features_dir": p.features_dir,
            "train_dir": p.train_dir,
            "results": results,
        }));
    }
    // The config and the summary are written together, once every stage has finished.
    let summary = json!({"run": config.run.name, "stages": config.run.stages, "runs": runs});
    crate::base::io::write_atomic(
        &run_dir.join("config.toml"),
        toml::to_string_pretty(config)?.as_bytes(),
    )?;
    crate::base::io::write_json_atomic(&run_dir.join(SUMMARY_FILE), &summary)?;
    if config.run.stages.contains(&Stage::Report) {
        crate::report::build(&run_dir)?;
    }
    Ok(summary)
}
