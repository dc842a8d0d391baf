"""What every CPU peer runs (benchmarks/cpu_peers.py): the peers and precisions, the sizes, the same
request ids for every system, and small helpers the peers' workers share."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LLAMA_BIN = REPO / "build" / "llama.cpp" / "build" / "bin"
LLAMA_SDIST = REPO / "build" / "llama.cpp" / "sdist"

PRECISIONS = {
    "openvino": ("fp32-default", "fp32-strict", "int8", "int4"),
    "llamacpp": ("f32", "q8_0", "q4_0"),
    "ct2": ("float32", "int8"),
}
WORKLOADS = ("decode", "first-token", "serving", "shared-prefix")

# The sizes: "gpt2" (and "llama-small", a Llama of GPT-2 small's size) are the ones to report; "tiny" the
# same shapes scaled to the tiny model (256 positions).
SIZES = {
    "gpt2": {"decode_prompts": (32, 512), "decode_new": 64, "decode_timed": 3,
             "first_prompts": (32, 512), "first_timed": 5,
             "serving": {"n": 48, "seed": 0, "prompt": (8, 128), "out": (32, 256)},
             "shared": {"requests": 16, "prefix": 512, "suffix": 16, "new": 32, "seed": 0},
             "server_ctx_per_slot": {"serving": 512, "shared-prefix": 1024}},
    "tiny": {"decode_prompts": (32, 128), "decode_new": 16, "decode_timed": 3,
             "first_prompts": (32, 128), "first_timed": 5,
             "serving": {"n": 12, "seed": 0, "prompt": (8, 64), "out": (8, 32)},
             "shared": {"requests": 16, "prefix": 128, "suffix": 16, "new": 8, "seed": 0},
             "server_ctx_per_slot": {"serving": 128, "shared-prefix": 256}},
}
SIZES["llama-small"] = SIZES["gpt2"]
# --short (scripts/run.sh's short run, GPT-2 small): one prompt length, fewer tokens and requests; not the published sizes
SHORT = {"decode_prompts": (32,), "decode_new": 32, "decode_timed": 2, "first_prompts": (32,), "first_timed": 3,
         "serving": {"n": 16, "seed": 0, "prompt": (8, 64), "out": (16, 64)},
         "shared": {"requests": 8, "prefix": 256, "suffix": 16, "new": 16, "seed": 0},
         "server_ctx_per_slot": {"serving": 512, "shared-prefix": 1024}}
SERVING_SLOTS = 16


# -- workloads (the same ids every system gets) ----------------------------------------------------------
def serving_workload(n: int, vocab: int, seed: int, prompt=(8, 128), out=(32, 256)) -> list[dict]:
    """benchmarks.serving.workload(n, vocab, seed, "all", ...) replicated: the same draws in the same order."""
    rng = np.random.default_rng(seed)
    lens, outs = rng.integers(prompt[0], prompt[1] + 1, n), rng.integers(out[0], out[1] + 1, n)
    prompts = [rng.integers(0, vocab - 1, int(k)) for k in lens]
    return [{"prompt": p, "out": int(o), "arrival": 0.0} for p, o in zip(prompts, outs)]


def shared_prefix_workload(requests: int, prefix: int, suffix: int, vocab: int, seed: int) -> list[np.ndarray]:
    """benchmarks.shared_prefix's prompts replicated: one prefix, then `suffix` distinct ids per request."""
    rng = np.random.default_rng(seed)
    head = rng.integers(0, vocab, prefix)
    return [np.concatenate([head, rng.integers(0, vocab, suffix)]) for _ in range(requests)]


def workload_requests(workload: str, sz: dict, vocab: int) -> list[dict]:
    """[{"prompt": ids, "out": new tokens}] of the serving or the shared-prefix workload at sizes `sz`."""
    if workload == "serving":
        w = sz["serving"]
        return serving_workload(w["n"], vocab, w["seed"], w["prompt"], w["out"])
    w = sz["shared"]
    return [{"prompt": p, "out": w["new"]}
            for p in shared_prefix_workload(w["requests"], w["prefix"], w["suffix"], vocab, w["seed"])]


def random_prompt(length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab - 1, length)


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def environment(threads: int) -> dict:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def hf_config(root: Path, model: str) -> dict:
    p = root / f"{model}-hf" / "config.json"
    if not p.exists():
        raise SystemExit(f"{p} is missing: run `python -m benchmarks.peer_models --model {model}`")
    return json.loads(p.read_text())


def need(path: Path, model: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m benchmarks.peer_models --model {model}`")
    return path
