"""Failures inside a call (ORT errors, KeyboardInterrupt) leave the sequence exactly as it was.
Caller mistakes are in the catalog (bad_inputs.py / test_bad_inputs.py)."""
from __future__ import annotations

import numpy as np
import pytest

from kvcache_infer import CapacityError, InferenceError, KVCacheInferencer, Model


def _state(inf):
    return inf.position, [np.concatenate([k.ravel(), v.ravel()]) for k, v in inf.cache.read(inf.position)]


def _assert_unchanged(inf, before):
    pos, rows = _state(inf)
    assert pos == before[0]
    for a, b in zip(rows, before[1]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(params=["inplace", "growing"])
def model(request, exported, optimum_dir):
    return Model(exported["tiny-a"] if request.param == "inplace" else optimum_dir)


@pytest.mark.parametrize("exc", [RuntimeError("simulated ORT failure"), KeyboardInterrupt()])
@pytest.mark.parametrize("when", ["before", "after"])
def test_failure_inside_run_leaves_cache_unchanged(model, exc, when, rng, monkeypatch):
    """The run fails before writing, or after the graph really wrote the new rows: either way the
    position and rows [0, position) are as they were, and decoding continues correctly."""
    inf, ref = KVCacheInferencer(model, max_seq_len=40), KVCacheInferencer(model, max_seq_len=40)
    tokens = rng.integers(0, 1000, size=30)
    inf.forward(tokens[:20]); ref.forward(tokens[:20])
    before = _state(inf)
    real_run = model.session.run_with_iobinding

    def failing_run(io, *a, **k):
        if when == "after":
            real_run(io, *a, **k)
        raise exc

    monkeypatch.setattr(model.session, "run_with_iobinding", failing_run)
    for wrong in (rng.integers(0, 1000, size=5), rng.integers(0, 1000, size=1)):
        with pytest.raises(InferenceError if isinstance(exc, Exception) else KeyboardInterrupt):
            inf.forward(wrong)
        _assert_unchanged(inf, before)
    monkeypatch.undo()
    np.testing.assert_array_equal(inf.forward(tokens[20:25]), ref.forward(tokens[20:25]))
    np.testing.assert_array_equal(inf.forward(tokens[25:26]), ref.forward(tokens[25:26]))


@pytest.mark.parametrize("exc", [RuntimeError("simulated ORT failure"), KeyboardInterrupt()])
def test_failure_in_a_later_prefill_chunk_leaves_cache_unchanged(exported, exc, rng, monkeypatch):
    """A prompt running as several runs (prefill_chunk) fails in its third run: the rows the first two
    wrote are dropped, the position is where it was, and the sequence continues as if nothing ran."""
    model = Model(exported["tiny-a"])
    inf = KVCacheInferencer(model, max_seq_len=60, prefill_chunk=8)
    ref = KVCacheInferencer(model, max_seq_len=60, prefill_chunk=8)
    tokens = rng.integers(0, 1000, size=50)
    inf.forward(tokens[:10]); ref.forward(tokens[:10])
    before = _state(inf)
    real_run, calls = model.session.run_with_iobinding, []

    def failing_run(io, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        real_run(io, *a, **k)

    monkeypatch.setattr(model.session, "run_with_iobinding", failing_run)
    with pytest.raises(InferenceError if isinstance(exc, Exception) else KeyboardInterrupt):
        inf.forward(rng.integers(0, 1000, size=30))
    assert len(calls) == 3
    _assert_unchanged(inf, before)
    monkeypatch.undo()
    np.testing.assert_array_equal(inf.forward(tokens[10:40]), ref.forward(tokens[10:40]))


def test_inference_error_message(exported, monkeypatch):
    model = Model(exported["tiny-a"])
    inf = KVCacheInferencer(model)
    monkeypatch.setattr(model.session, "run_with_iobinding", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("boom")))
    with pytest.raises(InferenceError, match=r"failed running 3 token\(s\) at position 0: boom; the cache and "
                                             r"position are unchanged"):
        inf.forward([1, 2, 3])


def test_capacity_is_usable_to_the_last_row(exported, rng):
    inf = KVCacheInferencer(exported["tiny-a"], max_seq_len=16)
    inf.forward(rng.integers(0, 1000, size=14))
    inf.forward([1]); inf.forward([2])
    assert inf.position == 16
    with pytest.raises(CapacityError):
        inf.forward([3])
    inf.rewind(1)
    inf.forward([3])
    assert inf.position == 16
