//! JPEG decoding against Pillow (fixtures written by scripts/make_jpeg_fixtures.py): every layout
//! decodes to Pillow's exact pixels, a truncated file is refused as Pillow refuses it, and decode
//! + CLIP preprocessing gives the processor's pixel values bit for bit.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::DynamicImage;
use mono::data::images::load_image_file;
use mono::data::preprocess::Preprocessor;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("jpeg/jpeg.json")).unwrap()).unwrap()
}

#[test]
fn every_layout_decodes_to_pillows_pixels() {
    let files = manifest()["files"].as_object().unwrap().clone();
    let mut checked = 0;
    for (name, info) in &files {
        if info.get("pillow_error").is_some() {
            continue;
        }
        let ours = load_image_file(&fixtures().join(format!("jpeg/{name}.jpg"))).unwrap();
        let pillow =
            image::open(fixtures().join(format!("jpeg/{name}.pillow.png"))).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), pillow.dimensions(), "{name}");
        let differing = ours.as_raw().iter().zip(pillow.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name} ({info}): {differing} samples differ from Pillow");
        checked += 1;
    }
    // Greyscale, CMYK, RGB-coded, progressive and each subsampling are all among them.
    assert!(checked >= 11, "only {checked} fixtures");
}

#[test]
fn a_truncated_jpeg_is_an_error_naming_the_file() {
    let info = &manifest()["files"]["truncated"];
    assert!(info["pillow_error"].as_str().unwrap().contains("truncated"));
    let path = fixtures().join("jpeg/truncated.jpg");
    let err = format!("{:#}", load_image_file(&path).unwrap_err());
    assert!(err.contains("truncated.jpg") && err.contains("truncated"), "{err}");
}

#[test]
fn a_corrupt_jpeg_is_an_error_with_libjpegs_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.jpg");
    // A valid start of image, then an SOF with zero width.
    std::fs::write(&path, b"\xFF\xD8\xFF\xC0\x00\x0B\x08\x00\x00\x00\x00\x01\x01\x11\x00").unwrap();
    let err = format!("{:#}", load_image_file(&path).unwrap_err());
    assert!(err.contains("bad.jpg") && err.contains("cannot decode"), "{err}");
}

#[test]
fn decode_and_clip_preprocessing_match_the_processor_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("preprocess/preprocess.json")).unwrap(),
    )
    .unwrap();
    let settings = tmp.path().join("clip.json");
    std::fs::write(&settings, meta["families"]["clip"]["processor_settings"].to_string()).unwrap();
    let pre = Preprocessor::from_hf_json(&settings).unwrap();
    let refs =
        candle_core::safetensors::load(fixtures().join("jpeg/clip.safetensors"), &Device::Cpu)
            .unwrap();
    let stems = manifest()["clip"]["images"].as_array().unwrap().clone();
    assert!(!stems.is_empty());
    for stem in stems {
        let stem = stem.as_str().unwrap();
        let rgb = load_image_file(&fixtures().join(format!("jpeg/{stem}.jpg"))).unwrap();
        let ours = pre.process(&DynamicImage::ImageRgb8(rgb)).unwrap();
        let theirs: Vec<f32> =
            refs[stem].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{stem}");
        let differing = ours
            .iter()
            .zip(&theirs)
            .filter(|(&o, &t)| half::f16::from_f32(o).to_f32() != t)
            .count();
        assert_eq!(differing, 0, "{stem}: {differing} values differ after float16 rounding");
    }
}
