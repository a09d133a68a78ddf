//! Custom candle ops that keep SAE training sparse on the CPU.
//!
//! Dense autograd would spend four (B × M × D) GEMMs per step on TopK latents that are 99 % zeros.
//! These ops compute the same values and the same gradients *where they matter*: the gradient
//! w.r.t. a sparse input is exact on its support and reported as 0 elsewhere. Every caller feeds
//! outputs of ReLU / TopK / JumpReLU, whose zeros pass no gradient upstream, so the chain rule
//! result is unchanged (tests compare against the dense graph).
//!
//! Each public function dispatches on `Kernels`: the custom op with host kernels, plain candle
//! ops otherwise (CUDA, Metal, or `run.ops = "portable"`), so models are written once.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::base::cpu::{contiguous, cpu_tensor, dims2, with_cpu_slice, CResult};
use crate::base::gemm::gemm_f32;
use crate::base::host::Kernels;
use crate::base::sparse::{self, SparseBatch, SPARSE_LIMIT};
use crate::models::topk::Mask;
use crate::monoscore::sparse_loss::{self, MonoLossSaved, MonoLossStats};
use crate::monoscore::BatchMono;

// ---------------------------------------------------------------------------------------------
// Encoder: pre = (x − b_dec) · Wᵀ + b_enc (or x · Wᵀ + b_enc without centring), with a backward
// that exploits a sparse upstream gradient.

/// Inputs: x (B, D), W (M, D), and the biases [b_enc; b_dec] (M + D) when centring, b_enc (M)
/// otherwise. Centring inside the op lets the backward give b_dec its gradient as −(Σ_b g)·W, a
/// single (M)·(M, D) product, instead of the (B, D) input gradient that only feeds that sum.
struct EncoderLinear {
    centre: bool,
}

impl EncoderLinear {
    /// x − b_dec row by row when centring (the same float operations as a broadcast subtract).
    fn centred<'a>(&self, x: &'a [f32], biases: &[f32], m: usize) -> std::borrow::Cow<'a, [f32]> {
        if !self.centre {
            return x.into();
        }
        let b_dec = &biases[m..];
        let mut xc = x.to_vec();
        xc.par_chunks_mut(b_dec.len().max(1))
            .for_each(|row| row.iter_mut().zip(b_dec).for_each(|(v, &c)| *v -= c));
        xc.into()
    }
}

