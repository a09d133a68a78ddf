//! backbone → Linear(d → d·expansion) → ReLU → TopK(k) → Linear classifier, as in the paper;
//! MonoLoss acts on the TopK layer's activations.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::base::config::EncoderKind;
use crate::base::host::{Kernels, OpsMode};
use crate::models::clip::{ClipShape, ClipTower};
use crate::models::layers::Linear;
use crate::models::params::{DecayGroup, ParamSet, Weights};
use crate::models::resnet::ResNet;
use crate::models::topk;
use crate::models::Trainable;

pub enum Backbone {
    Clip(ClipTower),
    Resnet(ResNet),
}

impl Backbone {
    pub fn dim(&self) -> usize {
        match self {
            Backbone::Clip(t) => t.dim,
            Backbone::Resnet(r) => r.dim,
        }
    }

    /// The BatchNorm layers (none for a ViT tower).
    pub fn batch_norms(&self) -> Vec<&crate::models::batch_norm::BatchNorm> {
        match self {
            Backbone::Resnet(r) => r.batch_norms(),
            Backbone::Clip(_) => Vec::new(),
        }
    }

    pub fn forward(&self, pixels: &Tensor, train: bool, kernels: Kernels) -> Result<Tensor> {
        match self {
            Backbone::Clip(t) => t.forward(pixels, kernels),
            Backbone::Resnet(r) => r.forward_with(pixels, train, kernels),
        }
    }
}

/// What one forward pass produces.
pub struct Outputs {
    /// (B, d) backbone features.
    pub features: Tensor,
    /// (B, width) TopK-layer activations (MonoLoss acts here; the features without a TopK layer).
    pub topk: Tensor,
    /// (B, classes).
    pub logits: Tensor,
}

pub struct FinetuneModel {
    pub backbone: Backbone,
    /// The TopK layer's linear map; None when the classifier reads the backbone features.
    pub hidden: Option<Linear>,
    pub classifier: Linear,
    pub k: usize,
    pub params: ParamSet,
    /// The kernels of the TopK selection (`with_kernels`; host ones on the CPU by default).
    pub kernels: Kernels,
}

/// How the head is built.
#[derive(Clone, Debug)]
pub struct HeadSpec {
    pub topk_layer: bool,
    /// Start the classifier from the checkpoint's `fc` (ResNet-50 on ImageNet-1k).
    pub reuse_head: bool,
    pub expansion: usize,
    pub k: Option<usize>,
    pub classes: usize,
}

/// PyTorch's nn.Linear initialisation: U(±1/√in) for weight and bias.
fn new_linear(
    params: &mut ParamSet,
    name: &str,
    out: usize,
    inp: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Linear> {
    let bound = 1.0 / (inp as f64).sqrt();
    let w: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random_range(-bound..bound) as f32).collect();
    Ok(Linear {
        weight: params.add(
            &format!("{name}.weight"),
            Tensor::from_vec(w, (out, inp), device)?,
            true,
            DecayGroup::Weights,
        )?,
        bias: Some(params.add(
            &format!("{name}.bias"),
            Tensor::from_vec(b, out, device)?,
            true,
            DecayGroup::NormAndBias,
        )?),
        lora: None,
    })
}

