//! Optimisers behind one trait (Adam with PyTorch's update rule and any eps, AdamW with decoupled
//! decay, SGD with momentum and coupled decay), and the gradient post-processing both trainers
//! use: global-norm clipping and the unit-norm decoder constraint.
//!
//! Gradients come to the host as f32 vectors; parameters are updated in place in their CPU
//! storage (no copy) or, on a GPU, downloaded, updated and uploaded. Optimiser state is saved in
//! checkpoints under the parameters' names.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{
    backprop::GradStore, CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var,
};
use rayon::prelude::*;

/// One gradient per parameter, on the host, in parameter order.
pub struct Gradients(pub Vec<Vec<f32>>);

impl Gradients {
    /// The gradients of `params` in a backward pass (zeros where the graph did not reach one).
    pub fn from_store(grads: &GradStore, params: &[&Var]) -> Result<Self> {
        let host = params
            .iter()
            .map(|var| match grads.get(var.as_tensor()) {
                Some(g) => {
                    Ok(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
                }
                None => Ok(vec![0.0; var.elem_count()]),
            })
            .collect::<Result<_>>()?;
        Ok(Self(host))
    }

    /// Zeros shaped like `params`.
    pub fn zeros(params: &[&Var]) -> Self {
        Self(params.iter().map(|v| vec![0.0; v.elem_count()]).collect())
    }

    /// self += scale · other.
    pub fn add_scaled(&mut self, other: &Gradients, scale: f32) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            a.par_iter_mut().zip(b.par_iter()).for_each(|(x, y)| *x += scale * y);
        }
    }

    /// √(Σ g²) over every gradient, in f64. Partial sums over fixed chunks, added in order: the
    /// result does not depend on how rayon splits the work, so resumed runs stay bit-identical.
    pub fn global_norm(&self) -> f64 {
        let partial: Vec<f64> = self
            .0
            .iter()
            .flat_map(|g| {
                g.par_chunks(1 << 14)
                    .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
                    .collect::<Vec<f64>>()
            })
            .collect();
        partial.iter().sum::<f64>().sqrt()
    }

    /// Scales all gradients so that their global norm is at most `max_norm` (PyTorch's
    /// clip_grad_norm_); returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        if norm > max_norm && norm.is_finite() {
            let s = (max_norm / (norm + 1e-6)) as f32;
            self.0.iter_mut().for_each(|g| g.par_iter_mut().for_each(|x| *x *= s));
        }
        norm
    }

    /// Removes from each row of gradient `index` its component along the same row of `weights`
    /// ((rows, d) row-major): the step then stays tangent to the unit sphere of each row.
    pub fn project_out_parallel(&mut self, index: usize, weights: &[f32], d: usize) {
        self.0[index].par_chunks_mut(d).zip(weights.par_chunks(d)).for_each(|(g, w)| {
            let norm_sq: f32 = w.iter().map(|x| x * x).sum();
            if norm_sq > 0.0 {
                let along = g.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() / norm_sq;
                g.iter_mut().zip(w).for_each(|(a, b)| *a -= along * b);
            }
        });
    }
}

/// Updates parameters from their gradients; state is kept per parameter, in parameter order.
pub trait Optimizer: Send {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()>;

    /// The state as CPU tensors named after the parameters (`names`, in parameter order).
    fn state(&self, names: &[&str]) -> Result<HashMap<String, Tensor>>;

