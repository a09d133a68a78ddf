//! Per-axis resampling coefficients exactly as Pillow computes them for 8-bit images: the kernel is
//! widened by the downscale factor (antialiasing), each output pixel's taps are normalised to sum to
//! one in f64, then rounded half away from zero to fixed point with `PRECISION_BITS` fraction bits.
//!
//! A table depends only on (filter, input length, output length), so tables are cached: a data set
//! has few distinct image sizes, and every image of a size reuses the same two tables.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use super::filter::Resample;

/// Pillow: 32 bits minus 8 for the pixel value minus 2 for the overshoot of negative-lobed filters.
pub(super) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Rounding offset Pillow adds to every accumulator before the shift.
pub(super) const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Enough for every (size, filter) pair of a real data set; past it the cache is simply rebuilt.
const CACHE_LIMIT: usize = 4096;

/// Coefficients of one axis: output pixel `i` reads `count[i]` inputs starting at `start[i]`, with
/// weights `weights[i * ksize..][..count[i]]`.
#[derive(Debug)]
pub(super) struct Coeffs {
    pub ksize: usize,
    pub start: Vec<usize>,
    pub count: Vec<usize>,
    pub weights: Vec<i32>,
}

impl Coeffs {
    /// The taps of output pixel `i`.
    pub fn taps(&self, i: usize) -> (usize, &[i32]) {
        (self.start[i], &self.weights[i * self.ksize..i * self.ksize + self.count[i]])
    }

    /// One past the last input index that output pixel `i` reads.
    pub fn end(&self, i: usize) -> usize {
        self.start[i] + self.count[i]
    }

    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box.
    /// `in_size` and `out_size` must be positive (checked by the caller).
    pub fn compute(filter: Resample, in_size: u32, out_size: u32) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let out_size = out_size as usize;

        let mut start = Vec::with_capacity(out_size);
        let mut count = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut taps = vec![0f64; ksize];
        for xx in 0..out_size {
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
            for (tap, fixed) in taps[..n].iter().zip(&mut weights[xx * ksize..]) {
                let k = if total != 0.0 { tap / total } else { *tap };
                *fixed = to_fixed(k);
            }
            start.push(xmin as usize);
            count.push(n);
        }
        Coeffs { ksize, start, count, weights }
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

/// The cached table for one axis.
pub(super) fn coeffs(filter: Resample, in_size: u32, out_size: u32) -> Arc<Coeffs> {
    type Cache = RwLock<HashMap<(Resample, u32, u32), Arc<Coeffs>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (filter, in_size, out_size);
    // A poisoned lock only means another thread panicked mid-insert; the map itself stays valid.
    if let Some(c) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return c.clone();
    }
    let c = Arc::new(Coeffs::compute(filter, in_size, out_size));
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
        let c = Coeffs::compute(Resample::Bilinear, 4, 2);
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
        for f in [Resample::Box, Resample::Bilinear, Resample::Hamming, Resample::Bicubic, Resample::Lanczos] {
            let c = Coeffs::compute(f, 5, 5);
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
        let a = coeffs(Resample::Bicubic, 500, 224);
        let b = coeffs(Resample::Bicubic, 500, 224);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.start.len(), 224);
    }
}
