//! The image data set readers on the committed Fashion-MNIST split, on real photos, and on small
//! fixtures written here in each set's real on-disk format (CIFAR binary records and Python
//! pickles, tar.gz archives, ImageNet / OpenImages trees with their CSV and label files).

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use mono::config::DatasetKind;
use mono::data::idx::{read_idx_pair, FASHION_MNIST_CLASSES};
use mono::data::images::{load_image_file, open_dataset, ImageDataset};
use mono::data::store::LabelKind;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": "),
    }
}

fn open(kind: DatasetKind, root: &Path, split: &str) -> Box<dyn ImageDataset> {
    match open_dataset(kind, root, split) {
        Ok(set) => set,
        Err(e) => panic!("{kind:?} {split} at {}: {e:#}", root.display()),
    }
}

fn all_labels(set: &dyn ImageDataset) -> Vec<Vec<u32>> {
    (0..set.len()).map(|i| set.labels(i)).collect()
}

fn all_paths(set: &dyn ImageDataset) -> Vec<String> {
    (0..set.len()).map(|i| set.path(i)).collect()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn save(path: &Path, image: &DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

/// A small RGB test card whose pixels all differ.
fn card(w: u32, h: u32, seed: u8) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x * 40) as u8 ^ seed, (y * 50) as u8, seed.wrapping_add((x + y) as u8 * 7)])
    })
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST (committed, real)

#[test]
fn fashion_mnist_committed_test_split() {
    let root = repo("data/fashion-mnist");
    let set = open(DatasetKind::FashionMnist, &root, "test");
    assert_eq!(set.len(), 10000);
    assert_eq!(set.label_kind(), LabelKind::Class);
    assert_eq!(set.class_names(), FASHION_MNIST_CLASSES.map(String::from));
    let mut per_class = [0usize; 10];
    for i in 0..set.len() {
        let l = set.labels(i);
        assert_eq!(l.len(), 1);
        per_class[l[0] as usize] += 1;
    }
    assert_eq!(per_class, [1000; 10]);

    let (images, labels) = read_idx_pair(
        &root.join("t10k-images-idx3-ubyte.gz"),
        &root.join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    for i in [0, 1, 4321, 9999] {
        assert_eq!(set.labels(i), vec![u32::from(labels[i])]);
        let rgb = set.load(i).unwrap();
        assert_eq!(rgb.dimensions(), (28, 28));
        let grey = images.image(i);
        for (k, px) in rgb.pixels().enumerate() {
            assert_eq!(px.0, [grey[k]; 3], "item {i} pixel {k}");
        }
    }
    assert_eq!(set.path(123), "fashion_mnist/test/000123");
    assert_eq!(set.missing(), 0);

    // "val" is the test split; there is no train split committed, and the error says which file.
    assert_eq!(open(DatasetKind::FashionMnist, &root, "val").len(), 10000);
    let e = err_of(open_dataset(DatasetKind::FashionMnist, &root, "train"));
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    assert!(err_of(open_dataset(DatasetKind::FashionMnist, &root, "extra")).contains("\"extra\""));
}

#[test]
fn mnist_plain_idx_files_in_torchvision_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("MNIST/raw");
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    images.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    write(&raw.join("train-images-idx3-ubyte"), &images);
    write(&raw.join("train-labels-idx1-ubyte"), &[0, 0, 8, 1, 0, 0, 0, 2, 7, 3]);
    let set = open(DatasetKind::Mnist, tmp.path(), "train");
    assert_eq!(set.class_names()[7], "7");
    assert_eq!(all_labels(&*set), vec![vec![7], vec![3]]);
    let second = set.load(1).unwrap();
    // 3 columns × 2 rows, row-major.
    assert_eq!(second.dimensions(), (3, 2));
    assert_eq!(second.get_pixel(2, 1).0, [12, 12, 12]);
    assert_eq!(set.path(1), "mnist/train/000001");
}

// ---------------------------------------------------------------------------------------------
// CIFAR

/// Pixel byte of record `r`, channel `c`, row `y`, column `x`: distinct enough that a swapped
/// plane, transposed image or shifted record shows.
fn cifar_byte(r: usize, c: usize, y: usize, x: usize) -> u8 {
    ((r * 37 + c * 101 + y * 7 + x * 3) % 256) as u8
}

/// The 3072 bytes of record `r`: R plane, G plane, B plane, each 32 × 32 row-major.
fn cifar_image(r: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(3072);
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                v.push(cifar_byte(r, c, y, x));
            }
        }
    }
    v
}

fn check_cifar_pixels(set: &dyn ImageDataset, i: usize, record: usize) {
    let rgb = set.load(i).unwrap();
    assert_eq!(rgb.dimensions(), (32, 32));
    for (x, y) in [(0, 0), (31, 0), (0, 31), (5, 17), (31, 31)] {
        let expected = [0, 1, 2].map(|c| cifar_byte(record, c, y as usize, x as usize));
        assert_eq!(rgb.get_pixel(x, y).0, expected, "item {i} (record {record}) at x={x}, y={y}");
    }
}

const CIFAR10_NAMES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Records of the fixture: train has 2 per batch (records 0..10), test has 3 (records 100..103).
fn cifar10_train_label(r: usize) -> u8 {
    ((r * 3 + 1) % 10) as u8
}

