//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A tiny torchvision-layout bottleneck ResNet ([1,1,1,1] blocks, stem width `w`) with random
/// weights, saved as `dir/model.safetensors`.
pub fn tiny_resnet(dir: &Path, w: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let conv = |t: &mut HashMap<String, Tensor>,
                rng: &mut StdRng,
                name: &str,
                o: usize,
                i: usize,
                k: usize| {
        let fan_in = (i * k * k) as f32;
        let v: Vec<f32> = (0..o * i * k * k)
            .map(|_| StandardNormal.sample(rng))
            .map(|x: f32| x * (2.0 / fan_in).sqrt())
            .collect();
        t.insert(
            format!("{name}.weight"),
            Tensor::from_vec(v, (o, i, k, k), &Device::Cpu).unwrap(),
        );
    };
    let bn = |t: &mut HashMap<String, Tensor>, rng: &mut StdRng, name: &str, c: usize| {
        let r = |rng: &mut StdRng, center: f32, width: f32| -> Tensor {
            Tensor::from_vec(
                (0..c).map(|_| center + width * rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(),
                c,
                &Device::Cpu,
            )
            .unwrap()
        };
        t.insert(format!("{name}.weight"), r(rng, 1.0, 0.1));
        t.insert(format!("{name}.bias"), r(rng, 0.0, 0.1));
        t.insert(format!("{name}.running_mean"), r(rng, 0.0, 0.1));
        t.insert(format!("{name}.running_var"), r(rng, 1.0, 0.2));
        t.insert(
            format!("{name}.num_batches_tracked"),
            Tensor::zeros((), DType::I64, &Device::Cpu).unwrap(),
        );
    };
    conv(&mut t, &mut rng, "conv1", w, 3, 7);
    bn(&mut t, &mut rng, "bn1", w);
    let mut inp = w;
    for stage in 1..=4 {
        let width = w / 2 * (1 << (stage - 1));
        let out = width * 4;
        let base = format!("layer{stage}.0");
        conv(&mut t, &mut rng, &format!("{base}.conv1"), width, inp, 1);
        bn(&mut t, &mut rng, &format!("{base}.bn1"), width);
        conv(&mut t, &mut rng, &format!("{base}.conv2"), width, width, 3);
        bn(&mut t, &mut rng, &format!("{base}.bn2"), width);
        conv(&mut t, &mut rng, &format!("{base}.conv3"), out, width, 1);
        bn(&mut t, &mut rng, &format!("{base}.bn3"), out);
        conv(&mut t, &mut rng, &format!("{base}.downsample.0"), out, inp, 1);
        bn(&mut t, &mut rng, &format!("{base}.downsample.1"), out);
        inp = out;
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// What a `mono` command printed and whether it succeeded.
pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `mono` binary with `--quiet`.
pub fn mono(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(args)
        .arg("--quiet")
        .output()
        .expect("run mono");
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// A seeded standard-normal tensor scaled by `std` (candle's own `randn` is unseeded).
pub fn seeded_randn(shape: &[usize], std: f64, dtype: DType, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> =
        (0..n).map(|_| StandardNormal.sample(&mut rng)).map(|x: f64| x * std).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// The device of the portable-kernel side of the tests: MONO_TEST_DEVICE (e.g. "cuda"), else the
/// CPU. scripts/gpu_check.sh sets it on a GPU machine.
pub fn test_device() -> Device {
    match std::env::var("MONO_TEST_DEVICE") {
        Ok(spec) => mono::base::device::open_device(&spec)
            .unwrap_or_else(|e| panic!("MONO_TEST_DEVICE = {spec:?}: {e:#}")),
        Err(_) => Device::Cpu,
    }
}

/// The device spec of `test_device` for configs.
pub fn test_device_spec() -> String {
    std::env::var("MONO_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}
