#!/usr/bin/env python3
"""PyTorch side of `mono score` on files: the authors' two-pass O(N) MonoScore (min/max first,
then dense fp32 sums with a (D×B)·(B×M) matmul) on N×D embeddings and N×M activations stored as
.npy, timed as a whole process would (loading included), one batch of rows at a time.

Usage: python3 scripts/bench_score_torch.py EMB.npy ACTS.npy [--batch 4096] [--threads 0]
Needs torch and numpy. Prints one JSON line (seconds: wall time from start to the scores).
"""
import argparse
import json
import time

t0 = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("embeddings")
    ap.add_argument("activations")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    emb = torch.from_numpy(np.load(a.embeddings))
    acts = torch.from_numpy(np.load(a.activations))
    n, m = acts.shape
    with torch.no_grad():
        lo = hi = None
        for s in range(0, n, a.batch):  # pass 1: min / max
            chunk = acts[s:s + a.batch]
            bmin, bmax = chunk.min(0).values, chunk.max(0).values
            lo = bmin if lo is None else torch.minimum(lo, bmin)
            hi = bmax if hi is None else torch.maximum(hi, bmax)
        sum_a, sum_a2, w = torch.zeros(m), torch.zeros(m), torch.zeros(emb.shape[1], m)
        for s in range(0, n, a.batch):  # pass 2: scaled sums
            scaled = (acts[s:s + a.batch] - lo) / (hi - lo + 1e-8)
            p = torch.nn.functional.normalize(emb[s:s + a.batch], dim=1)
            sum_a += scaled.sum(0)
            sum_a2 += (scaled * scaled).sum(0)
            w += p.T @ scaled
        num = 0.5 * ((w * w).sum(0) - sum_a2)
        den = 0.5 * (sum_a * sum_a - sum_a2)
        score = torch.where(den > 1e-8, num / (den + 1e-12), torch.zeros_like(den))
    now = time.perf_counter()
    print(json.dumps({"implementation": "pytorch two-pass dense fp32 (authors' form)", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "n": n, "m": m, "seconds_compute": round(now - start, 3),
                      "seconds_with_imports": round(now - t0, 3), "mean_score": float(score[den > 1e-8].mean())}))


if __name__ == "__main__":
    main()
