#!/usr/bin/env bash
# The main job. Without arguments, the short run (about 5 minutes on two cores, once .venv exists):
#   1. set up .venv (scripts/setup.sh; idempotent);
#   2. generate with the default model ("pybytes", installed with the package: a byte-level GPT-2 trained
#      on the Python standard library), sampled (seeded) and streamed;
#   3. GPT-2 small (random weights, seed 0): our export and Optimum's, made when missing (~45 s), reused after;
#   4. the Engine at work on it: 16 requests through continuous batching against sequential decoding, and
#      8 requests sharing a 256-token prefix with the prefix cache on and off;
#   5. the headline comparison (benchmarks/quick.py): one sequence's decode and a 16-request serving run of
#      the fp32 checkpoint (our fp32 export; our int8 export against OpenVINO's bf16 default), against the
#      CPU leaders that are installed (OpenVINO GenAI, llama.cpp, CTranslate2: bash
#      scripts/setup_peers.sh), or else the core install's peers (HF transformers, onnxruntime-genai, a plain
#      ORT loop); the skipped ones are named with the reason.
# One round, short workloads: not the published numbers. Every system runs alone in its own process.
# Everything it writes goes to git-ignored places: .venv/, models/, benchmarks/out/short/ (the full job's
# results, in benchmarks/out/, are left alone).
#
#   bash scripts/run.sh --full [suite arguments]: the full job (about 45 min on two cores): the Engine's
#   serving benchmark (48 requests), shared prefix (16 x 512), tree search, then the comparison suite of
#   single-sequence decoding against the tools people use instead. ROUNDS=3 for medians over rounds
#   (default 1); extra arguments go to the suite (e.g. --publish rewrites the committed results).
set -euo pipefail
cd "$(dirname "$0")/.."
FULL=0
if [ "${1:-}" = "--full" ]; then
  FULL=1
  shift
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/run.sh [--full [arguments for python -m benchmarks.suite]]" >&2
  exit 2
fi
step() { printf '\n== [%d:%02d] %s ==\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

step "setting up .venv (scripts/setup.sh)"
bash scripts/setup.sh
PY=.venv/bin/python
ROUNDS=${ROUNDS:-1}

step "the default model (pybytes), sampled (seeded), streamed"
.venv/bin/kvcache-infer generate --prompt $'class Queue:\n    def __init__(self' \
    --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 1 --threads 2
echo

if [ "$FULL" = 1 ]; then
  step "exports (GPT-2 small and the tiny config, ours and Optimum's; made when missing; an older graph stops the job)"
  $PY -m benchmarks.suite --exports-only
  step "the Engine: 48 requests of different lengths, against sequential decoding and batched peers"
  $PY -m benchmarks.serving --model models/gpt2 --rounds "$ROUNDS" --systems engine-16 engine-8 sequential hf-static genai-static
  step "the Engine: 16 requests sharing a 512-token prefix, prefix cache on and off"
  $PY -m benchmarks.shared_prefix --model models/gpt2 --rounds "$ROUNDS"
  step "the Engine: a tree search's leaf evaluations, six ways"
  $PY -m benchmarks.tree_search --model models/gpt2 --rounds "$ROUNDS"
  step "the comparison suite: one sequence, kvcache-infer against HF, Optimum, onnxruntime-genai, a plain ORT loop and no-cache"
  $PY -m benchmarks.suite --threads "${THREADS:-2}" --rounds "$ROUNDS" "$@"
  step "done: results in benchmarks/out/"
  exit 0
fi

OUT=benchmarks/out/short        # apart from the full job's results in benchmarks/out/
echo "This is the short run: one round, short workloads, GPT-2 small's fp32 checkpoint (not the published numbers)."
echo "The full job (about 45 minutes on two cores): bash scripts/run.sh --full"

step "GPT-2 small (random weights, seed 0): our export (models/gpt2) and Optimum's (models/gpt2-optimum), made when missing"
$PY -m benchmarks.suite --exports-only --configs gpt2 --weights
echo "the runs below use models/gpt2: GPT-2 small, 124M parameters, fp32, random weights (seed 0), 2 threads"

step "the Engine: 16 requests of different lengths at once, continuous batching (16 sequences) against sequential decoding"
$PY -m benchmarks.serving --model models/gpt2 --rounds 1 --systems engine-16 sequential \
    --requests 16 --prompt-range 8 64 --output-range 16 64 --out-dir "$OUT"

step "the Engine: 8 requests sharing a 256-token prefix, the prefix cache on and off"
$PY -m benchmarks.shared_prefix --model models/gpt2 --rounds 1 --requests 8 --prefix 256 --new-tokens 16 --out-dir "$OUT"

step "the headline comparison: kvcache-infer against the installed peers"
$PY -m benchmarks.quick --model models/gpt2 --threads 2 --out-dir "$OUT"

step "done (short run); results in $OUT/; the full job: bash scripts/run.sh --full"
