#!/usr/bin/env bash
# The main job: set up .venv; generate with the committed default model (models/pybytes, a byte-level
# GPT-2 trained on the Python standard library); then export GPT-2 small (random weights, seed 0)
# with our exporter and through Optimum (the baseline) and run the latency benchmark
# (CPU, 2 intra-op threads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
echo "== the default model (models/pybytes), sampled (seeded), streamed =="
.venv/bin/kvcache-infer generate --model models/pybytes --prompt $'class Queue:\n    def __init__(self' \
    --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 1 --threads 2
echo
echo "== GPT-2 small: export, then latency side by side =="
[ -f models/gpt2/manifest.json ] || $PY -m export --config gpt2 --seed 0 --out models/gpt2
[ -f models/gpt2-optimum/model.onnx ] || $PY -m benchmarks.optimum_export --config gpt2 --seed 0 --out models/gpt2-optimum
$PY -m benchmarks.latency --model models/gpt2 --optimum models/gpt2-optimum --threads "${THREADS:-2}" "$@"
