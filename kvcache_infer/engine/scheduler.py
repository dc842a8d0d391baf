"""Continuous batching over an Engine: requests join and leave the running batch at any step.

    req = eng.submit(prompt_ids, max_new_tokens=64, temperature=0.8, seed=1)
    while not req.done:
        for request, token in eng.tick(): ...      # one scheduler step: at most one batched run
    outs = eng.generate(prompts, max_new_tokens=64)        # the same, to completion
    for request, token in eng.stream(prompts): ...

A step (tick) admits waiting requests into free slots, favouring those whose prompt shares the
longest cached prefix and holding back one that shares a prefix with a prompt still being prefilled
(it will adopt those rows instead of computing them again); then runs one ragged step: every
running request in decode gives its last token (decode first), and prompts are fed in chunks up to
the prefill budget, cut at fixed offsets (multiples of min(budget, max_chunk) from where the request
started feeding) so that a prompt is cut the same way whatever else runs. With the runs' own batch
invariance (runs.PackedRun.ragged), a request's logits, and so its tokens, do not depend on what
else is in the batch; each request samples with its own sampler (own seed). A finished request's
sequence is released at once, and its slot serves the next request in the next step.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import CapacityError, InvalidInputError
from ..runtime.generation import IncrementalText, Sampler, check_request, encode_prompt

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence


class Request:
    """One generation request: its prompt, sampling, progress and timings (perf_counter seconds)."""

    def __init__(self, req_id: int, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler, stop: frozenset,
                 tokenizer=None, index: int | None = None):
        self.id, self.index = req_id, index
        self.prompt, self.max_new_tokens, self.sampler, self.stop = prompt, max_new_tokens, sampler, stop
        self.tokenizer = tokenizer
        self.seq: Sequence | None = None
        self.fed = 0                     # prompt tokens in the cache
        self.cached_tokens = 0           # prompt tokens adopted from the prefix cache at admission
        self.output: list[int] = []      # generated tokens
        self.done = False
        self.finish_reason: str | None = None    # "length", "stop" or "cancelled"
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.token_times: list[float] = []

    @property
    def text(self) -> str | None:
        """The generated text (None for an id prompt)."""
        return None if self.tokenizer is None else self.tokenizer.decode(self.output)

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first generated token."""
        return self.token_times[0] - self.submitted_at if self.token_times else None

    def __repr__(self) -> str:
        state = self.finish_reason or ("running" if self.seq is not None else "waiting")
        return f"Request(id={self.id}, prompt={self.prompt.size} tokens, output={len(self.output)}, {state})"


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    k = min(a.size, b.size)
    diff = np.flatnonzero(a[:k] != b[:k])
    return int(diff[0]) if diff.size else k


