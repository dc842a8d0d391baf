"""OpenVINO GenAI as a CPU peer (benchmarks/cpu_peers.py): LLMPipeline for one sequence,
ContinuousBatchingPipeline for many; run in .venv-peers."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .peer_workloads import SERVING_SLOTS, need, pct, random_prompt, workload_requests


def ov_setup(a, root: Path) -> tuple[Path, dict, dict]:
    import openvino as ov
    import openvino_genai
    import openvino_tokenizers

    fmt = {"fp32-default": "fp32", "fp32-strict": "fp32", "int8": "int8", "int4": "int4"}[a.precision]
    path = need(root / f"{a.model}-ov-{fmt}", a.model)
    props = {"INFERENCE_NUM_THREADS": a.threads}
    if a.precision == "fp32-strict":
        props.update({"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"})
    # What the CPU plugin makes of these properties (its values with them set; the defaults where not)
    core = ov.Core()
    core.set_property("CPU", {k: v for k, v in props.items() if k != "INFERENCE_NUM_THREADS"})
    plugin = {}
    for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE", "EXECUTION_MODE_HINT", "FULL_DEVICE_NAME"):
        try:
            v = core.get_property("CPU", key)
            plugin[key] = v.get_type_name() if hasattr(v, "get_type_name") else str(v)
        except Exception as e:  # noqa: BLE001 - a property this release lacks
            plugin[key] = f"(not reported: {str(e).splitlines()[0][:60]})"
    export_cmd = []
    man = root / f"{a.model}-manifest.json"
    if man.exists():
        export_cmd = json.loads(man.read_text()).get("made", {}).get(f"ov-{fmt}", {}).get("command", [])
    opt = lambda flag: export_cmd[export_cmd.index(flag) + 1] if flag in export_cmd else "?"   # noqa: E731
    weights = {"fp32": "fp32 (IR as exported, no compression)",
               "int8": "int8 weight-only, asymmetric per output channel (NNCF's default for --weight-format int8), "
                       "every matrix including the embeddings",
               "int4": f"int4 weight-only, symmetric, group size {opt('--group-size')}, ratio {opt('--ratio')} (NNCF) "
                       "for the transformer blocks' matrices; the embedding table (tied with the LM head) stays at "
                       "NNCF's backup precision, int8 asymmetric per channel"}[fmt]
    weight_types = {}
    xml = path / "openvino_model.xml"
    if xml.exists():
        import re
        from collections import Counter
        weight_types = dict(Counter(re.findall(r'element_type="([a-z0-9]+)"', xml.read_text())))
    compute = f"inference precision {plugin['INFERENCE_PRECISION_HINT']}"
    if fmt != "fp32":
        compute += (f"; compressed weights run with dynamic activation quantization, group size "
                    f"{plugin['DYNAMIC_QUANTIZATION_GROUP_SIZE']} (CPU plugin)")
    info = {"peer": "openvino", "versions": {"openvino": ov.__version__, "openvino_genai": openvino_genai.__version__,
                                             "openvino_tokenizers": getattr(openvino_tokenizers, "__version__", "?")},
            "precision_detail": {"weights": weights, "compute": compute, "kv_cache": plugin["KV_CACHE_PRECISION"],
                                 "export_command": export_cmd, "ir_element_types": weight_types,
                                 "plugin_properties": plugin},
            "model_path": str(path)}
    return path, props, info


OV_REUSE_NOTE = ("LLMPipeline reuses the cache of a prompt it has seen (observed here: the same 128 ids again took "
                 "0.2 ms to first token instead of 0.55 ms on the tiny model), so no timed run repeats a prompt")


def ov_config(new_tokens: int):
    import openvino_genai
    c = openvino_genai.GenerationConfig()
    c.max_new_tokens = new_tokens
    c.min_new_tokens = new_tokens
    c.ignore_eos = True
    c.do_sample = False
    return c


def ov_single(a, root: Path, vocab: int, sz: dict) -> dict:
    import openvino as ov
    import openvino_genai
    path, props, info = ov_setup(a, root)
    pipe = openvino_genai.LLMPipeline(str(path), "CPU", **props)
    tensor = lambda ids: ov.Tensor(np.ascontiguousarray(ids[None, :].astype(np.int64)))   # noqa: E731
    pipe.generate(tensor(random_prompt(16, vocab, 99)), ov_config(8))          # warm-up: load, first shapes
    numbers = {}
    if a.workload == "decode":
        n = sz["decode_new"]
        for p in sz["decode_prompts"]:
            pipe.generate(tensor(random_prompt(p, vocab, 0)), ov_config(n))   # untimed: this length's shapes
            runs = []
            for k in range(sz["decode_timed"]):
                r = pipe.generate(tensor(random_prompt(p, vocab, k + 1)), ov_config(n))
                pm = r.perf_metrics
                durs = [d / 1000.0 for d in pm.raw_metrics.m_durations]      # us -> ms, the gaps after the first token
                if len(r.tokens[0]) != n:
                    raise RuntimeError(f"asked for {n} tokens, got {len(r.tokens[0])}")
                runs.append({"tpot_ms": pm.get_tpot().mean, "mean_gap_ms": float(np.mean(durs)),
                             "median_gap_ms": float(np.median(durs)), "ttft_ms": pm.get_ttft().mean,
                             "generated": len(r.tokens[0])})
            numbers[f"P{p}"] = {"ms_per_token": statistics.median(x["tpot_ms"] for x in runs), "runs": runs}
        settings = {"api": "LLMPipeline(path, 'CPU', **props).generate(ov.Tensor(ids[None]), GenerationConfig)",
                    "generation": f"max_new_tokens = min_new_tokens = {n}, ignore_eos, do_sample False",
                    "measure": "perf_metrics.get_tpot().mean (GenAI's mean gap between tokens after the first), "
                               f"median over {sz['decode_timed']} runs after 1 untimed run per prompt length, "
                               "each run a fresh random prompt (seeds 1..k; the untimed one seed 0)",
                    "note": OV_REUSE_NOTE,
                    "properties": props}
    else:
        for p in sz["first_prompts"]:
            pipe.generate(tensor(random_prompt(p, vocab, 0)), ov_config(1))   # untimed
            ttft, wall = [], []
            for k in range(sz["first_timed"]):
                ids = random_prompt(p, vocab, k + 1)
                t0 = time.perf_counter()
                r = pipe.generate(tensor(ids), ov_config(1))
                wall.append((time.perf_counter() - t0) * 1000)
                ttft.append(r.perf_metrics.get_ttft().mean)
            numbers[f"P{p}"] = {"ttft_ms": statistics.median(ttft), "ttft_runs_ms": ttft,
                                "generate_wall_ms": statistics.median(wall)}
        settings = {"api": "LLMPipeline.generate(ov.Tensor(ids[None]), max_new_tokens 1)",
                    "measure": f"perf_metrics.get_ttft(), median of {sz['first_timed']} after 1 untimed per length, "
                               "each run a fresh random prompt (seeds 1..k; the untimed one seed 0)",
                    "note": OV_REUSE_NOTE,
                    "properties": props}
    return {**info, "settings": settings, "numbers": numbers}


def ov_many(a, root: Path, vocab: int, sz: dict) -> dict:
    """ContinuousBatchingPipeline: every request added at once, then step() until done; each handle read after
    every step, which timestamps its tokens (time to first token from submission)."""
    import openvino as ov
    import openvino_genai
    path, props, info = ov_setup(a, root)
    sc = openvino_genai.SchedulerConfig()
    sc.max_num_seqs = SERVING_SLOTS
    sc.cache_size = 2                                       # GB
    sc.enable_prefix_caching = a.workload == "shared-prefix"
    pipe = openvino_genai.ContinuousBatchingPipeline(str(path), sc, "CPU", props)
    tensor = lambda ids: ov.Tensor(np.ascontiguousarray(np.asarray(ids, np.int64)[None, :]))   # noqa: E731
    reqs = workload_requests(a.workload, sz, vocab)
    w = sz["serving" if a.workload == "serving" else "shared"]   # recorded with the results
    warm = np.random.default_rng(1234).integers(0, vocab - 1, (2, 24))      # other ids: nothing is reused
    pipe.generate([tensor(x) for x in warm], [ov_config(4), ov_config(4)])

    t0 = time.perf_counter()
    handles = [pipe.add_request(1000 + i, tensor(r["prompt"]), ov_config(r["out"])) for i, r in enumerate(reqs)]
    got = [0] * len(reqs)
    first = [None] * len(reqs)
    last = [None] * len(reqs)
    steps = 0

    def drain(now: float) -> None:
        for i, h in enumerate(handles):
            if h.can_read():
                k = sum(len(o.generated_ids) for o in h.read().values())
                if k:
                    got[i] += k
                    first[i] = first[i] if first[i] is not None else now
                    last[i] = now

    while pipe.has_non_finished_requests():
        pipe.step()
        steps += 1
        drain(time.perf_counter() - t0)
    drain(time.perf_counter() - t0)
    end = max(x for x in last if x is not None)
    if got != [r["out"] for r in reqs]:
        raise RuntimeError(f"token counts differ from the requested lengths: got {got}")
    m = pipe.get_metrics()
    metrics = {k: getattr(m, k) for k in ("kv_cache_size_in_bytes", "cache_size_in_bytes", "max_cache_usage",
                                          "avg_cache_usage") if hasattr(m, k)}
    settings = {"api": "ContinuousBatchingPipeline(path, SchedulerConfig, 'CPU', props): add_request(id, "
                       "ov.Tensor(ids[None]), GenerationConfig) for every request at t0, then step() until "
                       "has_non_finished_requests() is false, every handle read after each step",
                "scheduler": {"max_num_seqs": sc.max_num_seqs, "cache_size_gb": sc.cache_size,
                              "enable_prefix_caching": sc.enable_prefix_caching,
                              "max_num_batched_tokens": sc.max_num_batched_tokens,
                              "dynamic_split_fuse": sc.dynamic_split_fuse},
                "generation": "max_new_tokens = min_new_tokens = the request's length, ignore_eos, greedy",
                "properties": props, "workload": {**w, "vocab": vocab, "arrival": "all at once"},
                "warmup": "2 requests of 24 other ids, 4 tokens each"}
    if a.workload == "shared-prefix":
        settings["prefix_reuse"] = ("the prefix cache is looked up when a request is added; with all 16 added at once "
                                    "nothing is cached yet, so nothing is shared (seen on the tiny model: 17 steps "
                                    "with prefix caching on or off; the same 16 prompts again after them: 8 steps, "
                                    "decode only)")
    ttft = [f for f in first]
    numbers = {"requests": len(reqs), "generated_tokens": int(sum(got)), "wall_s": end,
               "tokens_per_s": sum(got) / end, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
               "steps": steps, "pipeline_metrics": metrics}
    if a.workload == "shared-prefix":
        numbers = {"total_s": end, **numbers}
    return {**info, "settings": settings, "numbers": numbers}
