"""What the HTTP layer of `kvcache-infer serve` talks to: a Backend that takes a request's prompts and
gives back a Completion, a stream of per-prompt events. LocalBackend runs one Engine in this process
(worker.EngineWorker); ray_serve.RayBackend sends each prompt to an Engine replica on Ray Serve.

Events, in order per prompt index i:
    (i, "token", token_id)                       one generated token
    (i, "done", (finish_reason, cached_tokens))  the end; cached_tokens: prompt tokens adopted from the
                                                 prefix cache instead of computed
    (i, "error", (http_status, message))         the end, failed (503: the caller may retry)
"""
from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from ..engine import Engine
from .worker import EngineWorker

Event = tuple[int, str, Any]


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer needs to know of the model: limits for validation, the tokenizer for text."""

    name: str
    max_seq_len: int
    vocab_size: int
    created: int                 # the model file's mtime (GET /v1/models)
    tokenizer_json: str | None   # tokenizer.json's text, None for an ids-only model

    @classmethod
    def of(cls, engine: Engine, name: str | None = None) -> ServedModel:
        tok = engine.model.tokenizer
        return cls(name or engine.model.dir.name, engine.max_seq_len, engine.manifest.vocab_size,
                   int(engine.model.file.stat().st_mtime), tok.to_str() if tok is not None else None)

    def tokenizer(self):
        if self.tokenizer_json is None:
            return None
        from tokenizers import Tokenizer
        return Tokenizer.from_str(self.tokenizer_json)


class Completion:
    """One request's events as they arrive (see the module docstring). `replica` names the engine that
    serves it where there are several."""

    def __init__(self, cancel: Callable[[int | None], None], replica: str | None = None):
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.replica = replica
        self._cancel = cancel

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def cancel(self, index: int | None = None) -> None:
        """Stops prompt `index` (None: every prompt) at the engine's next step; frees its slot."""
        self._cancel(index)


class Backend(ABC):
    """Engines behind the HTTP layer."""

    model: ServedModel

    @abstractmethod
    async def start(self) -> None:
        """Called once before the first request (sets `model`)."""

    @abstractmethod
    async def stop(self) -> None:
        """Cancels what is in flight and releases the engines."""

    @abstractmethod
    async def submit(self, prompts: list[list[int]], max_tokens: int, sampling: dict, session: str | None) -> Completion:
        """Queues every prompt (token ids) or none: HTTPError when refused (400: the engine refuses the
        request, 429: the queue is full).
        `session` (the request's `user`) keeps a session's requests on one engine where there are several."""

    @abstractmethod
    async def healthy(self) -> bool:
        """Whether requests can be served now."""

    @abstractmethod
    async def snapshots(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """[(labels, engine_snapshot)] per engine, for /metrics."""


# (name, help, "gauge" or "counter"): the engine's state in /metrics, one row per value of engine_snapshot
ENGINE_METRICS = (
    ("kvcache_queue_depth", "Requests waiting for a slot", "gauge"),
    ("kvcache_running_requests", "Requests holding a slot", "gauge"),
    ("kvcache_cache_bytes", "K/V cache bytes allocated", "gauge"),
    ("kvcache_cache_used_bytes", "K/V bytes holding live tokens", "gauge"),
    ("kvcache_cache_retained_bytes", "K/V bytes of released sequences kept for prefix reuse", "gauge"),
    ("kvcache_cache_occupancy_ratio", "Slots holding a live or retained sequence / slots", "gauge"),
    ("kvcache_cache_fragmentation_ratio", "Unused rows of occupied slots / rows of occupied slots", "gauge"),
    ("kvcache_prefix_cache_hits", "Sequences that adopted a cached prefix", "counter"),
    ("kvcache_prefix_cache_tokens_reused", "Prompt tokens adopted, not computed", "counter"),
    ("kvcache_sequences", "Sequences started", "counter"),
    ("kvcache_prefix_cache_hit_ratio", "Prefix-cache hits / sequences started", "gauge"),
    ("kvcache_prefix_cache_evictions", "Retained sequences evicted", "counter"),
    ("kvcache_speculative_steps", "Decode steps that verified guessed tokens (--speculative)", "counter"),
    ("kvcache_draft_tokens", "Guessed tokens verified", "counter"),
    ("kvcache_draft_tokens_accepted", "Guessed tokens kept", "counter"),
    ("kvcache_draft_acceptance_ratio", "Guessed tokens kept / verified", "gauge"),
    ("kvcache_tokens_per_speculative_step", "Tokens a step that verified guesses produced, on average", "gauge"),
)


def engine_snapshot(engine: Engine) -> dict[str, float]:
    """The ENGINE_METRICS values of `engine` now (waits for a step in progress to end)."""
    p = engine.memory_profile()
    started = engine.stats["sequences"]
    values = (engine.waiting_requests, engine.running_requests, p.total_bytes, p.used_bytes, p.retained_bytes,
              p.occupied_slots / p.slots, p.fragmentation_ratio, p.prefix_hits, p.prefix_tokens_reused,
              started, p.prefix_hits / started if started else 0.0, p.evictions, p.speculative_steps, p.draft_tokens,
              p.accepted_tokens, p.acceptance_rate, p.tokens_per_speculative_step)
    return {name: float(v) for (name, _, _), v in zip(ENGINE_METRICS, values)}


def event_value(req, kind: str, value):
    """An EngineWorker callback's value in this module's event format (see the docstring)."""
    if kind == "done":
        return value, req.cached_tokens
    if kind == "error":
        return 500, value
    return value


class LocalBackend(Backend):
    """One Engine in this process, ticked by one thread (worker.EngineWorker)."""

    def __init__(self, engine: Engine, *, name: str | None = None, max_queue: int = 256):
        self.engine = engine
        self.model = ServedModel.of(engine, name)
        self.worker = EngineWorker(engine, max_queue)

    async def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.stop)

    async def submit(self, prompts, max_tokens, sampling, session=None) -> Completion:
        loop = asyncio.get_running_loop()
        index: dict[int, int] = {}

        def deliver(req, kind, value):            # on the loop, after `index` is filled
            out.queue.put_nowait((index[req.id], kind, event_value(req, kind, value)))

        push = lambda req, kind, value: loop.call_soon_threadsafe(deliver, req, kind, value)   # engine thread

        def cancel(i):
            self.worker.cancel([reqs[i]] if i is not None else reqs)

        out = Completion(cancel)
        reqs = self.worker.submit(prompts, max_tokens, sampling, push, time.perf_counter())
        index.update((r.id, i) for i, r in enumerate(reqs))
        return out

    async def healthy(self) -> bool:
        return self.worker.alive

    async def snapshots(self):
        return [({}, await asyncio.to_thread(engine_snapshot, self.engine))]
