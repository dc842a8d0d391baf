#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the CPU build of everything: runtime, exporter, tests, benchmarks.
# torch==2.13.0 goes first: on these machines it is a local CPU wheel, while a bare `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's and the build backend's chatter goes to a log, shown only when a step fails
log=.venv/setup.log
: > "$log"
pipq() {
  if ! .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1; then
    tail -n 40 "$log"
    echo "setup failed: pip install $* (full log: $log)" >&2
    exit 1
  fi
}
pipq --upgrade pip
pipq "torch==2.13.0"
pipq -e ".[cpu,export,test,bench,peers,serve,ray]"
.venv/bin/python -c "import onnxruntime as o, torch, transformers; print('setup ok: onnxruntime', o.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
