//! Sparse rows (CSR) and the few sparse × dense kernels that keep TopK latents cheap:
//! with k of M latents active, decoding and every weight gradient cost O(nnz·D), not O(B·M·D).
//! All kernels are parallel over disjoint outputs, so results do not depend on thread count.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::base::simd::vectorized;

/// Rows in compressed sparse row form; absent entries are zeros.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseBatch {
    /// Length rows + 1; row i owns entries `row_offsets[i]..row_offsets[i+1]`.
    pub row_offsets: Vec<usize>,
    pub columns: Vec<u32>,
    pub values: Vec<f32>,
}

/// The entries one block of columns keeps, row after row (a thresholded product computed a
/// block of columns at a time).
pub struct KeptBlock {
    /// Row r's entries are `columns[offsets[r]..offsets[r + 1]]` (and the same of `values`);
    /// empty for a block of no latents.
    pub offsets: Vec<usize>,
    pub columns: Vec<u32>,
    pub values: Vec<f32>,
}

impl KeptBlock {
    /// The blocks (in column order) as CSR rows: each row's entries block after block, copied
    /// in parallel over rows.
    pub fn merge(blocks: &[KeptBlock], rows: usize) -> SparseBatch {
        // Row r's entries in a block: none in a block of no latents.
        let span = |block: &KeptBlock, r: usize| match block.offsets.get(r..r + 2) {
            Some(&[a, b]) => a..b,
            _ => 0..0,
        };
        let row_offsets: Vec<usize> = std::iter::once(0)
            .chain((0..rows).scan(0, |at, r| {
                *at += blocks.iter().map(|block| span(block, r).len()).sum::<usize>();
                Some(*at)
            }))
            .collect();
        let nnz = row_offsets[rows];
        let (mut columns, mut values) = (vec![0u32; nnz], vec![0f32; nnz]);
        let per_task = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
        let mut tasks = Vec::new();
        let (mut cols_left, mut vals_left) = (columns.as_mut_slice(), values.as_mut_slice());
        for first in (0..rows).step_by(per_task) {
            let end = (first + per_task).min(rows);
            let len = row_offsets[end] - row_offsets[first];
            let (c, rest_c) = std::mem::take(&mut cols_left).split_at_mut(len);
            let (v, rest_v) = std::mem::take(&mut vals_left).split_at_mut(len);
            (cols_left, vals_left) = (rest_c, rest_v);
            tasks.push((first..end, c, v));
        }
        tasks.into_par_iter().for_each(|(task_rows, cols, vals)| {
            let mut at = 0;
            for r in task_rows {
                for block in blocks {
                    let entries = span(block, r);
                    let n = entries.len();
                    cols[at..at + n].copy_from_slice(&block.columns[entries.clone()]);
                    vals[at..at + n].copy_from_slice(&block.values[entries]);
                    at += n;
                }
            }
        });
        SparseBatch { row_offsets, columns, values }
    }
}

/// A borrowed view of CSR rows.
#[derive(Clone, Copy, Debug)]
pub struct SparseRows<'a> {
    pub row_offsets: &'a [usize],
    pub columns: &'a [u32],
    pub values: &'a [f32],
}

impl SparseRows<'_> {
    pub fn rows(&self) -> usize {
        self.row_offsets.len().saturating_sub(1)
    }

    pub fn nnz(&self) -> usize {
        self.columns.len()
    }
}

/// Column-major (CSC) copy of CSR rows: for each column, its (row, value) entries in row order.
pub struct SparseColumns {
    pub col_offsets: Vec<usize>,
    pub rows: Vec<u32>,
    pub values: Vec<f32>,
    /// Position of each entry in the CSR arrays it came from.
    pub entries: Vec<u32>,
}

impl SparseColumns {
    /// `f(column, csc_entry)` for every entry, in parallel over columns; returns the results in
    /// the *CSR* order of the source rows. Column order keeps a column's dense row (e.g. a
    /// dictionary vector) in cache while the entries' rows are gathered.
    pub fn map_to_rows(&self, f: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
        let n_cols = self.col_offsets.len() - 1;
        let mut by_column = vec![0f32; self.rows.len()];
        let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(n_cols);
        let mut rest = by_column.as_mut_slice();
        for c in 0..n_cols {
            let (head, tail) = rest.split_at_mut(self.col_offsets[c + 1] - self.col_offsets[c]);
            parts.push((c, head));
            rest = tail;
        }
        parts.into_par_iter().with_min_len(16).for_each(|(c, out)| {
            for (slot, j) in out.iter_mut().zip(self.col_offsets[c]..self.col_offsets[c + 1]) {
                *slot = f(c, j);
            }
        });
        let mut out = vec![0f32; by_column.len()];
        for (j, v) in by_column.into_iter().enumerate() {
            out[self.entries[j] as usize] = v;
        }
        out
    }
}

impl SparseBatch {
    /// Entries per column, for `n_cols` columns.
    pub fn column_counts(&self, n_cols: usize) -> Vec<u64> {
        let mut counts = vec![0u64; n_cols];
        self.add_column_counts(&mut counts);
        counts
    }

    /// Adds each column's number of entries to `counts` (one slot per column).
    pub fn add_column_counts(&self, counts: &mut [u64]) {
        self.columns.iter().for_each(|&c| counts[c as usize] += 1);
    }

    /// Keeps the non-zero entries of a dense row-major (rows × cols) matrix.
    pub fn from_dense(dense: &[f32], cols: usize) -> Self {
        Self::from_dense_with(dense, cols, None)
    }

    /// Keeps the non-zero entries, and also the zeros where `extra` (same layout) is true.
    pub fn from_dense_with(dense: &[f32], cols: usize, extra: Option<&[bool]>) -> Self {
        let counts = kept_per_row(dense, cols, extra);
        Self::fill(dense, cols, extra, &counts)
    }

    /// `from_dense_with` when at most `SPARSE_LIMIT` of the entries are kept, else None; one
    /// counting pass decides, so callers need no separate `density` pass.
    pub fn from_dense_if_sparse(
        dense: &[f32],
        cols: usize,
        extra: Option<&[bool]>,
    ) -> Option<Self> {
        let counts = kept_per_row(dense, cols, extra);
        let kept: usize = counts.iter().sum();
        (dense.is_empty() || kept as f64 / dense.len() as f64 <= SPARSE_LIMIT)
            .then(|| Self::fill(dense, cols, extra, &counts))
    }

