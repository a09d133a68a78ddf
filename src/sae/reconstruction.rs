//! The reconstruction and its training loss: the decoder's output plus b_dec (the working
//! space), then × std + mean per row when the SAE standardised its input.
//!
//! Portable kernels run these as candle ops. With host kernels that chain of (B × D) tensors (a
//! broadcast add, a subtraction, a square, a mean, each with a zero-filled gradient buffer in
//! the backward pass, and b_dec's gradient a single-threaded column sum) is replaced: the values
//! are one parallel pass and the loss is one op whose backward is one more.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::base::cpu::{
    contiguous, cpu_tensor, dims2, par_filled, par_filled_with, with_cpu_slice, CResult,
};
use crate::base::gemm::gemm_f32;
use crate::base::host::Kernels;
use crate::base::sparse::{self, SparseBatch};

/// The (working-space, input-space) reconstructions of a decoder output, with the graph the
/// kernels need: host kernels differentiate through the output itself ([`error`]), portable
/// ones through these tensors.
pub fn reconstruct(
    output: &Tensor,
    b_dec: &Tensor,
    scale: Option<&(Tensor, Tensor)>,
    kernels: Kernels,
) -> CResult<(Tensor, Tensor)> {
    if kernels.for_tensor(output).is_host() {
        return values(output, b_dec, scale);
    }
    let working = output.broadcast_add(b_dec)?;
    let recon = match scale {
        Some((mean, std)) => working.broadcast_mul(std)?.broadcast_add(mean)?,
        None => working.clone(),
    };
    Ok((working, recon))
}

/// The squared error of the pass's reconstruction against its input, averaged as `norm` says:
/// one host op on the decoder's output with host kernels, candle ops on `recon` otherwise.
pub fn error(p: &super::SaeParams, pass: &super::ForwardPass, norm: ErrorNorm) -> CResult<Tensor> {
    if p.kernels.for_tensor(&pass.output).is_host() {
        let b_dec = p.b_dec.as_tensor();
        return loss(&pass.output, b_dec, &pass.input, pass.scale.as_ref(), norm);
    }
    match norm {
        ErrorNorm::Elements => (&pass.recon - &pass.input)?.sqr()?.mean_all(),
        ErrorNorm::RowNorms => normalized_mse(&pass.recon, &pass.input),
    }
}

/// Normalised MSE as candle ops: mean over rows of ‖x̂ − x‖² / ‖x‖² (OpenAI's TopK loss).
pub fn normalized_mse(recon: &Tensor, target: &Tensor) -> CResult<Tensor> {
    let err = (recon - target)?.sqr()?.sum(D::Minus1)?;
    let norms = target.sqr()?.sum(D::Minus1)?;
    let scale = norms.maximum(&norms.ones_like()?.affine(0.0, 1e-12)?)?;
    (err / scale)?.mean_all()
}

/// How the squared error is averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorNorm {
    /// Over every element: plain MSE.
    Elements,
    /// Each row's squared error over its input's squared norm (at least 1e-12), averaged over
    /// rows: OpenAI's normalised MSE.
    RowNorms,
}

/// The per-row standardisation of a batch on the host: x = working · std + mean.
struct RowScale {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl RowScale {
    fn read(scale: Option<&(Tensor, Tensor)>, rows: usize) -> CResult<Option<Self>> {
        let Some((mean, std)) = scale else { return Ok(None) };
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (mean, std) = (host(mean)?, host(std)?);
        if mean.len() != rows || std.len() != rows {
            candle_core::bail!(
                "row scales of {} and {} rows for {rows} rows",
                mean.len(),
                std.len()
            );
        }
        Ok(Some(Self { mean, std }))
    }
}

/// A row of the decoder's output → the working-space reconstruction (+ b_dec). This and
/// `to_input` round separately, in the broadcast ops' order ((s + b) · std + mean), so the
/// values are theirs bit for bit.
fn to_working(row: &mut [f32], bias: &[f32]) {
    row.iter_mut().zip(bias).for_each(|(v, &c)| *v += c);
}

/// Working-space row `r` → the input space (× std + mean of that row).
fn to_input(row: &mut [f32], r: usize, scale: &RowScale) {
    let (mu, sd) = (scale.mean[r], scale.std[r]);
    row.iter_mut().for_each(|v| *v = *v * sd + mu);
}

fn host_vec(t: &Tensor, what: &str, len: usize) -> CResult<Vec<f32>> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if v.len() != len {
        candle_core::bail!("{what} has {} values, expected {len}", v.len());
    }
    Ok(v)
}

