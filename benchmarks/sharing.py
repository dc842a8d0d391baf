"""Weights shared across sequences: RSS of one Model plus N inferencers vs N separate Models.

    python -m benchmarks.sharing --model models/gpt2 --sequences 8 --max-seq-len 1024

Each inferencer's cache is filled (every page resident, as after a full-length sequence) and runs
one step. Reported: RSS growth per inferencer vs its cache size, and the cost of a second Model.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import numpy as np
import psutil

from kvcache_infer import KVCacheInferencer, Model

from .common import environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/gpt2"))
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/sharing_cpu.json"))
    a = ap.parse_args()
    proc = psutil.Process()

    def rss() -> int:
        gc.collect()
        return proc.memory_info().rss

    r0 = rss()
    model = Model(a.model, intra_op_threads=a.threads)
    first = KVCacheInferencer(model, max_seq_len=a.max_seq_len)   # warm-up: like the measured ones
    for buf in first.cache.keys + first.cache.values:
        buf.host[...] = 0
    first.forward([1, 2, 3]); first.forward([4])    # ORT's arena warmed once
    r_model = rss()
    infs, steps = [], []
    for i in range(a.sequences):
        before = rss()
        inf = KVCacheInferencer(model, max_seq_len=a.max_seq_len)
        for buf in inf.cache.keys + inf.cache.values:
            buf.host[...] = 0
        inf.forward(np.array([5]))
        infs.append(inf)
        steps.append(rss() - before)
        print(f"inferencer {i + 1}: RSS +{steps[-1] / 2**20:.1f} MiB (its cache: "
              f"{inf.memory_profile().total_cache_bytes / 2**20:.1f} MiB)", flush=True)
    r_all = rss()
    cache = sum(i.memory_profile().total_cache_bytes + i.memory_profile().io_buffer_bytes for i in infs)
    second = Model(a.model, intra_op_threads=a.threads)
    KVCacheInferencer(second, max_seq_len=8).forward([1])
    r_second = rss()
    res = {"environment": environment(a.threads), "model": str(a.model), "sequences": a.sequences,
           "max_seq_len": a.max_seq_len,
           "rss_bytes": {"start": r0, "after_model_and_one_inferencer": r_model, "after_all": r_all,
                         "after_second_model": r_second},
           "model_bytes_rss": r_model - r0, "inferencers_growth": r_all - r_model, "inferencers_cache_bytes": cache,
           "growth_over_cache": (r_all - r_model) / cache, "per_inferencer_growth": steps,
           "second_model_bytes_rss": r_second - r_all}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"model + first inferencer: {(r_model - r0) / 2**20:.0f} MiB; {a.sequences} more inferencers: "
          f"+{(r_all - r_model) / 2**20:.1f} MiB for {cache / 2**20:.1f} MiB of caches "
          f"({100 * ((r_all - r_model) / cache - 1):+.1f}%); a second Model: +{(r_second - r_all) / 2**20:.0f} MiB")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
