"""One Model, many sequences: threads, shared weights, and one inferencer entered twice."""
from __future__ import annotations

import gc
import threading

import numpy as np
import psutil

from kvcache_infer import ConcurrentUseError, KVCacheInferencer, Model


def _decode(inf, tokens):
    out = [inf.forward(tokens[:10])]
    out += [inf.forward(tokens[t:t + 1]) for t in range(10, len(tokens))]
    return np.stack(out)


def test_inferencers_in_threads_run_concurrently_and_stay_correct(exported, rng):
    model = Model(exported["tiny-a"])
    seqs = [rng.integers(0, 1000, size=80) for _ in range(6)]
    want = [_decode(KVCacheInferencer(model), s) for s in seqs]
    got, errors = [None] * len(seqs), []
    barrier = threading.Barrier(len(seqs))

    def work(i):
        try:
            inf = KVCacheInferencer(model)
            barrier.wait()
            for _ in range(3):                       # several passes, resets in between
                inf.reset_cache()
                got[i] = _decode(inf, seqs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def _layer0_keys(hf, tokens: np.ndarray, position: int) -> np.ndarray:
    """Layer 0's K row for each token at `position` (it depends on nothing else): [n, H*D]."""
    import torch
    t = hf.transformer
    with torch.no_grad():
        x = t.wte.weight[torch.from_numpy(tokens)] + t.wpe.weight[position]
        qkv = t.h[0].attn.c_attn(t.h[0].ln_1(x))
    E = hf.config.n_embd
    return qkv[:, E:2 * E].numpy()


def test_one_inferencer_from_two_threads_is_refused_never_corrupted(exported, hf_models):
    """Two threads hammer one inferencer: every call either runs alone or gets ConcurrentUseError,
    and the cache ends up exactly as a single-threaded run of the accepted calls in the order they
    ran (the order is read back from the cache: layer 0's K row identifies each token)."""
    model = Model(exported["tiny-a"])
    inf = KVCacheInferencer(model, max_seq_len=128)
    inf.forward([7, 8])
    accepted, refused, other = [], [], []
    lock = threading.Lock()

    def hammer(seed):
        r = np.random.default_rng(seed)
        while inf.position < 120:
            tok = int(r.integers(0, 1000))
            try:
                logits = inf.forward([tok])
                with lock:
                    accepted.append((tok, logits))
            except ConcurrentUseError:
                refused.append(tok)
            except Exception as e:  # noqa: BLE001
                other.append(e)
                return

    threads = [threading.Thread(target=hammer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not other, other
    n = inf.position
    assert n == 2 + len(accepted) and n >= 120
    assert refused, "the threads never overlapped: nothing was tested"
    cache = inf.cache.read(n)
    B, H, _, D = cache[0][0].shape
    candidates = np.array(sorted({tok for tok, _ in accepted}))
    held = [7, 8]
    for p in range(2, n):                            # which token sits at each row
        row = cache[0][0][0, :, p, :].reshape(H * D)
        held.append(int(candidates[np.abs(_layer0_keys(hf_models["tiny-a"], candidates, p) - row).max(1).argmin()]))
    assert sorted(held[2:]) == sorted(tok for tok, _ in accepted)
    fresh = KVCacheInferencer(model, max_seq_len=128)
    fresh.forward(held[:2])
    ref = {p: fresh.forward([held[p]]) for p in range(2, n)}
    for (k, v), (fk, fv) in zip(cache, fresh.cache.read(n)):
        np.testing.assert_allclose(k, fk, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v, fv, atol=1e-5, rtol=0)
    for tok, logits in accepted:                     # each caller got the logits of its own position
        assert any(np.abs(ref[p] - logits).max() < 1e-5 for p in range(2, n) if held[p] == tok)


def test_weights_shared_rss_grows_by_the_caches_only(exported):
    """8 inferencers on one Model: resident memory grows by their caches, not by the weights."""
    model = Model(exported["tiny-a"])
    proc = psutil.Process()
    first = KVCacheInferencer(model, batch_size=64, max_seq_len=128)
    first.forward(np.zeros((64, 1), np.int64))      # warm ORT's arena once
    gc.collect()
    before = proc.memory_info().rss
    infs = []
    for _ in range(8):
        inf = KVCacheInferencer(model, batch_size=64, max_seq_len=128)
        for buf in inf.cache.keys + inf.cache.values:
            buf.host[...] = 0                        # a full cache: every page resident
        inf.forward(np.zeros((64, 1), np.int64))
        infs.append(inf)
    gc.collect()
    growth = proc.memory_info().rss - before
    expected = sum(i.memory_profile().total_cache_bytes + i.memory_profile().io_buffer_bytes for i in infs)
    assert abs(growth - expected) <= 0.10 * expected, f"RSS grew {growth / 2**20:.1f} MiB, caches {expected / 2**20:.1f} MiB"
