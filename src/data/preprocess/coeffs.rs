//! Per-axis resampling coefficients exactly as Pillow computes them for 8-bit images: the kernel is
//! widened by the downscale factor (antialiasing), each output pixel's taps are normalised to sum to
//! one in f64, then rounded half away from zero to fixed point with `PRECISION_BITS` fraction bits.
//!
//! A table depends only on (filter, input length, output length), so tables are cached: a data set
//! has few distinct image sizes, and every image of a size reuses the same two tables. Outputs
//! longer than `CACHED_MAX_OUT` (a shortest-edge resize of a panorama, say, later centre-cropped)
//! get an uncached table of just the output pixels the crop needs.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, OnceLock, RwLock};

use super::filter::Resample;

/// Pillow: 32 bits minus 8 for the pixel value minus 2 for the overshoot of negative-lobed filters.
pub(super) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Rounding offset Pillow adds to every accumulator before the shift.
pub(super) const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Enough for every (size, filter) pair of a real data set; past it the cache is simply rebuilt.
const CACHE_LIMIT: usize = 4096;

/// Longest output axis whose full table is cached (a few hundred KB at most).
const CACHED_MAX_OUT: u32 = 8192;

/// Coefficients of output pixels `first..first + start.len()` of one axis: output pixel `i` reads
/// `count[i - first]` inputs from `start[i - first]`, with weights `weights[(i - first) * ksize..]`.
#[derive(Debug)]
pub(super) struct Coeffs {
    first: usize,
    ksize: usize,
    start: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// First input index and weights of output pixel `i`.
    pub fn taps(&self, i: usize) -> (usize, &[i32]) {
        let j = i - self.first;
        (self.start[j], &self.weights[j * self.ksize..j * self.ksize + self.count[j]])
    }

    /// First input index that output pixel `i` reads.
    pub fn start(&self, i: usize) -> usize {
        self.start[i - self.first]
    }

    /// One past the last input index that output pixel `i` reads.
    pub fn end(&self, i: usize) -> usize {
        self.start(i) + self.count[i - self.first]
    }

    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box, for output
    /// pixels `outputs` of `out_size`. Sizes must be positive and `outputs` inside `0..out_size`
    /// (checked by the caller).
    pub fn compute(filter: Resample, in_size: u32, out_size: u32, outputs: Range<usize>) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;

        let mut start = Vec::with_capacity(outputs.len());
        let mut count = Vec::with_capacity(outputs.len());
        let mut weights = vec![0i32; outputs.len() * ksize];
        let mut taps = vec![0f64; ksize];
        let first = outputs.start;
        for xx in outputs {
            let center = (xx as f64 + 0.5) * scale;
            // `as` truncates toward zero like C's (int) cast; that is Pillow's "round".
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).max(0) as usize;
            let mut total = 0.0;
            for (x, tap) in taps[..n].iter_mut().enumerate() {
                let w = filter.kernel(((x as i64 + xmin) as f64 - center + 0.5) * inv);
                *tap = w;
                total += w;
            }
            for (tap, fixed) in taps[..n].iter().zip(&mut weights[(xx - first) * ksize..]) {
                let k = if total != 0.0 { tap / total } else { *tap };
                *fixed = to_fixed(k);
            }
            start.push(xmin as usize);
            count.push(n);
        }
        Coeffs { first, ksize, start, count, weights }
    }
}

/// Round half away from zero to `PRECISION_BITS` fraction bits, as `normalize_coeffs_8bpc`.
fn to_fixed(k: f64) -> i32 {
    let scaled = k * (1i64 << PRECISION_BITS) as f64;
    if k < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

/// The table of one axis covering at least output pixels `outputs`; cached for usual sizes.
pub(super) fn coeffs(
    filter: Resample,
    in_size: u32,
    out_size: u32,
    outputs: Range<usize>,
) -> Arc<Coeffs> {
    if out_size > CACHED_MAX_OUT {
        return Arc::new(Coeffs::compute(filter, in_size, out_size, outputs));
    }
    type Cache = RwLock<HashMap<(Resample, u32, u32), Arc<Coeffs>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (filter, in_size, out_size);
    // A poisoned lock only means another thread panicked mid-insert; the map itself stays valid.
    if let Some(c) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return c.clone();
    }
    let c = Arc::new(Coeffs::compute(filter, in_size, out_size, 0..out_size as usize));
    let mut map = cache.write().unwrap_or_else(|e| e.into_inner());
    if map.len() >= CACHE_LIMIT {
        map.clear();
    }
    map.entry(key).or_insert(c).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: i32 = 1 << PRECISION_BITS;

    #[test]
    fn bilinear_halving_renormalises_at_the_border() {
        let c = Coeffs::compute(Resample::Bilinear, 4, 2, 0..2);
        // Scale 2 widens the support to 2. Output 0 is centred at 1.0: inputs 0, 1, 2 lie 0.5, 0.5
        // and 1.5 away (kernel 3/4, 3/4, 1/4); input -1 is outside, so they sum to 7/4, giving
        // 3/7, 3/7, 1/7 = 1797558.86, 599186.29 in units of 2^-22, rounded to nearest.
        assert_eq!(c.ksize, 5);
        assert_eq!(c.taps(0), (0, &[1797559, 1797559, 599186][..]));
        assert_eq!(c.taps(1), (1, &[599186, 1797559, 1797559][..]));
        assert_eq!(1797559 * 2 + 599186, ONE);
    }

    #[test]
    fn identity_size_is_a_unit_tap() {
        for f in [
            Resample::Box,
            Resample::Bilinear,
            Resample::Hamming,
            Resample::Bicubic,
            Resample::Lanczos,
        ] {
            let c = Coeffs::compute(f, 5, 5, 0..5);
            for i in 0..5 {
                let (start, w) = c.taps(i);
                let idx = w.iter().position(|&k| k == ONE).expect("a unit tap");
                assert_eq!(start + idx, i, "{f:?}");
                assert!(w.iter().enumerate().all(|(j, &k)| j == idx || k == 0), "{f:?} {w:?}");
            }
        }
    }

    #[test]
    fn cache_returns_the_same_table() {
        let a = coeffs(Resample::Bicubic, 500, 224, 10..20);
        let b = coeffs(Resample::Bicubic, 500, 224, 0..224);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.start.len(), 224);
    }

    #[test]
    fn partial_tables_agree_with_full_ones() {
        let full = Coeffs::compute(Resample::Lanczos, 301, 9000, 0..9000);
        let part = coeffs(Resample::Lanczos, 301, 9000, 4000..4224);
        assert_eq!(part.start.len(), 224);
        for i in 4000..4224 {
            assert_eq!(part.taps(i), full.taps(i));
            assert_eq!(part.end(i), full.end(i));
        }
    }
}
