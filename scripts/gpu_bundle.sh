#!/usr/bin/env bash
# The device check on a GPU machine that has no Rust toolchain: build and pack here, unpack and
# run scripts/gpu_check.sh there.
#
#   scripts/gpu_bundle.sh pack [DIR]          here: CUDA build (scripts/build_cuda.sh, compute
#                                             capability $CUDA_COMPUTE_CAP, default 90 for
#                                             H100/H200), both binaries stripped and xz-compressed
#                                             into DIR (default .gpu, ≈ 19 MB)
#   scripts/gpu_bundle.sh run [DIR] [OUT]     there, from a copy of this checkout holding DIR:
#                                             unpacks, puts the CUDA libraries of the machine's
#                                             pip NVIDIA packages on LD_LIBRARY_PATH, runs
#                                             gpu_check.sh into OUT (default /tmp/gpu-check)
#                                             and leaves OUT.tgz beside it
#
# The test binary reads its fixtures through the checkout path it was built in (recorded in
# DIR/checkout): `run` links that path to this checkout when it does not exist there.
# Environment for `run`: MONO_STEP_TIMEOUT (seconds per step, default 150) and
# MONO_CHECK_TIMEOUT (the whole check, default 370): the lent machines' time is short.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
dir="${2:-.gpu}"

case "$mode" in
pack)
  set -e
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
  scripts/build_cuda.sh cuda bin
  test_bin=$(scripts/build_cuda.sh cuda test | sed -n 's/.*Executable tests\/main.rs (\(.*\))/\1/p')
  [ -n "$test_bin" ] || { echo "gpu_bundle: no test binary was built" >&2; exit 1; }
  case "$test_bin" in /*) ;; *) test_bin="$PWD/$test_bin" ;; esac
  mkdir -p "$dir"
  for pair in "$CARGO_TARGET_DIR/release/mono:mono" "$test_bin:tests"; do
    strip -o "$dir/${pair#*:}" "${pair%%:*}"
    xz -T0 -9 -f "$dir/${pair#*:}"
  done
  echo "$PWD" > "$dir/checkout"
  ls -l "$dir"
  ;;
run)
  out="${3:-/tmp/gpu-check}"
  checkout=$(cat "$dir/checkout")
  if [ ! -e "$checkout" ]; then
    mkdir -p "$(dirname "$checkout")" && ln -s "$PWD" "$checkout"
  elif [ "$(realpath "$checkout")" != "$(realpath "$PWD")" ]; then
    echo "gpu_bundle: $checkout is another directory; the tests would read its fixtures" >&2
    exit 1
  fi
  bin_dir="$checkout/target/cuda/release"
  mkdir -p "$bin_dir"
  # The mono binary goes where the test binary expects it (its CARGO_BIN_EXE_mono).
  python3 - "$dir" "$bin_dir" <<'PY'
import lzma, os, shutil, sys
src, dst = sys.argv[1:3]
for name, target in [("mono.xz", "mono"), ("tests.xz", "main-tests")]:
    with lzma.open(os.path.join(src, name)) as f, open(os.path.join(dst, target), "wb") as g:
        shutil.copyfileobj(f, g)
    os.chmod(os.path.join(dst, target), 0o755)
PY
  site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  libs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  ldd "$bin_dir/mono" | grep -E "libcu|nvrtc|not found"
  cd "$checkout"
  MONO_BIN="$bin_dir/mono" MONO_TEST_BIN="$bin_dir/main-tests" \
    MONO_STEP_TIMEOUT="${MONO_STEP_TIMEOUT:-150}" \
    timeout --kill-after=5 "${MONO_CHECK_TIMEOUT:-370}" scripts/gpu_check.sh "$out"
  status=$?
  tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"
  echo "gpu_check exit $status; everything in $out.tgz"
  exit "$status"
  ;;
*)
  echo "usage: scripts/gpu_bundle.sh pack [DIR] | run [DIR] [OUT]" >&2
  exit 2
  ;;
esac
