//! Preprocessing parity with the committed PyTorch/transformers references (no Python needed),
//! `preprocessor_config.json` parsing, unusual input layouts, and hand-computed resizes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::{
    DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage,
};
use mono::data::preprocess::{Alpha, CropRounding, Preprocessor, Resample, ResizeTo};

// The binary's allocator, so that the timing test sees the buffer reuse extraction gets.
#[global_allocator]
static ALLOCATOR: mono::base::alloc::PeakTrackingAllocator =
    mono::base::alloc::PeakTrackingAllocator;

const STEMS: [&str; 4] = ["coffee", "astronaut", "camera", "chelsea_rgba"];
#[allow(clippy::excessive_precision)]
const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const OPENAI_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn photo(stem: &str) -> DynamicImage {
    image::open(fixtures().join(format!("preprocess/images/{stem}.png"))).unwrap()
}

/// The settings a family's reference used: the processor's own config (written to a file and read
/// back through `from_hf_json`), or torchvision's transform.
fn family_preprocessor(family: &str, dir: &Path) -> Preprocessor {
    if family == "resnet_torchvision" {
        return Preprocessor::torchvision_imagenet(256, 224);
    }
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("preprocess/preprocess.json")).unwrap(),
    )
    .unwrap();
    let path = dir.join(format!("{family}.json"));
    std::fs::write(&path, meta["families"][family]["processor_settings"].to_string()).unwrap();
    Preprocessor::from_hf_json(&path).unwrap()
}

