"""fp16 export: weights and cache in half precision, fp32 logits, on the CPU provider."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.pipeline import export_model
from kvcache_infer import KVCacheInferencer

from .conftest import CONFIGS, hf_logits


@pytest.fixture(scope="module")
def fp16(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    return {name: export_model(hf, root / name, source={}, dtype="float16", parity_rtol=2e-2, log=lambda s: None)
            for name, hf in hf_models.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp16_logits_close_to_pytorch_fp32(name, fp16, hf_models, rng):
    V = CONFIGS[name]["vocab_size"]
    tokens = rng.integers(0, V, size=(2, 60))
    ref = hf_logits(hf_models[name], tokens)
    inf = KVCacheInferencer(fp16[name], batch_size=2)
    got = np.stack([inf.forward(tokens[:, :10])] + [inf.forward(tokens[:, t:t + 1]) for t in range(10, 60)], 1)
    assert got.dtype == np.float32                           # logits leave the graph as fp32
    scale = np.abs(ref).max()
    assert np.abs(got - ref[:, 9:]).max() <= 2e-2 * scale    # the fp16 budget at export
    assert (got.argmax(-1) == ref[:, 9:].argmax(-1)).mean() >= 0.95


def test_fp16_cache_is_half_the_bytes_and_half_precision(fp16, exported):
    a = KVCacheInferencer(exported["tiny-a"], max_seq_len=64)
    b = KVCacheInferencer(fp16["tiny-a"], max_seq_len=64)
    assert b.memory_profile().bytes_per_token * 2 == a.memory_profile().bytes_per_token
    assert b.memory_profile().total_cache_bytes * 2 == a.memory_profile().total_cache_bytes
    assert b.cache.read(0)[0][0].dtype == np.float16
    data = json.loads((fp16["tiny-a"] / "manifest.json").read_text())
    assert (data["dtype"], data["logits_dtype"]) == ("float16", "float32")
    inits = onnx.load(str(fp16["tiny-a"] / "model.onnx")).graph.initializer
    big = [t for t in inits if np.prod(t.dims) > 1000]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)


def test_fp16_one_shot_equals_chunked(fp16, rng):
    tokens = rng.integers(0, 1000, size=40)
    one = KVCacheInferencer(fp16["tiny-a"]).forward(tokens)
    inf = KVCacheInferencer(fp16["tiny-a"])
    for a, b in ((0, 13), (13, 14), (14, 40)):
        got = inf.forward(tokens[a:b])
    np.testing.assert_allclose(got, one, atol=2e-3 * np.abs(one).max(), rtol=0)