/// The (working-space, input-space) reconstructions of a decoder output, as values without a
/// graph (the loss differentiates through the output itself, [`loss`]). Without `scale` both
/// are the same tensor.
pub fn values(
    output: &Tensor,
    b_dec: &Tensor,
    scale: Option<&(Tensor, Tensor)>,
) -> CResult<(Tensor, Tensor)> {
    let (rows, d) = output.dims2()?;
    let bias = host_vec(b_dec, "b_dec", d)?;
    let scale = RowScale::read(scale, rows)?;
    let working = with_cpu_slice(output, |out| {
        par_filled(out.len(), 64 * d.max(1), |t, part| {
            part.copy_from_slice(&out[t * 64 * d..][..part.len()]);
            part.chunks_mut(d.max(1)).for_each(|row| to_working(row, &bias));
        })
    })?;
    let recon = scale.as_ref().map(|scale| {
        let mut recon = working.clone();
        recon.par_chunks_mut(d.max(1)).enumerate().for_each(|(r, row)| to_input(row, r, scale));
        recon
    });
    let working = cpu_tensor(working, (rows, d))?;
    Ok(match recon {
        Some(recon) => (working, cpu_tensor(recon, (rows, d))?),
        None => (working.clone(), working),
    })
}

/// The reconstruction of (B, M) latents given as CSR rows, in the input space, without a
/// graph: the values the forward pass computes for the same latents (sparse products, or the
/// dense one when the latents are too dense for them), each row finished right after its
/// product while it is in cache.
pub fn from_csr(
    latents: &SparseBatch,
    w: &Tensor,
    b_dec: &Tensor,
    scale: Option<&(Tensor, Tensor)>,
) -> CResult<Tensor> {
    let (m, d) = w.dims2()?;
    let b = latents.rows();
    let bias = host_vec(b_dec, "b_dec", d)?;
    let scale = RowScale::read(scale, b)?;
    let finish = |r: usize, row: &mut [f32]| {
        to_working(row, &bias);
        if let Some(scale) = &scale {
            to_input(row, r, scale);
        }
    };
    let w = w.contiguous()?;
    let out = with_cpu_slice(&w, |ws| {
        if super::ops::sparse_enough(latents.nnz(), b, m) {
            sparse::csr_matmul_then(latents.as_rows(), ws, d, finish)
        } else {
            let mut out = gemm_f32(b, d, m, &latents.to_dense(m), m, 1, ws, d, 1);
            out.par_chunks_mut(d.max(1)).enumerate().for_each(|(r, row)| finish(r, row));
            out
        }
    })?;
    cpu_tensor(out, (b, d))
}

/// The reconstruction loss of a decoder `output` (B, D, with its graph) against `input`: the
/// squared error of the reconstruction (`values`), averaged as `norm` says, as a scalar whose
/// gradient reaches the output and b_dec. Host tensors only.
pub fn loss(
    output: &Tensor,
    b_dec: &Tensor,
    input: &Tensor,
    scale: Option<&(Tensor, Tensor)>,
    norm: ErrorNorm,
) -> CResult<Tensor> {
    let (rows, d) = output.dims2()?;
    if input.dims2()? != (rows, d) {
        candle_core::bail!(
            "reconstruction loss: input {:?} for output {:?}",
            input.shape(),
            output.shape()
        );
    }
    let op = ReconstructionLoss {
        input: input.contiguous()?,
        scale: RowScale::read(scale, rows)?,
        norm,
    };
    output.contiguous()?.apply_op2(&b_dec.contiguous()?, op)
}

struct ReconstructionLoss {
    input: Tensor,
    scale: Option<RowScale>,
    norm: ErrorNorm,
}

/// Rows per task of the loss's passes: a fixed split, so the sums do not depend on the threads.
const ROWS_PER_TASK: usize = 64;

impl ReconstructionLoss {
    /// Row r's reconstruction minus its input, into `diff`.
    fn diff(&self, out: &[f32], bias: &[f32], x: &[f32], r: usize, diff: &mut [f32]) {
        diff.copy_from_slice(out);
        to_working(diff, bias);
        if let Some(scale) = &self.scale {
            to_input(diff, r, scale);
        }
        diff.iter_mut().zip(x).for_each(|(v, &t)| *v -= t);
    }

