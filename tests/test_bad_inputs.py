"""Every case of the catalog raises its typed error and leaves the live sequence as it was."""
from __future__ import annotations

import numpy as np
import pytest

from kvcache_infer import KVCacheError

from .bad_inputs import CASES, HAS_CUDA, Env, run_case


@pytest.fixture(scope="module")
def env(exported, tmp_path_factory):
    return Env(exported["tiny-a"], tmp_path_factory.mktemp("scratch"))


def _state(inf):
    return inf.position, [np.concatenate([k.ravel(), v.ravel()]) for k, v in inf.cache.read(inf.position)]


def _same(a, b) -> None:
    """Deep equality of nested lists/tuples/dicts holding arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_catalog_has_at_least_40_distinct_cases():
    assert len({c.what for c in CASES}) == len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input(case, env):
    if case.needs_no_cuda and HAS_CUDA:
        pytest.skip("this machine has CUDA")
    before = _state(env.inf)
    engine_before = env.engine_state()
    e = run_case(case, env)
    assert isinstance(e, case.exc), f"expected {case.exc.__name__}, got {e!r}"
    assert isinstance(e, KVCacheError)
    assert pytest.importorskip("re").search(case.match, str(e)), str(e)
    pos, rows = _state(env.inf)
    assert pos == before[0]
    for a, b in zip(rows, before[1]):
        np.testing.assert_array_equal(a, b)
    _same(env.engine_state(), engine_before)            # every engine sequence, slot and cache byte as before
    env.inf.forward([3])                                # still usable afterwards ...
    env.inf.rewind(1)                                   # ... and back to position 7
