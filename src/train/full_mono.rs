//! The exact full-dataset MonoLoss gradient (`mono.period` P > 1), streamed over the store.
//!
//! L = 1 − mean over live neurons of MS_k on the whole training set. Pass 1 accumulates the
//! exact one-pass statistics (min, max, u, v, w per neuron). With g = ∂L/∂MS_k = −1/n_live:
//!   ∂L/∂num = g/den, ∂L/∂den = −g·num/den²,
//!   ∂L/∂ã_ik = ∂L/∂num·(p_i·w_k − ã_ik) + ∂L/∂den·(u_k − ã_ik),
//! and through ã = (l − min)/(max − min) the min and the max receive closed-form sums over all
//! rows, each given to one entry: the first row attaining it (PyTorch's `min(dim)` rule; an
//! entry outside the latents' support passes it on to nothing). Pass 2 recomputes each batch
//! with a graph and backpropagates Σ c_ik·l_ik with c = ∂L/∂l (a constant): the sum over
//! batches of those gradients is the exact full-dataset gradient. Both passes visit the store in
//! the training epoch's order, in training-size batches: BatchTopK selects over the same mixed
//! batches as in training, not over runs of stored (e.g. class-sorted) rows.
//!
//! Host kernels: pass 1 is the one-pass accumulator (f64, sparse), pass 2 builds c on the host.
//! Portable kernels: both passes are tensor ops on the device, statistics in f64 where the device
//! has it.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use super::optim::Gradients;
use crate::base::host::{self, stat_dtype};
use crate::base::sparse::SparseBatch;
use crate::data::store::{EpochOrder, FeatureStore};
use crate::models::topk::Mask;
use crate::monoscore::MonoScoreAccumulator;
use crate::sae::{forward, Sae};

pub struct FullMonoGradient {
    /// ∂L/∂θ per parameter, in `SaeParams::named` order.
    pub grads: Gradients,
    /// Mean MonoScore over live neurons (a scalar tensor; 0 when none is live).
    pub mean_score: Tensor,
    /// Live neurons (a scalar tensor).
    pub live: Tensor,
}

/// The rows at positions `start..end` of `order`, from the store and from its similarity
/// embeddings (the store itself when none).
fn read_batch(
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    order: &EpochOrder,
    (start, end): (usize, usize),
    x: &mut Vec<f32>,
    sim: &mut Vec<f32>,
) -> Result<()> {
    let rows = order.rows(start..end);
    store.read_rows(&rows, x)?;
    match similarity {
        Some(s) => s.read_rows(&rows, sim),
        None => {
            sim.clear();
            sim.extend_from_slice(x);
            Ok(())
        }
    }
}

/// The gradient of the full-dataset MonoLoss of `sae`'s latents over `store`, visited in
/// `order` in batches of `batch_rows`.
pub fn full_mono_gradient(
    sae: &dyn Sae,
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    order: &EpochOrder,
    batch_rows: usize,
    device: &Device,
) -> Result<FullMonoGradient> {
    let visit = Visit { store, similarity, order, batch_rows: batch_rows.max(2) };
    if sae.params().kernels.is_host() {
        host_gradient(sae, &visit, device)
    } else {
        portable_gradient(sae, &visit, device)
    }
}

/// How a pass visits the store.
struct Visit<'a> {
    store: &'a FeatureStore,
    similarity: Option<&'a FeatureStore>,
    order: &'a EpochOrder,
    batch_rows: usize,
}

impl Visit<'_> {
    /// (start, end) positions of each batch.
    fn batches(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let n = self.store.len();
        (0..n).step_by(self.batch_rows).map(move |s| (s, (s + self.batch_rows).min(n)))
    }

    fn read(&self, batch: (usize, usize), x: &mut Vec<f32>, sim: &mut Vec<f32>) -> Result<()> {
        read_batch(self.store, self.similarity, self.order, batch, x, sim)
    }
}

