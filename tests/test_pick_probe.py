"""The load-time check of the filtered greedy head's int8 kernel (kvcache_infer/runtime/pick_probe.py): it passes
on this machine's kernel; when the graph's int8 node computes otherwise (another accuracy level, other
weights than the export recorded) the model loads with one GreedyPickWarning and greedy picks still
equal the full head's argmax; non-finite activations raise NonFiniteError instead of picking a token."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from kvcache_infer import Engine, GreedyPickWarning, KVCacheInferencer, Model, NonFiniteError
from kvcache_infer.cli import main as cli


def _altered(src, dst, node_attrs=None, scale_factor=None, nan_position=None):
    """A copy of export `src` whose greedy int8 node has other attributes, whose int8 head's scales are
    multiplied by scale_factor, or whose position embedding at nan_position is NaN."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for node in model.graph.node:
        if node.name == "greedy/approx" and node_attrs:
            keep = [a for a in node.attribute if a.name not in node_attrs]
            del node.attribute[:]
            node.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in node_attrs.items()])
    for init in model.graph.initializer:
        if init.name == "greedy/scales" and scale_factor is not None:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale_factor), init.name))
        if init.name == "wpe" and nan_position is not None:
            a = numpy_helper.to_array(init).copy()
            a[nan_position] = np.nan
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_bytes"] = (dst / "model.onnx").stat().st_size
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _load(path) -> tuple[Model, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Model(path)
    return model, [w for w in caught if issubclass(w.category, GreedyPickWarning)]


def test_this_kernel_passes_the_check(exported, capsys):
    model, warned = _load(exported["tiny-a"])
    assert model.greedy_pick.filtered and not warned
    assert "checked at load" in model.greedy_pick.reason
    assert cli(["info", "--model", str(exported["tiny-a"])]) == 0
    assert "greedy pick: filtered int8 head" in capsys.readouterr().out
    model, warned = _load(exported["tiny-wide"])              # no filtered head: nothing to check, no warning
    assert not model.greedy_pick.filtered and not warned


@pytest.mark.parametrize("change", [dict(node_attrs={"accuracy_level": 1}),    # fp32 activations
                                    dict(node_attrs={"accuracy_level": 0}),
                                    dict(scale_factor=0.5)],                       # weights read otherwise
                         ids=["accuracy-1", "accuracy-0", "scales"])
def test_a_kernel_that_computes_otherwise_is_set_aside(exported, tmp_path, rng, change, capsys):
    d = _altered(exported["tiny-a"], tmp_path / "m", **change)
    model, warned = _load(d)
    assert not model.greedy_pick.filtered
    assert len(warned) == 1 and "set aside" in str(warned[0].message)
    assert cli(["info", "--model", str(d)]) == 0
    assert "greedy pick: filtered greedy head set aside" in capsys.readouterr().out
    V = model.manifest.vocab_size
    for B in (1, 2):                                          # greedy picks: the full head's argmax
        picker = KVCacheInferencer(model, max_seq_len=48, batch_size=B)
        scorer = KVCacheInferencer(model, max_seq_len=48, batch_size=B)
        prompt = rng.integers(0, V, (B, 9))
        tok, logits = picker.next_tokens(prompt), scorer.forward(prompt)
        for _ in range(20):
            np.testing.assert_array_equal(tok, logits.argmax(-1))
            tok, logits = picker.next_tokens(tok[:, None]), scorer.forward(tok[:, None])
    eng = Engine(model, max_sequences=2, max_seq_len=48, prefix_cache=False)
    ref = KVCacheInferencer(model, max_seq_len=48)
    s = eng.new_sequence()
    out, want = eng.advance({s: [5, 6, 7]}, pick=s), ref.forward([5, 6, 7])
    for _ in range(10):
        assert out.next_token(s) == int(want.argmax())
        t = out.next_token(s)
        out, want = eng.advance({s: [t]}, pick=s), ref.forward([t])


def test_non_finite_activations_raise_and_change_nothing(exported, tmp_path):
    d = _altered(exported["tiny-a"], tmp_path / "m", nan_position=3)
    model, warned = _load(d)                                  # the probe runs positions 0 and 1: unaffected
    assert model.greedy_pick.filtered and not warned
    inf = KVCacheInferencer(model, max_seq_len=16)
    t = inf.next_tokens([1, 2, 3])                            # positions 0..2
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        inf.next_tokens([int(t)])                             # position 3
    assert inf.position == 3
    eng = Engine(model, max_sequences=2, max_seq_len=16, prefix_cache=False)
    s = eng.new_sequence()
    with pytest.raises(NonFiniteError):
        eng.advance({s: [1, 2, 3, 4]}, pick=s)
    assert s.position == 0
    assert eng.advance({s: [1, 2, 3]}, pick=s).next_token(s) == int(t)
