//! The TOML schema of a mono run. Every key defaults to the paper's setup, unknown keys are
//! rejected (`parse.rs`), and validation errors name the key and the bad value (`validate.rs`).
//! docs/config.md documents every key; the test suite checks that each documented key parses.

mod parse;
mod sae;
mod validate;

pub use validate::is_plain_name;

/// A command-line count that must be at least 1 (rows per batch or shard, images, timed steps),
/// for clap's `value_parser`.
pub fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use sae::{BatchTopkConfig, JumpReluConfig, ReluConfig, SaeConfig, SaeKind, TopkConfig};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub encoder: EncoderConfig,
    pub data: DataConfig,
    pub features: FeaturesConfig,
    pub sae: SaeConfig,
    pub train: TrainConfig,
    pub mono: MonoConfig,
    pub finetune: FinetuneConfig,
    /// Dotted key → list of values; one child run per value (e.g. `lambda = [0.0, 3e-4]`).
    pub sweep: BTreeMap<String, Vec<toml::Value>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; outputs go to `output/name`.
    pub name: String,
    pub output: PathBuf,
    /// "auto" | "cpu" | "cuda" | "cuda:N" | "metal".
    pub device: String,
    pub seed: u64,
    /// What `mono run` does, in order: finetune, extract, train (ends with evaluation), report.
    /// "finetune" followed by "extract" extracts with the finetuned backbone.
    pub stages: Vec<Stage>,
    /// CPU threads for rayon and candle; absent = all cores.
    pub threads: Option<usize>,
    /// Steps between metrics.jsonl lines (SAE training and finetuning).
    pub log_every: usize,
    /// Kernels: "auto" (host kernels on the CPU) or "portable" (candle ops only, as on GPUs).
    pub ops: crate::base::host::OpsMode,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "mono".into(),
            output: PathBuf::from("runs"),
            device: "auto".into(),
            seed: 42,
            stages: vec![Stage::Extract, Stage::Train, Stage::Report],
            threads: None,
            log_every: 10,
            ops: crate::base::host::OpsMode::Auto,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Finetune,
    Extract,
    Train,
    Report,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    Clip,
    Siglip2,
    Vit,
    Resnet50,
}

/// Which tensor of the encoder becomes the feature.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EncoderOutput {
    /// CLIP: post-LayerNorm CLS token (`pooler_output`).
    Pooler,
    /// CLIP: the projected image embedding (`image_embeds`).
    ImageEmbeds,
    /// SigLIP2: attention-pooled output; ResNet-50: global average pool.
    Pooled,
    /// ViT: CLS token after the final LayerNorm.
    Cls,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    pub kind: EncoderKind,
    /// Hugging Face model id or a local directory.
    pub model: String,
    pub revision: String,
    /// Absent = the paper's output for the kind (clip: image_embeds, siglip2/resnet50: pooled, vit: cls).
    pub output: Option<EncoderOutput>,
    pub dtype: FloatType,
    pub batch_size: usize,
    /// L2-normalise features before storing them (the paper does).
    pub normalize: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            kind: EncoderKind::Clip,
            model: "openai/clip-vit-large-patch14".into(),
            revision: "main".into(),
            output: None,
            dtype: FloatType::F32,
            batch_size: 64,
            normalize: true,
        }
    }
}

impl EncoderConfig {
    pub fn output(&self) -> EncoderOutput {
        self.output.unwrap_or(match self.kind {
            EncoderKind::Clip => EncoderOutput::ImageEmbeds,
            EncoderKind::Siglip2 | EncoderKind::Resnet50 => EncoderOutput::Pooled,
            EncoderKind::Vit => EncoderOutput::Cls,
        })
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    Imagenet,
    Openimages,
    Cifar10,
    Cifar100,
    FashionMnist,
    Mnist,
    /// Any directory with one subfolder per class.
    Folder,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub kind: DatasetKind,
    pub root: Option<PathBuf>,
    pub train_split: String,
    pub eval_split: String,
    /// Use at most this many images per split.
    pub limit: Option<usize>,
    /// Image decoding threads; absent = all cores.
    pub workers: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DatasetKind::Imagenet,
            root: None,
            train_split: "train".into(),
            eval_split: "val".into(),
            limit: None,
            workers: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// Feature store directory; absent = `<run dir>/features`.
    pub dir: Option<PathBuf>,
    /// Rows per safetensors shard.
    pub shard_size: usize,
    pub dtype: FloatType,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self { dir: None, shard_size: 16384, dtype: FloatType::F32 }
    }
}

