//! `[sae]`: one struct of keys per architecture, chosen by `kind` (default batch_topk). A key of
//! another architecture is an unknown key (`sae.l1_coef` with `kind = "topk"` is an error that
//! names the key and its line). Defaults are each architecture's paper values.

use serde::{Deserialize, Deserializer, Serialize};

use super::parse::nested_error;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SaeKind {
    Topk,
    BatchTopk,
    Jumprelu,
    Relu,
}

/// TopK (OpenAI style): the k largest pre-activations of each sample.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopkConfig {
    pub n_latents: usize,
    /// Active latents per sample.
    pub k: usize,
    /// AuxK loss coefficient.
    pub aux_coef: f64,
    /// Dead latents used by the AuxK loss (at most n_latents).
    pub k_aux: usize,
    /// A latent that has not fired for this many training samples counts as dead.
    pub dead_after: u64,
    /// Per-sample input standardisation (OpenAI style).
    pub normalize_input: bool,
    /// One weight matrix for encoder and decoder (the reference TopK: the decoder is the
    /// encoder's transpose at every step); false = tied at initialisation only.
    pub tied_decoder: bool,
    /// Every this many steps, dead latents restart from a training sample (the reference TopK
    /// scripts: 10,000); 0 = never.
    pub reinit_dead_every: usize,
    /// Start training from this SAE directory (SAELens layout, mono's or not) instead of a
    /// fresh initialisation.
    pub init: Option<std::path::PathBuf>,
}

impl Default for TopkConfig {
    fn default() -> Self {
        Self {
            n_latents: 8192,
            k: 64,
            aux_coef: 1.0 / 32.0,
            k_aux: 64,
            dead_after: 10_000_000,
            normalize_input: true,
            tied_decoder: true,
            reinit_dead_every: 10_000,
            init: None,
        }
    }
}

/// BatchTopK: the k·B largest pre-activations of a batch of B samples; a learned threshold at
/// inference.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchTopkConfig {
    pub n_latents: usize,
    /// Active latents per sample, on average over a batch.
    pub k: usize,
    pub aux_coef: f64,
    pub k_aux: usize,
    pub dead_after: u64,
    pub normalize_input: bool,
    /// An encoder bias; the reference BatchTopK has none (its pre-activations are
    /// (x − b_dec)·W_enc).
    pub encoder_bias: bool,
    /// Start training from this SAE directory (SAELens layout, mono's or not) instead of a
    /// fresh initialisation.
    pub init: Option<std::path::PathBuf>,
}

impl Default for BatchTopkConfig {
    fn default() -> Self {
        Self {
            n_latents: 8192,
            k: 64,
            aux_coef: 1.0 / 32.0,
            k_aux: 512,
            dead_after: 10_000_000,
            normalize_input: false,
            encoder_bias: false,
            init: None,
        }
    }
}

/// JumpReLU: a learned per-latent threshold with an L0 penalty.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JumpReluConfig {
    pub n_latents: usize,
    /// Rectangle-kernel bandwidth of the threshold pseudo-gradient.
    pub jumprelu_bandwidth: f64,
    /// Initial log-threshold.
    pub jumprelu_init_log_threshold: f64,
    /// L0 penalty coefficient.
    pub l0_coef: f64,
    pub dead_after: u64,
    pub normalize_input: bool,
    /// Start training from this SAE directory (SAELens layout, mono's or not) instead of a
    /// fresh initialisation.
    pub init: Option<std::path::PathBuf>,
}

impl Default for JumpReluConfig {
    fn default() -> Self {
        Self {
            n_latents: 8192,
            jumprelu_bandwidth: 1e-3,
            jumprelu_init_log_threshold: 0.0,
            l0_coef: 1e-3,
            dead_after: 10_000_000,
            normalize_input: false,
            init: None,
        }
    }
}

/// ReLU with an L1 penalty on the latents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReluConfig {
    pub n_latents: usize,
    /// L1 penalty coefficient.
    pub l1_coef: f64,
    pub dead_after: u64,
    pub normalize_input: bool,
    /// Start training from this SAE directory (SAELens layout, mono's or not) instead of a
    /// fresh initialisation.
    pub init: Option<std::path::PathBuf>,
}

impl Default for ReluConfig {
    fn default() -> Self {
        Self {
            n_latents: 8192,
            l1_coef: 1e-4,
            dead_after: 10_000_000,
            normalize_input: false,
            init: None,
        }
    }
}

/// The `[sae]` section.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SaeConfig {
    Topk(TopkConfig),
    BatchTopk(BatchTopkConfig),
    Jumprelu(JumpReluConfig),
    Relu(ReluConfig),
}

impl Default for SaeConfig {
    fn default() -> Self {
        SaeConfig::BatchTopk(BatchTopkConfig::default())
    }
}