class Scheduler:
    """Requests waiting and running in one Engine (see the module docstring)."""

    def __init__(self, engine: Engine, prefill_budget: int):
        if isinstance(prefill_budget, bool) or not isinstance(prefill_budget, (int, np.integer)) or prefill_budget < 1:
            raise InvalidInputError(f"prefill_budget must be an int >= 1, got {prefill_budget!r}")
        self.engine, self.prefill_budget = engine, int(prefill_budget)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._cancel: set[int] = set()
        self._queue_lock = threading.Lock()      # submit() and cancel() may come from other threads
        self._next_id = 0

    # -- requests --------------------------------------------------------------------------------
    def make_request(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, stop_ids=(), index: int | None = None
                     ) -> Request:
        """A validated Request, not yet queued."""
        eng = self.engine
        sampler = Sampler(temperature, top_k, top_p, seed, vocab=eng.manifest.vocab_size)
        tok, prompt = encode_prompt(eng.model, prompt)
        ids = eng.check_ids(prompt, "the prompt")
        stop = check_request(max_new_tokens, stop_ids, eng.manifest.vocab_size)
        need = ids.size + max_new_tokens - 1            # the last new token is not fed back
        if need > eng.max_seq_len:
            raise CapacityError(f"{ids.size} prompt tokens + {max_new_tokens} new tokens need {need} cache rows but "
                                f"a sequence holds at most max_seq_len={eng.max_seq_len}; shorten the prompt or "
                                "lower max_new_tokens")
        with self._queue_lock:
            self._next_id += 1
            rid = self._next_id
        return Request(rid, ids, int(max_new_tokens), sampler, stop, tok, index)

    def submit(self, prompt, max_new_tokens: int = 64, **sampling) -> Request:
        """Queues a request; it runs in the next ticks. sampling: temperature, top_k, top_p, seed, stop_ids."""
        req = self.make_request(prompt, max_new_tokens, **sampling)
        self.enqueue([req])
        return req

    def enqueue(self, requests: list[Request]) -> None:
        with self._queue_lock:
            self.waiting.extend(requests)

    def cancel(self, req: Request) -> None:
        """Stops a request at the next tick and frees its slot (finish_reason "cancelled")."""
        with self._queue_lock:
            if not req.done:
                self._cancel.add(req.id)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------
    def tick(self) -> list[tuple[Request, int]]:
        """Admits, runs one batched step and samples: [(request, new token)] in this step's order."""
        eng = self.engine
        with eng.lock:
            self._apply_cancellations()
            self._admit()
            feeds, prefill = {}, {}
            for req in self.running:                         # decode first
                if req.fed == req.prompt.size:
                    feeds[req.seq] = np.array([req.output[-1]], dtype=np.int64)
            budget, unit = self.prefill_budget, min(self.prefill_budget, eng.max_chunk)
            for req in self.running:                         # then prompt chunks, in admission order
                if req.fed < req.prompt.size:
                    # chunks end at multiples of `unit` from where the request started feeding, whatever
                    # else runs: a prompt is cut the same way alone and in a batch (same numbers)
                    take = min(req.prompt.size - req.fed, unit - (req.fed - req.cached_tokens) % unit)
                    if take > budget:
                        continue
                    feeds[req.seq] = req.prompt[req.fed:req.fed + take]
                    prefill[req.id] = take
                    budget -= take
            if not feeds:
                return []
            out = eng.advance(feeds)
            now = time.perf_counter()
            events = []
            for req in list(self.running):
                if req.seq not in out:
                    continue
                if req.id in prefill:
                    req.fed += prefill[req.id]
                    if req.fed < req.prompt.size:
                        continue
                token = out.next_token(req.seq) if req.sampler.greedy else req.sampler(out.logits(req.seq))
                req.output.append(token)
                req.token_times.append(now)
                events.append((req, token))
                if token in req.stop:
                    self._finish(req, "stop")
                elif len(req.output) == req.max_new_tokens:
                    self._finish(req, "length")
            return events

    def _finish(self, req: Request, reason: str) -> None:
        req.done, req.finish_reason = True, reason
        if req.seq is not None:
            self.engine.release(req.seq)
        if req in self.running:
            self.running.remove(req)

    def _apply_cancellations(self) -> None:
        with self._queue_lock:
            ids, self._cancel = self._cancel, set()
            if not ids:
                return
            for req in [r for r in self.waiting if r.id in ids]:
                self.waiting.remove(req)
                req.done, req.finish_reason = True, "cancelled"
        for req in [r for r in self.running if r.id in ids]:
            self._finish(req, "cancelled")

    def _admit(self) -> None:
        """Fills free slots from the waiting queue: longest cached prefix first (then arrival order); a
        prompt sharing more with a prompt still being prefilled than the cache holds waits for it."""
        eng = self.engine
        with self._queue_lock:
            waiting = list(self.waiting)
        if not waiting or len(eng.live) >= eng.max_sequences:
            return
        prefilling = [r.prompt for r in self.running if r.fed < r.prompt.size]
        ranked = sorted((-eng.match_length(req.prompt), order, req) for order, req in enumerate(waiting))
        for minus_have, _, req in ranked:
            if len(eng.live) >= eng.max_sequences:
                break
            shared = max((_common_prefix(req.prompt[:-1], p) for p in prefilling), default=0)
            if shared > -minus_have:
                continue                                   # adopt those rows once they are computed
            req.seq = eng.new_sequence()
            req.fed = req.cached_tokens = eng.reuse_prefix(req.seq, req.prompt)
            req.admitted_at = time.perf_counter()
            self.running.append(req)
            with self._queue_lock:
                self.waiting.remove(req)
            prefilling.append(req.prompt)

    # -- whole batches ---------------------------------------------------------------------------
    def _batch(self, prompts, max_new_tokens, sampling) -> list[Request]:
        if isinstance(prompts, (str, bytes)) or (isinstance(prompts, (list, tuple)) and prompts and
                                                 all(isinstance(p, (int, np.integer)) for p in prompts)):
            raise InvalidInputError("generate()/stream() take a list of prompts (texts or id lists); for one "
                                    "prompt pass [prompt]")
        try:
            prompts = list(prompts)
        except TypeError:
            raise InvalidInputError(f"prompts must be a list of prompts, got {type(prompts).__name__}") from None
        if not prompts:
            raise InvalidInputError("prompts is empty: pass at least one prompt")
        n = len(prompts)

        def per_prompt(name, value):
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise InvalidInputError(f"{name} has {len(value)} entries for {n} prompts; give one value or "
                                            "one per prompt")
                return list(value)
            return [value] * n

        if "stop_ids" in sampling:
            sampling["stop_ids"] = [sampling["stop_ids"]] * n
        cols = {k: (per_prompt(k, v) if k != "stop_ids" else v) for k, v in sampling.items()}
        lengths = per_prompt("max_new_tokens", max_new_tokens)
        return [self.make_request(p, lengths[i], index=i, **{k: v[i] for k, v in cols.items()})
                for i, p in enumerate(prompts)]

    def generate(self, prompts, max_new_tokens=64, **sampling) -> list:
        reqs = self._batch(prompts, max_new_tokens, sampling)
        for _ in self._run(reqs):
            pass
        return [r.text if r.tokenizer is not None else list(r.output) for r in reqs]

    def stream(self, prompts, max_new_tokens=64, **sampling) -> Iterator[tuple[Request, object]]:
        reqs = self._batch(prompts, max_new_tokens, sampling)       # validated before the first token
        return self._stream(reqs)

    def _stream(self, reqs: list[Request]):
        texts = {r.id: IncrementalText(r.tokenizer) for r in reqs if r.tokenizer is not None}
        for req, token in self._run(reqs):
            if req.id not in texts:
                yield req, token
                continue
            piece = texts[req.id].push(token)
            if req.done:
                piece += texts[req.id].flush()
            if piece:
                yield req, piece

    def _run(self, reqs: list[Request]):
        """Queues `reqs`, ticks until they are done, yields their events; cancels what is left if the
        caller stops early or a run fails."""
        mine = {r.id for r in reqs}
        self.enqueue(reqs)
        try:
            while not all(r.done for r in reqs):
                events = self.tick()
                if not events and not self.running and self.waiting:
                    raise CapacityError(f"no slot is free for the waiting requests: all {self.engine.max_sequences} "
                                        "slots hold sequences made with new_sequence()/fork(); release some")
                for req, token in events:
                    if req.id in mine:
                        yield req, token
        finally:
            for r in reqs:
                if not r.done:
                    self.cancel(r)
            if any(not r.done for r in reqs):
                with self.engine.lock:
                    self._apply_cancellations()
