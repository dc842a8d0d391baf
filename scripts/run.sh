#!/usr/bin/env bash
# The main job: set up .venv; generate with the committed default model (models/pybytes, a byte-level
# GPT-2 trained on the Python standard library); then the comparison suite (benchmarks/suite.py):
# GPT-2 small (random weights, seed 0) and the tiny config, exported by us and through Optimum,
# against the tools people use instead (CPU, 2 threads). Writes benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
echo "== the default model (models/pybytes), sampled (seeded), streamed =="
.venv/bin/kvcache-infer generate --model models/pybytes --prompt $'class Queue:\n    def __init__(self' \
    --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 1 --threads 2
echo
echo "== the comparison suite: GPT-2 small and the tiny config against HF, Optimum, onnxruntime-genai, =="
echo "== a plain ORT loop and no-cache (exports made first when missing; ~15 min on 2 cores)            =="
$PY -m benchmarks.suite --threads "${THREADS:-2}" "$@"
