//! The idx reader on the committed Fashion-MNIST test split, and on broken copies of it.

use std::io::Read;
use std::path::{Path, PathBuf};

use mono::data::idx::{read_idx_images, read_idx_labels, read_idx_pair, FASHION_MNIST_CLASSES};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist").join(name)
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut out).unwrap();
    out
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": "),
    }
}

#[test]
fn reads_the_committed_fashion_mnist_test_split() {
    let (images, labels) =
        read_idx_pair(&data("t10k-images-idx3-ubyte.gz"), &data("t10k-labels-idx1-ubyte.gz"))
            .unwrap();
    assert_eq!((images.count, images.rows, images.cols), (10000, 28, 28));
    assert_eq!(images.pixels.len(), 10000 * 28 * 28);
    assert_eq!(labels.len(), 10000);
    let mut per_class = [0usize; 10];
    for &l in &labels {
        per_class[l as usize] += 1;
    }
    assert_eq!(per_class, [1000; 10]);
    assert_eq!(
        FASHION_MNIST_CLASSES[labels[0] as usize], "Ankle boot",
        "the first test image is an ankle boot"
    );
    // Real images: not blank, full byte range used.
    assert!(images.image(0).iter().any(|&p| p > 200));
    assert_eq!(images.pixels.iter().copied().max(), Some(255));
}

#[test]
fn reads_uncompressed_copies_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("t10k-labels-idx1-ubyte");
    std::fs::write(&raw, gunzip(&data("t10k-labels-idx1-ubyte.gz"))).unwrap();
    assert_eq!(
        read_idx_labels(&raw).unwrap(),
        read_idx_labels(&data("t10k-labels-idx1-ubyte.gz")).unwrap()
    );
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let gz = std::fs::read(data("t10k-images-idx3-ubyte.gz")).unwrap();
    let cut = tmp.path().join("cut-images.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let e = err_of(read_idx_images(&cut));
    assert!(e.contains("cut-images.gz") && e.contains("gzip"), "{e}");

    let raw = gunzip(&data("t10k-images-idx3-ubyte.gz"));
    let short = tmp.path().join("short-images");
    std::fs::write(&short, &raw[..raw.len() - 100]).unwrap();
    let e = err_of(read_idx_images(&short));
    assert!(e.contains("short-images") && e.contains("truncated"), "{e}");

    let mut bad = raw.clone();
    bad[2] = 0x0d; // float elements
    let bad_path = tmp.path().join("bad-images");
    std::fs::write(&bad_path, &bad).unwrap();
    let e = err_of(read_idx_images(&bad_path));
    assert!(e.contains("bad-images") && e.contains("element type 0x0d"), "{e}");

    // A label file where images are expected, and the reverse.
    let e = err_of(read_idx_images(&data("t10k-labels-idx1-ubyte.gz")));
    assert!(e.contains("t10k-labels-idx1-ubyte.gz") && e.contains("1-dimensional"), "{e}");
    let e = err_of(read_idx_labels(&data("t10k-images-idx3-ubyte.gz")));
    assert!(e.contains("3-dimensional"), "{e}");

    let e = err_of(read_idx_pair(&data("t10k-images-idx3-ubyte.gz"), &tmp.path().join("none.gz")));
    assert!(e.contains("none.gz"), "{e}");
}
