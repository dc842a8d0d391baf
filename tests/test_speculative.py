"""Speculative decoding against plain decoding: greedy tokens identical (inferencer and Engine, every
proposer: prompt lookup, a draft model, proposals wrong at chosen places), sampling's acceptance rule
keeps the sampler's distribution, the cache ends as plain decoding leaves it."""
from __future__ import annotations

import numpy as np
import pytest

from export.pipeline import export_model
from kvcache_infer import Engine, InvalidInputError, KVCacheInferencer, Model
from kvcache_infer.runtime.generation import Sampler
from kvcache_infer.runtime.speculative import AdaptiveLength, Drafter, PromptLookup, Proposer, accept

from .conftest import make_hf


class Corrupted(Proposer, Drafter):
    """Proposes the reference continuation with every `every`-th proposal wrong: partial acceptance
    at every offset of a run."""

    def __init__(self, reference: list[int], prompt_len: int, every: int, vocab: int):
        self.ref, self.p, self.every, self.vocab, self.calls = reference, prompt_len, every, vocab, 0

    def drafter(self):
        return self

    def propose(self, tokens, k):
        self.calls += 1
        done = len(tokens) - self.p
        out = np.array(self.ref[done:done + k], np.int64)
        if out.size and self.calls % self.every:
            j = self.calls % out.size
            out[j] = (out[j] + 1) % self.vocab
        return out


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """tiny-a's shape and vocabulary with other weights (seed 1): a draft that is sometimes right."""
    return export_model(make_hf("tiny-a", seed=1), tmp_path_factory.mktemp("draft") / "d",
                        source={"kind": "test"}, log=lambda s: None)


def _repetitive(rng, V, n=40):
    base = rng.integers(0, V, 8)
    return np.concatenate([base, rng.integers(0, V, 6), base, base[:5]])[:n]


def test_prompt_lookup_proposes_what_followed_the_ngram():
    pl = PromptLookup(max_ngram=3)
    t = np.array([5, 6, 7, 8, 9, 1, 2, 6, 7], np.int64)
    np.testing.assert_array_equal(pl.propose(t, 3), [8, 9, 1])        # "6 7" -> "8 9 1"
    np.testing.assert_array_equal(pl.propose(t, 10), [8, 9, 1, 2, 6, 7])
    assert pl.propose(np.array([1, 2, 3], np.int64), 4).size == 0     # nothing repeats
    t = np.array([1, 2, 9, 9, 1, 2, 8, 8, 8, 1, 2], np.int64)          # "1 2": the latest occurrence with k after it
    np.testing.assert_array_equal(pl.propose(t, 2), [8, 8])
    np.testing.assert_array_equal(pl.propose(t, 5), [8, 8, 8, 1, 2])
    np.testing.assert_array_equal(pl.propose(np.array([1, 2, 9, 1, 2, 7, 1, 2], np.int64), 9),
                                  [9, 1, 2, 7, 1, 2])                   # none has 9 after it: the earliest


def _lookup_reference(tokens: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Prompt lookup written out: the longest n-gram ending the sequence that occurs earlier with a token
    after it; the latest such occurrence followed by k tokens, else the earliest."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        starts = [i + n for i in range(L - n) if tokens[i:i + n] == tokens[L - n:]]
        if starts:
            whole = [s for s in starts if s + k <= L]
            s = whole[-1] if whole else starts[0]
            return tokens[s:s + k]
    return []


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (4, 2), (2, 2), (1, 1), (5, 3)])
def test_prompt_lookup_equals_the_written_out_rule(max_ngram, min_ngram):
    pl, rng = PromptLookup(max_ngram, min_ngram), np.random.default_rng(max_ngram * 10 + min_ngram)
    for _ in range(500):                      # few distinct tokens: many repeats, ties, partial matches
        t = rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(0, 50)))
        k = int(rng.integers(1, 10))
        assert list(pl.propose(t.astype(np.int64), k)) == _lookup_reference(t.tolist(), k, max_ngram, min_ngram)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-wide"])
def test_inferencer_greedy_is_plain_greedy_with_every_proposer(name, exported, draft_dir, rng):
    model = Model(exported[name])
    V = model.manifest.vocab_size
    inf = KVCacheInferencer(model, max_seq_len=model.manifest.max_positions)
    prompt = _repetitive(rng, V)
    plain = inf.generate(prompt, 24)
    pos, rows = inf.position, inf.snapshot()
    proposers = ["lookup", Corrupted(plain, len(prompt), 3, V), Corrupted(plain, len(prompt), 1, V)]
    if name == "tiny-a":
        proposers += [f"draft:{draft_dir}", f"draft:{exported[name]}"]
    for spec in proposers:
        inf.reset_cache()
        assert inf.generate(prompt, 24, speculative=spec) == plain, spec
        assert inf.position == pos                              # as plain decoding leaves it
        for (k, v), (k0, v0) in zip(inf.snapshot().layers, rows.layers):
            np.testing.assert_allclose(k, k0, atol=1e-5, rtol=0)
            np.testing.assert_allclose(v, v0, atol=1e-5, rtol=0)


