"""snapshot / restore / fork against recompute, in both layouts."""
from __future__ import annotations

import numpy as np
import pytest

from kvcache_infer import InvalidInputError, KVCacheInferencer, Model

from .conftest import ATOL, hf_logits


@pytest.fixture(params=["inplace", "growing"])
def model(request, exported, optimum_dir):
    return Model(exported["tiny-a"] if request.param == "inplace" else optimum_dir)


def test_snapshot_restore_is_bit_exact(model, rng):
    inf = KVCacheInferencer(model, batch_size=2, max_seq_len=64)
    a = rng.integers(0, 1000, size=(2, 30))
    inf.forward(a[:, :20])
    snap = inf.snapshot()
    want = [inf.forward(a[:, t:t + 1]) for t in range(20, 30)]
    before = inf.cache.read(30)
    inf.forward(rng.integers(0, 1000, size=(2, 9)))        # wander off
    inf.restore(snap)
    assert inf.position == 20
    for (k, v), (sk, sv) in zip(inf.cache.read(20), snap.layers):
        assert k.tobytes() == sk.tobytes() and v.tobytes() == sv.tobytes()
    got = [inf.forward(a[:, t:t + 1]) for t in range(20, 30)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for (k, v), (bk, bv) in zip(inf.cache.read(30), before):
        np.testing.assert_array_equal(k, bk)
    other = KVCacheInferencer(model, batch_size=2, max_seq_len=64)   # restore into another inferencer
    other.restore(snap)
    np.testing.assert_array_equal(other.forward(a[:, 20:21]), want[0])


def test_restore_rejects_foreign_snapshots_and_changes_nothing(model, exported, rng):
    inf = KVCacheInferencer(model, batch_size=2, max_seq_len=64)
    inf.forward(rng.integers(0, 1000, size=(2, 5)))
    snap = inf.snapshot()
    before = inf.cache.read(5)
    small = KVCacheInferencer(model, batch_size=2, max_seq_len=4)
    with pytest.raises(InvalidInputError, match="capacity is 4"):
        small.restore(snap)
    with pytest.raises(InvalidInputError, match="batch"):
        KVCacheInferencer(model, batch_size=3, max_seq_len=64).restore(snap)
    bad = type(snap)(snap.position, tuple((k.astype(np.float16), v) for k, v in snap.layers), "float16", 2)
    with pytest.raises(InvalidInputError, match="float16, this cache is float32"):
        inf.restore(bad)
    with pytest.raises(InvalidInputError, match="layers"):
        KVCacheInferencer(exported["tiny-b"], batch_size=2).restore(snap)
    with pytest.raises(InvalidInputError, match="CacheSnapshot"):
        inf.restore({"position": 5})
    assert inf.position == 5
    for (k, v), (bk, bv) in zip(inf.cache.read(5), before):
        np.testing.assert_array_equal(k, bk)
    with pytest.raises(ValueError):
        snap.layers[0][0][0, 0, 0, 0] = 1.0                    # snapshots are read-only


def test_fork_then_rows_continue_the_prefix_differently(model, hf_models, rng):
    """The tree-search case: one prefix, forked into every slot, each slot continues its own way."""
    B = 4
    prefix = rng.integers(0, 1000, size=30)
    branches = rng.integers(0, 1000, size=(B, 12))
    inf = KVCacheInferencer(model, batch_size=B, max_seq_len=64)
    junk = rng.integers(0, 1000, size=(B, 30))
    junk[1] = prefix                                           # row 1 holds the prefix, the rest junk
    inf.forward(junk)
    inf.fork(src=1)
    got = [inf.forward(branches[:, :3])] + [inf.forward(branches[:, t:t + 1]) for t in range(3, 12)]
    full = np.concatenate([np.tile(prefix, (B, 1)), branches], axis=1)
    ref = hf_logits(hf_models["tiny-a"], full)
    np.testing.assert_allclose(got[0], ref[:, 32], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.stack(got[1:], 1), ref[:, 33:], atol=ATOL, rtol=0)


def test_fork_to_chosen_rows_and_bad_rows(model, rng):
    inf = KVCacheInferencer(model, batch_size=3, max_seq_len=32)
    t = rng.integers(0, 1000, size=(3, 8))
    inf.forward(t)
    before = inf.cache.read(8)
    inf.fork(0, [2])
    after = inf.cache.read(8)
    for (k, _), (bk, _) in zip(after, before):
        np.testing.assert_array_equal(k[2], bk[0])
        np.testing.assert_array_equal(k[1], bk[1])
    for bad in (dict(src=3), dict(src=0, dst=[5]), dict(src=-1), dict(src=0, dst=[1.0])):
        with pytest.raises(InvalidInputError, match="fork"):
            inf.fork(**bad)
