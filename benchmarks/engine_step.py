"""What one Engine step costs, by what it holds: the numbers behind the Engine's design choices.

    python -m benchmarks.engine_step --model models/gpt2 [--rounds 3] [--publish]

Each case alone in its own process (ms per run, median over --steps runs, then median over rounds):
    decode-K          K sequences at position --position decode one token each (K = 1 .. 16)
    idle-slots        1 sequence decodes while 15 other slots hold sequences that sit out the step
    mixed             15 decoding + one 64-token prompt chunk in ONE run
    split             the same work as two runs (the 15 decodes, then the chunk alone)
    fork              fork() of a sequence holding --position tokens (copies its rows)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import environment, session_options
from .isolate import emit, out_dir, run_rounds, spread

CASES = ("decode-1", "decode-2", "decode-4", "decode-8", "decode-16", "idle-slots", "mixed", "split", "fork")


def worker(a) -> None:
    from kvcache_infer import Engine, Model
    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    V = model.manifest.vocab_size
    rng = np.random.default_rng(a.seed)
    eng = Engine(model, max_sequences=16, max_seq_len=a.position + a.steps + 64 + 8, max_chunk=64)
    case = a.worker
    seqs = [eng.new_sequence() for _ in range(1 if case == "fork" else 16)]
    hold = 16 if case in ("idle-slots", "mixed", "split") else int(case.split("-")[1]) if case.startswith("decode") else 1
    for s in seqs[:hold]:
        eng.step({s: rng.integers(0, V, a.position)})
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        if case.startswith("decode"):
            eng.advance({s: [1] for s in seqs[:hold]})
        elif case == "idle-slots":
            eng.advance({seqs[7]: [1]})
        elif case == "mixed":
            eng.advance({**{s: [1] for s in seqs[:15]}, seqs[15]: rng.integers(0, V, 64)})
        elif case == "split":
            eng.advance({s: [1] for s in seqs[:15]})
            eng.advance({seqs[15]: rng.integers(0, V, 64)})
        elif case == "fork":
            c = eng.fork(seqs[0])
        dt = (time.perf_counter() - t0) * 1e3
        if case == "fork":
            eng.release(c)
        elif case in ("mixed", "split"):
            eng.truncate(seqs[15], a.position)
            for s in seqs[:15]:
                eng.truncate(s, a.position)
        else:
            for s in seqs[:hold]:
                eng.truncate(s, a.position)
        if i >= a.warmup:
            times.append(dt)
    emit({"case": case, "ms": float(np.median(times)), "min_ms": float(min(times)), "max_ms": float(max(times)),
          "environment": environment(a.threads)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2")
    ap.add_argument("--position", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--publish", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    args = ["--model", a.model, "--position", str(a.position), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--seed", str(a.seed), "--threads", str(a.threads)]
    res = run_rounds("benchmarks.engine_step", {c: [c, *args] for c in a.cases}, a.rounds)
    summary = {c: spread([r["ms"] for r in rs if "failed" not in r]) if any("failed" not in r for r in rs)
               else {"failed": rs[0]["failed"]} for c, rs in res.items()}
    record = {"benchmark": "engine_step", "model": a.model, "position": a.position, "environment": environment(a.threads),
              "summary_ms": summary, "rounds": res}
    out = out_dir(a.publish) / f"engine_step_{Path(a.model).name}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    for c, v in summary.items():
        print(f"{c:12s} " + (f"{v['median']:8.2f} ms ({v['min']:.2f}-{v['max']:.2f})" if "failed" not in v
                             else f"not run: {v['failed'][:120]}"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
