//! The entries of a product x · wᵀ + bias above per-column cuts, bit for bit as the f32 GEMM
//! computes them, without computing most of them in f32.
//!
//! An AMX bf16 product (`amx`) estimates every entry at many times the f32 rate. A rigorous
//! bound on the estimate's error (bf16 rounding of both operands, f32 sums, via Cauchy–Schwarz
//! on the rows' and columns' norms) rules out the entries that cannot pass their cut. The rest
//! are recomputed in f32 by the same chain of operations the `gemm` crate runs for that entry
//! — fused multiply-adds in contraction order, in the crate's contraction chunks, chunks added
//! in order, then the bias — so each value, and each comparison with a cut, is the GEMM's own.
//! The chunk length is found by comparing against the crate on a probe product; when nothing
//! matches (another crate version or kernel), the screen is not used.
//!
//! Candidates are recomputed sixteen to a vector, each lane its own entry's chain; a tile of 16
//! rows × 1 column holding several candidates runs whole, its rows in the lanes. Either way the
//! screen pays when few entries pass (sparse activations).

use std::collections::BTreeMap;
use std::sync::Mutex;

use rayon::prelude::*;

use crate::base::amx::{self, Tiles, GROUP, STEP};
use crate::base::gemm::{gemm_f32_plus_row, splits_contraction, Strided};
use crate::base::simd::vectorized;
use crate::base::sparse::KeptBlock;

/// Smaller products stay with the f32 GEMM (and the crate's small-product kernels, whose
/// chunking differs).
const MIN_ROWS: usize = 128;
const MIN_COLUMNS: usize = 128;
/// Columns per task: eight groups of 16.
const TASK_COLUMNS: usize = 8 * GROUP;

/// Whether the screen runs for a product of these dimensions on this machine.
fn applies(rows: usize, columns: usize, k: usize) -> bool {
    rows >= MIN_ROWS && columns >= MIN_COLUMNS && k > 0 && amx::available() && chunk(k).is_some()
}

/// What the screen needs of the rhs w (n × k), prepared once for many products with it.
pub struct Prepared {
    k: usize,
    n: usize,
    chunk: usize,
    /// bf16 groups (`amx::pack_columns`), padded to whole tasks.
    packed: Vec<u16>,
    norms: Norms,
}

impl Prepared {
    /// None when the screen cannot run for w on this machine (no AMX, too few columns, or the
    /// GEMM's chunking not found).
    pub fn new(w: &[f32], k: usize) -> Option<Self> {
        let n = w.len() / k.max(1);
        if !applies(MIN_ROWS, n, k) {
            return None;
        }
        let groups = n.div_ceil(TASK_COLUMNS) * TASK_COLUMNS / GROUP;
        let kp = k.div_ceil(STEP) * STEP;
        Some(Self {
            k,
            n,
            chunk: chunk(k)?,
            packed: amx::pack_columns(w, k, groups, kp),
            norms: norms(w, k),
        })
    }
}

/// How an entry passes its cut.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// value > cut.
    Above,
    /// value ≥ cut.
    AtLeast,
}

/// The entries (i, j) of x · wᵀ + bias with value > cuts[j], for x (rows × k, row-major) and
/// the w (n × k) that `prepared` was made from: what `gemm_f32_plus_row_blocks`' output holds
/// above the cuts, bit for bit, as blocks of columns in order. None for too few rows.
pub fn entries_above(
    x: &[f32],
    w: &[f32],
    prepared: &Prepared,
    bias: &[f32],
    cuts: &[f32],
) -> Option<Vec<KeptBlock>> {
    let rows = RowOperands::new(x, prepared)?;
    assert!(cuts.len() == prepared.n, "screen: {} cuts for {} columns", cuts.len(), prepared.n);
    Some(screen(&rows, w, prepared, bias, cuts, Rule::Above))
}

/// Candidates for the `n` largest positive entries of the whole product x · wᵀ + bias (a
/// BatchTopK selection): a set of entries, with their exact values (the GEMM's bits), that holds
/// every positive entry no smaller than the n-th largest — all positive entries when fewer than
/// n are — and few others. As blocks of columns in order; None for too few rows.
///
/// A cut near the n-th largest value is guessed from the estimates of rows spread over the
/// batch; the pass keeps the entries whose exact value reaches it. Every entry that does is
/// among them (its estimate's upper bound reaches the cut too), so n or more kept entries hold
/// the n largest. Fewer (the guess was too high) and the pass runs again with a lower cut, at
/// last with none.
pub fn batch_candidates(
    x: &[f32],
    w: &[f32],
    prepared: &Prepared,
    bias: &[f32],
    n: usize,
) -> Option<Vec<KeptBlock>> {
    let rows = RowOperands::new(x, prepared)?;
    let sampled = rows.view(SAMPLE_STRIDE);
    let mut sample = sample_estimates(&sampled, w, prepared, bias);
    let fraction = sampled.rows_read() as f64 / rows.count as f64;
    // The n-th largest's expected rank in the sample, with a margin of 15 % and 64: the count
    // in the sample varies by about its square root (≈ 1 % at 131,072 of 2,048 × 8,192
    // entries, a sixteenth sampled), and the estimates' errors widen the tail a little. A
    // guess too high costs a second pass (6 % did, now and then); too low, candidates that
    // will not be kept.
    let mut rank = (1.15 * n as f64 * fraction).ceil() as usize + 64;
    loop {
        if n == 0 || rank >= sample.len() {
            // No cut: every positive entry is a candidate.
            let zeros = vec![0f32; prepared.n];
            return Some(screen(&rows, w, prepared, bias, &zeros, Rule::Above));
        }
        let (_, &mut cut, _) = sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a));
        let cuts = vec![cut; prepared.n];
        let blocks = screen(&rows, w, prepared, bias, &cuts, Rule::AtLeast);
        if blocks.iter().map(|b| b.columns.len()).sum::<usize>() >= n {
            return Some(blocks);
        }
        #[cfg(test)]
        WIDENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rank *= 4;
    }
}

