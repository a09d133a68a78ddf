//! Range and relation checks of a parsed config; the first failure is the error, naming the key
//! and its value (`sae.k = 9000 must be ≤ sae.n_latents = 8192`).

use anyhow::{bail, Result};

use super::{Config, EncoderKind, EncoderOutput, SaeConfig};

impl Config {
    /// Checks ranges and relations between keys.
    pub fn validate(&self) -> Result<()> {
        let mut v = Validator::default();
        self.validate_run(&mut v);
        self.validate_encoder_and_data(&mut v);
        validate_sae(&self.sae, &mut v);
        self.validate_train_and_mono(&mut v);
        self.validate_finetune(&mut v);
        v.finish()?;
        self.validate_sweep()
    }

    fn validate_run(&self, v: &mut Validator) {
        v.check(is_plain_name(&self.run.name), || {
            format!(
                "run.name = {:?} must be a plain directory name (no path separators, not \".\" or \"..\", not starting with \".\")",
                self.run.name
            )
        });
        if let Err(e) = crate::base::device::DeviceSpec::parse(&self.run.device) {
            v.fail(format!("run.device = {:?}: {e}", self.run.device));
        }
        v.positive_opt("run.threads", self.run.threads);
        v.positive("run.log_every", self.run.log_every);
        v.check(!self.run.stages.is_empty(), || "run.stages must name at least one stage".into());
        v.check(self.run.stages.windows(2).all(|w| w[0] < w[1]), || {
        format!(
            "run.stages = {} must be in the order finetune, extract, train, report, without repeats",
            serde_json::to_string(&self.run.stages).unwrap_or_default()
        )
    });
    }

    fn validate_encoder_and_data(&self, v: &mut Validator) {
        v.check(!self.encoder.model.trim().is_empty(), || "encoder.model must not be empty".into());
        v.positive("encoder.batch_size", self.encoder.batch_size);
        let output_ok = matches!(
            (self.encoder.kind, self.encoder.output()),
            (EncoderKind::Clip, EncoderOutput::Pooler | EncoderOutput::ImageEmbeds)
                | (EncoderKind::Siglip2, EncoderOutput::Pooled)
                | (EncoderKind::Vit, EncoderOutput::Cls)
                | (EncoderKind::Resnet50, EncoderOutput::Pooled)
        );
        v.check(output_ok, || {
            format!(
                "encoder.output = {:?} is not an output of encoder.kind = {:?}",
                self.encoder.output(),
                self.encoder.kind
            )
        });

        for (key, split) in [
            ("data.train_split", &self.data.train_split),
            ("data.eval_split", &self.data.eval_split),
        ] {
            // "." is a folder data set's root itself; a slice like "train[0:1000]" is allowed.
            let base = split.split('[').next().unwrap_or_default();
            v.check(split == "." || is_plain_name(base), || {
                format!("{key} = {split:?} must be a plain split name (e.g. \"train\", \"val[0:1000]\")")
            });
        }
        v.positive_opt("data.limit", self.data.limit);
        v.positive_opt("data.workers", self.data.workers);
        v.positive("features.shard_size", self.features.shard_size);
    }

    fn validate_train_and_mono(&self, v: &mut Validator) {
        let t = &self.train;
        v.positive("train.epochs", t.epochs);
        v.positive("train.batch_size", t.batch_size);
        v.check(t.batch_size >= 2, || {
            format!("train.batch_size = {} must be ≥ 2 (MonoLoss compares pairs)", t.batch_size)
        });
        v.positive_f("train.lr", t.lr);
        v.positive_f("train.adam_eps", t.adam_eps);
        for (i, b) in t.adam_betas.iter().enumerate() {
            v.check((0.0..1.0).contains(b), || {
                format!("train.adam_betas[{i}] = {b} must be in [0, 1)")
            });
        }
        if let Some(c) = t.grad_clip {
            v.positive_f("train.grad_clip", c);
        }

        v.positive_opt("train.max_steps", t.max_steps);

        let m = &self.mono;
        if let Some(l) = m.lambda {
            v.non_negative("mono.lambda", l);
        }
        v.positive("mono.period", m.period);
        v.positive_f("mono.eps", m.eps);
        v.check(
            !matches!(t.schedule, super::ScheduleKind::Step),
            || "train.schedule = \"step\" is for finetuning (finetune.step_size epochs); use constant, linear or cosine".into(),
        );
        let entries = t.batch_size as u64 * self.sae.n_latents() as u64;
        v.check(entries < 1 << 32, || {
            format!(
                "train.batch_size × sae.n_latents = {entries} must be < 2^32 (the selection counts \
                 entries of a batch in u32)"
            )
        });
        v.check(self.sae.dead_after() <= MAX_DEAD_AFTER, || {
            format!("sae.dead_after = {} must be ≤ {MAX_DEAD_AFTER}", self.sae.dead_after())
        });
    }

