#!/usr/bin/env python3
"""The CPU speed table of BENCHMARKS.md in one command: each row's `mono` measurement beside the
matching PyTorch script (scripts/bench_*_torch.py), run alternately on this machine.

A shared VM's speed drifts by tens of per cent within minutes, for both implementations alike, so
each round runs the two back to back (who goes first alternates) and the ratio is taken per round;
the table gives the range of each side and of the per-round ratios, and their median.

Usage:
  python3 scripts/bench_side_by_side.py --python /path/to/venv/bin/python [--rounds 3]
      [--rows resnet50,clip-b32,train,score,eval] [--mono target/release/mono] [--work DIR]
      [--json out.json]

--python: an interpreter with torch, numpy and safetensors (it runs the PyTorch side and writes the
score/eval inputs). The score/eval inputs (16,384 × 768 embeddings with 16,384 × 4,096 activations,
64 non-zeros a row; 65,536 unit-norm 768-d features and a BatchTopK SAE trained 3 steps on them)
are made once in --work (default: a temporary folder) and reused when present.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent

MAKE_INPUTS = """
import numpy as np, sys
out = sys.argv[1]
rng = np.random.default_rng(0)
np.save(out + "/emb.npy", rng.standard_normal((16384, 768), dtype=np.float32))
acts = np.zeros((16384, 4096), dtype=np.float32)
for i in range(16384):
    acts[i, rng.choice(4096, 64, replace=False)] = rng.exponential(1.0, 64)
