#!/usr/bin/env bash
# The main job: set up .venv, export GPT-2 small (random weights, seed 0) with our exporter and,
# for the baseline, through Optimum, then run the latency benchmark (CPU, 2 intra-op threads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
[ -f models/gpt2/manifest.json ] || $PY -m export --config gpt2 --seed 0 --out models/gpt2
[ -f models/gpt2-optimum/model.onnx ] || $PY -m benchmarks.optimum_export --config gpt2 --seed 0 --out models/gpt2-optimum
$PY -m benchmarks.latency --model models/gpt2 --optimum models/gpt2-optimum --threads "${THREADS:-2}" "$@"