/// Candidates recomputed in lanes and whole tiles recomputed (for tests).
#[cfg(test)]
static RECOMPUTED: [std::sync::atomic::AtomicUsize; 2] =
    [std::sync::atomic::AtomicUsize::new(0), std::sync::atomic::AtomicUsize::new(0)];

/// Passes run again with a lower cut (for tests).
#[cfg(test)]
pub static WIDENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The cut's sample: every this many blocks of 32 rows.
const SAMPLE_STRIDE: usize = 16;

/// The screen's side of x.
struct RowOperands {
    count: usize,
    kp: usize,
    /// bf16, rows padded to 32, kp each.
    packed: Vec<u16>,
    /// f32 panels of 16 rows (`row_panels`).
    panels: Vec<f32>,
    norms: Norms,
}

impl RowOperands {
    fn new(x: &[f32], prepared: &Prepared) -> Option<Self> {
        let k = prepared.k;
        let count = x.len() / k;
        assert!(x.len() == count * k, "screen: x is not rows of {k}");
        // A product split along its contraction sums in other chunks than the chain here.
        if count < MIN_ROWS || splits_contraction(count, prepared.n, k) {
            return None;
        }
        let kp = k.div_ceil(STEP) * STEP;
        let padded = count.div_ceil(32) * 32;
        let (packed, panels) = (amx::pack_rows(x, k, padded, kp), row_panels(x, k, padded));
        Some(Self { count, kp, packed, panels, norms: norms(x, k) })
    }

    /// Every `stride`-th block of 32 rows.
    fn view(&self, stride: usize) -> Rows<'_> {
        Rows {
            count: self.count,
            stride,
            side: Side {
                packed: &self.packed,
                norm: &self.norms.value,
                rounding: &self.norms.rounding,
            },
            panels: &self.panels,
        }
    }
}

/// One pass of the screen over all columns: the passing entries (exact) as blocks of columns.
fn screen(
    rows: &RowOperands,
    w: &[f32],
    prepared: &Prepared,
    bias: &[f32],
    cuts: &[f32],
    rule: Rule,
) -> Vec<KeptBlock> {
    let Prepared { k, n, chunk, .. } = *prepared;
    assert!(w.len() == n * k && bias.len() == n, "screen: shapes");
    let (kp, bound) = (rows.kp, Bound::new(k));
    (0..n.div_ceil(TASK_COLUMNS))
        .into_par_iter()
        .map(|task| {
            let cols = prepared.task(task, w, bias, cuts);
            // SAFETY: `Prepared::new` checked AVX-512F (with AMX).
            unsafe { screen_columns(&rows.view(1), &cols, k, kp, chunk, &bound, rule) }
        })
        .collect()
}

impl Prepared {
    /// Task `task`'s columns, given all columns' cuts.
    fn task<'a>(
        &'a self,
        task: usize,
        w: &'a [f32],
        bias: &'a [f32],
        cuts: &'a [f32],
    ) -> Columns<'a> {
        let (k, kp) = (self.k, self.k.div_ceil(STEP) * STEP);
        let first = task * TASK_COLUMNS;
        let width = TASK_COLUMNS.min(self.n - first);
        let part = first..first + width;
        Columns {
            first,
            width,
            side: Side {
                packed: &self.packed[first * kp..(first + TASK_COLUMNS) * kp],
                norm: &self.norms.value[part.clone()],
                rounding: &self.norms.rounding[part.clone()],
            },
            w: &w[first * k..(first + width) * k],
            bias: &bias[part.clone()],
            cuts: &cuts[part],
        }
    }
}

/// The positive estimates (bias included) of the rows `rows` reads, over all columns.
fn sample_estimates(rows: &Rows, w: &[f32], prepared: &Prepared, bias: &[f32]) -> Vec<f32> {
    let n = prepared.n;
    let none = vec![f32::INFINITY; n];
    (0..n.div_ceil(TASK_COLUMNS))
        .into_par_iter()
        .flat_map_iter(|task| {
            let cols = prepared.task(task, w, bias, &none);
            // SAFETY: `Prepared::new` checked AVX-512F (with AMX).
            unsafe { task_estimates(rows, &cols) }
        })
        .collect()
}

/// The operand rows as the screen reads them: blocks of 32 from row 0, every `stride`-th.
struct Rows<'a> {
    count: usize,
    stride: usize,
    /// bf16 rows padded to 32 of them, kp each.
    side: Side<'a>,
    /// f32 panels of 16 rows, contraction-major (`row_panels`).
    panels: &'a [f32],
}

/// One operand as the screen reads it: bf16 for the tiles, and the norms of the bound.
struct Side<'a> {
    packed: &'a [u16],
    norm: &'a [f32],
    rounding: &'a [f32],
}

