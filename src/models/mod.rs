//! The trainable towers shared by extraction (inference) and finetuning (training): a
//! torchvision-layout bottleneck ResNet and a CLIP vision tower, their differentiable layers, named
//! parameter sets, LoRA, and the TopK activation (selection without sorting).

pub mod attention;
pub mod batch_norm;
pub mod clip;
pub mod clip_block;
pub mod conv;
pub mod fused;
pub mod layers;
pub mod params;
pub mod resnet;
pub mod topk;

/// Helpers of the layers' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// The largest absolute difference between two tensors of the same shape.
    pub fn gap(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }
}

/// Which backbone parameters train.
#[derive(Clone, Debug, PartialEq)]
pub enum Trainable {
    /// Every parameter.
    All,
    /// Only the last N blocks (transformer layers or bottlenecks); 0 freezes the backbone.
    LastBlocks(usize),
    /// The backbone frozen, LoRA adapters on the attention projections trained.
    Lora { rank: usize, alpha: f64 },
}

impl Trainable {
    pub fn from_config(f: &crate::base::config::FinetuneConfig) -> Self {
        match (f.lora_rank, f.trainable_blocks) {
            (Some(rank), _) => Trainable::Lora { rank, alpha: f.lora_alpha },
            (None, Some(n)) => Trainable::LastBlocks(n),
            (None, None) => Trainable::All,
        }
    }

    /// Index of the first trainable block out of `n`.
    pub fn first_trainable_block(&self, n: usize) -> usize {
        match self {
            Trainable::All => 0,
            Trainable::LastBlocks(k) => n - (*k).min(n),
            Trainable::Lora { .. } => n,
        }
    }

    pub fn is_lora(&self) -> bool {
        matches!(self, Trainable::Lora { .. })
    }
}
