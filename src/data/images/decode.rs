//! Image file → 8-bit RGB, the one pixel format the encoders' preprocessing takes.
//!
//! Conversions, following `convert_rgb` of the Hugging Face image processors (CLIPImageProcessor,
//! SiglipImageProcessor), which turn every PIL mode into RGBA and alpha-composite it over an opaque
//! WHITE background before dropping alpha:
//! - grey → R = G = B = grey;
//! - with alpha (RGBA, grey + alpha, palette + tRNS) → `round((c·a + 255·(255 − a)) / 255)`, which
//!   is bit-for-bit what PIL's `Image.alpha_composite` over white gives (checked for all 256×256
//!   (c, a) pairs);
//! - 16 bits per sample → `round(v / 257)`, done by the image crate's u16 → u8 conversion. (PIL
//!   differs here: it truncates 48-bit RGB PNGs to the high byte and clips 16-bit grey at 255.)
//! - float samples (some TIFFs) → clamped to [0, 1], × 255, rounded;
//! - JPEGs are decoded by libjpeg-turbo exactly as PIL decodes them, CMYK included (see
//!   `jpeg.rs`); a JPEG it cannot decode is an error naming the file, like any other broken image.
//!
//! The file's format is taken from its first bytes, not its extension (ImageNet has PNG and CMYK
//! files named `.JPEG`). EXIF orientation is not applied, like PIL's `Image.open` and so like the
//! reference preprocessing. Animated GIFs give their first frame.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::{DynamicImage, ImageReader, RgbImage, RgbaImage};

use super::jpeg::{decode_jpeg, is_jpeg};

/// Reads and decodes one image file as 8-bit RGB. Every error names the file.
pub fn load_image_file(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot open image {}", path.display()))?;
    let image = decode_image_bytes(&bytes)
        .with_context(|| format!("{}: cannot decode image", path.display()))?;
    Ok(to_rgb8(image))
}

/// Decodes the bytes of an image file of any supported format (taken from the bytes).
pub fn decode_image_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    if is_jpeg(bytes) {
        return decode_jpeg(bytes);
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    // The caller skips broken files and goes on; a decoder bug on a hostile file must not take
    // the whole extraction down with it.
    catch_unwind(AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| anyhow!("the image decoder crashed on this file"))?
        .map_err(Into::into)
}

/// Any decoded image as 8-bit RGB, by the rules in the module documentation.
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other if other.color().has_alpha() => composite_over_white(&other.to_rgba8()),
        other => other.to_rgb8(),
    }
}

/// Blends each pixel over opaque white and drops alpha (rounded to nearest; ties cannot occur
/// because 255 is odd).
pub fn composite_over_white(rgba: &RgbaImage) -> RgbImage {
    let (width, height) = rgba.dimensions();
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for px in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(px[3]);
        for &c in &px[..3] {
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    RgbImage::from_raw(width, height, out).expect("3 bytes for each pixel of the source")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    #[test]
    fn alpha_blends_over_white() {
        let rgba = RgbaImage::from_raw(
            4,
            1,
            vec![10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128, 200, 100, 0, 64],
        )
        .unwrap();
        let rgb = composite_over_white(&rgba);
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([10, 20, 30]), "opaque: unchanged");
        assert_eq!(rgb.get_pixel(1, 0), &Rgb([255, 255, 255]), "transparent: white");
        // 255·127/255 = 127 exactly.
        assert_eq!(rgb.get_pixel(2, 0), &Rgb([127, 127, 127]));
        // (200·64 + 255·191)/255 = 241.20, (100·64 + 255·191)/255 = 216.10, 191.
        assert_eq!(rgb.get_pixel(3, 0), &Rgb([241, 216, 191]));
    }

    #[test]
    fn matches_pil_alpha_composite_integer_arithmetic() {
        // PIL's AlphaComposite.c over an opaque destination, 7 fractional bits.
        let pil = |c: u32, a: u32| {
            let coef1 = a * 255 * 255 * 128 / (255 * 255);
            let coef2 = 255 * 128 - coef1;
            let x = c * coef1 + 255 * coef2 + (0x80 << 7);
            ((((x >> 8) + x) >> 8) >> 7) as u8
        };
        for a in 0..=255u32 {
            let row: Vec<u8> = (0..=255u8).flat_map(|c| [c, c, c, a as u8]).collect();
            let rgb = composite_over_white(&RgbaImage::from_raw(256, 1, row).unwrap());
            for c in 0..=255u32 {
                assert_eq!(rgb.get_pixel(c, 0)[0], pil(c, a), "c = {c}, a = {a}");
            }
        }
    }

    #[test]
    fn grey_sixteen_bit_and_grey_alpha() {
        let grey = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(2, 1, Luma([77])));
        assert_eq!(to_rgb8(grey).get_pixel(1, 0), &Rgb([77, 77, 77]));

        // 257·k + 128 → k (down), 257·k + 129 → k + 1 (up), 65535 → 255.
        let wide = ImageBuffer::from_raw(
            3,
            1,
            vec![257 * 9 + 128, 0, 0, 257 * 9 + 129, 1, 2, 65535, 65535, 65535u16],
        )
        .unwrap();
        let rgb = to_rgb8(DynamicImage::ImageRgb16(wide));
        assert_eq!(rgb.as_raw(), &[9, 0, 0, 10, 0, 0, 255, 255, 255]);

        let la = DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(1, 1, LumaA([0, 0])));
        assert_eq!(to_rgb8(la).get_pixel(0, 0), &Rgb([255, 255, 255]));

        let rgba16 =
            DynamicImage::ImageRgba16(ImageBuffer::from_pixel(1, 1, Rgba([0, 65535, 0, 65535u16])));
        assert_eq!(to_rgb8(rgba16).get_pixel(0, 0), &Rgb([0, 255, 0]));
    }

    #[test]
    fn float_samples_are_clamped_and_rounded() {
        let f = ImageBuffer::from_raw(1, 1, vec![-0.5f32, 0.5, 2.0]).unwrap();
        assert_eq!(to_rgb8(DynamicImage::ImageRgb32F(f)).get_pixel(0, 0), &Rgb([0, 128, 255]));
    }
}
