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

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::base::cpu::{contiguous, cpu_tensor, dims2, with_cpu_slice, CResult};
use crate::base::gemm::{gemm_f32, gemm_f32_plus_row_blocks, Strided};
use crate::base::grad_sink::GradSink;
use crate::base::host::Kernels;
use crate::base::screen;
use crate::base::simd::vectorized;
use crate::base::sparse::{self, KeptBlock, SparseBatch, SPARSE_LIMIT};
use crate::models::topk::{Latents, Mask, Selected};
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
    /// Where W's gradient goes instead of candle's store, when the trainer gave one.
    sink: Option<GradSink>,
}

impl EncoderLinear {
    /// x − b_dec row by row when centring.
    fn centred<'a>(&self, x: &'a [f32], biases: &[f32], m: usize) -> Cow<'a, [f32]> {
        centre_rows(x, self.centre.then(|| &biases[m..]))
    }
}

/// x − b_dec row by row when `b_dec` is given (the same float operations as a broadcast
/// subtract).
fn centre_rows<'a>(x: &'a [f32], b_dec: Option<&[f32]>) -> Cow<'a, [f32]> {
    let Some(b_dec) = b_dec else { return x.into() };
    let d = b_dec.len().max(1);
    // One pass that writes each row once (a copy, then a subtract, wrote it twice).
    crate::base::cpu::par_filled(x.len(), 64 * d, |t, part| {
        let src = &x[t * 64 * d..][..part.len()];
        for (out, row) in part.chunks_mut(d).zip(src.chunks(d)) {
            for ((o, &v), &c) in out.iter_mut().zip(row).zip(b_dec) {
                *o = v - c;
            }
        }
    })
    .into()
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
        let m = w.dim(0)?;
        let grad = grad.contiguous()?;
        with_cpu_slice(&grad, |g| match SparseBatch::from_dense_if_sparse(g, m, None) {
            Some(csr) => self.grads(Upstream::Sparse(&csr), x, w, biases),
            None => self.grads(Upstream::Dense(g), x, w, biases),
        })?
    }
}

