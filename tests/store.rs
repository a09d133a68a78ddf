//! The feature store: write → open → read round trips, labels, paths, resume, epoch order, and
//! every kind of broken store `open` must refuse with the file named.

use std::path::{Path, PathBuf};

use mono::config::FloatType;
use mono::data::store::{
    open_split, BatchLabels, FeatureStore, LabelKind, StoreInfo, StoreWriter, MANIFEST_FILE,
};

fn paths(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("img/{i:03}.png")).collect()
}

/// Row i is [i, i + 0.5, -i, i / 8]: exact in f16 for the row counts used here.
fn rows(range: std::ops::Range<usize>, dim: usize) -> Vec<f32> {
    range
        .flat_map(|i| {
            (0..dim).map(move |c| [i as f32, i as f32 + 0.5, -(i as f32), i as f32 / 8.0][c % 4])
        })
        .collect()
}

fn class_info(dim: usize, dtype: FloatType) -> StoreInfo {
    let mut info = StoreInfo::new(dim, "train");
    info.dtype = dtype;
    info.labels = LabelKind::Class;
    info.label_names = vec!["a".into(), "b".into(), "c".into()];
    info
}

/// 25 rows of dim 4 with class labels i % 3, in shards of 10 (10, 10, 5), pushed in uneven batches.
fn write_class_store(dir: &Path, dtype: FloatType) {
    let mut w = StoreWriter::create(dir, class_info(4, dtype), 10).unwrap();
    for (a, b) in [(0, 3), (3, 17), (17, 25)] {
        let ids: Vec<u32> = (a..b).map(|i| (i % 3) as u32).collect();
        w.push(&rows(a..b, 4), BatchLabels::Class(&ids), &paths(a..b)).unwrap();
    }
    w.skip("img/broken.png", "cannot decode");
    let manifest = w.finish().unwrap();
    assert_eq!(manifest.count, 25);
    assert_eq!(manifest.shards.iter().map(|s| s.rows).collect::<Vec<_>>(), vec![10, 10, 5]);
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": "),
    }
}

#[test]
fn round_trip_f32_with_class_labels_over_several_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("train");
    write_class_store(&dir, FloatType::F32);
    let store = FeatureStore::open(&dir).unwrap();
    assert_eq!((store.len(), store.dim(), store.n_classes()), (25, 4, 3));
    assert_eq!(store.shard_ranges(), vec![0..10, 10..20, 20..25]);
    assert_eq!(store.manifest().skipped[0].path, "img/broken.png");

    let mut out = Vec::new();
    store.read_range(0, 25, &mut out).unwrap();
    assert_eq!(out, rows(0..25, 4));
    store.read_range(7, 22, &mut out).unwrap();
    assert_eq!(out, rows(7..22, 4), "a range spanning three shards");
    store.read_range(5, 5, &mut out).unwrap();
    assert!(out.is_empty());
    assert!(store.read_range(20, 26, &mut out).is_err());

    store.read_rows(&[24, 0, 13, 13, 9], &mut out).unwrap();
    let expected: Vec<f32> = [24, 0, 13, 13, 9].iter().flat_map(|&i| rows(i..i + 1, 4)).collect();
    assert_eq!(out, expected);
    assert!(store.read_rows(&[25], &mut out).unwrap_err().to_string().contains("out of range"));

    for i in 0..25 {
        assert_eq!(store.row_labels(i), &[(i % 3) as u32]);
        assert_eq!(store.path(i).unwrap(), format!("img/{i:03}.png"));
    }
    assert_eq!(store.paths(3, 20).unwrap().len(), 17, "paths across shard boundaries");
    assert_eq!(store.paths(3, 20).unwrap()[0], "img/003.png");
}