    /// Restores what `state` saved for the same parameters; `source` names the file in errors.
    fn load_state(
        &mut self,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()>;
}

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
        let mut host = host_data(var)?;
        f(&mut host);
        var.set(&Tensor::from_vec(host, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A parameter's data on the host.
pub fn host_data(var: &Var) -> Result<Vec<f32>> {
    Ok(var.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

fn check_sizes(params: &[&Var], grads: &Gradients, state: usize) -> Result<()> {
    ensure!(
        params.len() == state && grads.0.len() == state,
        "optimizer state does not match the parameters"
    );
    for (p, g) in params.iter().zip(&grads.0) {
        ensure!(p.elem_count() == g.len(), "gradient size does not match its parameter");
    }
    Ok(())
}

/// A state tensor of `size` f32 values from a checkpoint.
fn saved_vector(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    size: usize,
    source: &str,
) -> Result<Vec<f32>> {
    let t = tensors.get(key).with_context(|| format!("{source}: missing `{key}`"))?;
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    ensure!(v.len() == size, "{source}: `{key}` has {} values, the parameter {size}", v.len());
    Ok(v)
}

fn saved_steps(tensors: &HashMap<String, Tensor>, source: &str) -> Result<u64> {
    let t = tensors.get(STEPS_KEY).with_context(|| format!("{source}: missing `{STEPS_KEY}`"))?;
    Ok(t.to_dtype(DType::I64)?.to_vec0::<i64>()?.max(0) as u64)
}

const STEPS_KEY: &str = "optimizer_steps";

fn steps_tensor(steps: u64) -> Result<Tensor> {
    Ok(Tensor::new(steps as i64, &Device::Cpu)?)
}

/// Adam with PyTorch's update: p -= lr/(1−β₁ᵗ) · m / (√(v/(1−β₂ᵗ)) + eps).
#[derive(Clone, Debug)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub steps: u64,
    /// First and second moments per parameter, in parameter order.
    moments: Vec<(Vec<f32>, Vec<f32>)>,
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
}

impl Optimizer for Adam {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()> {
        check_sizes(params, grads, self.moments.len())?;
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let step_size = (lr / bc1) as f32;
        let inv_bc2_sqrt = (1.0 / bc2_sqrt) as f32;
        for ((var, grad), (m, v)) in params.iter().zip(&grads.0).zip(self.moments.iter_mut()) {
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

    fn state(&self, names: &[&str]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::from([(STEPS_KEY.to_string(), steps_tensor(self.steps)?)]);
        for (name, (m, v)) in names.iter().zip(&self.moments) {
            out.insert(format!("adam_m.{name}"), Tensor::from_slice(m, m.len(), &Device::Cpu)?);
            out.insert(format!("adam_v.{name}"), Tensor::from_slice(v, v.len(), &Device::Cpu)?);
        }
        Ok(out)
    }

    fn load_state(
        &mut self,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        ensure!(names.len() == self.moments.len(), "{source}: optimizer state of another model");
        for (name, (m, v)) in names.iter().zip(self.moments.iter_mut()) {
            *m = saved_vector(tensors, &format!("adam_m.{name}"), m.len(), source)?;
            *v = saved_vector(tensors, &format!("adam_v.{name}"), v.len(), source)?;
        }
        self.steps = saved_steps(tensors, source)?;
        Ok(())
    }
}

/// AdamW: Adam's update plus decoupled weight decay p -= lr · wd · p, per parameter.
#[derive(Clone, Debug)]
pub struct AdamW {
    adam: Adam,
    decay: Vec<f64>,
}

impl AdamW {
    /// `decay[i]`: weight decay of parameter i.
    pub fn new(sizes: &[usize], betas: [f64; 2], eps: f64, decay: Vec<f64>) -> Self {
        Self { adam: Adam::new(sizes, betas, eps), decay }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()> {
        check_sizes(params, grads, self.decay.len())?;
        for (var, &wd) in params.iter().zip(&self.decay) {
            if wd > 0.0 {
                let factor = (1.0 - lr * wd) as f32;
                update_param(var, |p| p.par_iter_mut().for_each(|x| *x *= factor))?;
            }
        }
        self.adam.step(params, grads, lr)
    }

    fn state(&self, names: &[&str]) -> Result<HashMap<String, Tensor>> {
        self.adam.state(names)
    }

    fn load_state(
        &mut self,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        self.adam.load_state(names, tensors, source)
    }
}

/// SGD with momentum (PyTorch's rule: v = μ v + g, step = g + μ v with Nesterov, else v) and
/// coupled weight decay (g += wd · p, per parameter), as torchvision's reference recipes use.
#[derive(Clone, Debug)]
pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    decay: Vec<f64>,
    buffers: Vec<Vec<f32>>,
    steps: u64,
}

impl Sgd {
    /// `decay[i]`: weight decay of parameter i.
    pub fn new(sizes: &[usize], momentum: f64, nesterov: bool, decay: Vec<f64>) -> Self {
        Self {
            momentum,
            nesterov,
            decay,
            buffers: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            steps: 0,
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()> {
        check_sizes(params, grads, self.buffers.len())?;
        let (mu, nesterov, first) = (self.momentum as f32, self.nesterov, self.steps == 0);
        self.steps += 1;
        let lr = lr as f32;
        for (((var, grad), buf), &wd) in
            params.iter().zip(&grads.0).zip(self.buffers.iter_mut()).zip(&self.decay)
        {
            let wd = wd as f32;
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

    fn state(&self, names: &[&str]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::from([(STEPS_KEY.to_string(), steps_tensor(self.steps)?)]);
        for (name, b) in names.iter().zip(&self.buffers) {
            out.insert(format!("momentum.{name}"), Tensor::from_slice(b, b.len(), &Device::Cpu)?);
        }
        Ok(out)
    }

    fn load_state(
        &mut self,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        ensure!(names.len() == self.buffers.len(), "{source}: optimizer state of another model");
        for (name, b) in names.iter().zip(self.buffers.iter_mut()) {
            *b = saved_vector(tensors, &format!("momentum.{name}"), b.len(), source)?;
        }
        self.steps = saved_steps(tensors, source)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn adam_matches_the_pytorch_rule() {
        let var = var(&[1.0, -2.0]);
        let mut adam = Adam::new(&[2], [0.9, 0.999], 1e-8);
        adam.step(&[&var], &Gradients(vec![vec![0.5, -1.0]]), 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr · g/(|g| + eps) ≈ ±lr.
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6, "{p:?}");
        adam.step(&[&var], &Gradients(vec![vec![0.0, 0.0]]), 0.1).unwrap();
        // Step 2 with g = 0: m = 0.9·0.05 → m̂ = 0.045/0.19; v̂ = 0.999·0.00025/0.001999.
        let m_hat = 0.9 * 0.05 / (1.0 - 0.81);
        let v_hat = 0.999 * 0.001 * 0.25 / (1.0 - 0.999f64.powi(2));
        let expect = 0.9 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] as f64 - expect).abs() < 1e-5, "{} vs {expect}", p[0]);
    }

    #[test]
    fn state_round_trips_under_parameter_names() {
        let (a, b) = (var(&[1.0, 2.0]), var(&[3.0]));
        let mut adam = Adam::new(&[2, 1], [0.9, 0.999], 1e-8);
        adam.step(&[&a, &b], &Gradients(vec![vec![0.1, 0.2], vec![0.3]]), 0.01).unwrap();
        let saved = adam.state(&["a", "b"]).unwrap();
        assert!(saved.contains_key("adam_m.a") && saved.contains_key("adam_v.b"));
        let mut restored = Adam::new(&[2, 1], [0.9, 0.999], 1e-8);
        restored.load_state(&["a", "b"], &saved, "test").unwrap();
        assert_eq!(restored.steps, 1);
        assert_eq!(restored.moments, adam.moments);
        let mut wrong = Adam::new(&[3, 1], [0.9, 0.999], 1e-8);
        let e = wrong.load_state(&["a", "b"], &saved, "test").unwrap_err().to_string();
        assert!(e.contains("adam_m.a"), "{e}");

        let mut sgd = Sgd::new(&[2], 0.9, true, vec![0.0]);
        sgd.step(&[&a], &Gradients(vec![vec![1.0, 1.0]]), 0.1).unwrap();
        let saved = sgd.state(&["a"]).unwrap();
        let mut restored = Sgd::new(&[2], 0.9, true, vec![0.0]);
        restored.load_state(&["a"], &saved, "test").unwrap();
        assert_eq!((restored.steps, &restored.buffers), (1, &sgd.buffers));
    }

    #[test]
    fn sgd_momentum_nesterov_and_coupled_decay() {
        let p = var(&[1.0]);
        let mut sgd = Sgd::new(&[1], 0.5, false, vec![0.1]);
        sgd.step(&[&p], &Gradients(vec![vec![1.0]]), 0.1).unwrap();
        // g = 1 + 0.1·1 = 1.1; b = g; p = 1 − 0.11.
        assert!((p.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.89).abs() < 1e-6);
        sgd.step(&[&p], &Gradients(vec![vec![0.0]]), 0.1).unwrap();
        // g = 0.089; b = 0.5·1.1 + 0.089 = 0.639; p = 0.89 − 0.0639.
        assert!((p.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.8261).abs() < 1e-6);
    }

    #[test]
    fn clipping_and_projection() {
        let mut grads = Gradients(vec![vec![3.0, 0.0], vec![4.0]]);
        let before = grads.clip_global_norm(1.0);
        assert!((before - 5.0).abs() < 1e-9);
        assert!((grads.global_norm() - 1.0).abs() < 1e-5);
        let w = [0.6f32, 0.8, 1.0, 0.0];
        let mut g = Gradients(vec![vec![1.0, 1.0, 2.0, 3.0]]);
        g.project_out_parallel(0, &w, 2);
        let g = &g.0[0];
        assert!((g[0] * 0.6 + g[1] * 0.8).abs() < 1e-6 && g[2].abs() < 1e-6);
        assert!((g[3] - 3.0).abs() < 1e-6);
    }
}
