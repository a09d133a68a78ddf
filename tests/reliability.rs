//! What mono promises about interrupted, concurrent and mistaken runs (docs/reliability.md):
//! every writing command killed with SIGKILL at random points and rerun ends with the same bytes
//! as an uninterrupted run and no leftovers; two runs of one config never both write; and every
//! misuse listed there fails with one line naming what is wrong, writing nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MONO: &str = env!("CARGO_BIN_EXE_mono");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Kill points per command.
const TRIALS: u64 = 3;

fn mono(work: &Path, args: &[String]) -> (bool, String) {
    let out = Command::new(MONO)
        .args(args)
        .arg("--quiet")
        .current_dir(work)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("mono runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Every file under `dir` (relative path → bytes) but inputs.json, with JSON timing fields
/// removed.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            if rel.ends_with("inputs.json") {
                // Fingerprints of the inputs, with the modification times of any intermediate
                // store the rerun rewrote: a record, not a result.
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            if rel.ends_with(".json") {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                scrub_timings(&mut v);
                bytes = serde_json::to_vec(&v).unwrap();
            }
            out.insert(rel, bytes);
        }
    }
    out
}

/// Wall-clock fields differ between any two runs.
fn scrub_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("train_seconds");
            map.values_mut().for_each(scrub_timings);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(scrub_timings),
        _ => {}
    }
}