#[test]
fn round_trip_f16_and_bf16() {
    for dtype in [FloatType::F16, FloatType::Bf16] {
        let tmp = tempfile::tempdir().unwrap();
        write_class_store(tmp.path(), dtype);
        let store = FeatureStore::open(tmp.path()).unwrap();
        let mut out = Vec::new();
        store.read_range(0, 25, &mut out).unwrap();
        assert_eq!(out, rows(0..25, 4), "{dtype:?}");
        store.read_rows(&[3, 21], &mut out).unwrap();
        assert_eq!(out[..4], rows(3..4, 4)[..]);
    }
}

#[test]
fn multi_labels_and_no_labels_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut info = StoreInfo::new(2, "val");
    info.labels = LabelKind::Multi;
    info.label_names = (0..5).map(|i| format!("c{i}")).collect();
    info.dataset = Some("toy".into());
    info.encoder = Some(
        serde_json::json!({"kind": "clip", "model": "m", "revision": "r", "output": "pooler", "normalized": true}),
    );
    let lists: Vec<Vec<u32>> =
        (0..7).map(|i| (0..i % 3).map(|k| ((i + k) % 5) as u32).collect()).collect();
    let mut w = StoreWriter::create(tmp.path(), info, 3).unwrap();
    w.push(&rows(0..7, 2), BatchLabels::Multi(&lists), &paths(0..7)).unwrap();
    w.finish().unwrap();
    let store = FeatureStore::open(tmp.path()).unwrap();
    assert_eq!(store.shard_ranges(), vec![0..3, 3..6, 6..7]);
    for (i, l) in lists.iter().enumerate() {
        assert_eq!(store.row_labels(i), *l, "row {i}");
    }
    assert_eq!(store.manifest().info.encoder.as_ref().unwrap()["output"], "pooler");
    assert_eq!(store.manifest().info.dataset.as_deref(), Some("toy"));

    let plain = tmp.path().join("plain");
    let mut w = StoreWriter::create(&plain, StoreInfo::new(2, "test"), 100).unwrap();
    w.push(&rows(0..4, 2), BatchLabels::None, &paths(0..4)).unwrap();
    w.finish().unwrap();
    let store = FeatureStore::open(&plain).unwrap();
    assert!(store.row_labels(2).is_empty());
    assert_eq!(store.n_classes(), 0);
}

/// The layout Python reads with `safe_open(f, "np")` and `json.loads(metadata()["paths"])`.
#[test]
fn shards_are_plain_safetensors_with_paths_in_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F16);
    let bytes = std::fs::read(tmp.path().join("shard-00002.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let paths_json = &meta.metadata().as_ref().unwrap()["paths"];
    let listed: Vec<String> = serde_json::from_str(paths_json).unwrap();
    assert_eq!(listed, paths(20..25));
    let tensors = meta.tensors();
    assert_eq!(tensors["features"].dtype, safetensors::Dtype::F16);
    assert_eq!(tensors["features"].shape, vec![5, 4]);
    assert_eq!(tensors["labels"].dtype, safetensors::Dtype::I64);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(MANIFEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(manifest["format"], "mono-feature-store/1");
    assert_eq!(manifest["dtype"], "f16");
    assert_eq!(manifest["labels"], "class");
    assert_eq!(manifest["count"], 25);
    assert_eq!(manifest["shards"][2]["file"], "shard-00002.safetensors");
}

#[test]
fn epoch_order_over_a_store() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F32);
    let store = FeatureStore::open(tmp.path()).unwrap();
    let order = store.epoch_order(42, 0);
    let a = order.rows(0..25);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..25).collect::<Vec<u32>>());
    // The order is a function of (rows, seed, epoch) alone.
    assert_eq!(a, mono::data::store::EpochOrder::new(25, 42, 0).rows(0..25));
    assert_ne!(a, store.epoch_order(42, 1).rows(0..25));
    // Reading in that order gives the rows in that order (prefetching first changes nothing).
    store.prefetch_rows(&a[..4]);
    let mut out = Vec::new();
    store.read_rows(&a[..4], &mut out).unwrap();
    let expected: Vec<f32> =
        a[..4].iter().flat_map(|&i| rows(i as usize..i as usize + 1, 4)).collect();
    assert_eq!(out, expected);
}