def test_inferencer_stop_ids_and_early_close(exported, rng):
    inf = KVCacheInferencer(exported["tiny-a"])
    prompt = _repetitive(rng, 1000)
    plain = inf.generate(prompt, 30)
    stop = plain[7]
    inf.reset_cache()
    want = inf.generate(prompt, 30, stop_ids=[stop])
    pos = inf.position
    inf.reset_cache()
    got = inf.generate(prompt, 30, stop_ids=[stop], speculative=Corrupted(plain, len(prompt), 4, 1000))
    assert got == want and inf.position == pos
    inf.reset_cache()
    it = inf.stream(prompt, 30, speculative=Corrupted(plain, len(prompt), 1000, 1000))   # always right
    first = [next(it) for _ in range(3)]
    it.close()                                                  # kept drafts not yet yielded are dropped
    assert first == plain[:3] and inf.position == len(prompt) + 2


def test_engine_greedy_is_plain_greedy_mixed_requests(exported, draft_dir, rng):
    V = 1000
    prompts = [_repetitive(rng, V, n) for n in (12, 30, 40, 21, 9)]
    lengths = [20, 33, 5, 17, 40]
    plain = Engine(exported["tiny-a"], max_sequences=3, max_chunk=16).generate(prompts, lengths)
    for spec in ["lookup", f"draft:{draft_dir}", f"draft:{exported['tiny-a']}"]:    # the last: always right
        eng = Engine(exported["tiny-a"], max_sequences=3, max_chunk=16, speculative=spec)
        mixed = [True, False, True, True, False]               # some requests decode without drafts
        assert eng.generate(prompts, lengths, speculative=mixed) == plain, spec
        s = eng.speculation_stats
        assert s["speculative_steps"] > 0 and s["accepted_tokens"] <= s["draft_tokens"]
        assert eng.stats["draft_tokens"] == s["draft_tokens"]
    assert s["accepted_tokens"] == s["draft_tokens"] > 0 and s["tokens_per_speculative_step"] > 3
    eng = Engine(exported["tiny-a"], max_sequences=3, max_chunk=16)   # per request, no Engine default
    assert eng.generate(prompts, lengths, speculative="lookup") == plain
    stop = plain[1][5]
    want = Engine(exported["tiny-a"], max_sequences=3).generate(prompts, lengths, stop_ids=[stop])
    assert Engine(exported["tiny-a"], max_sequences=3, speculative="lookup").generate(
        prompts, lengths, stop_ids=[stop]) == want