/// Per-neuron constants of ∂L/∂l (host kernels).
struct Coefficients {
    min: f32,
    max: f32,
    range: f64,
    u: f64,
    w: Vec<f64>,
    dnum: f64,
    dden: f64,
    dmin: f64,
    dmax: f64,
}

fn host_gradient(sae: &dyn Sae, visit: &Visit, device: &Device) -> Result<FullMonoGradient> {
    let store = visit.store;
    let (n, d, m) = (store.len(), store.dim(), sae.spec().n_latents);
    let sim_dim = visit.similarity.map_or(d, |s| s.dim());
    let (mut x, mut sim) = (Vec::new(), Vec::new());
    let named = sae.params().named();
    let vars: Vec<&candle_core::Var> = named.iter().map(|(_, v)| *v).collect();
    let kernels = sae.params().kernels;
    let cpu = &Device::Cpu;

    // Pass 1: exact statistics, no graph.
    let mut acc = MonoScoreAccumulator::new(sim_dim, m);
    for (start, end) in visit.batches() {
        visit.read((start, end), &mut x, &mut sim)?;
        let pass = forward(sae, &Tensor::from_slice(&x, (end - start, d), device)?, true)?;
        // A host selection's pass holds its non-zeros already: no dense latents to build and
        // scan back (the same entries, in the same order).
        let scanned;
        let latents = match &pass.latents_csr {
            Some(csr) => csr.as_rows(),
            None => {
                scanned = SparseBatch::from_dense(&host::read_f32(pass.latents()?)?, m);
                scanned.as_rows()
            }
        };
        acc.add_sparse(&sim, latents)?;
    }
    let stats = acc.neuron_stats(true);
    let live = stats.iter().flatten().count();
    if live == 0 {
        let grads = Gradients::zeros(&vars, kernels)?;
        let zero = Tensor::new(0f32, cpu)?;
        return Ok(FullMonoGradient { grads, mean_score: zero.clone(), live: zero });
    }
    let mean_score = stats.iter().flatten().map(|s| s.score()).sum::<f64>() / live as f64;
    let total = acc.embedding_sum().to_vec();
    let g = -1.0 / live as f64;
    let coefficients: Vec<Option<Coefficients>> = stats
        .into_iter()
        .map(|s| {
            s.map(|s| {
                let (num, den) = (s.numerator, s.denominator);
                let dnum = g / den;
                let dden = -g * num / (den * den);
                let s_dot_w: f64 = total.iter().zip(&s.w).map(|(a, b)| a * b).sum();
                let w_sq: f64 = s.w.iter().map(|x| x * x).sum();
                let sum_g = dnum * (s_dot_w - s.u) + dden * (n as f64 * s.u - s.u);
                let sum_ga = dnum * (w_sq - s.v) + dden * (s.u * s.u - s.v);
                let range = s.max as f64 - s.min as f64;
                Coefficients {
                    min: s.min,
                    max: s.max,
                    range,
                    u: s.u,
                    w: s.w,
                    dnum,
                    dden,
                    dmin: (sum_ga - sum_g) / range,
                    dmax: -sum_ga / range,
                }
            })
        })
        .collect();

    // Pass 2: backpropagate Σ c·l batch by batch. Rows come in order, so the first row equal
    // to a neuron's min (or max) is the first one met.
    let mut min_given = vec![false; m];
    let mut max_given = vec![false; m];
    let mut grads = Gradients::zeros(&vars, kernels)?;
    for (start, end) in visit.batches() {
        visit.read((start, end), &mut x, &mut sim)?;
        let rows = end - start;
        let pass = forward(sae, &Tensor::from_slice(&x, (rows, d), device)?, true)?;
        let latents = host::read_f32(pass.latents()?)?;
        ensure!(
            latents.iter().all(|v| v.is_finite()),
            "non-finite latents in the full-dataset MonoLoss pass"
        );
        let support = match &pass.activation.grad_support {
            Some(Mask::Host(s)) => Some(s.as_slice()),
            _ => None,
        };
        let mut c = vec![0f32; rows * m];
        for i in 0..rows {
            let p = &sim[i * sim_dim..(i + 1) * sim_dim];
            let inv_norm = 1.0 / p.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            for (k, co) in coefficients.iter().enumerate() {
                let Some(co) = co else { continue };
                let idx = i * m + k;
                let l = latents[idx];
                let takes_min = l == co.min && !std::mem::replace(&mut min_given[k], true);
                let takes_max = l == co.max && !std::mem::replace(&mut max_given[k], true);
                if l == 0.0 && !support.is_some_and(|s| s[idx]) {
                    continue;
                }
                let a = (l as f64 - co.min as f64) / co.range;
                let p_dot_w: f64 =
                    p.iter().zip(&co.w).map(|(&pv, &wv)| pv as f64 * wv).sum::<f64>() * inv_norm;
                let da = co.dnum * (p_dot_w - a) + co.dden * (co.u - a);
                let mut value = da / co.range;
                if takes_min {
                    value += co.dmin;
                }
                if takes_max {
                    value += co.dmax;
                }
                c[idx] = value as f32;
            }
        }
        let c = Tensor::from_vec(c, (rows, m), device)?;
        let surrogate = (pass.latents()? * c)?.sum_all()?;
        grads.add_scaled(
            &Gradients::from_store(&surrogate.backward()?, None, &vars, kernels)?,
            1.0,
        )?;
    }
    Ok(FullMonoGradient {
        grads,
        mean_score: Tensor::new(mean_score as f32, cpu)?,
        live: Tensor::new(live as f32, cpu)?,
    })
}

