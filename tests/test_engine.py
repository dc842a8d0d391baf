"""Engine: every sequence's logits equal PyTorch's recompute of its tokens, whatever else shares the cache.

Reference: GPT2LMHeadModel (eager attention) on each sequence's whole token list, no cache. The
model is tiny-wide (weights at 10x HF's default scale), so logits are far apart and a wrong row,
position, mask or slot shows.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_infer import Engine, InvalidInputError, KVCacheInferencer, ModelFormatError, Nodes

from .conftest import hf_logits

NAME, V, TOL = "tiny-wide", 300, 2e-4


@pytest.fixture(scope="module")
def hf(hf_models):
    return hf_models[NAME]


@pytest.fixture(scope="module")
def path(exported):
    return exported[NAME]


def ref_last(hf, tokens) -> np.ndarray:
    return hf_logits(hf, np.asarray([tokens]))[0, -1]


def close(got, want):
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, float(np.abs(want).max())), rtol=0)


def test_one_run_with_a_prompt_a_decode_and_a_fork(hf, path, rng):
    eng = Engine(path, max_sequences=4, max_seq_len=64)
    a, b = eng.new_sequence(), eng.new_sequence()
    pa = rng.integers(0, V, 20).tolist()
    runs = eng.stats["runs"]
    out = eng.step({a: pa, b: [42]})
    assert eng.stats["runs"] == runs + 1                       # one batched run
    assert out[a].shape == (V,) and out[a].dtype == np.float32
    close(out[a], ref_last(hf, pa))
    close(out[b], ref_last(hf, [42]))
    c = eng.fork(a)
    assert c.tokens == a.tokens and c.position == 20
    out = eng.step([(a, [1, 2]), (c, [3]), (b, [7, 8, 9])])
    close(out[a], ref_last(hf, pa + [1, 2]))
    close(out[c], ref_last(hf, pa + [3]))
    close(out[b], ref_last(hf, [42, 7, 8, 9]))
    assert (a.position, b.position, c.position) == (22, 4, 21)


def test_chunks_longer_than_max_chunk_run_in_pieces(hf, path, rng):
    eng = Engine(path, max_sequences=3, max_seq_len=64, max_chunk=8)
    a, b = eng.new_sequence(), eng.new_sequence()
    pa, pb = rng.integers(0, V, 29).tolist(), rng.integers(0, V, 3).tolist()
    out = eng.step({a: pa, b: pb})
    assert eng.stats["runs"] == 4                               # ceil(29 / 8)
    close(out[a], ref_last(hf, pa))
    close(out[b], ref_last(hf, pb))


def test_prefix_reuse_takes_over_or_copies_and_matches_recompute(hf, path, rng):
    eng = Engine(path, max_sequences=3, max_seq_len=64, max_chunk=8)
    a = eng.new_sequence()
    prefix = rng.integers(0, V, 30).tolist()
    eng.step({a: prefix})
    eng.release(a)                                              # retained, indexed
    b = eng.new_sequence()
    tail = [5, 6, 7]
    runs = eng.stats["runs"]
    out = eng.step({b: prefix + tail})
    assert eng.stats["runs"] == runs + 1                        # 3 new tokens: one run, not four
    assert eng.stats["prefix_tokens_reused"] == 30 and b.slot == 0   # took over a's slot in place
    close(out[b], ref_last(hf, prefix + tail))
    eng.release(b)                                              # retains prefix + tail
    c, d = eng.new_sequence(), eng.new_sequence()
    out = eng.step({c: prefix + [9], d: prefix[:10] + [1, 2]})  # both copy from b's retained slot
    close(out[c], ref_last(hf, prefix + [9]))
    close(out[d], ref_last(hf, prefix[:10] + [1, 2]))
    assert eng.stats["prefix_hits"] == 3 and eng.stats["prefix_tokens_reused"] == 30 + 30 + 10
    prof = eng.memory_profile()
    assert prof.retained_sequences == 1 and prof.retained_tokens == 33 and prof.active_sequences == 2


def test_without_prefix_cache_nothing_is_retained(hf, path, rng):
    eng = Engine(path, max_sequences=2, max_seq_len=64, prefix_cache=False)
    a = eng.new_sequence()
    p = rng.integers(0, V, 12).tolist()
    eng.step({a: p})
    eng.release(a)
    b = eng.new_sequence()
    close(eng.step({b: p + [3]})[b], ref_last(hf, p + [3]))
    assert eng.stats["prefix_hits"] == 0 and eng.memory_profile().retained_sequences == 0


def test_tree_nodes_see_only_their_ancestors(hf, path, rng):
    eng = Engine(path, max_sequences=2, max_seq_len=64, max_chunk=4)
    t = eng.new_tree()
    root = rng.integers(0, V, 10).tolist()
    lg = eng.step({t: Nodes(root)})[t]                          # a chain: 3 runs of <= 4 nodes
    assert lg.shape == (10, V)
    for i in range(10):
        close(lg[i], ref_last(hf, root[:i + 1]))
    kids = eng.step({t: Nodes([11, 12, 13], [9, 9, 9])})[t]     # siblings in one chunk
    for i, k in enumerate([11, 12, 13]):
        close(kids[i], ref_last(hf, root + [k]))
    # grandchildren under different parents, one of them below a node of this same call
    lg = eng.step({t: Nodes([20, 21, 22, 23], [10, 13, 11, 2])})[t]
    for i, node in enumerate(range(13, 17)):
        close(lg[i], ref_last(hf, t.path_tokens(node)))
    assert t.path_tokens(14) == root + [11, 20, 21] and t.depth(16) == 3
    line = eng.fork(t, node=14)                                 # the path as a plain sequence
    assert line.tokens == tuple(root + [11, 20, 21])
    close(eng.step({line: [7]})[line], ref_last(hf, root + [11, 20, 21, 7]))


def test_greedy_generate_equals_pytorch_greedy(hf, path, rng):
    import torch
    eng = Engine(path, max_sequences=3, max_seq_len=64, max_chunk=8)
    prompts = [rng.integers(0, V, n).tolist() for n in (3, 17, 9, 1, 12)]
    lengths = [5, 9, 1, 12, 7]
    outs = eng.generate(prompts, max_new_tokens=lengths)       # 5 prompts through 3 slots
    for p, n, got in zip(prompts, lengths, outs):
        x = torch.tensor([p])
        with torch.no_grad():                                   # an explicit mask: no pad-token guessing
            want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):]
        assert got == want.tolist()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(path, rng):
    prompts = [rng.integers(0, V, n).tolist() for n in (4, 11, 6, 8)]
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95)
    eng = Engine(path, max_sequences=3, max_seq_len=64, max_chunk=4)
    together = eng.generate(prompts, seed=[1, 2, 3, 4], **kw)
    alone = [Engine(path, max_sequences=1, max_seq_len=64).generate([p], seed=s, **kw)[0]
             for p, s in zip(prompts, [1, 2, 3, 4])]
    assert together == alone


def test_stream_yields_what_generate_returns(path, rng):
    eng = Engine(path, max_sequences=2, max_seq_len=64)
    prompts = [rng.integers(0, V, n).tolist() for n in (5, 2, 9)]
    got: dict[int, list] = {}
    for req, tok in eng.stream(prompts, max_new_tokens=6):
        got.setdefault(req.index, []).append(tok)
    assert [got[i] for i in range(3)] == eng.generate(prompts, max_new_tokens=6)


def test_stop_ids_and_cancel(path, rng):
    eng = Engine(path, max_sequences=2, max_seq_len=64)
    p = rng.integers(0, V, 6).tolist()
    full = eng.generate([p], max_new_tokens=10)[0]
    stop = full[3]
    cut = eng.generate([p], max_new_tokens=10, stop_ids=[stop])[0]
    assert cut == full[:full.index(stop) + 1]
    req = eng.submit(p, max_new_tokens=50)
    eng.tick()
    eng.tick()
    eng.cancel(req)
    eng.tick()
    assert req.done and req.finish_reason == "cancelled" and eng.memory_profile().active_sequences == 0


def test_concurrent_requests_sharing_a_prefix_compute_it_once(hf, path, rng):
    eng = Engine(path, max_sequences=4, max_seq_len=64, max_chunk=8)
    prefix = rng.integers(0, V, 40).tolist()
    prompts = [prefix + [i] for i in range(4)]
    outs = eng.generate(prompts, max_new_tokens=3)
    assert eng.stats["prefix_tokens_reused"] >= 3 * 40         # the later three adopt the first one's rows
    solo = Engine(path, max_sequences=1, max_seq_len=64, prefix_cache=False)
    assert outs == [solo.generate([p], max_new_tokens=3)[0] for p in prompts]


def test_engine_refuses_a_padded_graph_and_names_the_reexport():
    from .bad_inputs import FORMAT1
    with pytest.raises(ModelFormatError, match=r"python -m export"):
        Engine(FORMAT1)
    KVCacheInferencer(FORMAT1, max_seq_len=8).forward([1, 2])   # which still runs there


def test_cache_addresses_fixed_and_memory_flat_over_a_long_run(path):
    import gc

    import psutil
    eng = Engine(path, max_sequences=4, max_seq_len=64, max_chunk=8)
    ptrs = eng.cache.data_ptrs()
    rng = np.random.default_rng(3)

    def batch(n):
        prompts = [rng.integers(0, V, int(rng.integers(1, 30))).tolist() for _ in range(n)]
        eng.generate(prompts, max_new_tokens=[int(rng.integers(1, 30)) for _ in prompts], temperature=0.8, seed=1)

    batch(40)                                                   # warm-up: arenas, every shape seen once
    gc.collect()
    rss = psutil.Process().memory_info().rss
    batch(200)
    gc.collect()
    growth = psutil.Process().memory_info().rss - rss
    assert eng.cache.data_ptrs() == ptrs
    assert growth < 2 << 20, f"RSS grew {growth / 1024:.0f} KiB"


def test_memory_profile_fields(path, rng):
    eng = Engine(path, max_sequences=4, max_seq_len=60, max_chunk=5)
    m = eng.manifest
    a, b = eng.new_sequence(), eng.new_sequence()
    eng.step({a: rng.integers(0, V, 10), b: rng.integers(0, V, 4)})
    eng.release(b)
    p = eng.memory_profile()
    per = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4
    assert p.bytes_per_token == per and p.rows_per_slot == 64 and p.total_bytes == per * 64 * 4
    assert (p.used_bytes, p.retained_bytes, p.total_tokens, p.retained_tokens) == (10 * per, 4 * per, 10, 4)
    assert (p.slots, p.occupied_slots, p.active_sequences) == (4, 2, 1)
    assert p.fragmentation_ratio == pytest.approx(1 - 14 / 128) and p.efficiency_ratio == pytest.approx(14 / 256)
    assert p.free_bytes == p.total_bytes - 14 * per and p.index_bytes > 0 and p.io_buffer_bytes > 0
    assert "prefix cache" in p.report()


# -- random interleavings (hypothesis) ------------------------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["new", "fork", "step", "step", "step", "release", "reuse", "truncate"]),
                         st.integers(0, 10**6)), min_size=4, max_size=22)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS)
def test_random_interleavings_match_recompute(hf, path, ops):
    eng = Engine(path, max_sequences=4, max_seq_len=48, max_chunk=6)
    live: list = []          # handles
    released: list[list[int]] = []
    for op, seed in ops:
        r = np.random.default_rng(seed)
        if op == "new" and len(live) < 4:
            live.append(eng.new_sequence())
        elif op == "fork" and live and len(live) < 4:
            live.append(eng.fork(live[int(r.integers(len(live)))]))
        elif op == "release" and live:
            s = live.pop(int(r.integers(len(live))))
            released.append(list(s.tokens))
            eng.release(s)
        elif op == "reuse" and released and len(live) < 4:
            base = released[int(r.integers(len(released)))]
            s = eng.new_sequence()
            toks = base[:int(r.integers(0, len(base) + 1))] + r.integers(0, V, int(r.integers(1, 5))).tolist()
            if len(toks) <= 48:
                close(eng.step({s: toks})[s], ref_last(hf, toks))
            live.append(s)
        elif op == "truncate" and live:
            s = live[int(r.integers(len(live)))]
            eng.truncate(s, int(r.integers(0, s.position + 1)))
        elif op == "step" and live:
            chosen = [s for s in live if r.random() < 0.7] or live[:1]
            feeds = {}
            for s in chosen:
                n = int(r.integers(1, 14))
                if s.position + n <= 48:
                    feeds[s] = r.integers(0, V, n)
            if feeds:
                before = {s: list(s.tokens) for s in feeds}
                out = eng.step(feeds)
                for s, ids in feeds.items():
                    assert list(s.tokens) == before[s] + ids.tolist()
                    close(out[s], ref_last(hf, list(s.tokens)))
    prof = eng.memory_profile()
    assert prof.active_sequences == len(live) and prof.total_tokens == sum(s.position for s in live)


def test_handles_from_another_engine_or_released_are_refused(path):
    e1, e2 = Engine(path, max_sequences=1, max_seq_len=16), Engine(path, max_sequences=1, max_seq_len=16)
    a = e1.new_sequence()
    with pytest.raises(InvalidInputError, match="does not belong"):
        e2.step({a: [1]})
    e1.release(a)
    with pytest.raises(InvalidInputError, match="released"):
        e1.step({a: [1]})


def test_prompts_are_cut_at_the_same_offsets_alone_and_in_a_batch(path, rng):
    """A prompt's chunks (and so its numbers: int4 kernels differ in the last bits between cuts) do
    not depend on what else the scheduler runs: cuts at multiples of max_chunk from its start."""
    prompts = [rng.integers(0, V, n).tolist() for n in (13, 20, 5, 30, 9)]

    def cuts(eng, ps):
        fed, real = {}, eng.advance

        def spy(feeds, **kw):
            for seq, ids in dict(feeds).items():
                fed.setdefault(seq, []).append(len(ids))
            return real(feeds, **kw)
        eng.advance = spy
        reqs = [eng.submit(p, 4) for p in ps]
        while not all(r.done for r in reqs):
            eng.tick()
        return [fed[r.seq] for r in reqs]

    together = cuts(Engine(path, max_sequences=3, max_seq_len=64, max_chunk=8, prefix_cache=False), prompts)
    alone = [cuts(Engine(path, max_sequences=1, max_seq_len=64, max_chunk=8), [p])[0] for p in prompts]
    assert together == alone
    assert alone[3] == [8, 8, 8, 6, 1, 1, 1]


def test_one_slot_of_one_token_chunks_still_runs(path, rng):
    """max_chunk=1 leaves no room for the batch-invariance padding: runs go without it."""
    prompts = [rng.integers(0, V, n).tolist() for n in (3, 1)]
    got = Engine(path, max_sequences=1, max_seq_len=32, max_chunk=1).generate(prompts, 5)
    assert got == Engine(path, max_sequences=2, max_seq_len=32, max_chunk=8).generate(prompts, 5)


def test_prefill_budget_caps_prompt_tokens_per_step_and_leaves_tokens_unchanged(path, rng):
    from kvcache_infer.engine.engine import PREFILL_BUDGET
    assert Engine(path, max_sequences=2, max_seq_len=64).scheduler.prefill_budget == PREFILL_BUDGET
    for bad in (0, -3, True, 2.5):
        with pytest.raises(InvalidInputError, match="prefill_budget"):
            Engine(path, max_sequences=2, max_seq_len=64, prefill_budget=bad)
    prompts = [rng.integers(0, V, n).tolist() for n in (30, 17, 25, 9)]
    outs = {}
    for budget in (5, 8, 16, 256):                     # 5: below max_chunk, prompts are cut at multiples of 5
        eng = Engine(path, max_sequences=4, max_seq_len=64, max_chunk=8, prefill_budget=budget)
        fed, real = [], eng.advance

        def spy(feeds, **kw):
            fed.append(sum(len(ids) for ids in dict(feeds).values() if len(ids) > 1))
            return real(feeds, **kw)
        eng.advance = spy
        outs[budget] = eng.generate(prompts, 6)
        assert max(fed) <= budget and max(fed) == min(budget, 32)       # 4 prompts of chunks up to 8 each
    assert outs[5] == outs[8] == outs[16] == outs[256]
