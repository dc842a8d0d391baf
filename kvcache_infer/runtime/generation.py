"""Token generation on top of an inferencer: sampling, the decode loop, text through a tokenizer."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ..errors import InvalidInputError
from .checks import int_arg, number_arg


class Sampler:
    """Picks the next token from a logits row. temperature 0: greedy (argmax). Otherwise softmax of
    logits / temperature, restricted to the top_k tokens, then to the smallest set whose probability
    reaches top_p; seeded (numpy's PCG64) so that a seed repeats its tokens."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, vocab: int | None = None):
        temperature = number_arg("temperature (0: greedy)", temperature, 0)
        top_k = None if top_k is None else int_arg("top_k", top_k, hint=" or None")
        top_p = None if top_p is None else number_arg("top_p", top_p, 0, 1, open_low=True)
        seed = None if seed is None else int_arg("seed", seed, 0, hint=" or None")
        self.temperature, self.top_p = temperature, top_p
        self.top_k = None if top_k is None or (vocab and top_k >= vocab) else int(top_k)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(logits.argmax())
        return self.draw(*self.distribution(logits))

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [n], their probabilities [n] float64, summing to 1): the tokens this sampler can
        draw from a logits row (temperature > 0)."""
        x = logits.astype(np.float64) / self.temperature
        idx = np.argpartition(-x, self.top_k - 1)[: self.top_k] if self.top_k else np.arange(x.size)
        p = np.exp(x[idx] - x[idx].max())
        p /= p.sum()
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            idx, p = idx[keep], p[keep] / p[keep].sum()
        return idx, p

    def draw(self, idx: np.ndarray, p: np.ndarray) -> int:
        """One token of idx with probabilities p (one uniform draw of this sampler's generator)."""
        return int(idx[min(int(np.searchsorted(np.cumsum(p), self.rng.random(), side="right")), idx.size - 1)])


def check_request(max_new_tokens, stop_ids, vocab: int) -> frozenset:
    """Validates a generation request's length and stop ids before anything runs; returns the stop set."""
    int_arg("max_new_tokens", max_new_tokens)
    try:
        stop = frozenset(int(s) for s in (stop_ids or ()))
    except (TypeError, ValueError):
        raise InvalidInputError(f"stop_ids must be an iterable of token ids, got {stop_ids!r}") from None
    if any(not 0 <= s < vocab for s in stop):
        raise InvalidInputError(f"stop_ids must be in [0, {vocab}), got {sorted(stop)}")
    return stop


def encode_prompt(model, prompt):
    """(tokenizer or None, ids): a text prompt goes through the model's tokenizer.json; ids pass as given."""
    if not isinstance(prompt, str):
        return None, prompt
    tok = model.tokenizer
    if tok is None:
        raise InvalidInputError(f"a text prompt needs a tokenizer.json in {model.dir}; this model has none: "
                                "pass token ids")
    return tok, tok.encode(prompt).ids


def decode(step: Callable[[np.ndarray], int], prompt: np.ndarray, max_new_tokens: int,
           stop: frozenset) -> Iterator[int]:
    """Feeds the prompt through `step` (ids [n] -> next token), then yields new tokens one by one,
    each fed back before the next; stops after max_new_tokens or a stop id (yielded)."""
    nxt = int(step(prompt))
    for i in range(max_new_tokens):
        yield nxt
        if nxt in stop or i + 1 == max_new_tokens:
            return
        nxt = int(step(np.array([nxt], dtype=np.int64)))


class IncrementalText:
    """Token ids in, text pieces out: holds back text that ends in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[len(self.sent):], text
        return piece


def stream_text(tokenizer, ids_iter: Iterator[int]) -> Iterator[str]:
    """Decodes incrementally; holds back text that ends in an incomplete UTF-8 sequence."""
    text = IncrementalText(tokenizer)
    for tok in ids_iter:
        piece = text.push(tok)
        if piece:
            yield piece
    piece = text.flush()
    if piece:
        yield piece
