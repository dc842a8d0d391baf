"""The engine thread of `kvcache-infer serve` and its Prometheus metrics."""
from __future__ import annotations

import threading
from typing import Any

from .api import HTTPError
from .engine import Engine


class EngineWorker:
    """Owns an Engine's scheduler in one thread: submit() from any thread, events to a callback.

    A request's callback is called as callback(request, kind, value): ("token", token id) per generated
    token, then once ("done", finish_reason) or ("error", message). Callbacks run on the engine thread
    and must only hand the event over."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
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
        """Validates every prompt, then queues them all (or none): [Request], timed from `arrived`
        (perf_counter). Raises KVCacheError for a bad request and HTTPError(429) when the queue is full."""
        sched = self.engine.scheduler
        reqs = [sched.make_request(p, max_tokens, **sampling) for p in prompts]
        for r in reqs:
            r.submitted_at = arrived
        with self._lock:
            if self._stopping:
                raise HTTPError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
            if len(sched.waiting) + len(reqs) > self.max_queue:
                raise HTTPError(429, f"{len(sched.waiting)} requests are waiting (limit {self.max_queue}); retry later",
                                "rate_limit_error", headers={"Retry-After": "1"})
            for r in reqs:
                self._subs[r.id] = (r, callback)
            sched.enqueue(reqs)
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
        sched = self.engine.scheduler
        while True:
            with self._lock:
                idle = not self._subs
                if idle and self._stopping:
                    return
            if idle or not sched.busy:
                self._wake.wait(0.05)
                self._wake.clear()
                if not sched.busy and not self._subs:
                    continue
            try:
                events = sched.tick()
            except Exception as e:         # a failed run changed nothing: fail what is in flight, keep serving
                self._fail_all(f"the engine failed a step: {type(e).__name__}: {e}")
                continue
            for req, token in events:
                sub = self._subs.get(req.id)
                if sub is not None:
                    sub[1](req, "token", token)
                self.metrics.on_token(req)
            self._finish_done()

    def _finish_done(self) -> None:
        with self._lock:
            done = [(r, cb) for r, cb in self._subs.values() if r.done]
            for r, _ in done:
                del self._subs[r.id]
        for r, cb in done:
            self.metrics.on_finish(r)
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
            self.metrics.on_finish(r, error=True)
            cb(r, "error", message)


class ServerMetrics:
    """Prometheus metrics in a registry of their own: counters and histograms updated by the engine
    thread, engine state (queue, cache, prefix cache) read at scrape time."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.engine = engine
        self.registry = CollectorRegistry()
        self.tokens = Counter("kvcache_generated_tokens", "Generated tokens (rate() gives tokens/s)",
                              registry=self.registry)
        self.requests = Counter("kvcache_requests", "Finished requests by finish reason", ["reason"],
                                registry=self.registry)
        self.rejected = Counter("kvcache_rejected_requests", "Requests refused, by HTTP status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("kvcache_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.per_token = Histogram("kvcache_time_per_output_token_seconds", "Between a request's consecutive tokens",
                                   buckets=(.005, .01, .02, .04, .06, .08, .1, .15, .25, .5, 1, 2.5),
                                   registry=self.registry)

        class EngineState:
            def collect(_self):
                sched = engine.scheduler
                yield GaugeMetricFamily("kvcache_queue_depth", "Requests waiting for a slot", value=len(sched.waiting))
                yield GaugeMetricFamily("kvcache_running_requests", "Requests holding a slot", value=len(sched.running))
                p = engine.memory_profile()
                yield GaugeMetricFamily("kvcache_cache_bytes", "K/V cache bytes allocated", value=p.total_bytes)
                yield GaugeMetricFamily("kvcache_cache_used_bytes", "K/V bytes holding live tokens", value=p.used_bytes)
                yield GaugeMetricFamily("kvcache_cache_retained_bytes", "K/V bytes of released sequences kept for "
                                        "prefix reuse", value=p.retained_bytes)
                yield GaugeMetricFamily("kvcache_cache_occupancy_ratio", "Slots holding a live or retained sequence "
                                        "/ slots", value=p.logical_blocks / p.physical_blocks)
                yield GaugeMetricFamily("kvcache_cache_fragmentation_ratio", "Unused rows of occupied slots / rows "
                                        "of occupied slots", value=p.fragmentation_ratio)
                admitted = engine.stats["sequences"]
                yield CounterMetricFamily("kvcache_prefix_cache_hits", "Sequences that adopted a cached prefix",
                                          value=p.prefix_hits)
                yield CounterMetricFamily("kvcache_prefix_cache_tokens_reused", "Prompt tokens adopted, not computed",
                                          value=p.prefix_tokens_reused)
                yield CounterMetricFamily("kvcache_sequences", "Sequences started", value=admitted)
                yield GaugeMetricFamily("kvcache_prefix_cache_hit_ratio", "Prefix-cache hits / sequences started",
                                        value=p.prefix_hits / admitted if admitted else 0.0)
                yield CounterMetricFamily("kvcache_prefix_cache_evictions", "Retained sequences evicted",
                                          value=p.evictions)

        self.registry.register(EngineState())

    def on_token(self, req) -> None:
        self.tokens.inc()
        if len(req.token_times) == 1:
            self.ttft.observe(req.token_times[0] - req.submitted_at)
        else:
            self.per_token.observe(req.token_times[-1] - req.token_times[-2])

    def on_finish(self, req, error: bool = False) -> None:
        self.requests.labels("error" if error else req.finish_reason).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