    /// The CSR arrays, given each row's number of kept entries.
    fn fill(dense: &[f32], cols: usize, extra: Option<&[bool]>, counts: &[usize]) -> Self {
        let cols = cols.max(1);
        let rows = counts.len();
        let mut row_offsets = Vec::with_capacity(rows + 1);
        row_offsets.push(0);
        for c in counts {
            row_offsets.push(row_offsets.last().unwrap() + c);
        }
        let nnz = *row_offsets.last().unwrap();
        let mut columns = vec![0u32; nnz];
        let mut values = vec![0f32; nnz];
        let mut col_parts: Vec<&mut [u32]> = Vec::with_capacity(rows);
        let mut val_parts: Vec<&mut [f32]> = Vec::with_capacity(rows);
        let (mut cs, mut vs) = (columns.as_mut_slice(), values.as_mut_slice());
        for c in counts {
            let (a, rest) = cs.split_at_mut(*c);
            col_parts.push(a);
            cs = rest;
            let (a, rest) = vs.split_at_mut(*c);
            val_parts.push(a);
            vs = rest;
        }
        dense.par_chunks_exact(cols).zip(col_parts).zip(val_parts).enumerate().for_each(
            |(r, ((row, cols_out), vals_out))| {
                let extra_row = extra.map(|x| &x[r * cols..(r + 1) * cols]);
                let mut e = 0;
                vectorized!(for_each_kept(row, extra_row, |j, v| {
                    cols_out[e] = j as u32;
                    vals_out[e] = v;
                    e += 1;
                }))
            },
        );
        SparseBatch { row_offsets, columns, values }
    }

    /// `f(a[i], b[i])` for every i, as a dense row-major (rows × `cols`) matrix, and its
    /// non-zeros: one parallel pass, each row's entries collected while the row is still in
    /// cache (a separate CSR build would read the whole matrix back from memory).
    pub fn map2_with_csr<B: Copy + Sync>(
        a: &[f32],
        b: &[B],
        cols: usize,
        f: impl Fn(f32, B) -> f32 + Sync,
    ) -> (Vec<f32>, SparseBatch) {
        assert_eq!(a.len(), b.len(), "element-wise operands differ in length");
        let rows = a.len().checked_div(cols).unwrap_or(0);
        let mut dense: Vec<f32> = Vec::with_capacity(rows * cols);
        let per_row: Vec<(Vec<u32>, Vec<f32>)> = if cols == 0 {
            vec![Default::default(); rows]
        } else {
            dense.spare_capacity_mut()[..rows * cols]
                .par_chunks_mut(cols)
                .zip(a.par_chunks(cols))
                .zip(b.par_chunks(cols))
                .map(|((out, a), b)| {
                    let (mut c, mut v) = (Vec::new(), Vec::new());
                    let mut collect = |offset: usize, block: &[MaybeUninit<f32>]| {
                        for (j, slot) in block.iter().enumerate() {
                            // SAFETY: the caller wrote the block.
                            let value = unsafe { slot.assume_init() };
                            if value != 0.0 {
                                c.push((offset + j) as u32);
                                v.push(value);
                            }
                        }
                    };
                    // Blocks of 16 as arrays (a fixed length is what lets LLVM vectorise the
                    // map and the test; a slice-chunk loop stayed scalar), written and tested in
                    // registers, scanned only when one of them is non-zero (a few blocks of a
                    // TopK row). The last cols % 16 elements go one by one.
                    let full = cols / 16 * 16;
                    let (out_blocks, out_tail) = out.split_at_mut(full);
                    let blocks = out_blocks
                        .chunks_exact_mut(16)
                        .zip(a.chunks_exact(16))
                        .zip(b.chunks_exact(16));
                    vectorized!(for (i, ((block, a), b)) in blocks.enumerate() {
                        let (a, b): (&[f32; 16], &[B; 16]) =
                            (a.try_into().unwrap(), b.try_into().unwrap());
                        let values: [f32; 16] = std::array::from_fn(|j| f(a[j], b[j]));
                        let non_zero = values.iter().fold(0u32, |n, &x| n + (x != 0.0) as u32);
                        for (slot, &x) in block.iter_mut().zip(&values) {
                            slot.write(x);
                        }
                        if non_zero > 0 {
                            collect(i * 16, block);
                        }
                    });
                    for ((slot, &x), &y) in out_tail.iter_mut().zip(&a[full..]).zip(&b[full..]) {
                        slot.write(f(x, y));
                    }
                    collect(full, out_tail);
                    (c, v)
                })
                .collect()
        };
        // SAFETY: the rows above cover all rows·cols slots and wrote every one.
        unsafe { dense.set_len(rows * cols) };
        let mut row_offsets = Vec::with_capacity(rows + 1);
        row_offsets.push(0);
        let nnz = per_row.iter().map(|(c, _)| c.len()).sum();
        let (mut columns, mut values) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
        for (c, v) in per_row {
            columns.extend_from_slice(&c);
            values.extend_from_slice(&v);
            row_offsets.push(columns.len());
        }
        (dense, SparseBatch { row_offsets, columns, values })
    }

    /// Rows with exactly `k` entries each, e.g. the (indices, values) of a TopK layer.
    pub fn from_fixed_k(indices: Vec<u32>, values: Vec<f32>, k: usize) -> Self {
        let rows = indices.len().checked_div(k).unwrap_or(0);
        SparseBatch { row_offsets: (0..=rows).map(|r| r * k).collect(), columns: indices, values }
    }