np.save(out + "/acts.npy", acts)
x = rng.standard_normal((65536, 768), dtype=np.float32)
np.save(out + "/x.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
"""

SAE_CONFIG = """[run]
name = "b"
output = "runs"

[features]
dir = "feats"

[data]
kind = "folder"
train_split = "train"
eval_split = "train"

[sae]
kind = "batch_topk"

[train]
epochs = 1
max_steps = 3

[mono]
lambda = 0.0003
"""


def run(cmd, cwd=None):
    """Runs `cmd`; returns (wall seconds, stdout). Fails loudly with the command's output."""
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
    return wall, p.stdout


MACHINE = {}


def note_machine(doc):
    """Keeps the machine mono's benchmark JSON names (printed above the table)."""
    if "machine" in doc:
        MACHINE["mono"] = doc["machine"]
    return doc


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def prepare_inputs(a, work):
    if not (work / "emb.npy").exists() or not (work / "x.npy").exists():
        print(f"writing benchmark inputs to {work} ...", flush=True)
        run([a.python, "-c", MAKE_INPUTS, str(work)])
    if not (work / "runs/b/sae").exists():
        run([a.mono, "--quiet", "features", "import", "--features", "x.npy", "--out", "feats"], cwd=work)
        (work / "b.toml").write_text(SAE_CONFIG)
        run([a.mono, "--quiet", "train", "b.toml"], cwd=work)


def finetune_pair(model):
    def mono(a, work):
        out = work / "finetune.json"
        run([a.mono, "bench", "finetune", "--quiet", "--models", model, "--steps", str(a.steps), "--json", out])
        return note_machine(json.loads(out.read_text()))["timings"][0]["images_per_second"]

    def torch(a, work):
        _, text = run([a.python, SCRIPTS / "bench_finetune_torch.py", "--models", model, "--steps", str(a.steps)])
        return json_lines(text)[0]["images_per_second"]

    return mono, torch


def train_pair(lam_is_zero):
    def pick(timings):
        return next(t for t in timings if (t["lambda"] == 0) == lam_is_zero)

    def mono(a, work):
        out = work / "train.json"
        run([a.mono, "bench", "train", "--quiet", "--kinds", "batch_topk", "--steps", "9", "--json", out])
        doc = note_machine(json.loads(out.read_text()))
        t = pick(doc["timings"])
        return t["samples_per_second"]

    def torch(a, work):
        _, text = run([a.python, SCRIPTS / "bench_train_torch.py", "--steps", "5"])
        return pick(json_lines(text))["samples_per_second"]

    return mono, torch


def score_pair():
    def mono(a, work):
        return run([a.mono, "score", "--embeddings", "emb.npy", "--activations", "acts.npy", "--quiet"], cwd=work)[0]

    def torch(a, work):
        return run([a.python, SCRIPTS / "bench_score_torch.py", "emb.npy", "acts.npy"], cwd=work)[0]

    return mono, torch


def eval_pair():
    def mono(a, work):
        cmd = [a.mono, "eval", "--sae", "runs/b/sae", "--features", "feats", "--split", "train", "--quiet"]
        return run(cmd, cwd=work)[0]

    def torch(a, work):
        return run([a.python, SCRIPTS / "bench_eval_torch.py", "x.npy", "runs/b/sae"], cwd=work)[0]

    return mono, torch


# name -> (label, unit, higher is better, pair of measurements, target)
ROWS = {
    "resnet50": ("finetuning step, ResNet-50, batch 16", "img/s", True, finetune_pair("resnet50"), "≥ 1×"),
    "clip-b32": ("finetuning step, CLIP-ViT-B/32, batch 16", "img/s", True, finetune_pair("clip-b32"), "≥ 1×"),
    "train": ("BatchTopK SAE step, λ = 0", "samples/s", True, train_pair(True), "≥ 80 % of the GEMM floor"),
    "train-mono": ("BatchTopK SAE step, λ = 3e-4", "samples/s", True, train_pair(False), ""),
    "score": ("`mono score`, N 16,384, whole process", "s", False, score_pair(), "≥ 5×"),
    "eval": ("`mono eval --sae`, N 65,536, whole process", "s", False, eval_pair(), "≥ 10×"),
}


def fmt(v):
    return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter with torch, numpy, safetensors")
    ap.add_argument("--mono", default="target/release/mono")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed finetuning steps per run")
    ap.add_argument("--rows", default="resnet50,clip-b32,train,score,eval", help=",".join(ROWS))
    ap.add_argument("--work", type=Path, help="folder for the score/eval inputs (kept for reuse)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.mono = str(Path(a.mono).resolve())
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = (a.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if {"score", "eval"} & set(rows):
            prepare_inputs(a, work)
        results = []
        for name in rows:
            label, unit, higher, (mono, torch), target = ROWS[name]
            pairs = []
            for i in range(a.rounds):
                order = [("mono", mono), ("torch", torch)]
                got = dict((who, f(a, work)) for who, f in (order if i % 2 == 0 else order[::-1]))
                ratio = got["mono"] / got["torch"] if higher else got["torch"] / got["mono"]
                pairs.append((got["torch"], got["mono"], ratio))
                print(f"{name} round {i + 1}: PyTorch {fmt(got['torch'])} {unit}, mono {fmt(got['mono'])} {unit}, "
                      f"{ratio:.2f}×", flush=True)
            results.append({"row": name, "label": label, "unit": unit, "target": target,
                            "pytorch": [p[0] for p in pairs], "mono": [p[1] for p in pairs],
                            "ratio": [p[2] for p in pairs]})
    print()
    if "mono" in MACHINE:
        print(f"machine: {MACHINE['mono']}")
    print("| work | PyTorch | mono | mono vs PyTorch, per round (median) | target |")
    print("|---|---|---|---|---|")
    for r in results:
        span = lambda v: f"{fmt(min(v))}–{fmt(max(v))} {r['unit']}"
        ratios = f"{min(r['ratio']):.2f}–{max(r['ratio']):.2f}× ({statistics.median(r['ratio']):.2f}×)"
        print(f"| {r['label']} | {span(r['pytorch'])} | {span(r['mono'])} | {ratios} | {r['target']} |")
    if a.json:
        a.json.write_text(json.dumps({"rounds": a.rounds, "machine": MACHINE.get("mono"), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
