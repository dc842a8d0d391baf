"""Latency tracking and the cache memory profile."""
from __future__ import annotations

import dataclasses

import numpy as np

WINDOW = 4096  # cached-token latencies kept for percentiles (a ring: memory stays flat on long runs)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Latency of forward() calls since the last reset_cache() (or construction).

    first_token_ms: the first call of the sequence (the prompt, or its first chunk).
    cached_token_*: later one-token calls; p50/p90 over the last WINDOW of them, mean over all.
    chunk_calls: later calls with more than one token (not counted as cached tokens).
    """

    first_token_ms: float | None
    cached_token_mean_ms: float | None
    cached_token_p50_ms: float | None
    cached_token_p90_ms: float | None
    cached_token_count: int
    chunk_calls: int
    tokens: int                     # positions consumed per sequence
    batch_size: int
    speedup: float | None           # first_token_ms / cached_token_mean_ms

    def report(self) -> str:
        def f(x):
            return "n/a" if x is None else f"{x:.3f} ms"
        return "\n".join([
            "KV-cache inference metrics",
            f"  first token (prefill) : {f(self.first_token_ms)}",
            f"  cached token mean     : {f(self.cached_token_mean_ms)}  (n={self.cached_token_count})",
            f"  cached token p50 / p90: {f(self.cached_token_p50_ms)} / {f(self.cached_token_p90_ms)}",
            f"  speedup (first/cached): {'n/a' if self.speedup is None else f'{self.speedup:.2f}x'}",
            f"  tokens per sequence   : {self.tokens}  (batch {self.batch_size}, chunk calls {self.chunk_calls})",
        ])


class LatencyTracker:
    """Fixed-size state: a ring of the last WINDOW cached-token latencies plus running sums."""

    def __init__(self) -> None:
        self._ring = np.zeros(WINDOW, dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        self.first_ms: float | None = None
        self.count = 0
        self.total_ms = 0.0
        self.chunk_calls = 0

    def record(self, ms: float, n_tokens: int) -> None:
        if self.first_ms is None:
            self.first_ms = ms
        elif n_tokens == 1:
            self._ring[self.count % WINDOW] = ms
            self.count += 1
            self.total_ms += ms
        else:
            self.chunk_calls += 1

    def snapshot(self, tokens: int, batch_size: int) -> Metrics:
        mean = p50 = p90 = None
        if self.count:
            window = self._ring[: min(self.count, WINDOW)]
            mean = self.total_ms / self.count
            p50, p90 = (float(x) for x in np.percentile(window, [50, 90]))
        speedup = self.first_ms / mean if (self.first_ms is not None and mean) else None
        return Metrics(self.first_ms, mean, p50, p90, self.count, self.chunk_calls, tokens, batch_size, speedup)


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """Cache memory of one inferencer (fields after the seed design's MemoryProfile)."""

    layout: str
    device: str
    dtype: str
    total_cache_bytes: int          # allocated for K and V, all layers (growing layout: both buffers)
    used_cache_bytes: int           # holding live tokens
    free_cache_bytes: int
    bytes_per_token: int            # K+V of one token of one sequence, all layers
    tokens: int                     # live tokens, all sequences
    capacity_tokens: int            # max_seq_len x batch
    active_sequences: int
    io_buffer_bytes: int            # preallocated ids/positions/logits/mask buffers

    @property
    def unused_capacity_fraction(self) -> float:
        return 1.0 - self.tokens / self.capacity_tokens

    @property
    def efficiency_ratio(self) -> float:
        """used / allocated cache bytes (at most 0.5 for the double-buffered growing layout)."""
        return self.used_cache_bytes / self.total_cache_bytes

    def report(self) -> str:
        mib = 1024 * 1024
        return "\n".join([
            f"KV cache memory ({self.layout} layout, {self.dtype}, {self.device})",
            f"  allocated        : {self.total_cache_bytes / mib:10.2f} MiB",
            f"  used             : {self.used_cache_bytes / mib:10.2f} MiB  ({self.tokens} tokens)",
            f"  free             : {self.free_cache_bytes / mib:10.2f} MiB",
            f"  bytes per token  : {self.bytes_per_token}",
            f"  capacity         : {self.capacity_tokens} tokens over {self.active_sequences} sequence(s)",
            f"  unused capacity  : {100 * self.unused_capacity_fraction:.1f}%",
            f"  efficiency       : {100 * self.efficiency_ratio:.1f}% of allocated bytes hold live tokens",
            f"  I/O buffers      : {self.io_buffer_bytes / mib:10.2f} MiB",
        ])
