"""Every caller mistake raises a clear, typed error and leaves the cache exactly as it was."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kvcache_infer import (CapacityError, DeviceError, InvalidInputError, KVCacheError, KVCacheInferencer, Model,
                           ModelFormatError, ModelNotFoundError)


def _state(inf):
    return inf.position, [np.concatenate([k.ravel(), v.ravel()]) for k, v in inf.cache.read(inf.position)]


def _assert_unchanged(inf, before):
    pos, rows = _state(inf)
    assert pos == before[0]
    for a, b in zip(rows, before[1]):
        np.testing.assert_array_equal(a, b)


BAD_SINGLE = [
    ([1000], InvalidInputError, "outside the vocabulary"),
    ([-1], InvalidInputError, "outside the vocabulary"),
    ([3, 2**40], InvalidInputError, "outside the vocabulary"),
    (np.array([1.0, 2.0]), InvalidInputError, "must be integers"),
    ([1.5], InvalidInputError, "must be integers"),
    ([float("nan")], InvalidInputError, "must be integers"),
    (np.array([True, False]), InvalidInputError, "must be integers"),
    (["a", "b"], InvalidInputError, "must be integers"),
    ([1, "2"], InvalidInputError, "must be integers"),
    ([], InvalidInputError, "empty"),
    (np.zeros((1, 0), np.int64), InvalidInputError, "empty"),
    (np.zeros((1, 1, 1), np.int64), InvalidInputError, "1-D or 2-D"),
    (5, InvalidInputError, "1-D or 2-D"),
    (np.zeros((2, 3), np.int64), InvalidInputError, "batch_size=1"),
    ([[1, 2], [3]], InvalidInputError, "token_ids"),
    (None, InvalidInputError, "must be integers"),
]


@pytest.mark.parametrize("ids,exc,msg", BAD_SINGLE, ids=[f"bad{i}" for i in range(len(BAD_SINGLE))])
def test_bad_ids_raise_and_leave_cache_unchanged(ids, exc, msg, exported, rng):
    inf = KVCacheInferencer(exported["tiny-a"], max_seq_len=32)
    inf.forward(rng.integers(0, 1000, size=7))
    before = _state(inf)
    with pytest.raises(exc, match=msg):
        inf.forward(ids)
    _assert_unchanged(inf, before)
    inf.forward([1])                                  # still usable
    assert inf.position == before[0] + 1


def test_batch_shape_errors(exported):
    inf = KVCacheInferencer(exported["tiny-a"], batch_size=3)
    with pytest.raises(InvalidInputError, match=r"1-D sequence but batch_size=3"):
        inf.forward([1, 2])
    with pytest.raises(InvalidInputError, match=r"got 2 rows but batch_size=3"):
        inf.forward(np.zeros((2, 4), np.int64))
    assert inf.position == 0


def test_step_past_capacity_names_capacity_and_setting(exported, rng):
    inf = KVCacheInferencer(exported["tiny-a"], max_seq_len=16)
    inf.forward(rng.integers(0, 1000, size=14))
    before = _state(inf)
    with pytest.raises(CapacityError, match=r"capacity of 16 tokens \(max_seq_len=16\)"):
        inf.forward(rng.integers(0, 1000, size=3))
    _assert_unchanged(inf, before)
    inf.forward([1]); inf.forward([2])                  # exactly fills it
    with pytest.raises(CapacityError):
        inf.forward([3])
    assert inf.position == 16


def test_ort_failure_during_run_leaves_cache_unchanged(exported, rng, monkeypatch):
    """The run writes rows past the position and then fails: the sequence is as it was."""
    model = Model(exported["tiny-a"])
    inf = KVCacheInferencer(model, max_seq_len=40)
    ref = KVCacheInferencer(model, max_seq_len=40)
    tokens = rng.integers(0, 1000, size=30)
    inf.forward(tokens[:20]); ref.forward(tokens[:20])
    before = _state(inf)
    real_run = model.session.run_with_iobinding

    def run_then_fail(io, *a, **k):
        real_run(io, *a, **k)                           # the graph really writes the new rows
        raise RuntimeError("simulated ORT failure")

    monkeypatch.setattr(model.session, "run_with_iobinding", run_then_fail)
    for wrong in (rng.integers(0, 1000, size=5), rng.integers(0, 1000, size=1)):
        with pytest.raises(KVCacheError, match="simulated ORT failure.*unchanged"):
            inf.forward(wrong)
        _assert_unchanged(inf, before)
    monkeypatch.undo()
    np.testing.assert_array_equal(inf.forward(tokens[20:25]), ref.forward(tokens[20:25]))
    np.testing.assert_array_equal(inf.forward(tokens[25:26]), ref.forward(tokens[25:26]))


def test_growing_layout_failure_leaves_cache_unchanged(optimum_dir, rng, monkeypatch):
    model = Model(optimum_dir)
    inf, ref = KVCacheInferencer(model, max_seq_len=40), KVCacheInferencer(model, max_seq_len=40)
    tokens = rng.integers(0, 1000, size=30)
    inf.forward(tokens[:20]); ref.forward(tokens[:20])
    before = _state(inf)
    real_run = model.session.run_with_iobinding

    def run_then_fail(io, *a, **k):
        real_run(io, *a, **k)
        raise RuntimeError("simulated ORT failure")

    monkeypatch.setattr(model.session, "run_with_iobinding", run_then_fail)
    with pytest.raises(KVCacheError):
        inf.forward(tokens[20:21])
    _assert_unchanged(inf, before)
    monkeypatch.undo()
    np.testing.assert_array_equal(inf.forward(tokens[20:21]), ref.forward(tokens[20:21]))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(max_seq_len=129), r"exceeds the model's position limit max_positions=128"),
    (dict(max_seq_len=0), r"max_seq_len must be an int >= 1"),
    (dict(max_seq_len=2.5), r"max_seq_len must be an int >= 1"),
    (dict(batch_size=0), r"batch_size must be an int >= 1"),
    (dict(batch_size=True), r"batch_size must be an int >= 1"),
])
def test_bad_constructor_arguments(kwargs, msg, exported):
    with pytest.raises(InvalidInputError, match=msg):
        KVCacheInferencer(exported["tiny-a"], **kwargs)


def test_unknown_device_and_unavailable_cuda(exported):
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        KVCacheInferencer(exported["tiny-a"], device="tpu")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceError, match="no CUDA provider"):
            KVCacheInferencer(exported["tiny-a"], device="cuda")


def test_missing_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        KVCacheInferencer(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="has no model.onnx"):
        KVCacheInferencer(tmp_path)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_truncated_and_garbage_model_files(exported, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(exported["tiny-a"], d)
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        KVCacheInferencer(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ModelFormatError, match="cannot load"):
        KVCacheInferencer(d)
    (d / "model.onnx").write_bytes(b"this is not an onnx model")
    with pytest.raises(ModelFormatError, match="cannot load"):
        KVCacheInferencer(d)


def test_model_without_kv_io_lists_missing_names(tmp_path):
    """An ONNX model with no KV I/O at all, and one whose manifest promises names it lacks."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "plain", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    with pytest.raises(ModelFormatError, match=r"no KV-cache inputs named past_key_values"):
        KVCacheInferencer(tmp_path)


