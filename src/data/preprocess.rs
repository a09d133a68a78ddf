//! Image preprocessing that reproduces the Hugging Face PIL-backend ("slow") image processors and
//! torchvision's ImageNet eval transform: RGB conversion → Pillow resize on u8 → centre crop on u8
//! → rescale and normalise to CHW f32.
//!
//! The resize is a port of Pillow's fixed-point resampler, so the 8-bit intermediate equals PIL's
//! and the float output equals the reference's bit for bit (rescale in f64 then cast, normalise in
//! f32, as transformers and torchvision do).
//!
//! Alpha: each preprocessor carries an [`Alpha`] convention, because the references disagree and
//! the difference is large (up to 242 levels on semi-transparent pixels). Processors with
//! `do_convert_rgb` (CLIP, SigLIP) composite onto white; ViT/ConvNext processors have no RGB
//! conversion, so images reach them through PIL `convert("RGB")` (transformers `load_image`,
//! pipelines, torchvision's `pil_loader`), which drops alpha. [`Preprocessor::from_hf_json`] and
//! [`Preprocessor::torchvision_imagenet`] pick the convention of the processor they reproduce,
//! for images handed to them directly. Images read from files are already RGB: decoding converts
//! them as PIL's `convert("RGB")`, which the reference pipelines (the MonoLoss authors' included)
//! apply before any processor (`data::images`).

mod coeffs;
mod filter;
mod geometry;
mod hf_config;
mod resample;
mod to_rgb;

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use image::DynamicImage;
use rayon::prelude::*;

pub use filter::Resample;
pub use geometry::{CropRounding, ResizeTo};
pub use to_rgb::Alpha;

use resample::Window;

/// Largest output accepted per image (64 Mpx, 768 MB of f32); larger requests are errors.
const MAX_OUTPUT_PIXELS: u64 = 1 << 26;

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One model family's preprocessing. Without normalisation, `mean` is 0 and `std` is 1.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Preprocessor {
    pub resize: Option<ResizeTo>,
    pub resample: Resample,
    /// Centre crop (height, width), after the resize.
    pub crop: Option<(u32, u32)>,
    pub crop_rounding: CropRounding,
    /// Multiplier applied to the u8 values in f64 (transformers' `rescale`), e.g. 1/255. f64, not
    /// f32, so that `(v as f64 * factor) as f32` is exactly transformers' value.
    pub rescale: Option<f64>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub alpha: Alpha,
}