impl Rows<'_> {
    /// The first rows of the blocks read.
    fn blocks(&self) -> impl Iterator<Item = usize> {
        (0..self.count).step_by(32 * self.stride)
    }

    fn rows_read(&self) -> usize {
        self.blocks().map(|r0| (self.count - r0).min(32)).sum()
    }
}

/// One task's columns.
struct Columns<'a> {
    first: usize,
    width: usize,
    /// bf16 groups (`amx::pack_columns`), TASK_COLUMNS of them padded.
    side: Side<'a>,
    /// f32 rows of w, `width` of them.
    w: &'a [f32],
    bias: &'a [f32],
    cuts: &'a [f32],
}

/// The screen's error bound for contraction length k. With x̂, ŵ the bf16 operands as the
/// tiles read them (values below the smallest normal bf16 read as 0) and δx = x − x̂,
/// δw = w − ŵ (exact in f32): x·w − x̂·ŵ = δx·w + x̂·δw, so by Cauchy–Schwarz
/// |exact − estimate| ≤ ‖δx‖‖w‖ + 1.01‖x‖‖δw‖ + acc·‖x‖‖w‖ + 2⁻²²·|estimate| + tiny,
/// where acc covers the f32 sums of the tiles and of the GEMM (k + 2 roundings each, over
/// Σ|x̂ŵ| ≤ 1.01‖x‖‖w‖), the last two terms the bias additions on both sides and results
/// flushed to zero along the tiles' sums.
struct Bound {
    acc: f32,
    tiny: f32,
}

impl Bound {
    fn new(k: usize) -> Self {
        let k = k as f64;
        let acc = 2.0 * (k + 2.0) * 2f64.powi(-24) * 1.02;
        let tiny = (k + 4.0) * 2f64.powi(-120);
        Self { acc: acc as f32, tiny: tiny as f32 }
    }
}

/// The norms the bound needs of each row of k values: ‖row‖₂ and ‖row − bf16(row)‖₂ (as the
/// tiles read bf16), rounded up: sixteen f32 partial sums of squares (of positive terms, so
/// within a relative k·2⁻²³ of the sum), squares below f32's range adding at most √k·2⁻⁷⁴.
struct Norms {
    value: Vec<f32>,
    rounding: Vec<f32>,
}

fn norms(a: &[f32], k: usize) -> Norms {
    let margin = 1.0 + k as f64 * 2f64.powi(-23) + 2f64.powi(-20);
    let lost = (k as f64).sqrt() * 2f64.powi(-74);
    let up = |s: [f32; 16]| {
        let sum: f64 = s.iter().map(|&v| v as f64).sum();
        (sum.sqrt() * margin + lost) as f32
    };
    let (value, rounding) = a
        .par_chunks(k)
        .map(|row| {
            vectorized!({
                let (mut v, mut r) = ([0f32; 16], [0f32; 16]);
                let whole = row.chunks_exact(16);
                let tail = whole.remainder();
                for chunk in whole {
                    for j in 0..16 {
                        let (x, d) = (chunk[j], chunk[j] - amx::as_read(chunk[j]));
                        v[j] += x * x;
                        r[j] += d * d;
                    }
                }
                for (j, &x) in tail.iter().enumerate() {
                    let d = x - amx::as_read(x);
                    v[j] += x * x;
                    r[j] += d * d;
                }
                (up(v), up(r))
            })
        })
        .unzip();
    Norms { value, rounding }
}

/// x as panels of 16 rows, each k × 16 (element (p, r) = x[16·panel + r][p]); rows past x's
/// are zero.
fn row_panels(x: &[f32], k: usize, padded_rows: usize) -> Vec<f32> {
    let mut out = vec![0f32; padded_rows * k];
    out.par_chunks_mut(16 * k).enumerate().for_each(|(panel, dst)| {
        for r in 0..16 {
            let Some(src) = x.get((panel * 16 + r) * k..(panel * 16 + r + 1) * k) else { break };
            for (p, &v) in src.iter().enumerate() {
                dst[p * 16 + r] = v;
            }
        }
    });
    out
}

/// The contraction chunk of the `gemm` crate's kernels for contraction length k (each entry is
/// a chain of fused multiply-adds over one chunk, chunks added in order), found on a probe
/// product the way `encode_above`'s callers run it; None when no chunk length reproduces it.
pub fn chunk(k: usize) -> Option<usize> {
    static FOUND: Mutex<BTreeMap<usize, Option<usize>>> = Mutex::new(BTreeMap::new());
    if let Some(&c) = FOUND.lock().unwrap().get(&k) {
        return c;
    }
    let found = probe_chunk(k);
    FOUND.lock().unwrap().insert(k, found);
    found
}

fn probe_chunk(k: usize) -> Option<usize> {
    let (rows, cols) = (96, 96);
    let val = |i: usize| {
        let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let x: Vec<f32> = (0..rows * k).map(val).collect();
    let w: Vec<f32> = (0..cols * k).map(|i| val(i + rows * k)).collect();
    let bias: Vec<f32> = (0..cols).map(|j| val(j + 7) * 0.1).collect();
    let (a, b) = (Strided { data: &x, rs: k, cs: 1 }, Strided { data: &w, rs: 1, cs: k });
    let dense = gemm_f32_plus_row(rows, cols, k, a, b, &bias);
    let lengths: Vec<usize> = {
        let mut v: Vec<usize> = (1..=k.min(64)).map(|parts| k.div_ceil(parts)).collect();
        v.dedup();
        v
    };
    lengths.into_iter().find(|&c| {
        (0..rows).all(|i| {
            (0..cols).all(|j| {
                chained(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k], c, bias[j]).to_bits()
                    == dense[i * cols + j].to_bits()
            })
        })
    })
}