def test_manifest_promising_missing_io_or_contradicting_graph(exported, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(exported["tiny-a"], d)
    good = json.loads((d / "manifest.json").read_text())

    def with_manifest(**change):
        data = json.loads(json.dumps(good))
        for k, v in change.items():
            if k in ("past_key", "present_value"):
                data["io"][k] = v
            else:
                data[k] = v
        (d / "manifest.json").write_text(json.dumps(data))

    with_manifest(past_key=["past_key_0", "past_key_9"])
    with pytest.raises(ModelFormatError, match=r"missing input 'past_key_9'"):
        KVCacheInferencer(d)
    with_manifest(head_dim=32)
    with pytest.raises(ModelFormatError, match=r"contradicts the graph: past_key_0 dim 3 is 16, manifest says 32"):
        KVCacheInferencer(d)
    with_manifest(vocab_size=999)
    with pytest.raises(ModelFormatError, match=r"vocab_size=999"):
        KVCacheInferencer(d)
    with_manifest(num_layers=3)
    with pytest.raises(ModelFormatError, match=r"2 past_key names for 3 layers"):
        KVCacheInferencer(d)
    with_manifest(format_version=99)
    with pytest.raises(ModelFormatError, match=r"format_version 99 is not supported"):
        KVCacheInferencer(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"not readable JSON"):
        KVCacheInferencer(d)


def test_inferencer_device_must_match_model(exported):
    model = Model(exported["tiny-a"])
    with pytest.raises(InvalidInputError, match="loaded for 'cpu'"):
        KVCacheInferencer(model, device="cuda")