impl FinetuneModel {
    /// The backbone from a checkpoint plus a fresh TopK head and classifier.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: EncoderKind,
        config: &serde_json::Value,
        weights: &Weights,
        trainable: &Trainable,
        head: &HeadSpec,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let HeadSpec { expansion, k, classes, .. } = *head;
        let mut params = ParamSet::new(dtype);
        let kernels = Kernels::choose(OpsMode::Auto, device);
        let backbone = match kind {
            EncoderKind::Clip => Backbone::Clip(ClipTower::load(&ClipShape::from_config(config)?, weights, &mut params, trainable, seed)?),
            EncoderKind::Resnet50 => {
                if trainable.is_lora() {
                    bail!("finetune.lora_rank applies to ViT attention projections; a ResNet has none");
                }
                Backbone::Resnet(ResNet::load(weights, &mut params, trainable)?)
            }
            other => bail!("finetuning supports encoder.kind = \"clip\" and \"resnet50\" (the paper's models), not {other:?}"),
        };
        let d = backbone.dim();
        ensure!(classes >= 2, "the data set has {classes} classes; a classifier needs at least 2");
        let mut rng = StdRng::seed_from_u64(seed);
        if !head.topk_layer {
            let classifier = if head.reuse_head {
                ensure!(
                    weights.contains("fc.weight"),
                    "{}: finetune.reuse_head needs an `fc` head in the checkpoint",
                    weights.source
                );
                let fc = weights.dims("fc.weight")?;
                ensure!(
                    fc == [classes, d],
                    "finetune.reuse_head: the checkpoint's fc head is {fc:?} but the data set has {classes} classes over {d} features"
                );
                Linear {
                    weight: params.add(
                        "fc.weight",
                        weights.get("fc.weight", &[classes, d])?,
                        true,
                        DecayGroup::Weights,
                    )?,
                    bias: Some(params.add(
                        "fc.bias",
                        weights.get("fc.bias", &[classes])?,
                        true,
                        DecayGroup::NormAndBias,
                    )?),
                    lora: None,
                }
            } else {
                new_linear(&mut params, "head.classifier", classes, d, &mut rng, device)?
            };
            return Ok(Self { backbone, hidden: None, classifier, k: d, params, kernels });
        }
        let width = d * expansion;
        let k = k.unwrap_or(width);
        ensure!(k >= 1 && k <= width, "finetune.k = {k} must be in 1..={width} (the TopK layer is backbone width {d} × expansion {expansion})");
        let hidden = new_linear(&mut params, "head.topk_layer", width, d, &mut rng, device)?;
        let classifier =
            new_linear(&mut params, "head.classifier", classes, width, &mut rng, device)?;
        Ok(Self { backbone, hidden: Some(hidden), classifier, k, params, kernels })
    }

    /// The same model computing with `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    /// Width of the layer MonoLoss acts on.
    pub fn monitored_width(&self) -> Result<usize> {
        Ok(match &self.hidden {
            Some(h) => h.weight.dim(0)?,
            None => self.backbone.dim(),
        })
    }

    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Outputs> {
        let features = self.backbone.forward(pixels, train, self.kernels)?;
        let Some(hidden) = &self.hidden else {
            let logits = self.classifier.forward(&features, self.kernels)?;
            return Ok(Outputs { topk: features.clone(), features, logits });
        };
        let pre = hidden.forward(&features, self.kernels)?;
        let width = pre.dim(1)?;
        let topk = if self.k >= width {
            pre.relu()?
        } else {
            let selection = topk::Selection::PerRow(self.k);
            topk::topk_latents(&pre, &selection, None, self.kernels)?.latents.tensor()?.clone()
        };
        let logits = self.classifier.forward(&topk, self.kernels)?;
        Ok(Outputs { features, topk, logits })
    }
}

/// Cross-entropy with label smoothing ε: (1 − ε)·NLL + ε·mean over classes of −log p.
pub fn cross_entropy(logits: &Tensor, labels: &[u32], smoothing: f64) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    let targets = Tensor::from_vec(labels.to_vec(), (b, 1), logits.device())?;
    let nll = log_p.gather(&targets, 1)?.neg()?.mean_all()?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = (log_p.sum_all()?.neg()? / (b * c) as f64)?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

/// Top-1 and top-5 hits of a batch.
pub fn topk_hits(logits: &Tensor, labels: &[u32]) -> Result<(usize, usize)> {
    let rows = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let (mut top1, mut top5) = (0, 0);
    for (row, &y) in rows.iter().zip(labels) {
        let target = row[y as usize];
        let better = row.iter().filter(|&&v| v > target).count();
        top1 += (better == 0) as usize;
        top5 += (better < 5) as usize;
    }
    Ok((top1, top5))
}
