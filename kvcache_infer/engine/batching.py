"""Continuous batching over an Engine's sequences: requests in, tokens out.

The Scheduler (scheduler.py) plans each step and holds no reference to anything that runs;
ContinuousBatching.tick() executes its plan with the step primitives an Engine provides (new_sequence,
reuse_prefix, advance, release). Engine inherits this class; nothing here touches the cache directly.
"""
from __future__ import annotations

import abc
import itertools
import threading

import numpy as np

from ..errors import CapacityError, InvalidInputError
from ..runtime.checks import rows_fit
from ..runtime.generation import IncrementalText, Sampler, check_request, encode_prompt
from ..runtime.speculative import Proposer, Speculation, SpeculationTotals, accept, proposer_arg
from ..runtime.manifest import Manifest
from ..runtime.model import Model
from .requests import Request, per_prompt_arguments
from .scheduler import Scheduler
from .sequence import Sequence
from .step_output import StepOutput


class ContinuousBatching(abc.ABC):
    """submit/tick/generate/stream on top of the step primitives below (implemented by Engine)."""

    model: Model
    manifest: Manifest
    max_sequences: int
    max_seq_len: int
    lock: threading.RLock

    def _init_batching(self, *, max_chunk: int, prefill_budget: int, speculative: Proposer | None = None) -> None:
        self.scheduler = Scheduler(max_chunk=max_chunk, prefill_budget=prefill_budget)
        self._request_ids = itertools.count(1)
        self._max_drafts = max_chunk - 1                  # a verified decode is one chunk: last token + drafts
        self.speculative = speculative
        if speculative is not None:
            speculative.check(self.model)
            self._check_room_for_guesses()
        self.speculation = SpeculationTotals()            # over every request so far: new ones start from it

    def _check_room_for_guesses(self) -> None:
        if self._max_drafts < 1:
            raise InvalidInputError("speculative decoding verifies the last token and its guesses as one chunk; "
                                    "this Engine has max_chunk=1: construct it with max_chunk >= 2")

    # -- the step primitives this class drives ---------------------------------------------------
    @abc.abstractmethod
    def new_sequence(self) -> Sequence: ...

    @abc.abstractmethod
    def release(self, seq: Sequence) -> None: ...

    @abc.abstractmethod
    def reuse_prefix(self, seq: Sequence, tokens, keep_last: bool = True) -> int: ...

    @abc.abstractmethod
    def match_length(self, tokens) -> int: ...

    @abc.abstractmethod
    def advance(self, feeds, pick=(), score=()) -> StepOutput: ...

    @abc.abstractmethod
    def truncate(self, seq: Sequence, length: int) -> None: ...

    @abc.abstractmethod
    def check_ids(self, ids, what: str = "ids", seq: Sequence | None = None) -> np.ndarray: ...

    @property
    @abc.abstractmethod
    def live(self) -> list[Sequence]: ...

    # -- requests --------------------------------------------------------------------------------
    def make_request(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, stop_ids=(), index: int | None = None,
                     speculative: Proposer | str | bool | None = True) -> Request:
        """A validated Request, not yet queued (enqueue() queues it). speculative: True (the Engine's
        proposer, if it has one), False/None (none), or "lookup", "draft:PATH", a Proposer."""
        V = self.manifest.vocab_size
        proposer = self.speculative if speculative is True else None if speculative is False else \
            proposer_arg(speculative)
        if proposer is not None and proposer is not self.speculative:
            proposer.check(self.model)
        if proposer is not None:
            self._check_room_for_guesses()
        sampler = Sampler(temperature, top_k, top_p, seed, vocab=V)
        tok, prompt = encode_prompt(self.model, prompt)
        ids = self.check_ids(prompt, "the prompt")
        stop = check_request(max_new_tokens, stop_ids, V)
        rows_fit(ids.size + max_new_tokens - 1, self.max_seq_len, lambda: (    # the last new token is not fed back
            f"{ids.size} prompt tokens + {max_new_tokens} new tokens",
            f"a sequence of this Engine (max_seq_len={self.max_seq_len})", "shorten the prompt or lower max_new_tokens"))
        return Request(next(self._request_ids), ids, int(max_new_tokens), sampler, stop, tok, index,
                       Speculation(proposer, self.speculation) if proposer is not None else None)

    def enqueue(self, requests) -> None:
        """Queues requests made with make_request(); they run in the next ticks."""
        self.scheduler.add(list(requests))

    def submit(self, prompt, max_new_tokens: int = 64, **sampling) -> Request:
        """Queues a request; it runs in the next ticks. sampling: temperature, top_k, top_p, seed, stop_ids."""
        req = self.make_request(prompt, max_new_tokens, **sampling)
        self.enqueue([req])
        return req

    def cancel(self, request: Request) -> None:
        """Stops a submitted request at the next tick; its slot is freed."""
        self.scheduler.cancel(request)

    @property
    def waiting_requests(self) -> int:
        """Requests queued and not yet admitted into a slot."""
        return len(self.scheduler.waiting)

    @property
    def running_requests(self) -> int:
        """Requests admitted into a slot and not yet finished."""
        return len(self.scheduler.running)

    @property
    def busy(self) -> bool:
        """Whether any submitted request is waiting or running."""
        return self.scheduler.busy

    # -- one step --------------------------------------------------------------------------------
    def tick(self) -> list[tuple[Request, int]]:
        """One step over the submitted requests: admits, runs one batched step, samples:
        [(request, new token)] in admission order."""
        sched = self.scheduler
        with self.lock:
            for req in sched.cancelled():
                self.release(req.seq)
            for req in sched.admit(self.max_sequences - len(self.live), self.match_length):
                seq = self.new_sequence()
                sched.started(req, seq, self.reuse_prefix(seq, req.prompt))
            plan = sched.schedule(self._drafts(sched.decoding()))
            if plan is None:
                return []
            out = self.advance({req.seq: ids for req, ids in plan.feeds.items()},
                               score=[req.seq for req in plan.drafts])
            tokens = {req: self._verified(req, plan.drafts[req], out) if req in plan.drafts else
                      [out.next_token(req.seq) if req.sampler.greedy else req.sampler(out.logits(req.seq))]
                      for req in plan.sampling}
            events, finished = sched.update(plan, tokens)
            for req in finished:
                self.release(req.seq)
            return events

    def _drafts(self, decoding: list[Request]) -> dict[Request, np.ndarray]:
        """Guessed tokens for this step's decoding requests that speculate (runtime/speculative.py)."""
        drafts = {}
        for req in decoding:
            if req.speculation is not None:
                k = req.speculation.next_length(min(self._max_drafts, req.max_new_tokens - len(req.output) - 1))
                if k:
                    drafts[req] = req.speculation.propose(req.tokens, k)
        return drafts

    def _verified(self, req: Request, drafts: np.ndarray, out: StepOutput) -> list[int]:
        """The new tokens of a request that verified drafts (runtime/speculative.py: accept); the
        rejected drafts' rows are dropped (O(1))."""
        seq = req.seq
        new = accept(drafts, out.next_tokens(seq), None if req.sampler.greedy else out.logits(seq), req.sampler)
        self.truncate(seq, seq.position - (len(drafts) + 1 - len(new)))
        req.speculation.verified(len(drafts), len(new) - 1)
        return new

    @property
    def speculation_stats(self) -> dict[str, float]:
        """Over every request so far (runtime.speculative.SpeculationTotals.stats)."""
        return self.speculation.stats()

    # -- whole prompts ---------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens=64, **sampling) -> list:
        """Runs every prompt to completion with continuous batching; outputs in prompt order (id lists
        for id prompts, text for text prompts)."""
        reqs = self._requests(prompts, max_new_tokens, sampling)
        for _ in self._run(reqs):
            pass
        return [r.text if r.tokenizer is not None else list(r.output) for r in reqs]

    def stream(self, prompts, max_new_tokens=64, **sampling):
        """Yields (request, token) as tokens are produced (text pieces for text prompts). Every prompt
        is validated before the first token."""
        reqs = self._requests(prompts, max_new_tokens, sampling)
        return self._stream(reqs)

    def _requests(self, prompts, max_new_tokens, sampling) -> list[Request]:
        prompts, kwargs = per_prompt_arguments(prompts, max_new_tokens, sampling)
        return [self.make_request(p, index=i, **kw) for i, (p, kw) in enumerate(zip(prompts, kwargs))]

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
                if not events and not self.scheduler.running and self.scheduler.waiting:
                    raise CapacityError(f"no slot is free for the waiting requests: all {self.max_sequences} "
                                        "slots hold sequences made with new_sequence()/fork(); release some")
                for req, token in events:
                    if req.id in mine:
                        yield req, token
        finally:
            for r in reqs:
                if not r.done:
                    self.cancel(r)
            if any(not r.done for r in reqs):
                with self.lock:
                    for req in self.scheduler.cancelled():
                        self.release(req.seq)
