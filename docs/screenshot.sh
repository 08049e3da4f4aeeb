#!/usr/bin/env bash
# Screenshots for the README and the docs: the real TensorBoard pages for the demo run, then docs/shots.py.
# Needs Debian's chromium (apt-get install chromium). Run from the repository root after `make demo`.
set -euo pipefail
port=${PORT:-6123}
.venv/bin/tensorboard --logdir runs/demo --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/data/runs" >/dev/null && break; sleep 1; done
shot() {
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --window-size=1400,"$2" --virtual-time-budget=15000 --screenshot="docs/$1.png" "http://127.0.0.1:$port/#$3"
}
shot tensorboard-custom-scalars 1250 custom_scalars
shot tensorboard-heatmap 760 images
# the heatmap's colour bands, the summary at 60 columns and the HTML report
.venv/bin/python docs/shots.py runs/demo
