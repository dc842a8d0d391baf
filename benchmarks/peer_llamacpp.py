"""llama.cpp as a CPU peer (benchmarks/cpu_peers.py): llama-bench for one sequence, llama-server
(streamed HTTP completions, one slot per sequence) for many; run in .venv-peers."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .peer_workloads import LLAMA_BIN, LLAMA_SDIST, SERVING_SLOTS, need, pct, workload_requests


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