/// Names in `dir` (two levels) and beside it that interrupted writes use for staging.
fn leftovers(dir: &Path) -> Vec<String> {
    let staging = |name: &str| {
        name.starts_with('.')
            && !name.ends_with(".lock")
            && (name.contains(".tmp")
                || name.contains(".merge")
                || name.contains(".old-")
                || name.starts_with(".mono-import-"))
    };
    let mut found = Vec::new();
    let mut dirs = vec![dir.parent().unwrap().to_path_buf(), dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for d in dirs {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if staging(&name) {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

/// Runs `command` once uninterrupted (the reference), then `TRIALS` times: SIGKILL after a random
/// delay within the reference's duration, rerun (`rerun` picks arguments from what the killed
/// run left, or None when it had finished), and compare `output` with the reference, byte for
/// byte.
fn kill_and_rerun(
    work: &Path,
    output: &str,
    command: &[String],
    rerun: impl Fn(&Path) -> Option<Vec<String>>,
    seed: u64,
) {
    let out = work.join(output);
    let started = Instant::now();
    let (ok, err) = mono(work, command);
    assert!(ok, "reference run of {command:?}: {err}");
    let duration = started.elapsed();
    let reference = snapshot(&out);
    let mut rng = StdRng::seed_from_u64(seed);
    for trial in 0..TRIALS {
        std::fs::remove_dir_all(&out).unwrap();
        let delay = duration.mul_f64(rng.random_range(0.05..0.95));
        let mut child = Command::new(MONO)
            .args(command)
            .arg("--quiet")
            .current_dir(work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        if let Some(again) = rerun(work) {
            let (ok, err) = mono(work, &again);
            assert!(ok, "trial {trial} ({delay:?}): rerun {again:?} failed: {err}");
        }
        let after = snapshot(&out);
        let keys = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&after), keys(&reference), "trial {trial} ({delay:?}): files differ");
        for (name, bytes) in &reference {
            assert!(after[name] == *bytes, "trial {trial} ({delay:?}): {name} differs");
        }
        assert!(leftovers(&out).is_empty(), "trial {trial}: leftovers {:?}", leftovers(&out));
    }
}

/// The tiny ResNet and the Fashion-MNIST images shipped in the repository.
fn base_config(work: &Path, name: &str, stages: &str, extra: &str) -> PathBuf {
    let text = format!(
        "[run]\nname = \"{name}\"\noutput = \"runs\"\nstages = {stages}\n\
         [encoder]\nkind = \"resnet50\"\nmodel = \"{ROOT}/data/models/tiny-resnet\"\nbatch_size = 64\n\
         [data]\nkind = \"fashion_mnist\"\nroot = \"{ROOT}/data/fashion-mnist\"\n\
         train_split = \"test[0:3000]\"\neval_split = \"test[3000:3500]\"\n\
         [features]\ndir = \"features\"\nshard_size = 100\n\
         [sae]\nn_latents = 256\nk = 8\n[train]\nepochs = 12\nbatch_size = 128\nlr = 0.001\n\
         checkpoint_every = 7\n[mono]\nlambda = 0.001\n{extra}"
    );
    let path = work.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn resume_if_checkpointed(run: &Path, mut command: Vec<String>) -> Vec<String> {
    // A run killed while writing its first checkpoint leaves only the hidden staging entry,
    // which is no checkpoint (the rerun removes it).
    let written = |d: std::fs::ReadDir| {
        d.flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.'))
    };
    if run.join("checkpoints").read_dir().is_ok_and(written) {
        command.push("--resume".into());
    }
    command
}

#[test]
fn extraction_killed_anywhere_resumes_to_identical_features() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // Shards of 100 rows and batches of 64: a restart begins inside a batch. A transformer's
    // batched matmuls round differently for another batch composition (the tiny ResNet's
    // convolutions happen not to), so only the uninterrupted batch grid gives the same bytes.
    let config = base_config(work, "ex", "[\"extract\"]", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            &format!("kind = \"resnet50\"\nmodel = \"{ROOT}/data/models/tiny-resnet\""),
            &format!(
                "kind = \"clip\"\nmodel = \"{ROOT}/tests/fixtures/encoders/clip_vision_proj\""
            ),
        )
        .replace("test[0:3000]", "test[0:9000]")
        .replace("test[3000:3500]", "test[9000:]");
    std::fs::write(&config, text).unwrap();
    let command = args(&["extract", config.to_str().unwrap()]);
    kill_and_rerun(work, "features", &command, |_| Some(command.clone()), 1);
}

#[test]
fn training_and_finetuning_killed_anywhere_resume_to_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let config = base_config(work, "tr", "[\"train\"]", "");
    let (ok, err) = mono(work, &args(&["extract", config.to_str().unwrap()]));
    assert!(ok, "{err}");
    let command = args(&["train", config.to_str().unwrap()]);
    let run = work.join("runs/tr");
    kill_and_rerun(
        work,
        "runs/tr",
        &command,
        |_| Some(resume_if_checkpointed(&run, command.clone())),
        2,
    );

    let finetune = base_config(
        work,
        "ft",
        "[\"finetune\"]",
        "[finetune]\nlambda = 0.0\nepochs = 3\nbatch_size = 50\noptimizer = \"adamw\"\nlr = 0.003\n\
         weight_decay = 0.0\nwarmup_epochs = 0\nlabel_smoothing = 0.0\naugment = false\n",
    );
    let text = std::fs::read_to_string(&finetune)
        .unwrap()
        .replace("test[0:3000]", "test[0:400]")
        .replace("test[3000:3500]", "test[400:600]");
    std::fs::write(&finetune, text).unwrap();
    let command = args(&["finetune", finetune.to_str().unwrap()]);
    let run = work.join("runs/ft");
    kill_and_rerun(
        work,
        "runs/ft",
        &command,
        |_| Some(resume_if_checkpointed(&run, command.clone())),
        3,
    );
}

#[test]
fn import_and_merge_killed_anywhere_leave_nothing_and_rerun_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // 60,000 × 64 f32 features with class labels.
    let (rows, dim) = (60_000usize, 64usize);
    let mut rng = StdRng::seed_from_u64(4);
    let values: Vec<u8> =
        (0..rows * dim).flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes()).collect();
    write_npy(&work.join("f.npy"), "<f4", &format!("({rows}, {dim})"), &values);
    let labels: Vec<u8> = (0..rows).flat_map(|i| ((i % 7) as i64).to_le_bytes()).collect();
    write_npy(&work.join("l.npy"), "<i8", &format!("({rows},)"), &labels);
    let import = args(&[
        "features",
        "import",
        "--features",
        "f.npy",
        "--labels",
        "l.npy",
        "--out",
        "imported",
        "--val-fraction",
        "0.1",
        "--test-fraction",
        "0.1",
        "--shard-size",
        "5000",
    ]);
    // An import or merge renames its whole output into place at the end: if the kill came
    // after that, the output is complete and a rerun would (rightly) refuse to overwrite it.
    let unless_done = |out: &'static str, command: &Vec<String>| {
        let command = command.clone();
        move |work: &Path| (!work.join(out).exists()).then(|| command.clone())
    };
    kill_and_rerun(work, "imported", &import, unless_done("imported", &import), 5);

    let config = base_config(work, "parts", "[\"extract\"]", "");
    for part in ["0/2", "1/2"] {
        let (ok, err) = mono(work, &args(&["extract", config.to_str().unwrap(), "--shard", part]));
        assert!(ok, "{err}");
    }
    let merge = args(&[
        "features",
        "merge",
        "features-part-0-of-2",
        "features-part-1-of-2",
        "--out",
        "merged",
        "--shard-size",
        "50",
    ]);
    kill_and_rerun(work, "merged", &merge, unless_done("merged", &merge), 6);
}

