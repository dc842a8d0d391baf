"""Logits against references: PyTorch, one-shot vs chunked, fresh vs reset, batch vs single rows."""
from __future__ import annotations

import numpy as np
import pytest

from kvcache_infer import KVCacheInferencer, Model

from .conftest import ATOL, CONFIGS, hf_logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prompt_then_many_steps_match_pytorch(name, hf_models, exported, rng):
    hf, V = hf_models[name], CONFIGS[name]["vocab_size"]
    total = CONFIGS[name]["n_positions"]                      # fill the cache to its last row
    tokens = rng.integers(0, V, size=total)
    ref = hf_logits(hf, tokens[None])[0]                      # [T, V]
    inf = KVCacheInferencer(exported[name])
    got = [inf.forward(tokens[:10])]
    for t in range(10, total):
        got.append(inf.forward(tokens[t:t + 1]))
    got = np.stack(got)                                        # [T - 9, V]
    np.testing.assert_allclose(got, ref[9:], atol=ATOL, rtol=0)
    assert inf.position == total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cache_rows_equal_pytorch_past_key_values(name, hf_models, exported, rng):
    """What the graph wrote into our buffers, in place, is PyTorch's K and V."""
    import torch
    hf, V = hf_models[name], CONFIGS[name]["vocab_size"]
    tokens = rng.integers(0, V, size=(1, 30))
    inf = KVCacheInferencer(exported[name], max_seq_len=40)
    inf.forward(tokens[0, :12])
    for t in range(12, 30):
        inf.forward(tokens[0, t:t + 1])
    with torch.no_grad():
        pkv = hf(torch.from_numpy(tokens), use_cache=True).past_key_values
    for i, (k, v) in enumerate(inf.cache.read(inf.position)):
        ref_k, ref_v = (x.numpy() for x in (pkv.layers[i].keys, pkv.layers[i].values)) \
            if hasattr(pkv, "layers") else (pkv[i][0].numpy(), pkv[i][1].numpy())
        # 1/sqrt(D) is folded into the Q weights only, so K and V are PyTorch's unscaled values
        np.testing.assert_allclose(k, ref_k, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v, ref_v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_rows_asked_for_match_pytorch_in_one_ragged_run(name, hf_models, exported, rng):
    """After the last layer's attention only the rows asked for go on (logits_index): every position of
    one row, the last of another and of a third with a cached prefix, in one run, equal PyTorch's."""
    from kvcache_infer.runtime.runs import Chunk
    hf, V = hf_models[name], CONFIGS[name]["vocab_size"]
    a, b, c = (rng.integers(0, V, size=n) for n in (9, 14, 20))
    inf = KVCacheInferencer(exported[name], max_seq_len=48, batch_size=3)
    run = inf.runner
    run.ragged([Chunk(2, c[:12], 0)], rows=3)                 # row 2 holds 12 tokens before the joint run
    logits, nxt, _ = run.ragged([Chunk(0, a, 0, all_logits=True), Chunk(1, b, 0), Chunk(2, c[12:], 12)], rows=3)
    assert logits.shape == (9 + 1 + 1, V)
    np.testing.assert_allclose(logits[:9], hf_logits(hf, a[None])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[9], hf_logits(hf, b[None])[0, -1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[10], hf_logits(hf, c[None])[0, -1], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(nxt, logits.argmax(-1))


@pytest.mark.parametrize("chunks", [[40], [13, 1, 9, 17], [1] * 40, [2, 38]])
def test_chunked_prefill_equals_one_shot(chunks, exported, rng):
    tokens = rng.integers(0, 1000, size=50)
    one = KVCacheInferencer(exported["tiny-a"])
    ref = one.forward(tokens[:40])
    inf = KVCacheInferencer(exported["tiny-a"])
    pos = 0
    for c in chunks:
        got = inf.forward(tokens[pos:pos + c])
        pos += c
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    for t in range(40, 50):                                    # and both continue identically
        np.testing.assert_allclose(inf.forward(tokens[t:t + 1]), one.forward(tokens[t:t + 1]), atol=1e-5, rtol=0)


def test_chunks_of_many_shapes_in_turn_match_pytorch(exported, hf_models, rng):
    """Chunks of 1 .. 13 tokens, then 1 .. 5 again in another order, with a greedy step after
    each: more run shapes than a run keeps bindings for (runs.IO_BINDINGS), so bindings are reused,
    evicted and rebound; every chunk's logits stay PyTorch's, every step's token PyTorch's argmax.
    (Speculative verification's all-position runs of every length: test_speculative.)"""
    from kvcache_infer.runtime.runs import IO_BINDINGS
    lengths = list(range(1, 14)) + [int(n) for n in rng.permutation(np.arange(1, 6))]   # 104 + 20 tokens
    assert len(set(lengths)) + 1 > IO_BINDINGS
    tokens = rng.integers(0, 1000, size=sum(lengths) + len(lengths))
    ref = hf_logits(hf_models["tiny-a"], tokens[None])[0]                     # [T, V]
    inf = KVCacheInferencer(exported["tiny-a"], max_seq_len=len(tokens))
    pos = 0
    for n in lengths:
        np.testing.assert_allclose(inf.forward(tokens[pos:pos + n]), ref[pos + n - 1], atol=ATOL, rtol=0)
        assert inf.next_tokens(tokens[pos + n:pos + n + 1]) == ref[pos + n].argmax()
        pos += n + 1


@pytest.mark.parametrize("prefill_chunk", [1, 7, 16, 39])
def test_prefill_chunk_runs_equal_one_run(prefill_chunk, exported, hf_models, rng):
    """A prompt longer than prefill_chunk runs as several runs: same logits (PyTorch's), same next
    greedy token, same cache rows as one run."""
    tokens = rng.integers(0, 1000, size=(2, 40))
    one = KVCacheInferencer(exported["tiny-a"], prefill_chunk=40)
    inf = KVCacheInferencer(exported["tiny-a"], prefill_chunk=prefill_chunk)
    np.testing.assert_allclose(inf.forward(tokens[0]), hf_logits(hf_models["tiny-a"], tokens[:1])[0, -1],
                               atol=ATOL, rtol=0)
    assert inf.position == 40
    one.forward(tokens[0])
    for (k, v), (k1, v1) in zip(inf.cache.read(40), one.cache.read(40)):
        np.testing.assert_allclose(k, k1, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v, v1, atol=1e-5, rtol=0)
    inf.reset_cache(); one.reset_cache()
    assert inf.next_tokens(tokens[1]) == one.next_tokens(tokens[1])


def test_reset_then_same_prompt_equals_fresh(exported, rng):
    a, b = rng.integers(0, 1000, size=60), rng.integers(0, 1000, size=25)
    inf = KVCacheInferencer(exported["tiny-a"])
    inf.forward(a[:50])
    for t in range(50, 60):
        inf.forward(a[t:t + 1])
    inf.reset_cache()
    assert inf.position == 0
    # Poison every row the old sequence wrote: a reset must not read any of them.
    for buf in inf.cache.keys + inf.cache.values:
        buf.host[...] = np.nan
    fresh = KVCacheInferencer(exported["tiny-a"])
    np.testing.assert_array_equal(inf.forward(b[:20]), fresh.forward(b[:20]))
    for t in range(20, 25):
        np.testing.assert_array_equal(inf.forward(b[t:t + 1]), fresh.forward(b[t:t + 1]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_rows_equal_each_row_alone(name, exported, rng):
    V, B = CONFIGS[name]["vocab_size"], 3
    tokens = rng.integers(0, V, size=(B, 40))
    model = Model(exported[name])
    batch = KVCacheInferencer(model, batch_size=B)
    # prompt chunk, a multi-token chunk after a non-empty cache, then single steps
    got = [batch.forward(tokens[:, :12]), batch.forward(tokens[:, 12:20])]
    got += [batch.forward(tokens[:, t:t + 1]) for t in range(20, 40)]
    for r in range(B):
        single = KVCacheInferencer(model)
        want = [single.forward(tokens[r, :12]), single.forward(tokens[r, 12:20])]
        want += [single.forward(tokens[r, t:t + 1]) for t in range(20, 40)]
        np.testing.assert_allclose(np.stack([g[r] for g in got]), np.stack(want), atol=1e-5, rtol=0)


def test_optimum_growing_layout_matches_pytorch(optimum_dir, hf_models, rng):
    tokens = rng.integers(0, 1000, size=(2, 70))
    ref = hf_logits(hf_models["tiny-a"], tokens)
    inf = KVCacheInferencer(optimum_dir, batch_size=2, max_seq_len=80)
    assert inf.manifest.layout == "growing"
    ptrs = inf.cache.data_ptrs()
    got = [inf.forward(tokens[:, :9]), inf.forward(tokens[:, 9:15])]
    got += [inf.forward(tokens[:, t:t + 1]) for t in range(15, 70)]
    np.testing.assert_allclose(got[0], ref[:, 8], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.stack(got[1:], axis=1), ref[:, 14:], atol=ATOL, rtol=0)
    assert inf.cache.data_ptrs() == ptrs
    inf.reset_cache()
    np.testing.assert_allclose(inf.forward(tokens[:, :30]), ref[:, 29], atol=ATOL, rtol=0)


def test_growing_and_inplace_layouts_agree(optimum_dir, exported, rng):
    tokens = rng.integers(0, 1000, size=40)
    a, b = KVCacheInferencer(optimum_dir), KVCacheInferencer(exported["tiny-a"])
    np.testing.assert_allclose(a.forward(tokens[:16]), b.forward(tokens[:16]), atol=ATOL, rtol=0)
    for t in range(16, 40):
        np.testing.assert_allclose(a.forward(tokens[t:t + 1]), b.forward(tokens[t:t + 1]), atol=ATOL, rtol=0)
