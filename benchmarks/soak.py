"""Soak: many one-token steps with a reset every few hundred; resident memory and latency over time.

    python -m benchmarks.soak --model models/tiny --steps 100000 --reset-every 240

Warm-up steps first (ORT's arena, Python's allocator), continued until --settle-s seconds after the
process started: importing onnxruntime alone (no session) makes RSS jump ~0.9 MiB about 9 s later,
a one-time event unrelated to decoding steps (measured with a script that only imports it). Then
RSS is sampled every --sample steps and latency p50/p99 reported per window of --window steps.
JSON + PNG under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from kvcache_infer import KVCacheInferencer, Model

from .common import pyplot, environment, session_options


def rss_split() -> dict:
    """RssAnon (private memory) and RssFile (pages of mapped files: library code) in bytes, Linux only."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("RssAnon:", "RssFile:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/tiny"))
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--settle-s", type=float, default=12.0,
                    help="keep warming up until this many seconds after process start (0: steps only)")
    ap.add_argument("--reset-every", type=int, default=240)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--sample", type=int, default=1_000)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak_cpu.json"))
    a = ap.parse_args()

    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    m = model.manifest
    cap = min(m.max_positions, a.reset_every + a.prompt_len)
    if a.reset_every + a.prompt_len > cap:
        a.reset_every = cap - a.prompt_len
        print(f"the model holds {cap} positions: resetting every {a.reset_every} steps", flush=True)
    inf = KVCacheInferencer(model, max_seq_len=cap)
    ids = np.random.default_rng(0).integers(0, m.vocab_size, size=4096)
    ms = np.full(a.steps, np.nan)                   # preallocated and touched: the soak itself must not grow
    proc = psutil.Process()
    rss = []

    def step(i: int) -> float:
        if i % a.reset_every == 0:
            inf.reset_cache()
            inf.forward(ids[:a.prompt_len])
        t0 = time.perf_counter()
        inf.forward(ids[i % 4096:i % 4096 + 1])
        return (time.perf_counter() - t0) * 1e3

    tqdm.monitor_interval = 0                       # no monitor thread: its stack and arena would show in RSS
    started = proc.create_time()
    i = 0
    while i < a.warmup or time.time() - started < a.settle_s:
        step(i)
        i += 1
    warmup_done = i
    gc.collect()
    rss.append((0, proc.memory_info().rss))
    split = [(0, rss_split())]
    for i in tqdm(range(a.steps), desc="soak", unit="step", mininterval=1.0, disable=bool(os.environ.get("SOAK_NO_BAR"))):
        ms[i] = step(i)
        if (i + 1) % a.sample == 0:
            rss.append((i + 1, proc.memory_info().rss))
            split.append((i + 1, rss_split()))
    gc.collect()
    rss.append((a.steps, proc.memory_info().rss))
    split.append((a.steps, rss_split()))

    windows = [{"steps": [w, min(w + a.window, a.steps)],
                "p50_ms": float(np.percentile(ms[w:w + a.window], 50)),
                "p99_ms": float(np.percentile(ms[w:w + a.window], 99))} for w in range(0, a.steps, a.window)]
    growth = rss[-1][1] - rss[0][1]
    at = dict(rss)
    per_100k = [{"steps": [s0, s0 + 100_000], "growth": at[s0 + 100_000] - at[s0]}
                for s0 in range(0, a.steps - 99_999, 100_000) if s0 + 100_000 in at]
    split_growth = {k: split[-1][1].get(k, 0) - split[0][1].get(k, 0) for k in split[0][1]}
    res = {"environment": environment(a.threads), "model": str(a.model),
           "geometry": {"layers": m.num_layers, "heads": m.num_heads, "head_dim": m.head_dim, "vocab": m.vocab_size},
           "workload": {"steps": a.steps, "warmup_steps": warmup_done, "settle_s": a.settle_s,
                        "reset_every": a.reset_every,
                        "prompt_len": a.prompt_len, "capacity": cap},
           "rss_bytes": {"after_warmup": rss[0][1], "end": rss[-1][1], "growth": growth,
                         "max_minus_min": max(r for _, r in rss) - min(r for _, r in rss),
                         "growth_per_100k_steps": per_100k, "growth_by_kind": split_growth},
           "rss_samples": rss, "rss_split_samples": split, "latency_windows": windows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    p99 = [w["p99_ms"] for w in windows]
    print(f"{a.steps} steps, reset every {a.reset_every}: RSS {rss[0][1] / 2**20:.2f} -> {rss[-1][1] / 2**20:.2f} MiB "
          f"(growth {growth / 2**10:+.0f} KiB: " + ", ".join(f"{k} {v / 2**10:+.0f} KiB" for k, v in split_growth.items())
          + "; per 100k steps: " + ", ".join(f"{w['growth'] / 2**10:+.0f} KiB" for w in per_100k) + f"); per-window p50 {min(w['p50_ms'] for w in windows):.3f}-"
          f"{max(w['p50_ms'] for w in windows):.3f} ms, p99 {min(p99):.3f}-{max(p99):.3f} ms")
    try:
        plt = pyplot()
        if plt is None:
            raise ImportError("matplotlib")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax1.plot([s for s, _ in rss], [(r - rss[0][1]) / 2**10 for _, r in rss])
        ax1.set(xlabel="step", ylabel="RSS change since warm-up (KiB)", title="resident memory")
        mid = [(w["steps"][0] + w["steps"][1]) / 2 for w in windows]
        ax2.plot(mid, [w["p50_ms"] for w in windows], marker="o", label="p50")
        ax2.plot(mid, p99, marker="o", label="p99")
        ax2.set(xlabel="step", ylabel="ms per step", title="latency per window", ylim=(0, None))
        ax2.legend()
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
