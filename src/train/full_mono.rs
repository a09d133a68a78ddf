//! The exact full-dataset MonoLoss gradient (`mono.period` P > 1), streamed over the store.
//!
//! L = 1 − mean over live neurons of MS_k on the whole training set. Pass 1 accumulates the
//! exact one-pass statistics (min, max, u, v, w per neuron). With g = ∂L/∂MS_k = −1/n_live:
//!   ∂L/∂num = g/den, ∂L/∂den = −g·num/den²,
//!   ∂L/∂ã_ik = ∂L/∂num·(p_i·w_k − ã_ik) + ∂L/∂den·(u_k − ã_ik),
//! and through ã = (l − min)/(max − min) the min and max receive closed-form sums over all rows.
//! Pass 2 recomputes each batch with a graph and backpropagates Σ c_ik·l_ik with c = ∂L/∂l
//! (a constant): the sum over batches of those gradients is the exact full-dataset gradient.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use super::optim::Gradients;
use crate::base::sparse::SparseBatch;
use crate::data::store::FeatureStore;
use crate::monoscore::MonoScoreAccumulator;
use crate::sae::{forward, Sae};

pub struct FullMonoGradient {
    /// ∂L/∂θ per parameter, in `SaeParams::named` order.
    pub grads: Gradients,
    pub loss: f64,
    pub mean_score: f64,
    pub live: usize,
}

/// Per-neuron constants of ∂L/∂l.
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

fn read_batch(
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    start: usize,
    end: usize,
    x: &mut Vec<f32>,
    sim: &mut Vec<f32>,
) -> Result<()> {
    store.read_range(start, end, x)?;
    match similarity {
        Some(s) => s.read_range(start, end, sim),
        None => {
            sim.clear();
            sim.extend_from_slice(x);
            Ok(())
        }
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

pub fn full_mono_gradient(
    sae: &dyn Sae,
    store: &FeatureStore,
    similarity: Option<&FeatureStore>,
    batch_rows: usize,
    device: &Device,
) -> Result<FullMonoGradient> {
    let (n, d, m) = (store.len(), store.dim(), sae.spec().n_latents);
    let sim_dim = similarity.map_or(d, |s| s.dim());
    let batch_rows = batch_rows.max(2);
    let (mut x, mut sim) = (Vec::new(), Vec::new());

    // Pass 1: exact statistics, no graph.
    let mut acc = MonoScoreAccumulator::new(sim_dim, m);
    for start in (0..n).step_by(batch_rows) {
        let end = (start + batch_rows).min(n);
        read_batch(store, similarity, start, end, &mut x, &mut sim)?;
        let pass = forward(sae, &Tensor::from_slice(&x, (end - start, d), device)?, true)?;
        acc.add_sparse(&sim, SparseBatch::from_dense(&host(pass.latents())?, m).as_rows())?;
    }
    let stats = acc.neuron_stats(true);
    let live = stats.iter().flatten().count();
    let named = sae.params().named();
    let vars: Vec<&candle_core::Var> = named.iter().map(|(_, v)| *v).collect();
    if live == 0 {
        let grads = Gradients::zeros(&vars);
        return Ok(FullMonoGradient { grads, loss: 1.0, mean_score: 0.0, live });
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

    // Pass 2: backpropagate Σ c·l batch by batch.
    let mut grads = Gradients::zeros(&vars);
    for start in (0..n).step_by(batch_rows) {
        let end = (start + batch_rows).min(n);
        read_batch(store, similarity, start, end, &mut x, &mut sim)?;
        let rows = end - start;
        let pass = forward(sae, &Tensor::from_slice(&x, (rows, d), device)?, true)?;
        let latents = host(pass.latents())?;
        ensure!(
            latents.iter().all(|v| v.is_finite()),
            "non-finite latents in the full-dataset MonoLoss pass"
        );
        let support = pass.activation.grad_support.as_deref();
        let mut c = vec![0f32; rows * m];
        for i in 0..rows {
            let p = &sim[i * sim_dim..(i + 1) * sim_dim];
            let inv_norm = 1.0 / p.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            for (k, co) in coefficients.iter().enumerate() {
                let idx = i * m + k;
                let l = latents[idx];
                if l == 0.0 && !support.is_some_and(|s| s[idx]) {
                    continue;
                }
                let Some(co) = co else { continue };
                let a = (l as f64 - co.min as f64) / co.range;
                let p_dot_w: f64 =
                    p.iter().zip(&co.w).map(|(&pv, &wv)| pv as f64 * wv).sum::<f64>() * inv_norm;
                let da = co.dnum * (p_dot_w - a) + co.dden * (co.u - a);
                let mut value = da / co.range;
                if l == co.min {
                    value += co.dmin;
                }
                if l == co.max {
                    value += co.dmax;
                }
                c[idx] = value as f32;
            }
        }
        let c = Tensor::from_vec(c, (rows, m), device)?;
        let surrogate = (pass.latents() * c)?.sum_all()?;
        grads.add_scaled(&Gradients::from_store(&surrogate.backward()?, &vars)?, 1.0);
    }
    Ok(FullMonoGradient { grads, loss: 1.0 - mean_score, mean_score, live })
}