/// One entry as the GEMM computes it: fused multiply-adds over each chunk of `chunk`, chunks
/// added in order, then the bias.
pub fn chained(x: &[f32], w: &[f32], chunk: usize, bias: f32) -> f32 {
    let mut total = None;
    for (xs, ws) in x.chunks(chunk).zip(w.chunks(chunk)) {
        let part = xs.iter().zip(ws).fold(0f32, |acc, (&a, &b)| a.mul_add(b, acc));
        total = Some(total.map_or(part, |t: f32| t + part));
    }
    total.unwrap_or(0.0) + bias
}

/// A task's columns as the blocks read them: bias, cut and norms of each of TASK_COLUMNS,
/// padded (padding never passes).
struct Padded {
    biases: Vec<f32>,
    cuts: Vec<f32>,
    norm: Vec<f32>,
    rounding: Vec<f32>,
}

impl Padded {
    fn new(cols: &Columns) -> Self {
        let get = |v: &[f32], pad: f32| {
            (0..TASK_COLUMNS).map(|j| v.get(j).copied().unwrap_or(pad)).collect()
        };
        Self {
            biases: get(cols.bias, 0.0),
            cuts: get(cols.cuts, f32::INFINITY),
            norm: get(cols.side.norm, 0.0),
            rounding: get(cols.side.rounding, 0.0),
        }
    }
}

/// One 32 × 32 block of a task: rows r0.., columns j0.. of the task.
struct Block<'a> {
    /// The tiles' estimates, row-major 32 × 32.
    estimate: &'a [f32],
    r0: usize,
    j0: usize,
}

/// The block's estimates plus the bias and their error bounds (`Bound`), 16 columns at a time:
/// `each(i, half, s, e)` for row i of the block (live rows only) and its columns 16·half...
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bounded(
    block: &Block,
    rows: &Rows,
    cols: &Padded,
    bound: &Bound,
    mut each: impl FnMut(usize, usize, std::arch::x86_64::__m512, std::arch::x86_64::__m512),
) {
    use std::arch::x86_64::*;
    let (acc, tiny) = (_mm512_set1_ps(bound.acc), _mm512_set1_ps(bound.tiny));
    let rounding = _mm512_set1_ps(2f32.powi(-22));
    let widen = _mm512_set1_ps(1.01);
    let live = (rows.count - block.r0).min(32);
    for half in 0..2 {
        let j = block.j0 + 16 * half;
        let load = |v: &[f32]| _mm512_loadu_ps(v[j..].as_ptr());
        let (b, nw, dw) = (load(&cols.biases), load(&cols.norm), load(&cols.rounding));
        for i in 0..live {
            let (nx, dx) = (rows.side.norm[block.r0 + i], rows.side.rounding[block.r0 + i]);
            let (nx, dx) = (_mm512_set1_ps(nx), _mm512_set1_ps(dx));
            let s =
                _mm512_add_ps(_mm512_loadu_ps(block.estimate[i * 32 + 16 * half..].as_ptr()), b);
            // ‖δx‖‖w‖ + 1.01‖x‖‖δw‖ + acc‖x‖‖w‖ + 2⁻²²|s| + tiny.
            let e = _mm512_fmadd_ps(_mm512_mul_ps(acc, nx), nw, tiny);
            let e = _mm512_fmadd_ps(dx, nw, e);
            let e = _mm512_fmadd_ps(_mm512_mul_ps(widen, nx), dw, e);
            let e = _mm512_fmadd_ps(rounding, _mm512_abs_ps(s), e);
            each(i, half, s, e);
        }
    }
}

/// The tiles' estimates of one task over the blocks of rows `rows` reads: `each(block)` for
/// every 32 × 32 block, rows outer.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn for_each_block(
    rows: &Rows,
    cols: &Columns,
    kp: usize,
    mut each: impl FnMut(&Block),
    mut after_rows: impl FnMut(usize),
) {
    let tiles = Tiles::configured();
    let mut estimate = vec![0f32; 32 * 32];
    let group_len = kp * GROUP;
    for r0 in rows.blocks() {
        for j0 in (0..cols.width).step_by(32) {
            let pair = j0 / 32;
            let g0 = &cols.side.packed[(2 * pair) * group_len..][..group_len];
            let g1 = &cols.side.packed[(2 * pair + 1) * group_len..][..group_len];
            tiles.block_32x32(
                &rows.side.packed[r0 * kp..(r0 + 32) * kp],
                kp,
                g0,
                g1,
                &mut estimate,
            );
            each(&Block { estimate: &estimate, r0, j0 });
        }
        after_rows(r0);
    }
}

