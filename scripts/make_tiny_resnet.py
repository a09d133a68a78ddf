#!/usr/bin/env python3
"""Writes data/models/tiny-resnet: a small randomly initialised bottleneck ResNet with torchvision's
layout and tensor names (stem 16 channels, one bottleneck per stage, widths 8/16/32/64, 256-d
pooled output), for the offline quickstart, which trains it on Fashion-MNIST before extracting
features. Initialisation as torchvision's ResNet: Kaiming-normal (fan_out) convolutions, BatchNorm
weight 1 and bias 0, running statistics 0 and 1. Deterministic (seed 0).

Usage: /tmp/refenv/bin/python scripts/make_tiny_resnet.py   (needs torch and safetensors)
"""
import json
import pathlib

import torch
from safetensors.torch import save_file

STEM, WIDTHS = 16, [8, 16, 32, 64]


def main():
    g = torch.Generator().manual_seed(0)
    tensors = {}

    def conv(name, out_c, in_c, k):
        std = (2.0 / (out_c * k * k)) ** 0.5  # kaiming_normal_, mode fan_out, relu
        tensors[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g) * std

    def bn(name, c):
        tensors[f"{name}.weight"] = torch.ones(c)
        tensors[f"{name}.bias"] = torch.zeros(c)
        tensors[f"{name}.running_mean"] = torch.zeros(c)
        tensors[f"{name}.running_var"] = torch.ones(c)

    conv("conv1", STEM, 3, 7)
    bn("bn1", STEM)
    inp = STEM
    for s, w in enumerate(WIDTHS, start=1):
        base, out = f"layer{s}.0", w * 4
        conv(f"{base}.conv1", w, inp, 1); bn(f"{base}.bn1", w)
        conv(f"{base}.conv2", w, w, 3); bn(f"{base}.bn2", w)
        conv(f"{base}.conv3", out, w, 1); bn(f"{base}.bn3", out)
        conv(f"{base}.downsample.0", out, inp, 1); bn(f"{base}.downsample.1", out)
        inp = out
    out_dir = pathlib.Path(__file__).resolve().parent.parent / "data/models/tiny-resnet"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=2) + "\n")
    print(f"{sum(v.numel() for v in tensors.values())} values → {out_dir}")


if __name__ == "__main__":
    main()
