//! `mono run`: stages write their files, reruns reuse them, a changed λ retrains only, an
//! interrupted run resumes, sweeps make tables, the report is self-contained; every shipped
//! config validates.

use std::path::{Path, PathBuf};
use std::process::Command;

use mono::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn mono(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(args)
        .arg("--quiet")
        .current_dir(ROOT)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tiny_config(dir: &Path, lambdas: &str) -> PathBuf {
    let text = format!(
        r#"[run]
name = "tiny"
output = "{out}"
[encoder]
kind = "clip"
model = "{ROOT}/tests/fixtures/encoders/clip_vision_proj"
batch_size = 64
[data]
kind = "fashion_mnist"
root = "{ROOT}/data/fashion-mnist"
train_split = "test[0:600]"
eval_split = "test[600:800]"
[sae]
n_latents = 48
k = 4
[train]
epochs = 4
batch_size = 50
lr = 0.002
checkpoint_every = 10
[sweep]
lambda = [{lambdas}]
"#,
        out = dir.join("runs").display()
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn stage_lines(stdout: &str, stage: &str) -> Vec<String> {
    stdout.lines().filter(|l| l.trim_start().starts_with(stage)).map(|l| l.to_string()).collect()
}

#[test]
fn run_writes_stages_reuses_them_retrains_only_what_changed_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path(), "0.0, 0.003");
    let (ok, out, err) = mono(&["run", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stage_lines(&out, "train").iter().all(|l| l.ends_with("— run")), "{out}");
    let run_dir = tmp.path().join("runs/tiny");
    for f in [
        "config.toml",
        "results.json",
        "report.html",
        "sweep.csv",
        "sweep.md",
        "sweep.png",
        "monoscore_hist.png",
    ] {
        assert!(run_dir.join(f).is_file(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json")).unwrap())
            .unwrap();
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let features = PathBuf::from(runs[0]["features_dir"].as_str().unwrap());
    assert_eq!(
        runs[1]["features_dir"], runs[0]["features_dir"],
        "sweep children share the features"
    );
    for split in ["test_0-600", "test_600-800"] {
        assert!(features.join(split).join("manifest.json").is_file());
    }
    let train_dirs: Vec<PathBuf> =
        runs.iter().map(|r| PathBuf::from(r["train_dir"].as_str().unwrap())).collect();
    for d in &train_dirs {
        for f in [
            "results.json",
            "latent_stats.safetensors",
            "metrics.jsonl",
            "sae/sae_weights.safetensors",
            "sae/cfg.json",
        ] {
            assert!(d.join(f).is_file(), "{} lacks {f}", d.display());
        }
    }

    // The sweep table: one row per λ, with real numbers.
    let csv = std::fs::read_to_string(run_dir.join("sweep.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "monoscore_mean").unwrap();
    let rows: Vec<Vec<String>> =
        lines.map(|l| l.split(',').map(|s| s.to_string()).collect()).collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let v: f64 = r[col].parse().unwrap();
        assert!(v > 0.0 && v <= 1.0, "{r:?}");
    }

    // A second run reuses everything.
    let before = std::fs::metadata(train_dirs[0].join("results.json")).unwrap().modified().unwrap();
    let (ok, out, err) = mono(&["run", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.lines().filter(|l| l.contains("— ")).all(|l| l.ends_with("— cached")), "{out}");
    assert_eq!(
        before,
        std::fs::metadata(train_dirs[0].join("results.json")).unwrap().modified().unwrap()
    );

    // A changed λ retrains that child only.
    let config = tiny_config(tmp.path(), "0.0, 0.006");
    let (ok, out, _) = mono(&["run", config.to_str().unwrap(), "--dry-run"]);
    assert!(ok);
    let train = stage_lines(&out, "train");
    assert!(train[0].ends_with("— cached") && train[1].ends_with("— run"), "{out}");
    assert!(stage_lines(&out, "extract")[0].ends_with("— cached"), "{out}");

    // An interrupted training resumes from its checkpoint.
    let config = tiny_config(tmp.path(), "0.0, 0.003");
    std::fs::remove_file(train_dirs[1].join("results.json")).unwrap();
    std::fs::remove_dir_all(train_dirs[1].join("sae")).unwrap();
    let (ok, out, err) = mono(&["run", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stage_lines(&out, "train")[1].ends_with("— resume"), "{out}");
    assert!(train_dirs[1].join("results.json").is_file());

    // The report references only data URIs and files that exist.
    let html = std::fs::read_to_string(run_dir.join("report.html")).unwrap();
    let mut refs = 0;
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().unwrap();
            refs += 1;
            assert!(
                target.starts_with("data:image/png;base64,") || run_dir.join(target).is_file(),
                "report references {target}"
            );
        }
    }
    assert!(refs > 10, "the report has plots and image grids");
    assert!(html.contains("<img") && html.contains("Top-activating"));
    // `mono report` rebuilds it.
    std::fs::remove_file(run_dir.join("report.html")).unwrap();
    let (ok, _, err) = mono(&["report", run_dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(run_dir.join("report.html").is_file());

    // It renders in headless Chromium (installed by .ci/run).
    if Path::new("/usr/bin/chromium").exists() {
        let png = tmp.path().join("report.png");
        let status = Command::new(Path::new(ROOT).join("scripts/render_report.sh"))
            .arg(run_dir.join("report.html"))
            .arg(&png)
            .status()
            .unwrap();
        assert!(
            status.success() && std::fs::metadata(&png).unwrap().len() > 10_000,
            "headless render failed"
        );
    } else {
        eprintln!("chromium not installed: skipped the headless render (CI installs it)");
    }
}

#[test]
fn every_shipped_config_parses_and_validates() {
    let mut count = 0;
    let mut stack = vec![Path::new(ROOT).join("configs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                let config =
                    Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                let first_line = std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    first_line.starts_with('#'),
                    "{} must start with a comment saying what it reproduces",
                    path.display()
                );
                // Every sweep child is a valid config (planning would need the data and models).
                mono::pipeline::children(&config)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                count += 1;
            }
        }
    }
    assert!(count >= 30, "found {count} configs");
}

/// Small class folders of generated PNGs under `root/images/{train,val}/{a,b}`.
fn image_folders(root: &Path, shade: u8) {
    for split in ["train", "val"] {
        for (c, class) in ["a", "b"].iter().enumerate() {
            let dir = root.join("images").join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..12u32 {
                let img = image::RgbImage::from_fn(20, 20, |x, y| {
                    image::Rgb([(x * 9 + i) as u8, (y * 5) as u8 ^ shade, (c as u8) * 120])
                });
                img.save(dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// The status `mono run --dry-run` gives each stage line, run from `cwd`.
fn statuses(cwd: &Path, config: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(["run", config.to_str().unwrap(), "--dry-run", "--quiet"])
        .current_dir(cwd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter_map(|(stage, rest)| rest.rsplit_once("— ").map(|(_, s)| format!("{stage} {s}")))
        .collect()
}

#[test]
fn stage_keys_follow_the_inputs_not_the_config_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (here, elsewhere) = (tmp.path().join("here"), tmp.path().join("elsewhere"));
    for (dir, shade) in [(&here, 0u8), (&elsewhere, 77u8)] {
        image_folders(dir, shade);
        copy_dir(
            &Path::new(ROOT).join("tests/fixtures/encoders/clip_vision_proj"),
            &dir.join("model"),
        );
    }
    // Relative data and model, an absolute run directory: the case a cwd-blind key gets wrong.
    let config = tmp.path().join("relative.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"rel\"\noutput = \"{}\"\nstages = [\"extract\", \"train\"]\n\
             [encoder]\nkind = \"clip\"\nmodel = \"model\"\nbatch_size = 16\n\
             [data]\nkind = \"folder\"\nroot = \"images\"\ntrain_split = \"train\"\neval_split = \"val\"\n\
             [sae]\nn_latents = 32\nk = 4\n[train]\nepochs = 2\nbatch_size = 8\n[mono]\nlambda = 0.001\n",
            tmp.path().join("runs").display()
        ),
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(["run", config.to_str().unwrap(), "--quiet"])
        .current_dir(&here)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let done = vec!["extract cached".to_string(), "train cached".to_string()];
    let redo = vec!["extract run".to_string(), "train run".to_string()];
    assert_eq!(statuses(&here, &config), done);

    // The same config from another directory reads other images and another model.
    assert_eq!(statuses(&elsewhere, &config), redo);
    // An added image; removing it again restores the key.
    let added = here.join("images/train/a/99.png");
    std::fs::copy(here.join("images/train/a/00.png"), &added).unwrap();
    assert_eq!(statuses(&here, &config), redo);
    std::fs::remove_file(&added).unwrap();
    assert_eq!(statuses(&here, &config), done);
    // Changed weights: one byte of the last MiB (the same size).
    let weights = here.join("model/model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut changed = original.clone();
    let last = changed.len() - 3;
    changed[last] ^= 1;
    std::fs::write(&weights, &changed).unwrap();
    assert_eq!(statuses(&here, &config), redo);
    std::fs::write(&weights, &original).unwrap();

    // A user's feature set: training is keyed by the stores, so a changed store retrains.
    let features = std::fs::read_dir(tmp.path().join("runs/rel"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("features-"))
        .unwrap();
    let feats = tmp.path().join("feats");
    for split in ["train", "val"] {
        copy_dir(&features.join(split), &feats.join(split));
    }
    let trained = tmp.path().join("trained.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("name = \"rel\"", "name = \"given\"")
        .replace("stages = [\"extract\", \"train\"]", "stages = [\"train\"]")
        .replace("[sae]", &format!("[features]\ndir = \"{}\"\n[sae]", feats.display()));
    std::fs::write(&trained, text).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_mono"))
        .args(["run", trained.to_str().unwrap(), "--quiet"])
        .current_dir(&here)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(statuses(&here, &trained), ["train cached"]);
    // The val store replaced by the train store's rows: another store, same config text.
    std::fs::remove_dir_all(feats.join("val")).unwrap();
    copy_dir(&feats.join("train"), &feats.join("val"));
    assert_eq!(statuses(&here, &trained), ["train run"]);
}