/// One task: for each 32 rows, the tiles' estimates of its columns, the bound, and the exact
/// values of the 16-row tiles that hold a candidate; then the passing entries row by row.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
unsafe fn screen_columns(
    rows: &Rows,
    cols: &Columns,
    k: usize,
    kp: usize,
    chunk: usize,
    bound: &Bound,
    rule: Rule,
) -> KeptBlock {
    use std::arch::x86_64::*;
    let mut kept = KeptBlock { offsets: vec![0], columns: Vec::new(), values: Vec::new() };
    // Kept values of 32 rows × TASK_COLUMNS.
    let mut values = vec![0f32; 32 * TASK_COLUMNS];
    let padded = Padded::new(cols);
    // Columns past the task's width are never candidates (a NaN bound would make them).
    let valid = if cols.width >= 128 { u128::MAX } else { (1u128 << cols.width) - 1 };
    // An infinite estimate bounds nothing: a candidate too.
    let max = _mm512_set1_ps(f32::MAX);
    // Candidates of the current 32 rows: bit j of `candidates[i]` = column j of row r0 + i.
    let candidates = std::cell::Cell::new([0u128; 32]);
    let on_block = |block: &Block| {
        let mut found = candidates.get();
        bounded(block, rows, &padded, bound, |i, half, s, e| {
            let c = _mm512_loadu_ps(padded.cuts[block.j0 + 16 * half..].as_ptr());
            let upper = _mm512_add_ps(s, e);
            // A candidate unless its upper bound fails (a NaN is a candidate).
            let m = match rule {
                Rule::Above => _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(upper, c),
                Rule::AtLeast => _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(upper, c),
            } | _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(_mm512_abs_ps(s), max);
            found[i] |= (m as u128) << (block.j0 + 16 * half);
        });
        candidates.set(found);
    };
    let by_step = transposed(cols.w, cols.width, k);
    let mut lanes = Vec::new();
    let after_rows = |r0: usize| {
        let mut found = candidates.take();
        let live = (rows.count - r0).min(32);
        for bits in &mut found[live..] {
            *bits = 0;
        }
        let mut keep = [0u128; 32];
        let mut record = |i: usize, j: usize, value: f32| {
            let passes = match rule {
                Rule::Above => value > padded.cuts[j],
                Rule::AtLeast => value >= padded.cuts[j],
            };
            if i < live && passes {
                keep[i] |= 1u128 << j;
                values[i * TASK_COLUMNS + j] = value;
            }
        };
        // Columns with several candidates among a tile's 16 rows: the whole tile at once.
        for half in 0..2 {
            let tile = &mut found[16 * half..16 * half + 16];
            let mut bits = crowded(tile) & valid;
            if bits == 0 {
                continue;
            }
            for row in tile.iter_mut() {
                *row &= !bits;
            }
            let panel = &rows.panels[(r0 / 16 + half) * 16 * k..][..16 * k];
            let mut exact = [[0f32; 16]; 16];
            while bits != 0 {
                // Up to sixteen columns at once: independent chains keep the FMA units busy.
                let mut batch = [0usize; 16];
                let mut count = 0;
                while bits != 0 && count < 16 {
                    batch[count] = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    count += 1;
                }
                let columns = &batch[..count];
                #[cfg(test)]
                RECOMPUTED[1].fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                exact_tiles(panel, cols.w, (k, chunk), columns, &padded.biases, &mut exact);
                for (&j, v) in columns.iter().zip(&exact) {
                    for (r, &value) in v.iter().enumerate() {
                        record(16 * half + r, j, value);
                    }
                }
            }
        }
        // The other candidates one by one, sixteen to a vector.
        lanes.clear();
        group_lanes(&found, valid, &mut lanes);
        let panels = &rows.panels[r0 * k..][..32 * k];
        for batch in lanes.chunks(MAX_GROUPS) {
            let mut exact = [[0f32; 16]; MAX_GROUPS];
            #[cfg(test)]
            RECOMPUTED[0].fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
            exact_lanes(panels, &by_step, (k, chunk), batch, &padded.biases, &mut exact);
            for (group, v) in batch.iter().zip(&exact) {
                let entries = group.rows.iter().zip(&group.columns).zip(v);
                for ((&i, &j), &value) in entries.take(group.len) {
                    record(i as usize, 32 * group.span + j as usize, value);
                }
            }
        }
        for (i, &bits) in keep[..live].iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let j = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                kept.columns.push((cols.first + j) as u32);
                kept.values.push(values[i * TASK_COLUMNS + j]);
            }
            kept.offsets.push(kept.columns.len());
        }
    };
    for_each_block(rows, cols, kp, on_block, after_rows);
    kept
}

/// The positive estimates (bias included) of one task over the rows `rows` reads.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
unsafe fn task_estimates(rows: &Rows, cols: &Columns) -> Vec<f32> {
    use std::arch::x86_64::*;
    let padded = Padded::new(cols);
    let bound = Bound { acc: 0.0, tiny: 0.0 };
    let kp = cols.side.packed.len() / TASK_COLUMNS;
    let mut out = Vec::new();
    let on_block = |block: &Block| {
        bounded(block, rows, &padded, &bound, |_, half, s, _| {
            // The positive estimates of the live columns, packed to the front of `v`.
            let width = cols.width.saturating_sub(block.j0 + 16 * half).min(16);
            let live = ((1u32 << width) - 1) as u16;
            let keep = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(live, s, _mm512_setzero_ps());
            let mut v = [0f32; 16];
            _mm512_mask_compressstoreu_ps(v.as_mut_ptr().cast(), keep, s);
            out.extend_from_slice(&v[..keep.count_ones() as usize]);
        })
    };
    for_each_block(rows, cols, kp, on_block, |_| {});
    out
}