impl Preprocessor {
    /// From a Hugging Face `preprocessor_config.json` (CLIPImageProcessor, SiglipImageProcessor,
    /// ViTImageProcessor, BitImageProcessor, ConvNextImageProcessor). Keys that are missing or null
    /// take that class's defaults in transformers 5.24. Errors name the file.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        hf_config::from_hf_json(path)
    }

    /// torchvision's ImageNet eval transform on a PIL image: `Resize(resize_edge, bilinear)` (PIL's
    /// antialiased resize) → `CenterCrop(crop)` (offset rounded half to even) → `ToTensor` →
    /// `Normalize(ImageNet mean, std)`, after `convert("RGB")` (alpha dropped).
    pub fn torchvision_imagenet(resize_edge: u32, crop: u32) -> Self {
        Preprocessor {
            resize: Some(ResizeTo::ShortestEdge(resize_edge)),
            resample: Resample::Bilinear,
            crop: Some((crop, crop)),
            crop_rounding: CropRounding::HalfEven,
            // ToTensor divides by 255 in f32; for u8 inputs that equals the f64 product rounded.
            rescale: Some(1.0 / 255.0),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            alpha: Alpha::Drop,
        }
    }

    /// (height, width) of the pixel values, or `None` when it depends on the image (a shortest-edge
    /// resize, or no resize, without a crop).
    pub fn output_size(&self) -> Option<(u32, u32)> {
        match (self.crop, self.resize) {
            (Some(hw), _) => Some(hw),
            (None, Some(ResizeTo::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// (height, width) of the pixel values for an input of `width`×`height`.
    pub fn output_size_for(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let (w, h) = geometry::resized_size(self.resize, width, height)?;
        let (ch, cw) = self.crop.unwrap_or((h, w));
        ensure!(ch > 0 && cw > 0, "crop size {ch}x{cw} is empty");
        ensure!(
            ch as u64 * cw as u64 <= MAX_OUTPUT_PIXELS,
            "a {width}x{height} image would give {ch}x{cw} pixel values, more than {MAX_OUTPUT_PIXELS} per image"
        );
        Ok((ch, cw))
    }

    /// One image → CHW f32 pixel values, `3 · H · W` long (H, W from [`Self::output_size_for`]).
    pub fn process(&self, image: &DynamicImage) -> Result<Vec<f32>> {
        let (h, w) = self.output_size_for(image.width(), image.height())?;
        let mut out = vec![0f32; 3 * h as usize * w as usize];
        self.process_into(image, &mut out)?;
        Ok(out)
    }

    /// Images → B×3×H×W f32, preprocessed in parallel. Every image must give the same size.
    pub fn process_batch(&self, images: &[DynamicImage]) -> Result<Vec<f32>> {
        let Some(first) = images.first() else { return Ok(Vec::new()) };
        let (h, w) = match self.output_size() {
            Some(hw) => hw,
            None => self.output_size_for(first.width(), first.height()).context("image 0")?,
        };
        let n = 3 * h as usize * w as usize;
        let mut out = vec![0f32; images.len() * n];
        out.par_chunks_mut(n).zip(images.par_iter()).enumerate().try_for_each(
            |(i, (chunk, image))| {
                let hw = self
                    .output_size_for(image.width(), image.height())
                    .with_context(|| format!("image {i}"))?;
                ensure!(
                    hw == (h, w),
                    "image {i} gives {hw:?} pixel values, image 0 gives {:?}",
                    (h, w)
                );
                self.process_into(image, chunk).with_context(|| format!("image {i}"))
            },
        )?;
        Ok(out)
    }

    /// Preprocess into `out` (3·H·W, already sized by the caller).
    fn process_into(&self, image: &DynamicImage, out: &mut [f32]) -> Result<()> {
        let (ch, cw) = self.output_size_for(image.width(), image.height())?;
        let rgb = to_rgb::to_rgb8(image, self.alpha);
        let (rw, rh) = geometry::resized_size(self.resize, rgb.width(), rgb.height())?;
        let (ox, oy) = match self.crop {
            Some(_) => (
                geometry::crop_origin(rw, cw, self.crop_rounding),
                geometry::crop_origin(rh, ch, self.crop_rounding),
            ),
            None => (0, 0),
        };
        let plane = ch as usize * cw as usize;
        if out.len() != 3 * plane {
            bail!("output buffer holds {} values, {ch}x{cw} RGB needs {}", out.len(), 3 * plane);
        }

        // The part of the crop that lies on the resized image; the rest is zero padding.
        let x0 = ox.max(0);
        let y0 = oy.max(0);
        let x1 = (ox + cw as i64).min(rw as i64);
        let y1 = (oy + ch as i64).min(rh as i64);
        let lut = self.lookup();
        for (c, plane_out) in out.chunks_exact_mut(plane).enumerate() {
            plane_out.fill(lut[c][0]);
        }
        if x0 >= x1 || y0 >= y1 {
            return Ok(());
        }
        let win = Window {
            x: x0 as u32,
            y: y0 as u32,
            width: (x1 - x0) as u32,
            height: (y1 - y0) as u32,
        };
        let pixels = resample::resize_window(&rgb, rw, rh, self.resample, win)?;

        // Packed RGB rows → CHW through the per-channel lookup table.
        let (dx, dy) = ((x0 - ox) as usize, (y0 - oy) as usize);
        let (ww, cw) = (win.width as usize, cw as usize);
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (row, src) in pixels.chunks_exact(ww * 3).enumerate() {
            let at = (dy + row) * cw + dx;
            let rows = r[at..at + ww].iter_mut().zip(&mut g[at..at + ww]).zip(&mut b[at..at + ww]);
            for (((r, g), b), p) in rows.zip(src.chunks_exact(3)) {
                *r = lut[0][p[0] as usize];
                *g = lut[1][p[1] as usize];
                *b = lut[2][p[2] as usize];
            }
        }
        Ok(())
    }

    /// The float value of every u8 level per channel: transformers rescales in f64 and casts to f32,
    /// then normalises `(x - mean) / std` in f32 (torchvision's ToTensor + Normalize agree).
    fn lookup(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let x = match self.rescale {
                    Some(f) => (v as f64 * f) as f32,
                    None => v as f32,
                };
                *slot = (x - self.mean[c]) / self.std[c];
            }
        }
        lut
    }
}