#[test]
fn mono_run_killed_anywhere_reruns_to_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let config =
        base_config(work, "pipe", "[\"extract\", \"train\"]", "[sweep]\nlambda = [0.0, 0.001]\n");
    // The features go into the run directory (a stage directory keyed by their inputs).
    let text = std::fs::read_to_string(&config).unwrap().replace("dir = \"features\"\n", "");
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap().to_string();
    let command = args(&["run", &config]);
    kill_and_rerun(work, "runs/pipe", &command, |_| Some(command.clone()), 7);
}

fn write_npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn two_runs_of_one_config_never_both_write() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let config = base_config(work, "pair", "[\"extract\", \"train\"]", "");
    let text = std::fs::read_to_string(&config).unwrap().replace("dir = \"features\"\n", "");
    std::fs::write(&config, text).unwrap();
    let command = args(&["run", config.to_str().unwrap()]);
    let (ok, err) = mono(work, &command);
    assert!(ok, "{err}");
    let out = work.join("runs/pair");
    let reference = snapshot(&out);

    // At once: exactly one runs; the other fails at once, naming the holder.
    std::fs::remove_dir_all(&out).unwrap();
    let spawn = |extra: &[&str]| {
        Command::new(MONO)
            .args(&command)
            .args(extra)
            .arg("--quiet")
            .current_dir(work)
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(&[]), spawn(&[]));
    let pids = [a.id(), b.id()];
    let outputs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let failed: Vec<usize> = (0..2).filter(|&i| !outputs[i].status.success()).collect();
    assert_eq!(failed.len(), 1, "exactly one of two concurrent runs fails");
    let loser = failed[0];
    let err = String::from_utf8_lossy(&outputs[loser].stderr);
    assert!(
        err.contains("is in use by another mono process")
            && err.contains(&format!("pid {}", pids[1 - loser])),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(snapshot(&out), reference, "the winner's outputs are intact");

    // With --wait the second waits, then finds every stage done.
    std::fs::remove_dir_all(&out).unwrap();
    let first = spawn(&[]);
    std::thread::sleep(Duration::from_millis(300));
    let second = spawn(&["--wait"]);
    assert!(first.wait_with_output().unwrap().status.success());
    let waited = second.wait_with_output().unwrap();
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stderr));
    assert_eq!(snapshot(&out), reference);
}

