#!/usr/bin/env bash
# The device check, for a machine with one NVIDIA GPU: builds mono with CUDA, runs the test suite
# with the portable-kernel side of tests/portable.rs on the GPU (MONO_TEST_DEVICE=cuda) against the
# host kernels on the CPU, times training, extraction and finetuning on the GPU, runs the
# quickstart with run.device = "cuda", and writes OUT/summary.json and OUT/summary.md: each step,
# whether it passed, how long it took, and every figure. About 5 minutes on an H100 when the
# binaries are prebuilt; a step that fails is reported and the others still run.
#
#   scripts/gpu_check.sh [OUT]                  (default OUT: gpu-check)
#
# MONO_STEP_TIMEOUT=SECONDS bounds each step (a lent machine's time is short: a step that hangs
# is stopped, recorded as failed with exit 124, and the next one runs).
#
# Binaries: by default built here (`cargo build --release --features cuda` and the release test
# binary; needs the Rust toolchain and a CUDA toolkit). A machine without Rust can run
# prebuilt ones: MONO_BIN=path/to/mono MONO_TEST_BIN=path/to/test-binary scripts/gpu_check.sh,
# built on another machine with scripts/build_cuda.sh (CUDA_COMPUTE_CAP=90 for H100/H200) and
# `scripts/build_cuda.sh cuda test`; scripts/gpu_bundle.sh packs and runs them so.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
out=$(realpath "$out")
records="$out/steps.tsv"
: > "$records"

# run_step NAME COMMAND…: runs it with its output in OUT/NAME.log and records the outcome.
run_step() {
  local name="$1"
  shift
  local start status
  start=$(date +%s%N)
  if [ -n "${MONO_STEP_TIMEOUT:-}" ]; then
    timeout --kill-after=5 "$MONO_STEP_TIMEOUT" "$@" > "$out/$name.log" 2>&1
  else
    "$@" > "$out/$name.log" 2>&1
  fi
  status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( ($(date +%s%N) - start) / 1000000 ))" >> "$records"
  if [ "$status" -eq 0 ]; then echo "ok    $name"; else echo "FAIL  $name (see $out/$name.log)"; fi
  return 0
}

run_step gpu nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv

bin="${MONO_BIN:-}"
test_bin="${MONO_TEST_BIN:-}"
if [ -z "$bin" ] || [ -z "$test_bin" ]; then
  run_step build cargo build --release --features cuda
  run_step build-tests cargo test --release --features cuda --no-run
  bin="target/release/mono"
  test_bin=$(cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "main" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
fi

# The tests: the portable side on the GPU, everything else as on any machine.
run_step tests env MONO_TEST_DEVICE=cuda "$test_bin" --test-threads 4
run_step tests-portable-detail env MONO_TEST_DEVICE=cuda "$test_bin" portable:: --nocapture

# The quickstart on the GPU.
sed -e 's/^\[run\]$/[run]\ndevice = "cuda"\noutput = "'"${out//\//\\/}"'\/runs"/' configs/quickstart.toml \
  > "$out/quickstart-cuda.toml"

# Benchmarks on the GPU (the paper's SAE sizes; real encoder architectures, random weights), the
# quickstart between them, the CPU-only MonoScore benchmark last: most telling first.
run_step bench-train "$bin" bench train --device cuda --ops portable --steps 10 --json "$out/bench-train.json"
run_step quickstart "$bin" run "$out/quickstart-cuda.toml" --quiet
run_step bench-extract "$bin" bench extract --device cuda --batch 64 --batches 5 \
  --encoders clip-b32,clip-l14,siglip2-b16,vit-b16,resnet50 --json "$out/bench-extract.json"
run_step bench-finetune "$bin" bench finetune --device cuda --batch 64 --steps 5 --json "$out/bench-finetune.json"
run_step bench-finetune-bf16 "$bin" bench finetune --device cuda --batch 64 --steps 5 --mixed-precision \
  --json "$out/bench-finetune-bf16.json"
run_step bench-monoscore "$bin" bench monoscore --json "$out/bench-monoscore.json"

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, status, millis = line.rstrip("\n").split("\t")
    steps.append({"step": name, "passed": status == "0", "exit": int(status), "seconds": round(int(millis) / 1000, 1)})
figures = {}
for name in ["bench-train", "bench-extract", "bench-finetune", "bench-finetune-bf16", "bench-monoscore"]:
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        figures[name] = json.load(open(path))
quickstart = os.path.join(out, "runs", "quickstart", "results.json")
if os.path.exists(quickstart):
    figures["quickstart"] = json.load(open(quickstart))
summary = {"passed": all(s["passed"] for s in steps), "steps": steps, "figures": figures}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
lines = ["# GPU check", "", "| step | result | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {'passed' if s['passed'] else 'FAILED (exit %d)' % s['exit']} | {s['seconds']} |" for s in steps]
for name, data in figures.items():
    if name == "quickstart":
        continue
    lines += ["", f"## {name}", "", "```json", json.dumps(data.get("timings", data), indent=1), "```"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:len(steps) + 4]))
print("summary:", os.path.join(out, "summary.json"), "and summary.md")
sys.exit(0 if summary["passed"] else 1)
PY
