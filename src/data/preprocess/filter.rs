//! Pillow's resampling filters: the kernels and supports of `Image.resize`, evaluated in f64 in the
//! same operation order as Pillow so that the coefficients (and hence the 8-bit output) agree.

use std::f64::consts::PI;

/// A Pillow resampling filter. The discriminants are PIL's `Image.Resampling` codes, which is how
/// Hugging Face `preprocessor_config.json` files store them (`"resample": 3` is bicubic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    Nearest = 0,
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

impl Resample {
    /// The filter for a PIL code, `None` for codes PIL does not define.
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    pub fn pil_code(self) -> u8 {
        self as u8
    }

    /// Half-width of the kernel at scale 1; 0 for nearest, which Pillow does not convolve.
    pub(super) fn support(self) -> f64 {
        match self {
            Resample::Nearest => 0.0,
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// The kernel value at `x` (in input pixels at scale 1).
    pub(super) fn kernel(self, x: f64) -> f64 {
        match self {
            Resample::Nearest => 0.0,
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => hamming(x),
            Resample::Bicubic => bicubic(x),
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn hamming(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * PI;
    // Pillow writes the window constants as C floats (0.54f, 0.46f), so they are f32 values widened.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

/// Keys' cubic convolution with a = -0.5, as Pillow writes it.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pil_codes_round_trip() {
        for code in 0..6 {
            assert_eq!(Resample::from_pil(code).unwrap().pil_code() as i64, code);
        }
        assert_eq!(Resample::from_pil(6), None);
        assert_eq!(Resample::from_pil(-1), None);
    }

    #[test]
    fn kernels_are_one_at_zero_and_vanish_at_support() {
        for f in [
            Resample::Box,
            Resample::Bilinear,
            Resample::Hamming,
            Resample::Bicubic,
            Resample::Lanczos,
        ] {
            assert_eq!(f.kernel(0.0), 1.0, "{f:?}");
            assert_eq!(f.kernel(f.support() + 1e-9), 0.0, "{f:?}");
        }
        assert_eq!(Resample::Bicubic.kernel(1.0), 0.0);
        assert_eq!(Resample::Bicubic.kernel(1.5), -0.0625);
        assert_eq!(Resample::Bilinear.kernel(-0.25), 0.75);
    }
}