def test_acceptance_rule_keeps_the_sampling_distribution():
    """accept() with a fixed draft: the first new token follows p0, and the second, when the first
    was the draft, follows p1 (the rejection rule with a one-hot proposal)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6)).astype(np.float32) * 1.5
    sampler = Sampler(temperature=0.9, top_k=5, seed=0)
    drafts = np.array([int(np.argsort(logits[0])[-2]), 4], np.int64)   # a likely, then an unlikely token
    N = 40000
    first, second = np.zeros(6), np.zeros(6)
    for _ in range(N):
        out = accept(drafts, None, logits, sampler)
        first[out[0]] += 1
        if out[0] == drafts[0]:
            second[out[1]] += 1

    def probs(row):
        idx, p = sampler.distribution(row)
        full = np.zeros(6)
        full[idx] = p
        return full
    for counts, p in ((first, probs(logits[0])), (second, probs(logits[1]))):
        n = counts.sum()
        assert n > 5000
        sd = np.sqrt(p * (1 - p) / n)
        assert (np.abs(counts / n - p) <= 5 * sd + 1e-9).all(), (counts / n, p)


def test_engine_sampling_with_drafts_runs_and_is_seeded(exported, rng):
    prompts = [_repetitive(rng, 1000, 30)] * 2
    eng = Engine(exported["tiny-a"], max_sequences=2, speculative="lookup")
    a = eng.generate(prompts, 25, temperature=0.8, seed=[1, 2])
    b = Engine(exported["tiny-a"], max_sequences=2, speculative="lookup").generate(prompts, 25, temperature=0.8,
                                                                                    seed=[1, 2])
    assert a == b and all(len(x) == 25 for x in a)


def test_adaptive_length_backs_off_and_probes():
    a = AdaptiveLength()
    ks = []
    for _ in range(60):
        k = a.length()
        ks.append(k)
        a.update(k, 0)                                       # every draft rejected
    assert ks[0] > 1 and ks[-40:].count(0) >= 36 and 1 in ks[-40:]
    c = AdaptiveLength(probe_every=4, max_wait=16)
    ks = []
    for _ in range(200):
        ks.append(c.length())
        c.update(ks[-1], 0)
    probes = [i for i, k in enumerate(ks) if k == 1]
    gaps = [j - i for i, j in zip(probes, probes[1:])]
    assert gaps[0] == 8 and gaps[1] == 16 and set(gaps[2:]) == {16}     # each rejected probe doubles the wait
    while c.length() != 1:
        pass
    c.update(1, 1)                                       # a kept probe: back to a probe every 4 steps at most
    assert any(c.length() for _ in range(4))
    b = AdaptiveLength()
    for _ in range(20):
        k = b.length()
        b.update(k, k)                                       # every draft kept
    assert b.length() == 8


def test_bad_speculative_arguments(exported, tmp_path):
    inf = KVCacheInferencer(exported["tiny-a"])
    with pytest.raises(InvalidInputError, match="'lookup', 'draft:PATH'"):
        inf.generate([1, 2, 3], 5, speculative="ngram")
    with pytest.raises(InvalidInputError, match="vocabulary of 517 tokens"):
        Engine(exported["tiny-a"], speculative=f"draft:{exported['tiny-b']}")
    with pytest.raises(InvalidInputError, match="vocabulary"):
        inf.generate([1, 2, 3], 5, speculative=f"draft:{exported['tiny-b']}")


class Given(Proposer, Drafter):
    """Proposes what `make(reference continuation, k)` returns: guesses of other types and lengths."""

    def __init__(self, reference: list[int], prompt_len: int, make):
        self.ref, self.p, self.make = reference, prompt_len, make

    def drafter(self):
        return self

    def propose(self, tokens, k):
        done = len(tokens) - self.p
        return self.make(self.ref[done:done + 3 * k + 5], k)


def test_guesses_of_other_types_and_too_many_guesses(exported, rng):
    """A proposer's guesses as a list, as uint64 or int32, or more than k of them: the tokens plain
    decoding gives; float guesses are refused before a run, the cache as plain decoding leaves it."""
    inf = KVCacheInferencer(exported["tiny-a"])
    prompt = _repetitive(rng, 1000)
    plain = inf.generate(prompt, 12)
    for make in (lambda r, k: list(r[:k]), lambda r, k: np.array(r[:k], np.uint64),
                 lambda r, k: np.array(r[:k], np.int32), lambda r, k: np.array(r, np.int64)):
        inf.reset_cache()
        assert inf.generate(prompt, 12, speculative=Given(plain, len(prompt), make)) == plain
        assert inf.position == len(prompt) + 11
    inf.reset_cache()
    with pytest.raises(InvalidInputError, match="integer token ids"):
        inf.generate(prompt, 12, speculative=Given(plain, len(prompt), lambda r, k: np.array(r[:k], np.float64)))
    assert inf.position == len(prompt)       # the prompt; the one token yielded is not fed yet, as plain decoding holds it
    assert list(PromptLookup().propose([5, 6, 7, 5, 6], 2)) == [7, 5]     # a list of ids works too


def test_speculation_on_an_optimum_export_equals_plain_greedy(optimum_dir, rng):
    """Graphs of the growing layout (PaddedRun) verify guesses too: [1, n] greedy tokens per run."""
    inf = KVCacheInferencer(optimum_dir)
    prompt = _repetitive(rng, 1000)
    plain = inf.generate(prompt, 16)
    inf.reset_cache()
    assert inf.generate(prompt, 16, speculative=Corrupted(plain, len(prompt), 3, 1000)) == plain


def test_inferencer_sampling_with_drafts_keeps_length_and_position(exported, rng):
    inf = KVCacheInferencer(exported["tiny-a"])
    prompt = _repetitive(rng, 1000)
    plain = inf.generate(prompt, 20)
    for seed in range(3):
        inf.reset_cache()
        got = inf.generate(prompt, 20, temperature=0.8, seed=seed, speculative=Corrupted(plain, len(prompt), 2, 1000))
        assert len(got) == 20 and all(0 <= t < 1000 for t in got)
        assert inf.position == len(prompt) + 19
    assert inf.speculation_stats["speculative_steps"] > 0


def test_speculation_needs_room_for_guesses(exported):
    with pytest.raises(InvalidInputError, match="max_chunk >= 2"):
        Engine(exported["tiny-a"], max_chunk=1, speculative="lookup")
    with pytest.raises(InvalidInputError, match="max_chunk >= 2"):
        Engine(exported["tiny-a"], max_chunk=1).generate([[1, 2, 3]], 4, speculative="lookup")
