"""Continuous batching: which requests run in the next step, and with which tokens. Plans only.

The Scheduler holds the requests (waiting, running) and plans; it never runs anything and holds no
reference to the Engine, which executes (as vLLM v1's schedule() / update_from_output()):

    for req in sched.cancelled(): ...release req.seq...          # cancellations since the last step
    for req in sched.admit(free_slots, cached): ...give req a sequence; sched.started(req, seq, adopted)
    plan = sched.schedule()                                       # {request: ids} for one ragged run
    ...run plan.feeds; sample a token for each request in plan.sampling...
    events, finished = sched.update(plan, tokens)                 # then release each finished req.seq

Admission favours the waiting requests whose prompt shares the longest cached prefix, and holds back
one that shares more with a prompt still being prefilled than the cache holds (it adopts those rows
once they are computed). A step feeds every running request in decode its last token (decode first),
then prompt chunks up to the prefill budget, cut at fixed offsets (multiples of min(budget, max_chunk)
from where the request started feeding) so that a prompt is cut the same way whatever else runs. With
the runs' batch invariance (runtime.runs.PackedRun.ragged), a request's logits, and so its tokens, do
not depend on what else is in the batch; each request samples with its own sampler (own seed).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, NamedTuple

import numpy as np

from ..runtime.checks import int_arg
from .prefix_cache import common_prefix
from .requests import Request
from .sequence import Sequence


class Plan(NamedTuple):
    """One step: the ids each request's sequence runs, and which requests get tokens from it."""
    feeds: dict[Request, np.ndarray]      # in run order: decodes first, then prompt chunks
    prefill: dict[Request, int]           # prompt tokens fed per request in prefill
    sampling: list[Request]               # requests whose run gives their next token(s)
    drafts: dict[Request, np.ndarray]     # decoding requests that also verify guessed tokens (fed after
                                          # their last token; every fed token gets a logits row)


class Scheduler:
    """Requests waiting and running in one Engine's slots (see the module docstring)."""

    def __init__(self, *, max_chunk: int, prefill_budget: int):
        self.prefill_budget = int_arg("prefill_budget", prefill_budget)
        self.unit = min(self.prefill_budget, max_chunk)     # prompts are cut at multiples of this
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._cancel: set[int] = set()
        self._queue_lock = threading.Lock()      # add() and cancel() may come from other threads

    # -- requests --------------------------------------------------------------------------------
    def add(self, requests: list[Request]) -> None:
        with self._queue_lock:
            self.waiting.extend(requests)

    def cancel(self, req: Request) -> None:
        """Stops a request at the next step (finish_reason "cancelled")."""
        with self._queue_lock:
            if not req.done:
                self._cancel.add(req.id)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def cancelled(self) -> list[Request]:
        """Applies the cancellations asked for since the last call; returns the running requests it
        finished (their sequences are the caller's to release)."""
        with self._queue_lock:
            ids, self._cancel = self._cancel, set()
            for req in [r for r in self.waiting if r.id in ids]:
                self.waiting.remove(req)
                req.finish("cancelled")
        stopped = [r for r in self.running if r.id in ids]
        for req in stopped:
            self._finish(req, "cancelled")
        return stopped

    # -- planning --------------------------------------------------------------------------------
    def admit(self, free_slots: int, cached: Callable[[np.ndarray], int]) -> list[Request]:
        """Which waiting requests take the `free_slots` free slots, in order: longest cached prefix first
        (cached(prompt): tokens the prefix cache would adopt), then arrival; a prompt sharing more with
        a prompt still being prefilled than the cache holds waits for it. Each admitted request must be
        given its sequence with started() before schedule()."""
        with self._queue_lock:
            waiting = list(self.waiting)
        if not waiting or free_slots < 1:
            return []
        prefilling = [r.prompt for r in self.running if r.fed < r.prompt.size]
        ranked = sorted((-cached(req.prompt), order, req) for order, req in enumerate(waiting))
        admitted = []
        for minus_have, _, req in ranked:
            if len(admitted) == free_slots:
                break
            shared = max((common_prefix(req.prompt[:-1], p) for p in prefilling), default=0)
            if shared > -minus_have:
                continue                                   # adopt those rows once they are computed
            admitted.append(req)
            prefilling.append(req.prompt)
        with self._queue_lock:
            for req in admitted:
                self.waiting.remove(req)
        return admitted

    def started(self, req: Request, seq: Sequence, adopted: int) -> None:
        """An admitted request now owns `seq`, which holds the first `adopted` prompt tokens already."""
        req.seq, req.fed, req.cached_tokens = seq, adopted, adopted
        req.admitted_at = time.perf_counter()
        self.running.append(req)

    def decoding(self) -> list[Request]:
        """Running requests past their prompt (each decodes one token, or verifies drafts, per step)."""
        return [r for r in self.running if r.fed == r.prompt.size]

    def schedule(self, drafts: dict[Request, np.ndarray] | None = None) -> Plan | None:
        """This step's feeds (None: nothing to run). drafts: guessed tokens to verify after a decoding
        request's last token (at most max_new_tokens - 1 - generated of them, and max_chunk - 1)."""
        feeds: dict[Request, np.ndarray] = {}
        prefill: dict[Request, int] = {}
        drafts = {r: d for r, d in (drafts or {}).items() if len(d)}
        for req in self.decoding():                      # decode first
            last = np.array([req.output[-1]], dtype=np.int64)
            feeds[req] = np.concatenate([last, drafts[req]]) if req in drafts else last
        budget = self.prefill_budget
        for req in self.running:                         # then prompt chunks, in admission order
            if req.fed < req.prompt.size:
                # chunks end at multiples of `unit` from where the request started feeding, whatever
                # else runs: a prompt is cut the same way alone and in a batch (same numbers)
                take = min(req.prompt.size - req.fed, self.unit - (req.fed - req.cached_tokens) % self.unit)
                if take > budget:
                    continue
                feeds[req] = req.prompt[req.fed:req.fed + take]
                prefill[req] = take
                budget -= take
        if not feeds:
            return None
        sampling = [r for r in feeds if r not in prefill or r.fed + prefill[r] == r.prompt.size]
        return Plan(feeds, prefill, sampling, {r: d for r, d in drafts.items() if r in feeds})

    def update(self, plan: Plan, tokens: dict[Request, list[int]]) -> tuple[list[tuple[Request, int]], list[Request]]:
        """After the plan ran: prompt progress and each request's new tokens (one, or the kept drafts
        and one more). Returns ([(request, token)] in admission order, the requests that finished:
        their sequences are the caller's to release)."""
        now = time.perf_counter()
        events, finished = [], []
        for req in [r for r in self.running if r in plan.feeds]:      # admission order
            req.fed += plan.prefill.get(req, 0)
            for token in tokens.get(req, ()):
                req.output.append(token)
                req.token_times.append(now)
                events.append((req, token))
                if token in req.stop or len(req.output) == req.max_new_tokens:
                    self._finish(req, "stop" if token in req.stop else "length")
                    finished.append(req)
                    break
        return events, finished

    def _finish(self, req: Request, reason: str) -> None:
        req.finish(reason)
        if req in self.running:
            self.running.remove(req)
