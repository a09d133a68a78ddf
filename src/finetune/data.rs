//! Images for finetuning: seeded epoch order, torchvision's RandomResizedCrop + horizontal flip
//! for training, the encoder's own preprocessing for evaluation, and similarity embeddings looked
//! up per image in a feature store. Batches are prepared in parallel.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use image::{DynamicImage, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::data::images::ImageDataset;
use crate::data::store::FeatureStore;
use crate::encoders::preprocess::{Preprocessor, Resample, ResizeTo};

/// One prepared batch.
pub struct Batch {
    /// (rows, 3·H·W) pixel values.
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    /// Dataset item indices.
    pub items: Vec<usize>,
}

/// The items of epoch `epoch`, shuffled by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}

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

/// Training-time transform: random crop box, bilinear resize to the model size, random flip,
/// then the encoder's rescale and normalisation.
pub struct Augment {
    resize: Preprocessor,
}

impl Augment {
    pub fn new(eval: &Preprocessor, size: (u32, u32)) -> Self {
        let mut resize = eval.clone();
        resize.resize = Some(ResizeTo::Exact { height: size.0, width: size.1 });
        resize.resample = Resample::Bilinear;
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

/// Single-label classes of every item, checked against the class count.
pub fn class_labels(dataset: &dyn ImageDataset) -> Result<Vec<u32>> {
    let n_classes = dataset.class_names().len();
    (0..dataset.len())
        .map(|i| match dataset.labels(i).as_slice() {
            [c] if (*c as usize) < n_classes => Ok(*c),
            [c] => bail!("{}: class {c} is outside the {n_classes} classes", dataset.path(i)),
            other => bail!(
                "{}: finetuning needs exactly one class per image, found {other:?}",
                dataset.path(i)
            ),
        })
        .collect()
}

/// Prepares the items `items` (training augmentation when `augment` is given, seeded by
/// (seed, epoch, item)). Unreadable images are errors here: a classifier cannot skip labels.
pub fn prepare(
    dataset: &dyn ImageDataset,
    labels: &[u32],
    items: &[usize],
    eval: &Preprocessor,
    augment: Option<(&Augment, u64, usize)>,
) -> Result<Batch> {
    let pixels: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&i| {
            let image = dataset.load(i)?;
            match augment {
                Some((aug, seed, epoch)) => {
                    let mut rng = StdRng::seed_from_u64(
                        seed ^ ((epoch as u64) << 40)
                            ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
                    );
                    aug.apply(image, &mut rng)
                }
                None => eval.process(&DynamicImage::ImageRgb8(image)),
            }
            .with_context(|| dataset.path(i))
        })
        .collect::<Result<_>>()?;
    Ok(Batch {
        pixels: pixels.concat(),
        labels: items.iter().map(|&i| labels[i]).collect(),
        items: items.to_vec(),
    })
}

/// Rows of a similarity feature store, by image path.
pub struct SimilarityLookup<'a> {
    store: &'a FeatureStore,
    /// dataset item → store row.
    rows: Vec<u32>,
}

impl<'a> SimilarityLookup<'a> {
    /// Maps every item of `dataset` to its row in `store`; every image must be there.
    pub fn new(store: &'a FeatureStore, dataset: &dyn ImageDataset) -> Result<Self> {
        let by_path: HashMap<&str, u32> =
            (0..store.len()).map(|r| (store.path(r), r as u32)).collect();
        let mut rows = Vec::with_capacity(dataset.len());
        let mut missing = Vec::new();
        for i in 0..dataset.len() {
            let path = dataset.path(i);
            match by_path.get(path.as_str()) {
                Some(&r) => rows.push(r),
                None => {
                    missing.push(path);
                    rows.push(0);
                }
            }
        }
        ensure!(
            missing.is_empty(),
            "similarity store {} lacks {} of the {} images of the data set (e.g. {}); extract it from the same images",
            store.dir().display(),
            missing.len(),
            dataset.len(),
            missing[0]
        );
        Ok(Self { store, rows })
    }

    pub fn dim(&self) -> usize {
        self.store.dim()
    }

    /// (items, D) embeddings of the given items.
    pub fn read(&self, items: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let rows: Vec<u32> = items.iter().map(|&i| self.rows[i]).collect();
        self.store.read_rows(&rows, out)
    }
}
