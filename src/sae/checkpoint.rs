//! SAE checkpoints in the SAELens layout: `sae_weights.safetensors` (W_enc D×M, W_dec M×D,
//! b_enc, b_dec, threshold where it applies) and `cfg.json`. Directories are written beside
//! their final place and renamed into it, so a crash never leaves a half-written checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde_json::json;

use super::{
    batch_topk::BatchTopKSae, jumprelu::JumpReluSae, relu::ReluSae, topk::TopKSae, Sae, SaeParams,
    SaeSpec,
};
use crate::base::config::SaeKind;
use crate::base::host::Kernels;

pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
pub const CFG_FILE: &str = "cfg.json";
/// The SAELens cfg.json layout written (6.x: loaded through its current path, not the pre-6.0
/// one).
const SAELENS_LAYOUT_VERSION: &str = "6.0.0";

/// SAELens architecture names: BatchTopK is a JumpReLU with one threshold at inference.
fn saelens_architecture(kind: SaeKind) -> &'static str {
    match kind {
        SaeKind::Topk => "topk",
        SaeKind::BatchTopk | SaeKind::Jumprelu => "jumprelu",
        SaeKind::Relu => "standard",
    }
}

/// The SAE's tensors under their SAELens names.
pub fn weight_tensors(sae: &dyn Sae) -> Result<HashMap<String, Tensor>> {
    let p = sae.params();
    let mut tensors = HashMap::from([
        ("W_enc".to_string(), p.w_enc.as_tensor().detach().t()?.contiguous()?),
        ("W_dec".to_string(), p.w_dec.as_tensor().detach()),
        ("b_enc".to_string(), p.b_enc.as_tensor().detach()),
        ("b_dec".to_string(), p.b_dec.as_tensor().detach()),
    ]);
    if let Some(t) = sae.threshold()? {
        tensors.insert("threshold".to_string(), t);
    }
    Ok(tensors)
}

/// cfg.json: SAELens' keys plus ours under `mono`. `model_name` and `hook_name` are always
/// strings (SAELens 6 rejects null ones: features imported without an encoder say "features"),
/// and `metadata` carries them the way SAELens 6 writes its own cfg.json.
pub fn cfg_json(sae: &dyn Sae, source: &serde_json::Value) -> serde_json::Value {
    let spec = sae.spec();
    let text = |key: &str| match source.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) if !v.is_null() => v.to_string().trim_matches('"').to_string(),
        _ => "features".to_string(),
    };
    let (model_name, hook_name) = (text("model"), text("output"));
    json!({
        "architecture": saelens_architecture(spec.kind),
        "d_in": spec.d_in,
        "d_sae": spec.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": spec.centers_input(),
        "normalize_activations": if spec.normalize_input { "layer_norm" } else { "none" },
        "activation_fn_kwargs": if spec.kind == SaeKind::Topk { json!({"k": spec.k}) } else { json!({}) },
        "k": spec.k,
        "model_name": model_name,
        "hook_name": hook_name,
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "model_name": model_name,
            "hook_name": hook_name,
        },
        "mono": {"spec": spec, "source": source},
    })
}

/// Writes the SAE's weights and cfg.json into `dir` (created or replaced atomically).
pub fn save(dir: &Path, sae: &dyn Sae, source: &serde_json::Value) -> Result<()> {
    let tensors = weight_tensors(sae)?;
    let cfg = cfg_json(sae, source);
    crate::base::io::write_dir_atomic(dir, |tmp| write_into(tmp, &tensors, &cfg))
}

