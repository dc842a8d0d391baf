#!/usr/bin/env bash
# The main job: set up .venv; generate with the default model ("pybytes", installed with the package: a
# byte-level GPT-2 trained on the Python standard library); then, GPT-2 small (random weights, seed 0,
# exported by us and through Optimum, made first when missing), CPU, 2 threads, each system alone in its
# own process: the Engine (serving 48 requests, a shared prefix, a tree search) and the comparison suite
# of single-sequence decoding against the tools people use instead. Results go to benchmarks/out/
# (untracked); ROUNDS=3 for medians over rounds (default 1, about 40 min); --publish rewrites the
# committed results. Extra arguments go to the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
ROUNDS=${ROUNDS:-1}
echo "== the default model (pybytes), sampled (seeded), streamed =="
.venv/bin/kvcache-infer generate --prompt $'class Queue:\n    def __init__(self' \
    --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 1 --threads 2
echo
echo "== exports (GPT-2 small and the tiny config, ours and Optimum's; made when missing; an older graph stops the job) =="
$PY -m benchmarks.suite --exports-only
echo "== the Engine: 48 requests of different lengths, against sequential decoding and batched peers =="
$PY -m benchmarks.serving --model models/gpt2 --rounds "$ROUNDS" --systems engine-16 engine-8 sequential hf-static genai-static
echo "== the Engine: 16 requests sharing a 512-token prefix, prefix cache on and off =="
$PY -m benchmarks.shared_prefix --model models/gpt2 --rounds "$ROUNDS"
echo "== the Engine: a tree search's leaf evaluations, six ways =="
$PY -m benchmarks.tree_search --model models/gpt2 --rounds "$ROUNDS"
echo "== the comparison suite: one sequence, kvcache-infer against HF, Optimum, onnxruntime-genai, =="
echo "== a plain ORT loop and no-cache                                                              =="
$PY -m benchmarks.suite --threads "${THREADS:-2}" --rounds "$ROUNDS" "$@"
