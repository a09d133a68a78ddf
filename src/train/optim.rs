//! Optimisers behind one trait (Adam with PyTorch's update rule and any eps, AdamW with decoupled
//! decay, SGD with momentum and coupled decay), and the gradient post-processing both trainers
//! use: global-norm clipping and the unit-norm decoder constraint.
//!
//! Host kernels: gradients come to the host as f32 vectors and CPU parameters are updated in place
//! (no copy); the optimiser state lives in host vectors. Portable kernels: gradients, state and
//! updates are device tensors and candle ops, so a GPU step moves nothing to the host. State is
//! saved in checkpoints under the parameters' names either way.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{
    backprop::GradStore, CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var,
};
use rayon::prelude::*;

use crate::base::cpu::with_cpu_slice;
use crate::base::grad_sink::GradSink;
use crate::base::host::Kernels;
use crate::base::simd::{lane_dot, lane_sum, vectorized};

/// Elements per parallel task of the element-wise parameter updates.
const UPDATE_CHUNK: usize = 1 << 14;

/// One gradient per parameter, in parameter order: host vectors or device tensors.
pub enum Gradients {
    Host(Vec<Vec<f32>>),
    Device(Vec<Tensor>),
}

impl Gradients {
    /// The gradients of `params` in a backward pass (zeros where the graph did not reach one):
    /// what candle's store holds plus what the host ops left in `sink`, which must then be
    /// empty (see `GradSink`).
    pub fn from_store(
        grads: &GradStore,
        sink: Option<&GradSink>,
        params: &[&Var],
        kernels: Kernels,
    ) -> Result<Self> {
        let stored = |var: &Var| -> Result<Option<Tensor>> {
            Ok(grads.get(var.as_tensor()).map(|g| g.to_dtype(DType::F32)).transpose()?)
        };
        let sunk = |var: &Var| sink.and_then(|sink| sink.take(var.as_tensor()));
        let gradients = if kernels.is_host() {
            let host = params
                .iter()
                .map(|var| {
                    Ok(match (sunk(var), stored(var)?) {
                        (Some(mut g), Some(s)) => {
                            with_cpu_slice(&s, |s| crate::base::cpu::add_assign(&mut g, s))?;
                            g
                        }
                        (Some(g), None) => g,
                        (None, Some(s)) => with_cpu_slice(&s, <[f32]>::to_vec)?,
                        (None, None) => vec![0.0; var.elem_count()],
                    })
                })
                .collect::<Result<_>>()?;
            Gradients::Host(host)
        } else {
            let device = params
                .iter()
                .map(|var| {
                    let sunk = sunk(var)
                        .map(|g| Tensor::from_vec(g, var.shape(), var.device()))
                        .transpose()?;
                    Ok(match (sunk, stored(var)?) {
                        (Some(g), Some(s)) => (g + s)?,
                        (Some(g), None) | (None, Some(g)) => g,
                        (None, None) => var.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
                    })
                })
                .collect::<Result<_>>()?;
            Gradients::Device(device)
        };
        if let Some(sink) = sink {
            sink.finish()?;
        }
        Ok(gradients)
    }

    /// Zeros shaped like `params`.
    pub fn zeros(params: &[&Var], kernels: Kernels) -> Result<Self> {
        Ok(if kernels.is_host() {
            Gradients::Host(params.iter().map(|v| vec![0.0; v.elem_count()]).collect())
        } else {
            Gradients::Device(
                params
                    .iter()
                    .map(|v| v.as_tensor().zeros_like()?.to_dtype(DType::F32))
                    .collect::<candle_core::Result<_>>()?,
            )
        })
    }

    /// self += scale · other.
    pub fn add_scaled(&mut self, other: &Gradients, scale: f64) -> Result<()> {
        match (self, other) {
            (Gradients::Host(a), Gradients::Host(b)) => {
                let s = scale as f32;
                for (a, b) in a.iter_mut().zip(b) {
                    a.par_iter_mut().zip(b.par_iter()).for_each(|(x, y)| *x += s * y);
                }
            }
            (Gradients::Device(a), Gradients::Device(b)) => {
                for (a, b) in a.iter_mut().zip(b) {
                    *a = (&*a + (b * scale)?)?;
                }
            }
            _ => anyhow::bail!("gradients of host and portable kernels cannot be mixed"),
        }
        Ok(())
    }

    /// Gradient `from` added into gradient `into` (same shape), `from` zeroed: one shared
    /// parameter stored twice (a tied decoder) gets the sum of both uses.
    pub fn fold_into(&mut self, from: usize, into: usize) -> Result<()> {
        anyhow::ensure!(from != into, "a gradient cannot fold into itself");
        match self {
            Gradients::Host(g) => {
                let zeros = vec![0.0; g[from].len()];
                let moved = std::mem::replace(&mut g[from], zeros);
                g[into].par_iter_mut().zip(moved.par_iter()).for_each(|(a, b)| *a += b);
            }
            Gradients::Device(g) => {
                g[into] = (&g[into] + &g[from])?;
                g[from] = g[from].zeros_like()?;
            }
        }
        Ok(())
    }

    /// Zeroes gradient `index`: the parameter stays where it is (Adam's update of a zero
    /// gradient with zero moments is zero).
    pub fn zero(&mut self, index: usize) -> Result<()> {
        match self {
            Gradients::Host(g) => g[index].iter_mut().for_each(|v| *v = 0.0),
            Gradients::Device(g) => g[index] = g[index].zeros_like()?,
        }
        Ok(())
    }

    /// √(Σ g²) over every gradient, as a scalar tensor. Host: in f64 over fixed chunks added in
    /// order, so the result does not depend on how rayon splits the work (resumed runs stay
    /// bit-identical). Portable: on the device, without a host round trip.
    pub fn global_norm(&self) -> Result<Tensor> {
        match self {
            Gradients::Host(grads) => Ok(Tensor::new(host_norm(grads), &Device::Cpu)?),
            Gradients::Device(grads) => {
                let mut total: Option<Tensor> = None;
                for g in grads {
                    let s = g.sqr()?.sum_all()?;
                    total = Some(match total {
                        Some(t) => (t + s)?,
                        None => s,
                    });
                }
                let total = total.context("no gradients")?;
                Ok(total.sqrt()?)
            }
        }
    }

