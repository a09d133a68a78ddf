//! Dense f32 products for the host kernels, through the `gemm` crate (the one candle's CPU
//! matmul uses). One entry point, which also decides how the work is spread over threads.
//!
//! The crate parallelises over tiles of the output. A thin product with a long contraction —
//! a convolution's weight gradient, (O × C·KH·KW) summed over every output pixel of the batch —
//! has few tiles and re-packs its operands for every block of the contraction: measured at
//! 20–60 GFLOP/s where square products reach 150–200 on the same two cores. Such products are
//! split along the contraction instead: fixed chunks, one single-threaded product each, summed
//! in chunk order (so the result does not depend on the thread count). The others run as blocks
//! of output columns, one single-threaded product each, on the rayon pool (`column_blocks`:
//! faster than the crate's own parallelism, and the same bits), when there are enough columns —
//! except with a large lhs stored transposed, where the crate's own tiles are faster.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::base::simd::vectorized;

/// Contraction columns per partial product of a split product.
const SPLIT_CHUNK: usize = 2048;
/// Shorter contractions keep the crate's own parallel product (as fast there).
const SPLIT_MIN_CONTRACTION: usize = 4 * SPLIT_CHUNK;
/// Larger outputs have enough tiles for the crate's parallelism.
const SPLIT_MAX_OUTPUT: usize = 1 << 20;
/// Bound on the partial products held at once, in floats (64 MiB).
const SPLIT_MAX_PARTIALS: usize = 16 << 20;

/// A strided operand: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// Dense (m × k) · (k × n) → row-major (m × n), with arbitrary operand strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) -> Vec<f32> {
    let (a, b) = (Strided { data: a, rs: a_rs, cs: a_cs }, Strided { data: b, rs: b_rs, cs: b_cs });
    product_plus_row(m, n, k, a, b, None)
}

/// `gemm_f32` with `row` (n) added to every output row afterwards (a layer's bias): the same
/// float operations as a separate pass, done block by block while each is in cache when the
/// product runs as column blocks.
pub fn gemm_f32_plus_row(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    row: &[f32],
) -> Vec<f32> {
    assert_eq!(row.len(), n, "gemm: the added row has the wrong length");
    product_plus_row(m, n, k, a, b, Some(row))
}

fn product_plus_row(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    row: Option<&[f32]>,
) -> Vec<f32> {
    check_operands(m, n, k, a, b);
    if splits_contraction(m, n, k) {
        return plus_row(split_contraction(m, n, k, a, b), n, row);
    }
    tiled(m, n, k, a, b, row)
}

/// `gemm_f32_plus_row` handed to `consume` block by block instead of stored: each block of
/// output columns, (m × width) row-major with its first column, goes to `consume` on the thread
/// that computed it while it is still in cache. For products read once (an SAE's thresholded
/// pre-activations at inference): no (m × n) buffer is written, faulted in or read back. The
/// values are the bits `gemm_f32_plus_row` computes; a product it would not run as column
/// blocks comes as one block of all n columns. Results in column order.
pub fn gemm_f32_plus_row_blocks<T: Send>(
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    row: &[f32],
    consume: impl Fn(usize, usize, &[f32]) -> T + Sync,
) -> Vec<T> {
    assert_eq!(row.len(), n, "gemm: the added row has the wrong length");
    check_operands(m, n, k, a, b);
    let threads = rayon::current_num_threads();
    let width = match column_block_width(m, n, k, threads) {
        Some(width) if threads > 1 && !splits_contraction(m, n, k) => width,
        _ => return vec![consume(0, n, &product_plus_row(m, n, k, a, b, Some(row)))],
    };
    (0..n.div_ceil(width))
        .into_par_iter()
        .map(|block| {
            let first = block * width;
            let width = width.min(n - first);
            let mut out = Vec::<f32>::with_capacity(m * width);
            // SAFETY: the operands were checked above; `out` has room for the (m × width)
            // block at row stride `width`, and the block writes all of it.
            unsafe {
                column_block(out.as_mut_ptr(), width, (m, k), (first, width), a, b, Some(row));
                out.set_len(m * width);
            }
            consume(first, width, &out)
        })
        .collect()
}

