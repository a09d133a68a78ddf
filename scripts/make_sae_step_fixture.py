#!/usr/bin/env python3
"""Build tests/fixtures/sae_step/{topk,batch_topk,jumprelu}.safetensors: one training step of the
reference TopK, BatchTopK and JumpReLU SAEs (the MonoLoss authors' code, restated from its formulas),
from given weights on a given batch, with the batch MonoLoss.

    /tmp/refenv/bin/python scripts/make_sae_step_fixture.py

TopK (OpenAI style, as the reference trains it): per-sample standardisation (divided by the
unbiased std + 1e-5, restored by multiplying by the std alone), pre = (x̂ − pre_bias)·Wᵀ + latent_bias, the k largest per row then ReLU, decoder = the
encoder matrix itself (tied), reconstruction de-standardised, normalised MSE on the raw input,
no gradient clipping; after the backward the rows of W are renormalised, then Adam steps.
BatchTopK: no encoder bias, acts = ReLU((x − b_dec)·W_enc), the k·B largest of the batch,
plain MSE, clip the gradient norm to 1, project the decoder gradient off its rows, set the rows
to unit norm, then Adam steps.
JumpReLU: see `jumprelu_step`.
All add λ·(1 − mean score of the active latents) of the batch MonoLoss (min-max per latent
with eps 1e-8, cosine similarity of the raw inputs, score num/(den + 1e-8) where den > 1e-8).

AuxK is off (aux_coef 0): no latent is dead in one step, and the reference TopK's AuxK then
still moves pre_bias through a zero reconstruction (a quirk mono does not copy).

Adam runs with eps = lr = 1e4, so that each update is ≈ the processed gradient itself (Adam's
first step is otherwise lr·sign(g), which no comparison of gradients survives).
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sae_step"
B, D, M, K, LAMBDA, EPS, LR, ADAM_EPS = 16, 8, 32, 4, 0.1, 1e-8, 1e4, 1e4
JUMP_BANDWIDTH = 0.2


def mono_loss(z, x):
    p = F.normalize(x, dim=-1, eps=1e-8)
    lo, hi = z.min(0).values, z.max(0).values
    a = (z - lo) / (hi - lo + EPS)
    w = p.T @ a
    v = (a * a).sum(0)
    u = a.sum(0)
    num = 0.5 * ((w * w).sum(0) - v)
    den = 0.5 * (u * u - v)
    active = den > EPS
    score = torch.where(active, num / (den + EPS), torch.zeros_like(num))
    mean = score[active].mean() if active.any() else score.sum() * 0
    return 1 - mean


def adam_step(params):
    opt = torch.optim.Adam(params, lr=LR, eps=ADAM_EPS)
    opt.step()


def topk_step(x):
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(M, D, generator=g, dtype=torch.float64) * 2 - 1) / D ** 0.5
    w = w / w.norm(dim=1, keepdim=True)
    latent_bias = torch.randn(M, generator=g, dtype=torch.float64) * 0.05
    pre_bias = torch.randn(D, generator=g, dtype=torch.float64) * 0.05
    init = {"W": w.clone(), "latent_bias": latent_bias.clone(), "pre_bias": pre_bias.clone()}
    w, latent_bias, pre_bias = (t.clone().requires_grad_() for t in (w, latent_bias, pre_bias))
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    std = xc.std(-1, keepdim=True)
    xh = xc / (std + 1e-5)
    pre = (xh - pre_bias) @ w.T + latent_bias
    top = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    recon = (z @ w + pre_bias) * std + mu
    nmse = (((recon - x) ** 2).mean(-1) / (x ** 2).mean(-1)).mean()
    loss = nmse + LAMBDA * mono_loss(z, x)
    loss.backward()
    with torch.no_grad():
        w.data /= w.data.norm(dim=1, keepdim=True) + 1e-8
    adam_step([w, latent_bias, pre_bias])
    after = {"W": w.detach(), "latent_bias": latent_bias.detach(), "pre_bias": pre_bias.detach()}
    return init, after, float(loss)


def kaiming_pair(g):
    """The reference BatchTopK/JumpReLU initialisation: Kaiming-uniform W_enc (D × M) and
    W_dec = W_encᵀ with unit rows."""
    bound = (6.0 / M) ** 0.5
    w_enc = (torch.rand(D, M, generator=g, dtype=torch.float64) * 2 - 1) * bound
    w_dec = w_enc.T.clone()
    return w_enc, w_dec / w_dec.norm(dim=1, keepdim=True)


def clip_and_constrain_decoder(params, w_dec):
    """The reference step's gradient handling: clip the norm to 1, project W_dec's gradient off
    its rows, set the rows to unit norm (before Adam steps)."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    with torch.no_grad():
        unit = w_dec / w_dec.norm(dim=-1, keepdim=True)
        w_dec.grad -= (w_dec.grad * unit).sum(-1, keepdim=True) * unit
        w_dec.data = unit


