//! Optimiser steps on host slices: Adam (PyTorch's update rule, any eps), clipping by global norm,
//! the unit-norm decoder constraint, and learning-rate schedules.
//!
//! Gradients come to the host as Vec<f32>; parameters are updated in place in their CPU storage
//! (no copy) or, on a GPU, downloaded, updated and uploaded. Moments live on the host either way.

use anyhow::{ensure, Result};
use candle_core::{
    backprop::GradStore, CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var,
};
use rayon::prelude::*;

/// Applies `f` to a parameter's f32 data in place.
pub fn update_param(var: &Var, f: impl FnMut(&mut [f32]) + Send) -> Result<()> {
    // The op is called through `&self`: the closure sits behind a mutex.
    struct HostUpdate<F>(std::sync::Mutex<F>);
    impl<F: FnMut(&mut [f32]) + Send> InplaceOp1 for HostUpdate<F> {
        fn name(&self) -> &'static str {
            "host-update"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("parameter must be contiguous")
            };
            match storage {
                CpuStorage::F32(data) => {
                    (self.0.lock().unwrap())(&mut data[a..b]);
                    Ok(())
                }
                _ => candle_core::bail!("parameters must be f32"),
            }
        }
    }
    if var.device().is_cpu() && var.dtype() == DType::F32 {
        var.as_tensor().inplace_op1(&HostUpdate(std::sync::Mutex::new(f)))?;
    } else {
        // Other devices and dtypes (e.g. bf16 weights in mixed precision): through an f32 host copy.
        let mut f = f;
        let mut host = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        f(&mut host);
        var.set(&Tensor::from_vec(host, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A parameter's gradient on the host (zeros when the graph did not reach it).
pub fn host_grad(grads: &GradStore, var: &Var) -> Result<Vec<f32>> {
    match grads.get(var.as_tensor()) {
        Some(g) => {
            Ok(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        }
        None => Ok(vec![0.0; var.elem_count()]),
    }
}

/// √(Σ g²) over every gradient, in f64. Partial sums over fixed chunks, added in order: the
/// result does not depend on how rayon splits the work, so resumed runs stay bit-identical.
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    let partial: Vec<f64> = grads
        .iter()
        .flat_map(|g| {
            g.par_chunks(1 << 14)
                .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
                .collect::<Vec<f64>>()
        })
        .collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if norm > max_norm && norm.is_finite() {
        let s = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().for_each(|g| g.par_iter_mut().for_each(|x| *x *= s));
    }
    norm
}

/// Removes from each row of `grad` its component along the (unit) row of `weights`:
/// the gradient step then stays tangent to the unit sphere of each dictionary vector.
pub fn project_out_parallel(grad: &mut [f32], weights: &[f32], d: usize) {
    grad.par_chunks_mut(d).zip(weights.par_chunks(d)).for_each(|(g, w)| {
        let norm_sq: f32 = w.iter().map(|x| x * x).sum();
        if norm_sq > 0.0 {
            let along = g.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() / norm_sq;
            g.iter_mut().zip(w).for_each(|(a, b)| *a -= along * b);
        }
    });
}

/// Rescales each row of `data` to unit norm.
pub fn normalize_rows(data: &mut [f32], d: usize) {
    data.par_chunks_mut(d).for_each(|row| {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    });
}

/// A parameter's data on the host.
pub fn host_data(var: &Var) -> Result<Vec<f32>> {
    Ok(var
        .as_tensor()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Adam with PyTorch's update: p -= lr/(1−β₁ᵗ) · m / (√(v/(1−β₂ᵗ)) + eps).
#[derive(Clone, Debug)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub steps: u64,
    /// First and second moments per parameter, in parameter order.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Adam {
    pub fn new(sizes: &[usize], betas: [f64; 2], eps: f64) -> Self {
        Self {
            beta1: betas[0],
            beta2: betas[1],
            eps,
            steps: 0,
            moments: sizes.iter().map(|&n| (vec![0.0; n], vec![0.0; n])).collect(),
        }
    }

    /// One step for every parameter with its gradient.
    pub fn step(&mut self, params: &[&Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        ensure!(
            params.len() == self.moments.len() && grads.len() == params.len(),
            "optimizer state does not match the parameters"
        );
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let step_size = (lr / bc1) as f32;
        let inv_bc2_sqrt = (1.0 / bc2_sqrt) as f32;
        for ((var, grad), (m, v)) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            ensure!(grad.len() == m.len(), "gradient size does not match its parameter");
            m.par_iter_mut().zip(v.par_iter_mut()).zip(grad.par_iter()).for_each(|((m, v), &g)| {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
            });
            let (m, v) = (&*m, &*v);
            update_param(var, |p| {
                p.par_iter_mut().zip(m.par_iter()).zip(v.par_iter()).for_each(|((p, &m), &v)| {
                    *p -= step_size * m / (v.sqrt() * inv_bc2_sqrt + eps);
                });
            })?;
        }
        Ok(())
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up, then constant, linear or cosine decay.
pub fn scheduled_lr(
    base: f64,
    step: usize,
    total: usize,
    warmup: usize,
    decay: crate::base::config::LrDecay,
) -> f64 {
    use crate::base::config::LrDecay;
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    match decay {
        LrDecay::None => base,
        LrDecay::Linear => base * (1.0 - progress),
        LrDecay::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_the_pytorch_rule() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut adam = Adam::new(&[2], [0.9, 0.999], 1e-8);
        let grads = [vec![0.5f32, -1.0]];
        adam.step(&[&var], &grads, 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr · g/(|g| + eps) ≈ ±lr.
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6, "{p:?}");
        adam.step(&[&var], &[vec![0.0f32, 0.0]], 0.1).unwrap();
        // Step 2 with g = 0: m = 0.9·0.05 → m̂ = 0.045/0.19; v̂ = 0.999·0.00025/0.001999.
        let m_hat = 0.9 * 0.05 / (1.0 - 0.81);
        let v_hat = 0.999 * 0.001 * 0.25 / (1.0 - 0.999f64.powi(2));
        let expect = 0.9 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] as f64 - expect).abs() < 1e-5, "{} vs {expect}", p[0]);
    }

    #[test]
    fn clipping_projection_and_norms() {
        let mut grads = vec![vec![3.0f32, 0.0], vec![4.0f32]];
        let before = clip_global_norm(&mut grads, 1.0);
        assert!((before - 5.0).abs() < 1e-9);
        assert!((global_norm(&grads) - 1.0).abs() < 1e-5);
        let w = [0.6f32, 0.8, 1.0, 0.0];
        let mut g = [1.0f32, 1.0, 2.0, 3.0];
        project_out_parallel(&mut g, &w, 2);
        assert!(
            (g[0] * 0.6 + g[1] * 0.8).abs() < 1e-6
                && g[2].abs() < 1e-6
                && (g[3] - 3.0).abs() < 1e-6
        );
        let mut rows = [3.0f32, 4.0, 0.0, 2.0];
        normalize_rows(&mut rows, 2);
        assert_eq!(rows, [0.6, 0.8, 0.0, 1.0]);
    }

    #[test]
    fn schedules() {
        use crate::base::config::LrDecay;
        assert_eq!(scheduled_lr(1.0, 0, 100, 10, LrDecay::None), 0.1);
        assert_eq!(scheduled_lr(1.0, 50, 100, 10, LrDecay::None), 1.0);
        assert!((scheduled_lr(1.0, 10, 110, 10, LrDecay::Cosine) - 1.0).abs() < 1e-12);
        assert!(scheduled_lr(1.0, 109, 110, 10, LrDecay::Cosine) < 0.01);
        assert!((scheduled_lr(1.0, 60, 110, 10, LrDecay::Linear) - 0.5).abs() < 1e-12);
    }
}

/// SGD with momentum (PyTorch's rule: v = μ v + g, step = g + μ v with Nesterov, else v) and
/// coupled weight decay (g += wd · p, per parameter), as torchvision's reference recipes use.
#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub buffers: Vec<Vec<f32>>,
    pub steps: u64,
}

impl Sgd {
    pub fn new(sizes: &[usize], momentum: f64, nesterov: bool) -> Self {
        Self {
            momentum,
            nesterov,
            buffers: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            steps: 0,
        }
    }

    /// One step; `decay[i]` is parameter i's weight decay.
    pub fn step(
        &mut self,
        params: &[&Var],
        grads: &[Vec<f32>],
        decay: &[f64],
        lr: f64,
    ) -> Result<()> {
        ensure!(
            params.len() == self.buffers.len() && grads.len() == params.len(),
            "optimizer state does not match the parameters"
        );
        let (mu, nesterov, first) = (self.momentum as f32, self.nesterov, self.steps == 0);
        self.steps += 1;
        for (((var, grad), buf), &wd) in
            params.iter().zip(grads).zip(self.buffers.iter_mut()).zip(decay)
        {
            let wd = wd as f32;
            let lr = lr as f32;
            update_param(var, |p| {
                p.par_iter_mut().zip(buf.par_iter_mut()).zip(grad.par_iter()).for_each(
                    |((p, b), &g)| {
                        let g = g + wd * *p;
                        *b = if first { g } else { mu * *b + g };
                        let step = if mu == 0.0 {
                            g
                        } else if nesterov {
                            g + mu * *b
                        } else {
                            *b
                        };
                        *p -= lr * step;
                    },
                );
            })?;
        }
        Ok(())
    }
}

/// AdamW: Adam's update plus decoupled weight decay p -= lr · wd · p (per parameter).
#[derive(Clone, Debug)]
pub struct AdamW {
    pub adam: Adam,
}

impl AdamW {
    pub fn new(sizes: &[usize], betas: [f64; 2], eps: f64) -> Self {
        Self { adam: Adam::new(sizes, betas, eps) }
    }

    pub fn step(
        &mut self,
        params: &[&Var],
        grads: &[Vec<f32>],
        decay: &[f64],
        lr: f64,
    ) -> Result<()> {
        for (var, &wd) in params.iter().zip(decay) {
            if wd > 0.0 {
                let factor = (1.0 - lr * wd) as f32;
                update_param(var, |p| p.par_iter_mut().for_each(|x| *x *= factor))?;
            }
        }
        self.adam.step(params, grads, lr)
    }
}
