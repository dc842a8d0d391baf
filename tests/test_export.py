"""The exporter: a manifest that matches the graph, a compact graph, and loud parity failures."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.parity import ParityError
from export.pipeline import export_model

from .conftest import make_hf

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_records_geometry_layout_io_and_parity(exported):
    data = json.loads((exported["tiny-b"] / "manifest.json").read_text())
    assert (data["num_layers"], data["num_heads"], data["head_dim"], data["vocab_size"]) == (3, 2, 24, 517)
    assert data["max_positions"] == 96 and data["dtype"] == "float32" and data["cache"]["layout"] == "inplace"
    assert data["io"]["past_key"] == ["past_key_0", "past_key_1", "past_key_2"]
    assert data["io"]["present_value"][-1] == "present_value_2"
    assert data["parity"]["max_abs_diff"] <= data["parity"]["tolerance"]
    assert data["model_bytes"] == (exported["tiny-b"] / "model.onnx").stat().st_size


def test_graph_is_compact_and_stores_the_tied_embedding_once(exported):
    model = onnx.load(str(exported["tiny-a"] / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("LayerNormalization") == 5
    # no copy of the past, no unfused attention (the greedy head's Concat/Transpose are of its small
    # per-row vectors; "keep/rows" joins the logits and greedy indices)
    core = {n.op_type for n in model.graph.node if not n.name.startswith(("greedy/", "keep/rows"))}
    assert not {"Concat", "Transpose", "Softmax"} & core
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert sizes.count(1000 * 64) == 1                    # fp32 wte [V,E] once: Gather, lm_head, greedy rows
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert {a.name: a.f for a in gqa.attribute if a.name == "scale"} == {"scale": 1.0}


def test_parity_failure_fails_the_export_loudly(tmp_path, monkeypatch):
    from export.families import GPT2
    real = GPT2.build

    def corrupted(*a, **k):
        model, names = real(*a, **k)
        for t in model.graph.initializer:
            if t.name == "ln_f/gamma":
                arr = onnx.numpy_helper.to_array(t) * 1.01
                t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
        return model, names

    monkeypatch.setattr(GPT2, "build", corrupted)
    with pytest.raises(ParityError, match="differ from GPT2LMHeadModel"):
        export_model(make_hf("tiny-a"), tmp_path / "out", source={}, log=lambda s: None)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")][0].startswith("out.failed-")
    assert next(tmp_path.glob("out.failed-*/model.onnx")).is_file()


def test_unsupported_config_is_refused(tmp_path):
    hf = make_hf("tiny-a")
    hf.config.activation_function = "laplace"
    with pytest.raises(ValueError, match="activation_function='laplace'"):
        export_model(hf, tmp_path / "out", source={}, log=lambda s: None)


def test_cli_exports_a_named_config_and_a_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "export", "--config", "tiny", "--seed", "3", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "parity: max |diff|" in r.stdout and f"wrote {out / 'model.onnx'}" in r.stdout
    hf = make_hf("tiny-b")
    hf.save_pretrained(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-m", "export", "--model", str(tmp_path / "ckpt"), "--out",
                        str(tmp_path / "from_ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "from_ckpt" / "manifest.json").read_text())["num_layers"] == 3
    r = subprocess.run([sys.executable, "-m", "export", "--config", "nope", "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "neither a named config" in r.stderr


@pytest.mark.parametrize("argv,msg", [
    (["--config", "tiny"], "the following arguments are required: --out"),
    (["--config", "tiny", "--model", "x", "--out", "o"], "not allowed with argument"),
    (["--out", "o"], "one of the arguments --model --config --from-export is required"),
    (["--config", "tiny", "--seed", "abc", "--out", "o"], "invalid int value: 'abc'"),
    (["--config", "tiny", "--parity-rtol", "-1", "--out", "o"], "--parity-rtol must be > 0"),
    (["--config", "tiny", "--out", "FILE"], "exists and is not a folder"),
    (["--config", "no_such_config", "--out", "o"], "neither a named config"),
    (["--model", "./no/such/folder", "--out", "o"], "no such checkpoint folder"),
    (["--config", "BADJSON", "--out", "o"], "export failed"),
])
def test_cli_rejects_bad_arguments_with_exit_2(argv, msg, tmp_path, capsys):
    from export.__main__ import main
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    argv = [str(tmp_path / "FILE") if a == "FILE" else str(tmp_path / "bad.json") if a == "BADJSON"
            else str(tmp_path / a) if a == "o" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:                          # argparse's own errors
        code = e.code
    assert code == 2
    assert msg in capsys.readouterr().err


def _export_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_out_onto_a_folder_of_user_files_refuses_then_force_keeps_them(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = _export_cli("--config", "tiny", "--out", str(mine))
    assert r.returncode == 2 and "holds other files (notes.txt)" in r.stderr and "Traceback" not in r.stderr
    assert "rm " not in r.stderr and "delete" not in r.stderr       # never advises destroying the user's files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]   # nothing left behind, nothing touched
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    r = _export_cli("--config", "tiny", "--out", str(mine), "--force")
    assert r.returncode == 0, r.stderr
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_out_onto_a_previous_export_replaces_only_its_files(tmp_path):
    out = tmp_path / "m"
    assert _export_cli("--config", "tiny", "--seed", "1", "--out", str(out)).returncode == 0
    (out / "README.txt").write_text("kept")
    r = _export_cli("--config", "tiny", "--seed", "2", "--out", str(out))
    assert r.returncode == 0 and "replacing the previous export" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["source"]["seed"] == 2
    assert (out / "README.txt").read_text() == "kept"


FORMAT1 = Path(__file__).parent / "data" / "format1-tiny"


def test_a_format1_export_still_runs_and_matches_the_weights_it_holds(rng):
    from export.upgrade import hf_model_from_export
    from kvcache_infer import KVCacheInferencer

    from .conftest import hf_logits
    hf, _ = hf_model_from_export(FORMAT1)
    inf = KVCacheInferencer(FORMAT1, max_seq_len=16)
    assert inf.manifest.tokens == "padded"
    ids = rng.integers(0, hf.config.vocab_size, 12)
    got = [inf.forward(ids[:8])] + [inf.forward(ids[t:t + 1]) for t in range(8, 12)]
    want = hf_logits(hf, ids[None])[0, 7:]
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_from_export_upgrades_format1_to_packed_with_the_same_logits(tmp_path):
    from kvcache_infer import Engine
    out = tmp_path / "new"
    r = _export_cli("--from-export", str(FORMAT1), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "against" in r.stdout and "max |logit diff|" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert (m["format_version"], m["tokens"], m["source"]["kind"]) == (2, "packed", "upgraded-export")
    eng = Engine(out, max_sequences=2, max_seq_len=16)
    s = eng.new_sequence()
    assert eng.step({s: [1, 2, 3]})[s].shape == (m["vocab_size"],)


def _hash_graph(h, model) -> None:
    """Adds what the builder wrote, weight values aside, to the hash `h`."""
    for n in model.graph.node:
        attrs = sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute)
        h.update(repr((n.domain, n.op_type, list(n.input), list(n.output), attrs)).encode())
    h.update(repr([(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]).encode())
    io = [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in (*model.graph.input, *model.graph.output)]
    h.update(repr((io, sorted((o.domain, o.version) for o in model.opset_import), model.ir_version)).encode())


def _graph_fingerprint() -> str:
    """sha256 of what the builder writes, weight values aside: every node (op, wiring, attributes),
    every initializer's name, type and shape, the I/O and the opsets, for tiny-a (gelu_new, tied head)
    with a tied and a MatMul head (what quantizers convert), in fp16, with the filtered greedy head and
    with int8 GEMMs (w8a8), with an int8 KV cache, and for tiny-b (BiasGelu, attention scaled by the
    inverse layer index)."""
    from export.families.gpt2 import build_gpt2_graph
    h = hashlib.sha256()
    for name, dtype, head, greedy, gemms, kv8 in (
            ("tiny-a", "float32", "tied", False, "float", False), ("tiny-a", "float32", "matmul", False, "float", False),
            ("tiny-a", "float16", "tied", False, "float", False), ("tiny-a", "float32", "tied", True, "float", False),
            ("tiny-b", "float32", "tied", False, "float", False), ("tiny-a", "float32", "matmul", False, "int8-rows", False),
            ("tiny-a", "float32", "tied", False, "float", True)):
        hf = make_hf(name)
        state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
        scales = [(np.ones((4, 16)), np.ones((4, 16)))] * hf.config.n_layer if kv8 else None
        model, _ = build_gpt2_graph(hf.config, state, dtype=dtype, lm_head=head, greedy_filter=greedy, gemms=gemms,
                                    kv_scales=scales)
        _hash_graph(h, model)
    return h.hexdigest()[:16]


# The node lists each graph revision writes; a change to the graph fails here until GRAPH_REVISION
# is bumped (benchmarks then refuse older exports instead of timing them as this version's).
GRAPH_FINGERPRINTS = {3: "07beb054d39a7b00", 4: "ca8a788197d2c652", 5: "4354f60986c8f1b5", 6: "02d6996a60c94251"}


def test_graph_revision_names_the_graph_the_builder_writes():
    from export.skeleton import GRAPH_REVISION
    got = _graph_fingerprint()
    assert GRAPH_FINGERPRINTS.get(GRAPH_REVISION) == got, (
        f"the graph's nodes changed (fingerprint {got}): bump GRAPH_REVISION in export/skeleton.py "
        f"(now {GRAPH_REVISION}) and pin the fingerprint here")


def _llama_fingerprint() -> str:
    """The same for the Llama family: a GQA tiny-llama with its float, fp16, filtered-greedy, w8a8 and
    int8-KV graphs, and a Qwen2 (biases) with a tied head."""
    import torch
    import transformers

    from export.families import FAMILIES
    h = hashlib.sha256()
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    for model_type, dtype, head, greedy, gemms, kv8 in (
            ("llama", "float32", "tied", False, "float", False), ("llama", "float16", "tied", False, "float", False),
            ("llama", "float32", "tied", True, "float", False), ("llama", "float32", "matmul", False, "int8-rows", False),
            ("llama", "float32", "tied", False, "float", True), ("qwen2", "float32", "tied", False, "float", False)):
        family = FAMILIES[model_type]
        cls = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type])
        torch.manual_seed(0)
        hf = cls(family.config_class()(**base, tie_word_embeddings=model_type == "qwen2"))
        state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
        scales = [(np.ones((2, 16)), np.ones((2, 16)))] * 2 if kv8 else None
        model, _ = family.build(hf.config, state, dtype=dtype, lm_head=head, greedy_filter=greedy, gemms=gemms,
                                kv_scales=scales)
        _hash_graph(h, model)
    return h.hexdigest()[:16]


# The Llama family's graphs, first written at revision 6.
LLAMA_FINGERPRINTS = {6: "e1267eac2a022881"}


def test_graph_revision_names_the_llama_graphs_too():
    from export.skeleton import GRAPH_REVISION
    got = _llama_fingerprint()
    assert LLAMA_FINGERPRINTS.get(GRAPH_REVISION) == got, (
        f"the Llama family's nodes changed (fingerprint {got}): bump GRAPH_REVISION in export/skeleton.py "
        f"(now {GRAPH_REVISION}) and pin the fingerprint here")


def test_manifest_records_the_graph_revision(exported):
    from export.skeleton import GRAPH_REVISION
    data = json.loads((exported["tiny-a"] / "manifest.json").read_text())
    assert data["exporter"]["graph_revision"] == GRAPH_REVISION
