"""truncate / rewind against recompute from scratch, in both layouts."""
from __future__ import annotations

import numpy as np
import pytest

from kvcache_infer import KVCacheInferencer, Model

from .conftest import ATOL, hf_logits


@pytest.fixture(params=["inplace", "growing"])
def model(request, exported, optimum_dir):
    return Model(exported["tiny-a"] if request.param == "inplace" else optimum_dir)


def test_rewind_then_different_continuation_equals_fresh_run(model, hf_models, rng):
    a = rng.integers(0, 1000, size=(2, 50))
    b = rng.integers(0, 1000, size=(2, 20))
    inf = KVCacheInferencer(model, batch_size=2, max_seq_len=80)
    inf.forward(a[:, :30])
    for t in range(30, 50):
        inf.forward(a[:, t:t + 1])
    inf.rewind(15)                                   # back to 35 tokens
    assert inf.position == 35
    new = np.concatenate([a[:, :35], b], axis=1)
    ref = hf_logits(hf_models["tiny-a"], new)
    got = [inf.forward(b[:, :4])] + [inf.forward(b[:, t:t + 1]) for t in range(4, 20)]
    np.testing.assert_allclose(got[0], ref[:, 38], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.stack(got[1:], 1), ref[:, 39:], atol=ATOL, rtol=0)
    fresh = KVCacheInferencer(model, batch_size=2, max_seq_len=80)
    np.testing.assert_allclose(fresh.forward(new), got[-1], atol=1e-5, rtol=0)


def test_truncate_to_zero_and_to_position(model, rng):
    inf = KVCacheInferencer(model, max_seq_len=64)
    tokens = rng.integers(0, 1000, size=20)
    want = inf.forward(tokens)
    inf.truncate(20)                                 # a no-op
    inf.truncate(0)
    np.testing.assert_allclose(inf.forward(tokens), want, atol=1e-5, rtol=0)
    ptrs = inf.cache.data_ptrs()
    for n in range(1, 10):
        inf.rewind(n)
        inf.forward(tokens[20 - n:])
        assert inf.position == 20
    assert inf.cache.data_ptrs() == ptrs
