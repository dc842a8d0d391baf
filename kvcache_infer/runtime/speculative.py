"""Speculative decoding: proposers that guess a sequence's next tokens, and the rule that accepts them.

A decode step of one sequence on the CPU is bound by reading the weights, so running the sequence's
last token plus k guessed tokens in one run costs little more than running the last token alone.
The target model's output at each of the k + 1 positions then says how many guesses to keep:

    fed:      last  d1  d2  d3          (one run, a logits row / greedy token per position)
    target:    t0   t1  t2  t3          (t_i follows last, d1 .. d_i)
    greedy:   keep d1 .. d_n while d_i == t_(i-1), then add t_n: n + 1 new tokens per run

Sampling keeps the target's distribution exactly: the drafts are deterministic (a proposal is one
token, q = one-hot), so the standard rejection rule reduces to keeping draft d with probability p(d)
(the sampler's probability of d at that position) and, at the first rejection, drawing from p with d
removed (renormalized); after n kept drafts the run's row n gives one more token.

Proposers (one Drafter per sequence, so that a draft model keeps its own cache per sequence):
    PromptLookup   the n-gram that ends the sequence, found earlier in its own tokens: what followed
                   it there (no model; pays when the output copies from the prompt: code edits)
    DraftModel     a smaller export with the same vocabulary, decoding greedily ahead
AdaptiveLength picks k per step from the acceptance measured so far (0: no proposal when it does not
pay, with a probe now and then).
"""
from __future__ import annotations

import abc
import functools
import math
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from .cache import make_cache
from .checks import int_arg
from .generation import Sampler
from .model import Model, shared_model
from .runs import PackedRun


MAX_DRAFTS = 8      # the most tokens one step proposes (AdaptiveLength's max_k)