#[test]
fn open_refuses_a_missing_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(
        e.contains("manifest.json: missing (the store is incomplete or not a feature store)"),
        "{e}"
    );
}

#[test]
fn open_refuses_corrupt_and_truncated_shards() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F32);
    let shard = tmp.path().join("shard-00001.safetensors");
    let good = std::fs::read(&shard).unwrap();

    std::fs::write(&shard, b"this is not a safetensors file at all").unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(e.contains("shard-00001.safetensors: corrupt safetensors header"), "{e}");

    std::fs::write(&shard, &good[..good.len() - 7]).unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(e.contains("shard-00001.safetensors: corrupt safetensors header"), "{e}");

    std::fs::remove_file(&shard).unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(e.contains("shard-00001.safetensors"), "{e}");
}

/// A file that opens but cannot be memory-mapped (as on a file system without mmap support;
/// here a directory in the shard's place): one line naming the file and the cause.
#[cfg(target_os = "linux")]
#[test]
fn open_names_a_shard_that_cannot_be_mapped() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F32);
    let shard = tmp.path().join("shard-00001.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(e.contains("cannot map") && e.contains("shard-00001.safetensors"), "{e}");
    assert!(e.contains("memory maps"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn open_refuses_a_shard_of_another_dim_or_row_count() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    write_class_store(&store, FloatType::F32);
    // A shard of 10 rows but dim 3, otherwise alike.
    let other = tmp.path().join("other");
    let mut w = StoreWriter::create(&other, class_info(3, FloatType::F32), 10).unwrap();
    w.push(&rows(0..10, 3), BatchLabels::Class(&[0; 10]), &paths(0..10)).unwrap();
    w.finish().unwrap();
    std::fs::copy(other.join("shard-00000.safetensors"), store.join("shard-00001.safetensors"))
        .unwrap();
    let e = err_of(FeatureStore::open(&store));
    assert!(
        e.contains("shard-00001.safetensors")
            && e.contains("expected 4 columns")
            && e.contains("has 3"),
        "{e}"
    );

    // The 5-row last shard where a 10-row one belongs.
    std::fs::copy(store.join("shard-00002.safetensors"), store.join("shard-00001.safetensors"))
        .unwrap();
    let e = err_of(FeatureStore::open(&store));
    assert!(e.contains("shard-00001.safetensors: holds 5 rows but the manifest says 10"), "{e}");
}

#[test]
fn open_refuses_a_label_kind_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F32);
    let path = tmp.path().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap().replace("\"class\"", "\"none\"");
    std::fs::write(&path, text).unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(e.contains("shard-00000.safetensors") && e.contains("`labels`"), "{e}");
}

#[test]
fn open_refuses_an_empty_store() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = serde_json::json!({
        "format": "mono-feature-store/1", "dim": 4, "count": 0, "dtype": "f32", "split": "train",
        "labels": "none", "label_names": [], "shards": [], "skipped": []
    });
    std::fs::write(tmp.path().join(MANIFEST_FILE), manifest.to_string()).unwrap();
    let e = err_of(FeatureStore::open(tmp.path()));
    assert!(e.contains("holds no rows"), "{e}");

    let e = err_of(
        StoreWriter::create(&tmp.path().join("w"), StoreInfo::new(2, "train"), 4)
            .and_then(|w| w.finish()),
    );
    assert!(e.contains("no rows to write"), "{e}");
}

#[test]
fn nan_in_a_shard_is_an_error_naming_the_file_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F32);
    let shard = tmp.path().join("shard-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let at = 8 + header_len + meta.tensors()["features"].data_offsets.0 + (3 * 4 + 2) * 4; // row 3, column 2
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();

    let store = FeatureStore::open(tmp.path()).unwrap();
    let mut out = Vec::new();
    store.read_range(0, 10, &mut out).unwrap();
    let e = err_of(store.read_range(0, 25, &mut out));
    assert!(e.contains("shard-00001.safetensors: row 3 (store row 13), column 2 is NaN"), "{e}");
    let e = err_of(store.read_rows(&[2, 13], &mut out));
    assert!(e.contains("shard-00001.safetensors: row 3 (store row 13)"), "{e}");
}