/// Unit rows of (B, D') similarity embeddings, in `dtype`.
fn unit_rows(sim: &Tensor, dtype: DType) -> Result<Tensor> {
    let sim = sim.to_dtype(dtype)?;
    let norm = sim.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(sim.broadcast_div(&norm)?)
}

/// Pass-1 statistics on the device, per neuron (shapes (M,) unless noted).
struct DeviceMoments {
    sum: Tensor,
    sum_sq: Tensor,
    /// Σ_i l_ik p_i, (M, D').
    weighted: Tensor,
    /// Σ_i p_i, (D',).
    embedding_sum: Tensor,
    min: Tensor,
    max: Tensor,
    /// Rows equal to the min so far, and the first rows attaining the min and the max.
    count_at_min: Tensor,
    first_min: Tensor,
    first_max: Tensor,
}

impl DeviceMoments {
    /// Folds in a batch of latents `l` (B, M) and unit embeddings `p` (B, D') starting at
    /// store row `start` (all in the statistics dtype).
    fn add(&mut self, l: &Tensor, p: &Tensor, start: usize) -> Result<()> {
        self.sum = (&self.sum + l.sum(0)?)?;
        self.sum_sq = (&self.sum_sq + l.sqr()?.sum(0)?)?;
        self.weighted = (&self.weighted + l.t()?.matmul(p)?)?;
        self.embedding_sum = (&self.embedding_sum + p.sum(0)?)?;
        let dtype = l.dtype();
        let bmin = l.min(0)?;
        let bmax = l.max(0)?;
        let offset =
            |idx: Tensor| -> Result<Tensor> { Ok(idx.to_dtype(dtype)?.affine(1.0, start as f64)?) };
        let at_bmin = l.broadcast_eq(&bmin.unsqueeze(0)?)?.to_dtype(dtype)?.sum(0)?;
        let lower = bmin.lt(&self.min)?;
        let equal = bmin.eq(&self.min)?;
        self.count_at_min = lower.where_cond(
            &at_bmin,
            &equal.where_cond(&(&self.count_at_min + &at_bmin)?, &self.count_at_min)?,
        )?;
        self.first_min = lower.where_cond(&offset(l.argmin(0)?)?, &self.first_min)?;
        self.first_max = bmax.gt(&self.max)?.where_cond(&offset(l.argmax(0)?)?, &self.first_max)?;
        self.min = self.min.minimum(&bmin)?;
        self.max = self.max.maximum(&bmax)?;
        Ok(())
    }
}

