//! Training-time augmentation as torchvision's reference recipes do it: RandomResizedCrop
//! (scale 0.08–1, ratio 3/4–4/3), resize to the training size with the evaluation's filter (the
//! recipes pass one `--interpolation` to both), random horizontal flip, then the encoder's own
//! rescale and normalisation.

use anyhow::Result;
use image::{DynamicImage, RgbImage};
use rand::rngs::StdRng;
use rand::Rng;

use crate::data::preprocess::{Preprocessor, ResizeTo};

/// torchvision's RandomResizedCrop box (scale 0.08–1, ratio 3/4–4/3; ten tries, then a centre
/// crop of clamped ratio): (left, top, width, height).
pub fn random_resized_crop_box(width: u32, height: u32, rng: &mut StdRng) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.08..1.0);
        let ratio = rng.random_range(lo..hi).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            return (rng.random_range(0..=width - w), rng.random_range(0..=height - h), w, h);
        }
    }
    let ratio = width as f64 / height as f64;
    let (w, h) = if ratio < 3.0 / 4.0 {
        (width, (width as f64 / (3.0 / 4.0)).round() as u32)
    } else if ratio > 4.0 / 3.0 {
        ((height as f64 * 4.0 / 3.0).round() as u32, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// Training-time transform: random crop box, resize to the training size with the evaluation's
/// filter, random flip, then the encoder's rescale and normalisation.
pub struct Augment {
    resize: Preprocessor,
}

impl Augment {
    pub fn new(eval: &Preprocessor, size: (u32, u32)) -> Self {
        let mut resize = eval.clone();
        resize.resize = Some(ResizeTo::Exact { height: size.0, width: size.1 });
        resize.crop = None;
        Self { resize }
    }

    pub fn apply(&self, image: RgbImage, rng: &mut StdRng) -> Result<Vec<f32>> {
        let (x, y, w, h) = random_resized_crop_box(image.width(), image.height(), rng);
        let mut crop = image::imageops::crop_imm(&image, x, y, w, h).to_image();
        if rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut crop);
        }
        self.resize.process(&DynamicImage::ImageRgb8(crop))
    }
}
