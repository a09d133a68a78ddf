//! Intel AMX bf16 tiles: an approximate (bf16 inputs, f32 sums) product at many times the f32
//! FMA rate, for screening which entries of a product can pass a threshold (`screen`).
//!
//! Linux on x86-64 only: the kernel has to grant a process the tile state before its first
//! use (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and the instructions are written as inline assembly
//! (their intrinsics are not stable Rust).

use crate::base::simd::vectorized;

/// Whether this process may run AMX bf16 tiles (CPU support and the kernel's permission, asked
/// for once). Also requires AVX-512F, which the exact recomputation beside the screen uses.
pub fn available() -> bool {
    imp::available()
}

/// A latent group: 16 columns of the product.
pub const GROUP: usize = 16;
/// Contraction elements per tile step (16 pairs of bf16).
pub const STEP: usize = 32;

/// Round-to-nearest-even conversion to bf16 (NaN stays NaN). Branch-free, so loops of it
/// vectorise.
#[inline(always)]
pub fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet = ((bits >> 16) | 0x40) as u16;
    if v.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// The value the tiles read for `v`: its bf16 rounding, with values below the smallest normal
/// bf16 read as zero.
#[inline(always)]
pub fn as_read(v: f32) -> f32 {
    let r = f32::from_bits((bf16(v) as u32) << 16);
    if r.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        r
    }
}

/// Rows (`rows`, a multiple of 32) of `a` as bf16 with the contraction padded with zeros to
/// `kp` (a multiple of `STEP`): row-major, `kp` values per row. Rows past `a`'s are zero.
pub fn pack_rows(a: &[f32], k: usize, rows: usize, kp: usize) -> Vec<u16> {
    use rayon::prelude::*;
    let mut out = vec![0u16; rows * kp];
    out.par_chunks_mut(kp.max(1)).enumerate().for_each(|(r, row)| {
        if let Some(src) = a.get(r * k..(r + 1) * k) {
            vectorized!(row.iter_mut().zip(src).for_each(|(o, &v)| *o = bf16(v)));
        }
    });
    out
}

/// The columns of a product whose rhs is stored as `w` (n rows of k: column j of the rhs is
/// row j of `w`), as bf16 groups of 16 columns in the tiles' pair-interleaved layout: group g
/// holds, for each pair p of contraction indices, the 16 columns' (2p, 2p + 1) values. `kp` is
/// k padded to `STEP`; columns and contraction past `w`'s are zero. `groups` groups in all.
pub fn pack_columns(w: &[f32], k: usize, groups: usize, kp: usize) -> Vec<u16> {
    use rayon::prelude::*;
    let n = w.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0u16; groups * kp * GROUP];
    out.par_chunks_mut(kp * GROUP).enumerate().for_each(|(g, panel)| {
        let columns = (n.saturating_sub(g * GROUP)).min(GROUP);
        // Each column converted whole (vectorised), as pairs; then the pairs side by side.
        let mut pairs = vec![0u32; GROUP * kp / 2];
        for c in 0..columns {
            let src = &w[(g * GROUP + c) * k..][..k];
            let dst = &mut pairs[c * kp / 2..][..kp / 2];
            vectorized!({
                for (d, two) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16(two[0]) as u32 | (bf16(two[1]) as u32) << 16;
                }
            });
            if k % 2 == 1 {
                dst[k / 2] = bf16(src[k - 1]) as u32;
            }
        }
        for (p, dst) in panel.chunks_exact_mut(2 * GROUP).enumerate().take(k.div_ceil(2)) {
            for c in 0..GROUP {
                let pair = pairs[c * kp / 2 + p];
                (dst[2 * c], dst[2 * c + 1]) = (pair as u16, (pair >> 16) as u16);
            }
        }
    });
    out
}

/// A thread's tile configuration, loaded on creation and released on drop.
pub struct Tiles(());

impl Tiles {
    /// Configures this thread's tiles (8 tiles of 16 rows × 64 bytes). Only when `available()`.
    pub fn configured() -> Self {
        assert!(available(), "AMX tiles are not available");
        imp::configure();
        Tiles(())
    }

