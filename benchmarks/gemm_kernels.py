"""One GEMM, several ONNX Runtime graph forms: which kernel is fastest for [M,K] x [K,N] on this CPU.

    python -m benchmarks.gemm_kernels [--m 1 16 512] [--shapes 768x3072 ...] [--forms ...] [--threads 2]

Each (form, shape) runs alone in its own process (a one-node graph, weights as initializers so that
ORT pre-packs them), warm-up then --repeats timed runs per M; reports the median ms and GOP/s
(2*M*K*N / time) and the relative error against float64. Forms:
    fp32          MatMul, fp32 weights
    dqmm          DynamicQuantizeMatMul: activations u8 per tensor (dynamic), weights s8 per column
    w8a8-row      what `--weights w8a8` exports: activations int8 per row (QuantizeLinear), weights s8 per
                  column, MatMulIntegerToFloat (export/linear.py: Int8RowGemms)
    mnb8-B/mnb4-B MatMulNBits 8/4-bit, symmetric blocks of B along K, accuracy_level 4 (int8 compute)
JSON under benchmarks/out/ (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .common import environment, session_options
from .isolate import emit, out_dir, run_rounds, succeeded

FORMS = ("fp32", "dqmm", "w8a8-row", "mnb8-128", "mnb8-32", "mnb4-128", "mnb4-32")
SHAPES = ("768x2304", "768x768", "768x3072", "3072x768", "768x50257")


def graph(form: str, W: np.ndarray):
    """A one-node graph computing x [M,K] @ W [K,N] in `form`, and its weights' bytes."""
    from onnx import TensorProto, helper, numpy_helper
    K, N = W.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])
    inits = []
    if form == "fp32":
        inits.append(numpy_helper.from_array(W, "w"))
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    elif form == "dqmm":
        scale = np.maximum(np.abs(W).max(0), 1e-12) / 127                                       # [N]
        q = np.clip(np.rint(W / scale), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(q, "w"), numpy_helper.from_array(scale.astype(np.float32), "s")]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
    elif form == "w8a8-row":
        from export.graph import GraphBuilder
        from export.linear import INT8_OPSET, Int8RowGemms
        gb = GraphBuilder()
        gb.input("x", TensorProto.FLOAT, ["M", K])
        gb.output("y", TensorProto.FLOAT, ["M", N])
        gemms = Int8RowGemms(gb, np.float32)
        gemms.rows("x", "x")
        gemms.matmul("x", W, "gemm", "w", "x", outputs=["y"])
        m = gb.build("gemm", INT8_OPSET, producer="benchmarks.gemm_kernels")
        return m, sum(t.ByteSize() for t in gb.initializers)
    elif form.startswith("mnb"):
        bits, blk = int(form[3]), int(form.split("-")[1])
        qmax = 2 ** (bits - 1) - 1
        Wb = W.T.reshape(N, K // blk, blk)                                                     # [N,nb,blk]
        scale = np.maximum(np.abs(Wb).max(-1), 1e-12) / qmax                                   # [N,nb]
        q = (np.clip(np.rint(Wb / scale[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
        if bits == 4:
            q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        inits += [numpy_helper.from_array(q, "w"), numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "s")]
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                block_size=blk, accuracy_level=4)
    else:
        raise ValueError(f"unknown form {form!r}")
    g = helper.make_graph([node], "gemm", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m, sum(t.ByteSize() for t in inits)


def worker(a) -> None:
    import onnxruntime as ort
    K, N = map(int, a.shape.split("x"))
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    model, nbytes = graph(a.form, W)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(a.threads), providers=["CPUExecutionProvider"])
    cells = []
    for M in a.m:
        x = rng.standard_normal((M, K)).astype(np.float32)
        ref = x.astype(np.float64) @ W.astype(np.float64)
        for _ in range(a.warmup):
            y = sess.run(None, {"x": x})[0]
        ms = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            ms.append((time.perf_counter() - t0) * 1e3)
        med = float(np.median(ms))
        cells.append({"M": M, "median_ms": med, "min_ms": float(min(ms)), "gops": 2 * M * K * N / med / 1e6,
                      "rel_err": float(np.abs(y - ref).max() / np.abs(ref).max())})
    emit({"form": a.form, "shape": a.shape, "weight_bytes": nbytes, "cells": cells, "environment": environment(a.threads)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 16, 64, 512])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--forms", nargs="+", default=list(FORMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--form", default=None)
    ap.add_argument("--shape", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    common = ["--threads", str(a.threads), "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--m", *map(str, a.m)]
    cases = {f"{f} {s}": ["gemm", "--form", f, "--shape", s, *common] for s in a.shapes for f in a.forms}
    res = run_rounds("benchmarks.gemm_kernels", cases, a.rounds, timeout=600)
    rows = []
    for name, ok in succeeded(res):
        for i, M in enumerate(a.m):
            med = float(np.median([r["cells"][i]["median_ms"] for r in ok]))
            K, N = map(int, ok[0]["shape"].split("x"))
            rows.append({"form": ok[0]["form"], "shape": ok[0]["shape"], "M": M, "median_ms": med,
                         "gops": 2 * M * K * N / med / 1e6, "rel_err": ok[0]["cells"][i]["rel_err"]})
    print(f"{'shape':>10} {'M':>4} " + " ".join(f"{f:>16}" for f in a.forms) + "   (ms, GOP/s)")
    for s in a.shapes:
        for M in a.m:
            cells = {r["form"]: r for r in rows if r["shape"] == s and r["M"] == M}
            print(f"{s:>10} {M:>4} " + " ".join(
                f"{cells[f]['median_ms']:7.3f} ({cells[f]['gops']:4.0f})" if f in cells else f"{'-':>16}" for f in a.forms))
    path = out_dir(False) / "gemm_kernels.json"
    path.write_text(json.dumps({"environment": environment(a.threads), "rows": rows, "raw": res}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
