"""Every GPT2Config option either exports and matches HF's eager attention, or is refused before any work.

Weights at initializer_range 0.2 with randomized biases and LayerNorms, so that a wrong scale,
activation or head shows in the logits (HF's default 0.02 makes near-zero logits that hide it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from export.families.gpt2 import ACTIVATIONS
from export.pipeline import export_model
from kvcache_infer import Engine, KVCacheInferencer

from .conftest import hf_logits

BASE = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=97, n_positions=40, initializer_range=0.2)


def model(**over) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**{**BASE, **over}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return hf


VARIANTS = {f"act={a}": dict(activation_function=a) for a in sorted(ACTIVATIONS)}
VARIANTS.update({
    "scale_attn_weights=False": dict(scale_attn_weights=False),
    "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "both scalings off/inverse": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
    "n_inner=24": dict(n_inner=24),
    "untied lm_head": dict(tie_word_embeddings=False),
    "layer_norm_epsilon=1e-2": dict(layer_norm_epsilon=1e-2),
    "head size 16 (one head)": dict(n_head=1),
    "head size 24": dict(n_embd=48, n_head=2),
    "one layer": dict(n_layer=1),
    "n_positions=8": dict(n_positions=8),
    "add_cross_attention (unused without an encoder)": dict(add_cross_attention=True),
})


@pytest.mark.parametrize("over", list(VARIANTS.values()), ids=list(VARIANTS))
def test_variant_exports_and_matches_hf_eager(over, tmp_path):
    hf = model(**over)
    d = export_model(hf, tmp_path / "m", source={"kind": "test"}, log=lambda s: None)
    P = hf.config.n_positions
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, P)
    want = hf_logits(hf, ids[None])[0]                                      # [P, V], eager attention
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    inf = KVCacheInferencer(d, max_seq_len=P)
    got = [inf.forward(ids[:P // 2])] + [inf.forward(ids[t:t + 1]) for t in range(P // 2, P)]
    np.testing.assert_allclose(np.stack(got), want[P // 2 - 1:], atol=tol, rtol=0)
    eng = Engine(d, max_sequences=2, max_seq_len=P, max_chunk=4)            # ragged runs, chunked prompts
    a, b = eng.new_sequence(), eng.new_sequence()
    out = eng.step({a: ids[:P - 3], b: ids[:5]})
    np.testing.assert_allclose(out[a], want[P - 4], atol=tol, rtol=0)
    np.testing.assert_allclose(out[b], hf_logits(hf, ids[None, :5])[0, -1], atol=tol, rtol=0)


@pytest.mark.parametrize("over,msg", [
    (dict(activation_function="laplace"), "activation_function='laplace'"),
    (dict(activation_function="relu2"), "activation_function='relu2'"),
    (dict(n_embd=20, n_head=3), "not divisible by n_head=3"),
    (dict(n_head=4), "head size n_embd/n_head = 16/4 = 4"),
    (dict(n_head=16), "multiples of 8"),
    (dict(n_embd=12, n_head=4), "= 3"),
])
def test_unsupported_variants_are_refused_before_any_work(over, msg, tmp_path):
    cfg = GPT2Config(**{**BASE, **over})
    from export.families.gpt2 import check_config
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        check_config(cfg)
    assert not (tmp_path / "m").exists()