/// Candidates a tile (16 rows × 1 column) needs before it is recomputed whole rather than
/// entry by entry: a whole tile costs about as much as four entries in lanes.
const CROWDED: usize = 4;

/// The columns with at least `CROWDED` candidates among the rows' candidate bits.
fn crowded(rows: &[u128]) -> u128 {
    // Bit-sliced counts saturating at CROWDED: at_least[c] = columns seen more than c times.
    let mut at_least = [0u128; CROWDED];
    for &row in rows {
        for c in (1..CROWDED).rev() {
            at_least[c] |= at_least[c - 1] & row;
        }
        at_least[0] |= row;
    }
    at_least[CROWDED - 1]
}

/// Groups of `exact_lanes` in flight at once (two index vectors, an accumulator and a total
/// each stay in registers).
const MAX_GROUPS: usize = 6;

/// Up to sixteen entries of a block of 32 rows, all in one span of 32 of the task's columns.
#[derive(Clone, Copy)]
struct LaneGroup {
    /// The block's rows (0..32) and the span's columns (0..32) of the entries, lane by lane.
    rows: [u32; 16],
    columns: [u32; 16],
    span: usize,
    len: usize,
}

/// The candidate entries of `found` (a block's rows' bits over the task's columns, within
/// `valid`) as lane groups, span by span.
fn group_lanes(found: &[u128; 32], valid: u128, out: &mut Vec<LaneGroup>) {
    for span in 0..TASK_COLUMNS / 32 {
        let mut group = LaneGroup { rows: [0; 16], columns: [0; 16], span, len: 0 };
        for (i, &row) in found.iter().enumerate() {
            let mut bits = ((row & valid) >> (32 * span)) as u32;
            while bits != 0 {
                group.rows[group.len] = i as u32;
                group.columns[group.len] = bits.trailing_zeros();
                group.len += 1;
                bits &= bits - 1;
                if group.len == 16 {
                    out.push(group);
                    group.len = 0;
                }
            }
        }
        if group.len > 0 {
            out.push(group);
        }
    }
}

/// A task's columns transposed: value p of column j at p · TASK_COLUMNS + j (columns past the
/// width are zero).
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
unsafe fn transposed(w: &[f32], width: usize, k: usize) -> Vec<f32> {
    use std::arch::x86_64::*;
    assert!(w.len() >= width * k && width <= TASK_COLUMNS);
    let mut out = vec![0f32; k * TASK_COLUMNS];
    for j0 in (0..width).step_by(16) {
        for p0 in (0..k).step_by(16) {
            if j0 + 16 <= width && p0 + 16 <= k {
                let mut r: [__m512; 16] =
                    std::array::from_fn(|j| _mm512_loadu_ps(w.as_ptr().add((j0 + j) * k + p0)));
                transpose_16x16(&mut r);
                for (p, v) in r.into_iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add((p0 + p) * TASK_COLUMNS + j0), v);
                }
            } else {
                for j in j0..(j0 + 16).min(width) {
                    for p in p0..(p0 + 16).min(k) {
                        out[p * TASK_COLUMNS + j] = w[j * k + p];
                    }
                }
            }
        }
    }
    out
}

/// Transposes 16 × 16 values in registers: swapping the off-diagonal blocks of 8, then of 4
/// within them, and so on.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose_16x16(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    for d in [8usize, 4, 2, 1] {
        // Lane l of the upper row keeps its own value where l & d == 0 and takes the lower
        // row's lane l − d elsewhere; the lower row takes the upper's lane l + d, keeps its own.
        let upper: [i32; 16] =
            std::array::from_fn(|l| if l & d == 0 { l as i32 } else { (16 + l - d) as i32 });
        let lower: [i32; 16] =
            std::array::from_fn(|l| if l & d == 0 { (l + d) as i32 } else { (16 + l) as i32 });
        let (upper, lower) =
            (_mm512_loadu_si512(upper.as_ptr().cast()), _mm512_loadu_si512(lower.as_ptr().cast()));
        for i in (0..16).filter(|i| i & d == 0) {
            let (a, b) = (r[i], r[i + d]);
            r[i] = _mm512_permutex2var_ps(a, upper, b);
            r[i + d] = _mm512_permutex2var_ps(a, lower, b);
        }
    }
}

/// `kernel::<N>(args)` for the run-time count `n`, one of the literals: a copy of the kernel
/// per count, each with as many independent chains as it has work, none wasted.
macro_rules! by_count {
    ($n:expr, $kernel:ident $args:tt, $($count:literal)*) => {
        match $n {
            $($count => $kernel::<$count> $args,)*
            n => unreachable!("no kernel for a count of {n}"),
        }
    };
}

/// N vectors of entries, each lane in the GEMM's own order (`chained`): `fma(p, acc)` adds
/// contraction step p to the accumulators, steps in order from zero within each chunk of
/// `chunk`, the chunks' sums added in order. The bias is the caller's.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn chains<const N: usize>(
    k: usize,
    chunk: usize,
    mut fma: impl FnMut(usize, &mut [std::arch::x86_64::__m512; N]),
) -> [std::arch::x86_64::__m512; N] {
    use std::arch::x86_64::*;
    let mut total = [_mm512_setzero_ps(); N];
    let mut start = 0;
    while start < k {
        let end = (start + chunk).min(k);
        let mut acc = [_mm512_setzero_ps(); N];
        for p in start..end {
            fma(p, &mut acc);
        }
        for c in 0..N {
            total[c] = if start == 0 { acc[c] } else { _mm512_add_ps(total[c], acc[c]) };
        }
        start = end;
    }
    total
}