    pub fn as_rows(&self) -> SparseRows<'_> {
        SparseRows { row_offsets: &self.row_offsets, columns: &self.columns, values: &self.values }
    }

    pub fn rows(&self) -> usize {
        self.as_rows().rows()
    }

    pub fn nnz(&self) -> usize {
        self.columns.len()
    }

    /// The entries as (value, flat index r·cols + column), row after row (in flat-index order
    /// when each row's columns increase).
    pub fn flat_entries(&self, cols: usize) -> Vec<(f32, u32)> {
        (0..self.rows())
            .flat_map(|r| {
                let e = self.row_offsets[r]..self.row_offsets[r + 1];
                let (columns, values) = (&self.columns[e.clone()], &self.values[e]);
                columns.iter().zip(values).map(move |(&c, &v)| (v, (r * cols) as u32 + c))
            })
            .collect()
    }

    /// Scatters back to a dense (rows × cols) matrix.
    pub fn to_dense(&self, cols: usize) -> Vec<f32> {
        let mut dense = vec![0f32; self.rows() * cols];
        dense.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, out)| {
            for e in self.row_offsets[r]..self.row_offsets[r + 1] {
                out[self.columns[e] as usize] = self.values[e];
            }
        });
        dense
    }

    /// Same support, other values (one per entry); the support is moved, not copied.
    pub fn with_values(self, values: Vec<f32>) -> SparseBatch {
        assert_eq!(values.len(), self.nnz());
        SparseBatch { values, ..self }
    }

    /// The entry-wise sum of batches of the same rows, each with its columns in increasing order
    /// within a row: the union of their entries (columns increasing), a column present in more
    /// than one batch summed in the order given.
    pub fn sum(parts: &[SparseBatch]) -> SparseBatch {
        let (first, rest) = parts.split_first().expect("at least one batch");
        if rest.is_empty() {
            return first.clone();
        }
        let rows = first.rows();
        assert!(rest.iter().all(|p| p.rows() == rows), "sparse sum: row counts differ");
        let mut out = SparseBatch {
            row_offsets: Vec::with_capacity(rows + 1),
            columns: Vec::with_capacity(parts.iter().map(SparseBatch::nnz).sum()),
            values: Vec::with_capacity(parts.iter().map(SparseBatch::nnz).sum()),
        };
        out.row_offsets.push(0);
        let mut cursors = vec![0usize; parts.len()];
        for r in 0..rows {
            parts.iter().zip(&mut cursors).for_each(|(p, c)| *c = p.row_offsets[r]);
            loop {
                // The smallest column left in this row of any part, summed over the parts.
                let next = parts
                    .iter()
                    .zip(&cursors)
                    .filter(|(p, &c)| c < p.row_offsets[r + 1])
                    .map(|(p, &c)| p.columns[c])
                    .min();
                let Some(col) = next else { break };
                let mut value: Option<f32> = None;
                for (p, c) in parts.iter().zip(&mut cursors) {
                    if *c < p.row_offsets[r + 1] && p.columns[*c] == col {
                        value = Some(value.map_or(p.values[*c], |v| v + p.values[*c]));
                        *c += 1;
                    }
                }
                out.columns.push(col);
                out.values.push(value.expect("some part holds the column"));
            }
            out.row_offsets.push(out.columns.len());
        }
        out
    }
}

/// Above this share of non-zeros the dense GEMM is faster than the sparse training kernels.
pub const SPARSE_LIMIT: f64 = 0.1;

/// Share of non-zero entries of a dense slice.
pub fn density(dense: &[f32]) -> f64 {
    if dense.is_empty() {
        return 0.0;
    }
    let kept: usize =
        dense.par_chunks(1 << 14).map(|chunk| vectorized!(kept_in(chunk, None))).sum();
    kept as f64 / dense.len() as f64
}

/// The number of non-zero entries of `values`, or entries where `extra` is set.
#[inline(always)]
fn kept_in(values: &[f32], extra: Option<&[bool]>) -> usize {
    match extra {
        None => values.iter().map(|&v| (v != 0.0) as usize).sum(),
        Some(x) => values.iter().zip(x).map(|(&v, &e)| (v != 0.0 || e) as usize).sum(),
    }
}

/// `f(column, value)` for each kept entry of `row` (see `kept_in`), in column order. Blocks of
/// 16 with nothing kept (most of a TopK row) are skipped after one vectorised test.
#[inline(always)]
fn for_each_kept(row: &[f32], extra: Option<&[bool]>, mut f: impl FnMut(usize, f32)) {
    for (b, block) in row.chunks(16).enumerate() {
        let start = b * 16;
        let extra_block = extra.map(|x| &x[start..start + block.len()]);
        if kept_in(block, extra_block) == 0 {
            continue;
        }
        for (j, &v) in block.iter().enumerate() {
            if v != 0.0 || extra_block.is_some_and(|x| x[j]) {
                f(start + j, v);
            }
        }
    }
}

/// Each row's number of kept entries (see `kept_in`).
fn kept_per_row(dense: &[f32], cols: usize, extra: Option<&[bool]>) -> Vec<usize> {
    let cols = cols.max(1);
    dense
        .par_chunks_exact(cols)
        .enumerate()
        .map(|(r, row)| {
            let extra_row = extra.map(|x| &x[r * cols..(r + 1) * cols]);
            vectorized!(kept_in(row, extra_row))
        })
        .collect()
}

/// CSR → CSC by a counting sort over columns (`n_cols` columns).
pub fn to_columns(a: SparseRows<'_>, n_cols: usize) -> SparseColumns {
    let mut col_offsets = vec![0usize; n_cols + 1];
    for &c in a.columns {
        col_offsets[c as usize + 1] += 1;
    }
    for c in 0..n_cols {
        col_offsets[c + 1] += col_offsets[c];
    }
    let mut rows = vec![0u32; a.nnz()];
    let mut values = vec![0f32; a.nnz()];
    let mut entries = vec![0u32; a.nnz()];
    let mut cursor = col_offsets.clone();
    for r in 0..a.rows() {
        for e in a.row_offsets[r]..a.row_offsets[r + 1] {
            let c = a.columns[e] as usize;
            rows[cursor[c]] = r as u32;
            values[cursor[c]] = a.values[e];
            entries[cursor[c]] = e as u32;
            cursor[c] += 1;
        }
    }
    SparseColumns { col_offsets, rows, values, entries }
}

#[inline(always)]
fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: vectorises and keeps rounding independent of the caller.
    let mut partial = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for j in 0..8 {
            partial[j] += ca[j] * cb[j];
        }
    }
    finish_dot(partial, &a[chunks..], &b[chunks..])
}

/// The end of [`dot`]: its eight partial sums added up, then the products of the tails.
#[inline(always)]
fn finish_dot(partial: [f32; 8], a_tail: &[f32], b_tail: &[f32]) -> f32 {
    let mut s: f32 = partial.iter().sum();
    for (x, y) in a_tail.iter().zip(b_tail) {
        s += x * y;
    }
    s
}

/// (rows × M sparse) · (M × D dense) → rows × D: row i = Σ_e v_e · w[c_e].
pub fn csr_matmul(a: SparseRows<'_>, w: &[f32], d: usize) -> Vec<f32> {
    csr_matmul_then(a, w, d, |_, _| {})
}

/// [`csr_matmul`], then `finish(i, row)` on each output row while its task's rows are in cache.
pub fn csr_matmul_then(
    a: SparseRows<'_>,
    w: &[f32],
    d: usize,
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    gather_rows(a.row_offsets, a.columns, a.values, w, d, finish)
}

/// (rows × M sparse)ᵀ · (rows × D dense) → M × D: row k = Σ_i a_ik · x[i].
pub fn csr_transpose_matmul(a: SparseRows<'_>, x: &[f32], d: usize, m: usize) -> Vec<f32> {
    let cols = to_columns(a, m);
    gather_rows(&cols.col_offsets, &cols.rows, &cols.values, x, d, |_, _| {})
}