impl SaeConfig {
    /// The default keys of `kind`.
    pub fn of_kind(kind: SaeKind) -> Self {
        match kind {
            SaeKind::Topk => SaeConfig::Topk(TopkConfig::default()),
            SaeKind::BatchTopk => SaeConfig::BatchTopk(BatchTopkConfig::default()),
            SaeKind::Jumprelu => SaeConfig::Jumprelu(JumpReluConfig::default()),
            SaeKind::Relu => SaeConfig::Relu(ReluConfig::default()),
        }
    }

    pub fn kind(&self) -> SaeKind {
        match self {
            SaeConfig::Topk(_) => SaeKind::Topk,
            SaeConfig::BatchTopk(_) => SaeKind::BatchTopk,
            SaeConfig::Jumprelu(_) => SaeKind::Jumprelu,
            SaeConfig::Relu(_) => SaeKind::Relu,
        }
    }

    pub fn n_latents(&self) -> usize {
        match self {
            SaeConfig::Topk(c) => c.n_latents,
            SaeConfig::BatchTopk(c) => c.n_latents,
            SaeConfig::Jumprelu(c) => c.n_latents,
            SaeConfig::Relu(c) => c.n_latents,
        }
    }

    pub fn dead_after(&self) -> u64 {
        match self {
            SaeConfig::Topk(c) => c.dead_after,
            SaeConfig::BatchTopk(c) => c.dead_after,
            SaeConfig::Jumprelu(c) => c.dead_after,
            SaeConfig::Relu(c) => c.dead_after,
        }
    }

    pub fn normalize_input(&self) -> bool {
        match self {
            SaeConfig::Topk(c) => c.normalize_input,
            SaeConfig::BatchTopk(c) => c.normalize_input,
            SaeConfig::Jumprelu(c) => c.normalize_input,
            SaeConfig::Relu(c) => c.normalize_input,
        }
    }

    /// The SAE training starts from (`sae.init`), if any.
    pub fn init(&self) -> Option<&std::path::Path> {
        match self {
            SaeConfig::Topk(c) => c.init.as_deref(),
            SaeConfig::BatchTopk(c) => c.init.as_deref(),
            SaeConfig::Jumprelu(c) => c.init.as_deref(),
            SaeConfig::Relu(c) => c.init.as_deref(),
        }
    }

    /// Steps between dead-latent restarts (TopK; 0 = never, and always 0 for other kinds).
    pub fn reinit_dead_every(&self) -> usize {
        match self {
            SaeConfig::Topk(c) => c.reinit_dead_every,
            _ => 0,
        }
    }

    /// (k, k_aux, aux_coef) of the TopK family; None for JumpReLU and ReLU.
    pub fn topk(&self) -> Option<(usize, usize, f64)> {
        match self {
            SaeConfig::Topk(c) => Some((c.k, c.k_aux, c.aux_coef)),
            SaeConfig::BatchTopk(c) => Some((c.k, c.k_aux, c.aux_coef)),
            _ => None,
        }
    }
}

/// `kind` picks the struct (batch_topk when absent); the other keys must belong to it.
impl<'de> Deserialize<'de> for SaeConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(deserializer)?;
        let kind = match table.remove("kind") {
            None => SaeKind::BatchTopk,
            Some(v) => SaeKind::deserialize(v).map_err(|e| nested_error::<D::Error>("kind", &e))?,
        };
        let rest = toml::Value::Table(table);
        /// The keys in `rest` as the struct of `kind`; errors carry their key path.
        fn variant<T: serde::de::DeserializeOwned, E: serde::de::Error>(
            rest: toml::Value,
            kind: &str,
        ) -> Result<T, E> {
            serde_path_to_error::deserialize(rest).map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().message().to_string();
                // "unknown field `x`, expected …" → "unknown field `x`: not a key of …, expected …"
                let message = match message.strip_prefix("unknown field ") {
                    Some(rest) => {
                        let (field, expected) = rest.split_once(", ").unwrap_or((rest, ""));
                        format!(
                            "unknown field {field}: not a key of sae.kind = \"{kind}\", {expected}"
                        )
                    }
                    None => message,
                };
                E::custom(super::parse::mark_path(&path, &message))
            })
        }
        Ok(match kind {
            SaeKind::Topk => SaeConfig::Topk(variant::<_, D::Error>(rest, "topk")?),
            SaeKind::BatchTopk => SaeConfig::BatchTopk(variant::<_, D::Error>(rest, "batch_topk")?),
            SaeKind::Jumprelu => SaeConfig::Jumprelu(variant::<_, D::Error>(rest, "jumprelu")?),
            SaeKind::Relu => SaeConfig::Relu(variant::<_, D::Error>(rest, "relu")?),
        })
    }
}