#[test]
fn parity_with_reference_pixel_values() {
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<DynamicImage> = STEMS.iter().map(|s| photo(s)).collect();
    for family in ["clip", "siglip2", "vit", "resnet_torchvision"] {
        let pre = family_preprocessor(family, tmp.path());
        assert_eq!(pre.output_size(), Some((224, 224)), "{family}");
        let refs = candle_core::safetensors::load(
            fixtures().join(format!("preprocess/{family}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let batch = pre.process_batch(&images).unwrap();
        let n = 3 * 224 * 224;
        assert_eq!(batch.len(), STEMS.len() * n);
        let mut worst_levels = 0f32;
        let mut f16_mismatches = 0usize;
        for (i, stem) in STEMS.iter().enumerate() {
            let ours = pre.process(&images[i]).unwrap();
            assert_eq!(&batch[i * n..(i + 1) * n], &ours[..], "{family}/{stem}: batch != single");
            let theirs = &refs[*stem];
            assert_eq!(theirs.dims(), &[3, 224, 224], "{family}/{stem}");
            assert_eq!(theirs.dtype(), DType::F16);
            let theirs: Vec<f32> =
                theirs.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (k, (&o, &t)) in ours.iter().zip(&theirs).enumerate() {
                let std = pre.std[k / (224 * 224)];
                // One u8 level, plus the float16 storage rounding (half an f16 ulp, ≤ 2^-10 here).
                let tol = 1.0 / 255.0 / std + 1.0 / 1024.0;
                let diff = (o - t).abs();
                assert!(diff <= tol, "{family}/{stem} at {k}: ours {o}, reference {t}");
                worst_levels = worst_levels.max(diff * std * 255.0);
                f16_mismatches += (half::f16::from_f32(o).to_f32() != t) as usize;
            }
        }
        println!(
            "{family}: max |ours - reference| = {worst_levels:.4} u8 levels; {f16_mismatches} of {} values \
             differ after rounding ours to float16",
            STEMS.len() * n
        );
        // The 8-bit intermediate is Pillow's exactly, so the stored float16 values match bit for bit.
        assert_eq!(f16_mismatches, 0, "{family}");
    }
}

#[test]
fn crop_offsets_of_the_fixtures() {
    // torchvision rounds 57.5 to 58 (astronaut 256x339); transformers floors 56.5 to 56 (chelsea 337x224).
    let tv = Preprocessor::torchvision_imagenet(256, 224);
    let floor = Preprocessor { crop_rounding: CropRounding::Floor, ..tv.clone() };
    let a = photo("astronaut");
    assert_ne!(tv.process(&a).unwrap(), floor.process(&a).unwrap());
}

fn expect_eq(name: &str, got: &Preprocessor, want: &Preprocessor) {
    assert_eq!(got, want, "{name}");
}

#[test]
fn from_hf_json_on_every_encoder_fixture() {
    let clip = Preprocessor {
        resize: Some(ResizeTo::ShortestEdge(32)),
        resample: Resample::Bicubic,
        crop: Some((32, 32)),
        crop_rounding: CropRounding::Floor,
        rescale: Some(0.00392156862745098),
        mean: OPENAI_MEAN,
        std: OPENAI_STD,
        alpha: Alpha::CompositeWhite,
    };
    let siglip = Preprocessor {
        resize: Some(ResizeTo::Exact { height: 32, width: 32 }),
        resample: Resample::Bilinear,
        crop: None,
        mean: [0.5; 3],
        std: [0.5; 3],
        ..clip.clone()
    };
    let vit = Preprocessor { alpha: Alpha::Drop, ..siglip.clone() };
    // ConvNext: shortest edge int(32 / 0.875) = 36, then its own 32x32 centre crop.
    let resnet_hf = Preprocessor {
        resize: Some(ResizeTo::ShortestEdge(36)),
        resample: Resample::Bicubic,
        crop: Some((32, 32)),
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        alpha: Alpha::Drop,
        ..clip.clone()
    };
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures().join("encoders")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            assert_eq!(name, "resnet50_torchvision", "{name} has no preprocessor_config.json");
            continue;
        }
        seen += 1;
        let got = Preprocessor::from_hf_json(&path);
        match name.as_str() {
            "clip_full" | "clip_vision" | "clip_vision_proj" => {
                expect_eq(&name, &got.unwrap(), &clip)
            }
            "siglip2" | "siglip2_full" => expect_eq(&name, &got.unwrap(), &siglip),
            "vit" | "vit_cls" => expect_eq(&name, &got.unwrap(), &vit),
            "resnet50_hf" => expect_eq(&name, &got.unwrap(), &resnet_hf),
            "siglip2_naflex" => {
                let msg = format!("{:#}", got.unwrap_err());
                assert!(msg.contains("NaFlex") && msg.contains(path.to_str().unwrap()), "{msg}");
            }
            other => panic!("no expected settings for fixture {other}"),
        }
        let Ok(pre) = Preprocessor::from_hf_json(&path) else { continue };
        assert_eq!(pre.output_size(), Some((32, 32)), "{name}");
        assert_eq!(pre.process(&photo("coffee")).unwrap().len(), 3 * 32 * 32, "{name}");
    }
    assert_eq!(seen, 9);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn from_hf_json_fills_class_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let only = |class: &str| {
        Preprocessor::from_hf_json(&write(
            tmp.path(),
            "p.json",
            &format!(r#"{{"image_processor_type": "{class}"}}"#),
        ))
        .unwrap()
    };

    let clip = only("CLIPImageProcessor");
    assert_eq!(clip.resize, Some(ResizeTo::ShortestEdge(224)));
    assert_eq!(
        (clip.resample, clip.crop, clip.mean, clip.std),
        (Resample::Bicubic, Some((224, 224)), OPENAI_MEAN, OPENAI_STD)
    );
    assert_eq!(clip.rescale, Some(1.0 / 255.0));
    // transformers 5.24's SigLIP class default is bicubic (checkpoints state their own value).
    let siglip = only("SiglipImageProcessor");
    assert_eq!(
        (siglip.resample, siglip.resize, siglip.crop),
        (Resample::Bicubic, Some(ResizeTo::Exact { height: 224, width: 224 }), None)
    );
    assert_eq!(siglip.alpha, Alpha::CompositeWhite);
    let vit = only("ViTImageProcessorFast");
    assert_eq!((vit.resample, vit.alpha, vit.mean), (Resample::Bilinear, Alpha::Drop, [0.5; 3]));
    let convnext = only("ConvNextImageProcessor");
    assert_eq!(
        (convnext.resize, convnext.crop),
        (Some(ResizeTo::Exact { height: 384, width: 384 }), None)
    );
    let bit = only("BitImageProcessorPil");
    assert_eq!((bit.resize, bit.crop), (Some(ResizeTo::ShortestEdge(224)), Some((224, 224))));

    // An integer size is a shortest edge for CLIP but a square for ViT; null means "default".
    let p = write(
        tmp.path(),
        "a.json",
        r#"{"feature_extractor_type": "CLIPFeatureExtractor", "size": 256, "crop_size": 240, "resample": null}"#,
    );
    let p = Preprocessor::from_hf_json(&p).unwrap();
    assert_eq!(
        (p.resize, p.crop, p.resample),
        (Some(ResizeTo::ShortestEdge(256)), Some((240, 240)), Resample::Bicubic)
    );
    let p = write(
        tmp.path(),
        "b.json",
        r#"{"image_processor_type": "ViTImageProcessor", "size": 384, "image_mean": 0.25}"#,
    );
    let p = Preprocessor::from_hf_json(&p).unwrap();
    assert_eq!((p.resize, p.mean), (Some(ResizeTo::Exact { height: 384, width: 384 }), [0.25; 3]));
    // Switches off: no resize, no rescale, no normalisation.
    let p = write(
        tmp.path(),
        "c.json",
        r#"{"image_processor_type": "SiglipImageProcessor", "do_resize": false, "do_rescale": false, "do_normalize": false}"#,
    );
    let p = Preprocessor::from_hf_json(&p).unwrap();
    assert_eq!(
        (p.resize, p.rescale, p.mean, p.std, p.output_size()),
        (None, None, [0.0; 3], [1.0; 3], None)
    );
    let rgb = RgbImage::from_fn(3, 2, |x, y| Rgb([x as u8, 10 * y as u8, 200]));
    assert_eq!(
        p.process(&DynamicImage::ImageRgb8(rgb)).unwrap(),
        vec![0., 1., 2., 0., 1., 2., 0., 0., 0., 10., 10., 10., 200., 200., 200., 200., 200., 200.]
    );
}

#[test]
fn from_hf_json_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("absent/preprocessor_config.json");
    let cases = [
        missing.clone(),
        write(tmp.path(), "bad.json", "{not json"),
        write(tmp.path(), "list.json", "[1, 2]"),
        write(tmp.path(), "notype.json", r#"{"size": 224}"#),
        write(tmp.path(), "unknown.json", r#"{"image_processor_type": "LlavaNextImageProcessor"}"#),
        write(
            tmp.path(),
            "resample.json",
            r#"{"image_processor_type": "CLIPImageProcessor", "resample": "bicubic"}"#,
        ),
        write(
            tmp.path(),
            "code.json",
            r#"{"image_processor_type": "CLIPImageProcessor", "resample": 9}"#,
        ),
        write(
            tmp.path(),
            "size.json",
            r#"{"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 224}}"#,
        ),
        write(
            tmp.path(),
            "zero.json",
            r#"{"image_processor_type": "ViTImageProcessor", "size": {"height": 0, "width": 4}}"#,
        ),
        write(
            tmp.path(),
            "mean.json",
            r#"{"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]}"#,
        ),
        write(
            tmp.path(),
            "std.json",
            r#"{"image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0, 0.5]}"#,
        ),
        write(
            tmp.path(),
            "crop.json",
            r#"{"image_processor_type": "SiglipImageProcessor", "do_center_crop": true}"#,
        ),
        write(
            tmp.path(),
            "flag.json",
            r#"{"image_processor_type": "ViTImageProcessor", "do_resize": "yes"}"#,
        ),
    ];
    for path in cases {
        let err = Preprocessor::from_hf_json(&path).expect_err(&path.display().to_string());
        let msg = format!("{err:#}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    }
}

/// A small photo-like RGB pattern.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 13 + y * 7) as u8, (x * y) as u8, 255 - (x * 3) as u8])
    })
}

fn small(resample: Resample, alpha: Alpha) -> Preprocessor {
    Preprocessor {
        resize: Some(ResizeTo::ShortestEdge(8)),
        resample,
        crop: Some((8, 8)),
        crop_rounding: CropRounding::Floor,
        rescale: Some(1.0 / 255.0),
        mean: [0.5; 3],
        std: [0.25; 3],
        alpha,
    }
}

#[test]
fn grayscale_and_16_bit_inputs() {
    let gray = GrayImage::from_fn(19, 13, |x, y| Luma([(x * 11 + y * 5) as u8]));
    let as_rgb = RgbImage::from_fn(19, 13, |x, y| {
        let v = gray.get_pixel(x, y)[0];
        Rgb([v, v, v])
    });
    let pre = small(Resample::Bicubic, Alpha::CompositeWhite);
    let want = pre.process(&DynamicImage::ImageRgb8(as_rgb.clone())).unwrap();
    assert_eq!(pre.process(&DynamicImage::ImageLuma8(gray.clone())).unwrap(), want);

    // 16-bit keeps the high byte (what PIL does for 16-bit RGB PNGs); low bytes must not matter.
    let gray16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(19, 13, |x, y| {
        Luma([gray.get_pixel(x, y)[0] as u16 * 256 + (x * 37 % 256) as u16])
    });
    assert_eq!(pre.process(&DynamicImage::ImageLuma16(gray16)).unwrap(), want);

    let rgb = pattern(23, 17);
    let want = pre.process(&DynamicImage::ImageRgb8(rgb.clone())).unwrap();
    let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(23, 17, |x, y| {
        let p = rgb.get_pixel(x, y);
        Rgb([p[0] as u16 * 257, p[1] as u16 * 256 + 255, p[2] as u16 * 256 + y as u16])
    });
    // Through a real 16-bit PNG, decoded by the `image` crate.
    let mut png = Vec::new();
    DynamicImage::ImageRgb16(rgb16)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert!(matches!(decoded, DynamicImage::ImageRgb16(_)));
    assert_eq!(pre.process(&decoded).unwrap(), want);
}

#[test]
fn alpha_conventions() {
    let rgb = pattern(21, 15);
    let with_alpha = |a: fn(u32, u32) -> u8| {
        DynamicImage::ImageRgba8(RgbaImage::from_fn(21, 15, |x, y| {
            let p = rgb.get_pixel(x, y);
            Rgba([p[0], p[1], p[2], a(x, y)])
        }))
    };
    let opaque = with_alpha(|_, _| 255);
    let clear = with_alpha(|_, _| 0);
    let faded = with_alpha(|x, _| (x * 12) as u8);
    let composite = small(Resample::Bilinear, Alpha::CompositeWhite);
    let drop = small(Resample::Bilinear, Alpha::Drop);
    let plain = composite.process(&DynamicImage::ImageRgb8(rgb.clone())).unwrap();

    // Opaque RGBA is plain RGB either way; dropping alpha ignores it whatever it is.
    assert_eq!(composite.process(&opaque).unwrap(), plain);
    assert_eq!(drop.process(&opaque).unwrap(), plain);
    assert_eq!(drop.process(&clear).unwrap(), plain);
    assert_eq!(drop.process(&faded).unwrap(), plain);
    // Fully transparent composites to white: (1 - 0.5) / 0.25 = 2 everywhere.
    assert!(composite.process(&clear).unwrap().iter().all(|&v| v == 2.0));
    assert_ne!(composite.process(&faded).unwrap(), plain);

    // Gray + alpha: the same rules on one replicated channel.
    let la = GrayAlphaImage::from_fn(21, 15, |x, y| {
        image::LumaA([(x * 9 + y) as u8, if x < 5 { 0 } else { 255 }])
    });
    let gray = GrayImage::from_fn(21, 15, |x, y| Luma([(x * 9 + y) as u8]));
    let white_left =
        GrayImage::from_fn(21, 15, |x, y| Luma([if x < 5 { 255 } else { (x * 9 + y) as u8 }]));
    let la = DynamicImage::ImageLumaA8(la);
    assert_eq!(drop.process(&la).unwrap(), drop.process(&DynamicImage::ImageLuma8(gray)).unwrap());
    assert_eq!(
        composite.process(&la).unwrap(),
        composite.process(&DynamicImage::ImageLuma8(white_left)).unwrap()
    );
}

/// A preprocessor that returns raw u8 levels as floats.
fn raw(
    resize: Option<ResizeTo>,
    resample: Resample,
    crop: Option<(u32, u32)>,
    rounding: CropRounding,
) -> Preprocessor {
    Preprocessor {
        resize,
        resample,
        crop,
        crop_rounding: rounding,
        rescale: None,
        mean: [0.0; 3],
        std: [1.0; 3],
        alpha: Alpha::Drop,
    }
}

fn gray_row(values: &[u8]) -> DynamicImage {
    DynamicImage::ImageLuma8(GrayImage::from_raw(values.len() as u32, 1, values.to_vec()).unwrap())
}

#[test]
fn hand_computed_resizes() {
    let exact = |w| Some(ResizeTo::Exact { height: 1, width: w });
    // 4 -> 2 bilinear: support widened to 2 input pixels; border taps renormalised to 3/7, 3/7, 1/7.
    let p = raw(exact(2), Resample::Bilinear, None, CropRounding::Floor);
    assert_eq!(
        p.process(&gray_row(&[10, 20, 30, 40])).unwrap(),
        vec![17., 33., 17., 33., 17., 33.]
    );
    // 2 -> 4 bilinear: plain interpolation at 0.25, 0.75, 1.25, 1.75.
    let p = raw(exact(4), Resample::Bilinear, None, CropRounding::Floor);
    assert_eq!(p.process(&gray_row(&[0, 100])).unwrap()[..4], [0., 25., 75., 100.]);
    // 4 -> 2 box: plain pair means, 15 and 35.
    let p = raw(exact(2), Resample::Box, None, CropRounding::Floor);
    assert_eq!(p.process(&gray_row(&[10, 20, 30, 40])).unwrap()[..2], [15., 35.]);
    // 5 -> 2 nearest: sources 1.25 -> 1 and 3.75 -> 3.
    let p = raw(exact(2), Resample::Nearest, None, CropRounding::Floor);
    assert_eq!(p.process(&gray_row(&[10, 20, 30, 40, 50])).unwrap()[..2], [20., 40.]);
    // Same size: identity for every filter, with or without an explicit resize.
    let img = DynamicImage::ImageRgb8(pattern(6, 4));
    let planar: Vec<f32> = (0..3)
        .flat_map(|c| img.as_rgb8().unwrap().pixels().map(move |p| p[c] as f32).collect::<Vec<_>>())
        .collect();
    for f in [
        Resample::Nearest,
        Resample::Bilinear,
        Resample::Bicubic,
        Resample::Lanczos,
        Resample::Box,
        Resample::Hamming,
    ] {
        let p = raw(Some(ResizeTo::Exact { height: 4, width: 6 }), f, None, CropRounding::Floor);
        assert_eq!(p.process(&img).unwrap(), planar, "{f:?}");
    }
    assert_eq!(
        raw(None, Resample::Bicubic, None, CropRounding::Floor).process(&img).unwrap(),
        planar
    );
}

#[test]
fn crop_larger_than_image_pads_with_zero_levels() {
    // A 2x1 image centre-cropped to 5x1: transformers puts it at ceil(3/2) = 2, torchvision at 1.
    let img = gray_row(&[7, 9]);
    let hf = raw(None, Resample::Bilinear, Some((1, 5)), CropRounding::Floor);
    assert_eq!(hf.process(&img).unwrap()[..5], [0., 0., 7., 9., 0.]);
    let tv = raw(None, Resample::Bilinear, Some((1, 5)), CropRounding::HalfEven);
    assert_eq!(tv.process(&img).unwrap()[..5], [0., 7., 9., 0., 0.]);
    // Normalised padding is (0 - mean) / std.
    let norm = Preprocessor { rescale: Some(1.0 / 255.0), mean: [0.5; 3], std: [0.25; 3], ..hf };
    assert_eq!(norm.process(&img).unwrap()[0], -2.0);
}

#[test]
fn batch_needs_one_size_and_reports_bad_images() {
    let pre = raw(Some(ResizeTo::ShortestEdge(4)), Resample::Bilinear, None, CropRounding::Floor);
    assert_eq!(pre.output_size(), None);
    let a = DynamicImage::ImageRgb8(pattern(8, 6));
    let b = DynamicImage::ImageRgb8(pattern(16, 12));
    let c = DynamicImage::ImageRgb8(pattern(6, 8));
    // Same aspect ratio: same output size, so a batch works without a crop.
    assert_eq!(pre.process_batch(&[a.clone(), b.clone()]).unwrap().len(), 2 * 3 * 4 * 5);
    let err = pre.process_batch(&[a.clone(), c]).unwrap_err();
    assert!(format!("{err:#}").contains("image 1"), "{err:#}");
    let empty = DynamicImage::ImageRgb8(RgbImage::new(0, 0));
    assert!(pre.process(&empty).is_err());
    let fixed = small(Resample::Bicubic, Alpha::Drop);
    let err = fixed.process_batch(&[a, b, empty]).unwrap_err();
    assert!(format!("{err:#}").contains("image 2"), "{err:#}");
    assert!(fixed.process_batch(&[]).unwrap().is_empty());
    // Degenerate settings are errors, not panics.
    let zero = Preprocessor { crop: Some((0, 8)), ..fixed };
    assert!(zero.process(&DynamicImage::ImageRgb8(pattern(8, 8))).is_err());
}

#[test]
fn extreme_aspect_ratios() {
    // A 3000x2 strip: the shortest-edge resize is 336000x224, but only the 224x224 crop is computed.
    let strip = DynamicImage::ImageRgb8(pattern(3000, 2));
    for f in [Resample::Bilinear, Resample::Bicubic, Resample::Nearest] {
        let pre = Preprocessor { resample: f, ..Preprocessor::torchvision_imagenet(224, 224) };
        assert_eq!(pre.process(&strip).unwrap().len(), 3 * 224 * 224, "{f:?}");
    }
    // Without a crop the output itself would be 75 M pixels: refused, not allocated.
    let uncropped = Preprocessor { crop: None, ..Preprocessor::torchvision_imagenet(224, 224) };
    assert!(uncropped.process(&strip).is_err());
}

/// ms per image for a 500x375 photo-sized input (the typical ImageNet size) → 224x224.
/// `cargo test --release --test main preprocess -- --ignored --nocapture`
#[test]
#[ignore]
fn timing_500x375() {
    mono::base::alloc::configure_allocator();
    let src =
        image::imageops::crop_imm(photo("coffee").as_rgb8().unwrap(), 0, 0, 300, 200).to_image();
    // Tile the photo to 500x375 so the content is natural.
    let img = DynamicImage::ImageRgb8(RgbImage::from_fn(500, 375, |x, y| {
        *src.get_pixel(x % 300, y % 200)
    }));
    let tmp = tempfile::tempdir().unwrap();
    for (name, pre) in [
        (
            "torchvision resize 256 bilinear + crop 224",
            Preprocessor::torchvision_imagenet(256, 224),
        ),
        ("clip shortest 224 bicubic + crop 224", family_preprocessor("clip", tmp.path())),
        ("siglip2 squash 224x224 bilinear", family_preprocessor("siglip2", tmp.path())),
    ] {
        for _ in 0..20 {
            pre.process(&img).unwrap();
        }
        let n = 500;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(pre.process(&img).unwrap());
        }
        let single = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        let batch: Vec<DynamicImage> = (0..64).map(|_| img.clone()).collect();
        let t = std::time::Instant::now();
        for _ in 0..8 {
            std::hint::black_box(pre.process_batch(&batch).unwrap());
        }
        let batched = t.elapsed().as_secs_f64() * 1e3 / (8 * 64) as f64;
        println!("{name}: {single:.3} ms/image on one thread, {batched:.3} ms/image in process_batch ({} threads)", rayon::current_num_threads());
    }
}
