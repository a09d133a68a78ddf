//! Image file → 8-bit RGB, the one pixel format the encoders' preprocessing takes.
//!
//! Conversions, following PIL's `Image.convert("RGB")`, which every reference pipeline applies
//! before the processor sees the image (the MonoLoss authors' feature extraction on its data set
//! items, torchvision's `ImageFolder` loader in their finetuning, transformers' `load_image`):
//! - grey → R = G = B = grey;
//! - with alpha (RGBA, grey + alpha, palette + tRNS) → the colour channels, alpha dropped (no
//!   compositing: a processor given such an RGB image has nothing left to composite);
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
use image::{DynamicImage, ImageReader, RgbImage};

use super::jpeg::{decode_jpeg, is_jpeg};

/// The rules by which files become pixels, recorded in the extraction's identity: a change of
/// them (a decoder, a conversion) must not reuse features made under the old ones.
pub const DECODING: &str = "pil-convert-rgb; jpeg: libjpeg-turbo islow, fancy upsampling";

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
    image.into_rgb8()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

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

        // Alpha is dropped, as PIL's convert("RGB") does: a transparent pixel keeps its colour.
        let la = DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(1, 1, LumaA([7, 0])));
        assert_eq!(to_rgb8(la).get_pixel(0, 0), &Rgb([7, 7, 7]));
        let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_pixel(1, 1, Rgba([1, 2, 3, 0])));
        assert_eq!(to_rgb8(rgba).get_pixel(0, 0), &Rgb([1, 2, 3]));

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
