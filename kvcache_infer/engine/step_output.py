"""What one Engine.advance() produced: per sequence, its logits rows and greedy next tokens."""
from __future__ import annotations

import numpy as np

from ..errors import KVCacheError
from .sequence import Sequence, TreeSequence


class StepOutput:
    """What one Engine.advance() produced: per sequence, its logits rows and greedy next tokens (for a
    sequence advanced with pick: its greedy next token only). Views into reused buffers, valid until
    the engine's next run; copy what you keep."""

    def __init__(self, logits: np.ndarray, tokens: np.ndarray, rows: dict[Sequence, slice],
                 picks: dict[Sequence, int] | None = None, scored=frozenset()):
        self._logits, self._tokens, self._rows, self._picks = logits, tokens, rows, picks or {}
        self._scored = scored

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._rows or seq in self._picks

    def __iter__(self):
        return iter([*self._rows, *self._picks])

    def logits(self, seq: Sequence) -> np.ndarray:
        """float32 [V] for a Sequence (its last new token), [n, V] for a TreeSequence (each new node) and
        for a Sequence advanced with score (each new token)."""
        if seq in self._picks:
            raise KVCacheError("this sequence was advanced with pick (its greedy next token only): it has no "
                               "logits row; advance it without pick to get logits")
        rows = self._logits[self._rows[seq]]
        return rows if isinstance(seq, TreeSequence) or seq in self._scored else rows[0]

    def next_token(self, seq: Sequence) -> int:
        """The greedy next token of a Sequence (the graph's ArgMax or, with pick, its filtered exact
        pick: no logits row is read)."""
        if seq in self._picks:
            return self._picks[seq]
        return int(self._tokens[self._rows[seq]][-1])

    def next_tokens(self, seq: Sequence) -> np.ndarray:
        """The greedy next token of each new token's row ([1] for a Sequence)."""
        if seq in self._picks:
            return np.array([self._picks[seq]], np.int64)
        return self._tokens[self._rows[seq]]


def joined(pieces: dict[Sequence, list[tuple[np.ndarray, np.ndarray]]], picks: dict[Sequence, int],
           vocab: int, scored=frozenset()) -> StepOutput:
    """One StepOutput from a step that took several runs: each sequence's (logits, tokens) rows kept
    from each run, in order (copies: a run reuses its output buffers)."""
    order = list(pieces)
    sizes = [sum(len(t) for _, t in pieces[s]) for s in order]
    ends = np.cumsum(sizes)
    logits = [lg for s in order for lg, _ in pieces[s]] or [np.zeros((0, vocab), np.float32)]
    tokens = [t for s in order for _, t in pieces[s]] or [np.zeros(0, np.int64)]
    rows = {s: slice(int(e - k), int(e)) for s, k, e in zip(order, sizes, ends)}
    return StepOutput(np.concatenate(logits), np.concatenate(tokens), rows, picks, scored)