    /// The global norm (a scalar tensor), after which the gradients are clipped to `clip`
    /// when given (`clip_global_norm`).
    pub fn norm_clipped_to(&mut self, clip: Option<f64>) -> Result<Tensor> {
        match clip {
            Some(max) => self.clip_global_norm(max),
            None => self.global_norm(),
        }
    }

    /// Scales all gradients so that their global norm is at most `max_norm` (PyTorch's
    /// clip_grad_norm_); returns the norm before clipping (a scalar tensor).
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<Tensor> {
        let norm = self.global_norm()?;
        match self {
            Gradients::Host(grads) => {
                // The norm just computed (one pass over the gradients, not a second).
                if let Some(s) = clip_factor(norm.to_scalar::<f64>()?, max_norm) {
                    grads.iter_mut().for_each(|g| g.par_iter_mut().for_each(|x| *x *= s));
                }
            }
            Gradients::Device(grads) => {
                // factor = max/(norm + 1e-6) where norm > max (and finite), else 1.
                let limit = norm.ones_like()?.affine(0.0, max_norm)?;
                let over = norm
                    .gt(&limit)?
                    .mul(&norm.lt(&norm.ones_like()?.affine(0.0, f64::INFINITY)?)?)?;
                let scaled = limit.div(&(&norm + 1e-6)?)?;
                let factor = over.where_cond(&scaled, &norm.ones_like()?)?;
                for g in grads.iter_mut() {
                    *g = g.broadcast_mul(&factor.to_dtype(g.dtype())?)?;
                }
            }
        }
        Ok(norm)
    }