    /// out (32 × 32 f32, row-major) = rows (32 × kp bf16, row stride `kp`) · the two column
    /// groups `g0`, `g1` (each kp/2 pairs of 16 columns, `pack_columns`' layout).
    pub fn block_32x32(&self, rows: &[u16], kp: usize, g0: &[u16], g1: &[u16], out: &mut [f32]) {
        assert!(kp.is_multiple_of(STEP) && rows.len() >= 32 * kp, "amx: rows too short");
        assert!(g0.len() >= kp * GROUP && g1.len() >= kp * GROUP, "amx: columns too short");
        assert!(out.len() >= 32 * 32, "amx: output too short");
        // SAFETY: the tiles are configured (this value exists); every load reads 16 rows of 64
        // bytes inside the slices checked above, the stores write 32 rows of 128 bytes of `out`.
        unsafe { imp::block_32x32(rows.as_ptr(), kp, g0.as_ptr(), g1.as_ptr(), out.as_mut_ptr()) }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        imp::release();
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            // CPUID.(7, 0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE. The SIMD level says
            // AVX-512F was detected; `MONO_SIMD` below it (to compare paths) turns the tiles off.
            let simd = crate::base::simd::level() == crate::base::simd::Level::Avx512;
            if !simd || std::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call; it fails (non-zero) where the kernel refuses.
            let granted = unsafe {
                libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
            };
            granted == 0
        })
    }

    /// Palette 1, tiles 0–7 of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    pub fn configure() {
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        for t in 0..8 {
            c.0[16 + 2 * t] = 64; // bytes per row
            c.0[48 + t] = 16; // rows
        }
        // SAFETY: AMX is available (checked by the caller) and the config is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly)) };
    }

    pub fn release() {
        // SAFETY: releasing the tile state is always allowed after `configure`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Tiles 0–3 accumulate the 2 × 2 blocks of 16 × 16; 4–5 hold rows, 6–7 columns.
    pub unsafe fn block_32x32(
        a: *const u16,
        kp: usize,
        g0: *const u16,
        g1: *const u16,
        out: *mut f32,
    ) {
        let a_stride = kp * 2; // bytes per row
        let a1 = a.add(16 * kp);
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for step in 0..kp / super::STEP {
                let (ra0, ra1) = (a.add(step * super::STEP), a1.add(step * super::STEP));
                let (rb0, rb1) = (g0.add(step * 512), g1.add(step * 512));
                asm!(
                    "tileloadd tmm4, [{ra0} + {sa}*1]",
                    "tileloadd tmm5, [{ra1} + {sa}*1]",
                    "tileloadd tmm6, [{rb0} + {sb}*1]",
                    "tileloadd tmm7, [{rb1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    ra0 = in(reg) ra0,
                    ra1 = in(reg) ra1,
                    rb0 = in(reg) rb0,
                    rb1 = in(reg) rb1,
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
            asm!(
                "tilestored [{o0} + {s}*1], tmm0",
                "tilestored [{o1} + {s}*1], tmm1",
                "tilestored [{o2} + {s}*1], tmm2",
                "tilestored [{o3} + {s}*1], tmm3",
                o0 = in(reg) out,
                o1 = in(reg) out.add(16),
                o2 = in(reg) out.add(16 * 32),
                o3 = in(reg) out.add(16 * 32 + 16),
                s = in(reg) 128usize,
                options(nostack)
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub fn available() -> bool {
        false
    }
    pub fn configure() {}
    pub fn release() {}
    pub unsafe fn block_32x32(_: *const u16, _: usize, _: *const u16, _: *const u16, _: *mut f32) {
        unreachable!("AMX is never available here")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiles' product equals the f64 product of the bf16-rounded inputs up to f32 sums.
    #[test]
    fn tile_blocks_multiply_rounded_inputs() {
        if !available() {
            eprintln!("skipped: no AMX bf16 on this machine");
            return;
        }
        let (rows, k, n) = (32usize, 70usize, 32usize);
        let kp = k.div_ceil(STEP) * STEP;
        let val = |i: usize| ((i as f32) * 0.618).sin();
        let a: Vec<f32> = (0..rows * k).map(val).collect();
        let w: Vec<f32> = (0..n * k).map(|i| val(i + 7777)).collect();
        let (pa, pw) = (pack_rows(&a, k, rows, kp), pack_columns(&w, k, 2, kp));
        let mut out = vec![0f32; 32 * 32];
        Tiles::configured().block_32x32(&pa, kp, &pw[..kp * GROUP], &pw[kp * GROUP..], &mut out);
        let up = |h: u16| f32::from_bits((h as u32) << 16) as f64;
        for i in 0..rows {
            for j in 0..n {
                let want: f64 =
                    (0..k).map(|p| up(bf16(a[i * k + p])) * up(bf16(w[j * k + p]))).sum();
                let scale: f64 = (0..k).map(|p| (a[i * k + p] * w[j * k + p]).abs() as f64).sum();
                let got = out[i * 32 + j] as f64;
                assert!((got - want).abs() <= 1e-6 * scale + 1e-30, "({i}, {j}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even below
        assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, even above
        assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits((bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16(f32::INFINITY), 0x7f80);
    }
}