/// Most output rows per task of `gather_rows`: a block's source segments are reused across
/// the rows of a task.
const GATHER_MAX_ROWS: usize = 1024;
/// Bytes of a packed source block of `gather_rows`: half of a 2 MiB L2, so that the block stays
/// there beside the output rows and the entries.
const GATHER_BLOCK_BYTES: usize = 1 << 20;

/// out[r] = Σ_e values[e] · src[index[e]] over the entries e of `offsets[r]..offsets[r + 1]`,
/// for `d`-wide rows of `src`, each element summed in entry order from zero; then
/// `finish(r, out[r])` for each row of a task once all its rows are complete.
///
/// Each output row is built a block of columns at a time in registers, walking the row's
/// entries once per block: an axpy over the whole row instead loads and stores the output for
/// every entry, and was 1.6–2× slower. The block is as wide as lets that block of every source
/// row fit in `GATHER_BLOCK_BYTES` (32 columns for 8,192 rows, 128 for 2,048) and no wider
/// than a row (16 at least), and a task that gathers each source row several times copies the
/// block into one contiguous buffer first.
/// In place, the block's segments lie 3 KiB apart (D = 768) and map onto a fraction of the
/// L2's sets, so they were evicted before their reuse: decoding 2,048 rows (k = 64) through an
/// 8,192 × 768 dictionary took 8.5 ms on two threads, packed 5.5 ms. Neither choice changes
/// the arithmetic: one multiply and one add per entry, in entry order, per element.
fn gather_rows(
    offsets: &[usize],
    index: &[u32],
    values: &[f32],
    src: &[f32],
    d: usize,
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let src_rows = src.len() / d.max(1);
    // No wider than a row: a block past the row's end would take the narrow-block path whole.
    let fits = |w: usize| w <= d && src_rows * w * 4 <= GATHER_BLOCK_BYTES;
    let args = Gather { offsets, index, values, src, d };
    if fits(128) {
        args.run::<128>(finish)
    } else if fits(64) {
        args.run::<64>(finish)
    } else if fits(32) {
        args.run::<32>(finish)
    } else {
        args.run::<16>(finish)
    }
}

/// The operands of [`gather_rows`].
struct Gather<'a> {
    offsets: &'a [usize],
    index: &'a [u32],
    values: &'a [f32],
    src: &'a [f32],
    d: usize,
}

impl Gather<'_> {
    /// [`gather_rows`] with `W`-column blocks.
    fn run<const W: usize>(&self, finish: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        let Gather { offsets, index, values, src, d } = *self;
        let rows = offsets.len().saturating_sub(1);
        if d == 0 {
            return Vec::new();
        }
        let src_rows = src.len() / d;
        let per_task = rows.div_ceil(rayon::current_num_threads()).clamp(16, GATHER_MAX_ROWS);
        // Written once, unzeroed: full blocks are stored from registers, a narrower last block
        // is zeroed just before its entries are added into it.
        crate::base::cpu::par_filled(rows * d, per_task * d, |t, block| {
            let first = t * per_task;
            let task_rows = block.len() / d;
            // Packing reads every source row once per full block: worth it when there is one
            // and the task's entries read each source row about twice or more.
            let entries = offsets[first + task_rows] - offsets[first];
            let mut packed =
                if d >= W && entries >= 2 * src_rows { vec![0f32; src_rows * W] } else { vec![] };
            vectorized!({
                for start in (0..d).step_by(W) {
                    if start + W > d {
                        for (r, row) in block.chunks_exact_mut(d).enumerate() {
                            let out = &mut row[start..];
                            out.fill(0.0);
                            for e in offsets[first + r]..offsets[first + r + 1] {
                                let at = index[e] as usize * d + start;
                                axpy(out, values[e], &src[at..at + (d - start)]);
                            }
                        }
                        continue;
                    }
                    let (seg_src, stride, at0) = if packed.is_empty() {
                        (src, d, start)
                    } else {
                        for (p, s) in packed.chunks_exact_mut(W).zip(src.chunks_exact(d)) {
                            p.copy_from_slice(&s[start..start + W]);
                        }
                        (&packed[..], W, 0)
                    };
                    for (r, row) in block.chunks_exact_mut(d).enumerate() {
                        let mut acc = [0f32; W];
                        for e in offsets[first + r]..offsets[first + r + 1] {
                            let at = index[e] as usize * stride + at0;
                            let seg: &[f32; W] =
                                seg_src[at..at + W].try_into().expect("block width");
                            let v = values[e];
                            for (a, &s) in acc.iter_mut().zip(seg) {
                                *a += v * s;
                            }
                        }
                        row[start..start + W].copy_from_slice(&acc);
                    }
                }
            });
            for (r, row) in block.chunks_exact_mut(d).enumerate() {
                finish(first + r, row);
            }
        })
    }
}

/// `f(row, entry)` for every entry of `a`, in parallel over rows; one output per entry.
pub fn map_entries(a: SparseRows<'_>, f: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.nnz()];
    let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(a.rows());
    let mut rest = out.as_mut_slice();
    for r in 0..a.rows() {
        let (head, tail) = rest.split_at_mut(a.row_offsets[r + 1] - a.row_offsets[r]);
        parts.push((r, head));
        rest = tail;
    }
    parts.into_par_iter().for_each(|(r, vals)| {
        for (slot, e) in vals.iter_mut().zip(a.row_offsets[r]..a.row_offsets[r + 1]) {
            *slot = f(r, e);
        }
    });
    out
}

/// For every entry (i, k) of `a`: x[i] · w[k] (x: rows × D, w: M × D), in CSR order.
pub fn csr_sampled_dot(a: SparseRows<'_>, x: &[f32], w: &[f32], d: usize) -> Vec<f32> {
    let m = a.columns.iter().map(|&c| c as usize + 1).max().unwrap_or(0).max(w.len() / d.max(1));
    let cols = to_columns(a, m);
    cols.map_to_rows(|k, j| {
        let i = cols.rows[j] as usize;
        vectorized!(dot(&x[i * d..(i + 1) * d], &w[k * d..(k + 1) * d]))
    })
}

/// Splits a per-entry buffer (CSC order) into one mutable slice per column.
pub fn column_slices<'a, T>(cols: &SparseColumns, buf: &'a mut [T]) -> Vec<&'a mut [T]> {
    let n_cols = cols.col_offsets.len() - 1;
    let mut out = Vec::with_capacity(n_cols);
    let mut rest = buf;
    for c in 0..n_cols {
        let (head, tail) = rest.split_at_mut(cols.col_offsets[c + 1] - cols.col_offsets[c]);
        out.push(head);
        rest = tail;
    }
    out
}