    /// What each row's squared error is divided by.
    fn row_divisors(&self, x: &[f32], rows: usize, d: usize) -> Vec<f64> {
        match self.norm {
            ErrorNorm::Elements => vec![(rows * d) as f64; rows],
            ErrorNorm::RowNorms => x
                .par_chunks(d.max(1))
                .map(|row| {
                    let norm: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                    rows as f64 * norm.max(1e-12)
                })
                .collect(),
        }
    }
}

impl CustomOp2 for ReconstructionLoss {
    fn name(&self) -> &'static str {
        "sae-reconstruction-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (rows, d) = dims2(l1)?;
        let (out, bias) = (contiguous(self.name(), s1, l1)?, contiguous(self.name(), s2, l2)?);
        if bias.len() != d {
            candle_core::bail!("{}: b_dec has {} values for D = {d}", self.name(), bias.len());
        }
        let loss = with_cpu_slice(&self.input, |x| {
            let divisors = self.row_divisors(x, rows, d);
            let task_sums: Vec<f64> = (0..rows.div_ceil(ROWS_PER_TASK))
                .into_par_iter()
                .map(|t| {
                    let mut diff = vec![0f32; d];
                    (t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows))
                        .map(|r| {
                            let at = r * d..(r + 1) * d;
                            self.diff(&out[at.clone()], bias, &x[at], r, &mut diff);
                            let sq: f64 = diff.iter().map(|&v| v as f64 * v as f64).sum();
                            sq / divisors[r]
                        })
                        .sum()
                })
                .collect();
            task_sums.iter().sum::<f64>()
        })?;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        output: &Tensor,
        b_dec: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = output.dims2()?;
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let bias = host_vec(b_dec, "b_dec", d)?;
        let (grad_out, task_sums) = with_cpu_slice(output, |out| {
            with_cpu_slice(&self.input, |x| {
                let divisors = self.row_divisors(x, rows, d);
                // ∂/∂output of Σ_r ‖diff_r‖² / divisor_r, times the upstream gradient: 2 g
                // diff_r std_r / divisor_r (the chain through the standardisation's × std).
                par_filled_with(rows * d, ROWS_PER_TASK * d.max(1), |t, part| {
                    let mut column_sums = vec![0f64; d];
                    for (i, row_grad) in part.chunks_mut(d.max(1)).enumerate() {
                        let r = t * ROWS_PER_TASK + i;
                        let at = r * d..(r + 1) * d;
                        self.diff(&out[at.clone()], &bias, &x[at], r, row_grad);
                        let sd = self.scale.as_ref().map_or(1.0, |s| s.std[r] as f64);
                        let c = (2.0 * g * sd / divisors[r]) as f32;
                        for (v, s) in row_grad.iter_mut().zip(&mut column_sums) {
                            *v *= c;
                            *s += *v as f64;
                        }
                    }
                    column_sums
                })
            })
        })??;
        // b_dec's gradient: the column sums of the output's, task by task in row order.
        let mut grad_b = vec![0f64; d];
        for sums in &task_sums {
            grad_b.iter_mut().zip(sums).for_each(|(a, &s)| *a += s);
        }
        let grad_b: Vec<f32> = grad_b.into_iter().map(|v| v as f32).collect();
        Ok((Some(cpu_tensor(grad_out, (rows, d))?), Some(cpu_tensor(grad_b, d)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.731).sin() * (1.0 + (i % 7) as f32 * 0.3)).collect()
    }

    /// (output, b_dec, input, row scale) of a batch with more rows than one task takes.
    fn batch(rows: usize, d: usize) -> (Var, Var, Tensor, (Tensor, Tensor)) {
        let cpu = &Device::Cpu;
        let output = Var::from_vec(data(rows * d, 1.0), (rows, d), cpu).unwrap();
        let b_dec = Var::from_vec(data(d, 2.0), d, cpu).unwrap();
        let input = Tensor::from_vec(data(rows * d, 3.0), (rows, d), cpu).unwrap();
        let mean = Tensor::from_vec(data(rows, 4.0), (rows, 1), cpu).unwrap();
        let std = Tensor::from_vec(
            data(rows, 5.0).iter().map(|v| 1.5 + v).collect::<Vec<_>>(),
            (rows, 1),
            cpu,
        )
        .unwrap();
        (output, b_dec, input, (mean, std))
    }

    /// The same loss as candle ops, the way the portable path builds it.
    fn candle_loss(
        output: &Tensor,
        b_dec: &Tensor,
        input: &Tensor,
        scale: Option<&(Tensor, Tensor)>,
        norm: ErrorNorm,
    ) -> Tensor {
        let mut recon = output.broadcast_add(b_dec).unwrap();
        if let Some((mean, std)) = scale {
            recon = recon.broadcast_mul(std).unwrap().broadcast_add(mean).unwrap();
        }
        let sq = (recon - input).unwrap().sqr().unwrap();
        match norm {
            ErrorNorm::Elements => sq.mean_all().unwrap(),
            ErrorNorm::RowNorms => {
                let norms = input.sqr().unwrap().sum(D::Minus1).unwrap();
                (sq.sum(D::Minus1).unwrap() / norms).unwrap().mean_all().unwrap()
            }
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn loss_and_gradients_match_candle_ops() {
        let (rows, d) = (150, 37);
        let (output, b_dec, input, scale) = batch(rows, d);
        for norm in [ErrorNorm::Elements, ErrorNorm::RowNorms] {
            for scale in [None, Some(&scale)] {
                let ours =
                    loss(output.as_tensor(), b_dec.as_tensor(), &input, scale, norm).unwrap();
                let theirs =
                    candle_loss(output.as_tensor(), b_dec.as_tensor(), &input, scale, norm);
                assert!(
                    max_rel(&ours, &theirs) < 1e-6,
                    "{norm:?} {}: loss {ours} vs {theirs}",
                    scale.is_some()
                );
                // Upstream gradient 3: the op scales by it.
                let (g_ours, g_theirs) = (
                    (ours * 3.0).unwrap().backward().unwrap(),
                    (theirs * 3.0).unwrap().backward().unwrap(),
                );
                for v in [&output, &b_dec] {
                    let (a, b) =
                        (g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap());
                    assert!(
                        max_rel(a, b) < 1e-5,
                        "{norm:?} {}: gradient off by {}",
                        scale.is_some(),
                        max_rel(a, b)
                    );
                }
            }
        }
    }

    #[test]
    fn loss_and_gradients_do_not_depend_on_the_threads() {
        let (output, b_dec, input, scale) = batch(200, 19);
        let run = || {
            let l = loss(
                output.as_tensor(),
                b_dec.as_tensor(),
                &input,
                Some(&scale),
                ErrorNorm::RowNorms,
            )
            .unwrap();
            let g = l.backward().unwrap();
            (
                bits(&l),
                bits(g.get(output.as_tensor()).unwrap()),
                bits(g.get(b_dec.as_tensor()).unwrap()),
            )
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        assert_eq!(one.install(run), three.install(run));
    }

    #[test]
    fn values_are_the_broadcast_ops_bit_for_bit() {
        let (output, b_dec, _, scale) = batch(150, 37);
        let working = output.as_tensor().broadcast_add(b_dec.as_tensor()).unwrap();
        let recon = working.broadcast_mul(&scale.1).unwrap().broadcast_add(&scale.0).unwrap();
        let (w, r) = values(output.as_tensor(), b_dec.as_tensor(), Some(&scale)).unwrap();
        assert_eq!((bits(&w), bits(&r)), (bits(&working), bits(&recon)));
        let (w, r) = values(output.as_tensor(), b_dec.as_tensor(), None).unwrap();
        assert_eq!((bits(&w), bits(&r)), (bits(&working), bits(&working)));
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let (output, b_dec, input, scale) = batch(10, 4);
        let short = input.narrow(0, 0, 9).unwrap();
        assert!(
            loss(output.as_tensor(), b_dec.as_tensor(), &short, None, ErrorNorm::Elements).is_err()
        );
        let few = (scale.0.narrow(0, 0, 9).unwrap(), scale.1.narrow(0, 0, 9).unwrap());
        assert!(loss(
            output.as_tensor(),
            b_dec.as_tensor(),
            &input,
            Some(&few),
            ErrorNorm::Elements
        )
        .is_err());
        let narrow_bias = b_dec.as_tensor().narrow(0, 0, 3).unwrap();
        assert!(loss(output.as_tensor(), &narrow_bias, &input, None, ErrorNorm::Elements).is_err());
        assert!(values(output.as_tensor(), &narrow_bias, None).is_err());
    }
}
