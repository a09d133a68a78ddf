//! The config schema: every documented key parses, every key is documented, and bad keys or
//! values fail with the key's name.

use std::collections::BTreeSet;

use mono::config::{paper_lambda, DatasetKind, EncoderKind, SaeKind};
use mono::sae::SaeSpec;
use mono::Config;

/// The ```toml blocks of docs/config.md: the whole config, then `[sae]` of each other kind.
fn documented_examples() -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md")).unwrap();
    doc.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap().to_string()).collect()
}

/// Dotted paths of all leaf keys in a TOML document.
fn leaf_keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                if prefix == "sweep" || !v.is_table() {
                    out.insert(path);
                } else {
                    leaf_keys(v, &path, out);
                }
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// The schema's own list of keys for a section (`[sae]` of `sae_kind`), read from serde's
/// "expected one of" message.
fn schema_keys(section: &str, sae_kind: &str) -> Vec<String> {
    let probe = match section {
        "" => "zz_probe = 1\n".to_string(),
        "sae" => format!("[sae]\nkind = \"{sae_kind}\"\nzz_probe = 1\n"),
        _ => format!("[{section}]\nzz_probe = 1\n"),
    };
    let err = Config::parse(&probe).unwrap_err().to_string();
    let expected =
        err.split("expected one of ").nth(1).unwrap_or_else(|| panic!("no key list in: {err}"));
    expected.split(", ").map(|k| k.trim().trim_matches('`').to_string()).collect()
}

#[test]
fn documented_examples_parse_and_cover_every_key() {
    let examples = documented_examples();
    assert_eq!(examples.len(), 4, "the whole config, then [sae] of topk, jumprelu and relu");
    let mut documented = BTreeSet::new();
    let mut kinds = Vec::new();
    for text in &examples {
        let config =
            Config::parse(text).unwrap_or_else(|e| panic!("docs/config.md: {e:#}\n{text}"));
        let mut keys = BTreeSet::new();
        leaf_keys(&text.parse::<toml::Value>().unwrap(), "", &mut keys);
        kinds.push(config.sae.kind());
        // Keys of [sae] are documented per kind.
        let kind = serde_json::to_value(config.sae.kind()).unwrap().as_str().unwrap().to_string();
        documented.extend(keys.into_iter().map(|k| match k.strip_prefix("sae.") {
            Some(rest) => format!("sae[{kind}].{rest}"),
            None => k,
        }));
    }
    assert_eq!(kinds, [SaeKind::BatchTopk, SaeKind::Topk, SaeKind::Jumprelu, SaeKind::Relu]);
    for section in schema_keys("", "") {
        if section == "sweep" {
            continue;
        }
        let kinds: &[&str] =
            if section == "sae" { &["batch_topk", "topk", "jumprelu", "relu"] } else { &[""] };
        for kind in kinds {
            for key in schema_keys(&section, kind) {
                let path = if section == "sae" {
                    format!("sae[{kind}].{key}")
                } else {
                    format!("{section}.{key}")
                };
                assert!(
                    documented.contains(&path),
                    "`{path}` is a config key but docs/config.md does not document it"
                );
            }
        }
    }
    let config = Config::parse(&examples[0]).unwrap();
    // Values in the example really reach the config.
    assert_eq!(SaeSpec::from_config(&config.sae, 768).k_aux, 512);
    assert_eq!(config.finetune.lora_rank, Some(8));
    assert_eq!(config.data.limit, Some(100000));
    assert_eq!(config.sweep.len(), 2);
}

#[test]
fn defaults_are_the_papers() {
    let c = Config::parse("").unwrap();
    let spec = SaeSpec::from_config(&c.sae, 768);
    assert_eq!(spec.kind, SaeKind::BatchTopk);
    assert_eq!((spec.n_latents, spec.k, spec.k_aux), (8192, 64, 512));
    assert_eq!(spec.aux_coef, 1.0 / 32.0);
    assert!(!spec.normalize_input);
    assert_eq!(
        (c.train.epochs, c.train.batch_size, c.train.lr, c.train.adam_eps),
        (50, 2048, 1e-4, 6.25e-10)
    );
    assert_eq!(c.train.grad_clip(SaeKind::BatchTopk), Some(1.0));
    assert_eq!(c.train.grad_clip(SaeKind::Topk), None);
    assert_eq!(c.run.seed, 42);
    assert_eq!(c.lambda().unwrap(), 3e-4, "ImageNet × CLIP × BatchTopK");

    let topk = Config::parse("[sae]\nkind = \"topk\"\n[encoder]\nkind = \"siglip2\"\nmodel = \"google/siglip2-so400m-patch14-384\"\n").unwrap();
    let spec = SaeSpec::from_config(&topk.sae, 1152);
    assert_eq!(spec.k_aux, 64);
    assert!(spec.normalize_input);
    // The AuxK default is capped for small SAEs.
    let small = Config::parse("[sae]\nn_latents = 100\nk = 4\n").unwrap();
    assert_eq!(SaeSpec::from_config(&small.sae, 8).k_aux, 100);
    assert_eq!(topk.lambda().unwrap(), 0.14);
    assert_eq!(paper_lambda(DatasetKind::Openimages, EncoderKind::Vit, SaeKind::Topk), Some(0.9));
    assert_eq!(paper_lambda(DatasetKind::FashionMnist, EncoderKind::Vit, SaeKind::Topk), None);
    let no_paper = Config::parse("[data]\nkind = \"cifar10\"\n").unwrap();
    let err = no_paper.lambda().unwrap_err().to_string();
    assert!(err.contains("mono.lambda is not set"), "{err}");
}

