"""GroupQueryAttention on the CPU: what one decode step's attention costs for each KV-cache format.

    python -m benchmarks.attention_kernels [--forms fp32 int8-channel ...] [--rows 48] [--lengths 150 400]

What the Engine's serving step runs: 12 layers (GPT-2 small: 12 heads of 64), each a GroupQueryAttention
over its own in-place cache of --rows sequences (capacity 512), every sequence holding --length tokens
and adding one (on a grid 2 columns wide with one query each, as PackedRun.ragged pads a decode step).
The layers' caches together are far larger than the CPU's caches, as in the model. Each form runs alone
in its own process, warm-up then --repeats timed runs; reports the median ms for the 12 layers and the
rate at which the cache's bytes are read. Forms (the cache's element type / scales):
    fp32            float32 cache (--kv-cache float)
    fp16            float16 cache, float16 query and output (a float16 export's attention)
    int8-channel    int8, static per-channel scales (what --kv-cache int8 exports)
    int8-tensor     int8, one static scale per tensor
    int4-channel    int4 (two per byte), per-channel scales (kv_cache_bit_width 4)
JSON under benchmarks/out/ (benchmarks/results/ with --publish).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .common import environment, session_options
from .isolate import emit, out_dir, run_rounds, spread, succeeded

FORMS = ("fp32", "fp16", "int8-channel", "int8-tensor", "int4-channel")
LAYERS, HEADS, HEAD_DIM, CAPACITY, GRID = 12, 12, 64, 512, 2


def graph(form: str, rows: int):
    """LAYERS GroupQueryAttention nodes, each with its own cache (graph inputs bound as outputs too)."""
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh
    act = TP.FLOAT16 if form == "fp16" else TP.FLOAT
    cache = {"fp32": TP.FLOAT, "fp16": TP.FLOAT16, "int4-channel": TP.UINT8}.get(form, TP.INT8)
    width = HEAD_DIM // 2 if form.startswith("int4") else HEAD_DIM
    B, N, C, D = rows, HEADS, CAPACITY, HEAD_DIM
    inputs = [h.make_tensor_value_info("qkv", act, [B, GRID, 3 * N * D]),
              h.make_tensor_value_info("seqlens_k", TP.INT32, [B]),
              h.make_tensor_value_info("total_len", TP.INT32, []),
              h.make_tensor_value_info("bias", act, [1, 1, GRID, C]),
              h.make_tensor_value_info("q_len", TP.INT32, [B])]
    outputs, nodes, inits = [], [], []
    attrs = dict(num_heads=N, kv_num_heads=N, scale=1.0, do_rotary=0)
    scales = ["", ""]
    if form.startswith("int"):
        kind = "PER_TENSOR" if form.endswith("tensor") else "PER_CHANNEL"
        shape = (1,) if kind == "PER_TENSOR" else (N, 1, D)
        inits += [nh.from_array(np.full(shape, 0.05, np.float32), "k_scale"),
                  nh.from_array(np.full(shape, 0.05, np.float32), "v_scale")]
        scales = ["k_scale", "v_scale"]
        attrs.update(k_quant_type=kind, v_quant_type=kind, kv_cache_bit_width=4 if form.startswith("int4") else 8)
    for i in range(LAYERS):
        for kv in ("key", "value"):
            inputs.append(h.make_tensor_value_info(f"past_{kv}_{i}", cache, [B, N, C, width]))
            outputs.append(h.make_tensor_value_info(f"present_{kv}_{i}", cache, [B, N, C, width]))
        ins = ["qkv", "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_len", "", "", "", "bias", "",
               *scales, "", "", "q_len"]
        nodes.append(h.make_node("GroupQueryAttention", ins, [f"out_{i}", f"present_key_{i}", f"present_value_{i}"],
                                 domain="com.microsoft", **attrs))
        outputs.append(h.make_tensor_value_info(f"out_{i}", act, [B, GRID, N * D]))
    g = h.make_graph(nodes, "attention", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def cache_bytes_read(form: str, rows: int, length: int) -> int:
    per = {"fp32": 4, "fp16": 2, "int4-channel": 0.5}.get(form, 1)
    return int(LAYERS * 2 * rows * HEADS * (length + 1) * HEAD_DIM * per)


def worker(a) -> None:
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(graph(a.form, a.rows).SerializeToString(), session_options(a.threads),
                                providers=["CPUExecutionProvider"])
    act = np.float16 if a.form == "fp16" else np.float32
    io, keep = sess.io_binding(), []
    for i in range(LAYERS):
        for kv in ("key", "value"):
            if a.form.startswith("int8"):
                buf = rng.integers(-100, 100, (a.rows, HEADS, CAPACITY, HEAD_DIM)).astype(np.int8)
            elif a.form.startswith("int4"):
                buf = rng.integers(0, 255, (a.rows, HEADS, CAPACITY, HEAD_DIM // 2)).astype(np.uint8)
            else:
                buf = rng.standard_normal((a.rows, HEADS, CAPACITY, HEAD_DIM)).astype(act)
            v = ort.OrtValue.ortvalue_from_numpy(buf)
            keep.append(v)
            io.bind_ortvalue_input(f"past_{kv}_{i}", v)
            io.bind_ortvalue_output(f"present_{kv}_{i}", v)     # in place, as the model binds its cache
        io.bind_output(f"out_{i}")
    io.bind_cpu_input("qkv", rng.standard_normal((a.rows, GRID, 3 * HEADS * HEAD_DIM)).astype(act))
    io.bind_cpu_input("total_len", np.array(CAPACITY, np.int32))
    io.bind_cpu_input("bias", np.zeros((1, 1, GRID, CAPACITY), act))
    io.bind_cpu_input("q_len", np.ones(a.rows, np.int32))
    cells = []
    for length in a.lengths:
        io.bind_cpu_input("seqlens_k", np.full(a.rows, length, np.int32))    # length held + 1 new
        for _ in range(a.warmup):
            sess.run_with_iobinding(io)
        ms = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            ms.append((time.perf_counter() - t0) * 1e3)
        med = float(np.median(ms))
        read = cache_bytes_read(a.form, a.rows, length)
        cells.append({"length": length, "median_ms": med, "cache_bytes_read": read, "gb_per_s": read / med / 1e6})
    emit({"form": a.form, "rows": a.rows, "cells": cells, "environment": environment(a.threads)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--rows", type=int, default=48, help="sequences in the step (default 48)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[150, 400], help="tokens each sequence holds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--publish", action="store_true")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--form", default=None)
    a = ap.parse_args(argv)
    if not all(1 <= n < CAPACITY for n in a.lengths):
        ap.error(f"--lengths must be in [1, {CAPACITY - 1}] (the caches hold {CAPACITY} tokens), got {a.lengths}")
    if a.worker:
        return worker(a)
    common = ["--rows", str(a.rows), "--lengths", *map(str, a.lengths), "--threads", str(a.threads),
              "--warmup", str(a.warmup), "--repeats", str(a.repeats)]
    res = run_rounds("benchmarks.attention_kernels", {f: ["--form", f, *common] for f in a.forms}, a.rounds)
    rows = []
    for form, ok in succeeded(res):
        for i, length in enumerate(a.lengths):
            s = spread([r["cells"][i]["median_ms"] for r in ok])
            read = ok[0]["cells"][i]["cache_bytes_read"]
            rows.append({"form": form, "rows": a.rows, "length": length, "ms": s, "cache_bytes_read": read,
                         "gb_per_s": read / s["median"] / 1e6})
    print(f"\n{LAYERS} layers of GroupQueryAttention, {a.rows} sequences, one new token each")
    print(f"{'form':>14} {'length':>7} {'ms (spread)':>22} {'cache MB read':>14} {'GB/s':>6}")
    for r in rows:
        print(f"{r['form']:>14} {r['length']:7d} {r['ms']['median']:9.2f} ({r['ms']['min']:.2f}-{r['ms']['max']:.2f})"
              f" {r['cache_bytes_read'] / 1e6:14.1f} {r['gb_per_s']:6.1f}")
    path = out_dir(a.publish) / "attention_kernels.json"
    path.write_text(json.dumps({"environment": environment(a.threads), "rows": rows, "raw": res}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