/// Writes weights and cfg.json into an existing directory (used inside larger atomic writes).
pub fn write_into(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    cfg: &serde_json::Value,
) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(tensors, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let path = dir.join(CFG_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(cfg)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads the spec from a checkpoint's cfg.json: mono's own (`mono.spec`) when mono wrote it,
/// else derived from the SAELens keys (see [`spec_from_saelens`]).
pub fn read_spec(dir: &Path) -> Result<SaeSpec> {
    let path = dir.join(CFG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    match cfg.pointer("/mono/spec") {
        Some(spec) => serde_json::from_value(spec.clone())
            .with_context(|| format!("{}: bad `mono.spec`", path.display())),
        None => spec_from_saelens(&cfg).with_context(|| format!("{}", path.display())),
    }
}

/// The spec of an SAE SAELens wrote (6.x layout, or the older one with `activation_fn`):
/// `standard` → ReLU, `topk` → TopK (k from `k` or `activation_fn_kwargs.k`), `jumprelu` →
/// JumpReLU (per-latent thresholds); `apply_b_dec_to_input` and `normalize_activations`
/// ("none" or "layer_norm") as given. Training-only settings take mono's defaults.
pub fn spec_from_saelens(cfg: &serde_json::Value) -> Result<SaeSpec> {
    let str_key = |key: &str| cfg.get(key).and_then(|v| v.as_str());
    let usize_key = |key: &str| -> Result<usize> {
        cfg.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("cfg.json: `{key}` must be a positive integer"))
    };
    let topk_k =
        cfg.get("k").or_else(|| cfg.pointer("/activation_fn_kwargs/k")).and_then(|v| v.as_u64());
    let architecture = match str_key("architecture") {
        Some(a) => a.to_string(),
        // Before SAELens 6: a TopK activation function marks a TopK SAE.
        None if str_key("activation_fn").or(str_key("activation_fn_str")) == Some("topk") => {
            "topk".into()
        }
        None => "standard".into(),
    };
    let kind = match architecture.as_str() {
        "standard" => SaeKind::Relu,
        "topk" => SaeKind::Topk,
        "jumprelu" => SaeKind::Jumprelu,
        other => bail!(
            "cfg.json: SAELens architecture `{other}` is not one mono reads (standard, topk, jumprelu)"
        ),
    };
    let normalize_input = match cfg.get("normalize_activations") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
        Some(v) if v.as_str() == Some("none") => false,
        Some(v) if v.as_str() == Some("layer_norm") => true,
        Some(v) => bail!(
            "cfg.json: normalize_activations = {v} is not supported (mono applies \"none\" and \"layer_norm\")"
        ),
    };
    for (key, unsupported) in [
        (
            "rescale_acts_by_decoder_norm",
            cfg.get("rescale_acts_by_decoder_norm") == Some(&json!(true)),
        ),
        ("reshape_activations", str_key("reshape_activations").is_some_and(|r| r != "none")),
        ("finetuning_scaling_factor", cfg.get("finetuning_scaling_factor") == Some(&json!(true))),
    ] {
        ensure!(!unsupported, "cfg.json: `{key}` = {} is not supported", cfg[key]);
    }
    let config = crate::base::config::SaeConfig::of_kind(kind);
    let mut spec = SaeSpec::from_config(&config, usize_key("d_in")?);
    spec.n_latents = usize_key("d_sae")?;
    spec.normalize_input = normalize_input;
    spec.tied_decoder = false;
    spec.apply_b_dec_to_input =
        Some(cfg.get("apply_b_dec_to_input").and_then(|v| v.as_bool()).unwrap_or(true));
    if kind == SaeKind::Topk {
        spec.k = topk_k.context("cfg.json: a TopK SAE needs `k`")? as usize;
        ensure!(spec.k >= 1 && spec.k <= spec.n_latents, "cfg.json: k = {} out of range", spec.k);
    }
    spec.k_aux = spec.k_aux.min(spec.n_latents);
    Ok(spec)
}

/// Loads an SAE checkpoint onto `device`; every shape is checked against cfg.json.
pub fn load(dir: &Path, device: &Device, kernels: Kernels) -> Result<Box<dyn Sae>> {
    let spec = read_spec(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let file = crate::base::io::tensors::SafetensorsFile::open(&path)?;
    let (d, m) = (spec.d_in, spec.n_latents);
    let check = |name: &str, shape: &[usize]| -> Result<()> {
        let found = file
            .shape(name)
            .with_context(|| format!("{}: missing tensor `{name}`", path.display()))?;
        ensure!(
            found == shape,
            "{}: `{name}` has shape {found:?}, cfg.json implies {shape:?}",
            path.display()
        );
        Ok(())
    };
    // Each weight is decoded once into the vector its Var keeps (no copy on the CPU).
    let var = |name: &str, shape: &[usize]| -> Result<Var> {
        check(name, shape)?;
        Ok(Var::from_vec(file.read_f32(name)?, shape, device)?)
    };
    check("W_enc", &[d, m])?;
    let w_enc = Var::from_vec(file.read_f32_transposed("W_enc")?, (m, d), device)?;
    let log_threshold = match spec.kind {
        // A threshold ≤ 0 acts as 0 (SAELens keeps ReLU(pre) where pre > threshold).
        SaeKind::Jumprelu => {
            check("threshold", &[m])?;
            let threshold = Tensor::from_vec(file.read_f32("threshold")?, m, device)?;
            Some(Var::from_tensor(&threshold.clamp(1e-30f32, f32::MAX)?.log()?)?)
        }
        _ => None,
    };
    let params = SaeParams {
        w_enc,
        w_dec: var("W_dec", &[m, d])?,
        b_enc: var("b_enc", &[m])?,
        b_dec: var("b_dec", &[d])?,
        log_threshold,
        kernels,
    };
    Ok(match spec.kind {
        SaeKind::Topk => Box::new(TopKSae::from_params(spec, params)),
        SaeKind::Relu => Box::new(ReluSae::from_params(spec, params)),
        SaeKind::Jumprelu => Box::new(JumpReluSae::from_params(spec, params)),
        SaeKind::BatchTopk => {
            let threshold = match file.shape("threshold") {
                Some(_) => {
                    let values = file.read_f32("threshold")?;
                    if values.iter().any(|v| *v != values[0]) {
                        bail!(
                            "{}: a BatchTopK threshold must be one value for every latent",
                            path.display()
                        );
                    }
                    values.first().copied()
                }
                None => None,
            };
            Box::new(BatchTopKSae::from_params(spec, params, threshold)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind loads back exactly what was saved (W_enc transposed back to M × D); a weights
    /// file that does not match cfg.json is refused naming the file and the tensor.
    #[test]
    fn load_returns_what_save_wrote_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [SaeKind::Topk, SaeKind::BatchTopk, SaeKind::Jumprelu, SaeKind::Relu] {
            let mut spec = SaeSpec::from_config(&crate::base::config::SaeConfig::of_kind(kind), 6);
            spec.n_latents = 10;
            let sae = super::super::build(&spec, 3, &Device::Cpu, Kernels::Host).unwrap();
            let at = dir.path().join(format!("{kind:?}"));
            save(&at, sae.as_ref(), &json!({})).unwrap();
            let loaded = load(&at, &Device::Cpu, Kernels::Host).unwrap();
            for ((name, a), (_, b)) in sae.params().named().into_iter().zip(loaded.params().named())
            {
                let (a, b) = (a.as_tensor(), b.as_tensor());
                assert_eq!(a.dims(), b.dims(), "{kind:?} {name}");
                let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
                assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "{name}");
            }
        }

        let at = dir.path().join("Topk");
        let weights = at.join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let error = |tensors: &HashMap<String, Tensor>| {
            candle_core::safetensors::save(tensors, &weights).unwrap();
            format!("{:#}", load(&at, &Device::Cpu, Kernels::Host).err().unwrap())
        };
        let w_enc = tensors["W_enc"].clone();
        tensors.insert("W_enc".into(), w_enc.t().unwrap().contiguous().unwrap());
        let e = error(&tensors);
        assert!(e.contains(WEIGHTS_FILE) && e.contains("`W_enc` has shape [10, 6]"), "{e}");
        assert!(e.contains("cfg.json implies [6, 10]"), "{e}");
        tensors.insert("W_enc".into(), w_enc.to_dtype(candle_core::DType::U32).unwrap());
        let e = error(&tensors);
        assert!(e.contains(WEIGHTS_FILE) && e.contains("`W_enc` has dtype U32"), "{e}");
        tensors.insert("W_enc".into(), w_enc);
        tensors.remove("b_dec");
        let e = error(&tensors);
        assert!(e.contains(WEIGHTS_FILE) && e.contains("missing tensor `b_dec`"), "{e}");
        std::fs::write(&weights, b"{}").unwrap();
        let e = format!("{:#}", load(&at, &Device::Cpu, Kernels::Host).err().unwrap());
        assert!(e.contains(WEIGHTS_FILE) && e.contains("not a readable"), "{e}");
    }

    /// SAELens 6 needs string names: features imported without an encoder have none.
    #[test]
    fn cfg_names_are_strings_with_saelens_6_metadata() {
        let mut spec =
            SaeSpec::from_config(&crate::base::config::SaeConfig::of_kind(SaeKind::Topk), 4);
        spec.n_latents = 8;
        let sae = super::super::build(&spec, 1, &Device::Cpu, Kernels::Host).unwrap();
        let imported = cfg_json(sae.as_ref(), &json!({"model": null, "output": null}));
        assert_eq!(
            (&imported["model_name"], &imported["hook_name"]),
            (&json!("features"), &json!("features"))
        );
        assert_eq!(imported["metadata"]["hook_name"], "features");
        assert_eq!(imported["metadata"]["sae_lens_version"], SAELENS_LAYOUT_VERSION);
        let extracted =
            cfg_json(sae.as_ref(), &json!({"model": "openai/clip", "output": "pooler"}));
        assert_eq!(
            (&extracted["model_name"], &extracted["hook_name"]),
            (&json!("openai/clip"), &json!("pooler"))
        );
        assert_eq!(extracted["metadata"]["model_name"], "openai/clip");
    }
}
