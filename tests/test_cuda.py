"""The CUDA path. Skips where ONNX Runtime has no CUDA provider (CI has no GPU)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from export.pipeline import export_model
from kvcache_infer import DeviceError, KVCacheInferencer

from .conftest import ATOL, hf_logits

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDA provider here")


def test_fp32_gqa_model_on_cuda_is_refused_before_any_fallback(exported):
    """Runs everywhere: the refusal comes from the manifest, before ORT is asked for CUDA."""
    with pytest.raises(DeviceError, match="float16/bfloat16 only"):
        KVCacheInferencer(exported["tiny-a"], device="cuda")


@cuda_only
def test_cuda_fp16_logits_match_pytorch_and_buffers_stay_put(hf_models, rng, tmp_path):
    d = export_model(hf_models["tiny-a"], tmp_path / "fp16", source={}, dtype="float16", parity_rtol=2e-2,
                    log=lambda s: None)
    tokens = rng.integers(0, 1000, size=(2, 60))
    ref = hf_logits(hf_models["tiny-a"], tokens)
    inf = KVCacheInferencer(d, device="cuda", batch_size=2)
    assert inf.model.providers[0] == "CUDAExecutionProvider"
    ptrs = inf.cache.data_ptrs()
    got = [inf.forward(tokens[:, :10])] + [inf.forward(tokens[:, t:t + 1]) for t in range(10, 60)]
    np.testing.assert_allclose(np.stack(got, 1), ref[:, 9:], atol=2e-2 * np.abs(ref).max(), rtol=0)
    assert inf.cache.data_ptrs() == ptrs


@cuda_only
def test_cuda_growing_layout_fp32(optimum_dir, hf_models, rng):
    tokens = rng.integers(0, 1000, size=(1, 40))
    ref = hf_logits(hf_models["tiny-a"], tokens)[0]
    inf = KVCacheInferencer(optimum_dir, device="cuda")
    got = [inf.forward(tokens[0, :8])] + [inf.forward(tokens[0, t:t + 1]) for t in range(8, 40)]
    np.testing.assert_allclose(np.stack(got), ref[7:], atol=ATOL, rtol=0)
