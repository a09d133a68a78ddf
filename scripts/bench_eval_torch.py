#!/usr/bin/env python3
"""PyTorch side of `mono eval --sae`: the authors' evaluation MonoScore
(`compute_monosemanticity_fast`, restated: two passes over the data, the SAE forward in each —
min/max of every latent first, then dense fp32 sums with a (D×B)·(B×M) matmul) of a BatchTopK SAE
on N×D features, as a whole process.

Usage: python3 scripts/bench_eval_torch.py X.npy SAE_DIR [--batch 4096] [--k 64]
SAE_DIR holds sae_weights.safetensors (SAELens layout: W_enc D×M, W_dec, b_dec). The forward is
the reference BatchTopK's: ReLU((x − b_dec)·W_enc), the k·B largest of the batch kept.
Needs torch, numpy, safetensors. Prints one JSON line.
"""
import argparse
import json
import time

t0 = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench_score_torch import authors_monoscore  # noqa: E402  (the same script directory)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("x")
    ap.add_argument("sae")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    a = ap.parse_args()
    x = torch.from_numpy(np.load(a.x))
    w = load_file(f"{a.sae}/sae_weights.safetensors")
    w_enc, b_dec = w["W_enc"], w["b_dec"]

    def latents(rows):
        acts = torch.relu((rows - b_dec) @ w_enc)
        flat = acts.flatten()
        top = flat.topk(a.k * rows.shape[0])
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)

    score, _ = authors_monoscore(x.shape[0], a.batch, lambda s, e: (x[s:e], latents(x[s:e])))
    print(json.dumps({"implementation": "compute_monosemanticity_fast (restated), BatchTopK forward twice",
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "n": x.shape[0], "m": w_enc.shape[1],
                      "seconds_with_imports": round(time.perf_counter() - t0, 2),
                      "mean_score_all_latents": float(score.mean())}))


if __name__ == "__main__":
    main()