/// `out` with `row` added to each of its `n`-wide rows, when given.
fn plus_row(mut out: Vec<f32>, n: usize, row: Option<&[f32]>) -> Vec<f32> {
    if let Some(row) = row {
        out.par_chunks_mut(n.max(1)).for_each(|r| add_row(r, row));
    }
    out
}

/// out += row, element by element (in vector registers).
fn add_row(out: &mut [f32], row: &[f32]) {
    vectorized!(out.iter_mut().zip(row).for_each(|(v, &c)| *v += c))
}

/// `gemm_f32` always over output tiles, never split along the contraction (what every product
/// used before the split; for `mono bench gemm`).
pub fn gemm_f32_tiled(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
    check_operands(m, n, k, a, b);
    tiled(m, n, k, a, b, None)
}

/// Panics unless the operands hold every element the product reads.
fn check_operands(m: usize, n: usize, k: usize, a: Strided, b: Strided) {
    if m > 0 && n > 0 && k > 0 {
        assert!(a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs, "gemm: lhs too short");
        assert!(b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs, "gemm: rhs too short");
    }
}

/// The product over output tiles, plus `row` when given: as column blocks on the rayon pool
/// when there are enough of them, else through the crate's own parallel product (or on this
/// thread alone).
fn tiled(m: usize, n: usize, k: usize, a: Strided, b: Strided, row: Option<&[f32]>) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    match column_block_width(m, n, k, threads) {
        Some(width) if threads > 1 && !crate_tiles_faster(m, a) => {
            column_blocks(m, n, k, a, b, width, row)
        }
        _ => plus_row(crate_product(m, n, k, a, b, threads), n, row),
    }
}

/// Lhs rows from which the crate's own tiles beat column blocks when the lhs is stored
/// transposed.
const TRANSPOSED_LHS_MIN_ROWS: usize = 256;

/// Whether the crate's parallel tiles are faster than column blocks: an lhs stored transposed
/// (column-major: a linear layer's output gradient in its weight gradient, a convolution's
/// weight in its input gradient) with enough rows. On two AVX-512 cores: CLIP's MLP weight
/// gradients 10–12 % faster, ResNet-50's input gradients of 3×3 layers 7–30 % faster; thinner
/// ones (64 or 128 rows) were as fast or slower (`mono bench gemm`, both models).
fn crate_tiles_faster(m: usize, a: Strided) -> bool {
    a.rs == 1 && a.cs > 1 && m >= TRANSPOSED_LHS_MIN_ROWS
}

/// The crate's own product, parallel over its tiles when `threads` > 1.
fn crate_product(m: usize, n: usize, k: usize, a: Strided, b: Strided, threads: usize) -> Vec<f32> {
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    product((n, 1), (m, n, k), a, b, parallelism)
}

/// Column blocks are multiples of this: the crate's microkernel heights (64 rows with AVX-512,
/// 24 with AVX2; it runs a row-major product transposed, so our columns are its rows).
const COLUMN_UNIT: usize = 192;
/// Multiply-adds a block needs to be worth its own packing and setup: with short contractions
/// (a convolution's input gradient, k = 64) blocks of 192 columns were slower than the crate.
const BLOCK_MIN_WORK: usize = 1 << 26;

/// The width of `column_blocks` for an (m × k) · (k × n) product: the narrowest multiple of
/// `COLUMN_UNIT` that does `BLOCK_MIN_WORK`, narrowed to leave at least two blocks per thread;
/// None when n has too few columns for that.
fn column_block_width(m: usize, n: usize, k: usize, threads: usize) -> Option<usize> {
    let widest = n / (2 * threads.max(1)) / COLUMN_UNIT * COLUMN_UNIT;
    let units = BLOCK_MIN_WORK.div_ceil((m * k * COLUMN_UNIT).max(1));
    (widest > 0).then(|| (units.max(1) * COLUMN_UNIT).min(widest))
}