/// The learning-rate schedule after the linear warm-up (both trainers).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half a cosine down to 0 at the last step.
    Cosine,
    /// × gamma every `step_size` epochs (finetuning).
    Step,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub adam_eps: f64,
    pub adam_betas: [f64; 2],
    /// Clip gradients to this global norm; absent = 1.0 except for topk (none, as OpenAI).
    pub grad_clip: Option<f64>,
    /// Linear warm-up from 1 % of lr over this many steps.
    pub warmup_steps: usize,
    pub schedule: ScheduleKind,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Stop after this many steps even if epochs remain.
    pub max_steps: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 50,
            batch_size: 2048,
            lr: 1e-4,
            adam_eps: 6.25e-10,
            adam_betas: [0.9, 0.999],
            grad_clip: None,
            warmup_steps: 0,
            schedule: ScheduleKind::Constant,
            checkpoint_every: 5000,
            max_steps: None,
        }
    }
}

impl TrainConfig {
    pub fn grad_clip(&self, kind: SaeKind) -> Option<f64> {
        match (self.grad_clip, kind) {
            (Some(c), _) => Some(c),
            (None, SaeKind::Topk) => None,
            (None, _) => Some(1.0),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MonoConfig {
    /// λ; absent = the paper's best value for this dataset × encoder × SAE kind.
    pub lambda: Option<f64>,
    /// 1 = batch MonoLoss every step; P > 1 = exact full-dataset MonoLoss every P steps.
    pub period: usize,
    /// eps in the min-max range and the denominator.
    pub eps: f64,
    /// Feature store of an independent "judge" encoder on the same images; absent = the SAE input.
    pub similarity_store: Option<PathBuf>,
}

impl Default for MonoConfig {
    fn default() -> Self {
        Self { lambda: None, period: 1, eps: 1e-8, similarity_store: None }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// λ of the finetuning MonoLoss; absent = mono.lambda (set it when the same config also
    /// trains SAEs, e.g. finetune = 0 to train a plain encoder first).
    pub lambda: Option<f64>,
    /// backbone → Linear → ReLU → TopK → classifier (the paper); false: classifier on the
    /// backbone features, MonoLoss on those features.
    pub topk_layer: bool,
    /// ResNet-50 on ImageNet-1k without a TopK layer: start the classifier from the checkpoint's
    /// own `fc` head instead of a fresh one.
    pub reuse_head: bool,
    /// Width of the TopK layer = backbone width × expansion.
    pub expansion: usize,
    /// Active units of the TopK layer; absent = all of them (the paper's runs: k = width).
    pub k: Option<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Weight decay of normalisation weights and biases.
    pub norm_weight_decay: f64,
    pub schedule: ScheduleKind,
    pub warmup_epochs: usize,
    /// StepLR: decay every this many epochs by `gamma`.
    pub step_size: usize,
    pub gamma: f64,
    pub label_smoothing: f64,
    pub grad_clip: Option<f64>,
    /// Absent = whole backbone trainable; 0 = frozen; N = only the last N blocks.
    pub trainable_blocks: Option<usize>,
    /// LoRA rank on attention projections (ViT only); absent = no LoRA.
    pub lora_rank: Option<usize>,
    pub lora_alpha: f64,
    /// Exponential moving average of the weights (and BatchNorm statistics), evaluated instead
    /// of the raw weights: torchvision's per-step decay, adjusted to updates every `ema_steps`
    /// steps (see `train::finetune::ema`); absent = no EMA.
    pub ema_decay: Option<f64>,
    pub ema_steps: usize,
    pub mixed_precision: bool,
    /// Random-resized-crop and horizontal flip on training images.
    pub augment: bool,
    /// Side of the training crop (torchvision's `train_crop_size`, 176 in the ResNet recipes);
    /// absent = the model's input size. Only for ResNets: ViTs take one image size.
    pub train_size: Option<u32>,
    /// Shortest edge of the evaluation resize before the centre crop (torchvision's
    /// `val_resize_size`, 232 in the ResNet recipes); absent = the model's preprocessing.
    pub eval_resize: Option<u32>,
    /// Feature store with the similarity embeddings of every training image; absent = the
    /// backbone's own detached features.
    pub similarity_store: Option<PathBuf>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        // ResNet-50 recipe of the paper (torchvision reference recipe, 90 epochs).
        Self {
            lambda: None,
            topk_layer: true,
            reuse_head: false,
            expansion: 1,
            k: None,
            epochs: 90,
            batch_size: 1024,
            optimizer: OptimizerKind::Sgd,
            lr: 1e-3,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 2e-5,
            norm_weight_decay: 0.0,
            schedule: ScheduleKind::Cosine,
            warmup_epochs: 5,
            step_size: 30,
            gamma: 0.1,
            label_smoothing: 0.1,
            grad_clip: None,
            trainable_blocks: None,
            lora_rank: None,
            lora_alpha: 16.0,
            ema_decay: None,
            ema_steps: 32,
            mixed_precision: false,
            augment: true,
            train_size: None,
            eval_resize: None,
            similarity_store: None,
        }
    }
}

/// The paper's best λ (ImageNet and OpenImagesV7 tables), by dataset, encoder and SAE kind.
pub fn paper_lambda(dataset: DatasetKind, encoder: EncoderKind, sae: SaeKind) -> Option<f64> {
    let column = match encoder {
        EncoderKind::Clip => 0,
        EncoderKind::Siglip2 => 1,
        EncoderKind::Vit => 2,
        EncoderKind::Resnet50 => return None,
    };
    let row: [f64; 3] = match (dataset, sae) {
        (DatasetKind::Imagenet, SaeKind::BatchTopk) => [3e-4, 1e-4, 4e-4],
        (DatasetKind::Imagenet, SaeKind::Topk) => [0.09, 0.14, 0.09],
        (DatasetKind::Imagenet, SaeKind::Jumprelu) => [5e-4, 1e-4, 7e-4],
        (DatasetKind::Imagenet, SaeKind::Relu) => [1e-4, 3e-5, 9e-5],
        (DatasetKind::Openimages, SaeKind::BatchTopk) => [5e-4, 2e-4, 7e-4],
        (DatasetKind::Openimages, SaeKind::Topk) => [0.5, 0.3, 0.9],
        (DatasetKind::Openimages, SaeKind::Jumprelu) => [5e-4, 1e-4, 5e-4],
        (DatasetKind::Openimages, SaeKind::Relu) => [1e-4, 3e-5, 1e-4],
        _ => return None,
    };
    Some(row[column])
}

impl Config {
    /// Reads, parses and validates a config file. Errors name the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config = parse::deserialize(text, true)?;
        config.validate()?;
        Ok(config)
    }

    /// λ to use: the configured one, else the paper's value for this setup.
    pub fn lambda(&self) -> Result<f64> {
        match self.mono.lambda {
            Some(l) => Ok(l),
            None => paper_lambda(self.data.kind, self.encoder.kind, self.sae.kind()).with_context(|| {
                format!(
                    "mono.lambda is not set and the paper has no value for data.kind = {:?}, encoder.kind = {:?}, sae.kind = {:?}",
                    self.data.kind,
                    self.encoder.kind,
                    self.sae.kind()
                )
            }),
        }
    }

    /// λ of the finetuning MonoLoss: finetune.lambda, else mono.lambda (no paper default).
    pub fn finetune_lambda(&self) -> Result<f64> {
        self.finetune.lambda.or(self.mono.lambda).context(
            "finetune.lambda (or mono.lambda) must be set for finetuning \
             (the paper uses 0, 0.03, 0.05, 0.07 and 0.1)",
        )
    }

    /// The run's output directory.
    pub fn run_dir(&self) -> PathBuf {
        self.run.output.join(&self.run.name)
    }

    /// Each sweep key must name a config key, and each value must make a valid config.
    fn validate_sweep(&self) -> Result<()> {
        for (key, values) in &self.sweep {
            if values.is_empty() {
                bail!("sweep.{key} is an empty list");
            }
            for value in values {
                self.with_override(key, value.clone())
                    .with_context(|| format!("sweep.{key} = {value}"))?;
            }
        }
        Ok(())
    }

    /// A copy with one dotted key set (`lambda` is short for `mono.lambda`), re-validated.
    pub fn with_override(&self, key: &str, value: toml::Value) -> Result<Config> {
        let path = sweep_key_path(key);
        let mut tree = toml::Value::try_from(self)?;
        if let toml::Value::Table(t) = &mut tree {
            t.remove("sweep");
        }
        let mut node = &mut tree;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let table =
                node.as_table_mut().with_context(|| format!("`{path}` is not a config key"))?;
            if i + 1 == parts.len() {
                table.insert(part.to_string(), value.clone());
                break;
            }
            node = table.get_mut(*part).with_context(|| format!("`{path}` is not a config key"))?;
        }
        let text = toml::to_string(&tree)?;
        // Generated text: its line numbers mean nothing to the user.
        let mut config = parse::deserialize(&text, false)?;
        config.validate()?;
        config.sweep.clear();
        Ok(config)
    }
}

/// `lambda` → `mono.lambda`; other keys are already dotted paths.
pub fn sweep_key_path(key: &str) -> String {
    match key {
        "lambda" => "mono.lambda".into(),
        other => other.into(),
    }
}
