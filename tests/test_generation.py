"""generate / stream: greedy against recompute, sampling, stop ids, text, validation."""
from __future__ import annotations

import numpy as np
import pytest

from kvcache_infer import CapacityError, InvalidInputError, KVCacheInferencer, Model
from kvcache_infer.runtime.generation import Sampler

from .conftest import hf_logits


def _greedy_reference(hf, prompt, n):
    """Recompute from scratch every step (PyTorch, no cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(hf_logits(hf, np.array([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_greedy_generate_equals_recompute(name, exported, hf_models, rng):
    V = hf_models[name].config.vocab_size
    prompt = rng.integers(0, V, size=7).tolist()
    inf = KVCacheInferencer(exported[name])
    got = inf.generate(prompt, 40)
    assert got == _greedy_reference(hf_models[name], prompt, 40)
    assert inf.position == 7 + 40 - 1                      # the last new token is not fed back


def test_in_graph_argmax_equals_host_argmax(exported, rng):
    """The greedy path reads next_token from the graph; forward() + argmax must agree with it."""
    model = Model(exported["tiny-a"])
    assert model.manifest.next_token == "next_token"
    prompt = rng.integers(0, 1000, size=(1, 9))
    a, b = KVCacheInferencer(model), KVCacheInferencer(model)
    fast = a.generate(prompt[0], 30)
    slow, logits = [], b.forward(prompt[0])
    for _ in range(30):
        slow.append(int(logits.argmax()))
        logits = b.forward([slow[-1]])
    assert fast == slow


@pytest.mark.parametrize("layout,B", [("inplace", 2), ("inplace", 3), ("growing", 3)])
def test_next_tokens_is_forward_then_argmax_per_row(layout, B, exported, optimum_dir, rng):
    """Batched greedy steps: next_tokens() == forward().argmax(-1), chunk or single token, on both layouts;
    tiny-a (inplace) picks through its filtered head for 2 rows (MAX_PICK_ROWS) and the logits' ArgMax for 3."""
    path = exported["tiny-a"] if layout == "inplace" else optimum_dir
    fast, slow = KVCacheInferencer(path, batch_size=B), KVCacheInferencer(path, batch_size=B)
    assert fast.model.greedy_pick.filtered == (layout == "inplace")
    ids = rng.integers(0, 1000, size=(B, 5))
    tok, logits = fast.next_tokens(ids), slow.forward(ids)
    for _ in range(20):
        assert tok.dtype == np.int64 and tok.shape == (B,)
        np.testing.assert_array_equal(tok, logits.argmax(-1))
        tok, logits = fast.next_tokens(tok[:, None]), slow.forward(tok[:, None])
    assert fast.position == slow.position == 25
    one = KVCacheInferencer(path)
    assert isinstance(one.next_tokens([1, 2, 3]), int)                  # 1-D in, an int out


def test_next_tokens_rejects_bad_input_and_changes_nothing(exported):
    inf = KVCacheInferencer(exported["tiny-a"], batch_size=2, max_seq_len=8)
    inf.next_tokens(np.zeros((2, 6), np.int64))
    before = inf.snapshot()
    for bad, err in [(np.zeros((3, 1), np.int64), InvalidInputError), (np.full((2, 1), 1000), InvalidInputError),
                     (np.zeros((2, 1), np.float32), InvalidInputError), (np.zeros((2, 3), np.int64), CapacityError)]:
        with pytest.raises(err):
            inf.next_tokens(bad)
        assert inf.position == 6
    after = inf.snapshot()
    assert all(np.array_equal(x, y) for a, b in zip(before.layers, after.layers) for x, y in zip(a, b))


def test_greedy_on_growing_layout_falls_back_to_host_argmax(optimum_dir, exported, rng):
    prompt = rng.integers(0, 1000, size=6)
    assert KVCacheInferencer(optimum_dir).generate(prompt, 25) == KVCacheInferencer(exported["tiny-a"]).generate(prompt, 25)


def test_sampling_is_seeded_and_respects_top_k_and_top_p(exported, rng):
    prompt = rng.integers(0, 1000, size=5)
    inf = KVCacheInferencer(exported["tiny-a"])
    runs = []
    for seed in (1, 1, 2):
        inf.reset_cache()
        runs.append(inf.generate(prompt, 30, temperature=1.0, top_k=50, seed=seed))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    logits = np.array([0.0, 5.0, 4.0, -1.0, 3.0])
    for seed in range(50):                                 # top_k=2: only the two best ever come out
        assert Sampler(1.0, top_k=2, seed=seed)(logits) in (1, 2)
    p = np.exp(logits - logits.max()); p /= p.sum()
    assert p[1] < 0.9 < p[1] + p[2]                         # top_p=0.9 keeps exactly {1, 2}
    assert {Sampler(1.0, top_p=0.9, seed=s)(logits) for s in range(200)} == {1, 2}
    assert Sampler(0.0)(logits) == 1


def test_stop_ids_and_stream(exported, rng):
    prompt = rng.integers(0, 1000, size=5)
    inf = KVCacheInferencer(exported["tiny-a"])
    full = inf.generate(prompt, 30)
    stop = full[10]
    inf.reset_cache()
    got = inf.generate(prompt, 30, stop_ids=[stop])
    assert got == full[:full.index(stop) + 1]
    inf.reset_cache()
    it = inf.stream(prompt, 30)
    assert inf.position == 0                               # nothing runs before iteration
    assert [next(it) for _ in range(5)] == full[:5]


def test_generation_requests_are_validated_before_anything_runs(exported):
    inf = KVCacheInferencer(exported["tiny-a"], max_seq_len=20)
    inf.forward([1, 2, 3])
    for kwargs, exc, msg in [
        (dict(prompt=[1], max_new_tokens=0), InvalidInputError, "max_new_tokens"),
        (dict(prompt=[1], max_new_tokens=5, temperature=-1), InvalidInputError, "temperature"),
        (dict(prompt=[1], max_new_tokens=5, top_k=0), InvalidInputError, "top_k"),
        (dict(prompt=[1], max_new_tokens=5, top_p=1.5), InvalidInputError, "top_p"),
        (dict(prompt=[1], max_new_tokens=5, seed=-3), InvalidInputError, "seed"),
        (dict(prompt=[1], max_new_tokens=5, stop_ids=[5000]), InvalidInputError, "stop_ids"),
        (dict(prompt=[1.5], max_new_tokens=5), InvalidInputError, "integers"),
        (dict(prompt=[1] * 10, max_new_tokens=10), CapacityError, "22 cache rows needed but this inferencer \\(max_seq_len=20\\) holds at most 20"),
        (dict(prompt="text", max_new_tokens=5), InvalidInputError, "tokenizer.json"),
    ]:
        with pytest.raises(exc, match=msg):
            inf.stream(**kwargs)
        assert inf.position == 3
    with pytest.raises(InvalidInputError, match="batch_size=1"):
        KVCacheInferencer(exported["tiny-a"], batch_size=2).generate([1], 3)
