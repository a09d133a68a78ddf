//! Exponential moving average of the finetuned weights, by the rule of torchvision's
//! classification recipe (which the paper's finetuning uses):
//! - the average is updated after every `every`-th step of an epoch (0-based batch index
//!   `i % every == 0`, so also after the first step of each epoch);
//! - the per-update decay is the configured per-step decay adjusted for the update interval and
//!   the run length: `α = min(1, (1 − decay)·batch_size·every / epochs)`, decay′ = 1 − α;
//! - the first update copies the weights (torch's `AveragedModel` with `n_averaged = 0`), later
//!   ones average `e ← decay′·e + (1 − decay′)·w`;
//! - during warm-up epochs the update count is reset after each update, so the average is a copy
//!   of the weights until warm-up ends;
//! - BatchNorm running statistics are averaged like the weights (`use_buffers=True`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::Tensor;

pub struct Ema {
    /// The per-update decay (adjusted).
    decay: f64,
    every: usize,
    warmup_epochs: usize,
    /// Updates since the last copy (torch's `n_averaged`).
    pub updates: u64,
    pub values: HashMap<String, Tensor>,
}

impl Ema {
    /// torchvision's adjustment of a per-step decay to updates every `every` steps.
    pub fn adjusted_decay(decay: f64, every: usize, batch_size: usize, epochs: usize) -> f64 {
        let adjust = batch_size as f64 * every as f64 / epochs.max(1) as f64;
        1.0 - ((1.0 - decay) * adjust).min(1.0)
    }

    /// An average that starts as `initial` (a copy of the model, as torchvision makes it).
    pub fn new(
        decay: f64,
        every: usize,
        batch_size: usize,
        epochs: usize,
        warmup_epochs: usize,
        initial: HashMap<String, Tensor>,
    ) -> Self {
        Self {
            decay: Self::adjusted_decay(decay, every, batch_size, epochs),
            every: every.max(1),
            warmup_epochs,
            updates: 0,
            values: initial,
        }
    }

    /// Whether the step with 0-based batch index `index` within its epoch updates the average.
    pub fn due(&self, index: usize) -> bool {
        index.is_multiple_of(self.every)
    }

    /// Folds in the current values (after an optimiser step that was `due`) of epoch `epoch`.
    pub fn update(&mut self, epoch: usize, current: HashMap<String, Tensor>) -> Result<()> {
        for (name, value) in current {
            let value = value.detach();
            let averaged = match self.values.get(&name) {
                Some(e) if self.updates > 0 => {
                    ((e * self.decay)? + (value.to_dtype(e.dtype())? * (1.0 - self.decay))?)?
                }
                _ => value.copy()?,
            };
            self.values.insert(name, averaged);
        }
        self.updates += 1;
        if epoch < self.warmup_epochs {
            self.updates = 0;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.values.get(name).with_context(|| format!("no averaged value of `{name}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adjusted_decay_of_the_paper_recipes() {
        // 1024 images per step, every 32 steps, 90 epochs: α = 2e-5 · 364.09.
        let d = Ema::adjusted_decay(0.99998, 32, 1024, 90);
        assert!((d - (1.0 - 2e-5 * 1024.0 * 32.0 / 90.0)).abs() < 1e-12, "{d}");
        // The adjustment saturates at a plain copy.
        assert_eq!(Ema::adjusted_decay(0.9, 32, 1024, 1), 0.0);
    }

    #[test]
    fn first_update_copies_then_averages_and_warm_up_resets() {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let read = |e: &Ema| e.values["w"].to_vec1::<f32>().unwrap()[0];
        let one = |v: f32| HashMap::from([("w".to_string(), t(v))]);
        // decay 0.5 per update (α = 0.5 after the adjustment 1·1/1).
        let mut ema = Ema::new(0.5, 1, 1, 1, 1, one(100.0));
        ema.update(0, one(10.0)).unwrap(); // warm-up epoch: copy, then reset
        assert_eq!(read(&ema), 10.0);
        ema.update(0, one(20.0)).unwrap(); // still a copy
        assert_eq!(read(&ema), 20.0);
        ema.update(1, one(40.0)).unwrap(); // first update after warm-up: a copy
        assert_eq!(read(&ema), 40.0);
        ema.update(1, one(0.0)).unwrap(); // then averaging
        assert_eq!(read(&ema), 20.0);
    }
}
