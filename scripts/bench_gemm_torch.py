#!/usr/bin/env python3
"""PyTorch side of `mono bench gemm`: GFLOP/s of the products a layer trains with, on the same
shapes and operand layouts, through torch.mm (MKL / oneDNN on the CPU), best of --reps.

ResNet-50 (default): per distinct convolution shape at 224², forward W · cols (O × K by K × N),
weight gradient G · colsᵀ, input gradient Wᵀ · G, channel-major. CLIP-ViT-B/32: per distinct
linear layer on batch × 50 token rows, forward x · Wᵀ, weight gradient Gᵀ · x, input gradient
G · W, row-major. Transposed operands are views, as mono's strided operands are.

Usage: python3 scripts/bench_gemm_torch.py [--model resnet50|clip-b32] [--batch 16] [--reps 3]
"""
import argparse
import json
import time

import torch

RESNET50 = [  # (layer, in channels, out channels, kernel, output side)
    ("stem 7×7", 3, 64, 7, 112),
    ("layer1 3×3", 64, 64, 3, 56),
    ("layer1 1×1 64→256", 64, 256, 1, 56),
    ("layer1 1×1 256→64", 256, 64, 1, 56),
    ("layer2 3×3", 128, 128, 3, 28),
    ("layer2 1×1 128→512", 128, 512, 1, 28),
    ("layer3 3×3", 256, 256, 3, 14),
    ("layer3 1×1 256→1024", 256, 1024, 1, 14),
    ("layer4 3×3", 512, 512, 3, 7),
    ("layer4 1×1 512→2048", 512, 2048, 1, 7),
]
CLIP_B32 = [("attention q/k/v/out", 768, 768), ("mlp fc1", 3072, 768), ("mlp fc2", 768, 3072)]
CLIP_TOKENS = 50


def best_of(reps, f):
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "clip-b32"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.model == "clip-b32":
        shapes = [(layer, o, k, a.batch * CLIP_TOKENS) for layer, o, k in CLIP_B32]
    else:
        shapes = [(layer, o, c * kk * kk, a.batch * side * side) for layer, c, o, kk, side in RESNET50]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.model}, batch {a.batch}, best of {a.reps}; GFLOP/s")
    print(f"{'layer':<22} {'O':>5} {'K':>5} {'N':>7} {'forward':>8} {'dW':>8} {'dX':>8}")
    rows = []
    for layer, o, k, n in shapes:
        w = torch.randn(o, k)
        if a.model == "clip-b32":
            x, g = torch.randn(n, k), torch.randn(n, o)
            fwd, dw, dx = (lambda: x @ w.t()), (lambda: g.t() @ x), (lambda: g @ w)
        else:
            cols, g = torch.randn(k, n), torch.randn(o, n)
            fwd, dw, dx = (lambda: w @ cols), (lambda: g @ cols.t()), (lambda: w.t() @ g)
        flops = 2.0 * o * k * n / 1e9
        r = {"layer": layer, "o": o, "k": k, "n": n,
             "forward_gflops": flops / best_of(a.reps, fwd),
             "weight_gradient_gflops": flops / best_of(a.reps, dw),
             "input_gradient_gflops": flops / best_of(a.reps, dx)}
        rows.append(r)
        print(f"{layer:<22} {o:>5} {k:>5} {n:>7} {r['forward_gflops']:>8.0f} {r['weight_gradient_gflops']:>8.0f} {r['input_gradient_gflops']:>8.0f}")
    print(json.dumps({"benchmark": "gemm", "implementation": "pytorch", "model": a.model, "batch": a.batch, "timings": rows}))


if __name__ == "__main__":
    main()
