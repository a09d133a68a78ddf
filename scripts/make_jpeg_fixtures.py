#!/usr/bin/env python3
"""Build the JPEG decoding fixtures under tests/fixtures/jpeg/.

Run from the repository root with the reference environment (see tests/fixtures/README.md):

    /tmp/refenv/bin/python scripts/make_jpeg_fixtures.py

From the committed PNG photos in tests/fixtures/preprocess/images/ it writes JPEGs with Pillow
in the layouts ImageNet and OpenImages contain (4:2:0, 4:2:2 and 4:4:4 chroma
subsampling, baseline and progressive, optimised Huffman tables, restart markers, odd sizes,
greyscale, Adobe CMYK) and, with libjpeg-turbo's cjpeg, 4:1:1, 4:4:0 and RGB-coded JPEGs; beside
each, what PIL decodes it to:

  <name>.jpg             the file
  <name>.pillow.png      Image.open(<name>.jpg).convert("RGB"), lossless
  truncated.jpg          the first 60 % of a JPEG: Pillow refuses it ("image file is truncated")
  cmyk_table.pillow.png  PIL's CMYK;I -> RGB conversion of a 256 x 256 grid of raw libjpeg CMYK
                         bytes (pixel (x, y) = (x, 255 - x, (x + y) % 256, y)), every (C, K)
                         pair once
  clip.safetensors       pixel_values [3, 224, 224] float16 of some JPEGs through the CLIP
                         image processor (PIL backend): the whole decode + preprocess path
  jpeg.json              versions, per-file layout and Pillow's result

The Rust tests (tests/jpeg.rs) read only these files.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import safetensors
import safetensors.torch
import torch
import transformers
from PIL import Image, features

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "fixtures" / "preprocess" / "images"
OUT = REPO / "tests" / "fixtures" / "jpeg"

# name -> (photo, crop box (left, top, right, bottom), mode, save options)
FILES = {
    "coffee_420_q85": ("coffee", (0, 0, 299, 197), "RGB", {"quality": 85, "subsampling": "4:2:0"}),
    "coffee_444_q95_progressive": ("coffee", (1, 2, 300, 200), "RGB",
                                   {"quality": 95, "subsampling": "4:4:4", "progressive": True}),
    "astronaut_422_q90": ("astronaut", (0, 0, 225, 299), "RGB", {"quality": 90, "subsampling": "4:2:2"}),
    "astronaut_420_progressive_optimized": ("astronaut", (3, 5, 226, 300), "RGB",
                                            {"quality": 75, "subsampling": "4:2:0", "progressive": True,
                                             "optimize": True}),
    "chelsea_420_restart": ("chelsea_rgba", (7, 3, 290, 181), "RGB",
                            {"quality": 88, "subsampling": "4:2:0", "restart_marker_blocks": 5}),
    "camera_gray_q80": ("camera", (0, 0, 299, 211), "L", {"quality": 80}),
    "camera_gray_progressive": ("camera", (0, 0, 300, 210), "L", {"quality": 70, "progressive": True}),
    "coffee_cmyk_q90": ("coffee", (0, 0, 297, 199), "CMYK", {"quality": 90}),
}

# JPEGs also compared after the CLIP processor (decode + resize + crop + normalise).
CLIP_STEMS = ["coffee_420_q85", "astronaut_422_q90"]

# Layouts Pillow cannot write, made with libjpeg-turbo's cjpeg (Debian libjpeg-turbo-progs):
# name -> (photo, crop box, cjpeg arguments).
CJPEG_FILES = {
    "chelsea_411_cjpeg": ("chelsea_rgba", (0, 0, 301, 200), ["-quality", "80", "-sample", "4x1"]),
    "chelsea_440_cjpeg": ("chelsea_rgba", (2, 1, 299, 200), ["-quality", "85", "-sample", "1x2"]),
    "coffee_rgb_cjpeg": ("coffee", (0, 0, 251, 173), ["-quality", "90", "-rgb"]),
}


def clip_processor():
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    # The same settings as the "clip" family of tests/fixtures/preprocess/preprocess.json.
    return CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC, do_center_crop=True, do_convert_rgb=True,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=False, compress_level=9)


def layout(path: Path) -> dict:
    with Image.open(path) as im:
        info = {"mode": im.mode, "size_wh": list(im.size),
                "progressive": bool(im.info.get("progressive", 0) or im.info.get("progression", 0))}
        if im.mode != "L":
            from PIL import JpegImagePlugin
            info["subsampling"] = JpegImagePlugin.get_sampling(im)
        info["adobe"] = "adobe" in im.info
    return info


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    meta = {
        "generator": "/tmp/refenv/bin/python scripts/make_jpeg_fixtures.py",
        "versions": {"python": ".".join(map(str, sys.version_info[:3])), "pillow": PIL.__version__,
                     "libjpeg_turbo": features.version("libjpeg_turbo"), "numpy": np.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__},
        "files": {},
    }
    for name, (photo, box, mode, options) in FILES.items():
        source = Image.open(PHOTOS / f"{photo}.png")
        source.load()
        base = source.convert("L" if mode == "L" else "RGB").crop(box)
        if mode == "CMYK":
            base = base.convert("CMYK")
        path = OUT / f"{name}.jpg"
        base.save(path, format="JPEG", **options)
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        save_png(rgb, OUT / f"{name}.pillow.png")
        meta["files"][name] = {"source": f"tests/fixtures/preprocess/images/{photo}.png", "crop_box": list(box),
                               "save_options": options, **layout(path)}

    for name, (photo, box, args) in CJPEG_FILES.items():
        source = Image.open(PHOTOS / f"{photo}.png")
        source.load()
        ppm = io.BytesIO()
        source.convert("RGB").crop(box).save(ppm, format="PPM")
        data = subprocess.run(["cjpeg", *args], input=ppm.getvalue(), capture_output=True, check=True).stdout
        path = OUT / f"{name}.jpg"
        path.write_bytes(data)
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        save_png(rgb, OUT / f"{name}.pillow.png")
        version = subprocess.run(["cjpeg", "-version"], capture_output=True, text=True).stderr.strip()
        meta["files"][name] = {"source": f"tests/fixtures/preprocess/images/{photo}.png", "crop_box": list(box),
                               "cjpeg": args, "cjpeg_version": version, **layout(path)}

    # A file cut off in the middle of its entropy-coded data.
    whole = (OUT / "coffee_420_q85.jpg").read_bytes()
    cut = whole[: len(whole) * 6 // 10]
    (OUT / "truncated.jpg").write_bytes(cut)
    try:
        Image.open(io.BytesIO(cut)).load()
        refused = None
    except OSError as exc:
        refused = str(exc)
    assert refused is not None, "Pillow decoded a truncated JPEG"
    meta["files"]["truncated"] = {"source": "first 60 % of coffee_420_q85.jpg", "pillow_error": refused}

    # PIL's conversion of libjpeg's raw CMYK bytes, for every (C, K) pair.
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    raw = np.stack([x, 255 - x, (x + y) % 256, y], axis=-1).astype(np.uint8)
    table = Image.frombytes("CMYK", (256, 256), raw.tobytes(), "raw", "CMYK;I").convert("RGB")
    save_png(table, OUT / "cmyk_table.pillow.png")

    processor = clip_processor()
    tensors = {}
    for stem in CLIP_STEMS:
        with Image.open(OUT / f"{stem}.jpg") as im:
            im.load()
            pv = processor(images=im, return_tensors="pt")["pixel_values"][0].float()
        tensors[stem] = pv.to(torch.float16).contiguous()
    info = {"family": "clip", "dtype": "float16", "images": CLIP_STEMS}
    safetensors.torch.save_file(tensors, str(OUT / "clip.safetensors"),
                                metadata={"fixture": json.dumps(info, sort_keys=True, separators=(",", ":"))})
    meta["clip"] = {"images": CLIP_STEMS,
                    "processor": "CLIPImageProcessorPil, the clip family settings of preprocess.json; "
                                 "the PIL image passed straight in (do_convert_rgb)"}
    (OUT / "jpeg.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
