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


@dataclasses.dataclass(frozen=True)
class EngineMemoryProfile:
    """An Engine's cache memory, each field defined exactly.

    A slot is one sequence's rows of every layer's K and V (rows_per_slot token rows, max_chunk - 1 of
    them padding room); all slots are allocated once, and a slot is occupied while it holds a live or
    retained sequence."""

    device: str
    dtype: str
    total_bytes: int                # allocated K/V bytes, all slots and layers
    used_bytes: int                 # rows holding live sequences' tokens
    retained_bytes: int             # rows holding released sequences kept for prefix reuse
    slots: int                      # max_sequences
    occupied_slots: int             # slots holding a live or retained sequence
    rows_per_slot: int              # token rows per slot (max_seq_len + max_chunk - 1)
    index_bytes: int                # slot table and prefix index (radix tree), host memory
    io_buffer_bytes: int            # preallocated per-run input/output buffers
    active_sequences: int
    total_tokens: int               # tokens held by live sequences
    retained_sequences: int
    retained_tokens: int
    bytes_per_token: int            # K+V bytes of one token, all layers
    prefix_hits: int                # sequences that adopted an indexed prefix
    prefix_tokens_reused: int       # tokens adopted instead of computed
    evictions: int                  # retained sequences dropped to make room
    draft_cache_bytes: int = 0      # draft models' caches of the running requests (speculative="draft:...")
    draft_tokens: int = 0           # tokens proposed and verified (speculative decoding)
    accepted_tokens: int = 0        # of those, kept
    speculative_steps: int = 0      # decode steps that verified drafts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_speculative_step(self) -> float:
        """Tokens a step that verified drafts produced on average (the kept drafts and one more)."""
        s = self.speculative_steps
        return (self.accepted_tokens + s) / s if s else 0.0

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes - self.retained_bytes

    @property
    def fragmentation_ratio(self) -> float:
        """Allocated-but-unused rows of occupied slots / allocated rows of occupied slots (0: none occupied)."""
        rows = self.occupied_slots * self.rows_per_slot
        return 1.0 - (self.total_tokens + self.retained_tokens) / rows if rows else 0.0

    @property
    def efficiency_ratio(self) -> float:
        """Bytes holding tokens (live and retained) / allocated bytes."""
        return (self.used_bytes + self.retained_bytes) / self.total_bytes

    def report(self) -> str:
        mib = 1024 * 1024
        return "\n".join([
            f"Engine KV cache memory ({self.dtype}, {self.device})",
            f"  total            : {self.total_bytes / mib:10.2f} MiB  ({self.slots} slots x "
            f"{self.rows_per_slot} rows x {self.bytes_per_token} bytes/token)",
            f"  used (live)      : {self.used_bytes / mib:10.2f} MiB  ({self.total_tokens} tokens, "
            f"{self.active_sequences} sequences)",
            f"  retained         : {self.retained_bytes / mib:10.2f} MiB  ({self.retained_tokens} tokens, "
            f"{self.retained_sequences} sequences kept for prefix reuse)",
            f"  free             : {self.free_bytes / mib:10.2f} MiB",
            f"  slots            : {self.occupied_slots} of {self.slots} occupied",
            f"  fragmentation    : {100 * self.fragmentation_ratio:.1f}% of occupied slots' rows unused",
            f"  efficiency       : {100 * self.efficiency_ratio:.1f}% of allocated bytes hold tokens",
            f"  slot index       : {self.index_bytes / 1024:10.1f} KiB (slot table + prefix index)",
            f"  I/O buffers      : {self.io_buffer_bytes / mib:10.2f} MiB",
            f"  prefix cache     : {self.prefix_hits} hits, {self.prefix_tokens_reused} tokens reused, "
            f"{self.evictions} evictions",
        ] + ([f"  speculative      : {self.speculative_steps} steps, {self.accepted_tokens} of {self.draft_tokens} "
              f"drafts kept ({100 * self.acceptance_rate:.1f}%), {self.tokens_per_speculative_step:.2f} tokens/step, "
              f"draft caches {self.draft_cache_bytes / mib:.2f} MiB"] if self.speculative_steps or
             self.draft_cache_bytes else []))
