"""Held-out perplexity of byte-level models (the default model and its quantized variants).

    python -m benchmarks.perplexity --models models/pybytes models/pybytes-int8 models/pybytes-int4

Text: the held-out files of training/train_byte_gpt2.py's split of the Python standard library
(every 20th file, never trained on). Fixed random windows of --ctx bytes, decoded token by token
through KVCacheInferencer (the runtime path); the loss counts every predicted byte of each window.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvcache_infer import KVCacheInferencer, Model

from .common import environment


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def main() -> None:
    from training.train_byte_gpt2 import stdlib_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, nargs="+", required=True)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/perplexity_cpu.json"))
    a = ap.parse_args()
    _, held, info = stdlib_bytes()
    rng = np.random.default_rng(7)
    starts = rng.integers(0, len(held) - a.ctx - 1, size=a.windows)
    res = {"environment": environment(a.threads), "data": {**info, "windows": a.windows, "ctx": a.ctx}, "models": {}}
    for path in a.models:
        model = Model(path, intra_op_threads=a.threads)
        inf = KVCacheInferencer(model, max_seq_len=a.ctx)
        nll, n = 0.0, 0
        for s in tqdm(starts, desc=path.name, unit="window"):
            w = held[s:s + a.ctx].astype(np.int64)
            inf.reset_cache()
            logits = inf.forward(w[:1])
            for t in range(1, a.ctx):
                nll -= log_softmax(logits)[w[t]]
                n += 1
                if t + 1 < a.ctx:
                    logits = inf.forward(w[t:t + 1])
        loss = nll / n
        res["models"][str(path)] = {"nats_per_byte": loss, "perplexity_per_byte": math.exp(loss),
                                    "bits_per_byte": loss / math.log(2), "bytes": n,
                                    "file_bytes": model.file.stat().st_size}
        print(f"{path}: {loss:.4f} nats/byte, perplexity {math.exp(loss):.3f}, {model.file.stat().st_size / 1e6:.2f} MB")
    base = res["models"][str(a.models[0])]["perplexity_per_byte"]
    for v in res["models"].values():
        v["perplexity_vs_first"] = v["perplexity_per_byte"] / base
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
