//! SAEs between mono and SAELens, both ways (fixtures by scripts/make_saelens_fixtures.py):
//! SAEs SAELens wrote load in mono and give SAELens' latents and reconstructions; SAEs mono
//! wrote gave, in SAELens, the latents mono computes from the same directory; `mono eval --sae`
//! scores an external SAE without a run directory; `sae.init` continues one with MonoLoss.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mono::base::host::Kernels;
use mono::sae::{checkpoint, forward};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/saelens")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn saes_written_by_either_give_saelens_latents_in_mono() {
    let refs = reference();
    let x = &refs["x"];
    let names = [
        "saelens_standard",
        "saelens_topk_layer_norm",
        "saelens_jumprelu",
        "mono_topk",
        "mono_batch_topk",
        "mono_jumprelu",
        "mono_relu",
    ];
    for name in names {
        for kernels in [Kernels::Host, Kernels::Portable] {
            let sae = checkpoint::load(&dir().join(name), &Device::Cpu, kernels).unwrap();
            let pass = forward(sae.as_ref(), x, false).unwrap();
            let latents = pass.latents().unwrap();
            let theirs = &refs[&format!("{name}.latents")];
            assert_eq!(latents.dims(), theirs.dims(), "{name}");
            // The same latents fire.
            let fires = |t: &Tensor| -> Vec<f32> {
                t.ne(0f32)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(
                fires(latents),
                fires(theirs),
                "{name} ({kernels:?}): different latents fire"
            );
            let d = max_diff(latents, theirs);
            assert!(d < 1e-5, "{name} ({kernels:?}): latents differ by {d}");
            let d = max_diff(&pass.recon, &refs[&format!("{name}.recon")]);
            assert!(d < 1e-5, "{name} ({kernels:?}): reconstructions differ by {d}");
        }
    }
}

#[test]
fn saelens_configs_mono_cannot_apply_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, value, expect) in [
        ("architecture", "\"gated\"", "architecture `gated`"),
        ("normalize_activations", "\"expected_average_only_in\"", "normalize_activations"),
        ("rescale_acts_by_decoder_norm", "true", "rescale_acts_by_decoder_norm"),
    ] {
        let sae = tmp.path().join(key);
        std::fs::create_dir_all(&sae).unwrap();
        let src = dir().join("saelens_standard");
        std::fs::copy(src.join("sae_weights.safetensors"), sae.join("sae_weights.safetensors"))
            .unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("cfg.json")).unwrap()).unwrap();
        cfg[key] = serde_json::from_str(value).unwrap();
        std::fs::write(sae.join("cfg.json"), cfg.to_string()).unwrap();
        let err =
            format!("{:#}", checkpoint::load(&sae, &Device::Cpu, Kernels::Host).err().unwrap());
        assert!(err.contains(expect) && err.contains("cfg.json"), "{err}");
    }
}

fn mono(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn mono_eval_scores_an_external_sae_without_a_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let feats = tmp.path().join("feats");
    let x = format!("{}:x", dir().join("reference.safetensors").display());
    let (ok, text) = mono(&[
        "features",
        "import",
        "--features",
        &x,
        "--out",
        feats.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(ok, "{text}");
    let sae = dir().join("saelens_topk_layer_norm");
    let out = tmp.path().join("scores.json");
    let (ok, text) = mono(&[
        "eval",
        "--sae",
        sae.to_str().unwrap(),
        "--features",
        feats.to_str().unwrap(),
        "--split",
        "train",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("L0 3.0"), "{text}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(doc["results"]["n_images"], 16);
    assert_eq!(doc["sae"]["kind"], "topk");
    assert_eq!(doc["sae"]["k"], 3);
    // The store itself works as well as the feature set + split.
    let (ok, text) = mono(&[
        "eval",
        "--sae",
        sae.to_str().unwrap(),
        "--features",
        feats.join("train").to_str().unwrap(),
    ]);
    assert!(ok, "{text}");

    // Misuse: one line naming what is wrong.
    let (ok, text) =
        mono(&["eval", "--sae", sae.to_str().unwrap(), "--features", feats.to_str().unwrap()]);
    assert!(!ok && text.contains("--split") && text.contains("train"), "{text}");
    let missing = tmp.path().join("nothing");
    let (ok, text) =
        mono(&["eval", "--sae", missing.to_str().unwrap(), "--features", feats.to_str().unwrap()]);
    assert!(!ok && text.contains("nothing") && text.contains("cfg.json"), "{text}");
    let (ok, text) = mono(&["eval", "--features", feats.to_str().unwrap()]);
    assert!(!ok && text.contains("--sae"), "{text}");
}

/// `sae.init`: training starts from the weights of an SAE in the SAELens layout (here one
/// SAELens wrote and one mono wrote), and an SAE of another shape or kind is refused naming
/// the key.
#[test]
fn training_starts_from_an_existing_sae() {
    use mono::sae::SaeSpec;
    use mono::train::sae::SaeTrainer;
    let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    for (name, keys) in [
        ("saelens_standard", "kind = \"relu\"\nn_latents = 32\n"),
        ("mono_topk", "kind = \"topk\"\nn_latents = 32\nk = 3\nk_aux = 8\n"),
        ("mono_batch_topk", "kind = \"batch_topk\"\nn_latents = 32\nk = 3\nk_aux = 8\n"),
    ] {
        let init = dir().join(name);
        let config = mono::Config::parse(&format!(
            "[sae]\n{keys}init = \"{}\"\n[train]\nbatch_size = 8\n",
            init.display()
        ))
        .unwrap();
        let spec = SaeSpec::from_config(&config.sae, 8);
        let trainer = SaeTrainer::new(&config, &spec, &Device::Cpu).unwrap();
        let loaded = checkpoint::load(&init, &Device::Cpu, Kernels::Host).unwrap();
        let (a, b) = (trainer.sae.params(), loaded.params());
        assert_eq!(values(a.w_enc.as_tensor()), values(b.w_enc.as_tensor()), "{name}");
        assert_eq!(values(a.w_dec.as_tensor()), values(b.w_dec.as_tensor()), "{name}");
        assert_eq!(values(a.b_dec.as_tensor()), values(b.b_dec.as_tensor()), "{name}");
        // The same latents as the SAE it started from (BatchTopK: its threshold too).
        let x = &reference()["x"];
        let ours = forward(trainer.sae.as_ref(), x, false).unwrap();
        let theirs = forward(loaded.as_ref(), x, false).unwrap();
        assert!(max_diff(ours.latents().unwrap(), theirs.latents().unwrap()) == 0.0, "{name}");
    }
    let refused = |keys: &str| {
        let config = mono::Config::parse(&format!(
            "[sae]\n{keys}init = \"{}\"\n",
            dir().join("saelens_standard").display()
        ))
        .unwrap();
        let spec = SaeSpec::from_config(&config.sae, 8);
        format!("{:#}", SaeTrainer::new(&config, &spec, &Device::Cpu).err().unwrap())
    };
    let err = refused("kind = \"topk\"\nn_latents = 32\nk = 3\nk_aux = 8\n");
    assert!(err.contains("sae.init") && err.contains("Relu") && err.contains("Topk"), "{err}");
    let err = refused("kind = \"relu\"\nn_latents = 64\n");
    assert!(err.contains("sae.init") && err.contains("32 latents") && err.contains("64"), "{err}");
    let err = refused("kind = \"relu\"\nn_latents = 32\nnormalize_input = true\n");
    assert!(err.contains("sae.normalize_input = false"), "{err}");
}
