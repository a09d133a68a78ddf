//! `mono features import` end to end on files written here, and bad inputs that must fail with
//! one `error:` line and leave existing output untouched.

use std::collections::HashMap;
use std::path::Path;

use crate::common::{mono, Outcome};
use candle_core::{Device, Tensor};
use mono::data::store::{FeatureStore, LabelKind};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Row i, column c = i * 10 + c (exact in f32 and, for small i, f16).
fn features(n: usize, d: usize) -> Vec<f32> {
    (0..n * d).map(|k| ((k / d) * 10 + k % d) as f32).collect()
}

fn write_npy(path: &Path, v: &[f32], n: usize, d: usize) {
    Tensor::from_vec(v.to_vec(), (n, d), &Device::Cpu).unwrap().write_npy(path).unwrap();
}

/// A 1-D int64 .npy written by hand (candle writes floats only in this test's use).
fn write_int_npy(path: &Path, v: &[i64]) {
    let header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}", v.len());
    let pad = 64 - (10 + header.len() + 1) % 64;
    let header = format!("{header}{}\n", " ".repeat(pad));
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

/// One line, starting with `error:`, and no panic.
fn assert_one_error(o: &Outcome, needle: &str) {
    assert!(!o.ok, "should fail; stdout: {}", o.stdout);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {}", o.stderr);
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "expected {needle:?} in {}",
        lines[0]
    );
    assert!(!o.stderr.contains("panicked"));
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        walk(dir).into_iter().map(|p| p.strip_prefix(dir).unwrap().display().to_string()).collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn imports_npy_features_with_class_labels_names_and_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (23, 5);
    let x = features(n, d);
    write_npy(&tmp.path().join("x.npy"), &x, n, d);
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 4).collect();
    write_int_npy(&tmp.path().join("y.npy"), &labels);
    std::fs::write(tmp.path().join("names.txt"), "cat\ndog\nbird\nfish\n").unwrap();
    let paths: String = (0..n).map(|i| format!("images/{i}.jpg\n")).collect();
    std::fs::write(tmp.path().join("paths.txt"), paths).unwrap();
    let out = tmp.path().join("feats");

    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&tmp.path().join("x.npy")),
        "--labels",
        s(&tmp.path().join("y.npy")),
        "--label-names",
        s(&tmp.path().join("names.txt")),
        "--paths",
        s(&tmp.path().join("paths.txt")),
        "--out",
        s(&out),
        "--split",
        "val",
        "--shard-size",
        "10",
        "--dtype",
        "f16",
    ]);
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout.contains("val: 23 rows × 5 (f16), labels class, 4 classes, 3 shard(s)"),
        "{}",
        o.stdout
    );
    assert_eq!(
        listing(&out),
        vec![
            "val",
            "val/manifest.json",
            "val/shard-00000.safetensors",
            "val/shard-00001.safetensors",
            "val/shard-00002.safetensors"
        ]
    );

    let store = FeatureStore::open(&out.join("val")).unwrap();
    assert_eq!(store.manifest().info.split, "val");
    assert_eq!(store.label_names(), ["cat", "dog", "bird", "fish"]);
    let mut got = Vec::new();
    store.read_range(0, n, &mut got).unwrap();
    assert_eq!(got, x);
    for i in 0..n {
        assert_eq!(store.row_labels(i), &[(i % 4) as u32]);
        assert_eq!(store.path(i).unwrap(), format!("images/{i}.jpg"));
    }
}

#[test]
fn imports_a_safetensors_tensor_into_train_val_test_with_multi_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (40, 3);
    let x = features(n, d);
    let t = Tensor::from_vec(x.clone(), (n, d), &Device::Cpu).unwrap();
    let other = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let file = tmp.path().join("x.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("emb".to_string(), t), ("other".to_string(), other)]),
        &file,
    )
    .unwrap();
    // Row i has labels {i % 3, 5} for even i, none for odd i.
    let text: String =
        (0..n).map(|i| if i % 2 == 0 { format!("{},5\n", i % 3) } else { "\n".into() }).collect();
    std::fs::write(tmp.path().join("y.txt"), text).unwrap();
    let out = tmp.path().join("set");
    let spec = format!("{}:emb", s(&file));
    let y = tmp.path().join("y.txt");
    let args = [
        "features",
        "import",
        "--features",
        &spec,
        "--labels",
        s(&y),
        "--out",
        s(&out),
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.1",
        "--seed",
        "7",
        "--shard-size",
        "8",
    ];
    let o = mono(&args);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(o.stdout.lines().count(), 3, "{}", o.stdout);

    let mut seen = vec![0; n];
    let mut sizes = Vec::new();
    for split in ["train", "val", "test"] {
        let store = mono::data::store::open_split(&out, split).unwrap();
        assert_eq!(store.manifest().info.labels, LabelKind::Multi);
        assert_eq!(store.n_classes(), 6, "default names 0..=5");
        assert_eq!(store.label_names()[5], "5");
        sizes.push(store.len());
        let mut got = Vec::new();
        store.read_range(0, store.len(), &mut got).unwrap();
        let mut last = None;
        for r in 0..store.len() {
            let i: usize = store.path(r).unwrap().strip_prefix("row-").unwrap().parse().unwrap();
            assert!(last < Some(i), "rows keep their input order within a split");
            last = Some(i);
            seen[i] += 1;
            assert_eq!(got[r * d..(r + 1) * d], x[i * d..(i + 1) * d]);
            let expected: Vec<u32> = if i & 1 == 0 { vec![(i % 3) as u32, 5] } else { vec![] };
            assert_eq!(store.row_labels(r), &expected[..]);
        }
    }
    assert_eq!(sizes, vec![26, 10, 4]);
    assert!(seen.iter().all(|&c| c == 1), "every row in exactly one split");

    // Same seed, same division: a second import elsewhere gives the same train paths.
    let out2 = tmp.path().join("set2");
    let mut args2 = args;
    args2[7] = s(&out2);
    assert!(mono(&args2).ok);
    let a = FeatureStore::open(&out.join("train")).unwrap();
    let b = FeatureStore::open(&out2.join("train")).unwrap();
    assert!((0..a.len()).all(|r| a.path(r).unwrap() == b.path(r).unwrap()));
}

