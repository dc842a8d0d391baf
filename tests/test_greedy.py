"""The filtered greedy head (export/greedy.py): its error bound against ONNX Runtime's kernel, its
picks against a float64 argmax on hard rows, when the exporter uses it, and the runtime paths."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from export.graph import GraphBuilder
from export.greedy import greedy_head, wanted
from kvcache_infer import Engine, KVCacheInferencer, Model
from kvcache_infer.errors import InvalidInputError, KVCacheError, ModelFormatError


def _session(W: np.ndarray, extra_outputs=()):
    V, E = W.shape
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["G", E])
    probe = g.input("probe", TensorProto.FLOAT, ["P", E])
    greedy_head(g, x, g.weight("W", W), W, "token", probe, "probe_scores")
    g.output("token", TensorProto.INT64, ["G"])
    g.output("probe_scores", TensorProto.FLOAT, ["P", V])
    for name in extra_outputs:
        g.output(name, TensorProto.FLOAT, ["G", V])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(g.build("greedy", 17, "test").SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _hard_case(V: int, E: int, seed: int):
    """Head rows in clusters of near-copies (their logits differ by far less than the int8 error) and
    hidden rows with a few large dimensions, like ln_f outputs."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((V // 8, E)).astype(np.float32)
    W = np.repeat(base, 8, axis=0) + 1e-3 * rng.standard_normal((V // 8 * 8, E)).astype(np.float32)
    W[:, :3] *= 6
    x = rng.standard_normal((64, E)).astype(np.float32)
    x[:, rng.integers(0, E, 4)] *= 10
    x[:16] *= 0.01                                                   # small activations too
    return W.astype(np.float32), x


@pytest.mark.parametrize("V,E", [(4096, 128), (2000, 48), (1000, 64)])   # blocks of 128, 16 and 64
def test_bound_covers_the_kernels_error(V, E):
    """|MatMulNBits(x, W8) - x.W| <= the bound, for every (row, token): what makes the pick exact."""
    W, x = _hard_case(V, E, seed=E)
    s = _session(W, extra_outputs=("greedy/approx/out0", "greedy/bound/out0"))
    for rows in (x[:1], x[1:2], x[:17], x):                             # one-row and many-row kernel paths
        _, _, approx, bound = s.run(None, {"x": rows, "probe": np.zeros((0, E), np.float32)})
        exact = rows.astype(np.float64) @ W.T.astype(np.float64)
        assert np.all(np.abs(approx - exact) <= bound), float((np.abs(approx - exact) / bound).max())


@pytest.mark.parametrize("V,E", [(4096, 128), (2000, 48)])
def test_picks_equal_the_exact_argmax(V, E):
    W, x = _hard_case(V, E, seed=7)
    s = _session(W)
    exact = x.astype(np.float64) @ W.T.astype(np.float64)             # [G,V]
    for rows in ([0], [5], list(range(64)), []):
        got, _ = s.run(None, {"x": x[rows].reshape(len(rows), E), "probe": np.zeros((0, E), np.float32)})
        assert got.shape == (len(rows),)
        for g, tok in zip(rows, got):
            # float32 rounding may order a float64 near-tie either way; nothing more
            assert exact[g, tok] >= exact[g].max() - 1e-5 * np.abs(exact[g]).max(), (g, tok, exact[g].argmax())


def test_when_the_exporter_uses_the_filter():
    gpt2 = dict(hidden=768, vocab=50257)
    assert wanted("auto", dtype="float32", quantized=False, **gpt2)
    assert not wanted("auto", dtype="float32", quantized=True, **gpt2)
    assert not wanted("auto", dtype="float16", quantized=False, **gpt2)
    assert not wanted("auto", dtype="float32", quantized=False, hidden=64, vocab=1000)   # a small head
    assert wanted("filter", dtype="float32", quantized=False, hidden=64, vocab=1000)
    assert not wanted("argmax", dtype="float32", quantized=False, **gpt2)
    for kw, says in ((dict(dtype="float16", quantized=False, hidden=768), "float16"),
                     (dict(dtype="float32", quantized=True, hidden=768), "quantized"),
                     (dict(dtype="float32", quantized=False, hidden=40), "multiple of 16")):
        with pytest.raises(ValueError, match=says):
            wanted("filter", vocab=1000, **kw)
    with pytest.raises(ValueError, match="'auto', 'filter' or 'argmax'"):
        wanted("fast", dtype="float32", quantized=False, **gpt2)


def test_export_cli_refuses_the_filter_for_a_quantized_export(tmp_path):
    from export.__main__ import main
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=16)))
    assert main(["--config", str(cfg), "--out", str(tmp_path / "m"), "--weights", "int8",
                 "--greedy-head", "filter"]) == 2
    assert not (tmp_path / "m").exists()


