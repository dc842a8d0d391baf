"""Generation requests: what was asked (prompt, length, sampling, stop ids), progress and timings."""
from __future__ import annotations

import time

import numpy as np

from ..errors import InvalidInputError
from ..runtime.generation import Sampler
from ..runtime.speculative import Speculation
from .sequence import Sequence


class Request:
    """One generation request: its prompt, sampling, progress and timings (perf_counter seconds)."""

    def __init__(self, req_id: int, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler, stop: frozenset,
                 tokenizer=None, index: int | None = None, speculation: Speculation | None = None):
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
        self.speculation = speculation   # drafts verified in each decode step (None: one token per step)

    @property
    def tokens(self) -> np.ndarray:
        """The prompt and the generated tokens, [L] int64."""
        return np.concatenate([self.prompt, np.asarray(self.output, np.int64)])

    def finish(self, reason: str) -> None:
        self.done, self.finish_reason = True, reason
        if self.speculation is not None:
            self.speculation.close()

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


def per_prompt_arguments(prompts, max_new_tokens, sampling: dict) -> tuple[list, list[dict]]:
    """generate()/stream()'s arguments as (prompts, [keyword arguments of each prompt's request]): a
    value given once applies to every prompt, a list or tuple gives one value per prompt (stop_ids is
    always one list for all)."""
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

    def column(name, value):
        if name == "stop_ids" or not isinstance(value, (list, tuple)):
            return [value] * n
        if len(value) != n:
            raise InvalidInputError(f"{name} has {len(value)} entries for {n} prompts; give one value or one "
                                    "per prompt")
        return list(value)

    cols = {k: column(k, v) for k, v in {"max_new_tokens": max_new_tokens, **sampling}.items()}
    return prompts, [{k: v[i] for k, v in cols.items()} for i in range(n)]