impl CustomOp3 for EncoderLinear {
    fn name(&self) -> &'static str {
        "sae-encoder-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, d) = dims2(l1)?;
        let (m, d2) = dims2(l2)?;
        let want = if self.centre { m + d } else { m };
        if d != d2 || l3.shape().elem_count() != want {
            candle_core::bail!(
                "encoder shapes disagree: x {b}×{d}, W {m}×{d2}, biases {:?}",
                l3.shape()
            );
        }
        let (x, w, biases) = (
            contiguous(self.name(), s1, l1)?,
            contiguous(self.name(), s2, l2)?,
            contiguous(self.name(), s3, l3)?,
        );
        let xc = self.centred(x, biases, m);
        let y = crate::models::fused::affine_rows(&xc, w, &biases[..m], b, d);
        Ok((CpuStorage::F32(y), Shape::from((b, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        biases: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, d) = x.dims2()?;
        let m = w.dim(0)?;
        let grad = grad.contiguous()?;
        let (dx, dw, dbiases) = with_cpu_slice(&grad, |g| {
            with_cpu_slice(x, |xs| {
                with_cpu_slice(w, |ws| {
                    with_cpu_slice(biases, |bs| {
                        let xc = self.centred(xs, bs, m);
                        let (dx, dw, mut db) = match SparseBatch::from_dense_if_sparse(g, m, None) {
                            Some(csr) => (
                                x.track_op().then(|| sparse::csr_matmul(csr.as_rows(), ws, d)),
                                sparse::csr_transpose_matmul(csr.as_rows(), &xc, d, m),
                                sparse::csr_column_sums(csr.as_rows(), m),
                            ),
                            None => (
                                x.track_op().then(|| gemm_f32(b, d, m, g, m, 1, ws, d, 1)),
                                gemm_f32(m, d, b, g, 1, m, &xc, d, 1),
                                crate::models::fused::column_sums(g, m),
                            ),
                        };
                        if self.centre {
                            // ∂/∂b_dec of Σ g·((x − b_dec)·Wᵀ) = −(Σ_b g)·W.
                            let d_dec = gemm_f32(1, d, m, &db, m, 1, ws, d, 1);
                            db.extend(d_dec.into_iter().map(|v| -v));
                        }
                        (dx, dw, db)
                    })
                })
            })
        })????;
        let n_biases = dbiases.len();
        Ok((
            dx.map(|dx| cpu_tensor(dx, (b, d))).transpose()?,
            Some(cpu_tensor(dw, (m, d))?),
            Some(cpu_tensor(dbiases, n_biases)?),
        ))
    }
}

/// (B, D) · (M, D)ᵀ + (M,) → (B, M), the input first centred by `b_dec` when given.
pub fn encoder_linear(
    x: &Tensor,
    w: &Tensor,
    b_enc: &Tensor,
    b_dec: Option<&Tensor>,
    kernels: Kernels,
) -> CResult<Tensor> {
    if kernels.for_tensor(x).is_host() {
        let biases = match b_dec {
            Some(b_dec) => Tensor::cat(&[b_enc, b_dec], 0)?,
            None => b_enc.clone(),
        };
        let op = EncoderLinear { centre: b_dec.is_some() };
        x.contiguous()?.apply_op3(&w.contiguous()?, &biases.contiguous()?, op)
    } else {
        let x = match b_dec {
            Some(b_dec) => x.broadcast_sub(b_dec)?,
            None => x.clone(),
        };
        x.matmul(&w.t()?)?.broadcast_add(b_enc)
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder: (B, M) sparse latents · (M, D) dictionary.

struct SupportMatmul {
    /// CSR of the latents when they are sparse (from `decode`), kept for the backward pass;
    /// None runs the dense products.
    cached: Arc<Mutex<Option<SparseBatch>>>,
    /// The op's first input is the `pre` the latents are a masked ReLU of, not the latents: its
    /// values are never read (the CSR holds the latents), it only receives their gradient, which
    /// is the same on the CSR's support. Requires the CSR.
    input_is_pre: bool,
    /// λ·MonoLoss of the same latents, computed on the same CSR; its gradient is added to the
    /// latents' gradient in the backward pass (saving a dense gradient and its accumulation).
    mono: Option<MonoInjection>,
}

struct MonoInjection {
    /// Host copy of the (B, D) similarity embeddings.
    similarity: Vec<f32>,
    lambda: f32,
    eps: f32,
    /// (loss, stats) of the forward pass, for the caller.
    result: Arc<Mutex<Option<(f32, MonoLossStats)>>>,
    saved: Mutex<Option<MonoLossSaved>>,
}

impl CustomOp2 for SupportMatmul {
    fn name(&self) -> &'static str {
        "sae-support-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, m) = dims2(l1)?;
        let (m2, d) = dims2(l2)?;
        if m != m2 {
            candle_core::bail!("decoder shapes disagree: latents {b}×{m}, W {m2}×{d}");
        }
        let (lat, w) = (contiguous(self.name(), s1, l1)?, contiguous(self.name(), s2, l2)?);
        let csr = self.cached.lock().unwrap().take();
        if self.input_is_pre && csr.is_none() {
            candle_core::bail!("{}: a decoder differentiated into pre needs the CSR", self.name());
        }
        if self.mono.is_some() && csr.is_none() {
            candle_core::bail!("{}: the fused MonoLoss needs the latents' CSR", self.name());
        }
        if let Some(rows) = csr.as_ref().map(SparseBatch::rows).filter(|&r| r != b) {
            candle_core::bail!("{}: a CSR of {rows} rows for {b} latent rows", self.name());
        }
        let out = if let Some(csr) = csr {
            let out = sparse::csr_matmul(csr.as_rows(), w, d);
            if let Some(mono) = &self.mono {
                let sim_dim = mono.similarity.len() / b;
                let (saved, loss, stats) =
                    sparse_loss::forward(&csr, b, m, &mono.similarity, sim_dim, mono.eps);
                *mono.result.lock().unwrap() = Some((loss, stats));
                *mono.saved.lock().unwrap() = Some(saved);
            }
            *self.cached.lock().unwrap() = Some(csr);
            out
        } else {
            *self.cached.lock().unwrap() = None;
            gemm_f32(b, d, m, lat, m, 1, w, d, 1)
        };
        Ok((CpuStorage::F32(out), Shape::from((b, d))))
    }

    fn bwd(
        &self,
        lat: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (b, m) = lat.dims2()?;
        let d = w.dim(1)?;
        let cached = self.cached.lock().unwrap().take();
        let (dlat, dw) = with_cpu_slice(grad, |g| {
            with_cpu_slice(w, |ws| match &cached {
                Some(csr) => {
                    let saved = self
                        .mono
                        .as_ref()
                        .map(|mono| mono.saved.lock().unwrap().take().expect("mono forward ran"));
                    let own_cols;
                    let cols = match &saved {
                        Some(s) => &s.cols,
                        None => {
                            own_cols = sparse::to_columns(csr.as_rows(), m);
                            &own_cols
                        }
                    };
                    let (dw, mut dots) = sparse::decoder_backward(cols, g, ws, d);
                    if let (Some(mono), Some(saved)) = (&self.mono, &saved) {
                        let extra = sparse_loss::backward(saved, b, mono.lambda, mono.eps);
                        dots.iter_mut().zip(extra).for_each(|(v, e)| *v += e);
                    }
                    let vals = sparse::to_row_order(cols, &dots);
                    Ok::<_, candle_core::Error>((csr.with_values(vals).to_dense(m), dw))
                }
                None if self.input_is_pre => {
                    candle_core::bail!("{}: backward into pre without the CSR", self.name())
                }
                None => with_cpu_slice(lat, |ls| {
                    let dlat = gemm_f32(b, m, d, g, d, 1, ws, 1, d);
                    let dw = gemm_f32(m, d, b, ls, 1, m, g, d, 1);
                    (dlat, dw)
                }),
            })
        })???;
        Ok((Some(cpu_tensor(dlat, (b, m))?), Some(cpu_tensor(dw, (m, d))?)))
    }
}

/// (B, M) · (M, D) → (B, D); sparse on the CPU when the latents are. The latents' gradient is
/// exact on their non-zeros and on `grad_support`, and 0 on the other zeros. `latents_csr`: the
/// latents' non-zeros when the caller has them (see `decode`).
pub fn support_matmul(
    latents: &Tensor,
    latents_csr: Option<SparseBatch>,
    of_pre: Option<&Tensor>,
    w: &Tensor,
    grad_support: Option<&Mask>,
    kernels: Kernels,
) -> CResult<Tensor> {
    Ok(decode(latents, latents_csr, of_pre, w, grad_support, None, kernels)?.output)
}

/// The host op on `input` (contiguous: the latents, or the `pre` they are a masked ReLU of when
/// `input_is_pre`), sparse when `csr` is given.
fn apply_support_matmul(
    input: &Tensor,
    input_is_pre: bool,
    w: &Tensor,
    grad_support: Option<&Mask>,
    csr: Option<SparseBatch>,
    mono: Option<MonoInjection>,
) -> CResult<(Tensor, Option<SparseBatch>)> {
    let cached = Arc::new(Mutex::new(csr));
    let op = SupportMatmul { cached: cached.clone(), input_is_pre, mono };
    let output = input.apply_op2(&w.contiguous()?, op)?;
    // Without a gradient to propagate to the latents (inference) the backward pass never needs
    // the CSR: hand it out, so callers need not rebuild it. It only holds the non-zeros when no
    // gradient support was added.
    let csr = if input.track_op() || grad_support.is_some() {
        None
    } else {
        cached.lock().unwrap().take()
    };
    Ok((output, csr))
}

/// The CSR the host decoder runs on: None when the latents are too dense for the sparse
/// kernels. A CSR from the caller is used when no gradient support has to be added to it;
/// otherwise one counting pass builds it.
fn decoder_csr(
    latents: &Tensor,
    given: Option<SparseBatch>,
    grad_support: Option<&Mask>,
) -> CResult<Option<SparseBatch>> {
    let (b, m) = latents.dims2()?;
    match (given, host_support(grad_support)) {
        (Some(csr), None) => {
            Ok((b * m == 0 || csr.nnz() as f64 / (b * m) as f64 <= SPARSE_LIMIT).then_some(csr))
        }
        (_, support) => {
            with_cpu_slice(latents, |l| SparseBatch::from_dense_if_sparse(l, m, support))
        }
    }
}

/// The MonoLoss to compute with a decoder pass.
#[derive(Clone, Copy)]
pub struct MonoTerm<'a> {
    /// (B, D') similarity embeddings of the batch.
    pub similarity: &'a Tensor,
    pub lambda: f64,
    pub eps: f64,
}

/// A decoder pass and, when asked for, the batch MonoLoss of the same latents.
pub struct Decoded {
    /// (B, D) latents · W.
    pub output: Tensor,
    /// The latents' non-zeros as CSR rows, when the host kernels built them and the latents need
    /// no gradient (inference): what callers would otherwise rebuild from the dense latents. If
    /// the output is differentiated anyway (for W), the backward pass falls back to the dense
    /// products — the same gradients, computed slower.
    pub latents_csr: Option<SparseBatch>,
    /// The MonoLoss and its statistics. Add λ·loss to the objective: with host kernels on
    /// sparse latents the loss is a constant and the decoder's backward already adds its
    /// gradient (times λ); otherwise it is an ordinary graph node.
    pub mono: Option<BatchMono>,
}

/// A gradient support mask as the host kernels read it.
fn host_support(grad_support: Option<&Mask>) -> Option<&[bool]> {
    match grad_support {
        Some(Mask::Host(s)) => Some(s),
        _ => None,
    }
}

/// `support_matmul` with an optional MonoLoss on the same latents, fused on the CPU.
/// `latents_csr`: the latents' non-zeros as CSR rows when the caller has them (a host
/// activation builds them in its own pass); without them the host decoder counts the latents.
/// `of_pre`: the pre-activations the latents were selected from, read only together with
/// `latents_csr`, which a host `Selected` of `pre` built: the latents are then `pre`'s masked
/// ReLU and the CSR holds exactly their non-zeros. The sparse decoder passes the latents'
/// gradient straight into `pre` — the masked ReLU's backward is the identity on those entries —
/// so the backward pass builds no (B × M) gradient for the latents themselves.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    latents: &Tensor,
    latents_csr: Option<SparseBatch>,
    of_pre: Option<&Tensor>,
    w: &Tensor,
    grad_support: Option<&Mask>,
    mono: Option<MonoTerm>,
    kernels: Kernels,
) -> CResult<Decoded> {
    if !kernels.for_tensor(latents).is_host() {
        let output = latents.matmul(w)?;
        let mono =
            mono.map(|term| unfused_mono(latents, term, grad_support, kernels)).transpose()?;
        return Ok(Decoded { output, latents_csr: None, mono });
    }
    let latents = latents.contiguous()?;
    let given_csr = latents_csr.is_some();
    let csr = decoder_csr(&latents, latents_csr, grad_support)?;
    // Differentiate into `pre` when the sparse path runs on the selection's own CSR (decoder_csr
    // hands back a given CSR unchanged, or None when it is too dense).
    let pre =
        of_pre.filter(|p| given_csr && csr.is_some() && grad_support.is_none() && p.track_op());
    let input = match pre {
        Some(pre) => pre.contiguous()?,
        None => latents.clone(),
    };
    let (term, csr) = match (mono, csr) {
        (Some(term), Some(csr)) => (term, csr),
        (mono, csr) => {
            // No MonoLoss, or latents too dense to fuse it: the MonoLoss is its own node.
            let (output, latents_csr) =
                apply_support_matmul(&input, pre.is_some(), w, grad_support, csr, None)?;
            let mono = mono.map(|term| unfused_mono(&latents, term, grad_support, kernels));
            return Ok(Decoded { output, latents_csr, mono: mono.transpose()? });
        }
    };
    let similarity =
        with_cpu_slice(&term.similarity.detach().to_dtype(DType::F32)?, <[f32]>::to_vec)?;
    let result = Arc::new(Mutex::new(None));
    let injection = MonoInjection {
        similarity,
        lambda: term.lambda as f32,
        eps: term.eps as f32,
        result: result.clone(),
        saved: Mutex::new(None),
    };
    let (output, latents_csr) =
        apply_support_matmul(&input, pre.is_some(), w, grad_support, Some(csr), Some(injection))?;
    let (loss, stats): (f32, MonoLossStats) =
        result.lock().unwrap().take().expect("decoder forward computed the MonoLoss");
    Ok(Decoded { output, latents_csr, mono: Some(stats.into_batch_mono(loss)?) })
}

/// The batch MonoLoss as its own graph node (portable kernels, or latents too dense to fuse).
fn unfused_mono(
    latents: &Tensor,
    term: MonoTerm,
    grad_support: Option<&Mask>,
    kernels: Kernels,
) -> CResult<BatchMono> {
    crate::monoscore::batch_mono_loss(latents, term.similarity, term.eps, grad_support, kernels)
        .map_err(candle_core::Error::wrap)
}
