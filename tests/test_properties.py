"""Property-based tests (hypothesis).

    CI: 50 examples per property.  Nightly: KVCACHE_HYPOTHESIS_PROFILE=nightly (500 examples). The
    profiles are loaded in conftest.py, before any test module builds its settings.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvcache_infer import KVCacheError, KVCacheInferencer, Model

from .conftest import hf_logits

CAP, V = 48, 1000
token = st.integers(0, V - 1)
op = st.one_of(
    st.tuples(st.just("chunk"), st.lists(token, min_size=2, max_size=12)),
    st.tuples(st.just("step"), token),
    st.tuples(st.just("rewind"), st.integers(0, 12)),
    st.tuples(st.just("reset"), st.none()),
)


@pytest.fixture(scope="module", params=["inplace", "growing"])
def inf(request, exported, optimum_dir):
    path = exported["tiny-a"] if request.param == "inplace" else optimum_dir
    return KVCacheInferencer(Model(path), max_seq_len=CAP)


@given(ops=st.lists(op, min_size=1, max_size=14))
def test_any_mix_of_chunks_steps_rewinds_resets_equals_recompute(ops, inf, hf_models):
    """After every forward, the logits equal PyTorch on the whole sequence held so far."""
    hf = hf_models["tiny-a"]
    inf.reset_cache()
    held: list[int] = []
    for kind, arg in ops:
        if kind == "reset":
            inf.reset_cache(); held = []
            continue
        if kind == "rewind":
            n = min(arg, len(held))
            inf.rewind(n); held = held[:len(held) - n]
            continue
        new = arg if kind == "chunk" else [arg]
        if len(held) + len(new) > CAP:
            continue
        got = inf.forward(new)
        held += new
        assert inf.position == len(held)
        want = hf_logits(hf, np.array([held]))[0, -1]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


garbage = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.binary(max_size=5),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=2), st.none()), max_size=6),
    st.lists(st.lists(st.integers(-5, 2 * V), max_size=4), max_size=4),
    hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.float64, np.bool_, np.int16]),
               hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
               elements=st.integers(0, 1)),
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=60), elements=st.integers(-10, 2 * V)),
)


@given(x=garbage)
def test_garbage_never_crashes_and_never_changes_state_unless_valid(x, inf):
    """Either a typed KVCacheError and nothing changed, or a valid input and position += n."""
    inf.reset_cache()
    inf.forward([1, 2, 3])
    before = [np.concatenate([k.ravel(), v.ravel()]) for k, v in inf.cache.read(3)]
    try:
        inf.forward(x)
    except KVCacheError:
        assert inf.position == 3
        after = [np.concatenate([k.ravel(), v.ravel()]) for k, v in inf.cache.read(3)]
        for a, b in zip(after, before):
            np.testing.assert_array_equal(a, b)
        return
    a = np.asarray(x)
    assert a.dtype.kind in "iu" and a.ndim in (1, 2) and a.size and 0 <= a.min() and a.max() < V
    assert inf.position == 3 + a.shape[-1]
