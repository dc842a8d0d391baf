#!/usr/bin/env bash
# Brings the CPU peers onto this machine, for benchmarks/peer_models.py and benchmarks/cpu_peers.py:
#   .venv-peers/          a separate Python 3.11 venv: OpenVINO (+ GenAI, tokenizers), optimum-intel, NNCF,
#                         CTranslate2, transformers, gguf (the project's .venv is left alone)
#   build/llama.cpp/      llama.cpp's own tools (llama-bench, llama-server, llama-quantize, llama-lookup), built from the
#                         llama.cpp vendored in the llama-cpp-python sdist (no other source of it is reachable)
# Idempotent: what exists is skipped (the pip step is skipped while its stamp matches the pins below;
# delete .venv-peers/.peers-installed to redo it). Quiet: one line per step, the chatter goes to
# build/setup_peers.log and its tail is shown when a step fails. The llama.cpp build takes 10+ minutes
# on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv-peers
LLAMA_PY_VERSION=0.3.36                 # llama-cpp-python sdist whose vendor/llama.cpp is built
LLAMA=build/llama.cpp
JOBS=${JOBS:-2}
# torch first and pinned: here it is a local CPU wheel, a bare `torch` would pull a multi-GB CUDA build.
TORCH="torch==2.13.0"
PINS=(
  "openvino==2026.4.1" "openvino-genai==2026.4.1.0" "openvino-tokenizers==2026.4.1.0"
  "optimum-intel[openvino]==2.2.0" "nncf==3.4.0"
  "ctranslate2==4.8.5"
  "transformers==4.57.6" "tokenizers==0.22.2" "safetensors" "gguf==0.19.0" "numpy" "sentencepiece"
  "onnx==1.23.2"                      # export.source (peer_models' checkpoints) imports the exporter's families
)

mkdir -p build "$LLAMA"
log=build/setup_peers.log
: > "$log"
t_all=$SECONDS
step() { printf '== %s\n' "$*"; echo "== $* ($(date -u +%FT%TZ))" >>"$log"; }
fail() { tail -n 40 "$log" >&2; echo "setup_peers failed: $* (full log: $log)" >&2; exit 1; }
quiet() { "$@" >>"$log" 2>&1 || fail "$*"; }

# -- 1. the venv and its packages --------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  quiet "$PY" -m venv "$VENV"
fi
stamp="$VENV/.peers-installed"
want="$TORCH ${PINS[*]}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  step "python packages: already installed (stamp matches)"
else
  t=$SECONDS
  step "python packages into $VENV (a few minutes)"
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip
  quiet "$VENV/bin/python" -m pip install -q "$TORCH"
  quiet "$VENV/bin/python" -m pip install -q "$TORCH" "${PINS[@]}"
  # optimum-intel requires torchvision, and PyPI's torchvision does not load beside the local CPU torch
  # ('operator torchvision::nms does not exist'), which breaks every transformers model import. Nothing
  # here needs it (text models only): remove it (pip check will name the missing requirement).
  quiet "$VENV/bin/python" -m pip uninstall -y -q torchvision
  quiet "$VENV/bin/python" -c "import openvino, openvino_genai, openvino_tokenizers, nncf, ctranslate2, tokenizers, gguf, torch; from transformers import GPT2LMHeadModel; from optimum.intel import OVModelForCausalLM"
  echo "$want" > "$stamp"
  echo "   done in $((SECONDS - t)) s"
fi

# -- 2. llama.cpp's source, from the llama-cpp-python sdist ------------------------------------------
if [ ! -f "$LLAMA/src/CMakeLists.txt" ]; then
  step "llama.cpp source (llama-cpp-python $LLAMA_PY_VERSION sdist, vendor/llama.cpp)"
  rm -rf "$LLAMA/sdist" "$LLAMA/src"
  mkdir -p "$LLAMA/sdist"
  quiet "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_PY_VERSION" -d "$LLAMA/sdist"
  tarball=$(ls "$LLAMA"/sdist/llama_cpp_python-*.tar.gz | head -n1)
  quiet tar -xzf "$tarball" -C "$LLAMA/sdist"
  top=$(ls -d "$LLAMA"/sdist/llama_cpp_python-*/ | head -n1)
  [ -f "$top/vendor/llama.cpp/CMakeLists.txt" ] || fail "no vendor/llama.cpp in $tarball"
  mv "$top/vendor/llama.cpp" "$LLAMA/src"
  rm -rf "$top"
fi

# -- 3. llama.cpp's tools -------------------------------------------------------------------------------
BIN="$LLAMA/build/bin"
if [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-lookup" ]; then
  step "llama.cpp tools: already built ($BIN)"
else
  t=$SECONDS
  step "building llama-bench, llama-server, llama-quantize, llama-lookup (10+ minutes on 2 cores)"
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  quiet cmake -S "$LLAMA/src" -B "$LLAMA/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DBUILD_SHARED_LIBS=OFF
  quiet cmake --build "$LLAMA/build" -j "$JOBS" --target llama-bench llama-server llama-quantize llama-lookup
  echo "   done in $((SECONDS - t)) s"
fi

# -- 4. what is there --------------------------------------------------------------------------------
"$VENV/bin/python" - "$BIN" <<'EOF' 2>>"$log" || fail "version check"
import sys, subprocess, importlib.metadata as md
names = ["openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "nncf", "ctranslate2", "transformers", "torch", "gguf"]
print("setup_peers ok: " + ", ".join(f"{n} {md.version(n)}" for n in names))
out = subprocess.run([sys.argv[1] + "/llama-bench", "--version"], capture_output=True, text=True)
print("llama.cpp: " + " ".join((out.stdout + out.stderr).split()))
EOF
echo "   ($((SECONDS - t_all)) s in all; log: $log)"
