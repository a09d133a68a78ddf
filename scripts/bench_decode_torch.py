#!/usr/bin/env python3
"""PIL side of `mono bench decode --images DIR`: JPEG decoding (Image.open + convert("RGB")) and
decoding + torchvision's ImageNet eval transform (Resize 256 bilinear, CenterCrop 224, ToTensor,
Normalize) of every JPEG in DIR, from bytes in memory, on one thread; best of --passes.

Usage: python3 scripts/bench_decode_torch.py DIR [--passes 3]
Needs Pillow, torch, torchvision. Prints one JSON line per measurement.
"""
import argparse
import io
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = [p.read_bytes() for p in sorted(Path(args.dir).iterdir())
             if p.is_file() and p.read_bytes()[:3] == b"\xff\xd8\xff"]
    transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    for work, fn in [("decode", lambda b: Image.open(io.BytesIO(b)).convert("RGB")),
                     ("decode + preprocess", lambda b: transform(Image.open(io.BytesIO(b)).convert("RGB")))]:
        best = float("inf")
        for _ in range(args.passes):
            start = time.perf_counter()
            for b in files:
                fn(b)
            best = min(best, time.perf_counter() - start)
        print(json.dumps({"decoder": "PIL (libjpeg-turbo)", "work": work, "threads": 1, "files": len(files),
                          "images_per_second": round(len(files) / best, 1)}))


if __name__ == "__main__":
    main()
