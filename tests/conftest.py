"""Tiny GPT-2s with fixed seeds, exported once per test session (ours and Optimum's)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import GPT2Config, GPT2LMHeadModel

from export.pipeline import export_model

# Hypothesis profiles, loaded here so that every test module's @settings (built at import) inherits them.
_checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, suppress_health_check=_checks)
settings.register_profile("nightly", max_examples=500, deadline=None, suppress_health_check=_checks)
settings.load_profile(os.environ.get("KVCACHE_HYPOTHESIS_PROFILE", "ci"))

# Two different shapes, and the graph's optional paths: exact GELU and 1/(layer+1) attention scaling.
CONFIGS = {
    "tiny-a": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128),
    "tiny-b": dict(n_layer=3, n_head=2, n_embd=48, vocab_size=517, n_positions=96,
                   activation_function="gelu", scale_attn_by_inverse_layer_idx=True),
    # weights 10x HF's default scale: logits far apart, so a wrong row or mask cannot hide in near-ties
    "tiny-wide": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64, initializer_range=0.2),
}
# How each export picks greedy tokens: "filter" (export/greedy.py, what GPT-2 small gets by default)
# for two of them, so that every test of next_tokens/generate runs it; tiny-wide keeps the full head.
GREEDY_HEAD = {"tiny-a": "filter", "tiny-b": "filter", "tiny-wide": "argmax"}
ATOL = 1e-4  # fp32 logits vs PyTorch; logits here are O(1), so this is also ~1e-4 relative


def make_hf(name: str, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**CONFIGS[name])).eval()
    # HF's init leaves biases and LayerNorms at 0/1; randomize them so the test covers them too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_models():
    return {name: make_hf(name) for name in CONFIGS}


@pytest.fixture(scope="session")
def exported(hf_models, tmp_path_factory):
    """{config name: model dir} exported by our exporter (parity already checked at export)."""
    root = tmp_path_factory.mktemp("models")
    return {name: export_model(hf, root / name, source={"kind": "test", "config": name},
                              greedy_head=GREEDY_HEAD[name], log=lambda s: None)
            for name, hf in hf_models.items()}


@pytest.fixture(scope="session")
def optimum_dir(hf_models, tmp_path_factory):
    """tiny-a exported by Optimum (text-generation-with-past: the growing layout)."""
    from optimum.exporters.onnx import main_export
    root = tmp_path_factory.mktemp("optimum")
    hf_models["tiny-a"].save_pretrained(root / "hf")
    main_export(str(root / "hf"), str(root / "onnx"), task="text-generation-with-past",
                local_files_only=True, do_validation=False)
    return root / "onnx"


def hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    """PyTorch logits for every position, no cache: [B, T, V]."""
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens, dtype=np.int64))).logits.numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
