#!/usr/bin/env python3
"""PyTorch side of `mono bench extract`: the same encoder architectures (random weights) in
transformers/torchvision, forward pass at batch 32 on this machine's CPU, eval mode, no grad.

Usage: python3 scripts/bench_extract_torch.py [--encoders clip-b32,siglip2-b16,vit-b16,resnet50] [--batch 32 --batches 3]
Needs torch, transformers, torchvision. Prints one JSON line per encoder.
"""
import argparse
import json
import time

import torch


def build(name):
    import transformers as tf
    if name in ("clip-b32", "clip-l14"):
        big = name == "clip-l14"
        cfg = tf.CLIPVisionConfig(hidden_size=1024 if big else 768, num_hidden_layers=24 if big else 12,
                                  num_attention_heads=16 if big else 12, intermediate_size=4096 if big else 3072,
                                  patch_size=14 if big else 32, image_size=224, projection_dim=768 if big else 512,
                                  hidden_act="quick_gelu")
        model = tf.CLIPVisionModelWithProjection(cfg)
        return model, lambda x: model(pixel_values=x).image_embeds
    if name == "siglip2-b16":
        cfg = tf.SiglipVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, patch_size=16, image_size=224)
        model = tf.SiglipVisionModel(cfg)
        return model, lambda x: model(pixel_values=x).pooler_output
    if name == "vit-b16":
        cfg = tf.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, patch_size=16, image_size=224)
        model = tf.ViTModel(cfg, add_pooling_layer=False)
        return model, lambda x: model(pixel_values=x).last_hidden_state[:, 0]
    if name == "resnet50":
        import torchvision
        model = torchvision.models.resnet50()
        model.fc = torch.nn.Identity()
        return model, model
    raise SystemExit(f"unknown encoder {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default="clip-b32,siglip2-b16,vit-b16,resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    for name in a.encoders.split(","):
        model, fwd = build(name)
        model.eval()
        x = torch.randn(a.batch, 3, 224, 224)
        with torch.no_grad():
            fwd(x)
            t = time.perf_counter()
            for _ in range(a.batches):
                out = fwd(x)
            per = (time.perf_counter() - t) / a.batches
        print(json.dumps({"encoder": name, "implementation": "pytorch", "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "dim": int(out.shape[-1]),
                          "seconds_per_batch": round(per, 3), "images_per_second": round(a.batch / per, 1)}))


if __name__ == "__main__":
    main()