#[test]
fn writer_refuses_bad_rows_and_finished_stores() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(tmp.path(), FloatType::F32);
    let e = err_of(StoreWriter::create(tmp.path(), class_info(4, FloatType::F32), 10));
    assert!(e.contains("manifest.json: already exists"), "{e}");
    let e = err_of(StoreWriter::resume(tmp.path(), class_info(4, FloatType::F32), 10));
    assert!(e.contains("manifest.json: already exists"), "{e}");

    let mut w =
        StoreWriter::create(&tmp.path().join("w"), class_info(2, FloatType::F16), 10).unwrap();
    let e = err_of(w.push(&[1.0, f32::NAN], BatchLabels::Class(&[0]), &paths(0..1)));
    assert!(e.contains("row 0 (img/000.png), column 1"), "{e}");
    let e = err_of(w.push(&[1.0, 1e6], BatchLabels::Class(&[0]), &paths(0..1)));
    assert!(e.contains("not finite in f16"), "{e}");
    let e = err_of(w.push(&[1.0, 2.0], BatchLabels::Class(&[3]), &paths(0..1)));
    assert!(e.contains("label 3 is outside 0..3"), "{e}");
    assert!(w.push(&[1.0, 2.0], BatchLabels::None, &paths(0..1)).is_err());
    assert!(w.push(&[1.0], BatchLabels::Class(&[0]), &paths(0..1)).is_err());
    assert_eq!(w.rows(), 0, "a refused batch is not taken");
}

#[test]
fn resume_keeps_complete_shards_and_drops_temp_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("train");
    let ids: Vec<u32> = (0..25).map(|i| (i % 3) as u32).collect();
    {
        // Cut off after 23 rows: two shards of 10 are on disk, 3 rows only in memory.
        let mut w = StoreWriter::create(&dir, class_info(4, FloatType::F32), 10).unwrap();
        w.push(&rows(0..23, 4), BatchLabels::Class(&ids[..23]), &paths(0..23)).unwrap();
    }
    std::fs::write(dir.join(".tmpAbC123"), b"half a shard").unwrap();
    assert!(err_of(FeatureStore::open(&dir)).contains("missing"));
    let e = err_of(StoreWriter::create(&dir, class_info(4, FloatType::F32), 10));
    assert!(e.contains("unfinished store"), "{e}");
    let e = err_of(StoreWriter::resume(&dir, class_info(5, FloatType::F32), 10));
    assert!(e.contains("shard-00000.safetensors") && e.contains("columns"), "{e}");

    let mut w = StoreWriter::resume(&dir, class_info(4, FloatType::F32), 10).unwrap();
    assert_eq!(w.resumed_rows(), 20);
    assert!(!dir.join(".tmpAbC123").exists());
    w.push(&rows(20..25, 4), BatchLabels::Class(&ids[20..]), &paths(20..25)).unwrap();
    w.finish().unwrap();
    let store = FeatureStore::open(&dir).unwrap();
    let mut out = Vec::new();
    store.read_range(0, 25, &mut out).unwrap();
    assert_eq!(out, rows(0..25, 4));
    assert_eq!(store.path(24).unwrap(), "img/024.png");
}

#[test]
fn open_split_lists_the_splits_present() {
    let tmp = tempfile::tempdir().unwrap();
    write_class_store(&tmp.path().join("train"), FloatType::F32);
    write_class_store(&tmp.path().join("test"), FloatType::F32);
    assert_eq!(open_split(tmp.path(), "test").unwrap().len(), 25);
    let e = err_of(open_split(tmp.path(), "val"));
    assert!(e.contains("no split `val`; it holds test, train"), "{e}");
    let missing: PathBuf = tmp.path().join("nope");
    assert!(err_of(open_split(&missing, "train")).contains("nope"));
}
