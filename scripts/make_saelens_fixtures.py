#!/usr/bin/env python3
"""Build tests/fixtures/saelens/: SAEs moving between mono and SAELens, both ways.

    cargo build --release
    /tmp/refenv/bin/pip install sae-lens      # 6.x
    /tmp/refenv/bin/python scripts/make_saelens_fixtures.py [--mono target/release/mono]

1. SAELens → mono: SAELens itself builds and saves (`save_model`) one SAE per architecture mono
   reads: standard (ReLU), topk (k = 3) with layer_norm input normalisation, jumprelu without
   b_dec on the input; biases and thresholds set to random non-zero values so that each matters.
   Directories `saelens_<name>/`.
2. mono → SAELens: the mono binary imports 600 random unit-norm 8-d features and trains one tiny
   SAE of each kind (topk, batch_topk, jumprelu, relu; 32 latents, λ = 0.001) into
   `mono_<kind>/` (its `sae/` directory as written), which `SAE.load_from_disk` then loads.
3. `reference.safetensors`: `x` (the first 16 feature rows) and, for every directory D,
   `D.latents` = SAELens' `encode(x)` and `D.recon` = SAELens' `decode(encode(x))`.
   `tests/saelens.rs` checks that mono computes the same from the same directories.
"""
import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import sae_lens
import torch
from safetensors.torch import save_file
from sae_lens import SAE

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "saelens"
D, M = 8, 32


def saelens_native(out: Path) -> list[str]:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(3)
    made = []
    specs = {
        "saelens_standard": (StandardSAE, StandardSAEConfig(d_in=D, d_sae=M)),
        "saelens_topk_layer_norm": (TopKSAE, TopKSAEConfig(d_in=D, d_sae=M, k=3, normalize_activations="layer_norm")),
        "saelens_jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False)),
    }
    for name, (cls, cfg) in specs.items():
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(D, M) / D ** 0.5)
            sae.W_dec.copy_(torch.randn(M, D) / D ** 0.5)
            sae.b_enc.copy_(torch.randn(M) * 0.1)
            sae.b_dec.copy_(torch.randn(D) * 0.1)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand(M) * 0.3)
        sae.save_model(str(out / name))
        made.append(name)
    return made


def mono_written(out: Path, mono: Path) -> list[str]:
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(7)
        x = rng.standard_normal((600, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(tmp / "x.npy", x)
        np.save(tmp / "labels.npy", rng.integers(0, 4, 600).astype(np.int64))
        subprocess.run([str(mono), "features", "import", "--features", str(tmp / "x.npy"), "--labels",
                        str(tmp / "labels.npy"), "--out", str(tmp / "feats"), "--quiet"], check=True)
        extra = {"topk": "k = 3\nk_aux = 8\n", "batch_topk": "k = 3\nk_aux = 8\n",
                 "jumprelu": "normalize_input = true\njumprelu_init_log_threshold = -1.0\n", "relu": ""}
        for kind, keys in extra.items():
            config = tmp / f"{kind}.toml"
            config.write_text(
                f'[run]\nname = "{kind}"\noutput = "{tmp / "runs"}"\n'
                f'[data]\nkind = "folder"\nroot = "{tmp}"\ntrain_split = "train"\neval_split = "train"\n'
                f'[features]\ndir = "{tmp / "feats"}"\n'
                f'[sae]\nkind = "{kind}"\nn_latents = {M}\n{keys}'
                f'[train]\nepochs = 3\nbatch_size = 100\nlr = 0.003\n[mono]\nlambda = 0.001\n')
            subprocess.run([str(mono), "train", str(config), "--quiet"], check=True, capture_output=True)
            name = f"mono_{kind}"
            shutil.copytree(tmp / "runs" / kind / "sae", out / name)
            cfg = json.loads((out / name / "cfg.json").read_text())
            cfg["mono"]["source"]["features"] = "features"  # not the temporary path
            (out / name / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
            made.append(name)
        return made, torch.from_numpy(x[:16])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mono", default=str(REPO / "target" / "release" / "mono"))
    args = ap.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    names = saelens_native(OUT)
    mono_names, x = mono_written(OUT, Path(args.mono))
    tensors = {"x": x.contiguous()}
    for name in names + mono_names:
        sae = SAE.load_from_disk(str(OUT / name))
        with torch.no_grad():
            latents = sae.encode(x)
            recon = sae.decode(latents)
        tensors[f"{name}.latents"] = latents.float().contiguous()
        tensors[f"{name}.recon"] = recon.float().contiguous()
        print(f"{name}: {type(sae).__name__}, L0 {float((latents != 0).float().sum(1).mean()):.2f}")
    meta = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "directories": names + mono_names}
    save_file(tensors, str(OUT / "reference.safetensors"),
              metadata={"fixture": json.dumps(meta, sort_keys=True, separators=(",", ":"))})


if __name__ == "__main__":
    main()