fn cifar_binary_batch(
    records: std::ops::Range<usize>,
    label_bytes: impl Fn(usize) -> Vec<u8>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend(label_bytes(r));
        out.extend(cifar_image(r));
    }
    out
}

/// `name → bytes` of the cifar-10-batches-bin directory.
fn cifar10_binary_files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for b in 0..5 {
        files.push((
            format!("data_batch_{}.bin", b + 1),
            cifar_binary_batch(2 * b..2 * b + 2, |r| vec![cifar10_train_label(r)]),
        ));
    }
    files.push(("test_batch.bin".into(), cifar_binary_batch(100..103, |r| vec![(r % 10) as u8])));
    files.push((
        "batches.meta.txt".into(),
        format!("{}\n\n", CIFAR10_NAMES.join("\n")).into_bytes(),
    ));
    files
}

fn write_dir(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        write(&dir.join(name), bytes);
    }
}

/// A gzipped tar holding `top/` and the files in it, as the originals are packed.
fn write_tar_gz(path: &Path, top: &str, files: &[(String, Vec<u8>)]) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, format!("{top}/"), std::io::empty()).unwrap();
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, format!("{top}/{name}"), bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

fn check_cifar10(set: &dyn ImageDataset, split: &str) {
    assert_eq!(set.class_names(), CIFAR10_NAMES.map(String::from));
    assert_eq!(set.label_kind(), LabelKind::Class);
    if split == "train" {
        assert_eq!(set.len(), 10);
        for i in 0..10 {
            assert_eq!(set.labels(i), vec![u32::from(cifar10_train_label(i))], "item {i}");
        }
        for i in [0, 1, 2, 9] {
            check_cifar_pixels(set, i, i);
        }
        assert_eq!(set.path(9), "cifar10/train/000009");
    } else {
        assert_eq!(set.len(), 3);
        assert_eq!(all_labels(set), vec![vec![0], vec![1], vec![2]]);
        check_cifar_pixels(set, 2, 102);
        assert_eq!(set.path(0), "cifar10/test/000000");
    }
}

#[test]
fn cifar10_binary_extracted_and_archived() {
    let tmp = tempfile::tempdir().unwrap();
    let files = cifar10_binary_files();

    let extracted = tmp.path().join("extracted");
    write_dir(&extracted.join("cifar-10-batches-bin"), &files);
    for split in ["train", "test"] {
        check_cifar10(&*open(DatasetKind::Cifar10, &extracted, split), split);
    }
    // The extracted directory itself as the root.
    check_cifar10(
        &*open(DatasetKind::Cifar10, &extracted.join("cifar-10-batches-bin"), "test"),
        "test",
    );

    let archived = tmp.path().join("archived");
    std::fs::create_dir_all(&archived).unwrap();
    write_tar_gz(&archived.join("cifar-10-binary.tar.gz"), "cifar-10-batches-bin", &files);
    for split in ["train", "val"] {
        check_cifar10(
            &*open(DatasetKind::Cifar10, &archived, split),
            if split == "val" { "test" } else { split },
        );
    }
    check_cifar10(
        &*open(DatasetKind::Cifar10, &archived.join("cifar-10-binary.tar.gz"), "train"),
        "train",
    );
}

#[test]
fn cifar100_binary_uses_fine_labels() {
    let tmp = tempfile::tempdir().unwrap();
    // Coarse label byte 19 - (r % 20), fine label byte 99 - r.
    let labels = |r: usize| vec![(19 - r % 20) as u8, (99 - r) as u8];
    let fine: Vec<String> = (0..100).map(|i| format!("fine_{i}")).collect();
    let files = vec![
        ("train.bin".to_string(), cifar_binary_batch(0..4, labels)),
        ("test.bin".to_string(), cifar_binary_batch(10..12, labels)),
        ("fine_label_names.txt".to_string(), (fine.join("\n") + "\n").into_bytes()),
        ("coarse_label_names.txt".to_string(), b"c0\nc1\n".to_vec()),
    ];
    write_tar_gz(&tmp.path().join("cifar-100-binary.tar.gz"), "cifar-100-binary", &files);
    let train = open(DatasetKind::Cifar100, tmp.path(), "train");
    assert_eq!(train.class_names(), &fine[..]);
    assert_eq!(all_labels(&*train), vec![vec![99], vec![98], vec![97], vec![96]]);
    check_cifar_pixels(&*train, 3, 3);
    let test = open(DatasetKind::Cifar100, tmp.path(), "test");
    assert_eq!(all_labels(&*test), vec![vec![89], vec![88]]);
    check_cifar_pixels(&*test, 1, 11);
    assert_eq!(test.path(1), "cifar100/test/000001");
}