    /// Removes from each row of gradient `index` its component along the same row of `weights`
    /// ((rows, d)): the step then stays tangent to the unit sphere of each row.
    pub fn project_out_parallel(&mut self, index: usize, weights: &Var, d: usize) -> Result<()> {
        match self {
            Gradients::Host(grads) => {
                let mut project = |w: &[f32]| {
                    grads[index]
                        .par_chunks_mut(d)
                        .zip(w.par_chunks(d))
                        .for_each(|(g, w)| vectorized!(project_row(g, w)))
                };
                // CPU f32 parameters are read in place; others through a host copy.
                match weights.device().is_cpu() && weights.dtype() == DType::F32 {
                    true => with_cpu_slice(weights.as_tensor(), project)?,
                    false => project(&host_data(weights)?),
                }
            }
            Gradients::Device(grads) => {
                let w = weights.as_tensor().detach();
                let g = &grads[index];
                let norm_sq = w.sqr()?.sum_keepdim(1)?;
                let along = g.mul(&w)?.sum_keepdim(1)?;
                let positive = norm_sq.gt(&norm_sq.zeros_like()?)?;
                let safe = positive.where_cond(&norm_sq, &norm_sq.ones_like()?)?;
                let coef = positive.where_cond(&along.div(&safe)?, &along.zeros_like()?)?;
                grads[index] = (g - w.broadcast_mul(&coef)?)?;
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        match self {
            Gradients::Host(g) => g.len(),
            Gradients::Device(g) => g.len(),
        }
    }

    /// The gradients as host vectors (tests, diagnostics).
    pub fn to_host(&self) -> Result<Vec<Vec<f32>>> {
        match self {
            Gradients::Host(g) => Ok(g.clone()),
            Gradients::Device(g) => g.iter().map(crate::base::host::read_f32).collect(),
        }
    }
}

/// PyTorch's clip_grad_norm_ factor for a global norm `norm`: max/(norm + 1e-6) where the norm
/// is above `max_norm` (and finite), else None (the gradients stay as they are).
fn clip_factor(norm: f64, max_norm: f64) -> Option<f32> {
    (norm > max_norm && norm.is_finite()).then(|| (max_norm / (norm + 1e-6)) as f32)
}

/// Removes from `g` its component along `w` (one row; in vector registers when called inside
/// `vectorized!`: a single running f32 sum would not vectorise).
#[inline(always)]
fn project_row(g: &mut [f32], w: &[f32]) {
    let norm_sq = lane_sum(w, |x| x as f64 * x as f64);
    if norm_sq > 0.0 {
        let along = (lane_dot(g, w, |a, b| a as f64 * b as f64) / norm_sq) as f32;
        g.iter_mut().zip(w).for_each(|(a, b)| *a -= along * b);
    }
}

/// The f64 norm of host gradients, summed over fixed chunks (`NORM_CHUNK`) in order.
fn host_norm(grads: &[Vec<f32>]) -> f64 {
    let partial: Vec<f64> = grads
        .iter()
        .flat_map(|g| g.par_chunks(NORM_CHUNK).map(chunk_sum_of_squares).collect::<Vec<f64>>())
        .collect();
    norm_of_chunks(&partial)
}

/// Gradient elements per partial sum of `host_norm`.
const NORM_CHUNK: usize = 1 << 14;

/// One chunk's Σ g² for `host_norm`; call it inside the task that reads the chunk.
#[inline(always)]
fn chunk_sum_of_squares(chunk: &[f32]) -> f64 {
    vectorized!(lane_sum(chunk, |x| x as f64 * x as f64))
}

/// The host gradients' norm and the factor that clips them to `clip` (1 when nothing is
/// clipped), for an update that scales each gradient as it reads it.
fn norm_and_clip_factor(grads: &[Vec<f32>], clip: Option<f64>) -> (f64, f32) {
    let norm = host_norm(grads);
    (norm, clip.and_then(|max| clip_factor(norm, max)).unwrap_or(1.0))
}

/// The norm from the chunks' sums, added in order.
fn norm_of_chunks(partial: &[f64]) -> f64 {
    partial.iter().sum::<f64>().sqrt()
}

/// Updates parameters from their gradients; state is kept per parameter, in parameter order.
pub trait Optimizer: Send {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()>;

    /// `step` after clipping the gradients to the global norm `clip` when given (PyTorch's
    /// clip_grad_norm_); returns their norm before clipping (a scalar tensor). The same values
    /// as `clip_global_norm` (or `global_norm`) then `step`; an optimizer may fold the norm and
    /// the clip factor into its own pass over the parameters.
    fn clip_and_step(
        &mut self,
        params: &[&Var],
        grads: Gradients,
        lr: f64,
        clip: Option<f64>,
    ) -> Result<Tensor> {
        clip_then_step(self, params, grads, lr, clip)
    }

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

/// `clip_global_norm` (or `global_norm`) then `opt.step`, in two passes: `clip_and_step` of
/// optimizers without a pass of their own.
fn clip_then_step<O: Optimizer + ?Sized>(
    opt: &mut O,
    params: &[&Var],
    mut grads: Gradients,
    lr: f64,
    clip: Option<f64>,
) -> Result<Tensor> {
    let norm = grads.norm_clipped_to(clip)?;
    opt.step(params, &grads, lr)?;
    Ok(norm)
}

/// Applies `f` to a parameter's f32 data in place (host kernels).
pub fn update_param(var: &Var, f: impl FnMut(&mut [f32]) + Send) -> Result<()> {
    // The op is called through `&self`: the closure sits behind a mutex.
    struct HostUpdate<F>(std::sync::Mutex<F>);
    impl<F: FnMut(&mut [f32]) + Send> InplaceOp1 for HostUpdate<F> {
        fn name(&self) -> &'static str {
            "host-update"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            crate::base::host::host_kernel_ran();
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
        // Other devices and dtypes: through an f32 host copy (host kernels only).
        let mut f = f;
        let mut host = host_data(var)?;
        f(&mut host);
        var.set(&Tensor::from_vec(host, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A parameter's data on the host.
pub fn host_data(var: &Var) -> Result<Vec<f32>> {
    crate::base::host::read_f32(var.as_tensor())
}

/// Rescales each row of a (rows, d) parameter to unit L2 norm (rows of zeros stay zero).
pub fn normalize_rows(var: &Var, d: usize, kernels: Kernels) -> Result<()> {
    if kernels.is_host() {
        return update_param(var, |w| crate::base::cpu::normalize_rows(w, d));
    }
    let w = var.as_tensor().detach();
    let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
    let positive = norm.gt(&norm.zeros_like()?)?;
    let safe = positive.where_cond(&norm, &norm.ones_like()?)?;
    var.set(&w.broadcast_div(&safe)?)?;
    Ok(())
}

fn check_sizes(params: &[&Var], grads: &Gradients, state: usize) -> Result<()> {
    ensure!(
        params.len() == state && grads.len() == state,
        "optimizer state does not match the parameters"
    );
    if let Gradients::Host(grads) = grads {
        for (p, g) in params.iter().zip(grads) {
            ensure!(p.elem_count() == g.len(), "gradient size does not match its parameter");
        }
    }
    Ok(())
}

/// Per-parameter state buffers: host vectors or device tensors (f32, shaped like the parameter).
enum Buffers {
    Host(Vec<Vec<f32>>),
    Device(Vec<Tensor>),
}

impl Buffers {
    fn zeros(params: &[&Var], kernels: Kernels) -> Result<Self> {
        Ok(match kernels {
            Kernels::Host => {
                Buffers::Host(params.iter().map(|p| vec![0.0; p.elem_count()]).collect())
            }
            Kernels::Portable => Buffers::Device(
                params
                    .iter()
                    .map(|p| p.as_tensor().zeros_like()?.to_dtype(DType::F32))
                    .collect::<candle_core::Result<_>>()?,
            ),
        })
    }

    fn len(&self) -> usize {
        match self {
            Buffers::Host(b) => b.len(),
            Buffers::Device(b) => b.len(),
        }
    }

    /// The buffers as CPU tensors under `<prefix>.<name>`.
    fn save(&self, prefix: &str, names: &[&str], out: &mut HashMap<String, Tensor>) -> Result<()> {
        for (i, name) in names.iter().enumerate() {
            let t = match self {
                Buffers::Host(b) => Tensor::from_slice(&b[i], b[i].len(), &Device::Cpu)?,
                Buffers::Device(b) => b[i].flatten_all()?.to_device(&Device::Cpu)?,
            };
            out.insert(format!("{prefix}.{name}"), t);
        }
        Ok(())
    }

    fn load(
        &mut self,
        prefix: &str,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        ensure!(names.len() == self.len(), "{source}: optimizer state of another model");
        for (i, name) in names.iter().enumerate() {
            let key = format!("{prefix}.{name}");
            let t = tensors.get(&key).with_context(|| format!("{source}: missing `{key}`"))?;
            let t = t.flatten_all()?.to_dtype(DType::F32)?;
            match self {
                Buffers::Host(b) => {
                    ensure!(t.elem_count() == b[i].len(), "{source}: `{key}` has the wrong size");
                    b[i] = t.to_vec1()?;
                }
                Buffers::Device(b) => {
                    ensure!(
                        t.elem_count() == b[i].elem_count(),
                        "{source}: `{key}` has the wrong size"
                    );
                    b[i] = t.reshape(b[i].shape())?.to_device(b[i].device())?;
                }
            }
        }
        Ok(())
    }
}

const STEPS_KEY: &str = "optimizer_steps";

fn save_steps(steps: u64, out: &mut HashMap<String, Tensor>) -> Result<()> {
    out.insert(STEPS_KEY.to_string(), Tensor::new(steps as i64, &Device::Cpu)?);
    Ok(())
}

fn load_steps(tensors: &HashMap<String, Tensor>, source: &str) -> Result<u64> {
    let t = tensors.get(STEPS_KEY).with_context(|| format!("{source}: missing `{STEPS_KEY}`"))?;
    Ok(t.to_dtype(DType::I64)?.to_vec0::<i64>()?.max(0) as u64)
}

/// Adam with PyTorch's update: p -= lr/(1−β₁ᵗ) · m / (√(v/(1−β₂ᵗ)) + eps).
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub steps: u64,
    /// First and second moments per parameter.
    m: Buffers,
    v: Buffers,
}

/// A (rows, d) parameter held to unit-norm rows (the SAE decoder): its gradient rows are made
/// tangent to the parameter's rows before the update, and the rows renormalised after it.
#[derive(Clone, Copy, Debug)]
pub struct UnitRows {
    /// The parameter's position in the parameter list.
    pub index: usize,
    pub d: usize,
}

/// One Adam step's scalars.
#[derive(Clone, Copy)]
struct AdamStep {
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
}

impl AdamStep {
    /// The update of (p, m, v) from the gradient `g` times `scale`, element by element (in
    /// vector registers when called inside `vectorized!`).
    #[inline(always)]
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], scale: f32) {
        let Self { b1, b2, eps, step_size, inv_bc2_sqrt } = *self;
        let n = p.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for i in 0..n {
            let g = g[i] * scale;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            p[i] -= step_size * m[i] / (v[i].sqrt() * inv_bc2_sqrt + eps);
        }
    }
}

impl Adam {
    pub fn new(params: &[&Var], betas: [f64; 2], eps: f64, kernels: Kernels) -> Result<Self> {
        Ok(Self {
            beta1: betas[0],
            beta2: betas[1],
            eps,
            steps: 0,
            m: Buffers::zeros(params, kernels)?,
            v: Buffers::zeros(params, kernels)?,
        })
    }

    /// The scalars of the next step (`steps` + 1); the caller counts it once it is applied.
    fn next_step(&self, lr: f64) -> AdamStep {
        let t = (self.steps + 1) as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        AdamStep {
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            eps: self.eps as f32,
            step_size: (lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
        }
    }

    /// Clipping to the global norm `clip` (PyTorch's rule), then `unit_rows`' constraint around
    /// the update: the arithmetic of `clip_global_norm`, `project_out_parallel`, `step` and
    /// `normalize_rows` in that order, bit for bit. With host kernels the clip factor is
    /// applied as each gradient is read, and each constrained row is projected, updated and
    /// renormalised while in cache: one pass over the parameters instead of four. Returns the
    /// gradients' norm before clipping (a scalar tensor).
    pub fn clipped_step(
        &mut self,
        params: &[&Var],
        mut grads: Gradients,
        lr: f64,
        clip: Option<f64>,
        unit_rows: Option<UnitRows>,
    ) -> Result<Tensor> {
        check_sizes(params, &grads, self.m.len())?;
        if let Some(rows) = unit_rows {
            ensure!(
                rows.index < params.len()
                    && rows.d > 0
                    && params[rows.index].elem_count().is_multiple_of(rows.d),
                "the constrained parameter is not made of rows of {}",
                rows.d
            );
        }
        if let Gradients::Host(host) = &grads {
            let (norm, scale) = norm_and_clip_factor(host, clip);
            let adam = self.next_step(lr);
            let (Buffers::Host(ms), Buffers::Host(vs)) = (&mut self.m, &mut self.v) else {
                anyhow::bail!("optimizer state and gradients come from different kernels")
            };
            host_update(params, host, (ms, vs), adam, scale, unit_rows)?;
            self.steps += 1;
            return Ok(Tensor::new(norm, &Device::Cpu)?);
        }
        let norm = grads.norm_clipped_to(clip)?;
        if let Some(rows) = unit_rows {
            grads.project_out_parallel(rows.index, params[rows.index], rows.d)?;
        }
        self.step(params, &grads, lr)?;
        if let Some(rows) = unit_rows {
            normalize_rows(params[rows.index], rows.d, Kernels::Portable)?;
        }
        Ok(norm)
    }
}

/// Adam's host update of `params` with moments (ms, vs), every gradient multiplied by `scale`
/// as it is read (1 leaves it exact); see `Adam::clipped_step` for `unit_rows`.
fn host_update(
    params: &[&Var],
    grads: &[Vec<f32>],
    (ms, vs): (&mut [Vec<f32>], &mut [Vec<f32>]),
    adam: AdamStep,
    scale: f32,
    unit_rows: Option<UnitRows>,
) -> Result<()> {
    for (i, ((var, grad), (m, v))) in
        params.iter().zip(grads).zip(ms.iter_mut().zip(vs)).enumerate()
    {
        match unit_rows.filter(|rows| rows.index == i) {
            None => update_param(var, |p| {
                p.par_chunks_mut(UPDATE_CHUNK)
                    .zip(m.par_chunks_mut(UPDATE_CHUNK))
                    .zip(v.par_chunks_mut(UPDATE_CHUNK))
                    .zip(grad.par_chunks(UPDATE_CHUNK))
                    .for_each(|(((p, m), v), g)| vectorized!(adam.apply(p, m, v, g, scale)));
            })?,
            Some(UnitRows { d, .. }) => {
                // Whole rows per task, about UPDATE_CHUNK elements.
                let chunk = (UPDATE_CHUNK / d).max(1) * d;
                update_param(var, |p| {
                    p.par_chunks_mut(chunk)
                        .zip(m.par_chunks_mut(chunk))
                        .zip(v.par_chunks_mut(chunk))
                        .zip(grad.par_chunks(chunk))
                        .for_each(|(((p, m), v), g)| {
                            let mut tangent = vec![0.0f32; d];
                            vectorized!(for (((p, m), v), g) in p
                                .chunks_mut(d)
                                .zip(m.chunks_mut(d))
                                .zip(v.chunks_mut(d))
                                .zip(g.chunks(d))
                            {
                                tangent.iter_mut().zip(g).for_each(|(t, &g)| *t = g * scale);
                                project_row(&mut tangent, p);
                                adam.apply(p, m, v, &tangent, 1.0);
                                crate::base::cpu::normalize_row(p);
                            })
                        });
                })?
            }
        }
    }
    Ok(())
}

impl Optimizer for Adam {
    fn clip_and_step(
        &mut self,
        params: &[&Var],
        grads: Gradients,
        lr: f64,
        clip: Option<f64>,
    ) -> Result<Tensor> {
        self.clipped_step(params, grads, lr, clip, None)
    }

    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()> {
        check_sizes(params, grads, self.m.len())?;
        let adam = self.next_step(lr);
        match (grads, &mut self.m, &mut self.v) {
            (Gradients::Host(grads), Buffers::Host(ms), Buffers::Host(vs)) => {
                host_update(params, grads, (ms, vs), adam, 1.0, None)?;
            }
            (Gradients::Device(grads), Buffers::Device(ms), Buffers::Device(vs)) => {
                let AdamStep { b1, b2, eps, step_size, inv_bc2_sqrt } = adam;
                for ((var, g), (m, v)) in params.iter().zip(grads).zip(ms.iter_mut().zip(vs)) {
                    let g = g.reshape(m.shape())?;
                    *m = (m.affine(b1 as f64, 0.0)? + g.affine((1.0 - b1) as f64, 0.0)?)?;
                    *v = (v.affine(b2 as f64, 0.0)? + g.sqr()?.affine((1.0 - b2) as f64, 0.0)?)?;
                    let denom = v.sqrt()?.affine(inv_bc2_sqrt as f64, eps as f64)?;
                    let update = m.affine(step_size as f64, 0.0)?.div(&denom)?;
                    let p = var.as_tensor();
                    var.set(&(p - update.to_dtype(p.dtype())?)?)?;
                }
            }
            _ => anyhow::bail!("optimizer state and gradients come from different kernels"),
        }
        self.steps += 1;
        Ok(())
    }

    fn state(&self, names: &[&str]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        save_steps(self.steps, &mut out)?;
        self.m.save("adam_m", names, &mut out)?;
        self.v.save("adam_v", names, &mut out)?;
        Ok(out)
    }

    fn load_state(
        &mut self,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        self.m.load("adam_m", names, tensors, source)?;
        self.v.load("adam_v", names, tensors, source)?;
        self.steps = load_steps(tensors, source)?;
        Ok(())
    }
}

/// Multiplies a parameter by `factor` (decoupled weight decay).
fn scale_param(var: &Var, factor: f64, kernels: Kernels) -> Result<()> {
    if kernels.is_host() {
        let factor = factor as f32;
        update_param(var, |p| p.par_iter_mut().for_each(|x| *x *= factor))
    } else {
        Ok(var.set(&var.as_tensor().affine(factor, 0.0)?)?)
    }
}

/// AdamW: Adam's update plus decoupled weight decay p -= lr · wd · p, per parameter.
pub struct AdamW {
    adam: Adam,
    decay: Vec<f64>,
    kernels: Kernels,
}

impl AdamW {
    /// `decay[i]`: weight decay of parameter i.
    pub fn new(
        params: &[&Var],
        betas: [f64; 2],
        eps: f64,
        decay: Vec<f64>,
        kernels: Kernels,
    ) -> Result<Self> {
        Ok(Self { adam: Adam::new(params, betas, eps, kernels)?, decay, kernels })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()> {
        check_sizes(params, grads, self.decay.len())?;
        for (var, &wd) in params.iter().zip(&self.decay) {
            if wd > 0.0 {
                scale_param(var, 1.0 - lr * wd, self.kernels)?;
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
pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    decay: Vec<f64>,
    buffers: Buffers,
    steps: u64,
}

impl Sgd {
    /// `decay[i]`: weight decay of parameter i.
    pub fn new(
        params: &[&Var],
        momentum: f64,
        nesterov: bool,
        decay: Vec<f64>,
        kernels: Kernels,
    ) -> Result<Self> {
        Ok(Self { momentum, nesterov, decay, buffers: Buffers::zeros(params, kernels)?, steps: 0 })
    }
}

#[derive(Clone, Copy)]
struct SgdHyper {
    lr: f32,
    mu: f32,
    wd: f32,
    /// The clip factor, applied to each gradient as it is read (1 leaves it exact).
    scale: f32,
}

/// SGD on a slice of (parameter, momentum buffer, gradient): g' = scale·g + wd·p; buffer = g' on the
/// first step, else μ·buffer + g'; p −= lr · (g' without momentum, g' + μ·buffer with Nesterov,
/// else buffer) — PyTorch's `SGD`.
#[inline(always)]
fn sgd_lanes<const FIRST: bool, const PLAIN: bool, const NESTEROV: bool>(
    p: &mut [f32],
    b: &mut [f32],
    g: &[f32],
    h: SgdHyper,
) {
    for ((p, b), &g) in p.iter_mut().zip(b.iter_mut()).zip(g) {
        let g = g * h.scale + h.wd * *p;
        *b = if FIRST { g } else { h.mu * *b + g };
        let step = if PLAIN {
            g
        } else if NESTEROV {
            g + h.mu * *b
        } else {
            *b
        };
        *p -= h.lr * step;
    }
}

impl Sgd {
    /// The host update of every parameter with its gradient times `scale`; with `norm_partials`
    /// each task also adds up its chunk's Σ g² (as `host_norm`, while the chunk is in cache) and
    /// the sums come back in `host_norm`'s order.
    fn host_step(
        &mut self,
        params: &[&Var],
        grads: &[Vec<f32>],
        lr: f64,
        scale: f32,
        norm_partials: bool,
    ) -> Result<Vec<f64>> {
        let Buffers::Host(buffers) = &mut self.buffers else {
            anyhow::bail!("optimizer state and gradients come from different kernels")
        };
        let (mu, nesterov, first) = (self.momentum as f32, self.nesterov, self.steps == 0);
        let lr = lr as f32;
        let mut partials = Vec::new();
        for (((var, grad), buf), &wd) in
            params.iter().zip(grads).zip(buffers.iter_mut()).zip(&self.decay)
        {
            let h = SgdHyper { lr, mu, wd: wd as f32, scale };
            update_param(var, |p| {
                // The same chunks as `host_norm`'s, so that its partial sums can come from here.
                const _: () = assert!(UPDATE_CHUNK == NORM_CHUNK);
                let sums: Vec<f64> = p
                    .par_chunks_mut(UPDATE_CHUNK)
                    .zip(buf.par_chunks_mut(UPDATE_CHUNK))
                    .zip(grad.par_chunks(UPDATE_CHUNK))
                    .map(|((p, b), g)| {
                        let n = p.len();
                        let (b, g) = (&mut b[..n], &g[..n]);
                        let sum = if norm_partials { chunk_sum_of_squares(g) } else { 0.0 };
                        // One loop per case: with the branches inside, LLVM kept the loop
                        // scalar (perf: vmovss in the AVX-512 copy).
                        vectorized!(match (first, mu == 0.0, nesterov) {
                            (true, true, _) => sgd_lanes::<true, true, false>(p, b, g, h),
                            (true, false, true) => sgd_lanes::<true, false, true>(p, b, g, h),
                            (true, false, false) => sgd_lanes::<true, false, false>(p, b, g, h),
                            (false, true, _) => sgd_lanes::<false, true, false>(p, b, g, h),
                            (false, false, true) => sgd_lanes::<false, false, true>(p, b, g, h),
                            (false, false, false) => {
                                sgd_lanes::<false, false, false>(p, b, g, h)
                            }
                        });
                        sum
                    })
                    .collect();
                if norm_partials {
                    partials.extend(sums);
                }
            })?;
        }
        self.steps += 1;
        Ok(partials)
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[&Var], grads: &Gradients, lr: f64) -> Result<()> {
        check_sizes(params, grads, self.buffers.len())?;
        match (grads, &mut self.buffers) {
            (Gradients::Host(grads), Buffers::Host(_)) => {
                return self.host_step(params, grads, lr, 1.0, false).map(drop);
            }
            (Gradients::Device(grads), Buffers::Device(buffers)) => {
                let (mu, nesterov, first) = (self.momentum as f32, self.nesterov, self.steps == 0);
                for (((var, g), buf), &wd) in
                    params.iter().zip(grads).zip(buffers.iter_mut()).zip(&self.decay)
                {
                    let p = var.as_tensor();
                    let g = (g.reshape(p.shape())? + p.to_dtype(DType::F32)?.affine(wd, 0.0)?)?;
                    *buf = if first { g.clone() } else { (buf.affine(mu as f64, 0.0)? + &g)? };
                    let step = if mu == 0.0 {
                        g
                    } else if nesterov {
                        (&g + buf.affine(mu as f64, 0.0)?)?
                    } else {
                        buf.clone()
                    };
                    var.set(&(p - step.affine(lr as f32 as f64, 0.0)?.to_dtype(p.dtype())?)?)?;
                }
            }
            _ => anyhow::bail!("optimizer state and gradients come from different kernels"),
        }
        self.steps += 1;
        Ok(())
    }

    /// With host kernels one pass over the parameters: the norm's partial sums come from the
    /// update's own reads when nothing is clipped; with clipping the factor is applied as each
    /// gradient is read (no scaling pass). The bits of `clip_global_norm` then `step`.
    fn clip_and_step(
        &mut self,
        params: &[&Var],
        grads: Gradients,
        lr: f64,
        clip: Option<f64>,
    ) -> Result<Tensor> {
        check_sizes(params, &grads, self.buffers.len())?;
        let Gradients::Host(host) = &grads else {
            return clip_then_step(self, params, grads, lr, clip);
        };
        let norm = match clip {
            None => norm_of_chunks(&self.host_step(params, host, lr, 1.0, true)?),
            Some(_) => {
                let (norm, scale) = norm_and_clip_factor(host, clip);
                self.host_step(params, host, lr, scale, false)?;
                norm
            }
        };
        Ok(Tensor::new(norm, &Device::Cpu)?)
    }

    fn state(&self, names: &[&str]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        save_steps(self.steps, &mut out)?;
        self.buffers.save("momentum", names, &mut out)?;
        Ok(out)
    }

    fn load_state(
        &mut self,
        names: &[&str],
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        self.buffers.load("momentum", names, tensors, source)?;
        self.steps = load_steps(tensors, source)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1::<f32>().unwrap()
    }

    fn grads(kernels: Kernels, g: &[&[f32]]) -> Gradients {
        match kernels {
            Kernels::Host => Gradients::Host(g.iter().map(|g| g.to_vec()).collect()),
            Kernels::Portable => Gradients::Device(
                g.iter().map(|g| Tensor::new(*g, &Device::Cpu).unwrap()).collect(),
            ),
        }
    }

    #[test]
    fn adam_matches_the_pytorch_rule_with_both_kernels() {
        for kernels in [Kernels::Host, Kernels::Portable] {
            let p = var(&[1.0, -2.0]);
            let mut adam = Adam::new(&[&p], [0.9, 0.999], 1e-8, kernels).unwrap();
            adam.step(&[&p], &grads(kernels, &[&[0.5, -1.0]]), 0.1).unwrap();
            // Step 1: m̂ = g, v̂ = g², update = lr · g/(|g| + eps) ≈ ±lr.
            let v = values(&p);
            assert!((v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6, "{v:?}");
            adam.step(&[&p], &grads(kernels, &[&[0.0, 0.0]]), 0.1).unwrap();
            // Step 2 with g = 0: m = 0.9·0.05 → m̂ = 0.045/0.19; v̂ = 0.999·0.00025/0.001999.
            let m_hat = 0.9 * 0.05 / (1.0 - 0.81);
            let v_hat = 0.999 * 0.001 * 0.25 / (1.0 - 0.999f64.powi(2));
            let expect = 0.9 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
            assert!((values(&p)[0] as f64 - expect).abs() < 1e-5, "{kernels:?}");
        }
    }

    #[test]
    fn state_round_trips_under_parameter_names_across_kernels() {
        let (a, b) = (var(&[1.0, 2.0]), var(&[3.0]));
        let mut adam = Adam::new(&[&a, &b], [0.9, 0.999], 1e-8, Kernels::Host).unwrap();
        adam.step(&[&a, &b], &grads(Kernels::Host, &[&[0.1, 0.2], &[0.3]]), 0.01).unwrap();
        let saved = adam.state(&["a", "b"]).unwrap();
        assert!(saved.contains_key("adam_m.a") && saved.contains_key("adam_v.b"));
        // A portable optimiser continues from a host one's checkpoint, and back.
        let mut portable = Adam::new(&[&a, &b], [0.9, 0.999], 1e-8, Kernels::Portable).unwrap();
        portable.load_state(&["a", "b"], &saved, "test").unwrap();
        assert_eq!(portable.steps, 1);
        let again = portable.state(&["a", "b"]).unwrap();
        for key in ["adam_m.a", "adam_v.a", "adam_m.b", "adam_v.b"] {
            assert_eq!(
                saved[key].to_vec1::<f32>().unwrap(),
                again[key].to_vec1::<f32>().unwrap(),
                "{key}"
            );
        }
        let c = var(&[1.0, 2.0, 3.0]);
        let mut wrong = Adam::new(&[&c, &b], [0.9, 0.999], 1e-8, Kernels::Host).unwrap();
        let e = wrong.load_state(&["a", "b"], &saved, "test").unwrap_err().to_string();
        assert!(e.contains("adam_m.a"), "{e}");
    }

    /// Gradients from the other kind of kernel are refused, and the refused step is not
    /// counted: the bias corrections of the next real step stay those of step 1.
    #[test]
    fn mixed_kernels_are_refused_without_counting_a_step() {
        let p = var(&[1.0, -2.0]);
        let foreign = grads(Kernels::Portable, &[&[0.5, -1.0]]);
        let mut adam = Adam::new(&[&p], [0.9, 0.999], 1e-8, Kernels::Host).unwrap();
        assert!(adam.step(&[&p], &foreign, 0.1).is_err());
        assert!(adam
            .clipped_step(&[&p], grads(Kernels::Host, &[&[1.0, 1.0]]), 0.1, None, None)
            .is_ok());
        assert_eq!(adam.steps, 1);
        let mut portable = Adam::new(&[&p], [0.9, 0.999], 1e-8, Kernels::Portable).unwrap();
        assert!(portable
            .clipped_step(&[&p], grads(Kernels::Host, &[&[1.0, 1.0]]), 0.1, None, None)
            .is_err());
        assert_eq!(portable.steps, 0);
        let mut sgd = Sgd::new(&[&p], 0.9, false, vec![0.0], Kernels::Host).unwrap();
        assert!(sgd.step(&[&p], &foreign, 0.1).is_err());
        assert_eq!(sgd.steps, 0);
    }

    #[test]
    fn sgd_momentum_nesterov_and_coupled_decay_with_both_kernels() {
        for kernels in [Kernels::Host, Kernels::Portable] {
            let p = var(&[1.0]);
            let mut sgd = Sgd::new(&[&p], 0.5, false, vec![0.1], kernels).unwrap();
            sgd.step(&[&p], &grads(kernels, &[&[1.0]]), 0.1).unwrap();
            // g = 1 + 0.1·1 = 1.1; b = g; p = 1 − 0.11.
            assert!((values(&p)[0] - 0.89).abs() < 1e-6);
            sgd.step(&[&p], &grads(kernels, &[&[0.0]]), 0.1).unwrap();
            // g = 0.089; b = 0.5·1.1 + 0.089 = 0.639; p = 0.89 − 0.0639.
            assert!((values(&p)[0] - 0.8261).abs() < 1e-6, "{kernels:?}");
            let q = var(&[1.0]);
            let mut nesterov = Sgd::new(&[&q], 0.5, true, vec![0.0], kernels).unwrap();
            nesterov.step(&[&q], &grads(kernels, &[&[1.0]]), 0.1).unwrap();
            // b = 1; step = g + μ b = 1.5.
            assert!((values(&q)[0] - 0.85).abs() < 1e-6);
        }
    }

    /// Every momentum case over several steps and more elements than a vector: the host loop
    /// (one specialised copy per case) against the portable tensor ops.
    #[test]
    fn sgd_host_loops_match_the_portable_ops_in_every_case() {
        let start: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        for (mu, nesterov, wd) in [(0.0, false, 0.01), (0.9, false, 0.0), (0.9, true, 0.05)] {
            let run = |kernels| {
                let p = var(&start);
                let mut sgd = Sgd::new(&[&p], mu, nesterov, vec![wd], kernels).unwrap();
                for step in 0..3 {
                    let g: Vec<f32> =
                        (0..37).map(|i| ((i * 7 + step * 3) as f32 * 0.21).cos()).collect();
                    sgd.step(&[&p], &grads(kernels, &[&g]), 0.1).unwrap();
                }
                values(&p)
            };
            let (host, portable) = (run(Kernels::Host), run(Kernels::Portable));
            assert_ne!(host, start);
            for (h, q) in host.iter().zip(&portable) {
                assert!((h - q).abs() < 1e-6, "μ {mu} nesterov {nesterov}: {h} vs {q}");
            }
        }
    }

    /// SGD's one-pass `clip_and_step` (the norm from the update's reads, or the clip factor
    /// applied as gradients are read) gives the bits of clipping then stepping, in every
    /// momentum case, over parameters of several chunks and a short one, and over steps.
    #[test]
    fn sgd_clip_and_step_equals_clipping_then_stepping() {
        let sizes = [3 * NORM_CHUNK + 123, 5];
        let wave =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
        for (mu, nesterov, wd) in [(0.0, false, 0.01), (0.9, false, 0.0), (0.9, true, 0.05)] {
            for clip in [None, Some(1.0), Some(1e9)] {
                let run = |fused: bool| {
                    let params: Vec<Var> = sizes.iter().map(|&n| var(&wave(n, 0.37))).collect();
                    let refs: Vec<&Var> = params.iter().collect();
                    let mut sgd =
                        Sgd::new(&refs, mu, nesterov, vec![wd; 2], Kernels::Host).unwrap();
                    let mut norms = Vec::new();
                    for step in 0..3 {
                        let g: Vec<Vec<f32>> =
                            sizes.iter().map(|&n| wave(n, 0.05 * (step + 1) as f32)).collect();
                        let mut g = Gradients::Host(g);
                        let norm = if fused {
                            sgd.clip_and_step(&refs, g, 0.1, clip).unwrap()
                        } else {
                            let norm = g.norm_clipped_to(clip).unwrap();
                            sgd.step(&refs, &g, 0.1).unwrap();
                            norm
                        };
                        norms.push(norm.to_scalar::<f64>().unwrap().to_bits());
                    }
                    let momentum = sgd.state(&["a", "b"]).unwrap();
                    let mut momentum: Vec<(String, Vec<f32>)> = momentum
                        .into_iter()
                        .filter(|(_, t)| t.dtype() == DType::F32)
                        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
                        .collect();
                    momentum.sort_by(|a, b| a.0.cmp(&b.0));
                    (params.iter().map(values).collect::<Vec<_>>(), momentum, norms)
                };
                let (fused, apart) = (run(true), run(false));
                assert_ne!(fused.0[0], wave(sizes[0], 0.37));
                assert_eq!(fused.2, apart.2, "norms, μ {mu} clip {clip:?}");
                assert!(fused.1.len() == 2 && fused.1 == apart.1, "momentum, μ {mu} clip {clip:?}");
                assert!(fused.0 == apart.0, "parameters, μ {mu} nesterov {nesterov} clip {clip:?}");
            }
        }
    }

    #[test]
    fn clipping_and_projection_with_both_kernels() {
        for kernels in [Kernels::Host, Kernels::Portable] {
            let mut g = grads(kernels, &[&[3.0, 0.0], &[4.0]]);
            let before = g.clip_global_norm(1.0).unwrap().to_dtype(DType::F64).unwrap();
            assert!((before.to_scalar::<f64>().unwrap() - 5.0).abs() < 1e-6);
            let after = g.global_norm().unwrap().to_dtype(DType::F64).unwrap();
            assert!((after.to_scalar::<f64>().unwrap() - 1.0).abs() < 1e-5);
            let w =
                Var::from_tensor(&Tensor::new(&[[0.6f32, 0.8], [1.0, 0.0]], &Device::Cpu).unwrap())
                    .unwrap();
            let mut g = match kernels {
                Kernels::Host => Gradients::Host(vec![vec![1.0, 1.0, 2.0, 3.0]]),
                Kernels::Portable => {
                    Gradients::Device(vec![
                        Tensor::new(&[[1.0f32, 1.0], [2.0, 3.0]], &Device::Cpu).unwrap()
                    ])
                }
            };
            g.project_out_parallel(0, &w, 2).unwrap();
            let g = match g {
                Gradients::Host(g) => g[0].clone(),
                Gradients::Device(g) => g[0].flatten_all().unwrap().to_vec1().unwrap(),
            };
            assert!((g[0] * 0.6 + g[1] * 0.8).abs() < 1e-6 && g[2].abs() < 1e-6, "{kernels:?}");
            assert!((g[3] - 3.0).abs() < 1e-6);
        }
    }

    /// The fused host update gives the bits of clipping, projecting, stepping and renormalising
    /// one after another, over several steps, with and without clipping, with a zero row and
    /// rows whose width is no multiple of a vector, across several parallel tasks; the
    /// portable kernels agree to rounding.
    #[test]
    fn the_fused_clipped_step_equals_the_steps_in_turn() {
        let (rows, d) = (1000, 37);
        let wave = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * k).sin() + 0.3 * (i as f32 * 0.013).cos()).collect()
        };
        let mut decoder = wave(rows * d, 0.37);
        decoder[5 * d..6 * d].fill(0.0);
        crate::base::cpu::normalize_rows(&mut decoder, d);
        let start = [wave(rows * d, 0.11), decoder, wave(rows, 0.7)];
        let shaped = |v: &[f32], i: usize| {
            let t = Tensor::new(v, &Device::Cpu).unwrap();
            let t = if i < 2 { t.reshape((rows, d)).unwrap() } else { t };
            Var::from_tensor(&t).unwrap()
        };
        let unit_rows = UnitRows { index: 1, d };
        for clip in [Some(0.5), Some(1e9), None] {
            let run = |kernels: Kernels, fused: bool| -> (Vec<Vec<f32>>, Vec<f64>) {
                let params: Vec<Var> =
                    start.iter().enumerate().map(|(i, v)| shaped(v, i)).collect();
                let refs: Vec<&Var> = params.iter().collect();
                let mut adam = Adam::new(&refs, [0.9, 0.999], 1e-8, kernels).unwrap();
                let mut norms = Vec::new();
                for step in 0..3 {
                    let g: Vec<Vec<f32>> = start
                        .iter()
                        .enumerate()
                        .map(|(i, v)| wave(v.len(), 0.05 * (i + 2 * step + 1) as f32))
                        .collect();
                    let g: Vec<&[f32]> = g.iter().map(Vec::as_slice).collect();
                    let mut grads = grads(kernels, &g);
                    if let Gradients::Device(t) = &mut grads {
                        t[1] = t[1].reshape((rows, d)).unwrap();
                    }
                    let norm = if fused {
                        adam.clipped_step(&refs, grads, 0.01, clip, Some(unit_rows)).unwrap()
                    } else {
                        let norm = grads.norm_clipped_to(clip).unwrap();
                        grads.project_out_parallel(1, refs[1], d).unwrap();
                        adam.step(&refs, &grads, 0.01).unwrap();
                        normalize_rows(refs[1], d, kernels).unwrap();
                        norm
                    };
                    norms.push(norm.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
                }
                let values = params
                    .iter()
                    .map(|p| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                    .collect();
                (values, norms)
            };
            let (fused, norms) = run(Kernels::Host, true);
            let (apart, apart_norms) = run(Kernels::Host, false);
            assert_eq!(norms, apart_norms, "clip {clip:?}");
            for (a, b) in fused.iter().zip(&apart) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a), bits(b), "clip {clip:?}");
            }
            let row_norm = |r: &[f32]| r.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((row_norm(&fused[1][7 * d..8 * d]) - 1.0).abs() < 1e-5);
            let (portable, _) = run(Kernels::Portable, true);
            for (a, b) in fused.iter().zip(&portable) {
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-5, "clip {clip:?}: host and portable differ by {worst}");
            }
            assert_ne!(fused[0], start[0]);
        }
    }
}
