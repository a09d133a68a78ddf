#!/usr/bin/env bash
# Builds mono with `--features cuda` (or the features given as $1, e.g. nccl) on a machine that
# has neither a GPU nor a CUDA installation, such as CI: the CUDA 13.0 compiler and headers come
# from NVIDIA's Python wheels on PyPI, and the link step uses stub shared libraries that carry the
# real sonames, so the binary loads the real driver and CUDA libraries on a GPU machine.
#
#   scripts/build_cuda.sh [features] [bin|test]
#     bin (default): target/cuda/release/mono
#     test: the release integration-test binary (its path is printed), e.g. for scripts/gpu_check.sh
#
# Environment: CUDA_COMPUTE_CAP (default 80: PTX that every GPU from Ampere on JIT-compiles;
# 90 targets H100/H200 only), MONO_CUDA_TOOLS (where the wheels and stubs go; default
# target/cuda-tools), CARGO_TARGET_DIR (default target/cuda, apart from the CPU build's).
# On a machine with a CUDA toolkit and driver, `cargo build --release --features cuda` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
features="${1:-cuda}"
what="${2:-bin}"
tools="${MONO_CUDA_TOOLS:-$PWD/target/cuda-tools}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"

# 1. nvcc, nvvm, the CUDA runtime and headers (CUDA 13.0; cudarc 0.19 supports up to 13.4).
#    The -cu12 nvcc wheels ship no nvcc program, hence CUDA 13. --no-deps: the nvcc wheel lists
#    unpinned dependencies.
if [ ! -x "$tools/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tools" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
export CUDA_ROOT="$tools/nvidia/cu13"
export CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDARC_CUDA_VERSION=13000

# 2. Link stubs: every symbol cudarc's bindings declare, in libraries with the real sonames.
stubs="$tools/stubs"
if [ ! -f "$stubs/.done" ]; then
  mkdir -p "$stubs"
  cudarc=$(cargo metadata --format-version 1 --locked --features "$features" 2>/dev/null | python3 -c '
import json, sys, os
meta = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in meta["packages"] if p["name"] == "cudarc"))')
  for spec in driver:libcuda.so.1 nvrtc:libnvrtc.so.13 curand:libcurand.so.10 \
              cublas:libcublas.so.13 cublaslt:libcublasLt.so.13 nccl:libnccl.so.2; do
    module="${spec%%:*}" soname="${spec#*:}"
    python3 - "$cudarc/src/$module/sys/mod.rs" "$stubs/$module.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r'load::<_F>\("([A-Za-z0-9_]+)"\)', open(sys.argv[1]).read())))
with open(sys.argv[2], "w") as out:
    out.write("/* Link stubs: 34 = CUDA_ERROR_STUB_LIBRARY. */\n")
    out.writelines(f"int {n}(void) {{ return 34; }}\n" for n in names)
PY
    cc -shared -fPIC -o "$stubs/$soname" -Wl,-soname,"$soname" "$stubs/$module.c"
    ln -sf "$soname" "$stubs/${soname%%.so*}.so"
  done
  ln -sf "$CUDA_ROOT/lib/libcudart.so.13" "$stubs/libcudart.so"
  touch "$stubs/.done"
fi
export LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

# 3. The build. nvcc compiles candle's kernels on one thread: most of the time goes there.
if [ "$what" = test ]; then
  cargo test --release --locked --features "$features" --no-run 2>&1 | grep -E "Executable tests/main.rs|error" || true
else
  cargo build --release --locked --features "$features"
  echo "built $CARGO_TARGET_DIR/release/mono with --features $features (compute capability $CUDA_COMPUTE_CAP)"
fi
