"""The CPU peers, each in its own fresh process: OpenVINO GenAI, llama.cpp and CTranslate2.

    python -m benchmarks.cpu_peers --worker PEER --precision P --workload W --threads 2 [--model-root models/peers]
                                   [--tiny]
    python -m benchmarks.cpu_peers [--tiny] [--peers ...] [--workloads ...] [--rounds 1]     every case, each alone

Run in .venv-peers (`bash scripts/setup_peers.sh`, then `python -m benchmarks.peer_models [--tiny]` for the
models). A worker prints exactly one line `RESULT {json}` (benchmarks.isolate's protocol) and raises, with
the reason, when it cannot run; the runner records that. Without --worker, every (peer, precision,
workload) runs alone through benchmarks.isolate.run_rounds and the results go to benchmarks/out/.

Peers and precisions (weights / compute / KV cache are recorded in each result as the peer reports them):
    openvino   fp32-default  fp32 IR, the CPU plugin's defaults (on an AVX-512 BF16 CPU: bf16 inference, u8 KV cache)
               fp32-strict   fp32 IR, INFERENCE_PRECISION_HINT f32 + KV_CACHE_PRECISION f32
               int8, int4    NNCF weight compression (int4: sym, group 128, ratio 1.0), plugin defaults otherwise
    llamacpp   f32, q8_0, q4_0  GGUF (llama-quantize), llama.cpp's defaults (f16 KV cache, flash attention auto)
    ct2        float32, int8    CTranslate2 compute_type of the same name
Workloads (greedy, token ids only, no text; every system gets `--threads` threads, 2 by default):
    decode        one sequence, a prompt of P random ids (P = 32 and 512), then N = 64 tokens; ms per generated
                  token after the first
    first-token   time to first token for prompts of 32 and 512 random ids, median of 5 after 1 untimed
    serving       benchmarks.serving's workload (48 requests, prompts U[8,128], outputs U[32,256], seed 0, all at
                  once), each request exactly its output length; generated tokens / wall time, TTFT p50/p99
    shared-prefix benchmarks.shared_prefix's workload (16 requests = one 512-token prefix + 16 distinct tokens,
                  32 new tokens each, all at once); total seconds
--tiny runs the same on the tiny models with smaller sizes (smoke tests; not results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:                                   # benchmarks.isolate needs numpy only
    from .isolate import emit, out_dir, run_rounds
except ImportError:                    # pragma: no cover - run as a plain script
    from benchmarks.isolate import emit, out_dir, run_rounds

REPO = Path(__file__).resolve().parent.parent
LLAMA_BIN = REPO / "build" / "llama.cpp" / "build" / "bin"
LLAMA_SDIST = REPO / "build" / "llama.cpp" / "sdist"

PRECISIONS = {
    "openvino": ("fp32-default", "fp32-strict", "int8", "int4"),
    "llamacpp": ("f32", "q8_0", "q4_0"),
    "ct2": ("float32", "int8"),
}
WORKLOADS = ("decode", "first-token", "serving", "shared-prefix")

# The sizes: "gpt2" are the ones to report; "tiny" the same shapes scaled to the tiny model (256 positions).
SIZES = {
    "gpt2": {"decode_prompts": (32, 512), "decode_new": 64, "decode_timed": 3,
             "first_prompts": (32, 512), "first_timed": 5,
             "serving": {"n": 48, "seed": 0, "prompt": (8, 128), "out": (32, 256)},
             "shared": {"requests": 16, "prefix": 512, "suffix": 16, "new": 32, "seed": 0},
             "server_ctx_per_slot": {"serving": 512, "shared-prefix": 1024}},
    "tiny": {"decode_prompts": (32, 128), "decode_new": 16, "decode_timed": 3,
             "first_prompts": (32, 128), "first_timed": 5,
             "serving": {"n": 12, "seed": 0, "prompt": (8, 64), "out": (8, 32)},
             "shared": {"requests": 16, "prefix": 128, "suffix": 16, "new": 8, "seed": 0},
             "server_ctx_per_slot": {"serving": 128, "shared-prefix": 256}},
}
# --short (scripts/run.sh's short run, GPT-2 small): one prompt length, fewer tokens and requests; not the published sizes
SHORT = {"decode_prompts": (32,), "decode_new": 32, "decode_timed": 2, "first_prompts": (32,), "first_timed": 3,
         "serving": {"n": 16, "seed": 0, "prompt": (8, 64), "out": (16, 64)},
         "shared": {"requests": 8, "prefix": 256, "suffix": 16, "new": 16, "seed": 0},
         "server_ctx_per_slot": {"serving": 512, "shared-prefix": 1024}}
SERVING_SLOTS = 16


# -- workloads (the same ids every system gets) ----------------------------------------------------------
def serving_workload(n: int, vocab: int, seed: int, prompt=(8, 128), out=(32, 256)) -> list[dict]:
    """benchmarks.serving.workload(n, vocab, seed, "all", ...) replicated: the same draws in the same order."""
    rng = np.random.default_rng(seed)
    lens, outs = rng.integers(prompt[0], prompt[1] + 1, n), rng.integers(out[0], out[1] + 1, n)
    prompts = [rng.integers(0, vocab - 1, int(k)) for k in lens]
    return [{"prompt": p, "out": int(o), "arrival": 0.0} for p, o in zip(prompts, outs)]


def shared_prefix_workload(requests: int, prefix: int, suffix: int, vocab: int, seed: int) -> list[np.ndarray]:
    """benchmarks.shared_prefix's prompts replicated: one prefix, then `suffix` distinct ids per request."""
    rng = np.random.default_rng(seed)
    head = rng.integers(0, vocab, prefix)
    return [np.concatenate([head, rng.integers(0, vocab, suffix)]) for _ in range(requests)]


