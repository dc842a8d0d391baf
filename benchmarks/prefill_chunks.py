"""First token of a long prompt against KVCacheInferencer's prefill_chunk: one run, or runs of c tokens.

    python -m benchmarks.prefill_chunks --model models/gpt2-w8a8 [--prompt 512] [--chunks 512 256 128]

Each (model, chunk) runs alone in its own process, rounds in rotating order; a worker times
next_tokens of a fresh random prompt from an empty cache (--repeats after one untimed). Reports the
median over rounds of each worker's median, with the range over rounds. JSON under benchmarks/out/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import environment
from .isolate import emit, out_dir, run_rounds, spread, succeeded


def worker(a) -> None:
    from kvcache_infer import KVCacheInferencer, Model
    model = Model(a.model, intra_op_threads=a.threads)
    inf = KVCacheInferencer(model, max_seq_len=a.prompt + 1, prefill_chunk=a.chunk)
    rng = np.random.default_rng(0)
    times = []
    for k in range(a.repeats + 1):
        ids = rng.integers(0, model.manifest.vocab_size, (1, a.prompt))
        inf.reset_cache()
        t0 = time.perf_counter()
        inf.next_tokens(ids)
        if k:
            times.append((time.perf_counter() - t0) * 1e3)
    emit({"model": a.model, "chunk": a.chunk, "prompt": a.prompt, "ms": float(np.median(times)), "runs_ms": times,
          "weights": model.manifest.weights or model.manifest.dtype, "kv_dtype": model.manifest.kv_dtype,
          "environment": environment(a.threads)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 256, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--chunk", type=int, default=None)
    a = ap.parse_args(argv)
    if a.worker:
        a.model = a.model[0]
        return worker(a)
    cases = {f"{Path(m).name} chunk {c}": ["--model", m, "--chunk", str(c), "--prompt", str(a.prompt), "--threads",
                                           str(a.threads), "--repeats", str(a.repeats)]
             for m in a.model for c in a.chunks}
    res = run_rounds("benchmarks.prefill_chunks", cases, a.rounds, timeout=600)
    rows = []
    for name, ok in succeeded(res):
        s = spread([r["ms"] for r in ok])
        rows.append({"case": name, "model": ok[0]["model"], "chunk": ok[0]["chunk"], "prompt": a.prompt, **s})
        print(f"{name:>36}: first token of {a.prompt} tokens {s['median']:7.1f} ms ({s['min']:.1f}-{s['max']:.1f})")
    path = out_dir(False) / "prefill_chunks.json"
    path.write_text(json.dumps({"environment": environment(a.threads), "rows": rows, "raw": res}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
