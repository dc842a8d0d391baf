"""The comparison suite's systems decode the same tokens as PyTorch, and the suite reports every one.

A benchmark that compares systems doing different work is meaningless: every adapter in
benchmarks/peers.py must produce PyTorch's greedy tokens (reference: no cache, the whole prefix
recomputed in GPT2LMHeadModel), at batch 2, through its own cache.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import suite
from benchmarks.peers import GenAI, HFEager, NoCache, OptimumORT, Ours, PlainOrtLoop
from tests.conftest import hf_logits

STEPS = 10


def reference_tokens(hf, prompt: np.ndarray, steps: int) -> np.ndarray:
    ids, out = prompt, []
    for _ in range(steps + 1):
        nxt = hf_logits(hf, ids)[:, -1].argmax(-1)
        out.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return np.stack(out, axis=1)                                     # [B, steps + 1]


@pytest.fixture(scope="module")
def systems(exported, optimum_dir, hf_models):
    ours = exported["tiny-a"]
    cap = {2: 64}
    return [Ours(ours, 2, cap), NoCache(ours, 2, cap), HFEager(hf_models["tiny-a"], 2),
            OptimumORT(optimum_dir, 2, io_binding=False), OptimumORT(optimum_dir, 2, io_binding=True),
            PlainOrtLoop(optimum_dir, 2), GenAI(optimum_dir, 2, 64)]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_system_decodes_pytorchs_greedy_tokens(systems, hf_models, seed):
    prompt = np.random.default_rng(seed).integers(0, 1000, size=(2, 9))
    want = reference_tokens(hf_models["tiny-a"], prompt, STEPS)
    for s in systems:
        tok = s.start(prompt)
        got = [tok]
        for _ in range(STEPS):
            tok = s.step(tok)
            got.append(tok)
        np.testing.assert_array_equal(np.stack(got, axis=1), want, err_msg=s.name)


def test_a_second_sequence_starts_from_an_empty_cache(systems, hf_models):
    rng = np.random.default_rng(5)
    first, second = rng.integers(0, 1000, size=(2, 7)), rng.integers(0, 1000, size=(2, 4))
    want = reference_tokens(hf_models["tiny-a"], second, 3)
    for s in systems:
        s.start(first)
        s.step(s.step(np.zeros(2, np.int64)))
        tok = s.start(second)
        got = [tok]
        for _ in range(3):
            tok = s.step(tok)
            got.append(tok)
        np.testing.assert_array_equal(np.stack(got, axis=1), want, err_msg=s.name)


def test_suite_runs_every_system_alone_and_writes_its_reports(tmp_path):
    out = tmp_path / "results"
    suite.main(["--configs", "tiny", "--models-dir", str(tmp_path / "models"), "--out-dir", str(out), "--rounds", "1",
                "--repeats", "1", "--batch-repeats", "1", "--positions", "32", "--batches", "1", "2",
                "--batch-position", "32", "--prompt-lens", "8", "32", "--chunk", "16", "--contexts", "10",
                "--steps", "2", "--warmup", "1", "--nocache-steps", "1", "--nocache-repeats", "1",
                "--mem-seq-lens", "64", "128", "--weights", "int4"])
    r = json.loads((out / "suite_tiny_cpu.json").read_text())
    assert r["failed"] == {}
    assert set(r["decode"]) == {*suite.ALL, "kvcache-infer-int4"}
    for name in [*suite.ALL, "kvcache-infer-int4"]:
        assert len(r["per_round"][name]) == 1 and "environment" in r["per_round"][name][0]   # its own process
        if name != "no-cache":
            assert set(r["decode"][name]) == {"1", "2"}, name       # the batch sweep reached everyone
            assert r["decode"][name]["1"]["32"]["steps_per_round"] == 2
            assert set(r["first_token"][name]) == {"8", "32"}
    assert set(r["decode"]["no-cache"]["1"]) == {"10"}
    ours = r["decode"]["kvcache-infer"]["1"]["32"]
    assert 0 < ours["fraction_of_floor"]
    assert ours["bytes_read"] > r["model"]["variants"]["kvcache-infer"]["weight_bytes_per_step"]
    assert all(p["median"] > 0 for rounds in r["bandwidth"].values() for p in rounds)
    assert set(r["prefill_chunked"]["kvcache-infer"]) == {"32"}
    assert [(x["max_seq_len"], x["batch"]) for x in r["memory"]] == [(64, 1), (64, 2), (128, 1), (128, 2)]
    assert all(x["equal"] for x in r["memory"])
    assert "tiny decode@32 vs ort-plain" in r["checks"]
    int4 = r["model"]["variants"]["kvcache-infer-int4"]                 # its own floor, from its own file
    assert int4["weight_bytes_per_step"] < r["model"]["variants"]["kvcache-infer"]["weight_bytes_per_step"]
    assert r["decode"]["kvcache-infer-int4"]["1"]["32"]["floor_ms"] < ours["floor_ms"]
    for kind in ("latency", "batch", "first_token", "memory"):
        assert (out / f"suite_tiny_cpu_{kind}.png").stat().st_size > 1000
    md = (out / "RESULTS.md").read_text()
    assert "| 32 |" in md and "| int4 |" in md and "FAIL" not in md


def _cell(ms):
    return {"median_ms": ms, "min_ms": ms, "max_ms": ms, "n": 1, "tokens_per_s": 1e3 / ms}


def test_targets_compare_with_the_best_peer_only():
    """no-cache is not a peer; the fastest real peer is the target's reference."""
    d = {n: {"1": {"32": _cell(10.0), "512": _cell(10.0)}} for n in suite.PEERS}
    d["ort-plain"]["1"]["32"] = _cell(9.0)
    d["no-cache"] = {"1": {"32": _cell(1.0), "512": _cell(1.0)}}
    d["kvcache-infer"] = {"1": {"32": _cell(7.2), "512": _cell(7.4)}}
    ft = {n: {"32": _cell(50.0), "512": _cell(700.0)} for n in suite.PEERS}
    ft["kvcache-infer"] = {"32": _cell(35.0), "512": _cell(520.0)}
    r = {"config": "gpt2", "decode": d, "first_token": ft, "memory": []}
    c = suite.checks(r)
    assert c["decode@32 vs best peer"]["best_peer"] == "ort-plain"
    assert c["decode@32 vs best peer"]["value"] == pytest.approx(0.8) and c["decode@32 vs best peer"]["met"]
    assert c["decode@512 vs best peer"]["value"] == pytest.approx(0.74) and c["decode@512 vs best peer"]["met"]
    assert c["first token (32-token prompt) vs best peer"]["met"]
    assert not c["first token (512-token prompt) vs best peer"]["met"]          # 520 / 700 > 0.72
    d["kvcache-infer"]["1"]["512"] = _cell(7.6)
    assert not suite.checks(r)["decode@512 vs best peer"]["met"]


@pytest.mark.parametrize("exporter", [{}, {"graph_revision": 2}])
def test_suite_refuses_an_export_of_another_graph_revision(tmp_path, exporter):
    """An export left by an older version would time the older graph under this version's name."""
    ours = tmp_path / "tiny"
    ours.mkdir()
    (tmp_path / "tiny-optimum").mkdir()
    (tmp_path / "tiny-optimum" / "model.onnx").write_bytes(b"")
    manifest = {"source": {"kind": "named-config", "config": "tiny", "seed": 0}, "tokens": "packed", "exporter": exporter}
    (ours / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "tiny-int4").mkdir()
    (tmp_path / "tiny-int4" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"graph revision") as e:
        suite.ensure_exports("tiny", 0, tmp_path, weights=["int4"])
    msg = str(e.value)
    assert f"python -m export --config tiny --seed 0 --out {ours}\n" in msg + "\n"          # every stale one named
    assert f"python -m export --config tiny --seed 0 --out {tmp_path / 'tiny-int4'} --weights int4" in msg
    for d in ("tiny", "tiny-int4"):                                             # nothing of the user's touched
        assert json.loads((tmp_path / d / "manifest.json").read_text()) == manifest
