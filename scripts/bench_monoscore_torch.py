#!/usr/bin/env python3
"""PyTorch side of `mono bench monoscore`: the paper's O(N) MonoScore as published
(two passes over the data: min/max first, then dense fp32 sums with a (D×B)·(B×M) matmul),
timed on the same synthetic TopK-like data shape on this machine's CPU.

Usage: python3 scripts/bench_monoscore_torch.py --n 65536 --d 768 --m 8192 --k 64 --batch 4096
Needs torch (pip install torch). Prints one JSON line.
"""
import argparse
import json
import time

import torch


def batch(seed, rows, d, m, k):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(rows, d, generator=g)
    idx = torch.rand(rows, m, generator=g).argsort(dim=1)[:, :k]
    val = torch.empty(rows, k).exponential_(generator=g)
    acts = torch.zeros(rows, m).scatter_(1, idx, val)
    return emb, acts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    batches = [(s, min(a.batch, a.n - s)) for s in range(0, a.n, a.batch)]
    spent = 0.0
    with torch.no_grad():
        lo = hi = None
        for s, rows in batches:  # pass 1: min / max
            _, acts = batch(s, rows, a.d, a.m, a.k)
            t = time.perf_counter()
            bmin, bmax = acts.min(0).values, acts.max(0).values
            lo = bmin if lo is None else torch.minimum(lo, bmin)
            hi = bmax if hi is None else torch.maximum(hi, bmax)
            spent += time.perf_counter() - t
        sum_a = torch.zeros(a.m)
        sum_a2 = torch.zeros(a.m)
        w = torch.zeros(a.d, a.m)
        for s, rows in batches:  # pass 2: scaled sums
            emb, acts = batch(s, rows, a.d, a.m, a.k)
            t = time.perf_counter()
            scaled = (acts - lo) / (hi - lo + 1e-8)
            p = torch.nn.functional.normalize(emb, dim=1)
            sum_a += scaled.sum(0)
            sum_a2 += (scaled * scaled).sum(0)
            w += p.T @ scaled
            spent += time.perf_counter() - t
        t = time.perf_counter()
        num = 0.5 * ((w * w).sum(0) - sum_a2)
        den = 0.5 * (sum_a * sum_a - sum_a2)
        score = torch.where(den > 1e-8, num / (den + 1e-12), torch.zeros_like(den))
        spent += time.perf_counter() - t
    print(json.dumps({"implementation": "pytorch two-pass dense fp32", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "n": a.n, "d": a.d, "m": a.m, "k": a.k,
                      "seconds": round(spent, 3), "mean_score": float(score[den > 1e-8].mean())}))


if __name__ == "__main__":
    main()
