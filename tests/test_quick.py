"""benchmarks.quick (scripts/run.sh's short comparison): its peer detection and its short workload; no timing."""

import numpy as np

from benchmarks import peer_workloads, quick
from benchmarks.serving import workload


def test_short_serving_requests_are_benchmarks_serving_workload():
    w = peer_workloads.SHORT["serving"]
    ours = workload(w["n"], 50257, w["seed"], "all", 1.0, w["prompt"], w["out"])
    peers = peer_workloads.workload_requests("serving", peer_workloads.SHORT, 50257)
    assert len(peers) == w["n"] < peer_workloads.SIZES["gpt2"]["serving"]["n"]
    for a, b in zip(ours, peers):
        assert a["out"] == b["out"] and np.array_equal(a["prompt"], b["prompt"])


def test_missing_peers_are_named_with_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setattr(quick, "PEERS_PYTHON", quick.REPO / "no-such-venv" / "bin" / "python")
    ok, skipped = quick.leaders_present()
    assert ok == [] and len(skipped) == 3
    for label, line in zip(("OpenVINO GenAI", "llama.cpp", "CTranslate2"), skipped):
        assert line.startswith(label + ": not installed") and "scripts/setup_peers.sh" in line
        assert "FAIL" not in line.upper()


def test_a_leader_missing_its_model_is_skipped_alone(monkeypatch, tmp_path):
    py = tmp_path / "python"
    py.write_text("")
    monkeypatch.setattr(quick, "PEERS_PYTHON", py)
    needs = {peer: (prec, [tmp_path / "present"] if peer != "ct2" else [quick.REPO / "models" / "peers" / "absent"], label)
             for peer, (prec, _, label) in quick.LEADERS.items()}
    (tmp_path / "present").mkdir()
    monkeypatch.setattr(quick, "LEADERS", needs)
    ok, skipped = quick.leaders_present()
    assert ok == ["openvino", "llamacpp"]
    assert len(skipped) == 1 and skipped[0].startswith("CTranslate2: models/peers/absent is missing")


def test_rows_name_what_a_peer_computed():
    res = {"precision_detail": {"weights": "fp32 (IR as exported, no compression)",
                                "compute": "inference precision bf16; compressed weights run with ...", "kv_cache": "u8"}}
    assert quick.detail(res) == "fp32 / inference precision bf16 / u8"
    assert quick.detail({}) == ""


def test_peers_are_paired_with_our_export_that_computes_alike():
    pairs = quick.pairing(["openvino", "llamacpp"], "kvcache-infer w8a8-kv8")
    assert pairs == {"OpenVINO GenAI fp32-strict": ("openvino", "fp32-strict", "kvcache-infer fp32"),
                     "OpenVINO GenAI fp32-default": ("openvino", "fp32-default", "kvcache-infer w8a8-kv8"),
                     "llama.cpp f32": ("llamacpp", "f32", "kvcache-infer fp32")}
    assert "OpenVINO GenAI fp32-default" not in quick.pairing(["openvino"], None)       # --best none