#[test]
fn cifar_binary_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = cifar10_binary_files();
    files[5].1.pop(); // test_batch.bin one byte short
    write_dir(&tmp.path().join("cifar-10-batches-bin"), &files);
    let e = err_of(open_dataset(DatasetKind::Cifar10, tmp.path(), "test"));
    assert!(e.contains("test_batch.bin") && e.contains("3073-byte records"), "{e}");

    let empty = tempfile::tempdir().unwrap();
    let e = err_of(open_dataset(DatasetKind::Cifar10, empty.path(), "test"));
    assert!(e.contains("cifar-10-python.tar.gz") && e.contains("cifar-10-batches-bin/"), "{e}");

    let truncated = tempfile::tempdir().unwrap();
    write_tar_gz(
        &truncated.path().join("cifar-10-binary.tar.gz"),
        "cifar-10-batches-bin",
        &cifar10_binary_files()[..2],
    );
    let e = err_of(open_dataset(DatasetKind::Cifar10, truncated.path(), "test"));
    assert!(e.contains("cifar-10-batches-bin/test_batch.bin: not in the archive"), "{e}");

    let garbage = tempfile::tempdir().unwrap();
    write(&garbage.path().join("cifar-10-binary.tar.gz"), b"not gzip at all");
    let e = err_of(open_dataset(DatasetKind::Cifar10, garbage.path(), "test"));
    assert!(e.contains("corrupt or truncated archive"), "{e}");
}

/// Writes pickles the way Python does, opcode by opcode: protocol 2, with the memo puts of
/// cPickle. `py2` = bytes as Python 2 `str` (BINSTRING, how the CIFAR originals were written);
/// otherwise as Python 3 writes `bytes` at protocol 2 (`_codecs.encode(text, 'latin1')`).
struct Pickler {
    out: Vec<u8>,
    py2: bool,
    memo: u32,
}

impl Pickler {
    fn new(py2: bool) -> Self {
        Self { out: vec![0x80, 2], py2, memo: 0 }
    }

    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    fn put(&mut self) -> &mut Self {
        if self.memo < 256 {
            self.out.extend([b'q', self.memo as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(self.memo.to_le_bytes());
        }
        self.memo += 1;
        self
    }

    fn int(&mut self, v: i64) -> &mut Self {
        match v {
            0..=255 => self.op(&[b'K', v as u8]),
            256..=65535 => self.op(b"M").op(&(v as u16).to_le_bytes()),
            _ => self.op(b"J").op(&(v as i32).to_le_bytes()),
        }
    }

    fn unicode(&mut self, s: &str) -> &mut Self {
        self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes()).put()
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        if self.py2 {
            if b.len() < 256 {
                self.op(&[b'U', b.len() as u8]);
            } else {
                self.op(b"T").op(&(b.len() as u32).to_le_bytes());
            }
            self.op(b).put()
        } else {
            let latin1: String = b.iter().map(|&c| c as char).collect();
            self.global("_codecs", "encode")
                .unicode(&latin1)
                .unicode("latin1")
                .op(&[0x86])
                .put()
                .op(b"R")
                .put()
        }
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n").put()
    }

    /// numpy's `ndarray.__reduce__`: `_reconstruct(ndarray, (0,), b'b')`, then BUILD with
    /// `(1, shape, dtype('u1'), False, raw bytes)`.
    fn uint8_array(&mut self, rows: usize, cols: usize, data: &[u8]) -> &mut Self {
        self.global("numpy.core.multiarray", "_reconstruct").global("numpy", "ndarray");
        self.int(0).op(&[0x85]).put().bytes(b"b").op(&[0x87]).put().op(b"R").put();
        self.op(b"(").int(1).int(rows as i64).int(cols as i64).op(&[0x86]).put();
        self.global("numpy", "dtype").bytes(b"u1").int(0).int(1).op(&[0x87]).put().op(b"R").put();
        self.op(b"(").int(3).bytes(b"|").op(b"NNN").int(-1).int(-1).int(0).op(b"t").put().op(b"b");
        self.op(&[0x89]).bytes(data).op(b"t").put().op(b"b")
    }

    fn int_list(&mut self, values: &[i64]) -> &mut Self {
        self.op(b"]").put().op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"e")
    }

    fn bytes_list(&mut self, values: &[&str]) -> &mut Self {
        self.op(b"]").put().op(b"(");
        for v in values {
            self.bytes(v.as_bytes());
        }
        self.op(b"e")
    }

    fn dict_start(&mut self) -> &mut Self {
        self.op(b"}").put().op(b"(")
    }

    fn dict_end(&mut self) -> Vec<u8> {
        self.op(b"u.");
        std::mem::take(&mut self.out)
    }
}

/// A data batch dict as the CIFAR python version has it.
fn pickled_batch(
    py2: bool,
    records: std::ops::Range<usize>,
    label_keys: &[(&str, &dyn Fn(usize) -> i64)],
) -> Vec<u8> {
    let images: Vec<u8> = records.clone().flat_map(cifar_image).collect();
    let mut p = Pickler::new(py2);
    p.dict_start();
    p.bytes(b"data").uint8_array(records.len(), 3072, &images);
    for (key, label) in label_keys {
        let labels: Vec<i64> = records.clone().map(label).collect();
        p.bytes(key.as_bytes()).int_list(&labels);
    }
    p.bytes(b"batch_label").bytes(b"training batch 1 of 5");
    let names: Vec<String> = records.clone().map(|r| format!("img_{r}.png")).collect();
    p.bytes(b"filenames").bytes_list(&names.iter().map(String::as_str).collect::<Vec<_>>());
    p.dict_end()
}

