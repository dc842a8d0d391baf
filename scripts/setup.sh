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
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cpu,export,test,bench,peers,serve]"
.venv/bin/python -c "import onnxruntime as o, torch, transformers; print('setup ok: onnxruntime', o.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
