//! Hand-written kernels compiled for the CPU they run on.
//!
//! The crate is built for the baseline x86-64 target (SSE2), so a plain loop uses 128-bit vectors.
//! [`vectorized!`] runs a closure through a copy compiled with AVX2 + FMA or AVX-512 enabled,
//! chosen once from what the CPU reports; the closure's loops (and the `#[inline]` helpers they
//! call) are inlined into that copy and vectorised wider. Results are bit-identical on every
//! path: Rust never fuses a separate multiply and add into an FMA, and vectorising a loop whose
//! lanes are independent (or whose partial sums are spelled out) does not reorder any sum.
//!
//! Wrap the body of each parallel task (inside rayon's closure), not the whole parallel call:
//! code behind a non-inlined call runs at the baseline.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Baseline = 1,
    Avx2 = 2,
    Avx512 = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The widest vector instruction set available (detected on first use; `MONO_SIMD=baseline`
/// or `avx2` caps it, e.g. to compare).
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Baseline,
        2 => Level::Avx2,
        3 => Level::Avx512,
        _ => {
            let detected = detect();
            LEVEL.store(detected as u8, Ordering::Relaxed);
            detected
        }
    }
}

fn detect() -> Level {
    let cap = match std::env::var("MONO_SIMD").as_deref() {
        Ok("baseline") => Level::Baseline,
        Ok("avx2") => Level::Avx2,
        _ => Level::Avx512,
    };
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx512 && cap == Level::Avx512 {
            return Level::Avx512;
        }
        if avx2 && cap != Level::Baseline {
            return Level::Avx2;
        }
    }
    let _ = cap;
    Level::Baseline
}

/// `vectorized!(expr)` runs `expr` compiled for the widest vector instructions of this CPU:
/// [`run_widest`] with the closure forced inline. Without the attribute LLVM may keep a large
/// closure as a separate function, compiled at the baseline (SSE2) and merely *called* from the
/// wide copy — the kernels then silently run 128 bits wide.
macro_rules! vectorized {
    ($body:expr) => {
        $crate::base::simd::run_widest(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use vectorized;

/// Runs `f` compiled for the widest vector instructions of this CPU (see the module docs); `f`
/// must be inlined for that to hold, so call it through the [`vectorized!`] macro.
#[inline(always)]
pub fn run_widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: the features were detected on this CPU.
            Level::Avx512 => return unsafe { with_avx512(f) },
            Level::Avx2 => return unsafe { with_avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512dq,avx512bw")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Σ f(v) in f64 over eight interleaved partial sums: vectorisable (a single running f64 sum
/// is one add per 4 cycles) and in a fixed order.
#[inline(always)]
pub fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    lane_dot(xs, xs, |v, _| f(v))
}

/// Σ f(a_i, b_i) in f64 over eight interleaved partial sums.
#[inline(always)]
pub fn lane_dot(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let whole = a.len() / 8 * 8;
    for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += f(ca[j], cb[j]);
        }
    }
    let tail: f64 = a[whole..].iter().zip(&b[whole..]).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f64>() + tail
}

/// e^t to within 2 ulp for t in [−87.3, 88.3] (Cephes' expf: t = n·ln 2 + r with |r| ≤ ln 2 / 2,
/// a degree-7 polynomial in r, 2ⁿ built in the exponent bits). Outside that range t is clamped:
/// the smallest normal float below (not 0), 2.2·10³⁸ above (not ∞); NaN stays NaN. Branch-free
/// and without fused multiply-adds, so every vector width gives the same bits. For loops that
/// must vectorise: libm's `expf` is a scalar call per element.
#[inline(always)]
pub fn exp_in_range(t: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = t.clamp(-87.3, 88.3);
    let n = (t * std::f32::consts::LOG2_E + 0.5).floor();
    let r = t - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from the bits of n + 127 + 2²³, whose low mantissa bits hold the integer n + 127 (in
    // 1..=254 after the clamp): `n as i32` is a saturating conversion that LLVM does lane by lane.
    e * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path gives the same bits as the baseline loop.
    #[test]
    fn paths_agree_bit_for_bit() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let run = || {
            let mut acc = vec![0f64; 1000];
            for r in 0..17 {
                let coef = 1.0 / (r as f64 + 3.0);
                for (a, &v) in acc.iter_mut().zip(&x) {
                    *a += coef * v as f64;
                }
            }
            let mut partial = [0f32; 8];
            for c in x.chunks_exact(8) {
                for j in 0..8 {
                    partial[j] += c[j] * c[(j + 3) % 8];
                }
            }
            (acc, partial)
        };
        let baseline = run();
        assert_eq!(run_widest(run), baseline);
        assert_eq!(vectorized!(run()), baseline);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert_eq!(unsafe { with_avx2(run) }, baseline);
        }
    }

    /// The written-out e^t against f64's exp: within 2 ulp on its range.
    #[test]
    fn exp_in_range_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=1_000_000 {
            let t = -87.3 + (88.3 + 87.3) * i as f32 / 1e6;
            let exact = (t as f64).exp();
            let ulp = {
                let e = exact as f32;
                (f32::from_bits(e.to_bits() + 1) - e) as f64
            };
            worst = worst.max((exp_in_range(t) as f64 - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
    }
}