/// The exact values of lane groups (`LaneGroup`) of one block of 32 rows, as the GEMM computes
/// them (`chained`): `out[g][l]` for lane l of group g. Each lane runs its entry's own chain;
/// x comes from the block's two panels and w from the task's `transposed` columns.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
unsafe fn exact_lanes(
    panels: &[f32],
    transposed: &[f32],
    (k, chunk): (usize, usize),
    groups: &[LaneGroup],
    biases: &[f32],
    out: &mut [[f32; 16]; MAX_GROUPS],
) {
    assert!(panels.len() >= 32 * k && transposed.len() >= k * TASK_COLUMNS);
    assert!(biases.len() >= TASK_COLUMNS && groups.iter().all(|g| g.span < TASK_COLUMNS / 32));
    by_count!(
        groups.len(),
        exact_groups(panels, transposed, (k, chunk), groups, biases, out),
        1 2 3 4 5 6
    )
}

/// `exact_lanes` for G groups.
///
/// # Safety
/// As `exact_lanes`, which checked the bounds.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exact_groups<const G: usize>(
    panels: &[f32],
    transposed: &[f32],
    (k, chunk): (usize, usize),
    groups: &[LaneGroup],
    biases: &[f32],
    out: &mut [[f32; 16]; MAX_GROUPS],
) {
    use std::arch::x86_64::*;
    let index = |v: &[u32; 16]| _mm512_loadu_si512(v.as_ptr().cast());
    let rows: [__m512i; G] = std::array::from_fn(|g| index(&groups[g].rows));
    let columns: [__m512i; G] = std::array::from_fn(|g| index(&groups[g].columns));
    let spans: [usize; G] = std::array::from_fn(|g| 32 * groups[g].span);
    let (upper, lower) = (panels.as_ptr(), panels.as_ptr().add(16 * k));
    let w = transposed.as_ptr();
    let total = chains::<G>(k, chunk, |p, acc| {
        let (xa, xb) = (_mm512_loadu_ps(upper.add(p * 16)), _mm512_loadu_ps(lower.add(p * 16)));
        let wp = w.add(p * TASK_COLUMNS);
        for g in 0..G {
            let x = _mm512_permutex2var_ps(xa, rows[g], xb);
            let (wa, wb) =
                (_mm512_loadu_ps(wp.add(spans[g])), _mm512_loadu_ps(wp.add(spans[g] + 16)));
            let wv = _mm512_permutex2var_ps(wa, columns[g], wb);
            acc[g] = _mm512_fmadd_ps(x, wv, acc[g]);
        }
    });
    for g in 0..G {
        let bias: [f32; 16] =
            std::array::from_fn(|l| biases[spans[g] + groups[g].columns[l] as usize]);
        let v = _mm512_add_ps(total[g], _mm512_loadu_ps(bias.as_ptr()));
        _mm512_storeu_ps(out[g].as_mut_ptr(), v);
    }
}

/// The exact values of 16 rows (a panel of `row_panels`) × the given columns (at most 16) of
/// w, as the GEMM computes them (`chained`): `out[c][r]` for column c and row r.
///
/// # Safety
/// AVX-512F is available; the panel holds 16·k values and each column is a row of w.
#[target_feature(enable = "avx512f")]
unsafe fn exact_tiles(
    panel: &[f32],
    w: &[f32],
    (k, chunk): (usize, usize),
    columns: &[usize],
    biases: &[f32],
    out: &mut [[f32; 16]; 16],
) {
    assert!(panel.len() >= 16 * k && columns.iter().all(|&c| (c + 1) * k <= w.len()));
    by_count!(
        columns.len(),
        exact_columns(panel, w, (k, chunk), columns, biases, out),
        1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
    )
}