/// Per-entry values in CSC order → CSR order of the source rows.
pub fn to_row_order(cols: &SparseColumns, by_column: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; by_column.len()];
    for (j, &v) in by_column.iter().enumerate() {
        out[cols.entries[j] as usize] = v;
    }
    out
}

/// Latents per task of `decoder_backward`.
const BACKWARD_LATENTS_PER_TASK: usize = 64;
/// Columns of a full block of `decoder_backward`: a block of the (B × D) gradient, packed, is
/// 1 MiB at B = 2,048, so it stays in a 2 MiB L2 while every latent reads its rows.
const BACKWARD_BLOCK: usize = 128;

/// The sparse decoder's backward: for every entry (i, k, v), `dw[k] += v · g[i]` (M × D, each
/// element summed in entry order from zero) and `dots[entry] = dot(g[i], w[k])` (CSC order),
/// the same operations as those loops.
///
/// A block of columns at a time: the block of `g` is packed into one contiguous buffer, then
/// every latent gathers its entries' rows from it, and each entry's eight partial sums of `dot`
/// are kept between blocks. Gathering whole 3 KiB rows of `g` (D = 768) from the L3 instead
/// was memory-bound: 10 ms a step at B = 2,048, k = 64, M = 8,192 on two threads.
pub fn decoder_backward(
    cols: &SparseColumns,
    g: &[f32],
    w: &[f32],
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let m = cols.col_offsets.len() - 1;
    let chunks = d / 8 * 8;
    let mut partial = vec![[0f32; 8]; cols.rows.len()];
    // Unzeroed: the blocks and then the tails write every element.
    let mut dw: Vec<f32> = Vec::with_capacity(m * d);
    for_each_block(g, d, |packed| {
        let block = Block { cols, packed, w, d };
        backward_tasks(cols, &mut dw, &mut partial, d).into_par_iter().for_each(
            |(k0, dw_rows, partial)| match packed.width {
                BACKWARD_BLOCK => block.run::<BACKWARD_BLOCK>(k0, dw_rows, partial),
                _ => block.run::<8>(k0, dw_rows, partial),
            },
        );
    });
    // The last d − chunks columns, entry by entry as `axpy` and `dot` end, and the dots.
    let mut dots = vec![0f32; cols.rows.len()];
    let dot_parts = latent_groups(cols, &mut dots);
    backward_tasks(cols, &mut dw, &mut partial, d).into_par_iter().zip(dot_parts).for_each(
        |((k0, dw_rows, partial), dots)| {
            let first = cols.col_offsets[k0];
            for (dk, k) in dw_rows.chunks_exact_mut(d.max(1)).zip(k0..) {
                let tail = &mut dk[chunks..];
                tail.fill(0.0);
                for j in cols.col_offsets[k]..cols.col_offsets[k + 1] {
                    let gi = &g[cols.rows[j] as usize * d..][chunks..d];
                    axpy(tail, cols.values[j], gi);
                    dots[j - first] =
                        finish_dot(partial[j - first], gi, &w[k * d + chunks..][..d - chunks]);
                }
            }
        },
    );
    // SAFETY: the blocks wrote columns 0..chunks of every row and the tails the rest.
    unsafe { dw.set_len(m * d) };
    (dw, dots)
}

/// Columns start..start + width of every row of g, contiguous (`for_each_block`).
struct Packed<'a> {
    data: &'a [f32],
    start: usize,
    width: usize,
}

impl Packed<'_> {
    /// Row i's W columns of the block.
    #[inline(always)]
    fn row<const W: usize>(&self, i: u32) -> &[f32; W] {
        let at = i as usize * W;
        self.data[at..at + W].try_into().expect("block width")
    }
}

/// The blocked gathers' passes over g (rows × d): `each` block of BACKWARD_BLOCK columns, then
/// of 8, up to the last multiple of 8 (the rest is each caller's tail), packed so that every
/// latent's rows come from one buffer that stays in L2.
fn for_each_block(g: &[f32], d: usize, mut each: impl FnMut(&Packed)) {
    let (rows, chunks) = (g.len().checked_div(d).unwrap_or(0), d / 8 * 8);
    let mut data = Vec::new();
    let mut start = 0;
    while start < chunks {
        let width = if start + BACKWARD_BLOCK <= chunks { BACKWARD_BLOCK } else { 8 };
        data.clear();
        data.resize(rows * width, 0f32);
        data.par_chunks_mut(width).enumerate().with_min_len(64).for_each(|(i, out)| {
            out.copy_from_slice(&g[i * d + start..][..width]);
        });
        each(&Packed { data: &data, start, width });
        start += width;
    }
}

/// Eight partial sums of a [`dot`], carried over W more columns as `dot` adds them. By value:
/// one vector register, not eight scalars stored back each time.
#[inline(always)]
fn dot_step<const W: usize>(p: [f32; 8], a: &[f32; W], b: &[f32; W]) -> [f32; 8] {
    let mut p = p;
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        p = std::array::from_fn(|l| p[l] + ca[l] * cb[l]);
    }
    p
}

/// What [`csc_self_gram`] gives for the sums s_k of the latents' entries.
pub struct SelfGram {
    /// g[i] · s_k for every entry (i, k), in CSC order.
    pub dots: Vec<f32>,
    /// s_k · s_k for every latent.
    pub squares: Vec<f32>,
    /// base · s_k for every latent.
    pub with_base: Vec<f32>,
}

