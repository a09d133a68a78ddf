//! `mono bench decode`: images/s of JPEG decoding and of decoding + preprocessing (torchvision's
//! ImageNet transform), on one thread and on all, for mono's decoder (libjpeg-turbo, PIL's pixels)
//! beside the `image` crate's pure-Rust one (zune-jpeg, what mono used before).
//!
//! Files are read into memory first: this times the CPU work, not the disk. Without `--images`,
//! 64 ImageNet-like JPEGs (500×375, quality 90, 4:2:0, baseline) are made from a procedural photo.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageFormat};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::images::{decode_image_bytes, is_image_file};
use crate::data::preprocess::Preprocessor;

#[derive(Clone, Debug, clap::Args)]
pub struct DecodeBenchArgs {
    /// A folder of JPEG files to decode (its top level only); default: 64 generated ones.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Passes over all images per measurement (the best pass is reported).
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeTiming {
    pub decoder: String,
    pub work: String,
    pub threads: usize,
    pub images_per_second: f64,
}

type Decoder = fn(&[u8]) -> Result<DynamicImage>;

pub fn run(args: &DecodeBenchArgs) -> Result<Vec<DecodeTiming>> {
    let files = match &args.images {
        Some(dir) => read_folder(dir)?,
        None => (0..64).map(synthetic_jpeg).collect::<Result<_>>()?,
    };
    if files.is_empty() {
        bail!("no JPEG files in {}", args.images.as_ref().unwrap().display());
    }
    let pre = Preprocessor::torchvision_imagenet(256, 224);
    let decoders: [(&str, Decoder); 2] =
        [("libjpeg-turbo (mono)", decode_image_bytes), ("zune-jpeg (image crate)", zune)];
    let all = rayon::current_num_threads();
    println!("{} JPEG files, best of {} passes", files.len(), args.passes);
    println!("{:<26} {:<20} {:>8} {:>10}", "decoder", "work", "threads", "images/s");
    let mut out = Vec::new();
    for (name, decode) in decoders {
        for (work, with_preprocessing) in [("decode", false), ("decode + preprocess", true)] {
            for threads in [1, all] {
                let one = |bytes: &Vec<u8>| -> Result<()> {
                    let image = decode(bytes)?;
                    if with_preprocessing {
                        std::hint::black_box(pre.process(&image)?);
                    } else {
                        std::hint::black_box(image);
                    }
                    Ok(())
                };
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
                let mut best = f64::INFINITY;
                for _ in 0..args.passes.max(1) {
                    let start = Instant::now();
                    pool.install(|| files.par_iter().try_for_each(one))?;
                    best = best.min(start.elapsed().as_secs_f64());
                }
                let rate = files.len() as f64 / best;
                println!("{name:<26} {work:<20} {threads:>8} {rate:>10.1}");
                out.push(DecodeTiming {
                    decoder: name.into(),
                    work: work.into(),
                    threads,
                    images_per_second: rate,
                });
            }
        }
    }
    if let Some(path) = &args.json {
        super::write_json(path, serde_json::json!({"benchmark": "decode", "timings": &out}))?;
    }
    Ok(out)
}

fn zune(bytes: &[u8]) -> Result<DynamicImage> {
    Ok(image::load_from_memory_with_format(bytes, ImageFormat::Jpeg)?)
}

fn read_folder(dir: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image_file(p))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if crate::data::images::is_jpeg(&bytes) {
            files.push(bytes);
        }
    }
    Ok(files)
}

/// A 500×375 photo-like picture (smooth shading, edges and grain), as a baseline 4:2:0 JPEG.
fn synthetic_jpeg(seed: usize) -> Result<Vec<u8>> {
    let (w, h) = (500usize, 375usize);
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (seed as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let grain = (state % 24) as f32 - 12.0;
            let (fx, fy) = (x as f32, y as f32);
            let edge = if (fx - 250.0).powi(2) + (fy - 190.0).powi(2) < 90.0f32.powi(2) {
                60.0
            } else {
                0.0
            };
            for c in 0..3 {
                let phase = seed as f32 * 0.7 + c as f32 * 2.1;
                let shade =
                    128.0 + 70.0 * ((fx * 0.013 + phase).sin() * (fy * 0.021 - phase).cos());
                pixels.push((shade + edge + grain).clamp(0.0, 255.0) as u8);
            }
        }
    }
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    compress.set_fastest_defaults();
    compress.set_size(w, h);
    compress.set_quality(90.0);
    let mut started = compress.start_compress(Vec::new())?;
    started.write_scanlines(&pixels)?;
    Ok(started.finish()?)
}
