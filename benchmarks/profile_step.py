"""Where a step's time goes: ORT's profiler per operator type, and the time spent outside ONNX Runtime.

    python -m benchmarks.profile_step --model models/gpt2-int4 --position 512 --threads 2 [--batch 16]
    python -m benchmarks.profile_step --model models/gpt2-w8a8 --engine 16 --position 128
    python -m benchmarks.profile_step --model models/gpt2-w8a8 --prompt 512

Three kinds of step, each timed --steps times after warm-up (median step reported):
    (default)       KVCacheInferencer: --batch rows in lockstep, one token each at --position
    --engine K      Engine.advance: K sequences at --position (staggered by one token each, as in
                    serving) decode one token each in one ragged run, greedy tokens read back
    --prompt N      KVCacheInferencer.next_tokens of an N-token prompt from an empty cache (first token)
Reports the wall time of the whole call, ORT's run time (its `model_run` event), the kernel time per
op type, and what lies outside the kernels (ORT's own overhead) and outside ORT (Python: inputs,
bindings, reading outputs). JSON under benchmarks/out/ (--out to choose).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvcache_infer import Engine, KVCacheInferencer, Model

from .common import environment, session_options


def _steps(a, model: Model):
    """A callable that runs one step, after the warm-up state is in place."""
    V = model.manifest.vocab_size
    rng = np.random.default_rng(0)
    if a.prompt:
        inf = KVCacheInferencer(model, max_seq_len=a.prompt + 8)
        ids = rng.integers(0, V, a.prompt)

        def prompt_step():
            inf.reset_cache()
            inf.next_tokens(ids[None])
        return prompt_step
    if a.engine:
        eng = Engine(model, max_sequences=a.engine, max_seq_len=a.position + a.engine + a.warmup + a.steps + 8)
        seqs = [eng.new_sequence() for _ in range(a.engine)]
        for i, s in enumerate(seqs):
            eng.step({s: rng.integers(0, V, a.position + i)})
        tokens = {s: [1] for s in seqs}

        def engine_step():
            out = eng.advance(tokens)
            for s in seqs:
                tokens[s] = [out.next_token(s)]
        return engine_step
    inf = KVCacheInferencer(model, max_seq_len=a.position + a.warmup + a.steps + 8, batch_size=a.batch)
    ids = rng.integers(0, V, size=(a.batch, a.position + a.warmup + a.steps + 8))
    inf.forward(ids[:, :a.position])
    t = iter(range(a.position, ids.shape[1]))

    def lockstep_step():
        k = next(t)
        inf.forward(ids[:, k:k + 1])
    return lockstep_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--position", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--engine", type=int, default=0, metavar="K", help="profile an Engine run of K sequences")
    ap.add_argument("--prompt", type=int, default=0, metavar="N", help="profile the first token of an N-token prompt")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(a.threads)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        model = Model(a.model, intra_op_threads=a.threads, session_options=so)
        step = _steps(a, model)
        for _ in range(a.warmup):
            step()
        walls = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            walls.append((time.perf_counter() - t0) * 1e3)
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
    step_ops = per_run[med]
    total = step_ops.pop("run_ms")
    ops = dict(sorted(step_ops.items(), key=lambda kv: -kv[1]))
    wall = float(np.median(walls))
    kind = f"prompt {a.prompt}" if a.prompt else f"engine {a.engine} sequences at {a.position}" if a.engine \
        else f"batch {a.batch} at {a.position}"
    res = {"environment": environment(a.threads), "model": str(a.model), "kind": kind, "position": a.position,
           "batch": a.batch, "engine_sequences": a.engine, "prompt": a.prompt,
           "median_wall_ms": wall, "median_step_ms": total, "outside_ort_ms": wall - total,
           "kernel_ms_by_op": ops, "kernel_ms_sum": sum(ops.values()),
           "share_by_op": {k: v / total for k, v in ops.items()}}
    suffix = f"_prompt{a.prompt}" if a.prompt else f"_engine{a.engine}_pos{a.position}" if a.engine \
        else f"_pos{a.position}" + (f"_b{a.batch}" if a.batch != 1 else "")
    out = a.out or Path(f"benchmarks/out/profile_{a.model.name}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{a.model}, {kind}: median call {wall:.2f} ms, of which ORT's run {total:.2f} ms; kernels:")
    for k, v in ops.items():
        print(f"  {k:28s} {v:7.3f} ms  {100 * v / total:5.1f}%")
    print(f"  {'(ORT, outside kernels)':28s} {total - sum(ops.values()):7.3f} ms")
    print(f"  {'(outside ORT: Python)':28s} {wall - total:7.3f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
