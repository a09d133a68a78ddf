#!/usr/bin/env bash
# Renders a report.html in headless Chromium (Debian's `chromium`) to a PNG screenshot.
# Usage: scripts/render_report.sh runs/quickstart/report.html /tmp/report.png
set -euo pipefail
html=$(realpath "$1")
out=$(realpath -m "$2")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (this machine has none) and out of first-run dialogs.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1280,3000 --screenshot="$out" "file://$html" >/dev/null 2>&1
test -s "$out"
