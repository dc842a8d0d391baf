"""The committed default model ("pybytes", installed with the package): golden ids, recompute for 200 tokens."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvcache_infer import KVCacheInferencer, Model

MODEL = Path(__file__).resolve().parents[1] / "kvcache_infer" / "models" / "pybytes"
PROMPT = "    def __repr__(self):\n        return "
GOLDEN = [  # 200 greedy ids for PROMPT from the committed model
    115, 101, 108, 102, 46, 95, 95, 99, 111, 110, 116, 101, 120, 116, 40, 115, 101, 108, 102, 46,
    95, 99, 111, 110, 116, 101, 120, 116, 41, 10, 10, 32, 32, 32, 32, 100, 101, 102, 32, 95,
    95, 95, 99, 111, 110, 116, 101, 120, 116, 95, 95, 40, 115, 101, 108, 102, 41, 58, 10, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
    32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
]


@pytest.fixture(scope="module")
def model():
    return Model(MODEL, intra_op_threads=1)


def test_committed_model_is_small_and_described(model):
    m = model.manifest
    assert (m.vocab_size, m.num_layers, m.max_positions) == (256, 4, 256) and m.next_token
    assert (MODEL / "model.onnx").stat().st_size < 5_000_000
    train = json.loads((MODEL / "training.json").read_text())
    assert train["held_out_loss_nats_per_byte"] < 3.0


def test_greedy_golden_ids(model):
    inf = KVCacheInferencer(model)
    ids = list(PROMPT.encode())
    assert model.tokenizer.encode(PROMPT).ids == ids                 # byte-level: ids are the bytes
    assert inf.generate(ids, 200) == GOLDEN


def test_greedy_200_tokens_equal_recompute_from_scratch(model):
    """Each token from the cache equals the argmax of a fresh, no-cache run over the whole sequence."""
    inc, fresh = KVCacheInferencer(model), KVCacheInferencer(model)
    seq = list(PROMPT.encode())
    got = inc.generate(seq, 200)
    for tok in got:
        fresh.reset_cache()
        assert int(fresh.forward(np.array(seq)).argmax()) == tok
        seq.append(tok)


def test_text_in_text_out(model):
    inf = KVCacheInferencer(model)
    text = inf.generate(PROMPT, 60)
    inf.reset_cache()
    assert text == model.tokenizer.decode(inf.generate(list(PROMPT.encode()), 60))
    inf.reset_cache()
    assert "".join(inf.stream(PROMPT, 60)) == text