def batch_topk_step(x):
    g = torch.Generator().manual_seed(2)
    w_enc, w_dec = kaiming_pair(g)
    b_dec = torch.randn(D, generator=g, dtype=torch.float64) * 0.05
    init = {"W_enc": w_enc.clone(), "W_dec": w_dec.clone(), "b_dec": b_dec.clone()}
    w_enc, w_dec, b_dec = (t.clone().requires_grad_() for t in (w_enc, w_dec, b_dec))
    acts = F.relu((x - b_dec) @ w_enc)
    flat = acts.flatten()
    top = flat.topk(K * B)
    z = torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)
    recon = z @ w_dec + b_dec
    loss = ((recon - x) ** 2).mean() + LAMBDA * mono_loss(z, x)
    loss.backward()
    clip_and_constrain_decoder([w_enc, w_dec, b_dec], w_dec)
    adam_step([w_enc, w_dec, b_dec])
    after = {"W_enc": w_enc.detach(), "W_dec": w_dec.detach(), "b_dec": b_dec.detach()}
    return init, after, float(loss)


class JumpReLUFn(torch.autograd.Function):
    """The reference JumpReLU: z = pre·H(pre − θ); rectangle-kernel pseudo-gradient for θ."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):
        theta = log_threshold.exp()
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        rect = ((pre - theta) / eps).abs() < 0.5
        grad_pre = (pre > theta) * g
        grad_log_theta = (-(theta / eps) * rect * g).sum(0)
        return grad_pre, grad_log_theta, None


def jumprelu_step(x):
    """The reference JumpReLU (standardised input, no b_dec on the input, L0 off here: mono's L0
    band differs on purpose), with a wide bandwidth and thresholds among the pre-activations so
    that many zeros lie in the pseudo-gradient's band and tie for each latent's batch minimum:
    MonoLoss's min gradient must reach one of them only (PyTorch's rule), not all."""
    g = torch.Generator().manual_seed(4)
    w_enc, w_dec = kaiming_pair(g)
    b_enc = torch.randn(M, generator=g, dtype=torch.float64) * 0.05
    b_dec = torch.randn(D, generator=g, dtype=torch.float64) * 0.05
    log_threshold = torch.full((M,), math.log(0.3), dtype=torch.float64)
    init = {"W_enc": w_enc.clone(), "W_dec": w_dec.clone(), "b_enc": b_enc.clone(), "b_dec": b_dec.clone(),
            "log_threshold": log_threshold.clone()}
    params = [t.clone().requires_grad_() for t in (w_enc, w_dec, b_enc, b_dec, log_threshold)]
    w_enc, w_dec, b_enc, b_dec, log_threshold = params
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    std = xc.std(-1, keepdim=True)
    xh = xc / (std + 1e-5)
    pre = F.relu(xh @ w_enc + b_enc)
    z = JumpReLUFn.apply(pre, log_threshold, JUMP_BANDWIDTH)
    recon = (z @ w_dec + b_dec) * std + mu
    loss = ((recon - x) ** 2).mean() + LAMBDA * mono_loss(z, x)
    loss.backward()
    clip_and_constrain_decoder(params, w_dec)
    adam_step(params)
    names = ["W_enc", "W_dec", "b_enc", "b_dec", "log_threshold"]
    return init, {n: p.detach() for n, p in zip(names, params)}, float(loss)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)  # the reference loads unit-norm features
    settings = {"batch": B, "d_in": D, "n_latents": M, "k": K, "lambda": LAMBDA, "eps": EPS,
                "lr": LR, "adam_eps": ADAM_EPS, "torch": torch.__version__}
    for name, step in [("topk", topk_step), ("batch_topk", batch_topk_step), ("jumprelu", jumprelu_step)]:
        init, after, loss = step(x)
        if name == "jumprelu":
            settings_j = {"jumprelu_bandwidth": JUMP_BANDWIDTH}
        else:
            settings_j = {}
        tensors = {"x": x} | {f"init.{k}": v for k, v in init.items()} | {f"after.{k}": v for k, v in after.items()}
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        meta = settings | settings_j | {"kind": name, "loss": loss}
        save_file(tensors, str(OUT / f"{name}.safetensors"),
                  metadata={"fixture": json.dumps(meta, sort_keys=True, separators=(",", ":"))})


if __name__ == "__main__":
    main()