class Drafter(abc.ABC):
    """Proposes the tokens that follow one sequence."""

    @abc.abstractmethod
    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Up to k int64 tokens guessed to follow `tokens` (the whole sequence so far: prompt and
        generated tokens, [L] int64); may return fewer, or none."""

    def close(self) -> None:
        """Frees what the drafter holds (a draft model's cache)."""

    @property
    def nbytes(self) -> int:
        """Memory the drafter holds (a draft model's cache)."""
        return 0


class Proposer(abc.ABC):
    """Makes a Drafter for each sequence that speculates."""

    name: str = "proposer"

    @abc.abstractmethod
    def drafter(self) -> Drafter: ...

    def check(self, model: Model) -> None:
        """Raises when this proposer cannot serve sequences of `model` (a draft with another vocabulary)."""


class PromptLookup(Proposer, Drafter):
    """Prompt lookup: the longest n-gram (max_ngram .. min_ngram tokens) that ends the sequence and
    occurs earlier in it; proposes the k tokens that followed its latest earlier occurrence that k
    tokens follow (else its earliest). Stateless: every sequence shares this one drafter."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = int_arg("max_ngram", max_ngram)
        self.min_ngram = int_arg("min_ngram", min_ngram, 1, self.max_ngram, f" (max_ngram={self.max_ngram})")

    def drafter(self) -> Drafter:
        return self

    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        tokens = np.asarray(tokens)
        L = len(tokens)
        found = None                                      # (n, ends): the longest n-gram's earlier occurrences
        match = None                                      # match[e - n + 1]: tokens[e-n+1 .. e] == the last n
        for n in range(1, min(self.max_ngram, L - 1) + 1):   # end e in [n - 1, L - 2]: a token follows
            same = tokens[:L - n] == tokens[L - n]        # [L - n] tokens[e - n + 1] == tokens[L - n]
            match = same if match is None else match[1:] & same
            hits = np.flatnonzero(match)
            if not hits.size:
                break
            if n >= self.min_ngram:
                found = (n, hits + n)                     # where the tokens that followed each occurrence start
        if found is None:
            return tokens[:0]
        starts = found[1]
        whole = starts[starts + k <= L]                   # occurrences followed by k tokens: the latest of them
        start = int(whole[-1] if whole.size else starts[0])
        return tokens[start:start + k]

    def __repr__(self) -> str:
        return f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"


class DraftModel(Proposer):
    """A smaller model of the same vocabulary decoding greedily ahead; each sequence gets its own
    one-row cache of the draft (max_seq_len rows)."""

    name = "draft"

    def __init__(self, model: Model | str, max_seq_len: int | None = None, intra_op_threads: int | None = None):
        self.model = shared_model(model, None, intra_op_threads=intra_op_threads)
        m = self.model.manifest
        if m.tokens != "packed" or m.layout != "inplace":
            raise InvalidInputError(f"a draft model must be an export of ours (packed tokens, in-place cache); "
                                    f"{self.model.dir} is not: export it with python -m export")
        self.max_seq_len = m.max_positions if max_seq_len is None else int_arg("max_seq_len", max_seq_len)

    def check(self, model: Model) -> None:
        if model.manifest.vocab_size != self.model.manifest.vocab_size:
            raise InvalidInputError(
                f"the draft model {self.model.dir} has a vocabulary of {self.model.manifest.vocab_size} tokens and "
                f"the target {model.dir} {model.manifest.vocab_size}: a draft must share the target's tokenizer")

    def drafter(self) -> Drafter:
        return _ModelDrafter(self.model, min(self.max_seq_len, self.model.manifest.max_positions))

    def __repr__(self) -> str:
        return f"DraftModel({self.model.dir})"


class _ModelDrafter(Drafter):
    """One sequence's draft cache: it holds a prefix of the sequence's tokens; propose() rewinds it to
    what the sequence still shares (rejected guesses are dropped, O(1)), feeds the rest, decodes k."""

    def __init__(self, model: Model, capacity: int):
        self.capacity = capacity
        self.cache = make_cache(model.manifest, 1, capacity, model.device, model.device_id)
        self.run = PackedRun(model, self.cache, max_chunk=capacity, max_logits=1)
        self.held: list[int] = []

    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        L = len(tokens)
        k = min(k, self.capacity - L)
        if k < 1:
            return tokens[:0]
        n = min(len(self.held), L)
        differ = np.flatnonzero(np.asarray(self.held[:n], np.int64) != tokens[:n])
        shared = min(int(differ[0]) if differ.size else n, L - 1)   # the last token runs again: its output is
                                                                     # the first guess
        self.cache.truncate(shared)
        del self.held[shared:]
        out = np.empty(k, np.int64)
        feed = np.asarray(tokens[shared:], np.int64)[None]
        for i in range(k):
            out[i] = int(self.run.lockstep(feed, greedy=True)[0])
            self.cache.commit(self.cache.lengths + feed.shape[1])
            self.held.extend(int(t) for t in feed[0])
            feed = out[i:i + 1][None]
        return out

    def close(self) -> None:
        self.cache = self.run = None
        self.held = []

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0


class AdaptiveLength:
    """How many tokens to propose next, from the acceptance seen so far (one per sequence).

    rate: a running estimate of the chance that a draft is kept given the one before it was (each
    step: kept drafts are successes, the first rejected one a failure). k is the expected run of kept
    drafts plus one, at most max_k; below min_rate a proposal costs more than it brings, so k is 0
    except for a probe (k = 1) after probe_every steps, which lets the rate recover when the text
    turns copyable; each rejected probe doubles the wait (up to max_wait), a kept one resets it, so
    text that never copies costs a probe every max_wait steps."""

    def __init__(self, max_k: int = MAX_DRAFTS, min_rate: float = 0.3, probe_every: int = 16, decay: float = 0.7,
                 prior: float = 0.6, max_wait: int = 128):
        self.max_k, self.min_rate, self.probe_every, self.decay = max_k, min_rate, probe_every, decay
        self.max_wait = max(max_wait, probe_every)
        self.rate, self._idle, self._wait, self._probing = prior, 0, probe_every, False

    def length(self) -> int:
        self._probing = False
        if self.rate < self.min_rate:
            self._idle += 1
            if self._idle < self._wait:
                return 0
            self._idle, self._probing = 0, True
            return 1
        run = self.rate / (1.0 - self.rate) if self.rate < 1 else float(self.max_k)
        return int(min(self.max_k, max(1, math.ceil(run) + 1)))

    def update(self, proposed: int, kept: int) -> None:
        if proposed:
            trials = kept + (kept < proposed)
            self.rate = self.decay * self.rate + (1 - self.decay) * kept / trials
            if self._probing:
                self._wait = self.probe_every if kept else min(2 * self._wait, self.max_wait)


class SpeculationTotals:
    """An owner's (an inferencer's, an Engine's) record over every sequence that speculated: the counts,
    and the running acceptance a new sequence starts from (slower to move than a sequence's own), so a
    workload whose guesses fail costs probes only, not a fresh start per request."""

    def __init__(self):
        self.acceptance = AdaptiveLength(decay=0.9)
        self.steps = self.drafts = self.kept = 0

    def record(self, proposed: int, kept: int) -> None:
        self.acceptance.update(proposed, kept)
        self.steps, self.drafts, self.kept = self.steps + 1, self.drafts + proposed, self.kept + kept

    def stats(self) -> dict[str, float]:
        """Steps that verified drafts, drafts verified and kept, the share kept, and the tokens such a
        step produced on average (kept drafts + 1)."""
        steps, drafts, kept = self.steps, self.drafts, self.kept
        return {"speculative_steps": steps, "draft_tokens": drafts, "accepted_tokens": kept,
                "acceptance_rate": kept / drafts if drafts else 0.0,
                "tokens_per_speculative_step": (kept + steps) / steps if steps else 0.0}


class Speculation:
    """One sequence's speculation: its drafter and its adaptive length; each verified step is also
    recorded in the owner's totals."""

    def __init__(self, proposer: Proposer, totals: SpeculationTotals):
        self.totals = totals
        self.drafter = proposer.drafter()
        self.length = AdaptiveLength(prior=totals.acceptance.rate)

    def next_length(self, limit: int) -> int:
        """How many tokens to guess in the next step (at most `limit`; 0: decode plainly)."""
        return max(0, min(self.length.length(), limit))

    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Up to k drafts to verify after `tokens` (the whole sequence so far)."""
        return self.drafter.propose(tokens, k)

    def verified(self, proposed: int, kept: int) -> None:
        self.length.update(proposed, kept)
        self.totals.record(proposed, kept)

    def close(self) -> None:
        self.drafter.close()


@functools.lru_cache(maxsize=4)
def _draft(path: str) -> DraftModel:
    """One loaded draft per path: requests naming the same draft share its (immutable) Model."""
    return DraftModel(path)


def proposer_arg(value, what: str = "speculative") -> Proposer | None:
    """A Proposer from what a caller gives: None, a Proposer, "lookup", or "draft:PATH" (a draft export)."""
    if value is None or isinstance(value, Proposer):
        return value
    if value == "lookup":
        return PromptLookup()
    if isinstance(value, str) and value.startswith("draft:") and len(value) > 6:
        return _draft(str(Path(value[6:]).resolve()) if Path(value[6:]).exists() else value[6:])
    raise InvalidInputError(f"{what} must be 'lookup', 'draft:PATH' (an export with the same vocabulary), a "
                            f"Proposer or None; got {value!r}")


def accept(drafts: np.ndarray, targets: np.ndarray, logits: np.ndarray | None, sampler: Sampler) -> list[int]:
    """The new tokens of a verified run: the kept drafts and one token of the target's own.

    drafts: [k] the proposed tokens; targets: [k + 1] the target's greedy token at each position (row i
    follows the last token and drafts[:i]); logits: [k + 1, V] the rows (sampling only; None for greedy)."""
    k = len(drafts)
    if sampler.greedy:
        n = 0
        while n < k and drafts[n] == targets[n]:
            n += 1
        return [int(t) for t in drafts[:n]] + [int(targets[n])]
    out: list[int] = []
    for i in range(k):
        idx, p = sampler.distribution(logits[i])
        d = int(drafts[i])
        hit = idx == d
        if sampler.rng.random() < float(p[hit].sum()):
            out.append(d)
            continue
        if hit.all():                               # p is all on d, yet rejected: cannot happen (u < 1)
            return out + [d]
        rest = p * ~hit
        return out + [sampler.draw(idx, rest / rest.sum())]
    return out + [sampler(logits[k])]
