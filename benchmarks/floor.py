"""The memory-bandwidth floor of a decode step: what it must read, and how fast this machine reads.

A batch-1 decode step is a chain of matrix-vector products: every weight matrix is read once per
token and reused by nothing, so time >= bytes / sustainable read bandwidth. The bandwidth is
measured, not looked up: an ORT MatMul [1, K] x [K, N] streaming ~200 MB of fp32 weights (far
beyond the caches), median of runs, with the same thread count as the systems being measured.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .common import session_options

EMBEDDING_OPS = ("Gather", "GatherBlockQuantized")


def matvec_bandwidth(threads: int, mbytes: int = 200, runs: int = 30) -> dict:
    K = 4096
    N = mbytes * 2**20 // (4 * K)
    w = np.random.default_rng(0).standard_normal((K, N), dtype=np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                          [numpy_helper.from_array(w, "w")])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                session_options(threads), providers=["CPUExecutionProvider"])
    x = np.ones((1, K), np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    ms = []
    for _ in range(runs):
        t = time.perf_counter(); sess.run(None, {"x": x}); ms.append((time.perf_counter() - t) * 1e3)
    med = float(np.median(ms))
    return {"bytes": int(w.nbytes), "median_ms": med, "GB_per_s": w.nbytes / med / 1e6, "runs": runs}


def weight_bytes_per_step(path: Path, picks: bool = True) -> tuple[int, int]:
    """(bytes of weights a decode step reads, file size): initializers minus embedding tables. picks:
    the step is a greedy run that picks through greedy_index (export/greedy.py; KVCacheInferencer does
    for up to runs.MAX_PICK_ROWS rows): it computes no logits row, so the lm_head (the node writing
    `logits`) reads nothing, the filter's int8 copy is read whole and the rows its rescoring gathers
    count as a table's. Without picks (more rows, or forward()) the filter's nodes read nothing."""
    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    io = json.loads((path / "manifest.json").read_text()).get("io", {}) if (path / "manifest.json").is_file() else {}
    filtered = bool(io.get("greedy_index"))
    users: dict[str, set] = {}
    for n in m.graph.node:
        if filtered and (io.get("logits") in n.output if picks else n.name.startswith("greedy/")):
            continue
        for i, name in enumerate(n.input):
            users.setdefault(name, set()).add(n.op_type if i == 0 else n.op_type + "/other")
    # a table only embedding lookups read (one row per token); wte tied to the lm_head is read whole
    tables = {name for name, ops in users.items() if ops and ops <= set(EMBEDDING_OPS)}
    total = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer if t.name in users and t.name not in tables)
    return total, (path / "model.onnx").stat().st_size


def floor_ms(weight_bytes: int, kv_bytes_per_token: int, position: int, batch: int, gb_per_s: float) -> float:
    """Milliseconds a step at `position` cannot beat: weights once, plus every row's live K/V."""
    return (weight_bytes + kv_bytes_per_token * position * batch) / (gb_per_s * 1e6)