/// The gradient reaching the pre-activations.
enum Upstream<'a> {
    Sparse(&'a SparseBatch),
    /// (B, M) row-major.
    Dense(&'a [f32]),
}

impl EncoderLinear {
    /// Gradients of Σ g ⊙ pre w.r.t. x (when it needs one), W and the biases.
    fn grads(
        &self,
        g: Upstream,
        x: &Tensor,
        w: &Tensor,
        biases: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, d) = x.dims2()?;
        let m = w.dim(0)?;
        let (dx, dw, dbiases) = with_cpu_slice(x, |xs| {
            with_cpu_slice(w, |ws| {
                with_cpu_slice(biases, |bs| {
                    let xc = self.centred(xs, bs, m);
                    let (dx, dw, mut db) = match g {
                        Upstream::Sparse(csr) => (
                            x.track_op().then(|| sparse::csr_matmul(csr.as_rows(), ws, d)),
                            sparse::csr_transpose_matmul(csr.as_rows(), &xc, d, m),
                            sparse::csr_column_sums(csr.as_rows(), m),
                        ),
                        Upstream::Dense(g) => (
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
        })???;
        let n_biases = dbiases.len();
        Ok((
            dx.map(|dx| cpu_tensor(dx, (b, d))).transpose()?,
            GradSink::route(self.sink.as_ref(), w, dw)?,
            Some(cpu_tensor(dbiases, n_biases)?),
        ))
    }
}

/// Sparse gradients of the pre-activations, handed from the ops that use a `PrePort` to the
/// port's backward pass.
type GradStash = Arc<Mutex<Vec<SparseBatch>>>;

/// The encoder's dependence on x, W and the biases, as a graph node of one element (0) whose
/// backward pass takes the pre-activations' gradient as sparse rows from the ops downstream
/// instead of as a dense (B × M) tensor: candle would zero-fill such a tensor, add every
/// contribution into it and hand it to the encoder, which scans it for its few non-zeros.
struct PortOp {
    encoder: EncoderLinear,
    stash: GradStash,
}

impl CustomOp3 for PortOp {
    fn name(&self) -> &'static str {
        "sae-pre-port"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        biases: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let parts = std::mem::take(&mut *self.stash.lock().unwrap());
        if parts.is_empty() {
            // Its users push their gradients in their own backward, which runs first.
            candle_core::bail!("{}: no gradient reached the pre-activations", self.name());
        }
        self.encoder.grads(Upstream::Sparse(&SparseBatch::sum(&parts)), x, w, biases)
    }
}

/// The port of the encoder's pre-activations for sparse gradients (host kernels, training):
/// an op that computes its output from a selection's CSR of `pre` takes `handle` as its input
/// instead of `pre`, and pushes the gradient of those entries to the port. The encoder's
/// parameters then get their gradient from the port's backward pass; `pre` itself, unused by
/// the graph, gets none to build. Anything that does differentiate through `pre` (or latents
/// computed from it) still reaches the encoder through `pre`'s own node: both add up.
pub struct PrePort {
    handle: Tensor,
    stash: GradStash,
}

/// The encoder's output.
pub struct Encoded {
    /// (B, M) pre-activations.
    pub pre: Pre,
    /// With host kernels, when the encoder has a parameter to train.
    pub port: Option<PrePort>,
}

/// The encoder's (B, M) pre-activations. With host kernels the tensor is built when something
/// first reads it (`tensor`): a BatchTopK training step that selects through the screen
/// (`screened_batch_top`) and trains through the port never does, and so never runs the f32
/// product over all (B × M) entries.
#[derive(Clone)]
pub struct Pre(Arc<PreInner>);

struct PreInner {
    dense: OnceLock<Tensor>,
    /// The encoder op's inputs (host kernels).
    inputs: Option<EncoderInputs>,
    /// Set once the weights may have changed (`Pre::seal`): building the tensor then is refused.
    sealed: AtomicBool,
    dims: (usize, usize),
    device: Device,
}

struct EncoderInputs {
    x: Tensor,
    w: Tensor,
    /// b_enc, then b_dec when centring.
    biases: Tensor,
    centre: bool,
    sink: Option<GradSink>,
}

impl Pre {
    /// Pre-activations already computed.
    pub fn ready(t: Tensor) -> CResult<Self> {
        let (dims, device) = (t.dims2()?, t.device().clone());
        Ok(Self::of(OnceLock::from(t), None, dims, device))
    }

    fn of(
        dense: OnceLock<Tensor>,
        inputs: Option<EncoderInputs>,
        dims: (usize, usize),
        device: Device,
    ) -> Self {
        Self(Arc::new(PreInner { dense, inputs, sealed: AtomicBool::new(false), dims, device }))
    }

    /// The (B, M) tensor, a node of the graph like the encoder's output (built on first use).
    pub fn tensor(&self) -> CResult<&Tensor> {
        if let Some(t) = self.0.dense.get() {
            return Ok(t);
        }
        if self.0.sealed.load(Ordering::Acquire) {
            candle_core::bail!(
                "the pre-activations were first read after the step that may have changed the \
                 encoder's weights"
            );
        }
        let i = self.0.inputs.as_ref().expect("pre-activations without a tensor or inputs");
        let op = EncoderLinear { centre: i.centre, sink: i.sink.clone() };
        let built = i.x.apply_op3(&i.w, &i.biases, op)?;
        Ok(self.0.dense.get_or_init(|| built))
    }

    /// (B, M).
    pub fn dims(&self) -> (usize, usize) {
        self.0.dims
    }

    /// Whether the tensor exists (something read it, or it was computed up front).
    pub fn is_built(&self) -> bool {
        self.0.dense.get().is_some()
    }

    pub fn device(&self) -> &Device {
        &self.0.device
    }

    pub fn dtype(&self) -> DType {
        self.0.dense.get().map_or(DType::F32, Tensor::dtype)
    }

    /// From now on the weights may change (an optimiser step): building the tensor is an error
    /// instead of a silent product of the new weights. A built tensor stays readable.
    pub fn seal(&self) {
        self.0.sealed.store(true, Ordering::Release);
    }
}

impl crate::models::topk::PreActivations for Pre {
    fn pre_tensor(&self) -> CResult<Tensor> {
        self.tensor().cloned()
    }
}

/// (B, D) · (M, D)ᵀ + (M,) → (B, M), the input first centred by `b_dec` when given. W's
/// gradient goes to the `GradSink` active during the call, if any.
pub fn encoder_linear(
    x: &Tensor,
    w: &Tensor,
    b_enc: &Tensor,
    b_dec: Option<&Tensor>,
    kernels: Kernels,
) -> CResult<Encoded> {
    if kernels.for_tensor(x).is_host() {
        let biases = match b_dec {
            Some(b_dec) => Tensor::cat(&[b_enc, b_dec], 0)?,
            None => b_enc.clone(),
        };
        let (x, w, biases) = (x.contiguous()?, w.contiguous()?, biases.contiguous()?);
        let centre = b_dec.is_some();
        let sink = GradSink::active();
        let port = (x.track_op() || w.track_op() || biases.track_op())
            .then(|| -> CResult<PrePort> {
                let stash = GradStash::default();
                let encoder = EncoderLinear { centre, sink: sink.clone() };
                let op = PortOp { encoder, stash: stash.clone() };
                Ok(PrePort { handle: x.apply_op3(&w, &biases, op)?, stash })
            })
            .transpose()?;
        let dims = (x.dim(0)?, w.dim(0)?);
        let device = x.device().clone();
        let inputs = Some(EncoderInputs { x, w, biases, centre, sink });
        Ok(Encoded { pre: Pre::of(OnceLock::new(), inputs, dims, device), port })
    } else {
        let x = match b_dec {
            Some(b_dec) => x.broadcast_sub(b_dec)?,
            None => x.clone(),
        };
        Ok(Encoded { pre: Pre::ready(x.matmul(&w.t()?)?.broadcast_add(b_enc)?)?, port: None })
    }
}

/// A BatchTopK selection of the `n` largest positive pre-activations of the batch, through the
/// AMX screen: the entries, their values and the smallest kept value are those of
/// `topk_latents` on `pre.tensor()`, bit for bit, without building that tensor. None where the
/// screen does not run (no AMX, small products, portable kernels, or the tensor already built).
pub fn screened_batch_top(pre: &Pre, n: usize) -> CResult<Option<Selected>> {
    let Some(i) = pre.0.inputs.as_ref().filter(|_| pre.0.dense.get().is_none()) else {
        return Ok(None);
    };
    let (rows, m) = pre.dims();
    let d = i.x.dim(1)?;
    let found = with_cpu_slice(&i.x, |xs| {
        with_cpu_slice(&i.w, |ws| {
            with_cpu_slice(&i.biases, |bs| {
                let prepared = screen::Prepared::new(ws, d)?;
                let xc = centre_rows(xs, i.centre.then(|| &bs[m..]));
                let blocks = screen::batch_candidates(&xc, ws, &prepared, &bs[..m], n)?;
                Some(KeptBlock::merge(&blocks, rows))
            })
        })
    })???;
    let Some(candidates) = found else { return Ok(None) };
    let flat = candidates.flat_entries(m);
    let (kept, min) = crate::models::topk::best_of_candidates(flat.clone(), n);
    // The kept entries' CSR: a walk of the candidates (both in flat-index order).
    let mut csr = SparseBatch { row_offsets: vec![0], columns: Vec::new(), values: Vec::new() };
    let mut next = kept.iter().peekable();
    for r in 0..rows {
        for &(v, index) in &flat[candidates.row_offsets[r]..candidates.row_offsets[r + 1]] {
            if next.peek() == Some(&&index) {
                next.next();
                csr.columns.push(index - (r * m) as u32);
                csr.values.push(v);
            }
        }
        csr.row_offsets.push(csr.columns.len());
    }
    let min = min.map(|v| Tensor::new(v, pre.device())).transpose()?;
    let latents = Latents::of_entries(Arc::new(pre.clone()), (rows, m), kept);
    Ok(Some(Selected { latents, csr: Some(csr), min }))
}

// ---------------------------------------------------------------------------------------------
// Inference of thresholded activations without (B × M) buffers.

/// Inference latents that are a threshold of the pre-activations: latent j keeps pre_j where
/// pre_j > t_j and pre_j > 0, and is 0 elsewhere (BatchTopK's learned threshold, JumpReLU's θ,
/// ReLU's 0).
pub enum KeepAbove {
    All(f32),
    /// One threshold per latent.
    PerLatent(Vec<f32>),
}

/// What `encode_above`'s screen needs of an encoder's W, prepared once for many batches (empty
/// where the screen does not run).
pub struct EncoderScreen(Option<screen::Prepared>);

impl EncoderScreen {
    pub fn new(w: &Tensor) -> CResult<Self> {
        let (_, d) = w.dims2()?;
        let w = w.contiguous()?;
        Ok(Self(with_cpu_slice(&w, |ws| screen::Prepared::new(ws, d))?))
    }
}

/// The latents of `KeepAbove` straight from the encoder, on the host: the pre-activations are
/// computed a block of latents at a time and thresholded while in cache, so neither they nor
/// dense latents are ever stored. The entries are those of the masked ReLU of
/// `encoder_linear`'s output, bit for bit (same products, same comparisons).
///
/// On a CPU with AMX tiles the entries come from `screen` (the same bits, most of the product
/// skipped); `screen` is what it needs of W, when the caller prepared it once for many batches
/// (`EncoderScreen::new` of the same W).
pub fn encode_above(
    x: &Tensor,
    w: &Tensor,
    b_enc: &Tensor,
    b_dec: Option<&Tensor>,
    keep: &KeepAbove,
    screen: Option<&EncoderScreen>,
) -> CResult<SparseBatch> {
    let (b, d) = x.dims2()?;
    let m = w.dim(0)?;
    if let KeepAbove::PerLatent(t) = keep {
        if t.len() != m {
            candle_core::bail!("{} thresholds for {m} latents", t.len());
        }
    }
    // pre > t and pre > 0 as one comparison: pre > max(t, 0); a NaN threshold keeps nothing.
    let cut = |t: f32| if t.is_nan() { f32::INFINITY } else { t.max(0.0) };
    let cuts: Vec<f32> = match keep {
        KeepAbove::All(t) => vec![cut(*t); m],
        KeepAbove::PerLatent(t) => t.iter().map(|&t| cut(t)).collect(),
    };
    let b_dec = b_dec.map(Tensor::contiguous).transpose()?;
    let (x, w, b_enc) = (x.contiguous()?, w.contiguous()?, b_enc.contiguous()?);
    let blocks = with_cpu_slice(&x, |xs| {
        with_cpu_slice(&w, |ws| {
            with_cpu_slice(&b_enc, |bias| {
                let dec = b_dec.as_ref().map(|t| with_cpu_slice(t, <[f32]>::to_vec)).transpose()?;
                let xc = centre_rows(xs, dec.as_deref());
                let fresh;
                let prepared = match screen {
                    Some(s) => s.0.as_ref(),
                    None => {
                        fresh = screen::Prepared::new(ws, d);
                        fresh.as_ref()
                    }
                };
                if let Some(blocks) =
                    prepared.and_then(|p| screen::entries_above(&xc, ws, p, bias, &cuts))
                {
                    return Ok(blocks);
                }
                let (a, wt) =
                    (Strided { data: &xc, rs: d, cs: 1 }, Strided { data: ws, rs: 1, cs: d });
                Ok::<_, candle_core::Error>(gemm_f32_plus_row_blocks(
                    (b, m, d),
                    a,
                    wt,
                    bias,
                    |first, width, pre| scan_block(pre, &cuts[first..first + width], first),
                ))
            })
        })
    })????;
    Ok(KeptBlock::merge(&blocks, b))
}

/// Keeps the (rows × width) pre-activations of the latents first.. that exceed their cuts.
fn scan_block(pre: &[f32], cuts: &[f32], first: usize) -> KeptBlock {
    let width = cuts.len();
    let mut kept = KeptBlock { offsets: Vec::new(), columns: Vec::new(), values: Vec::new() };
    if width == 0 {
        return kept;
    }
    kept.offsets.push(0);
    let full = width / 16 * 16;
    let keeps = |v: f32, cut: f32| v > cut;
    vectorized!(for row in pre.chunks_exact(width) {
        // Blocks of 16 as arrays (a fixed length is what lets LLVM vectorise the test),
        // compared in vector registers into a bit mask; a sparse row has a few bits set.
        let blocks = row[..full].chunks_exact(16).zip(cuts[..full].chunks_exact(16));
        for (i, (v, t)) in blocks.enumerate() {
            let (v, t): (&[f32; 16], &[f32; 16]) = (v.try_into().unwrap(), t.try_into().unwrap());
            let mut bits = (0..16).fold(0u32, |bits, j| bits | (keeps(v[j], t[j]) as u32) << j);
            while bits != 0 {
                let j = bits.trailing_zeros() as usize;
                kept.columns.push((first + i * 16 + j) as u32);
                kept.values.push(v[j]);
                bits &= bits - 1;
            }
        }
        for (j, (&v, &t)) in row[full..].iter().zip(&cuts[full..]).enumerate() {
            if keeps(v, t) {
                kept.columns.push((first + full + j) as u32);
                kept.values.push(v);
            }
        }
        kept.offsets.push(kept.columns.len());
    });
    kept
}

// ---------------------------------------------------------------------------------------------
// Decoder: (B, M) sparse latents · (M, D) dictionary.

struct SupportMatmul {
    /// CSR of the latents when they are sparse (from `decode`), kept for the backward pass;
    /// None runs the dense products.
    cached: Arc<Mutex<Option<SparseBatch>>>,
    /// The op's first input is the handle of a `PrePort` of the `pre` the latents are a masked
    /// ReLU of, not the latents: the CSR holds the latents, and their gradient on its support —
    /// the same as `pre`'s there — goes to the port's stash. Requires the CSR.
    port: Option<GradStash>,
    /// λ·MonoLoss of the same latents, computed on the same CSR; its gradient is added to the
    /// latents' gradient in the backward pass (saving a dense gradient and its accumulation).
    mono: Option<MonoInjection>,
    /// Where W's gradient goes instead of candle's store (`GradSink::active`), when given.
    sink: Option<GradSink>,
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
        let csr = self.cached.lock().unwrap().take();
        let (m2, d) = dims2(l2)?;
        let (b, m) = match (&self.port, &csr) {
            (Some(_), Some(csr)) => (csr.rows(), m2),
            (Some(_), None) => candle_core::bail!(
                "{}: a decoder differentiated into pre needs the CSR",
                self.name()
            ),
            (None, _) => dims2(l1)?,
        };
        if m != m2 {
            candle_core::bail!("decoder shapes disagree: latents {b}×{m}, W {m2}×{d}");
        }
        let (lat, w) = (contiguous(self.name(), s1, l1)?, contiguous(self.name(), s2, l2)?);
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
        let (m, d) = w.dims2()?;
        let cached = self.cached.lock().unwrap().take();
        let b = match (&cached, &self.port) {
            (Some(csr), _) => csr.rows(),
            (None, Some(_)) => {
                candle_core::bail!("{}: backward into pre without the CSR", self.name())
            }
            (None, None) => lat.dim(0)?,
        };
        let (dlat, dw) = with_cpu_slice(grad, |g| {
            with_cpu_slice(w, |ws| match cached {
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
                    let grad = csr.with_values(sparse::to_row_order(cols, &dots));
                    let dlat = match &self.port {
                        Some(stash) => {
                            stash.lock().unwrap().push(grad);
                            // The handle's own gradient: its value never mattered.
                            cpu_tensor(vec![0.0], 1)?
                        }
                        None => cpu_tensor(grad.to_dense(m), (b, m))?,
                    };
                    Ok::<_, candle_core::Error>((dlat, dw))
                }
                None => with_cpu_slice(lat, |ls| {
                    let dlat = gemm_f32(b, m, d, g, d, 1, ws, 1, d);
                    let dw = gemm_f32(m, d, b, ls, 1, m, g, d, 1);
                    Ok((cpu_tensor(dlat, (b, m))?, dw))
                })?,
            })
        })???;
        Ok((Some(dlat), GradSink::route(self.sink.as_ref(), w, dw)?))
    }
}

/// (B, M) · (M, D) → (B, D); sparse on the CPU when the latents are. The latents' gradient is
/// exact on their non-zeros and on `grad_support`, and 0 on the other zeros. `latents_csr`: the
/// latents' non-zeros when the caller has them (see `decode`).
pub fn support_matmul(
    latents: &Latents,
    latents_csr: Option<SparseBatch>,
    of_pre: Option<&PrePort>,
    w: &Tensor,
    grad_support: Option<&Mask>,
    kernels: Kernels,
) -> CResult<Tensor> {
    Ok(decode(latents, latents_csr, of_pre, w, grad_support, None, kernels)?.output)
}

/// The differentiable input of the host decoder op.
enum Input<'a> {
    Latents(&'a Tensor),
    Port(&'a PrePort),
}

/// The host op on the latents (contiguous), or on the port of the `pre` they are a masked ReLU
/// of; sparse when `csr` is given.
fn apply_support_matmul(
    input: Input,
    w: &Tensor,
    grad_support: Option<&Mask>,
    csr: Option<SparseBatch>,
    mono: Option<MonoInjection>,
) -> CResult<(Tensor, Option<SparseBatch>)> {
    let cached = Arc::new(Mutex::new(csr));
    let (input, port) = match input {
        Input::Latents(latents) => (latents, None),
        Input::Port(port) => (&port.handle, Some(port.stash.clone())),
    };
    let op = SupportMatmul { cached: cached.clone(), port, mono, sink: GradSink::active() };
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

/// Whether (rows × m) latents with `nnz` non-zeros take the sparse decoder products.
pub(super) fn sparse_enough(nnz: usize, rows: usize, m: usize) -> bool {
    rows * m == 0 || nnz as f64 / (rows * m) as f64 <= SPARSE_LIMIT
}

/// The CSR the host decoder runs on: None when the latents are too dense for the sparse
/// kernels. A CSR from the caller is used when no gradient support has to be added to it;
/// otherwise one counting pass builds it.
fn decoder_csr(
    latents: &Latents,
    given: Option<SparseBatch>,
    grad_support: Option<&Mask>,
) -> CResult<Option<SparseBatch>> {
    let (b, m) = latents.dims();
    match (given, host_support(grad_support)) {
        (Some(csr), None) => Ok(sparse_enough(csr.nnz(), b, m).then_some(csr)),
        (_, support) => with_cpu_slice(&latents.tensor()?.contiguous()?, |l| {
            SparseBatch::from_dense_if_sparse(l, m, support)
        }),
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
/// `of_pre`: the port of the pre-activations the latents were selected from, used only together
/// with `latents_csr`, which a host `Selected` of `pre` built: the latents are then `pre`'s
/// masked ReLU and the CSR holds exactly their non-zeros. The sparse decoder passes the latents'
/// gradient on those entries straight to the encoder through the port — the masked ReLU's
/// backward is the identity there — so the backward pass builds no (B × M) gradient, neither
/// for the latents nor for `pre`.
/// Whichever input the op differentiates, W's gradient goes to the `GradSink` active during the
/// call, if any.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    latents: &Latents,
    latents_csr: Option<SparseBatch>,
    of_pre: Option<&PrePort>,
    w: &Tensor,
    grad_support: Option<&Mask>,
    mono: Option<MonoTerm>,
    kernels: Kernels,
) -> CResult<Decoded> {
    let host = match latents.built() {
        Some(t) => kernels.for_tensor(t).is_host(),
        None => kernels.is_host(),
    };
    if !host {
        let latents = latents.tensor()?;
        let output = latents.matmul(w)?;
        let mono =
            mono.map(|term| unfused_mono(latents, term, grad_support, kernels)).transpose()?;
        return Ok(Decoded { output, latents_csr: None, mono });
    }
    let given_csr = latents_csr.is_some();
    let csr = decoder_csr(latents, latents_csr, grad_support)?;
    // Differentiate into `pre` when the sparse path runs on the selection's own CSR (decoder_csr
    // hands back a given CSR unchanged, or None when it is too dense); the latents' tensor is
    // then never built.
    let dense;
    let input = match of_pre {
        Some(port) if given_csr && csr.is_some() && grad_support.is_none() => Input::Port(port),
        _ => {
            dense = latents.tensor()?.contiguous()?;
            Input::Latents(&dense)
        }
    };
    let (term, csr) = match (mono, csr) {
        (Some(term), Some(csr)) => (term, csr),
        (mono, csr) => {
            // No MonoLoss, or latents too dense to fuse it: the MonoLoss is its own node.
            let (output, latents_csr) = apply_support_matmul(input, w, grad_support, csr, None)?;
            let mono =
                mono.map(|term| unfused_mono(latents.tensor()?, term, grad_support, kernels));
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
        apply_support_matmul(input, w, grad_support, Some(csr), Some(injection))?;
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
