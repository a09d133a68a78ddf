//! A differentiable CLIP vision tower (pooler output: post-LayerNorm CLS token) that loads the
//! same weights as candle-transformers' `ClipVisionTransformer` and equals its forward pass.

use anyhow::{ensure, Result};
use candle_core::{IndexOp, Tensor, D};

use super::attention::AttentionOp;
use super::clip_block::{self, BlockOp};
use super::conv::{conv2d_gemm, Planes};
use super::layers::{quick_gelu, LayerNorm, Linear, Lora};
use super::params::{DecayGroup, ParamSet, Weights};
use super::Trainable;
use crate::base::host::Kernels;

struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTower {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    blocks: Vec<Block>,
    post_ln: LayerNorm,
    heads: usize,
    patch: usize,
    pub dim: usize,
    pub image_size: usize,
}

/// Shape facts of a CLIP vision config.json.
pub struct ClipShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub patch: usize,
    pub image_size: usize,
}

impl ClipShape {
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let v = config.get("vision_config").unwrap_or(config);
        let get = |k: &str, default: usize| {
            v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(default)
        };
        let act = v.get("hidden_act").and_then(|a| a.as_str()).unwrap_or("quick_gelu");
        ensure!(
            act == "quick_gelu",
            "config.json: hidden_act = {act:?}; the trainable CLIP tower implements quick_gelu"
        );
        Ok(Self {
            hidden: get("hidden_size", 768),
            layers: get("num_hidden_layers", 12),
            heads: get("num_attention_heads", 12),
            intermediate: get("intermediate_size", 3072),
            patch: get("patch_size", 32),
            image_size: get("image_size", 224),
        })
    }
}

/// Takes checkpoint tensors into the parameter set under their own names.
pub(crate) struct Loader<'a> {
    pub weights: &'a Weights,
    pub params: &'a mut ParamSet,
    pub prefix: &'a str,
}

impl Loader<'_> {
    pub fn take(
        &mut self,
        name: &str,
        dims: &[usize],
        train: bool,
        group: DecayGroup,
    ) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let value = self.weights.get(&full, dims)?;
        self.params.add(&full, value, train, group)
    }

    pub fn layer_norm(&mut self, name: &str, d: usize, train: bool) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.take(&format!("{name}.weight"), &[d], train, DecayGroup::NormAndBias)?,
            bias: self.take(&format!("{name}.bias"), &[d], train, DecayGroup::NormAndBias)?,
            eps: 1e-5,
        })
    }

    pub fn linear(&mut self, name: &str, out: usize, inp: usize, train: bool) -> Result<Linear> {
        Ok(Linear {
            weight: self.take(
                &format!("{name}.weight"),
                &[out, inp],
                train,
                DecayGroup::Weights,
            )?,
            bias: Some(self.take(
                &format!("{name}.bias"),
                &[out],
                train,
                DecayGroup::NormAndBias,
            )?),
            lora: None,
        })
    }
}

