"""The CUDA path. Skips where ONNX Runtime has no CUDA provider (CI has no GPU)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from kvcache_infer import KVCacheInferencer

from .conftest import ATOL, hf_logits

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDA provider here")


def test_cuda_logits_match_pytorch_and_buffers_stay_put(exported, hf_models, rng):
    tokens = rng.integers(0, 1000, size=(2, 60))
    ref = hf_logits(hf_models["tiny-a"], tokens)
    inf = KVCacheInferencer(exported["tiny-a"], device="cuda", batch_size=2)
    assert inf.model.providers[0] == "CUDAExecutionProvider"
    ptrs = inf.cache.data_ptrs()
    got = [inf.forward(tokens[:, :10])] + [inf.forward(tokens[:, t:t + 1]) for t in range(10, 60)]
    np.testing.assert_allclose(np.stack(got, 1), ref[:, 9:], atol=ATOL, rtol=0)
    assert inf.cache.data_ptrs() == ptrs


def test_cuda_growing_layout(optimum_dir, hf_models, rng):
    tokens = rng.integers(0, 1000, size=(1, 40))
    ref = hf_logits(hf_models["tiny-a"], tokens)[0]
    inf = KVCacheInferencer(optimum_dir, device="cuda")
    got = [inf.forward(tokens[0, :8])] + [inf.forward(tokens[0, t:t + 1]) for t in range(8, 40)]
    np.testing.assert_allclose(np.stack(got), ref[7:], atol=ATOL, rtol=0)