def workload_requests(workload: str, sz: dict, vocab: int) -> list[dict]:
    """[{"prompt": ids, "out": new tokens}] of the serving or the shared-prefix workload at sizes `sz`."""
    if workload == "serving":
        w = sz["serving"]
        return serving_workload(w["n"], vocab, w["seed"], w["prompt"], w["out"])
    w = sz["shared"]
    return [{"prompt": p, "out": w["new"]}
            for p in shared_prefix_workload(w["requests"], w["prefix"], w["suffix"], vocab, w["seed"])]


def random_prompt(length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab - 1, length)


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def environment(threads: int) -> dict:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def hf_config(root: Path, model: str) -> dict:
    p = root / f"{model}-hf" / "config.json"
    if not p.exists():
        raise SystemExit(f"{p} is missing: run `python -m benchmarks.peer_models{' --tiny' if model == 'tiny' else ''}`")
    return json.loads(p.read_text())


def need(path: Path, model: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m benchmarks.peer_models{' --tiny' if model == 'tiny' else ''}`")
    return path


# -- OpenVINO GenAI -------------------------------------------------------------------------------------------
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


# -- llama.cpp -----------------------------------------------------------------------------------------------
def llama_tool(name: str) -> Path:
    p = LLAMA_BIN / name
    if not p.exists():
        raise SystemExit(f"{p} is missing: run `bash scripts/setup_peers.sh`")
    return p


def llama_info(a, root: Path) -> tuple[Path, dict]:
    path = need(root / f"{a.model}-{a.precision}.gguf", a.model)
    p = subprocess.run([str(llama_tool("llama-bench")), "--version"], capture_output=True, text=True)
    sdist = sorted(LLAMA_SDIST.glob("llama_cpp_python-*.tar.gz"))
    weights = {"f32": "f32 (convert_hf_to_gguf --outtype f32)",
               "q8_0": "Q8_0 (llama-quantize: 8-bit blocks of 32, an f16 scale each), the token embedding included",
               "q4_0": "Q4_0 (llama-quantize: 4-bit blocks of 32, an f16 scale each) for the blocks' matrices; the "
                       "token embedding, which GPT-2 ties to the output, Q6_K (llama-quantize's default for it)"}[a.precision]
    compute = {"f32": "f32 matrix products",
               "q8_0": "quantized dot products: activations quantized to Q8_0 per block of 32 (ggml's vec_dot_type)",
               "q4_0": "quantized dot products: activations quantized to Q8_0 per block of 32 (ggml's vec_dot_type)"}
    info = {"peer": "llamacpp",
            "versions": {"llama.cpp": " ".join((p.stdout + p.stderr).split()),
                         "source": sdist[0].name if sdist else "llama-cpp-python sdist (vendor/llama.cpp)"},
            "precision_detail": {"weights": weights, "compute": compute[a.precision],
                                 "kv_cache": "f16 K and V (llama.cpp's default -ctk/-ctv f16)"},
            "model_path": str(path)}
    return path, info


def llama_bench(a, root: Path, sz: dict) -> dict:
    path, info = llama_info(a, root)
    if a.workload == "decode":
        n = sz["decode_new"]
        depths = ",".join(str(p) for p in sz["decode_prompts"])
        args = ["-p", "0", "-n", str(n), "-d", depths]
    else:
        args = ["-p", ",".join(str(p) for p in sz["first_prompts"]), "-n", "0"]
    reps = sz["first_timed"] if a.workload == "first-token" else 5
    cmd = [str(llama_tool("llama-bench")), "-m", str(path), "-t", str(a.threads), *args, "-r", str(reps), "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {p.returncode}): " + " | ".join(p.stderr.strip().splitlines()[-3:]))
    rows = json.loads(p.stdout)
    numbers = {}
    for r in rows:
        samples_ms = [s / 1e6 for s in r.get("samples_ns", [])]
        if a.workload == "decode":
            per = [s / r["n_gen"] for s in samples_ms]
            numbers[f"P{r['n_depth']}"] = {"ms_per_token": statistics.median(per), "runs_ms_per_token": per,
                                           "avg_tokens_per_s": r.get("avg_ts")}
        else:
            numbers[f"P{r['n_prompt']}"] = {"ttft_ms": statistics.median(samples_ms), "runs_ms": samples_ms,
                                            "avg_prompt_tokens_per_s": r.get("avg_ts")}
    keep = ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "model_n_params",
            "n_batch", "n_ubatch", "n_threads", "cpu_mask", "poll", "type_k", "type_v", "n_gpu_layers", "flash_attn",
            "use_mmap", "embeddings", "no_op_offload")
    reported = {k: rows[0].get(k) for k in keep if rows and k in rows[0]}
    info["precision_detail"]["kv_cache"] = f"K {reported.get('type_k')}, V {reported.get('type_v')} (llama-bench)"
    settings = {"command": cmd, "llama_bench_reports": reported,
                "measure": ("decode at depth: each repetition fills the context with P random tokens (untimed), then "
                            f"times {sz['decode_new']} single-token decodes; ms/token = median over repetitions"
                            if a.workload == "decode" else
                            "prompt processing of P random tokens (no sampling) = time to first token; median of "
                            "the repetitions after llama-bench's warm-up run"),
                "repetitions": reps}
    return {**info, "settings": settings, "numbers": numbers}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(port: int, body: dict, t0: float) -> dict:
    """One streamed /completion request. The server holds back a chunk while the text so far ends in an
    incomplete UTF-8 sequence, which random weights produce all the time (some requests stream no token at
    all), so the chunks cannot time the tokens: the first token's time is taken from the server's own
    timings instead, as (arrival of the final chunk) - predicted_ms (llama-server's predicted_ms runs from
    the end of the prompt, where the first token is sampled, to the last token)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.request("POST", "/completion", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"/completion answered {resp.status}: {resp.read()[:200]!r}")
    first_chunk, final, stop_at = None, {}, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        msg = json.loads(line[6:])
        now = time.perf_counter() - t0
        if msg.get("tokens") and first_chunk is None:
            first_chunk = now
        if msg.get("stop"):
            final, stop_at = msg, now
            break
    conn.close()
    tm = final.get("timings") or {}
    return {"last": stop_at, "first": stop_at - tm.get("predicted_ms", 0.0) / 1000.0, "first_chunk": first_chunk,
            "tokens_predicted": final.get("tokens_predicted"), "prompt_n": tm.get("prompt_n"),
            "cache_n": tm.get("cache_n"), "prompt_ms": tm.get("prompt_ms"), "predicted_ms": tm.get("predicted_ms")}


def llama_server(a, root: Path, vocab: int, sz: dict) -> dict:
    path, info = llama_info(a, root)
    ctx = sz["server_ctx_per_slot"][a.workload]
    port = free_port()
    cmd = [str(llama_tool("llama-server")), "-m", str(path), "-t", str(a.threads), "-tb", str(a.threads),
           "-np", str(SERVING_SLOTS), "-c", str(SERVING_SLOTS * ctx), "--host", "127.0.0.1", "--port", str(port),
           "--no-webui"]
    reqs = workload_requests(a.workload, sz, vocab)
    w = sz["serving" if a.workload == "serving" else "shared"]   # recorded with the results
    logf = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                logf.seek(0)
                raise RuntimeError(f"llama-server exited ({proc.returncode}): " + " | ".join(logf.read().splitlines()[-5:]))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("llama-server did not answer /health within 300 s")
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/props", timeout=10) as r:
            props = json.loads(r.read())
        base = {"ignore_eos": True, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"], "cache_prompt": True,
                "return_tokens": True}
        warm = np.random.default_rng(1234).integers(0, vocab - 1, (2, 24))
        with ThreadPoolExecutor(2) as ex:                  # warm-up: other ids, 4 tokens
            list(ex.map(lambda x: stream_completion(port, {**base, "prompt": [int(t) for t in x], "n_predict": 4},
                                                    time.perf_counter()), warm))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(reqs)) as ex:
            futs = [ex.submit(stream_completion, port, {**base, "prompt": [int(t) for t in r["prompt"]],
                                                        "n_predict": r["out"]}, t0) for r in reqs]
            outs = [f.result() for f in futs]
        end = max(o["last"] for o in outs)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
        log_tail = Path(logf.name).read_text().splitlines()
        os.unlink(logf.name)
    predicted = [o["tokens_predicted"] for o in outs]
    if predicted != [r["out"] for r in reqs]:
        raise RuntimeError(f"tokens_predicted differ from the requested lengths: {predicted}")
    kv_lines = [ln.strip() for ln in log_tail if any(k in ln for k in ("flash_attn", "type_k", "kv_unified", "n_ctx_seq",
                                                                         "llama_kv_cache:", "n_seq_max", "system_info"))]
    gen = props.get("default_generation_settings", {})
    settings = {"command": cmd, "server": {"total_slots": props.get("total_slots"), "n_ctx": gen.get("n_ctx"),
                                           "build_info": props.get("build_info")},
                "request": {**base, "stream": True, "prompt": "token ids", "n_predict": "the request's length"},
                "client": f"{len(reqs)} concurrent streamed POST /completion from a thread pool, all sent at t0",
                "server_log": kv_lines[:20], "workload": {**w, "vocab": vocab, "arrival": "all at once"},
                "warmup": "2 requests of 24 other ids, 4 tokens each",
                "prefix_reuse": "cache_prompt reuses a slot's own previous KV (and --cache-ram's host prompt cache "
                                "on a new task); requests that arrive together in different slots share nothing"}
    ttft = [o["first"] for o in outs]
    gotten = int(sum(predicted))
    numbers = {"requests": len(reqs), "generated_tokens": gotten, "wall_s": end, "tokens_per_s": gotten / end,
               "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
               "ttft_source": "final chunk's arrival - the server's predicted_ms (see stream_completion)",
               "prompt_tokens_computed": [o["prompt_n"] for o in outs],
               "prompt_tokens_from_cache": [o["cache_n"] for o in outs],
               "requests_with_a_streamed_token": sum(o["first_chunk"] is not None for o in outs)}
    if a.workload == "shared-prefix":
        numbers = {"total_s": end, **numbers}
    return {**info, "settings": settings, "numbers": numbers}


# -- CTranslate2 -------------------------------------------------------------------------------------------
def ct2_setup(a, root: Path):
    import ctranslate2
    path = need(root / f"{a.model}-ct2-{a.precision}", a.model)
    gen = ctranslate2.Generator(str(path), device="cpu", compute_type=a.precision, intra_threads=a.threads,
                                inter_threads=1)
    vocab_file = path / "vocabulary.json"
    if vocab_file.exists():
        tokens = json.loads(vocab_file.read_text())
    else:
        tokens = (path / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    info = {"peer": "ct2", "versions": {"ctranslate2": ctranslate2.__version__},
            "precision_detail": {
                "weights": {"float32": "float32", "int8": "int8 (ct2-transformers-converter --quantization int8)"}[a.precision],
                "compute": {"float32": "float32",
                            "int8": "int8 matrix products (activations quantized on the fly), other layers float32"}[a.precision],
                "compute_type_reported": gen.compute_type,
                "kv_cache": "float32 (CTranslate2 keeps the decoder state in the activations' type)",
                "supported_compute_types_cpu": sorted(ctranslate2.get_supported_compute_types("cpu"))},
            "model_path": str(path)}
    return gen, tokens, info


def ct2_run(gen, batch: list[list[str]], lengths: list[int], **kw):
    """generate_batch with a step callback that stops each request at its own length; timestamps since the call."""
    t0 = time.perf_counter()
    stamps: list[list[float]] = [[] for _ in batch]

    def cb(step) -> bool:
        stamps[step.batch_id].append(time.perf_counter() - t0)
        return len(stamps[step.batch_id]) >= lengths[step.batch_id]

    res = gen.generate_batch(batch, max_length=max(lengths), min_length=max(lengths), include_prompt_in_result=False,
                             beam_size=1, sampling_topk=1, callback=cb, **kw)
    wall = time.perf_counter() - t0
    return res, stamps, wall


def ct2_worker(a, root: Path, vocab: int, sz: dict) -> dict:
    gen, tokens, info = ct2_setup(a, root)
    to_tok = lambda ids: [tokens[int(i)] for i in ids]                # noqa: E731
    warm = np.random.default_rng(1234).integers(0, vocab - 1, (2, 24))
    ct2_run(gen, [to_tok(x) for x in warm], [4, 4])
    numbers = {}
    common = {"api": "Generator(path, device='cpu', compute_type, intra_threads, inter_threads=1).generate_batch("
                     "token strings from vocabulary.json, include_prompt_in_result=False, beam_size 1, sampling_topk 1)",
              "threads": {"intra_threads": a.threads, "inter_threads": 1}}
    if a.workload == "decode":
        n = sz["decode_new"]
        for p in sz["decode_prompts"]:
            ct2_run(gen, [to_tok(random_prompt(p, vocab, 0))], [n])       # untimed
            runs = []
            for k in range(sz["decode_timed"]):
                res, st, wall = ct2_run(gen, [to_tok(random_prompt(p, vocab, k + 1))], [n])
                s = st[0]
                if len(s) != n or len(res[0].sequences_ids[0]) != n:
                    raise RuntimeError(f"asked for {n} tokens, got {len(s)} callbacks / {len(res[0].sequences_ids[0])} ids")
                gaps = np.diff(s) * 1000
                runs.append({"ms_per_token": float((s[-1] - s[0]) / (n - 1) * 1000), "median_gap_ms": float(np.median(gaps)),
                             "ttft_ms": s[0] * 1000, "wall_ms": wall * 1000})
            numbers[f"P{p}"] = {"ms_per_token": statistics.median(r["ms_per_token"] for r in runs), "runs": runs}
        settings = {**common, "generation": f"max_length = min_length = {n} (EOS suppressed until then)",
                    "measure": "step callback timestamps: (last - first) / (N - 1), median over "
                               f"{sz['decode_timed']} runs after 1 untimed run per prompt length, each a fresh "
                               "random prompt (seeds 1..k)"}
    elif a.workload == "first-token":
        for p in sz["first_prompts"]:
            gen.generate_batch([to_tok(random_prompt(p, vocab, 0))], max_length=1, include_prompt_in_result=False)
            ms = []
            for k in range(sz["first_timed"]):
                toks = to_tok(random_prompt(p, vocab, k + 1))
                t0 = time.perf_counter()
                gen.generate_batch([toks], max_length=1, include_prompt_in_result=False, beam_size=1, sampling_topk=1)
                ms.append((time.perf_counter() - t0) * 1000)
            numbers[f"P{p}"] = {"ttft_ms": statistics.median(ms), "runs_ms": ms}
        settings = {**common, "generation": "max_length 1",
                    "measure": f"wall time of generate_batch, median of {sz['first_timed']} after 1 untimed per "
                               "length, each a fresh random prompt (seeds 1..k)"}
    else:
        reqs = workload_requests(a.workload, sz, vocab)
        w = sz["serving" if a.workload == "serving" else "shared"]   # recorded with the results
        lengths = [r["out"] for r in reqs]
        res, st, wall = ct2_run(gen, [to_tok(r["prompt"]) for r in reqs], lengths, max_batch_size=SERVING_SLOTS)
        got = [len(s) for s in st]
        ids = [len(r.sequences_ids[0]) for r in res]
        if got != lengths or ids != lengths:
            raise RuntimeError(f"token counts differ from the requested lengths: callbacks {got}, ids {ids}")
        end = max(s[-1] for s in st)
        ttft = [s[0] for s in st]
        numbers = {"requests": len(reqs), "generated_tokens": int(sum(got)), "wall_s": end, "call_wall_s": wall,
                   "tokens_per_s": sum(got) / end, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}
        settings = {**common, "batching": f"one generate_batch over all requests, max_batch_size {SERVING_SLOTS}: CT2 "
                                          "sorts them by length and runs static batches of up to 16 one after another; "
                                          "a finished request leaves its batch, none joins a running one",
                    "generation": "max_length = min_length = the longest request; a step callback returns True at "
                                  "each request's own length, which stops that request (so each gets exactly its length)",
                    "prompts": "within a batch, the prompt tokens up to the shortest prompt are forwarded at once and "
                               "the rest are fed one step at a time (CT2's documented behaviour for "
                               "include_prompt_in_result=False with unequal lengths)",
                    "workload": {**w, "vocab": vocab, "arrival": "all at once"},
                    "warmup": "2 requests of 24 other ids, 4 tokens each"}
        if a.workload == "shared-prefix":
            numbers = {"total_s": end, **numbers}
            # CT2's one prefix cache: static_prompt (a common prompt computed once, cached, reused), first call
            head = to_tok(reqs[0]["prompt"][: w["prefix"]])
            res2, st2, wall2 = ct2_run(gen, [to_tok(r["prompt"][w["prefix"]:]) for r in reqs], lengths,
                                       max_batch_size=SERVING_SLOTS, static_prompt=head, cache_static_prompt=True)
            if [len(s) for s in st2] != lengths:
                raise RuntimeError("static_prompt run: token counts differ from the requested lengths")
            numbers["static_prompt"] = {"total_s": max(s[-1] for s in st2), "ttft_p50_s": pct([s[0] for s in st2], 50),
                                        "note": f"the same requests again in the same process, the {w['prefix']}-token prefix given "
                                                "as generate_batch(static_prompt=...), cache_static_prompt True, first "
                                                "call with it (includes computing the prefix once)"}
    return {**info, "settings": settings, "numbers": numbers}


# -- entry points ---------------------------------------------------------------------------------------------
def worker(a) -> None:
    if a.worker not in PRECISIONS:
        raise SystemExit(f"unknown peer {a.worker!r}: one of {', '.join(PRECISIONS)}")
    if a.precision not in PRECISIONS[a.worker]:
        raise SystemExit(f"{a.worker}: unknown precision {a.precision!r}: one of {', '.join(PRECISIONS[a.worker])}")
    root = a.model_root if a.model_root.is_absolute() else REPO / a.model_root
    cfg = hf_config(root, a.model)
    vocab = int(cfg["vocab_size"])
    sz = SHORT if a.short else SIZES[a.model]
    t0 = time.perf_counter()
    if a.worker == "openvino":
        res = ov_single(a, root, vocab, sz) if a.workload in ("decode", "first-token") else ov_many(a, root, vocab, sz)
    elif a.worker == "llamacpp":
        res = llama_bench(a, root, sz) if a.workload in ("decode", "first-token") else llama_server(a, root, vocab, sz)
    else:
        res = ct2_worker(a, root, vocab, sz)
    emit({"peer": a.worker, "precision": a.precision, "workload": a.workload, "model": a.model,
          "smoke_only": a.model == "tiny", "short": a.short, "threads": a.threads, **res,
          "worker_s": time.perf_counter() - t0, "environment": environment(a.threads)})


def cases(peers, workloads, model: str, threads: int, root: Path) -> dict[str, list[str]]:
    out = {}
    for peer in peers:
        for prec in PRECISIONS[peer]:
            for w in workloads:
                out[f"{peer}/{prec}/{w}"] = [peer, "--precision", prec, "--workload", w, "--threads", str(threads),
                                             "--model", model, "--model-root", str(root)]
    return out


def headline(res: dict) -> str:
    if "failed" in res:
        return "FAILED: " + res["failed"][:160]
    n = res["numbers"]
    if res["workload"] == "decode":
        return ", ".join(f"{k}: {v['ms_per_token']:.2f} ms/token" for k, v in n.items())
    if res["workload"] == "first-token":
        return ", ".join(f"{k}: {v['ttft_ms']:.1f} ms" for k, v in n.items())
    if res["workload"] == "serving":
        return f"{n['tokens_per_s']:.1f} tokens/s, TTFT p50 {n['ttft_p50_s']:.2f} s"
    return f"total {n['total_s']:.2f} s, TTFT p50 {n['ttft_p50_s']:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, metavar="PEER", help="run one case in this process: " + ", ".join(PRECISIONS))
    ap.add_argument("--precision", default=None)
    ap.add_argument("--workload", default=None, choices=WORKLOADS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-root", type=Path, default=Path("models/peers"))
    ap.add_argument("--model", default="gpt2", choices=sorted(SIZES))
    ap.add_argument("--tiny", action="store_true", help="--model tiny: the tiny models and sizes (smoke tests)")
    ap.add_argument("--short", action="store_true", help="a worker's short sizes (scripts/run.sh's short run; not results)")
    ap.add_argument("--peers", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.tiny:
        a.model = "tiny"
    if a.worker:
        if not (a.precision and a.workload):
            ap.error("--worker needs --precision and --workload")
        worker(a)
        return
    runs = run_rounds("benchmarks.cpu_peers", cases(a.peers, a.workloads, a.model, a.threads, a.model_root),
                      a.rounds, a.timeout)
    path = out_dir(False) / f"cpu_peers-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": a.model, "rounds": a.rounds, "runs": runs}, indent=1, default=str) + "\n")
    for name, rs in runs.items():
        for r in rs:
            print(f"{name:32s} {headline(r)}")
    print(f"written: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