/// The row-major product as blocks of `width` output columns, one single-threaded product
/// per block, spread over the rayon pool; `row` added to each block's rows after its product.
///
/// The crate's own parallel product was 10–30 % slower on CLIP's linear layers (800 × 768 ×
/// 768 and the like) and up to 2× slower on convolutions with 64 output channels, on two
/// AVX-512 cores. Each output element is the same chain of operations either way (the crate's
/// contraction blocking depends on k alone), so the bits do not change (tested).
fn column_blocks(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    width: usize,
    row: Option<&[f32]>,
) -> Vec<f32> {
    /// The output, written by disjoint column blocks from several threads.
    struct Out(*mut f32);
    // SAFETY: each task writes its own columns of every row; nothing reads them meanwhile.
    unsafe impl Sync for Out {}
    impl Out {
        fn at(&self, offset: usize) -> *mut f32 {
            // SAFETY (of the callers' writes): offset < m·n, inside the allocation.
            unsafe { self.0.add(offset) }
        }
    }
    let len = m * n;
    let mut dst = Vec::<f32>::with_capacity(len);
    if len == 0 {
        return dst;
    }
    let out = Out(dst.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    (0..n.div_ceil(width)).into_par_iter().for_each(|block| {
        let first = block * width;
        let width = width.min(n - first);
        // SAFETY: the operands were checked by the caller; the block's destination columns
        // first..first + width of rows 0..m lie inside the m × n buffer and no other task
        // writes or reads them.
        unsafe { column_block(out.at(first), n, (m, k), (first, width), a, b, row) }
    });
    // SAFETY: the blocks together wrote every element.
    unsafe { dst.set_len(len) };
    dst
}

/// Columns first..first + width of a · b (+ `row`'s same columns on every row), written on
/// this thread at `dst` with row stride `rs`: one block of `column_blocks` or of
/// `gemm_f32_plus_row_blocks`.
///
/// # Safety
/// `a` and `b` hold every element of the full product (checked by the caller), and `dst` is
/// valid for writes of (m × width) elements at row stride `rs` that nothing else touches
/// meanwhile.
unsafe fn column_block(
    dst: *mut f32,
    rs: usize,
    (m, k): (usize, usize),
    (first, width): (usize, usize),
    a: Strided,
    b: Strided,
    row: Option<&[f32]>,
) {
    // This block's rhs: a suffix that still holds its columns.
    let b = Strided { data: &b.data[first * b.cs..], ..b };
    unsafe { write_product(dst, (rs, 1), (m, width, k), a, b, 1.0, Parallelism::None) }
    if let Some(row) = row {
        let row = &row[first..first + width];
        for i in 0..m {
            // SAFETY: this block's columns of row i, just written, touched by nobody else.
            add_row(unsafe { std::slice::from_raw_parts_mut(dst.add(i * rs), width) }, row);
        }
    }
}

/// `scale` · a · b written over `dst` (element (i, j) at `i * dst_rs + j`) on the calling
/// thread: for many small products that the caller runs in parallel (attention heads).
pub fn gemm_f32_into(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    scale: f32,
) {
    check_operands(m, n, k, a, b);
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1), "gemm: destination too short");
    // SAFETY: the operands were checked to hold every strided read and dst every write.
    unsafe {
        write_product(dst.as_mut_ptr(), (dst_rs, 1), (m, n, k), a, b, scale, Parallelism::None)
    }
}

/// `scale` · a · b written to `dst` (element (i, j) at `i * rs + j * cs`) through the crate.
///
/// # Safety
/// `a` and `b` hold every element the product reads and `dst` is valid for writes of every
/// element of the layout. With read_dst = false the crate writes each of them without reading
/// it (zeros when k = 0), so `dst` may be uninitialised.
unsafe fn write_product(
    dst: *mut f32,
    (rs, cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    scale: f32,
    parallelism: Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            cs as isize,
            rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Whether `gemm_f32` splits this product along its contraction.
pub fn splits_contraction(m: usize, n: usize, k: usize) -> bool {
    let output = m * n;
    output > 0
        && k >= SPLIT_MIN_CONTRACTION
        && output <= SPLIT_MAX_OUTPUT
        && (k / SPLIT_CHUNK) * output <= SPLIT_MAX_PARTIALS
}

/// The product as fixed chunks of the contraction, each computed by one thread into its own
/// buffer, then summed element by element in chunk order.
fn split_contraction(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
    let chunks = k / SPLIT_CHUNK;
    // Partials put the shorter output side along the crate's microkernel rows (column-major
    // when m ≤ n): the faster layout for every thin convolution gradient measured.
    let column_major = m <= n;
    let strides = if column_major { (1, m) } else { (n, 1) };
    let mut partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let (start, end) = (c * k / chunks, (c + 1) * k / chunks);
            let a = Strided { data: &a.data[start * a.cs..], ..a };
            let b = Strided { data: &b.data[start * b.rs..], ..b };
            product(strides, (m, n, end - start), a, b, Parallelism::None)
        })
        .collect();
    let rest = partials.split_off(1);
    let mut sum = partials.pop().expect("at least one chunk");
    const BLOCK: usize = 4096;
    sum.par_chunks_mut(BLOCK).enumerate().for_each(|(i, block)| {
        for part in &rest {
            block.iter_mut().zip(&part[i * BLOCK..]).for_each(|(s, p)| *s += p);
        }
    });
    if !column_major {
        return sum;
    }
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row.iter_mut().enumerate().for_each(|(j, v)| *v = sum[i + j * m]);
    });
    out
}

