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


def authors_monoscore(n, batch, rows):
    """The authors' two-pass MonoScore over `n` rows, `batch` at a time; `rows(start, end)` gives
    (embeddings, activations) of those rows. Returns (score per neuron, den)."""
    with torch.no_grad():
        lo = hi = None
        for s in range(0, n, batch):  # pass 1: min / max
            z = rows(s, min(s + batch, n))[1]
            lo = z.min(0).values if lo is None else torch.minimum(lo, z.min(0).values)
            hi = z.max(0).values if hi is None else torch.maximum(hi, z.max(0).values)
        u = v = w = None
        for s in range(0, n, batch):  # pass 2: scaled sums
            e, z = rows(s, min(s + batch, n))
            z = (z - lo) / (hi - lo + 1e-8)
            p = torch.nn.functional.normalize(e, dim=1)
            if u is None:
                u, v, w = torch.zeros(z.shape[1]), torch.zeros(z.shape[1]), torch.zeros(e.shape[1], z.shape[1])
            u += z.sum(0)
            v += (z * z).sum(0)
            w += p.T @ z
        num = 0.5 * ((w * w).sum(0) - v)
        den = 0.5 * (u * u - v)
        return torch.where(den > 1e-8, num / (den + 1e-12), torch.zeros_like(den)), den


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
    score, den = authors_monoscore(emb.shape[0], a.batch, lambda s, e: (emb[s:e], acts[s:e]))
    now = time.perf_counter()
    print(json.dumps({"implementation": "pytorch two-pass dense fp32 (authors' form)", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "n": emb.shape[0], "m": acts.shape[1], "seconds_compute": round(now - start, 3),
                      "seconds_with_imports": round(now - t0, 3), "mean_score": float(score[den > 1e-8].mean())}))


if __name__ == "__main__":
    main()