/// `exact_tiles` for N columns.
///
/// # Safety
/// As `exact_tiles`, which checked the bounds.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exact_columns<const N: usize>(
    panel: &[f32],
    w: &[f32],
    (k, chunk): (usize, usize),
    columns: &[usize],
    biases: &[f32],
    out: &mut [[f32; 16]; 16],
) {
    use std::arch::x86_64::*;
    let rows: [*const f32; N] = std::array::from_fn(|c| w.as_ptr().add(columns[c] * k));
    let x = panel.as_ptr();
    let total = chains::<N>(k, chunk, |p, acc| {
        let xv = _mm512_loadu_ps(x.add(p * 16));
        for c in 0..N {
            acc[c] = _mm512_fmadd_ps(xv, _mm512_set1_ps(*rows[c].add(p)), acc[c]);
        }
    });
    for c in 0..N {
        let v = _mm512_add_ps(total[c], _mm512_set1_ps(biases[columns[c]]));
        _mm512_storeu_ps(out[c].as_mut_ptr(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// The f32 GEMM's row-major x · wᵀ + bias.
    fn dense_rows(x: &[f32], w: &[f32], bias: &[f32], k: usize, rows: usize, n: usize) -> Vec<f32> {
        let (a, b) = (Strided { data: x, rs: k, cs: 1 }, Strided { data: w, rs: 1, cs: k });
        gemm_f32_plus_row(rows, n, k, a, b, bias)
    }

    /// What the screen must reproduce: the dense GEMM's entries above their cuts.
    fn dense_entries(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        k: usize,
        cuts: &[f32],
    ) -> Vec<Vec<(u32, u32)>> {
        let (rows, n) = (x.len() / k, cuts.len());
        let dense = dense_rows(x, w, bias, k, rows, n);
        (0..rows)
            .map(|i| {
                (0..n)
                    .filter(|&j| dense[i * n + j] > cuts[j])
                    .map(|j| (j as u32, dense[i * n + j].to_bits()))
                    .collect()
            })
            .collect()
    }

    fn screened(blocks: &[KeptBlock], rows: usize) -> Vec<Vec<(u32, u32)>> {
        let csr = KeptBlock::merge(blocks, rows);
        (0..rows)
            .map(|i| {
                let e = csr.row_offsets[i]..csr.row_offsets[i + 1];
                csr.columns[e.clone()]
                    .iter()
                    .zip(&csr.values[e])
                    .map(|(&c, v)| (c, v.to_bits()))
                    .collect()
            })
            .collect()
    }

    /// Bit for bit the GEMM's kept entries: shapes with partial row and column blocks and a
    /// contraction that is no multiple of the tiles' step, cuts that keep few and many
    /// entries, cuts equal to kept values (not kept: strictly above), infinite and NaN cuts.
    #[test]
    fn screened_entries_equal_the_gemms() {
        if !amx::available() {
            eprintln!("skipped: no AMX bf16 on this machine");
            return;
        }
        let val = |i: usize, s: f32| ((i as f32 * 0.7 + s).sin() * 43758.547).fract() - 0.5;
        for (rows, n, k) in [(128, 128, 32), (203, 300, 100), (300, 517, 768), (130, 129, 7)] {
            let x: Vec<f32> = (0..rows * k).map(|i| val(i, 0.3)).collect();
            let w: Vec<f32> = (0..n * k).map(|i| val(i, 1.9)).collect();
            let bias: Vec<f32> = (0..n).map(|j| val(j, 4.1) * 0.2).collect();
            let dense = dense_rows(&x, &w, &bias, k, rows, n);
            let mut sorted = dense.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            // Cuts keeping about 1 % (lone candidates: lanes), 10 % (lanes, several groups of a
            // block at once) and half (crowded tiles, run whole).
            let (high, mid) = (sorted[rows * n / 100].max(0.0), sorted[rows * n / 10].max(0.0));
            let cut = |j: usize| [high, mid, 0.0][j % 3];
            let mut cuts: Vec<f32> = (0..n).map(cut).collect();
            cuts[1] = f32::INFINITY;
            cuts[2] = f32::NAN;
            // A cut equal to a value of its column: that entry must not be kept.
            cuts[4] = dense[5 * n + 4];
            // Non-finite operands: an infinite row and a NaN column (never kept, as in the GEMM).
            let (mut x, mut w) = (x, w);
            x[7 * k + 3] = f32::INFINITY;
            w[9 * k + 1] = f32::NAN;
            let prepared = Prepared::new(&w, k).expect("the screen applies");
            let dense = dense_rows(&x, &w, &bias, k, rows, n);
            assert!(dense[7 * n].is_infinite() || dense[7 * n].is_nan());
            let want = dense_entries(&x, &w, &bias, k, &cuts);
            let got = screened(&entries_above(&x, &w, &prepared, &bias, &cuts).unwrap(), rows);
            assert_eq!(got, want, "{rows}×{n}×{k}");
            assert!(want.iter().map(Vec::len).sum::<usize>() > rows, "keeps something");
            let [lanes, tiles] = RECOMPUTED.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
            assert!(
                lanes > 0 && (tiles > 0 || k == 7),
                "both ways ran: {lanes} lanes, {tiles} tiles"
            );
        }
    }

    #[test]
    fn task_columns_transpose() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for (width, k) in [(128, 768), (100, 37), (16, 16), (3, 5)] {
            let w: Vec<f32> = (0..width * k).map(|i| i as f32).collect();
            // SAFETY: AVX-512F checked above.
            let t = unsafe { transposed(&w, width, k) };
            for p in 0..k {
                for j in 0..TASK_COLUMNS {
                    let want = if j < width { w[j * k + p] } else { 0.0 };
                    assert_eq!(t[p * TASK_COLUMNS + j], want, "{width}×{k} at ({p}, {j})");
                }
            }
        }
    }

    #[test]
    fn crowded_columns_have_four_candidates() {
        let rows = [0b1111u128, 0b0111, 0b0011, 0b0001, 1 << 100, 1 << 100, 1 << 100];
        assert_eq!(crowded(&rows), 0b0001);
        assert_eq!(crowded(&[rows[4]; 4]), 1 << 100);
        assert_eq!(crowded(&[]), 0);
    }

    /// The chunked chain reproduces the GEMM on the probe (what `chunk` checks) at the lengths
    /// an SAE uses.
    #[test]
    fn the_gemms_chunking_is_found() {
        for k in [7, 32, 512, 768, 1024] {
            assert!(chunk(k).is_some(), "k = {k}");
        }
    }
}
