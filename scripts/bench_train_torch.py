#!/usr/bin/env python3
"""PyTorch side of `mono bench train`: one BatchTopK SAE training step as the authors' code does it
(dense encoder and decoder, flattened top-k·B, AuxK, dense batch MonoLoss, Adam eps 6.25e-10,
clip 1.0, decoder-gradient projection), timed on this machine's CPU at the same sizes.

Usage: python3 scripts/bench_train_torch.py --d 768 --m 8192 --k 64 --batch 2048 --steps 5
Needs torch. Prints one JSON line per λ.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def batch_mono_loss(x, acts, eps=1e-8):
    p = F.normalize(x, dim=1, eps=1e-8)
    lo = acts.min(dim=0, keepdim=True).values
    hi = acts.max(dim=0, keepdim=True).values
    a = (acts - lo) / (hi - lo + eps)
    u = a.sum(0)
    v = (a * a).sum(0)
    w = p.T @ a
    num = 0.5 * ((w * w).sum(0) - v)
    den = 0.5 * (u * u - v)
    active = den > eps
    score = num[active] / (den[active] + eps)
    return 1.0 - score.mean() if active.any() else acts.sum() * 0.0


class BatchTopK(torch.nn.Module):
    def __init__(self, d, m, k):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.nn.init.kaiming_uniform_(torch.empty(d, m)))
        self.W_dec = torch.nn.Parameter(self.W_enc.data.t().clone())
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True)
        self.b_enc = torch.nn.Parameter(torch.zeros(m))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.inactive = torch.zeros(m)

    def step_loss(self, x, lam):
        acts = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = torch.topk(acts.flatten(), self.k * x.shape[0])
        lat = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
        recon = lat @ self.W_dec + self.b_dec
        self.inactive += (lat.sum(0) == 0).float()
        self.inactive[lat.sum(0) > 0] = 0
        loss = (recon - x).pow(2).mean()
        dead = self.inactive >= 5
        if dead.any():
            aux = torch.topk(acts[:, dead], min(512, int(dead.sum())), dim=-1)
            aux_lat = torch.zeros_like(acts[:, dead]).scatter(-1, aux.indices, aux.values)
            loss = loss + (aux_lat @ self.W_dec[dead] - (x - recon).detach()).pow(2).mean() / 32
        if lam > 0:
            loss = loss + lam * batch_mono_loss(x, lat)
        return loss


def run(args, lam):
    torch.manual_seed(args.seed)
    sae = BatchTopK(args.d, args.m, args.k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    batches = [F.normalize(torch.randn(args.batch, args.d), dim=1) for _ in range(args.steps + 1)]
    steps = []
    for i, x in enumerate(batches):
        t = time.perf_counter()
        loss = sae.step_loss(x, lam)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        with torch.no_grad():
            wn = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
            sae.W_dec.grad -= (sae.W_dec.grad * wn).sum(-1, keepdim=True) * wn
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        if i > 0:  # the first step warms up
            steps.append(time.perf_counter() - t)
    per_step = statistics.median_high(steps)  # as `mono bench train` reports
    return {"implementation": "pytorch batch_topk (authors' structure)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "lambda": lam, "seconds_per_step": round(per_step, 4),
            "samples_per_second": round(args.batch / per_step, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lambda", dest="lam", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    for lam in (0.0, a.lam):
        print(json.dumps(run(a, lam)))


if __name__ == "__main__":
    main()