#[test]
fn label_count_mismatch_fails_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    write_npy(&tmp.path().join("x.npy"), &features(6, 2), 6, 2);
    write_int_npy(&tmp.path().join("y.npy"), &[0, 1, 0, 1, 0]);
    let out = tmp.path().join("out");
    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&tmp.path().join("x.npy")),
        "--labels",
        s(&tmp.path().join("y.npy")),
        "--out",
        s(&out),
    ]);
    assert_one_error(&o, "y.npy holds labels for 5 rows but");
    assert!(o.stderr.contains("x.npy has 6 rows"), "{}", o.stderr);
    assert!(!out.exists());

    std::fs::write(tmp.path().join("paths.txt"), "a\nb\n").unwrap();
    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&tmp.path().join("x.npy")),
        "--paths",
        s(&tmp.path().join("paths.txt")),
        "--out",
        s(&out),
    ]);
    assert_one_error(&o, "lists 2 paths but");
    assert!(!out.exists());
}

#[test]
fn nan_features_fail_naming_the_row_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (30, 4);
    let mut x = features(n, d);
    x[27 * d + 1] = f32::NAN;
    write_npy(&tmp.path().join("x.npy"), &x, n, d);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&tmp.path().join("x.npy")),
        "--out",
        s(&out),
        "--shard-size",
        "5",
        "--batch-rows",
        "8",
    ]);
    assert_one_error(&o, "x.npy: value at row 27, column 1 is NaN");
    assert_eq!(listing(&out), vec!["keep.txt"], "no store, no temporary directory");

    // A directory the import created itself is removed again.
    let fresh = tmp.path().join("fresh");
    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&tmp.path().join("x.npy")),
        "--out",
        s(&fresh),
        "--val-fraction",
        "0.5",
    ]);
    assert_one_error(&o, "row 27");
    assert!(!fresh.exists());
}

#[test]
fn an_existing_split_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    write_npy(&tmp.path().join("x.npy"), &features(12, 2), 12, 2);
    write_npy(&tmp.path().join("z.npy"), &[0.5; 24], 12, 2);
    let out = tmp.path().join("out");
    let x = tmp.path().join("x.npy");
    assert!(mono(&["features", "import", "--features", s(&x), "--out", s(&out)]).ok);
    let manifest = std::fs::read(out.join("train/manifest.json")).unwrap();
    let shard = std::fs::read(out.join("train/shard-00000.safetensors")).unwrap();

    let z = tmp.path().join("z.npy");
    let o = mono(&["features", "import", "--features", s(&z), "--out", s(&out)]);
    assert_one_error(&o, "train: already exists; not overwriting it");
    // With fractions the train split collides too; val/test must not appear either.
    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&z),
        "--out",
        s(&out),
        "--val-fraction",
        "0.3",
    ]);
    assert_one_error(&o, "already exists");
    assert_eq!(
        listing(&out),
        vec!["train", "train/manifest.json", "train/shard-00000.safetensors"]
    );
    assert_eq!(std::fs::read(out.join("train/manifest.json")).unwrap(), manifest);
    assert_eq!(std::fs::read(out.join("train/shard-00000.safetensors")).unwrap(), shard);

    // Another split name beside it is fine.
    assert!(
        mono(&["features", "import", "--features", s(&z), "--out", s(&out), "--split", "test"]).ok
    );
}

#[test]
fn other_bad_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    write_npy(&tmp.path().join("x.npy"), &features(4, 2), 4, 2);
    let x = tmp.path().join("x.npy");
    let out = tmp.path().join("out");
    write_int_npy(&tmp.path().join("y.npy"), &[0, 1, 2, 3]);
    std::fs::write(tmp.path().join("names.txt"), "a\nb\n").unwrap();
    let (y, names) = (tmp.path().join("y.npy"), tmp.path().join("names.txt"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--labels", s(&y), "--label-names", s(&names)], "uses label 3 but"),
        (vec!["--split", "val", "--test-fraction", "0.2"], "either --split or"),
        (vec!["--val-fraction", "0.7", "--test-fraction", "0.4"], "must be < 1"),
        (vec!["--dtype", "f64"], "unknown dtype `f64`"),
        (vec!["--label-names", s(&names)], "--label-names needs --labels"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["features", "import", "--features", s(&x), "--out", s(&out)];
        args.extend(extra);
        let o = mono(&args);
        if needle.starts_with("unknown dtype") {
            // clap's own usage error: several lines, but it must not panic and must fail.
            assert!(
                !o.ok && o.stderr.contains(needle) && !o.stderr.contains("panicked"),
                "{}",
                o.stderr
            );
        } else {
            assert_one_error(&o, needle);
        }
        assert!(!out.exists(), "{needle}");
    }
    let o = mono(&[
        "features",
        "import",
        "--features",
        s(&tmp.path().join("missing.npy")),
        "--out",
        s(&out),
    ]);
    assert_one_error(&o, "missing.npy");
}
