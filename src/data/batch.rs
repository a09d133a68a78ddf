//! Images decoded and preprocessed in parallel (rayon), for extraction and for finetuning, and
//! the seeded order in which finetuning visits a data set.

use anyhow::Result;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::images::ImageDataset;

/// The pixels of each item (`transform` of the decoded image), or why it could not be read or
/// transformed; in the order of `items`.
pub fn load_pixels(
    dataset: &dyn ImageDataset,
    items: &[usize],
    transform: impl Fn(usize, RgbImage) -> Result<Vec<f32>> + Sync,
) -> Vec<Result<Vec<f32>>> {
    items.par_iter().map(|&i| dataset.load(i).and_then(|image| transform(i, image))).collect()
}

/// The items `0..n` shuffled by (seed, epoch).
pub fn shuffled_items(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}