    fn validate_finetune(&self, v: &mut Validator) {
        let f = &self.finetune;
        if let Some(l) = f.lambda {
            v.non_negative("finetune.lambda", l);
        }
        v.positive("finetune.expansion", f.expansion);
        v.positive_opt("finetune.k", f.k);
        v.positive("finetune.epochs", f.epochs);
        v.positive("finetune.batch_size", f.batch_size);
        v.check(f.batch_size >= 2, || {
            format!("finetune.batch_size = {} must be ≥ 2 (MonoLoss compares pairs)", f.batch_size)
        });
        v.positive_f("finetune.lr", f.lr);
        v.check((0.0..1.0).contains(&f.momentum), || {
            format!("finetune.momentum = {} must be in [0, 1)", f.momentum)
        });
        v.non_negative("finetune.weight_decay", f.weight_decay);
        v.non_negative("finetune.norm_weight_decay", f.norm_weight_decay);
        v.check(f.warmup_epochs < f.epochs, || {
            format!(
                "finetune.warmup_epochs = {} must be < finetune.epochs = {}",
                f.warmup_epochs, f.epochs
            )
        });
        v.positive("finetune.step_size", f.step_size);
        v.check(f.gamma > 0.0 && f.gamma <= 1.0, || {
            format!("finetune.gamma = {} must be in (0, 1]", f.gamma)
        });
        v.check((0.0..1.0).contains(&f.label_smoothing), || {
            format!("finetune.label_smoothing = {} must be in [0, 1)", f.label_smoothing)
        });
        if let Some(c) = f.grad_clip {
            v.positive_f("finetune.grad_clip", c);
        }
        v.positive_opt("finetune.lora_rank", f.lora_rank);
        v.positive_f("finetune.lora_alpha", f.lora_alpha);
        v.positive("finetune.ema_steps", f.ema_steps);
        v.positive_opt("finetune.train_size", f.train_size.map(|s| s as usize));
        v.positive_opt("finetune.eval_resize", f.eval_resize.map(|s| s as usize));
        if let Some(d) = f.ema_decay {
            v.check(d > 0.0 && d < 1.0, || format!("finetune.ema_decay = {d} must be in (0, 1)"));
        }
        v.check(!(f.reuse_head && f.topk_layer), || "finetune.reuse_head = true needs finetune.topk_layer = false (the fc head reads the backbone features)".into());
        v.check(!(f.reuse_head && self.encoder.kind != EncoderKind::Resnet50), || {
        format!("finetune.reuse_head applies to encoder.kind = \"resnet50\" (its ImageNet fc head), not {:?}", self.encoder.kind)
    });
        v.check(!(f.lora_rank.is_some() && self.encoder.kind == EncoderKind::Resnet50), || {
        "finetune.lora_rank applies to ViT attention projections; encoder.kind = \"resnet50\" has none".into()
    });
    }
}

/// Counters of samples since a latent fired are exact below this (f32 on devices).
const MAX_DEAD_AFTER: u64 = 1 << 24;

fn validate_sae(sae: &SaeConfig, v: &mut Validator) {
    let m = sae.n_latents();
    v.positive("sae.n_latents", m);
    v.positive("sae.dead_after", sae.dead_after() as usize);
    if let Some((k, k_aux, aux_coef)) = sae.topk() {
        v.positive("sae.k", k);
        v.check(k <= m, || format!("sae.k = {k} must be ≤ sae.n_latents = {m}"));
        v.check(k_aux <= m || k_aux == default_k_aux(sae), || {
            format!("sae.k_aux = {k_aux} must be ≤ sae.n_latents = {m}")
        });
        v.non_negative("sae.aux_coef", aux_coef);
    }
    match sae {
        SaeConfig::Jumprelu(c) => {
            v.positive_f("sae.jumprelu_bandwidth", c.jumprelu_bandwidth);
            v.finite("sae.jumprelu_init_log_threshold", c.jumprelu_init_log_threshold);
            v.non_negative("sae.l0_coef", c.l0_coef);
        }
        SaeConfig::Relu(c) => v.non_negative("sae.l1_coef", c.l1_coef),
        SaeConfig::Topk(_) | SaeConfig::BatchTopk(_) => {}
    }
}

/// The default k_aux of the kind (used as "at most n_latents" for small SAEs).
fn default_k_aux(sae: &SaeConfig) -> usize {
    SaeConfig::of_kind(sae.kind()).topk().map_or(0, |(_, k_aux, _)| k_aux)
}

/// Collects the first failed check.
#[derive(Default)]
pub(super) struct Validator {
    first_error: Option<String>,
}

impl Validator {
    fn fail(&mut self, message: String) {
        self.first_error.get_or_insert(message);
    }

    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(message());
        }
    }

    fn positive(&mut self, key: &str, value: usize) {
        self.check(value > 0, || format!("{key} = {value} must be > 0"));
    }

    fn positive_opt(&mut self, key: &str, value: Option<usize>) {
        if let Some(v) = value {
            self.positive(key, v);
        }
    }

    fn finite(&mut self, key: &str, value: f64) {
        self.check(value.is_finite(), || format!("{key} = {value} must be a finite number"));
    }

    fn positive_f(&mut self, key: &str, value: f64) {
        self.check(value.is_finite() && value > 0.0, || format!("{key} = {value} must be > 0"));
    }

    fn non_negative(&mut self, key: &str, value: f64) {
        self.check(value.is_finite() && value >= 0.0, || format!("{key} = {value} must be ≥ 0"));
    }

    fn finish(self) -> Result<()> {
        match self.first_error {
            Some(e) => bail!(e),
            None => Ok(()),
        }
    }
}

/// A name that stays one directory inside its parent: non-empty, no path separators, not "."
/// or "..", not hidden (names starting with "." are mono's own lock and staging files).
pub fn is_plain_name(name: &str) -> bool {
    !name.trim().is_empty() && !name.contains(['/', '\\', '\0']) && !name.starts_with('.')
}