/// A meta dict written by serde-pickle (bytes keys and values, as Python 3 would re-pickle it).
fn pickled_meta(entries: &[(&str, Vec<String>)]) -> Vec<u8> {
    use serde_pickle::{HashableValue, SerOptions, Value};
    let mut dict = std::collections::BTreeMap::new();
    for (key, names) in entries {
        let list = names.iter().map(|n| Value::Bytes(n.as_bytes().to_vec())).collect();
        dict.insert(HashableValue::Bytes(key.as_bytes().to_vec()), Value::List(list));
    }
    dict.insert(HashableValue::Bytes(b"num_vis".to_vec()), Value::I64(3072));
    serde_pickle::value_to_vec(&Value::Dict(dict), SerOptions::new().proto_v2()).unwrap()
}

fn cifar10_pickle_files(py2: bool) -> Vec<(String, Vec<u8>)> {
    let train_label = |r: usize| i64::from(cifar10_train_label(r));
    let test_label = |r: usize| (r % 10) as i64;
    let mut files = Vec::new();
    for b in 0..5 {
        files.push((
            format!("data_batch_{}", b + 1),
            pickled_batch(py2, 2 * b..2 * b + 2, &[("labels", &train_label)]),
        ));
    }
    files.push(("test_batch".into(), pickled_batch(py2, 100..103, &[("labels", &test_label)])));
    files.push((
        "batches.meta".into(),
        pickled_meta(&[("label_names", CIFAR10_NAMES.map(String::from).to_vec())]),
    ));
    files.push(("readme.html".into(), b"<html></html>".to_vec()));
    files
}

#[test]
fn cifar10_python_pickles_extracted_and_archived() {
    for py2 in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let files = cifar10_pickle_files(py2);
        write_dir(&tmp.path().join("cifar-10-batches-py"), &files);
        for split in ["train", "test"] {
            check_cifar10(&*open(DatasetKind::Cifar10, tmp.path(), split), split);
        }
        let archived = tempfile::tempdir().unwrap();
        write_tar_gz(
            &archived.path().join("cifar-10-python.tar.gz"),
            "cifar-10-batches-py",
            &files,
        );
        for split in ["train", "test"] {
            check_cifar10(&*open(DatasetKind::Cifar10, archived.path(), split), split);
        }
    }
}

#[test]
fn cifar100_python_pickle_uses_fine_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let fine_label = |r: usize| (r * 13 % 100) as i64;
    let coarse_label = |r: usize| (r % 20) as i64;
    let fine: Vec<String> = (0..100).map(|i| format!("fine_{i}")).collect();
    let coarse: Vec<String> = (0..20).map(|i| format!("coarse_{i}")).collect();
    let labels: [(&str, &dyn Fn(usize) -> i64); 2] =
        [("fine_labels", &fine_label), ("coarse_labels", &coarse_label)];
    let files = vec![
        ("train".to_string(), pickled_batch(true, 0..5, &labels)),
        ("test".to_string(), pickled_batch(true, 50..52, &labels)),
        (
            "meta".to_string(),
            pickled_meta(&[("fine_label_names", fine.clone()), ("coarse_label_names", coarse)]),
        ),
    ];
    write_tar_gz(&tmp.path().join("cifar-100-python.tar.gz"), "cifar-100-python", &files);
    let train = open(DatasetKind::Cifar100, tmp.path(), "train");
    assert_eq!(train.class_names(), &fine[..]);
    assert_eq!(all_labels(&*train), (0..5).map(|r| vec![fine_label(r) as u32]).collect::<Vec<_>>());
    check_cifar_pixels(&*train, 4, 4);
    let test = open(DatasetKind::Cifar100, tmp.path(), "test");
    assert_eq!(all_labels(&*test), vec![vec![50 * 13 % 100], vec![51 * 13 % 100]]);
    check_cifar_pixels(&*test, 0, 50);
}

#[test]
fn cifar10_numpy_protocol5_pickle() {
    // Written by Python 3 + numpy (scripts/make_dataset_fixtures.py): `_frombuffer`, not `_reconstruct`.
    let set = open(DatasetKind::Cifar10, &repo("tests/fixtures/cifar_pickle5"), "test");
    assert_eq!(set.class_names(), CIFAR10_NAMES.map(String::from));
    assert_eq!(all_labels(&*set), vec![vec![0], vec![1], vec![2]]);
    for i in 0..3 {
        check_cifar_pixels(&*set, i, 200 + i);
    }
}

