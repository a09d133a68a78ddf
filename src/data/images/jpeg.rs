//! JPEG files decoded to exactly the pixels PIL gives, so features match the reference pipelines
//! (Hugging Face processors and torchvision both open images with PIL).
//!
//! PIL decodes JPEGs with libjpeg-turbo at its defaults: the accurate integer IDCT (ISLOW) and
//! "fancy" (triangular) chroma upsampling. We link the same decoder (the mozjpeg fork of
//! libjpeg-turbo, whose decoder is libjpeg-turbo's) with the same settings; a pure-Rust decoder
//! differs by a level here and there, which moves features by ~1e-3. PIL's other choices:
//! - the image mode follows the number of components: 1 → grey, 3 → RGB (libjpeg converts
//!   YCbCr; Adobe RGB JPEGs pass through), 4 → CMYK (libjpeg turns YCCK into CMYK);
//! - 4-component data are read as Adobe-inverted CMYK ("CMYK;I") and PIL's CMYK → RGB is
//!   `R = (255 − K′) − round((255 − K′)·C′/255)` on the inverted values C′ = 255 − C (see
//!   [`cmyk_to_rgb`]); no ICC profile is applied;
//! - a file that ends before its last scan is an error ("image file is truncated"), while
//!   warnings about corrupt but complete data are not.
//!
//! `tests/jpeg.rs` checks all of this against Pillow's output for several subsamplings,
//! progressive, greyscale, CMYK and truncated files.

use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{anyhow, bail, Result};
use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg::{ColorSpace, DctMethod, Decompress};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

/// Whether the bytes start like a JPEG file (SOI marker followed by another marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a whole JPEG file held in memory: grey images stay grey, the rest come back as RGB.
pub fn decode_jpeg(bytes: &[u8]) -> Result<DynamicImage> {
    // libjpeg reports fatal errors through `error_exit`, which here unwinds with the message.
    match catch_unwind(AssertUnwindSafe(|| decode_unchecked(bytes))) {
        Ok(result) => result,
        Err(payload) => Err(match payload.downcast::<String>() {
            Ok(message) => anyhow!("{message}"),
            Err(_) => anyhow!("the JPEG decoder failed"),
        }),
    }
}

fn decode_unchecked(bytes: &[u8]) -> Result<DynamicImage> {
    let mut file = Decompress::builder().with_err(error_manager()).from_mem(bytes)?;
    file.dct_method(DctMethod::IntegerSlow);
    file.do_fancy_upsampling(true);
    let (width, height) = (file.width() as u32, file.height() as u32);
    let components = file.components().len();
    let image = match components {
        1 => {
            let pixels = file.grayscale()?.read_scanlines::<u8>()?;
            DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, pixels).expect("w·h bytes"))
        }
        3 => {
            let pixels = file.rgb()?.read_scanlines::<u8>()?;
            DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, pixels).expect("3·w·h"))
        }
        4 => {
            let cmyk = file.to_colorspace(ColorSpace::JCS_CMYK)?.read_scanlines::<u8>()?;
            let rgb = cmyk.chunks_exact(4).flat_map(|p| cmyk_to_rgb([p[0], p[1], p[2], p[3]]));
            DynamicImage::ImageRgb8(
                RgbImage::from_raw(width, height, rgb.collect()).expect("3·w·h"),
            )
        }
        n => bail!("JPEG with {n} colour components (PIL reads 1, 3 or 4)"),
    };
    Ok(image)
}

/// One pixel of libjpeg's CMYK output → RGB, as PIL does it: the bytes are read as Adobe-inverted
/// CMYK, then converted with PIL's integer `cmyk2rgb` (`MULDIV255` rounding).
pub fn cmyk_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let inverted = raw.map(|v| 255 - u32::from(v));
    let not_k = 255 - inverted[3];
    let channel = |c: u32| {
        let t = c * not_k + 128;
        (not_k - (((t >> 8) + t) >> 8)) as u8
    };
    [channel(inverted[0]), channel(inverted[1]), channel(inverted[2])]
}

/// libjpeg's standard error manager with fatal errors unwinding (caught in [`decode_jpeg`]),
/// warnings silenced, except running out of data, which PIL treats as an error.
fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_error_mgr is a plain C struct; jpeg_std_error fills every field.
    let mut manager: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut manager) };
    manager.error_exit = Some(error_exit);
    manager.emit_message = Some(emit_message);
    manager
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let message = unsafe { libjpeg_message(cinfo) };
    std::panic::resume_unwind(Box::new(message));
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: std::ffi::c_int) {
    // SAFETY: libjpeg calls this with its own valid `err` pointer.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == JWRN_JPEG_EOF as std::ffi::c_int {
        std::panic::resume_unwind(Box::new("image file is truncated".to_string()));
    }
}

/// The text of libjpeg's current message (its own wording, e.g. "Not a JPEG file: starts with
/// 0x89 0x50").
unsafe fn libjpeg_message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: `err` is the manager set up in `error_manager`; format_message writes at most 80
    // bytes (JMSG_LENGTH_MAX), NUL-terminated. The binding declares the buffer as a shared
    // reference although C writes into it, so it is called through a pointer-taking signature.
    unsafe {
        let Some(format) = (*cinfo.err).format_message else {
            return format!("libjpeg error {}", (*cinfo.err).msg_code);
        };
        let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
            std::mem::transmute(format);
        let mut buffer = [0u8; 80];
        format(cinfo, buffer.as_mut_ptr());
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_to_rgb_follows_pil_arithmetic() {
        // Raw (non-inverted in the file) 255 = no ink → white; raw 0 for K = full black.
        assert_eq!(cmyk_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb([0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb([10, 20, 30, 0]), [0, 0, 0]);
        // C′ = 100, K′ = 55: 200 − round(100·200/255) = 200 − 78 = 122.
        assert_eq!(cmyk_to_rgb([155, 155, 155, 200])[0], 122);
    }

    /// Pillow's conversion of every (C, K) pair (tests/fixtures/jpeg/cmyk_table.pillow.png, pixel
    /// (x, y) from raw bytes (x, 255 − x, (x + y) mod 256, y)).
    #[test]
    fn cmyk_to_rgb_equals_pillow_for_every_pair() {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/cmyk_table.pillow.png");
        let pillow = image::open(path).unwrap().to_rgb8();
        for (x, y, pixel) in pillow.enumerate_pixels() {
            let (x, y) = (x as u8, y as u8);
            let raw = [x, 255 - x, x.wrapping_add(y), y];
            assert_eq!(cmyk_to_rgb(raw), pixel.0, "raw CMYK {raw:?}");
        }
    }

    #[test]
    fn errors_are_messages_not_crashes() {
        let err = decode_jpeg(b"\xFF\xD8\xFF\xE0 not really a jpeg").unwrap_err();
        assert!(!err.to_string().is_empty());
        assert!(!is_jpeg(b"\x89PNG\r\n"));
    }
}
