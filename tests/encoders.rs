//! Encoders against PyTorch/transformers outputs on tiny checkpoints with real tensor names
//! (tests/fixtures/encoders, made by scripts/make_encoder_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mono::config::{EncoderKind, EncoderOutput};
use mono::encoders::{self, hub};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders").join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn max_relative_error(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims());
    let a = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = theirs.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0f32, f32::max)
}

fn check(name: &str, kind: EncoderKind, output: EncoderOutput, reference_tensor: &str, dim: usize) {
    let files = hub::resolve(fixture(name).to_str().unwrap(), "main").unwrap();
    let encoder = encoders::load_from_files(kind, output, &files, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(encoder.dim(), dim, "{name}");
    let r = reference(name);
    let ours = encoder.forward(&r["pixel_values"]).unwrap();
    let err = max_relative_error(&ours, &r[reference_tensor]);
    assert!(err <= 1e-4, "{name} {reference_tensor}: max relative error {err:e}");
}

#[test]
fn clip_towers_match_transformers() {
    check("clip_vision", EncoderKind::Clip, EncoderOutput::Pooler, "pooler_output", 32);
    check("clip_vision_proj", EncoderKind::Clip, EncoderOutput::ImageEmbeds, "image_embeds", 16);
    check("clip_vision_proj", EncoderKind::Clip, EncoderOutput::Pooler, "pooler_output", 32);
    check("clip_full", EncoderKind::Clip, EncoderOutput::ImageEmbeds, "image_embeds", 16);
    check("clip_full", EncoderKind::Clip, EncoderOutput::Pooler, "pooler_output", 32);
}

#[test]
fn siglip2_and_vit_match_transformers() {
    check("siglip2", EncoderKind::Siglip2, EncoderOutput::Pooled, "pooler_output", 32);
    check("siglip2_full", EncoderKind::Siglip2, EncoderOutput::Pooled, "pooler_output", 32);
    check("vit", EncoderKind::Vit, EncoderOutput::Cls, "cls_after_layernorm", 32);
    check("vit_cls", EncoderKind::Vit, EncoderOutput::Cls, "cls_after_layernorm", 32);
}

fn load_err(name: &str, kind: EncoderKind, output: EncoderOutput) -> String {
    let files = hub::resolve(fixture(name).to_str().unwrap(), "main").unwrap();
    match encoders::load_from_files(kind, output, &files, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{name} should not load as {kind:?}/{output:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn unsupported_layouts_fail_clearly() {
    assert!(load_err("clip_vision", EncoderKind::Clip, EncoderOutput::ImageEmbeds)
        .contains("no visual_projection"));
    assert!(
        load_err("siglip2_naflex", EncoderKind::Siglip2, EncoderOutput::Pooled).contains("NaFlex")
    );
    assert!(load_err("resnet50_hf", EncoderKind::Resnet50, EncoderOutput::Pooled)
        .contains("timm/resnet50.tv_in1k"));
    let e = load_err("vit", EncoderKind::Clip, EncoderOutput::Pooler);
    assert!(e.contains("no CLIP vision tower"), "{e}");
}

/// torchvision ResNet-50 with the fixture's procedural weights (weights_spec.json).
fn procedural_resnet50(path: &Path) {
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("resnet50_torchvision").join("weights_spec.json"))
            .unwrap(),
    )
    .unwrap();
    let mut tensors = HashMap::new();
    for t in spec["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap().to_string();
        let shape: Vec<usize> =
            t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        if t["dtype"] == "I64" {
            tensors.insert(name, Tensor::zeros(shape, DType::I64, &Device::Cpu).unwrap());
            continue;
        }
        let seed: u64 = t["seed"].as_str().unwrap().parse().unwrap();
        let center = t["center"].as_f64().unwrap();
        let hw = t["halfwidth_m"].as_i64().unwrap() as f64
            * 2f64.powi(t["halfwidth_e"].as_i64().unwrap() as i32);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n as u64)
            .map(|i| {
                let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E3779B97F4A7C15));
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                let x = (2.0 * (z >> 40) as f64 + 1.0) / (1u64 << 24) as f64 - 1.0;
                (center + hw * x) as f32
            })
            .collect();
        for (index, bits) in t["check"].as_object().unwrap() {
            let expected = u32::from_str_radix(bits.as_str().unwrap(), 16).unwrap();
            assert_eq!(
                values[index.parse::<usize>().unwrap()].to_bits(),
                expected,
                "{name}[{index}]"
            );
        }
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn resnet50_matches_torchvision_and_skips_num_batches_tracked() {
    let dir = tempfile::tempdir().unwrap();
    procedural_resnet50(&dir.path().join("model.safetensors"));
    let files = hub::resolve(dir.path().to_str().unwrap(), "main").unwrap();
    assert!(files.config.is_none());
    let encoder = encoders::load_from_files(
        EncoderKind::Resnet50,
        EncoderOutput::Pooled,
        &files,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(encoder.dim(), 2048);
    let r = reference("resnet50_torchvision");
    let err = max_relative_error(&encoder.forward(&r["pixel_values"]).unwrap(), &r["pooled"]);
    assert!(err <= 1e-4, "ResNet-50 pooled: max relative error {err:e}");
}

#[test]
fn half_precision_loads_and_stays_close() {
    let files = hub::resolve(fixture("clip_vision_proj").to_str().unwrap(), "main").unwrap();
    let encoder = encoders::load_from_files(
        EncoderKind::Clip,
        EncoderOutput::ImageEmbeds,
        &files,
        DType::F16,
        &Device::Cpu,
    )
    .unwrap();
    let r = reference("clip_vision_proj");
    let ours = encoder.forward(&r["pixel_values"].to_dtype(DType::F16).unwrap()).unwrap();
    assert!(max_relative_error(&ours, &r["image_embeds"]) < 0.02);
    let bf16 = encoders::load_from_files(
        EncoderKind::Clip,
        EncoderOutput::ImageEmbeds,
        &files,
        DType::BF16,
        &Device::Cpu,
    );
    assert!(bf16.err().unwrap().to_string().contains("not supported on the CPU"));
}
