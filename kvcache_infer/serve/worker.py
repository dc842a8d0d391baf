"""The engine thread of `kvcache-infer serve` (one Engine in this process) and the server's Prometheus
metrics."""
from __future__ import annotations

import threading
from typing import Any

from .api import refused, retry_later
from ..engine import Engine
from ..errors import KVCacheError


class EngineWorker:
    """Ticks an Engine in one thread: submit() from any thread, events to a callback.

    A request's callback is called as callback(request, kind, value): ("token", token id) per generated
    token, then once ("done", finish_reason) or ("error", message). Callbacks run on the engine thread
    and must only hand the event over."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._subs: dict[int, tuple[Any, Any]] = {}          # request id -> (request, callback)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="kvcache-infer-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stopping

    def submit(self, prompts: list, max_tokens: int, sampling: dict, callback, arrived: float) -> list:
        """Queues every prompt (Engine.make_request checks each first) or none: [Request], timed from
        `arrived` (perf_counter). HTTPError: 400 for a request the engine refuses, 429 when the queue
        is full, 503 once stopping."""
        eng = self.engine
        try:
            reqs = [eng.make_request(p, max_tokens, **sampling) for p in prompts]
        except KVCacheError as e:
            raise refused(e) from None
        for r in reqs:
            r.submitted_at = arrived
        with self._lock:
            if self._stopping:
                raise retry_later(503, "the server is shutting down", after_s=5)
            if eng.waiting_requests + len(reqs) > self.max_queue:
                raise retry_later(429, f"{eng.waiting_requests} requests are waiting (limit {self.max_queue}); "
                                  "retry later", "rate_limit_error")
            for r in reqs:
                self._subs[r.id] = (r, callback)
            eng.enqueue(reqs)
        self._wake.set()
        return reqs

    def cancel(self, reqs) -> None:
        for r in reqs:
            self.engine.cancel(r)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels everything in flight and ends the thread."""
        with self._lock:
            self._stopping = True
            reqs = [r for r, _ in self._subs.values()]
        self.cancel(reqs)
        self.thread.join(timeout)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                idle = not self._subs
                if idle and self._stopping:
                    return
            if idle or not eng.busy:
                self._wake.wait(0.05)
                self._wake.clear()
                if not eng.busy and not self._subs:
                    continue
            try:
                events = eng.tick()
            except Exception as e:         # a failed run changed nothing: fail what is in flight, keep serving
                self._fail_all(f"the engine failed a step: {type(e).__name__}: {e}")
                continue
            for req, token in events:
                sub = self._subs.get(req.id)
                if sub is not None:
                    sub[1](req, "token", token)
            self._finish_done()

    def _finish_done(self) -> None:
        with self._lock:
            done = [(r, cb) for r, cb in self._subs.values() if r.done]
            for r, _ in done:
                del self._subs[r.id]
        for r, cb in done:
            cb(r, "done", r.finish_reason)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            subs, self._subs = list(self._subs.values()), {}
        for r, _ in subs:
            self.engine.cancel(r)
        try:
            self.engine.tick()             # applies the cancellations (runs nothing: all are cancelled)
        except Exception:
            pass
        for r, cb in subs:
            cb(r, "error", message)


class ServerMetrics:
    """Prometheus metrics in a registry of their own: request counters and latency histograms updated
    by the HTTP layer as events reach it (so they include the hand-over to the client), engine state
    (backend.ENGINE_METRICS) read from the backend at scrape time."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.tokens = Counter("kvcache_generated_tokens", "Generated tokens (rate() gives tokens/s)",
                              registry=self.registry)
        self.requests = Counter("kvcache_requests", "Finished prompts by finish reason", ["reason"],
                                registry=self.registry)
        self.rejected = Counter("kvcache_rejected_requests", "Requests refused, by HTTP status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("kvcache_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.per_token = Histogram("kvcache_time_per_output_token_seconds", "Between a prompt's consecutive tokens",
                                   buckets=(.005, .01, .02, .04, .06, .08, .1, .15, .25, .5, 1, 2.5),
                                   registry=self.registry)

    def on_token(self, arrived: float, last: float | None, now: float) -> None:
        """A token reached the HTTP layer at `now`; `last`: when the prompt's previous one did (None: first)."""
        self.tokens.inc()
        if last is None:
            self.ttft.observe(now - arrived)
        else:
            self.per_token.observe(now - last)

    def on_finish(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def on_rejected(self, status: int) -> None:
        self.rejected.labels(str(status)).inc()

    def render(self, snapshots: list[tuple[dict[str, str], dict[str, float]]]) -> tuple[bytes, str]:
        """The text exposition: this registry, then the engines' state (one sample per engine, labelled
        as the backend labels them, e.g. by replica)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .backend import ENGINE_METRICS

        class Engines:
            def collect(_self):
                keys = sorted({k for labels, _ in snapshots for k in labels})
                for name, doc, kind in ENGINE_METRICS:
                    family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=keys)
                    for labels, values in snapshots:
                        family.add_metric([labels.get(k, "") for k in keys], values[name])
                    yield family

        state = CollectorRegistry()
        state.register(Engines())
        return generate_latest(self.registry) + generate_latest(state), CONTENT_TYPE_LATEST