#[test]
fn cifar_pickle_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = cifar10_pickle_files(true);
    files[5].1 = b"\x80\x02garbage".to_vec();
    write_dir(&tmp.path().join("cifar-10-batches-py"), &files);
    let e = err_of(open_dataset(DatasetKind::Cifar10, tmp.path(), "test"));
    assert!(e.contains("test_batch") && e.contains("not a readable pickle"), "{e}");

    // Labels out of range for the class names.
    let mut files = cifar10_pickle_files(true);
    files[5].1 = pickled_batch(true, 0..1, &[("labels", &|_| 10)]);
    write_dir(&tmp.path().join("cifar-10-batches-py"), &files);
    let e = err_of(open_dataset(DatasetKind::Cifar10, tmp.path(), "test"));
    assert!(e.contains("test_batch") && e.contains("label 10"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Pixel conversions on real photos and written files

/// Sum of the bytes and sum of (k + 1) · byte (mod 2^64), as scripts/make_image_fixtures.py computes.
fn checksums(rgb: &RgbImage) -> (u64, u64) {
    let raw = rgb.as_raw();
    let sum = raw.iter().map(|&b| u64::from(b)).sum();
    let weighted = raw
        .iter()
        .enumerate()
        .fold(0u64, |acc, (k, &b)| acc.wrapping_add((k as u64 + 1).wrapping_mul(u64::from(b))));
    (sum, weighted)
}

#[test]
fn grey_and_rgba_photos_are_pils_convert_rgb() {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/images/convert_rgb.json")).unwrap(),
    )
    .unwrap();
    // Grey: replicated (transformers' convert_rgb and PIL's convert("RGB") agree on it).
    let name = "camera.png";
    let rgb = load_image_file(&repo("tests/fixtures/preprocess/images").join(name)).unwrap();
    let r = &refs[name];
    assert_eq!(u64::from(rgb.width()), r["width"].as_u64().unwrap());
    assert_eq!(u64::from(rgb.height()), r["height"].as_u64().unwrap());
    assert_eq!(checksums(&rgb), (r["sum"].as_u64().unwrap(), r["weighted_sum"].as_u64().unwrap()));
    // RGBA: the colour channels, alpha dropped (the reference pipelines convert("RGB") first).
    let path = repo("tests/fixtures/preprocess/images/chelsea_rgba.png");
    let rgb = load_image_file(&path).unwrap();
    let rgba = image::open(&path).unwrap().to_rgba8();
    let colour: Vec<u8> = rgba.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    assert!(rgba.pixels().any(|p| p.0[3] < 255), "the fixture has transparency");
    assert_eq!(rgb.as_raw(), &colour);
}

#[test]
fn cmyk_jpeg_decodes_like_pillow() {
    let rgb = load_image_file(&repo("tests/fixtures/images/cmyk_adobe.jpg")).unwrap();
    let pillow =
        image::open(repo("tests/fixtures/images/cmyk_adobe_pillow_rgb.png")).unwrap().to_rgb8();
    assert_eq!(rgb.dimensions(), (24, 16));
    assert_eq!(rgb.dimensions(), pillow.dimensions());
    // The same decoder and CMYK conversion as PIL: identical pixels.
    assert!(rgb.as_raw() == pillow.as_raw(), "CMYK JPEG differs from Pillow");
}

// ---------------------------------------------------------------------------------------------
// folder

/// root/train/{cat,dog,empty}: an RGB PNG, a nested JPEG, a grey PNG, an RGBA PNG, a 16-bit PNG,
/// an upper-case .JPEG, a corrupt .jpg, plus files that are not images or are hidden.
fn folder_tree(root: &Path) {
    let t = root.join("train");
    save(&t.join("cat/a.png"), &DynamicImage::ImageRgb8(card(5, 3, 1)));
    save(&t.join("cat/nested/deeper/b.jpg"), &DynamicImage::ImageRgb8(card(16, 8, 2)));
    save(
        &t.join("dog/grey.png"),
        &DynamicImage::ImageLuma8(ImageBuffer::from_fn(3, 2, |x, y| {
            Luma([(x * 60 + y * 7) as u8])
        })),
    );
    let rgba = RgbaImage::from_fn(4, 1, |x, _| Rgba([200, 100, 0, [255, 0, 128, 64][x as usize]]));
    save(&t.join("dog/rgba.png"), &DynamicImage::ImageRgba8(rgba));
    let wide =
        ImageBuffer::from_raw(2, 1, vec![257 * 9 + 128, 257 * 9 + 129, 65535, 0, 1000, 300u16])
            .unwrap();
    save(&t.join("dog/wide16.png"), &DynamicImage::ImageRgb16(wide));
    save(&t.join("dog/UPPER.JPEG"), &DynamicImage::ImageRgb8(card(8, 8, 3)));
    write(&t.join("dog/broken.jpg"), b"\xff\xd8\xff\xe0 these are not the bytes of a JPEG");
    write(&t.join("dog/notes.txt"), b"not an image");
    save(&t.join("dog/.hidden.png"), &DynamicImage::ImageRgb8(card(2, 2, 4)));
    std::fs::create_dir_all(t.join("empty")).unwrap();
}

#[test]
fn folder_lists_classes_and_files_sorted() {
    let tmp = tempfile::tempdir().unwrap();
    folder_tree(tmp.path());
    let set = open(DatasetKind::Folder, tmp.path(), "train");
    assert_eq!(set.class_names(), ["cat", "dog", "empty"]);
    assert_eq!(set.label_kind(), LabelKind::Class);
    assert_eq!(
        all_paths(&*set),
        [
            "train/cat/a.png",
            "train/cat/nested/deeper/b.jpg",
            "train/dog/UPPER.JPEG",
            "train/dog/broken.jpg",
            "train/dog/grey.png",
            "train/dog/rgba.png",
            "train/dog/wide16.png",
        ]
    );
    assert_eq!(all_labels(&*set), [[0], [0], [1], [1], [1], [1], [1]].map(|l| l.to_vec()));

    // RGB PNG: exact.
    assert_eq!(set.load(0).unwrap(), card(5, 3, 1));
    // JPEG: lossy, the right size and close.
    let b = set.load(1).unwrap();
    assert_eq!(b.dimensions(), (16, 8));
    assert_eq!(set.load(2).unwrap().dimensions(), (8, 8));
    // Grey → R = G = B.
    let grey = set.load(4).unwrap();
    assert_eq!(grey.dimensions(), (3, 2));
    assert_eq!(grey.get_pixel(2, 1).0, [127; 3]);
    // RGBA (a = 255, 0, 128, 64): alpha dropped, as PIL's convert("RGB").
    let rgba = set.load(5).unwrap();
    assert!(rgba.pixels().all(|p| p.0 == [200, 100, 0]));
    // 16-bit: round(v / 257).
    let wide = set.load(6).unwrap();
    assert_eq!(wide.as_raw(), &[9, 10, 255, 0, 4, 1]);
}

#[test]
fn corrupt_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    folder_tree(tmp.path());
    let set = open(DatasetKind::Folder, tmp.path(), "train");
    let i = all_paths(&*set).iter().position(|p| p.ends_with("broken.jpg")).unwrap();
    let e = err_of(set.load(i));
    assert!(e.contains("broken.jpg") && e.contains("cannot decode"), "{e}");
    // The others still load.
    assert!((0..set.len()).filter(|&j| j != i).all(|j| set.load(j).is_ok()));

    // A file deleted after open: an error naming it, too.
    std::fs::remove_file(tmp.path().join("train/cat/a.png")).unwrap();
    let e = err_of(set.load(0));
    assert!(e.contains("a.png"), "{e}");
    let e = err_of(set.load(set.len()));
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn folder_split_dot_and_missing_split() {
    let tmp = tempfile::tempdir().unwrap();
    save(&tmp.path().join("b/x.png"), &DynamicImage::ImageRgb8(card(2, 2, 0)));
    save(&tmp.path().join("a/y.webp"), &DynamicImage::ImageRgb8(card(2, 2, 0)));
    let set = open(DatasetKind::Folder, tmp.path(), ".");
    assert_eq!(set.class_names(), ["a", "b"]);
    assert_eq!(all_paths(&*set), ["a/y.webp", "b/x.png"]);
    assert_eq!(set.load(0).unwrap(), card(2, 2, 0), "lossless webp");

    let e = err_of(open_dataset(DatasetKind::Folder, tmp.path(), "train"));
    assert!(e.contains("no split directory `train`") && e.contains("a, b"), "{e}");
    let e = err_of(open_dataset(DatasetKind::Folder, &tmp.path().join("a"), "."));
    assert!(e.contains("no class subdirectories"), "{e}");
    let e = err_of(open_dataset(DatasetKind::Folder, &tmp.path().join("absent"), "."));
    assert!(e.contains("absent does not exist"), "{e}");
    let none = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(none.path().join("c")).unwrap();
    let e = err_of(open_dataset(DatasetKind::Folder, none.path(), "."));
    assert!(e.contains("no image files"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// ImageNet

const WNIDS: [&str; 3] = ["n01440764", "n01443537", "n01484850"];

/// train/ with the classes created out of order, 2 images each.
fn imagenet_train(root: &Path) {
    for (k, wnid) in [WNIDS[2], WNIDS[0], WNIDS[1]].iter().enumerate() {
        for j in 0..2 {
            save(
                &root.join(format!("train/{wnid}/{wnid}_{j}.JPEG")),
                &DynamicImage::ImageRgb8(card(6, 4, (k * 2 + j) as u8)),
            );
        }
    }
}

/// val/ flat: 4 images; image 3 is a PNG named .JPEG, as a few real ImageNet files are.
fn imagenet_val_flat(root: &Path) {
    for v in 1..=3 {
        save(
            &root.join(format!("val/ILSVRC2012_val_{v:08}.JPEG")),
            &DynamicImage::ImageRgb8(card(5, 5, v as u8)),
        );
    }
    let mut png = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(card(3, 3, 9)).write_to(&mut png, image::ImageFormat::Png).unwrap();
    write(&root.join("val/ILSVRC2012_val_00000004.JPEG"), png.get_ref());
}

#[test]
fn imagenet_class_order_is_sorted_wnids() {
    let tmp = tempfile::tempdir().unwrap();
    imagenet_train(tmp.path());
    let train = open(DatasetKind::Imagenet, tmp.path(), "train");
    assert_eq!(train.class_names(), WNIDS);
    assert_eq!(train.len(), 6);
    assert_eq!(train.path(0), "train/n01440764/n01440764_0.JPEG");
    assert_eq!(all_labels(&*train), [0, 0, 1, 1, 2, 2].map(|l| vec![l]));
    // Item 5 is n01484850_1.JPEG, written from card(6, 4, 1); JPEG is lossy, so roughly equal.
    let got = train.load(5).unwrap();
    assert_eq!(got.dimensions(), (6, 4));
    let mean_diff = card(6, 4, 1)
        .as_raw()
        .iter()
        .zip(got.as_raw())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
        .sum::<f64>()
        / got.as_raw().len() as f64;
    assert!(mean_diff < 20.0, "mean |diff| {mean_diff}");
}

#[test]
fn imagenet_flat_val_with_kaggle_solution_csv() {
    let tmp = tempfile::tempdir().unwrap();
    imagenet_train(tmp.path());
    imagenet_val_flat(tmp.path());
    write(
        &tmp.path().join("LOC_val_solution.csv"),
        b"ImageId,PredictionString\n\
          ILSVRC2012_val_00000003,n01440764 10 20 30 40 n01440764 1 2 3 4\n\
          ILSVRC2012_val_00000001,n01484850 0 0 4 4\n\
          ILSVRC2012_val_00000004,n01443537 0 0 2 2\n\
          ILSVRC2012_val_00000002,n01443537 1 1 3 3\n\
          ILSVRC2012_val_00000099,n01443537 1 1 3 3\n",
    );
    let val = open(DatasetKind::Imagenet, tmp.path(), "val");
    assert_eq!(val.class_names(), WNIDS);
    assert_eq!(val.path(0), "val/ILSVRC2012_val_00000001.JPEG");
    assert_eq!(all_labels(&*val), [2, 1, 0, 1].map(|l| vec![l]));
    // The PNG named .JPEG decodes by its content.
    assert_eq!(val.load(3).unwrap(), card(3, 3, 9));
}

#[test]
fn imagenet_val_labels_txt_wnids_and_indices_with_synset_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    imagenet_val_flat(tmp.path());
    // No train/ here: the class list comes from the mapping, whose descriptions name the classes.
    write(
        &tmp.path().join("LOC_synset_mapping.txt"),
        b"n01443537 goldfish, Carassius auratus\nn01440764 tench, Tinca tinca\nn01484850 great white shark, white shark\n",
    );
    write(
        &tmp.path().join("val_labels.txt"),
        b"ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG n01440764\n\nILSVRC2012_val_00000003.JPEG 1\nILSVRC2012_val_00000004.JPEG n01484850\n",
    );
    let val = open(DatasetKind::Imagenet, tmp.path(), "val");
    assert_eq!(
        val.class_names(),
        ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark"]
    );
    assert_eq!(all_labels(&*val), [2, 0, 1, 2].map(|l| vec![l]));
}

#[test]
fn imagenet_val_folders_take_train_ids_and_kaggle_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("ILSVRC/Data/CLS-LOC");
    imagenet_train(&images);
    // val sorted into folders, one class absent: its ids still follow train/.
    save(&images.join("val/n01484850/v1.JPEG"), &DynamicImage::ImageRgb8(card(4, 4, 0)));
    save(&images.join("val/n01443537/v2.JPEG"), &DynamicImage::ImageRgb8(card(4, 4, 0)));
    let val = open(DatasetKind::Imagenet, tmp.path(), "val");
    assert_eq!(val.class_names(), WNIDS);
    assert_eq!(
        all_paths(&*val),
        ["ILSVRC/Data/CLS-LOC/val/n01443537/v2.JPEG", "ILSVRC/Data/CLS-LOC/val/n01484850/v1.JPEG"]
    );
    assert_eq!(all_labels(&*val), [vec![1], vec![2]]);
    assert!(val.load(0).is_ok());

    save(&images.join("val/n09999999/v3.JPEG"), &DynamicImage::ImageRgb8(card(4, 4, 0)));
    let e = err_of(open_dataset(DatasetKind::Imagenet, tmp.path(), "val"));
    assert!(e.contains("n09999999") && e.contains("not a class"), "{e}");
}

#[test]
fn imagenet_label_errors() {
    let tmp = tempfile::tempdir().unwrap();
    imagenet_val_flat(tmp.path());
    let e = err_of(open_dataset(DatasetKind::Imagenet, tmp.path(), "val"));
    assert!(e.contains("LOC_val_solution.csv") && e.contains("val_labels.txt"), "{e}");

    write(&tmp.path().join("val_labels.txt"), b"ILSVRC2012_val_00000001.JPEG 0\n");
    let e = err_of(open_dataset(DatasetKind::Imagenet, tmp.path(), "val"));
    assert!(e.contains("class indices need the class list"), "{e}");

    write(
        &tmp.path().join("val_labels.txt"),
        b"ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002.JPEG n01440764\nILSVRC2012_val_00000003.JPEG n01443537\n",
    );
    let e = err_of(open_dataset(DatasetKind::Imagenet, tmp.path(), "val"));
    assert!(e.contains("ILSVRC2012_val_00000004.JPEG") && e.contains("no label"), "{e}");

    write(&tmp.path().join("val_labels.txt"), b"ILSVRC2012_val_00000001.JPEG\n");
    let e = err_of(open_dataset(DatasetKind::Imagenet, tmp.path(), "val"));
    assert!(e.contains("val_labels.txt: line 1"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// OpenImages

fn openimages_tree(root: &Path) {
    write(
        &root.join("metadata/oidv7-class-descriptions.csv"),
        b"LabelName,DisplayName\n/m/0k4j,Car\n/m/01g317,Person\n/m/0bt9lr,Dog\n/m/0unused,\"Unused, with a comma\"\n",
    );
    write(
        &root.join("labels/validation-annotations-human-imagelabels-boxable.csv"),
        b"ImageID,Source,LabelName,Confidence\n\
          00b0f5c0a1b2c3d4,verification,/m/0k4j,1\n\
          00b0f5c0a1b2c3d4,verification,/m/01g317,1\n\
          00b0f5c0a1b2c3d4,crowdsource-verification,/m/0k4j,1\n\
          00b0f5c0a1b2c3d4,verification,/m/0bt9lr,0\n\
          0001eeaf4aed83f9,verification,/m/0bt9lr,1\n\
          0001eeaf4aed83f9,verification,/m/01g317,0\n\
          0003d84e0165d630,verification,/m/0k4j,0\n\
          0fffffffffffffff,verification,/m/0k4j,1\n",
    );
    for (k, id) in ["00b0f5c0a1b2c3d4", "0001eeaf4aed83f9", "0003d84e0165d630", "0aaaaaaaaaaaaaaa"]
        .iter()
        .enumerate()
    {
        save(
            &root.join(format!("images/validation/{id}.jpg")),
            &DynamicImage::ImageRgb8(card(7, 5, k as u8)),
        );
    }
}

#[test]
fn openimages_keeps_confidence_one_labels_and_counts_missing_images() {
    let tmp = tempfile::tempdir().unwrap();
    openimages_tree(tmp.path());
    let set = open(DatasetKind::Openimages, tmp.path(), "validation");
    assert_eq!(set.label_kind(), LabelKind::Multi);
    // Sorted MIDs: /m/01g317, /m/0bt9lr, /m/0k4j, /m/0unused.
    assert_eq!(set.class_names(), ["Person", "Dog", "Car", "Unused, with a comma"]);
    // Sorted by ImageID; the negative-only image and the unlisted one are not items.
    assert_eq!(
        all_paths(&*set),
        ["images/validation/0001eeaf4aed83f9.jpg", "images/validation/00b0f5c0a1b2c3d4.jpg"]
    );
    assert_eq!(all_labels(&*set), [vec![1], vec![0, 2]]);
    assert_eq!(set.missing(), 1);
    assert!(set.notes()[0].starts_with("1 images with labels"), "{:?}", set.notes());
    assert_eq!(set.load(1).unwrap().dimensions(), (7, 5));
    assert_eq!(open(DatasetKind::Openimages, tmp.path(), "val").len(), 2);
}

#[test]
fn openimages_boxable_descriptions_restrict_the_classes() {
    let tmp = tempfile::tempdir().unwrap();
    openimages_tree(tmp.path());
    std::fs::remove_file(tmp.path().join("metadata/oidv7-class-descriptions.csv")).unwrap();
    // The boxable file has no header line. The labels file here is the oidv7 one.
    write(
        &tmp.path().join("metadata/class-descriptions-boxable.csv"),
        b"/m/0k4j,Car\n/m/01g317,Person\n",
    );
    std::fs::rename(
        tmp.path().join("labels/validation-annotations-human-imagelabels-boxable.csv"),
        tmp.path().join("labels/oidv7-validation-annotations-human-imagelabels.csv"),
    )
    .unwrap();
    let set = open(DatasetKind::Openimages, tmp.path(), "validation");
    assert_eq!(set.class_names(), ["Person", "Car"]);
    // 0001eeaf4aed83f9 had only a Dog positive: dropped with its label.
    assert_eq!(all_paths(&*set), ["images/validation/00b0f5c0a1b2c3d4.jpg"]);
    assert_eq!(all_labels(&*set), [vec![0, 1]]);
    assert!(
        set.notes()
            .iter()
            .any(|n| n.contains("1 positive labels") && n.contains("1 images kept no label")),
        "{:?}",
        set.notes()
    );
}

#[test]
fn openimages_errors() {
    let tmp = tempfile::tempdir().unwrap();
    openimages_tree(tmp.path());
    let e = err_of(open_dataset(DatasetKind::Openimages, tmp.path(), "train"));
    assert!(e.contains("train-annotations-human-imagelabels-boxable.csv"), "{e}");
    assert!(err_of(open_dataset(DatasetKind::Openimages, tmp.path(), "dev")).contains("\"dev\""));
    write(
        &tmp.path().join("labels/validation-annotations-human-imagelabels-boxable.csv"),
        b"ImageID,Source,LabelName,Confidence\n00b0f5c0a1b2c3d4,verification,/m/0k4j,yes\n",
    );
    let e = err_of(open_dataset(DatasetKind::Openimages, tmp.path(), "validation"));
    assert!(e.contains("line 2") && e.contains("\"yes\""), "{e}");
    write(
        &tmp.path().join("labels/validation-annotations-human-imagelabels-boxable.csv"),
        b"ImageID,LabelName\n",
    );
    let e = err_of(open_dataset(DatasetKind::Openimages, tmp.path(), "validation"));
    assert!(e.contains("no `Confidence` column"), "{e}");
}

#[test]
fn readers_are_thread_safe_trait_objects() {
    fn assert_send_sync<T: Send + Sync + ?Sized>() {}
    assert_send_sync::<dyn ImageDataset>();
}

#[test]
fn split_slices_take_contiguous_ranges() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist");
    let whole =
        mono::data::images::open_dataset(mono::config::DatasetKind::FashionMnist, &root, "test")
            .unwrap();
    let head = mono::data::images::open_dataset(
        mono::config::DatasetKind::FashionMnist,
        &root,
        "test[0:8000]",
    )
    .unwrap();
    let tail = mono::data::images::open_dataset(
        mono::config::DatasetKind::FashionMnist,
        &root,
        "test[8000:]",
    )
    .unwrap();
    assert_eq!((head.len(), tail.len()), (8000, 2000));
    assert_eq!(tail.path(0), whole.path(8000));
    assert_eq!(tail.labels(5), whole.labels(8005));
    assert_eq!(tail.load(3).unwrap(), whole.load(8003).unwrap());
    for bad in ["test[5:5]", "test[a:b]", "test[3]", "test[0:10"] {
        assert!(
            mono::data::images::open_dataset(mono::config::DatasetKind::FashionMnist, &root, bad)
                .is_err(),
            "{bad}"
        );
    }
}