/// For every latent k: s_k = Σ v · g[i] over its entries (i, k) with values `values` (CSC
/// order), in entry order from zero, then s_k += shift_k · base where shift_k ≠ 0; and the dots
/// of s_k with its entries' rows, itself and `base`, each as [`dot`] sums it. The same
/// operations as loops of `axpy`, that shift and [`dot`]s against the sums, without writing the
/// (M × D) sums: each block of columns of s_k is dotted while it is in registers.
pub fn csc_self_gram(
    cols: &SparseColumns,
    values: &[f32],
    g: &[f32],
    shifts: &[f32],
    base: &[f32],
    d: usize,
) -> SelfGram {
    let m = cols.col_offsets.len() - 1;
    assert!(values.len() == cols.rows.len() && shifts.len() == m && base.len() == d);
    let chunks = d / 8 * 8;
    // Per entry, and per latent (with itself, with base): eight partial sums of each dot.
    let mut entry_partial = vec![[0f32; 8]; cols.rows.len()];
    let mut latent_partial = vec![[[0f32; 8]; 2]; m];
    let per = BACKWARD_LATENTS_PER_TASK;
    for_each_block(g, d, |packed| {
        let block = GramBlock { cols, values, packed, shifts, base };
        latent_groups(cols, &mut entry_partial)
            .into_par_iter()
            .zip(latent_partial.par_chunks_mut(per))
            .enumerate()
            .for_each(|(t, (entries, latents))| match packed.width {
                BACKWARD_BLOCK => block.run::<BACKWARD_BLOCK>(t * per, entries, latents),
                _ => block.run::<8>(t * per, entries, latents),
            });
    });
    // The last d − chunks columns, element by element as the loops end, and the totals.
    let mut gram = SelfGram {
        dots: vec![0f32; cols.rows.len()],
        squares: vec![0f32; m],
        with_base: vec![0f32; m],
    };
    let base_tail = &base[chunks..];
    latent_groups(cols, &mut gram.dots)
        .into_par_iter()
        .zip(latent_groups(cols, &mut entry_partial))
        .zip(gram.squares.par_chunks_mut(per).zip(gram.with_base.par_chunks_mut(per)))
        .zip(latent_partial.par_chunks(per))
        .enumerate()
        .for_each(|(t, (((dots, entries), (squares, with_base)), latents))| {
            let first = cols.col_offsets[t * per];
            for (i, k) in (t * per..).take(latents.len()).enumerate() {
                let span = cols.col_offsets[k]..cols.col_offsets[k + 1];
                let row = |j: usize| &g[cols.rows[j] as usize * d..][chunks..d];
                let mut tail = [0f32; 8];
                let tail = &mut tail[..d - chunks];
                for j in span.clone() {
                    axpy(tail, values[j], row(j));
                }
                if shifts[k] != 0.0 {
                    axpy(tail, shifts[k], base_tail);
                }
                for j in span {
                    dots[j - first] = finish_dot(entries[j - first], row(j), tail);
                }
                squares[i] = finish_dot(latents[i][0], tail, tail);
                with_base[i] = finish_dot(latents[i][1], base_tail, tail);
            }
        });
    gram
}

/// One block of columns of `csc_self_gram`.
struct GramBlock<'a> {
    cols: &'a SparseColumns,
    values: &'a [f32],
    packed: &'a Packed<'a>,
    shifts: &'a [f32],
    base: &'a [f32],
}

impl GramBlock<'_> {
    /// Columns start..start + W of the latents k0.. whose partial sums are given.
    fn run<const W: usize>(
        &self,
        k0: usize,
        entries: &mut [[f32; 8]],
        latents: &mut [[[f32; 8]; 2]],
    ) {
        let GramBlock { cols, values, packed, shifts, base } = *self;
        let first = cols.col_offsets[k0];
        let base: &[f32; W] = base[packed.start..][..W].try_into().expect("block width");
        let seg = |j: usize| packed.row::<W>(cols.rows[j]);
        vectorized!(for (latent, k) in latents.iter_mut().zip(k0..) {
            let span = cols.col_offsets[k]..cols.col_offsets[k + 1];
            let mut sum = [0f32; W];
            for j in span.clone() {
                let v = values[j];
                for (a, &x) in sum.iter_mut().zip(seg(j)) {
                    *a += v * x;
                }
            }
            let shift = shifts[k];
            if shift != 0.0 {
                for (a, &x) in sum.iter_mut().zip(base) {
                    *a += shift * x;
                }
            }
            for j in span {
                entries[j - first] = dot_step(entries[j - first], seg(j), &sum);
            }
            *latent = [dot_step(latent[0], &sum, &sum), dot_step(latent[1], base, &sum)];
        })
    }
}

/// A task of `decoder_backward`: its first latent, their rows of dw, their entries' partial
/// sums.
type BackwardTask<'a> = (usize, &'a mut [f32], &'a mut [[f32; 8]]);

/// `decoder_backward`'s tasks.
fn backward_tasks<'a>(
    cols: &SparseColumns,
    dw: &'a mut Vec<f32>,
    partial: &'a mut [[f32; 8]],
    d: usize,
) -> Vec<BackwardTask<'a>> {
    let m = cols.col_offsets.len() - 1;
    let slots = &mut dw.spare_capacity_mut()[..m * d];
    // SAFETY: f32 has no invalid bit patterns; callers write elements before anything reads
    // them (each block its columns, the tails theirs) and read only what they wrote.
    let slots = unsafe { &mut *(slots as *mut [MaybeUninit<f32>] as *mut [f32]) };
    let per = BACKWARD_LATENTS_PER_TASK;
    slots
        .chunks_mut((per * d).max(1))
        .zip(latent_groups(cols, partial))
        .enumerate()
        .map(|(t, (dw_rows, partial))| (t * per, dw_rows, partial))
        .collect()
}

/// A per-entry buffer (CSC order) split into the entries of each `decoder_backward` task.
fn latent_groups<'a, T>(cols: &SparseColumns, buf: &'a mut [T]) -> Vec<&'a mut [T]> {
    let m = cols.col_offsets.len() - 1;
    let mut rest = buf;
    (0..m)
        .step_by(BACKWARD_LATENTS_PER_TASK)
        .map(|k0| {
            let k1 = (k0 + BACKWARD_LATENTS_PER_TASK).min(m);
            let (head, tail) =
                std::mem::take(&mut rest).split_at_mut(cols.col_offsets[k1] - cols.col_offsets[k0]);
            rest = tail;
            head
        })
        .collect()
}

/// One block of columns of `decoder_backward`.
struct Block<'a> {
    cols: &'a SparseColumns,
    packed: &'a Packed<'a>,
    w: &'a [f32],
    d: usize,
}

impl Block<'_> {
    /// Columns start..start + W of the latents k0.. whose dw rows and entries' partial sums
    /// are given.
    fn run<const W: usize>(&self, k0: usize, dw_rows: &mut [f32], partial: &mut [[f32; 8]]) {
        let Block { cols, packed, w, d } = *self;
        let (first, start) = (cols.col_offsets[k0], packed.start);
        vectorized!(for (dk, k) in dw_rows.chunks_exact_mut(d).zip(k0..) {
            let wk: &[f32; W] = w[k * d + start..][..W].try_into().expect("block width");
            let mut acc = [0f32; W];
            for j in cols.col_offsets[k]..cols.col_offsets[k + 1] {
                let seg = packed.row::<W>(cols.rows[j]);
                let v = cols.values[j];
                for (a, &x) in acc.iter_mut().zip(seg) {
                    *a += v * x;
                }
                partial[j - first] = dot_step(partial[j - first], seg, wk);
            }
            dk[start..start + W].copy_from_slice(&acc);
        })
    }
}