/// a · b into a new m × n buffer, element (i, j) at `i * rs + j * cs` (a dense layout).
fn product(
    (rs, cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    parallelism: Parallelism,
) -> Vec<f32> {
    let len = m * n;
    let mut dst = Vec::<f32>::with_capacity(len);
    if len == 0 {
        return dst;
    }
    debug_assert!((m - 1) * rs + (n - 1) * cs < len);
    // SAFETY: `check_operands` checked every strided read lies inside `a` and `b` (a chunk's
    // operands are suffixes that still hold its k columns), and dst has room for the m × n
    // layout, every element of which the product writes, so it is initialised afterwards.
    unsafe {
        let out = dst.spare_capacity_mut().as_mut_ptr().cast::<f32>();
        write_product(out, (rs, cs), (m, n, k), a, b, 1.0, parallelism);
        dst.set_len(len);
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 product of strided operands.
    #[allow(clippy::too_many_arguments)]
    fn reference(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| {
                        a.data[i * a.rs + t * a.cs] as f64 * b.data[t * b.rs + j * b.cs] as f64
                    })
                    .sum();
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            // f32 sums of k terms in [-1, 1]: error grows with √k at worst-case √k·ε·k.
            assert!((*g as f64 - w).abs() <= 1e-6 * k as f64, "{g} vs {w}");
        }
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.713).sin()).collect()
    }

    /// Both paths against an f64 product, with the operand layouts the convolution uses: a
    /// transposed right operand (the weight gradient G · colsᵀ) and a transposed left one.
    #[test]
    fn products_match_an_f64_reference_on_both_paths() {
        // (m, n, k): a square-ish product (crate's path), thin ones with long contractions
        // (split, both partial layouts), one whose contraction is not a multiple of the chunk.
        // The output buffer is never zeroed: memory that held NaNs must not show through, also
        // for an empty contraction (k = 0: zeros).
        for (m, n, k) in
            [(7, 11, 5), (4, 3, 0), (3, 5, 9000), (6, 2, 8192), (5, 4, 2 * SPLIT_CHUNK * 3 + 77)]
        {
            drop(std::hint::black_box(vec![f32::NAN; m * n]));
            let a = values(m * k, 0.5);
            let b = values(k * n, 1.5);
            // a row-major, b transposed (each b column contiguous).
            let (ao, bo) = (Strided { data: &a, rs: k, cs: 1 }, Strided { data: &b, rs: 1, cs: k });
            let got = gemm_f32(m, n, k, &a, k, 1, &b, 1, k);
            assert_close(&got, &reference(m, n, k, ao, bo), k);
            // a transposed, b row-major.
            let (ao, bo) = (Strided { data: &a, rs: 1, cs: m }, Strided { data: &b, rs: n, cs: 1 });
            let got = gemm_f32(m, n, k, &a, 1, m, &b, n, 1);
            assert_close(&got, &reference(m, n, k, ao, bo), k);
        }
        assert!(!splits_contraction(7, 11, 5));
        assert!(splits_contraction(3, 5, 9000) && splits_contraction(6, 2, 8192));
        assert!(!splits_contraction(2048, 1024, 9000), "large outputs keep the crate's path");
    }

    /// Into a strided destination, scaled, with both operand layouts; the other elements of the
    /// destination are left as they were.
    #[test]
    fn products_into_a_strided_destination() {
        let (m, n, k, rs) = (5, 3, 7, 4);
        let (a, b) = (values(m * k, 0.5), values(k * n, 1.5));
        let mut dst = vec![f32::NAN; (m - 1) * rs + n + 1];
        let (ao, bo) = (Strided { data: &a, rs: 1, cs: m }, Strided { data: &b, rs: n, cs: 1 });
        gemm_f32_into(&mut dst, rs, (m, n, k), ao, bo, 0.5);
        let want = reference(m, n, k, ao, bo);
        for i in 0..m {
            for j in 0..rs {
                let got = dst[i * rs + j];
                match j < n {
                    true => assert!((got as f64 - 0.5 * want[i * n + j]).abs() < 1e-5),
                    false => assert!(got.is_nan() || i * rs + j >= dst.len()),
                }
            }
        }
        assert!(dst.last().unwrap().is_nan());
    }

    /// Column blocks give the crate's products bit for bit — its parallel one and its
    /// single-threaded one — for both operand layouts, a partial last block and any thread
    /// count (which decides between the paths).
    #[test]
    fn column_blocks_equal_the_crate_products_bit_for_bit() {
        // Blocks of one unit (and a partial last one), a single block, wide blocks (small m·k).
        let transposed_lhs = (TRANSPOSED_LHS_MIN_ROWS, 2 * COLUMN_UNIT + 5, 40);
        for (m, n, k) in [
            (37, 700, 53),
            (5, 2 * COLUMN_UNIT, 300),
            (70, 1000, 1100),
            (3, 4000, 9),
            transposed_lhs,
        ] {
            let (a, b) = (values(m * k, 0.75), values(k * n, 1.25));
            let layouts = [
                (Strided { data: &a, rs: k, cs: 1 }, Strided { data: &b, rs: 1, cs: k }),
                (Strided { data: &a, rs: 1, cs: m }, Strided { data: &b, rs: n, cs: 1 }),
            ];
            for (ao, bo) in layouts {
                let single = product((n, 1), (m, n, k), ao, bo, Parallelism::None);
                for width in [COLUMN_UNIT, 2 * COLUMN_UNIT, n] {
                    assert_eq!(column_blocks(m, n, k, ao, bo, width, None), single, "{m}×{n}×{k}");
                }
                assert_eq!(product((n, 1), (m, n, k), ao, bo, Parallelism::Rayon(3)), single);
                for threads in [1, 2, 5] {
                    let pool =
                        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    assert_eq!(pool.install(|| gemm_f32_tiled(m, n, k, ao, bo)), single);
                }
            }
        }
    }

    /// A product plus a row equals the product and a separate addition, bit for bit, on every
    /// path (column blocks, the crate's product, a split contraction).
    #[test]
    fn a_product_plus_a_row_equals_the_product_then_the_addition() {
        for (m, n, k, threads) in [(40, 900, 70, 2), (40, 900, 70, 1), (3, 5, 9000, 2)] {
            let (a, b, row) = (values(m * k, 0.3), values(k * n, 0.9), values(n, 2.7));
            let (ao, bo) = (Strided { data: &a, rs: k, cs: 1 }, Strided { data: &b, rs: n, cs: 1 });
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (got, mut want) = pool.install(|| {
                (gemm_f32_plus_row(m, n, k, ao, bo, &row), gemm_f32(m, n, k, &a, k, 1, &b, n, 1))
            });
            want.chunks_mut(n).for_each(|r| r.iter_mut().zip(&row).for_each(|(v, c)| *v += c));
            assert_eq!(got, want, "{m}×{n}×{k} on {threads} threads");
        }
    }

    #[test]
    fn column_blocks_do_enough_work_and_leave_two_per_thread() {
        // CLIP's linear layers: one unit; a short contraction: wider blocks.
        assert_eq!(column_block_width(800, 768, 768, 2), Some(COLUMN_UNIT));
        assert_eq!(column_block_width(576, 50176, 64, 2), Some(10 * COLUMN_UNIT));
        assert_eq!(column_block_width(576, 50176, 64, 64), Some(2 * COLUMN_UNIT));
        assert_eq!(column_block_width(800, 767, 768, 2), None);
        assert_eq!(column_block_width(800, 3072, 768, 16), None);
        assert_eq!(column_block_width(0, 4096, 0, 2), Some(5 * COLUMN_UNIT));
    }

    /// A split product is the same, bit for bit, whatever the thread count.
    #[test]
    fn split_products_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (9, 4, 5 * SPLIT_CHUNK + 3);
        let (a, b) = (values(m * k, 0.25), values(k * n, 2.0));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| gemm_f32(m, n, k, &a, k, 1, &b, 1, k))
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }
}
