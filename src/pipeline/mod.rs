//! `mono run CONFIG`: the stages a config names (finetune → extract → train → report), with
//! finished stages reused when their inputs are unchanged, and λ sweeps.
//!
//! Every stage writes into a directory named by a hash of exactly the config and inputs it
//! depends on (`finetune-<key>`, `features-<key>`, `train-<key>` under the run directory), so a
//! rerun after a crash or a tweak redoes only what changed, and sweep children share whatever
//! they have in common (e.g. the extracted features). Interrupted stages resume.

pub mod keys;
pub mod stages;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::base::config::{Config, Stage};
use crate::layout::{
    read_json, write_json, ChildResults, ChildSummary, RunSummary, CHECKPOINTS_DIR, CONFIG_FILE,
    REPORT_FILE, RESULTS_FILE,
};
use keys::{extract_key, feature_set, finetune_key, train_key};

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

/// Computes every child's stage directories.
pub fn plan(config: &Config) -> Result<Vec<ChildPlan>> {
    let run_dir = config.run_dir();
    let stages = &config.run.stages;
    children(config)?
        .into_iter()
        .map(|child| {
            let c = &child.config;
            let finetune = stages.contains(&Stage::Finetune).then(|| finetune_key(c)).transpose()?;
            let finetune_dir = finetune.as_ref().map(|k| run_dir.join(format!("finetune-{k}")));
            let extracts = stages.contains(&Stage::Extract);
            let (features_dir, features_identity) = match (&c.features.dir, extracts) {
                (Some(dir), false) => (Some(dir.clone()), feature_set(dir, c)?),
                (Some(dir), true) => (Some(dir.clone()), json!(extract_key(c, finetune.as_deref())?)),
                (None, true) => {
                    let k = extract_key(c, finetune.as_deref())?;
                    (Some(run_dir.join(format!("features-{k}"))), json!(k))
                }
                (None, false) if stages.contains(&Stage::Train) => bail!("run.stages has \"train\" without \"extract\": set features.dir to an existing feature set"),
                (None, false) => (None, json!(null)),
            };
            let train_dir = match stages.contains(&Stage::Train) {
                true => Some(run_dir.join(format!("train-{}", train_key(c, features_identity)?))),
                false => None,
            };
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
    dir.join(CHECKPOINTS_DIR).read_dir().is_ok_and(|mut d| d.next().is_some())
}

fn features_done(dir: &Path, c: &Config) -> bool {
    [&c.data.train_split, &c.data.eval_split].iter().all(|s| {
        dir.join(crate::data::store::split_dir(s)).join(crate::data::store::MANIFEST_FILE).is_file()
    })
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
                    status(d.join(RESULTS_FILE).is_file(), has_checkpoints(d))
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
                status(d.join(RESULTS_FILE).is_file(), has_checkpoints(d))
            ));
        }
    }
    if config.run.stages.contains(&Stage::Report) {
        lines.push(format!("  report: {}", config.run_dir().join(REPORT_FILE).display()));
    }
    lines
}

fn run_child(plan: &ChildPlan) -> Result<ChildResults> {
    let mut c = plan.child.config.clone();
    let stages = c.run.stages.clone();
    let mut results = ChildResults::default();
    if let Some(dir) = &plan.finetune_dir {
        if !dir.join(RESULTS_FILE).is_file() {
            stages::finetune(&c, dir, has_checkpoints(dir))?;
            stages::make_encoder_dir(dir, &c)?;
        }
        results.finetune = Some(read_json(&dir.join(RESULTS_FILE))?);
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
        if !dir.join(RESULTS_FILE).is_file() {
            stages::train(&c, dir, has_checkpoints(dir))?;
        }
        results.train = Some(read_json(&dir.join(RESULTS_FILE))?);
    }
    Ok(results)
}

/// Runs the plan; returns the summary written to `<run dir>/results.json`.
pub fn run(config: &Config, plans: &[ChildPlan]) -> Result<RunSummary> {
    let run_dir = config.run_dir();
    let _lock = crate::base::lock::lock_dir(&run_dir)?;
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let mut runs = Vec::new();
    for p in plans {
        let results = run_child(p).with_context(|| format!("run {}", p.child.label))?;
        let overrides: BTreeMap<String, serde_json::Value> = p
            .child
            .overrides
            .iter()
            .map(|(k, v)| Ok((k.clone(), serde_json::to_value(v)?)))
            .collect::<Result<_>>()?;
        runs.push(ChildSummary {
            label: p.child.label.clone(),
            overrides,
            finetune_dir: p.finetune_dir.clone(),
            features_dir: p.features_dir.clone(),
            train_dir: p.train_dir.clone(),
            results,
        });
    }
    // The config and the summary are written together, once every stage has finished.
    let summary =
        RunSummary { run: config.run.name.clone(), stages: config.run.stages.clone(), runs };
    crate::base::io::write_atomic(
        &run_dir.join(CONFIG_FILE),
        toml::to_string_pretty(config)?.as_bytes(),
    )?;
    write_json(&run_dir.join(RESULTS_FILE), &summary)?;
    if config.run.stages.contains(&Stage::Report) {
        crate::report::build(&run_dir)?;
    }
    Ok(summary)
}