/// Per-column sums of the entries.
pub fn csr_column_sums(a: SparseRows<'_>, m: usize) -> Vec<f32> {
    let mut sums = vec![0f32; m];
    for (&c, &v) in a.columns.iter().zip(a.values) {
        sums[c as usize] += v;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    /// A sparse sum equals the dense sum, entries of every part kept (explicit zeros too).
    #[test]
    fn sparse_sums_equal_dense_sums() {
        let (rows, cols) = (6, 9);
        let a: Vec<f32> =
            (0..rows * cols).map(|i| if i % 3 == 0 { i as f32 } else { 0.0 }).collect();
        let b: Vec<f32> = (0..rows * cols)
            .map(|i| if i % 4 == 1 || i % 6 == 0 { 0.5 - i as f32 } else { 0.0 })
            .collect();
        let (sa, sb) = (SparseBatch::from_dense(&a, cols), SparseBatch::from_dense(&b, cols));
        let sum = SparseBatch::sum(&[sa.clone(), sb.clone()]);
        let dense: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(sum.to_dense(cols), dense);
        let union = (0..rows * cols).filter(|&i| a[i] != 0.0 || b[i] != 0.0).count();
        assert_eq!(sum.nnz(), union);
        assert!(sum
            .row_offsets
            .windows(2)
            .all(|w| { sum.columns[w[0]..w[1]].windows(2).all(|c| c[0] < c[1]) }));
        assert_eq!(SparseBatch::sum(std::slice::from_ref(&sa)), sa);
        // An explicit zero stays an entry.
        let nnz = sa.nnz();
        let zero = sa.with_values(vec![0.0; nnz]);
        assert_eq!(SparseBatch::sum(&[zero, sb.clone()]).nnz(), union);
    }

    /// The register-blocked gather equals a per-element sum in entry order bit for bit, across
    /// full column blocks, a partial last block, empty rows and more rows than one task holds.
    /// Both products of the decoder's backward against plain loops, bit for bit (each dw row
    /// summed in entry order from zero, each dot as `dot` sums it), the allocator holding NaNs
    /// before (dw is not zero-filled up front), latents without entries included.
    #[test]
    fn decoder_backward_equals_plain_loops_on_unzeroed_memory() {
        // Narrow blocks and a tail only; two full blocks, narrow ones and a tail over tasks of
        // several latents.
        check_decoder_backward(50, 23, 37);
        check_decoder_backward(40, 2 * BACKWARD_LATENTS_PER_TASK + 7, 2 * BACKWARD_BLOCK + 29);
    }

    fn check_decoder_backward(rows: usize, m: usize, d: usize) {
        let mut dense = vec![0f32; rows * m];
        for (i, v) in dense.iter_mut().enumerate() {
            if (i * 7) % 5 == 0 && (i % m) % 4 != 3 {
                *v = (i as f32 * 0.31).sin();
            }
        }
        let a = SparseBatch::from_dense(&dense, m);
        let cols = to_columns(a.as_rows(), m);
        let g: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.17).cos()).collect();
        let w: Vec<f32> = (0..m * d).map(|i| (i as f32 * 0.23).sin()).collect();
        drop(std::hint::black_box(vec![f32::NAN; m * d]));
        let (dw, dots) = decoder_backward(&cols, &g, &w, d);
        let mut want_dw = vec![0f32; m * d];
        let mut want_dots = Vec::new();
        for k in 0..m {
            for j in cols.col_offsets[k]..cols.col_offsets[k + 1] {
                let i = cols.rows[j] as usize;
                for t in 0..d {
                    want_dw[k * d + t] += cols.values[j] * g[i * d + t];
                }
                want_dots.push(dot(&g[i * d..(i + 1) * d], &w[k * d..(k + 1) * d]));
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dw), bits(&want_dw));
        assert_eq!(bits(&dots), bits(&want_dots));
        assert!((0..m).any(|k| cols.col_offsets[k] == cols.col_offsets[k + 1]));
    }

    /// The sums' dots against plain loops, bit for bit: each s_k summed in entry order from
    /// zero, then shifted where its shift is not zero (−0 included), each dot as `dot` sums it;
    /// full and narrow blocks, tails, latents without entries.
    #[test]
    fn self_gram_equals_plain_loops() {
        for (rows, m, d) in [
            (50, 23, 37),
            (40, 2 * BACKWARD_LATENTS_PER_TASK + 7, 2 * BACKWARD_BLOCK + 29),
            (9, 5, 3),
        ] {
            let mut dense = vec![0f32; rows * m];
            for (i, v) in dense.iter_mut().enumerate() {
                if (i * 7) % 5 == 0 && (i % m) % 4 != 3 {
                    *v = (i as f32 * 0.31).sin();
                }
            }
            let cols = to_columns(SparseBatch::from_dense(&dense, m).as_rows(), m);
            let g: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.17).cos()).collect();
            let base: Vec<f32> = (0..d).map(|t| (t as f32 * 0.41).sin()).collect();
            let shifts: Vec<f32> =
                (0..m).map(|k| [0.0, -0.0, 0.25, -1.5][k % 4] * (k as f32 * 0.3).cos()).collect();
            let gram = csc_self_gram(&cols, &cols.values, &g, &shifts, &base, d);
            let (mut dots, mut squares, mut with_base) = (Vec::new(), Vec::new(), Vec::new());
            for (k, &shift) in shifts.iter().enumerate() {
                let mut sum = vec![0f32; d];
                let span = cols.col_offsets[k]..cols.col_offsets[k + 1];
                for j in span.clone() {
                    let i = cols.rows[j] as usize;
                    for t in 0..d {
                        sum[t] += cols.values[j] * g[i * d + t];
                    }
                }
                if shift != 0.0 {
                    for (s, &b) in sum.iter_mut().zip(&base) {
                        *s += shift * b;
                    }
                }
                for j in span {
                    let i = cols.rows[j] as usize;
                    dots.push(dot(&g[i * d..(i + 1) * d], &sum));
                }
                squares.push(dot(&sum, &sum));
                with_base.push(dot(&base, &sum));
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&gram.dots), bits(&dots), "{rows}×{m}×{d}");
            assert_eq!(bits(&gram.squares), bits(&squares), "{rows}×{m}×{d}");
            assert_eq!(bits(&gram.with_base), bits(&with_base), "{rows}×{m}×{d}");
            assert!((0..m).any(|k| cols.col_offsets[k] == cols.col_offsets[k + 1]));
        }
    }

    /// `gather_rows` against its definition, bit for bit, on `rows` rows of up to `most`
    /// entries from an `m` × `d` source.
    fn check_gather(m: usize, d: usize, rows: usize, most: u32) {
        let src: Vec<f32> = (0..m * d).map(|i| (i as f32 * 0.61).sin()).collect();
        let mut offsets = vec![0usize];
        let (mut index, mut values) = (Vec::new(), Vec::new());
        for r in 0..rows as u32 {
            for e in 0..(r * 7) % most {
                index.push((r * 11 + e * 5) % m as u32);
                values.push(((r + e) as f32 * 0.37).cos());
            }
            offsets.push(index.len());
        }
        // The output is not zero-filled up front: the allocator holds NaNs before.
        drop(std::hint::black_box(vec![f32::NAN; rows * d]));
        let got = gather_rows(&offsets, &index, &values, &src, d, |_, _| {});
        for r in 0..rows {
            for j in 0..d {
                let mut want = 0f32;
                for e in offsets[r]..offsets[r + 1] {
                    want += values[e] * src[index[e] as usize * d + j];
                }
                assert_eq!(got[r * d + j].to_bits(), want.to_bits(), "({r}, {j})");
            }
        }
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let on_one =
            one_thread.install(|| gather_rows(&offsets, &index, &values, &src, d, |_, _| {}));
        assert_eq!(on_one, got);
        // `finish` sees each complete row once, with its index.
        let finish =
            |r: usize, row: &mut [f32]| row.iter_mut().for_each(|v| *v = *v * 0.5 + r as f32);
        let finished = gather_rows(&offsets, &index, &values, &src, d, finish);
        for (i, (f, g)) in finished.iter().zip(&got).enumerate() {
            assert_eq!(f.to_bits(), (g * 0.5 + (i / d) as f32).to_bits(), "element {i}");
        }
    }

    #[test]
    fn gather_rows_sums_each_element_in_entry_order() {
        // 128-column blocks, packed (a task's entries read each source row several times),
        // two full blocks and a narrower last one.
        check_gather(40, 300, 70, 13);
        // 64-column blocks, gathered in place (too few entries to pack).
        check_gather(3000, 150, 70, 13);
        // 32-column blocks, packed.
        check_gather(5000, 70, 400, 61);
        // Rows narrower than 128 columns: 64-column blocks, packed; then rows narrower than
        // any block, all in the narrow-block path.
        check_gather(40, 100, 70, 13);
        check_gather(40, 10, 70, 13);
    }

    #[test]
    fn kernels_match_dense_products() {
        let (rows, m, d) = (7, 11, 5);
        let dense: Vec<f32> =
            (0..rows * m).map(|i| if i % 4 == 1 { (i as f32 * 0.37).sin() } else { 0.0 }).collect();
        let w: Vec<f32> = (0..m * d).map(|i| (i as f32 * 0.13).cos()).collect();
        let x: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.71).sin()).collect();
        let a = SparseBatch::from_dense(&dense, m);
        assert_eq!(a.to_dense(m), dense);
        close(&csr_matmul(a.as_rows(), &w, d), &dense_matmul(&dense, &w, rows, m, d));
        let dense_t: Vec<f32> =
            (0..m * rows).map(|idx| dense[(idx % rows) * m + idx / rows]).collect();
        close(
            &csr_transpose_matmul(a.as_rows(), &x, d, m),
            &dense_matmul(&dense_t, &x, m, rows, d),
        );
        let sampled = csr_sampled_dot(a.as_rows(), &x, &w, d);
        for r in 0..rows {
            let span = a.row_offsets[r]..a.row_offsets[r + 1];
            for (&c, &got) in a.columns[span.clone()].iter().zip(&sampled[span]) {
                let expect: f32 = (0..d).map(|t| x[r * d + t] * w[c as usize * d + t]).sum();
                assert!((got - expect).abs() < 1e-5);
            }
        }
        let sums = csr_column_sums(a.as_rows(), m);
        for c in 0..m {
            let expect: f32 = (0..rows).map(|r| dense[r * m + c]).sum();
            assert!((sums[c] - expect).abs() < 1e-6);
        }
    }

    /// The CSR builders against a plain scan: rows whose width is not a multiple of the 16-wide
    /// blocks, kept zeros from `extra`, the sparsity decision at and past `SPARSE_LIMIT`.
    #[test]
    fn csr_building_matches_a_plain_scan() {
        let (rows, cols) = (5, 37);
        let dense: Vec<f32> = (0..rows * cols)
            .map(|i| if i % 13 == 0 || i % 37 == 36 { i as f32 - 40.0 } else { 0.0 })
            .collect();
        let extra: Vec<bool> = (0..rows * cols).map(|i| i % 17 == 3).collect();
        for extra in [None, Some(extra.as_slice())] {
            let got = SparseBatch::from_dense_with(&dense, cols, extra);
            let mut want = SparseBatch { row_offsets: vec![0], ..Default::default() };
            for (r, row) in dense.chunks(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    if v != 0.0 || extra.is_some_and(|x| x[r * cols + c]) {
                        want.columns.push(c as u32);
                        want.values.push(v);
                    }
                }
                want.row_offsets.push(want.columns.len());
            }
            assert_eq!(got, want);
            if extra.is_none() {
                let (written, csr) = SparseBatch::map2_with_csr(&dense, &dense, cols, |v, _| v);
                assert_eq!((written.as_slice(), &csr), (dense.as_slice(), &want));
            }
            let share = want.nnz() as f64 / dense.len() as f64;
            assert_eq!(
                SparseBatch::from_dense_if_sparse(&dense, cols, extra).is_some(),
                share <= SPARSE_LIMIT
            );
        }
        assert!((density(&dense) - 20.0 / 185.0).abs() < 1e-12);
        let full = vec![1f32; rows * cols];
        assert!(SparseBatch::from_dense_if_sparse(&full, cols, None).is_none());
        assert_eq!(
            SparseBatch::from_dense_if_sparse(&[], cols, None),
            Some(SparseBatch { row_offsets: vec![0], ..Default::default() })
        );
        // Rows shorter than a block, exactly one block, and blocks with no tail.
        for cols in [7, 16, 48] {
            let dense: Vec<f32> =
                (0..3 * cols).map(|i| if i % 5 == 1 { i as f32 } else { 0.0 }).collect();
            let (written, csr) = SparseBatch::map2_with_csr(&dense, &dense, cols, |v, _| v);
            assert_eq!((written, csr), (dense.clone(), SparseBatch::from_dense(&dense, cols)));
        }
        // No rows.
        let empty =
            |rows: usize| SparseBatch { row_offsets: vec![0; rows + 1], ..Default::default() };
        assert_eq!(SparseBatch::map2_with_csr(&[], &[0; 0], cols, |_, _| 1.0), (vec![], empty(0)));
    }
}