def test_greedy_steps_equal_the_logits_argmax_alone_and_in_a_batch(exported, rng):
    """tiny-a has the filtered head: greedy steps (no logits rows computed) pick what forward()'s logits
    say, for one sequence and for a batch, after a one-shot and a chunked prompt (3 rows: more than
    MAX_PICK_ROWS, the logits' ArgMax)."""
    m = Model(exported["tiny-a"])
    assert m.manifest.greedy_index and m.manifest.greedy_token
    V = m.manifest.vocab_size
    for B in (1, 2, 3):
        picker = KVCacheInferencer(m, max_seq_len=64, batch_size=B)
        scorer = KVCacheInferencer(m, max_seq_len=64, batch_size=B)
        prompt = rng.integers(0, V, (B, 20))
        tok = picker.next_tokens(prompt[:, :7])
        tok = picker.next_tokens(prompt[:, 7:])                      # chunked
        logits = scorer.forward(prompt)                              # one shot
        for _ in range(30):
            np.testing.assert_array_equal(tok, logits.argmax(-1))
            tok, logits = picker.next_tokens(tok[:, None]), scorer.forward(tok[:, None])
        # logits and picks interleave on one inferencer: the bindings switch between R = 0 and R = B
        mixed = KVCacheInferencer(m, max_seq_len=64, batch_size=B)
        a = mixed.forward(prompt)
        b = mixed.next_tokens(a.argmax(-1)[:, None])
        c = mixed.forward(b[:, None])
        scorer.reset_cache()
        s1 = scorer.forward(prompt)
        np.testing.assert_array_equal(b, scorer.forward(s1.argmax(-1)[:, None]).argmax(-1))
        np.testing.assert_allclose(c, scorer.forward(b[:, None]), atol=1e-5)


def test_engine_runs_a_graph_with_the_filtered_head(exported):
    eng = Engine(exported["tiny-a"], max_sequences=2, max_seq_len=32)
    s = eng.new_sequence()
    out = eng.step({s: [1, 2, 3]})
    inf = KVCacheInferencer(exported["tiny-a"], max_seq_len=32)
    np.testing.assert_allclose(out[s], inf.forward([1, 2, 3]), atol=1e-5)


def test_manifest_names_greedy_io_together(exported, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(exported["tiny-a"], d)
    data = json.loads((d / "manifest.json").read_text())
    del data["io"]["greedy_token"]
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="greedy_index and greedy_token come together"):
        Model(d)
    del data["io"]["greedy_index"]                 # neither named: the graph's extra input is refused
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="greedy_index"):
        Model(d)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-wide"])          # with and without the filtered head
def test_engine_pick_gives_the_greedy_token_without_logits(exported, rng, name):
    """advance(pick=...) gives each picked sequence the token its logits row would (a prompt longer than
    max_chunk runs in pieces; picked and logits sequences share runs); logits() refuses picked ones."""
    V = Model(exported[name]).manifest.vocab_size
    eng = Engine(exported[name], max_sequences=4, max_seq_len=64, max_chunk=8, prefix_cache=False)
    ref = Engine(exported[name], max_sequences=4, max_seq_len=64, max_chunk=8, prefix_cache=False)
    a, b, c = eng.new_sequence(), eng.new_sequence(), eng.new_sequence()
    ra, rb, rc = ref.new_sequence(), ref.new_sequence(), ref.new_sequence()
    feeds = {a: rng.integers(0, V, 19), b: rng.integers(0, V, 3), c: rng.integers(0, V, 5)}
    rfeeds = dict(zip((ra, rb, rc), feeds.values()))
    for step in range(12):
        pick = [a, b] if step % 3 else [a]                   # b alone picks some steps; c never
        out, want = eng.advance(feeds, pick=pick), ref.step(rfeeds)
        for s, r in ((a, ra), (b, rb), (c, rc)):
            assert out.next_token(s) == int(want[r].argmax())
            np.testing.assert_array_equal(out.next_tokens(s), [out.next_token(s)])
            if s in pick:
                with pytest.raises(KVCacheError, match="advanced with pick"):
                    out.logits(s)
            else:
                np.testing.assert_allclose(out.logits(s), want[r], atol=1e-5)
        feeds = {s: [out.next_token(s)] for s in (a, b, c)}
        rfeeds = {r: feeds[s] for s, r in ((a, ra), (b, rb), (c, rc))}
    only = eng.advance({a: [1]}, pick=a)                      # one picked row alone; a bare handle
    assert only.next_token(a) == int(ref.step({ra: [1]})[ra].argmax())
    with pytest.raises(InvalidInputError, match="iterable of Sequences"):
        eng.advance({a: [2]}, pick=3)
    for bad in ([b], [eng.new_tree()]):                        # b is not in this step; a tree
        with pytest.raises(InvalidInputError, match="pick must name"):
            eng.advance({a: [2]}, pick=bad)
    assert a.position == ra.position                          # the refused steps changed nothing
