"""Writes the fixtures of tests/datasets.rs that need Python to make.

tests/fixtures/images/, the references for src/data/images/decode.rs:
- cmyk_adobe.jpg: a CMYK JPEG (Adobe APP14 marker, as Photoshop and Pillow write them), and
  cmyk_adobe_pillow_rgb.png, Pillow's RGB decoding of it;
- convert_rgb.json: checksums of what the Hugging Face image processors' `convert_rgb` (RGBA,
  alpha-composited over white, then RGB) gives for the grey and the RGBA photos in
  tests/fixtures/preprocess/images/.

tests/fixtures/cifar_pickle5/cifar-10-batches-py/: a CIFAR-10 python-version test batch of 3 images
and its batches.meta, pickled by Python 3 with numpy at protocol 5 (Python 3's default, where numpy
pickles arrays through `_frombuffer`, unlike the Python 2 originals that tests/datasets.rs writes
itself). Pixel (record r, channel c, row y, column x) = (37r + 101c + 7y + 3x) mod 256, records
200..203, labels (r mod 10).

    /tmp/pilenv/bin/python scripts/make_dataset_fixtures.py

Needs Pillow and numpy (checked with Python 3.11.7, Pillow 13.0.0, numpy 2.4.6). The CMYK image is
a 24x16 crop of the scikit-image "coffee" photo committed in tests/fixtures/preprocess/images/.
Deterministic: two runs write byte-identical files (the same Pillow/libjpeg version is needed for
the same JPEG bytes).
"""

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests/fixtures/preprocess/images"
SOURCE = PHOTOS / "coffee.png"
OUT = ROOT / "tests/fixtures/images"
CIFAR_OUT = ROOT / "tests/fixtures/cifar_pickle5/cifar-10-batches-py"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def to_cmyk(rgb: Image.Image) -> Image.Image:
    """CMYK with partial black generation, so that both the ink and the black channel matter
    (Pillow's own RGB->CMYK conversion leaves K at 0)."""
    x = np.asarray(rgb, dtype=np.float64) / 255.0
    k = 0.6 * (1.0 - x.max(axis=2))
    cmy = (1.0 - x - k[..., None]) / (1.0 - k[..., None])
    cmyk = np.concatenate([cmy, k[..., None]], axis=2)
    return Image.fromarray(np.round(cmyk * 255.0).astype(np.uint8), mode="CMYK")


def convert_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_rgb, as CLIPImageProcessor and SiglipImageProcessor call it."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def checksums(rgb: Image.Image) -> dict:
    """Sum of the bytes and sum of (k + 1) * byte mod 2^64 over the row-major RGB bytes."""
    data = np.asarray(rgb, dtype=np.uint64).reshape(-1)
    weights = np.arange(1, data.size + 1, dtype=np.uint64)
    return {
        "width": rgb.width,
        "height": rgb.height,
        "sum": int(data.sum()),
        "weighted_sum": int((data * weights).sum(dtype=np.uint64)),
    }


def cifar_pickle5() -> None:
    records = np.arange(200, 203)
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    data = np.stack([((37 * r + 101 * c + 7 * y + 3 * x) % 256).reshape(-1) for r in records]).astype(np.uint8)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(r % 10) for r in records],
        b"data": data,
        b"filenames": [f"img_{r}.png".encode() for r in records],
    }
    meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    CIFAR_OUT.mkdir(parents=True, exist_ok=True)
    (CIFAR_OUT / "test_batch").write_bytes(pickle.dumps(batch, protocol=5))
    (CIFAR_OUT / "batches.meta").write_bytes(pickle.dumps(meta, protocol=5))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    photo = Image.open(SOURCE).convert("RGB")
    # A colourful patch (cup rim and saucer), reduced to 24x16: not square, so a transpose shows.
    patch = photo.crop((150, 100, 390, 260)).resize((24, 16), Image.Resampling.BOX)
    cmyk_path = OUT / "cmyk_adobe.jpg"
    to_cmyk(patch).save(cmyk_path, quality=95)

    decoded = Image.open(cmyk_path)
    assert decoded.mode == "CMYK", decoded.mode
    app14 = decoded.applist and [seg for name, seg in decoded.applist if name == "APP14"]
    assert app14 and app14[0].startswith(b"Adobe"), "expected an Adobe APP14 marker"
    # What CLIPImageProcessor's convert_rgb gives (no alpha here, so the same as convert("RGB")).
    decoded.convert("RGB").save(OUT / "cmyk_adobe_pillow_rgb.png")
    refs = {}
    for name in ["camera.png", "chelsea_rgba.png"]:
        photo = Image.open(PHOTOS / name)
        refs[name] = {"mode": photo.mode, **checksums(convert_rgb(photo))}
    (OUT / "convert_rgb.json").write_text(json.dumps(refs, indent=2) + "\n")

    cifar_pickle5()
    print(f"{cmyk_path.name}: {cmyk_path.stat().st_size} bytes, Adobe transform {app14[0][11]}")


if __name__ == "__main__":
    main()