/// `mono` with files limited to `bytes` (writes beyond fail with EFBIG, as on a full disk).
fn mono_with_file_limit(work: &Path, args: &[String], bytes: u64) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(MONO);
    command.args(args).arg("--quiet").current_dir(work).env_remove("RUST_BACKTRACE");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = command.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_misuse_fails_in_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let config = base_config(work, "good", "[\"train\"]", "");
    let (ok, err) = mono(work, &args(&["extract", config.to_str().unwrap()]));
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&config).unwrap();
    let variant = |name: &str, from: &str, to: &str| -> String {
        let path = work.join(format!("{name}.toml"));
        assert!(text.contains(from), "{from}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let fails = |command: &[String], expect: &str| {
        let (ok, err) = mono(work, command);
        assert!(!ok, "expected a failure: {command:?}");
        assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(expect), "`{expect}` not in: {err}");
    };

    // Names that would leave run.output or the feature set.
    let dotdot = variant("dotdot", "name = \"good\"", "name = \"..\"");
    fails(&args(&["train", &dotdot]), "run.name = \"..\" must be a plain directory name");
    let split = variant("split", "eval_split = \"test[3000:3500]\"", "eval_split = \"../val\"");
    fails(&args(&["train", &split]), "data.eval_split = \"../val\" must be a plain split name");
    // An SAE no machine holds, refused before allocating.
    let huge = variant("huge", "n_latents = 256", "n_latents = 1073741824");
    let huge_text =
        std::fs::read_to_string(&huge).unwrap().replace("batch_size = 128", "batch_size = 2");
    std::fs::write(&huge, huge_text).unwrap();
    fails(&args(&["train", &huge]), "weights per matrix is beyond any device");
    // Zero rows per batch: refused by the argument parser (its usage error, exit code 2).
    let zero = Command::new(MONO)
        .args(["score", "--embeddings", "e.npy", "--activations", "a.npy", "--batch-rows", "0"])
        .output()
        .unwrap();
    assert_eq!(zero.status.code(), Some(2));
    let err = String::from_utf8_lossy(&zero.stderr);
    assert!(err.lines().next().unwrap().contains("'0' for '--batch-rows"), "{err}");
    assert!(run_dirs(work).is_empty(), "nothing was written: {:?}", run_dirs(work));

    // A manifest claiming 10^15 rows.
    let store = work.join("features/test_0-3000");
    let copy = work.join("claims");
    copy_dir(&work.join("features"), &copy);
    let manifest_path = copy.join("test_0-3000/manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["count"] = 1_000_000_000_000_000u64.into();
    manifest["shards"][0]["rows"] = 1_000_000_000_000_000u64.into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let claims = variant("claims", "dir = \"features\"", "dir = \"claims\"");
    fails(
        &args(&["train", &claims]),
        "manifest.json: count = 1000000000000000 but the shards hold",
    );
    // A shard that is a symbolic link out of its store.
    let linked = work.join("linked");
    copy_dir(&work.join("features"), &linked);
    let shard = linked.join("test_0-3000/shard-00001.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(store.join("shard-00001.safetensors"), &shard).unwrap();
    let linked_config = variant("linked", "dir = \"features\"", "dir = \"linked\"");
    fails(&args(&["train", &linked_config]), "outside the store");
    assert!(run_dirs(work).is_empty(), "nothing was written: {:?}", run_dirs(work));

    // A full disk while training: the file is named once.
    let (ok, err) =
        mono_with_file_limit(work, &args(&["train", config.to_str().unwrap()]), 64 << 10);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot write ") && err.matches("(os error 27)").count() == 1, "{err}");
    std::fs::remove_dir_all(work.join("runs/good")).unwrap();

    // Resuming with other settings or inputs: each difference named, old → new.
    let reference_run = variant("full", "name = \"good\"", "name = \"full\"");
    let (ok, err) = mono(work, &args(&["train", &reference_run]));
    assert!(ok, "{err}");
    let stopped =
        variant("stopped", "checkpoint_every = 7", "checkpoint_every = 7\nmax_steps = 20");
    let stopped_text = std::fs::read_to_string(&stopped).unwrap();
    std::fs::write(&stopped, stopped_text.replace("name = \"good\"", "name = \"stopped\""))
        .unwrap();
    let (ok, err) = mono(work, &args(&["train", &stopped]));
    assert!(ok, "{err}");
    let changed = variant("changed", "lambda = 0.001", "lambda = 0.002");
    let changed =
        std::fs::read_to_string(&changed).unwrap().replace("name = \"good\"", "name = \"stopped\"");
    std::fs::write(work.join("changed.toml"), changed).unwrap();
    fails(
        &args(&["train", work.join("changed.toml").to_str().unwrap(), "--resume"]),
        "(mono.lambda: 0.001 → 0.002)",
    );
    // A damaged newest checkpoint: the older one is used, saying so, and the run ends exactly
    // as an uninterrupted one.
    let newest = work.join("runs/stopped/checkpoints/step-00000020/sae_weights.safetensors");
    std::fs::write(&newest, b"damaged").unwrap();
    let resumed = std::fs::read_to_string(&reference_run)
        .unwrap()
        .replace("name = \"full\"", "name = \"stopped\"");
    std::fs::write(work.join("resumed.toml"), resumed).unwrap();
    let (ok, err) =
        mono(work, &args(&["train", work.join("resumed.toml").to_str().unwrap(), "--resume"]));
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped checkpoint")
            && err.contains("step-00000020")
            && err.contains("step-00000014"),
        "{err}"
    );
    let (a, b) = (
        std::fs::read(work.join("runs/full/sae/sae_weights.safetensors")).unwrap(),
        std::fs::read(work.join("runs/stopped/sae/sae_weights.safetensors")).unwrap(),
    );
    assert!(a == b, "resumed from the older checkpoint = uninterrupted");
}

/// What is in `work/runs` besides (released) lock files.
fn run_dirs(work: &Path) -> Vec<String> {
    std::fs::read_dir(work.join("runs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