impl ClipTower {
    /// Loads `[vision_model.]…` CLIP weights; `trainable` decides which become Vars.
    pub fn load(
        shape: &ClipShape,
        weights: &Weights,
        params: &mut ParamSet,
        trainable: &Trainable,
        seed: u64,
    ) -> Result<Self> {
        let prefix = if weights.contains("vision_model.embeddings.patch_embedding.weight") {
            "vision_model."
        } else {
            ""
        };
        ensure!(
            weights.contains(&format!("{prefix}embeddings.class_embedding")),
            "{}: no CLIP vision tower (`[vision_model.]embeddings.class_embedding` missing)",
            weights.source
        );
        let (d, p, n_pos) =
            (shape.hidden, shape.patch, (shape.image_size / shape.patch).pow(2) + 1);
        let first = trainable.first_trainable_block(shape.layers);
        let lora = trainable.is_lora();
        let embed_train = first == 0 && !lora;
        let mut l = Loader { weights, params, prefix };
        let patch_embedding = l.take(
            "embeddings.patch_embedding.weight",
            &[d, 3, p, p],
            embed_train,
            DecayGroup::Weights,
        )?;
        let class_embedding =
            l.take("embeddings.class_embedding", &[d], embed_train, DecayGroup::NormAndBias)?;
        let position_embedding = l.take(
            "embeddings.position_embedding.weight",
            &[n_pos, d],
            embed_train,
            DecayGroup::NormAndBias,
        )?;
        let pre_ln = l.layer_norm("pre_layrnorm", d, embed_train)?;
        let mut blocks = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let train = i >= first && !lora;
            let base = format!("encoder.layers.{i}");
            let attn = |l: &mut Loader, name: &str| -> Result<Linear> {
                let mut linear = l.linear(&format!("{base}.self_attn.{name}"), d, d, train)?;
                // PEFT's LoRA on q_proj and v_proj, as the paper's CLIP finetuning configures it.
                let adapted = matches!(name, "q_proj" | "v_proj");
                if let (Trainable::Lora { rank, alpha }, true) = (trainable, adapted) {
                    let full = format!("{prefix}{base}.self_attn.{name}");
                    linear.lora = Some(new_lora(
                        l.params,
                        &full,
                        (d, d),
                        (*rank, *alpha),
                        seed ^ ((i * 4 + name.len()) as u64),
                        linear.weight.device(),
                    )?);
                }
                Ok(linear)
            };
            let q = attn(&mut l, "q_proj")?;
            let k = attn(&mut l, "k_proj")?;
            let v = attn(&mut l, "v_proj")?;
            let out = attn(&mut l, "out_proj")?;
            let ln1 = l.layer_norm(&format!("{base}.layer_norm1"), d, train)?;
            let ln2 = l.layer_norm(&format!("{base}.layer_norm2"), d, train)?;
            let fc1 = l.linear(&format!("{base}.mlp.fc1"), shape.intermediate, d, train)?;
            let fc2 = l.linear(&format!("{base}.mlp.fc2"), d, shape.intermediate, train)?;
            blocks.push(Block { ln1, q, k, v, out, ln2, fc1, fc2 });
        }
        let post_ln = l.layer_norm("post_layernorm", d, !lora && first < shape.layers)?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_ln,
            blocks,
            post_ln,
            heads: shape.heads,
            patch: p,
            dim: d,
            image_size: shape.image_size,
        })
    }

    /// (B, 3, H, W) → (B, D) pooled output.
    pub fn forward(&self, pixels: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        // Host kernels: the GEMM convolution, whose backward is a GEMM (candle's is a direct loop).
        let patches = match kernels.for_tensor(pixels).is_host() {
            true => conv2d_gemm(pixels, &self.patch_embedding, 0, self.patch, Planes::ImageMajor)?,
            false => pixels.conv2d(&self.patch_embedding, 0, self.patch, 1, 1)?,
        };
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.class_embedding.reshape((1, 1, self.dim))?.broadcast_as((b, 1, self.dim))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        x = self.pre_ln.forward(&x, kernels)?;
        for block in &self.blocks {
            if let Some(op) = self.block_op(block, &x, kernels) {
                x = x.contiguous()?.apply_op1(op)?;
                continue;
            }
            x = (&x + self.attention(block, &block.ln1.forward(&x, kernels)?, kernels)?)?;
            let hidden = block.fc1.forward(&block.ln2.forward(&x, kernels)?, kernels)?;
            let h = block.fc2.forward(&quick_gelu(&hidden, kernels)?, kernels)?;
            x = (x + h)?;
        }
        self.post_ln.forward(&x.i((.., 0, ..))?, kernels)
    }

    /// The block as one host op (`clip_block`), when host kernels run it, its layers are plain
    /// (no LoRA) and its weights' gradients, if any, can go to the active `GradSink`.
    fn block_op(&self, block: &Block, x: &Tensor, kernels: Kernels) -> Option<BlockOp> {
        if !kernels.for_tensor(x).is_host() || block.ln1.eps != block.ln2.eps {
            return None;
        }
        let affine = |l: &Linear| match (&l.bias, &l.lora) {
            (Some(b), None) => Some([l.weight.clone(), b.clone()]),
            _ => None,
        };
        let norm = |n: &LayerNorm| [n.weight.clone(), n.bias.clone()];
        let parts = [
            norm(&block.ln1),
            affine(&block.q)?,
            affine(&block.k)?,
            affine(&block.v)?,
            affine(&block.out)?,
            norm(&block.ln2),
            affine(&block.fc1)?,
            affine(&block.fc2)?,
        ];
        let params: [Tensor; clip_block::PARAMS] = parts.concat().try_into().ok()?;
        BlockOp::new(params, self.heads, block.ln1.eps, x)
    }

    fn attention(&self, block: &Block, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let dh = d / self.heads;
        if kernels.for_tensor(x).is_host() {
            let (q, k, v) = (
                block.q.forward(x, kernels)?,
                block.k.forward(x, kernels)?,
                block.v.forward(x, kernels)?,
            );
            let op = AttentionOp { heads: self.heads, scale: (dh as f64).powf(-0.5) as f32 };
            let context = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
            return block.out.forward(&context, kernels);
        }
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split((block.q.forward(x, kernels)? * (dh as f64).powf(-0.5))?)?;
        let k = split(block.k.forward(x, kernels)?)?;
        let v = split(block.v.forward(x, kernels)?)?;
        // kᵀ as a strided view: the matrix product reads it in place.
        let weights = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
        let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        block.out.forward(&context, kernels)
    }
}

/// A LoRA pair for an (out, in) weight: A ~ U(±1/√in) (Kaiming, as in the LoRA paper), B = 0 so
/// training starts at W; scaled by alpha / rank.
fn new_lora(
    params: &mut ParamSet,
    name: &str,
    (out, inp): (usize, usize),
    (rank, alpha): (usize, f64),
    seed: u64,
    device: &candle_core::Device,
) -> Result<Lora> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bound = 1.0 / (inp as f64).sqrt();
    let a: Vec<f32> = (0..rank * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
    let a = params.add(
        &format!("{name}.lora_A"),
        Tensor::from_vec(a, (rank, inp), device)?,
        true,
        DecayGroup::Weights,
    )?;
    let b = params.add(
        &format!("{name}.lora_B"),
        Tensor::zeros((out, rank), candle_core::DType::F32, device)?,
        true,
        DecayGroup::Weights,
    )?;
    Ok(Lora { a, b, scale: alpha / rank as f64 })
}
