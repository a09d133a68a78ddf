//! Decoded image → 8-bit RGB, as PIL would hand it to the resizer.
//!
//! Grayscale is replicated to three channels (PIL `convert("RGB")`). 16-bit samples keep their high
//! byte: that is what PIL does when it opens a 16-bit RGB(A) PNG. (For 16-bit grayscale PIL opens
//! `I;16` and `convert("RGB")` clips every value above 255 to white; we do not copy that quirk.)
//! CMYK JPEGs are already RGB when the `image` crate returns them. Float images use the `image`
//! crate's clamp-and-round conversion. Alpha is handled by [`Alpha`].

use std::borrow::Cow;

use image::{DynamicImage, RgbImage};

/// What happens to the alpha channel of an image that has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Alpha {
    /// Composite onto opaque white with Pillow's integer `alpha_composite`: what Hugging Face
    /// processors with `do_convert_rgb` (CLIP, SigLIP, Bit) do to RGBA, LA and transparent images.
    CompositeWhite,
    /// Ignore alpha, as PIL `Image.convert("RGB")` does: what torchvision's `pil_loader`,
    /// `transformers.image_utils.load_image` and the pipelines feed processors without RGB
    /// conversion (ViT, ConvNext).
    Drop,
}

/// The image as 8-bit RGB; borrowed when it already is.
pub fn to_rgb8(image: &DynamicImage, alpha: Alpha) -> Cow<'_, RgbImage> {
    let (w, h) = (image.width(), image.height());
    let rgb =
        |data: Vec<u8>| Cow::Owned(RgbImage::from_raw(w, h, data).expect("3 bytes per pixel"));
    match image {
        DynamicImage::ImageRgb8(img) => Cow::Borrowed(img),
        DynamicImage::ImageLuma8(img) => {
            rgb(img.as_raw().iter().flat_map(|&l| [l, l, l]).collect())
        }
        DynamicImage::ImageLumaA8(img) => {
            rgb(from_la(img.as_raw().chunks_exact(2).map(|p| [p[0], p[1]]), alpha))
        }
        DynamicImage::ImageRgba8(img) => rgb(from_rgba(img.as_raw().chunks_exact(4), alpha)),
        DynamicImage::ImageLuma16(img) => {
            rgb(img.as_raw().iter().flat_map(|&l| [hi(l); 3]).collect())
        }
        DynamicImage::ImageLumaA16(img) => {
            rgb(from_la(img.as_raw().chunks_exact(2).map(|p| [hi(p[0]), hi(p[1])]), alpha))
        }
        DynamicImage::ImageRgb16(img) => rgb(img.as_raw().iter().map(|&v| hi(v)).collect()),
        DynamicImage::ImageRgba16(img) => {
            let bytes: Vec<u8> = img.as_raw().iter().map(|&v| hi(v)).collect();
            rgb(from_rgba(bytes.chunks_exact(4), alpha))
        }
        // Float (and any future) layouts: the `image` crate's own 8-bit RGBA conversion.
        other => rgb(from_rgba(other.to_rgba8().as_raw().chunks_exact(4), alpha)),
    }
}

fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

fn from_la(pixels: impl Iterator<Item = [u8; 2]>, alpha: Alpha) -> Vec<u8> {
    pixels
        .flat_map(|[l, a]| {
            let v = match alpha {
                Alpha::CompositeWhite => over_white(l, a),
                Alpha::Drop => l,
            };
            [v, v, v]
        })
        .collect()
}

fn from_rgba<'a>(pixels: impl Iterator<Item = &'a [u8]>, alpha: Alpha) -> Vec<u8> {
    match alpha {
        Alpha::Drop => pixels.flat_map(|p| [p[0], p[1], p[2]]).collect(),
        Alpha::CompositeWhite => pixels
            .flat_map(|p| [over_white(p[0], p[3]), over_white(p[1], p[3]), over_white(p[2], p[3])])
            .collect(),
    }
}

/// One channel of Pillow's `alpha_composite(white opaque background, src)`: its integer formula with
/// 7 extra bits of precision and shift-based division by 255 (exhaustively equal to Pillow 13).
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    if a == 0 {
        return 255;
    }
    let (dst, dst_a) = (255u32, 255u32);
    let outa255 = a * 255 + dst_a * (255 - a);
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let v = c * coef1 + dst * coef2 + (0x80 << BITS);
    ((((v >> 8) + v) >> 8) >> BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_endpoints() {
        for c in 0..=255u8 {
            assert_eq!(over_white(c, 255), c);
            assert_eq!(over_white(c, 0), 255);
        }
        // Black at alpha a shows 255·(1 − a/255) of the white: 127 at a = 128, 128 at a = 127.
        assert_eq!(over_white(0, 128), 127);
        assert_eq!(over_white(0, 127), 128);
    }

    #[test]
    fn matches_pil_alpha_composite_for_every_pair() {
        // PIL's AlphaComposite.c over an opaque white destination, restated.
        let pil = |c: u32, a: u32| {
            let coef1 = a * 255 * 255 * 128 / (255 * 255);
            let coef2 = 255 * 128 - coef1;
            let x = c * coef1 + 255 * coef2 + (0x80 << 7);
            ((((x >> 8) + x) >> 8) >> 7) as u8
        };
        for a in 0..=255u32 {
            for c in 0..=255u32 {
                assert_eq!(over_white(c as u8, a as u8), pil(c, a), "c = {c}, a = {a}");
            }
        }
    }

    #[test]
    fn rgb8_is_borrowed() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(2, 2));
        assert!(matches!(to_rgb8(&img, Alpha::Drop), Cow::Borrowed(_)));
    }
}
