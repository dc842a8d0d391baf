"""Timing helpers shared by `kvcache-infer bench` and the benchmark scripts."""
from __future__ import annotations

import time

import numpy as np


def time_decode_steps(inf, ids: np.ndarray, position: int, warmup: int, steps: int,
                      greedy: bool = False) -> list[float]:
    """Milliseconds of each one-token step at positions position .. position + steps - 1: forward()
    (the logits row), or with greedy next_tokens() (the greedy next token only).

    Resets `inf`, feeds ids[:position - warmup] as one chunk (untimed), `warmup` untimed single steps,
    then times `steps` single steps. ids needs position + steps entries."""
    run = inf.next_tokens if greedy else inf.forward
    inf.reset_cache()
    run(ids[:position - warmup])
    for i in range(position - warmup, position):
        run(ids[i:i + 1])
    ms = []
    for i in range(position, position + steps):
        t = time.perf_counter()
        run(ids[i:i + 1])
        ms.append((time.perf_counter() - t) * 1e3)
    return ms