/// Per-neuron constants of ∂L/∂l on the device (statistics dtype; zero for dead neurons).
struct DeviceCoefficients {
    live: Tensor,
    min: Tensor,
    range: Tensor,
    u: Tensor,
    /// (M, D').
    w: Tensor,
    dnum: Tensor,
    dden: Tensor,
    dmin: Tensor,
    dmax: Tensor,
    first_min: Tensor,
    first_max: Tensor,
    mean_score: Tensor,
    n_live: Tensor,
}

fn device_coefficients(s: DeviceMoments, n: usize) -> Result<DeviceCoefficients> {
    let n_rows = n as f64;
    let zeros = s.min.zeros_like()?;
    let ones = s.min.ones_like()?;
    // Live: at least two rows above the min.
    let above = s.count_at_min.affine(-1.0, n_rows)?;
    let live = above.ge(&ones.affine(2.0, 0.0)?)?;
    let range = live.where_cond(&(&s.max - &s.min)?, &ones)?;
    let u = (&s.sum - s.min.affine(n_rows, 0.0)?)?.div(&range)?;
    let v = ((&s.sum_sq - (&s.min * &s.sum)?.affine(2.0, 0.0)?)?
        + s.min.sqr()?.affine(n_rows, 0.0)?)?
    .div(&range.sqr()?)?;
    let w = (&s.weighted - s.min.unsqueeze(1)?.broadcast_mul(&s.embedding_sum.unsqueeze(0)?)?)?
        .broadcast_div(&range.unsqueeze(1)?)?;
    let w_sq = w.sqr()?.sum(1)?;
    let num = (&w_sq - &v)?.affine(0.5, 0.0)?;
    let den = live.where_cond(&(u.sqr()? - &v)?.affine(0.5, 0.0)?, &ones)?;
    let score = live.where_cond(&num.div(&den)?, &zeros)?;
    let n_live = live.to_dtype(s.min.dtype())?.sum_all()?;
    let safe_live = n_live.maximum(&n_live.ones_like()?)?;
    let mean_score = score.sum_all()?.div(&safe_live)?;
    // g = ∂L/∂MS_k = −1/n_live.
    let g = safe_live.recip()?.neg()?;
    let dnum = den.recip()?.broadcast_mul(&g)?;
    let dden = num.div(&den.sqr()?)?.broadcast_mul(&g)?.neg()?;
    let s_dot_w = w.broadcast_mul(&s.embedding_sum.unsqueeze(0)?)?.sum(1)?;
    let sum_g = ((&dnum * (&s_dot_w - &u)?)? + (&dden * u.affine(n_rows - 1.0, 0.0)?)?)?;
    let sum_ga = ((&dnum * (&w_sq - &v)?)? + (&dden * (u.sqr()? - &v)?)?)?;
    let masked = |t: Tensor| live.where_cond(&t, &zeros);
    Ok(DeviceCoefficients {
        dmin: masked((&sum_ga - &sum_g)?.div(&range)?)?,
        dmax: masked(sum_ga.div(&range)?.neg()?)?,
        dnum: masked(dnum)?,
        dden: masked(dden)?,
        min: s.min,
        range,
        u,
        w,
        live,
        first_min: s.first_min,
        first_max: s.first_max,
        mean_score,
        n_live,
    })
}