fn parse_err(text: &str) -> String {
    format!("{:#}", Config::parse(text).map(|_| ()).unwrap_err())
}

#[test]
fn unknown_keys_fail_with_their_name() {
    let e = parse_err("[sae]\nkind = \"topk\"\nkk = 3\n");
    assert!(e.contains("unknown key `sae.kk`") && e.contains("line 3"), "{e}");
    let e = parse_err("[saes]\nk = 3\n");
    assert!(e.contains("unknown key `saes`"), "{e}");
    let e = parse_err("[sweep]\n\"sae.kk\" = [1]\n");
    assert!(e.contains("sweep.sae.kk") && e.contains("unknown key `sae.kk`"), "{e}");
    // A key of another SAE kind names itself, its line and the kind.
    let e = parse_err("[run]\nseed = 1\n[sae]\nkind = \"topk\"\nl1_coef = 0.1\n");
    assert!(e.contains("unknown key `sae.l1_coef` (line 5)"), "{e}");
    assert!(e.contains("not a key of sae.kind = \"topk\"") && e.contains("`k_aux`"), "{e}");
    let e = parse_err("[sae]\nkind = \"relu\"\nk = 4\n");
    assert!(e.contains("unknown key `sae.k` (line 3)"), "{e}");
    let e = parse_err("[sae]\nkind = \"topk\"\nk = \"four\"\n");
    assert!(e.contains("sae.k (line 3): invalid type: string"), "{e}");
    // Renamed keys say what they became.
    let e = parse_err("[train]\nlr_decay = \"cosine\"\n");
    assert!(
        e.contains("unknown key `train.lr_decay` (line 2)") && e.contains("train.schedule"),
        "{e}"
    );
}

#[test]
fn out_of_range_values_fail_with_key_and_value() {
    for (text, expect) in [
        ("[sae]\nk = 9000\n", "sae.k = 9000 must be ≤ sae.n_latents = 8192"),
        ("[sae]\nn_latents = 0\n", "sae.n_latents = 0 must be > 0"),
        ("[train]\nlr = -1.0\n", "train.lr = -1 must be > 0"),
        ("[train]\nbatch_size = 1\n", "train.batch_size = 1 must be ≥ 2"),
        ("[train]\nadam_betas = [0.9, 1.0]\n", "train.adam_betas[1] = 1 must be in [0, 1)"),
        ("[mono]\nperiod = 0\n", "mono.period = 0 must be > 0"),
        ("[mono]\nlambda = -0.1\n", "mono.lambda = -0.1 must be ≥ 0"),
        ("[run]\ndevice = \"tpu\"\n", "run.device = \"tpu\""),
        (
            "[encoder]\nkind = \"vit\"\noutput = \"pooler\"\n",
            "encoder.output = Pooler is not an output of encoder.kind = Vit",
        ),
        (
            "[finetune]\nepochs = 5\nwarmup_epochs = 5\n",
            "finetune.warmup_epochs = 5 must be < finetune.epochs = 5",
        ),
        ("[encoder]\nkind = \"resnet50\"\n[finetune]\nlora_rank = 4\n", "finetune.lora_rank"),
        ("[sweep]\nlambda = [0.1, -1.0]\n", "sweep.lambda = -1.0: mono.lambda = -1 must be ≥ 0"),
        ("[sweep]\nlambda = []\n", "sweep.lambda is an empty list"),
        ("[train]\nlr = \"fast\"\n", "train.lr (line 2): invalid type: string \"fast\""),
        ("[sae]\nkind = \"gated\"\n", "sae.kind (line 2): unknown variant `gated`"),
    ] {
        let e = parse_err(text);
        assert!(e.contains(expect), "for {text:?}: `{e}` lacks `{expect}`");
    }
}

#[test]
fn sweep_override_sets_a_dotted_key() {
    let c = Config::parse("[sweep]\nlambda = [0.0, 0.5]\n\"sae.k\" = [16]\n").unwrap();
    let child = c.with_override("lambda", toml::Value::Float(0.5)).unwrap();
    assert_eq!(child.mono.lambda, Some(0.5));
    assert!(child.sweep.is_empty());
    let child = c.with_override("sae.k", toml::Value::Integer(16)).unwrap();
    assert_eq!(SaeSpec::from_config(&child.sae, 8).k, 16);
    assert!(c.with_override("nope.key", toml::Value::Integer(1)).is_err());
}

#[test]
fn device_specs_parse() {
    use mono::base::device::DeviceSpec;
    assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
    assert_eq!(DeviceSpec::parse("CPU").unwrap(), DeviceSpec::Cpu);
    assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
    assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
    assert_eq!(DeviceSpec::parse("metal").unwrap(), DeviceSpec::Metal);
    assert!(DeviceSpec::parse("cuda:x").is_err());
    assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    if !candle_core::utils::cuda_is_available() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
    }
}
