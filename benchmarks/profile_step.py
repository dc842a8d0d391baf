"""Where a decode step's time goes: ORT's profiler, per operator type, at one cache position.

    python -m benchmarks.profile_step --model models/gpt2-int4 --position 512 --threads 2 [--batch 16]

Runs --steps one-token steps at the position (after warm-up) with profiling on and sums the
kernel times per op type (median step). JSON under benchmarks/out/ (--out to choose).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvcache_infer import KVCacheInferencer, Model

from .common import environment, session_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--position", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(a.threads)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        model = Model(a.model, intra_op_threads=a.threads, session_options=so)
        inf = KVCacheInferencer(model, max_seq_len=a.position + a.steps + 8, batch_size=a.batch)
        ids = np.random.default_rng(0).integers(0, model.manifest.vocab_size, size=(a.batch, a.position + a.steps + 8))
        inf.forward(ids[:, :a.position - 4])
        for i in range(4):
            inf.forward(ids[:, a.position - 4 + i:a.position - 3 + i])
        for i in range(a.steps):
            inf.forward(ids[:, a.position + i:a.position + i + 1])
        with open(model.session.end_profiling()) as f:
            events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    timed = runs[-a.steps:]
    per_run: list[dict] = []
    for r in timed:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        acc: dict = defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
                acc[e["args"]["op_name"]] += e["dur"] / 1e3
        per_run.append({"run_ms": r["dur"] / 1e3, **acc})
    med = int(np.argsort([p["run_ms"] for p in per_run])[len(per_run) // 2])
    step = per_run[med]
    total = step.pop("run_ms")
    ops = dict(sorted(step.items(), key=lambda kv: -kv[1]))
    res = {"environment": environment(a.threads), "model": str(a.model), "position": a.position, "batch": a.batch,
           "median_step_ms": total, "kernel_ms_by_op": ops, "kernel_ms_sum": sum(ops.values()),
           "share_by_op": {k: v / total for k, v in ops.items()}}
    suffix = f"_b{a.batch}" if a.batch != 1 else ""
    out = a.out or Path(f"benchmarks/out/profile_{a.model.name}_pos{a.position}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{a.model} at position {a.position}, batch {a.batch}: median step {total:.2f} ms (ORT run), kernels:")
    for k, v in ops.items():
        print(f"  {k:28s} {v:7.3f} ms  {100 * v / total:5.1f}%")
    print(f"  {'(outside kernels)':28s} {total - sum(ops.values()):7.3f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