fn portable_gradient(sae: &dyn Sae, visit: &Visit, device: &Device) -> Result<FullMonoGradient> {
    let store = visit.store;
    let (n, d, m) = (store.len(), store.dim(), sae.spec().n_latents);
    let sim_dim = visit.similarity.map_or(d, |s| s.dim());
    let dtype = stat_dtype(device);
    let (mut x, mut sim) = (Vec::new(), Vec::new());
    let named = sae.params().named();
    let vars: Vec<&candle_core::Var> = named.iter().map(|(_, v)| *v).collect();
    let kernels = sae.params().kernels;

    // Pass 1: the statistics, no graph.
    let zeros = |shape: &[usize]| Tensor::zeros(shape, dtype, device);
    let mut moments = DeviceMoments {
        sum: zeros(&[m])?,
        sum_sq: zeros(&[m])?,
        weighted: zeros(&[m, sim_dim])?,
        embedding_sum: zeros(&[sim_dim])?,
        min: zeros(&[m])?.affine(0.0, f64::INFINITY)?,
        max: zeros(&[m])?.affine(0.0, f64::NEG_INFINITY)?,
        count_at_min: zeros(&[m])?,
        first_min: zeros(&[m])?,
        first_max: zeros(&[m])?,
    };
    for (start, end) in visit.batches() {
        visit.read((start, end), &mut x, &mut sim)?;
        let pass = forward(sae, &host::upload_f32(&x, (end - start, d), device)?, true)?;
        let p = unit_rows(&host::upload_f32(&sim, (end - start, sim_dim), device)?, dtype)?;
        moments.add(&pass.latents()?.detach().to_dtype(dtype)?, &p, start)?;
    }
    let co = device_coefficients(moments, n)?;

    // Pass 2: backpropagate Σ c·l batch by batch.
    let mut grads = Gradients::zeros(&vars, kernels)?;
    for (start, end) in visit.batches() {
        let rows = end - start;
        visit.read((start, end), &mut x, &mut sim)?;
        let pass = forward(sae, &host::upload_f32(&x, (rows, d), device)?, true)?;
        let l = pass.latents()?.detach().to_dtype(dtype)?;
        let p = unit_rows(&host::upload_f32(&sim, (rows, sim_dim), device)?, dtype)?;
        let a = l.broadcast_sub(&co.min.unsqueeze(0)?)?.broadcast_div(&co.range.unsqueeze(0)?)?;
        let p_dot_w = p.matmul(&co.w.t()?)?; // (B, M)
        let da = (p_dot_w - &a)?.broadcast_mul(&co.dnum.unsqueeze(0)?)?.add(
            &a.neg()?.broadcast_add(&co.u.unsqueeze(0)?)?.broadcast_mul(&co.dden.unsqueeze(0)?)?,
        )?;
        let mut value = da.broadcast_div(&co.range.unsqueeze(0)?)?;
        // The min's and the max's gradients, each on its first row.
        let row_ids =
            Tensor::arange(start as u32, end as u32, device)?.to_dtype(dtype)?.unsqueeze(1)?;
        for (first, extra) in [(&co.first_min, &co.dmin), (&co.first_max, &co.dmax)] {
            let at = row_ids.broadcast_eq(&first.unsqueeze(0)?)?.to_dtype(dtype)?;
            value = (value + at.broadcast_mul(&extra.unsqueeze(0)?)?)?;
        }
        let mut support = l.ne(&l.zeros_like()?)?;
        if let Some(Mask::Device(band)) = &pass.activation.grad_support {
            support = (support.to_dtype(DType::F32)? + band.to_dtype(DType::F32)?)?
                .gt(&value.zeros_like()?.to_dtype(DType::F32)?)?;
        }
        let live = co.live.unsqueeze(0)?.broadcast_as(l.shape())?;
        let keep = live.to_dtype(DType::F32)?.mul(&support.to_dtype(DType::F32)?)?;
        let c = keep.gt(&keep.zeros_like()?)?.where_cond(&value, &value.zeros_like()?)?;
        let c = c.to_dtype(pass.latents()?.dtype())?;
        let surrogate = (pass.latents()? * c)?.sum_all()?;
        grads.add_scaled(
            &Gradients::from_store(&surrogate.backward()?, None, &vars, kernels)?,
            1.0,
        )?;
    }
    Ok(FullMonoGradient { grads, mean_score: co.mean_score, live: co.n_live })
}
