"""Timing helpers shared by `kvcache-infer bench` and the benchmark scripts."""
from __future__ import annotations

import time

import numpy as np


def time_decode_steps(inf, ids: np.ndarray, position: int, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each one-token forward() at positions position .. position + steps - 1.

    Resets `inf`, feeds ids[:position - warmup] as one chunk (untimed), `warmup` untimed single steps,
    then times `steps` single steps. ids needs position + steps entries."""
    inf.reset_cache()
    inf.forward(ids[:position - warmup])
    for i in range(position - warmup, position):
        inf.forward(ids[i:i + 1])
    ms = []
    for i in range(position, position + steps):
        t = time.perf_counter()
        inf.forward(ids[i:i + 1])
        ms.append((time.perf_counter() - t) * 1e3)
    return ms
