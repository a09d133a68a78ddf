#!/usr/bin/env python3
"""PyTorch side of `mono bench finetune`: one finetuning step of ResNet-50 (torchvision) and
CLIP-ViT-B/32 (transformers), random weights, with the paper's head (Linear → ReLU → TopK(k = width)
→ classifier), CE + λ·MonoLoss (dense batch form), backward and SGD, at 224×224 on this CPU.

Usage: python3 scripts/bench_finetune_torch.py [--models resnet50,clip-b32 --batch 16 --steps 2 --lambda 0.1]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def mono_loss(feats, acts, eps=1e-8):
    p = F.normalize(feats, dim=1)
    lo, hi = acts.min(0, keepdim=True).values, acts.max(0, keepdim=True).values
    a = (acts - lo) / (hi - lo + eps)
    u, v, w = a.sum(0), (a * a).sum(0), p.T @ a
    num, den = 0.5 * ((w * w).sum(0) - v), 0.5 * (u * u - v)
    active = den > eps
    return 1 - (num[active] / (den[active] + eps)).mean()


def build(name):
    if name == "resnet50":
        import torchvision
        m = torchvision.models.resnet50()
        m.fc = torch.nn.Identity()
        return m, m, 2048
    import transformers as tf
    cfg = tf.CLIPVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              patch_size=32, image_size=224, hidden_act="quick_gelu")
    m = tf.CLIPVisionModel(cfg)
    return m, lambda x: m(pixel_values=x).pooler_output, 768


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,clip-b32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.1)
    a = ap.parse_args()
    torch.manual_seed(0)
    for name in a.models.split(","):
        backbone, fwd, d = build(name)
        hidden, classifier = torch.nn.Linear(d, d), torch.nn.Linear(d, 1000)
        params = list(backbone.parameters()) + list(hidden.parameters()) + list(classifier.parameters())
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        backbone.train()
        x = torch.randn(a.batch, 3, 224, 224)
        y = torch.arange(a.batch) * 37 % 1000
        steps = []
        for i in range(a.steps + 1):
            t = time.perf_counter()
            feats = fwd(x)
            h = torch.relu(hidden(feats))
            top = h.topk(d, dim=-1)
            h = torch.zeros_like(h).scatter(-1, top.indices, top.values)
            loss = F.cross_entropy(classifier(h), y) + a.lam * mono_loss(feats.detach(), h)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i > 0:  # the first step warms up
                steps.append(time.perf_counter() - t)
        per = statistics.median_high(steps)  # as `mono bench finetune` reports
        print(json.dumps({"model": name, "implementation": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "seconds_per_step": round(per, 3), "step_seconds": [round(t, 3) for t in steps],
                          "images_per_second": round(a.batch / per, 2)}))


if __name__ == "__main__":
    main()
