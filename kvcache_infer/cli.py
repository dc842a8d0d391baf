"""kvcache-infer: generate, serve, bench, profile, info. Errors are one line on stderr, exit status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .bench import time_decode_steps
from .errors import CapacityError, KVCacheError

DEFAULT_MODEL = os.environ.get("KVCACHE_INFER_MODEL", "pybytes")   # installed with the package
API_KEY_ENV = "KVCACHE_INFER_API_KEY"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas or spaces, got {text!r}") from None


def _model_args(p: argparse.ArgumentParser, runs: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder with model.onnx and manifest.json (default: {DEFAULT_MODEL}, or $KVCACHE_INFER_MODEL)")
    if runs:
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="execution device (default cpu)")
        p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice)")


def _inferencer(a, max_seq_len=None):
    from .inferencer import KVCacheInferencer
    return KVCacheInferencer(a.model, device=a.device, intra_op_threads=a.threads, max_seq_len=max_seq_len)


def cmd_generate(a) -> int:
    inf = _inferencer(a)
    prompt = a.prompt if a.ids is None else a.ids
    try:
        pieces = inf.stream(prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            seed=a.seed, stop_ids=a.stop_ids or (),   # validated here, before any output
                            speculative=_speculative(a))
    except CapacityError:
        n = len(inf.model.tokenizer.encode(prompt).ids) if isinstance(prompt, str) else len(prompt)
        raise KVCacheError(f"the prompt ({n} tokens) and --max-new-tokens {a.max_new_tokens} need {n + a.max_new_tokens - 1} "
                           f"positions, but {a.model} takes at most {inf.capacity}; lower --max-new-tokens to at most "
                           f"{max(inf.capacity - n + 1, 0)} or shorten the prompt") from None
    if a.ids is None:
        print(a.prompt, end="", flush=True)                          # text: the continuation follows it
    t0 = time.perf_counter()
    n = 0
    for piece in pieces:
        print(piece if isinstance(piece, str) else f"{piece} ", end="", flush=True)
        n += 1
    wall = time.perf_counter() - t0
    m = inf.metrics
    print(file=sys.stderr)
    print(f"[{n} new tokens in {wall:.2f} s | first token {m.first_token_ms:.2f} ms | cached token "
          f"p50 {m.cached_token_p50_ms or 0:.3f} ms, p90 {m.cached_token_p90_ms or 0:.3f} ms | "
          f"{inf.device}, {inf.manifest.dtype}]", file=sys.stderr)
    return 0


SPECULATIVE_HELP = ("guess tokens and verify them in the same run: 'lookup' (prompt lookup: n-grams of the text "
                    "itself) or 'draft:PATH' (a smaller export with the same vocabulary); greedy output is "
                    "unchanged, sampling keeps its distribution")


def _speculative(a):
    """--speculative as a Proposer (None without it); errors name the option."""
    if a.speculative is None:
        return None
    from .runtime.speculative import proposer_arg
    try:
        return proposer_arg(a.speculative, "--speculative")
    except KVCacheError as e:
        raise KVCacheError(str(e).replace(", a Proposer or None", "")) from None


def cmd_serve(a) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise KVCacheError(f"`kvcache-infer serve` needs the serve extra ({e.name} is missing): "
                           "pip install 'kvcache-infer[serve]'") from None
    from .engine import Engine
    from .serve.app import ServeLimits, serve
    if a.replicas is not None:
        if a.replicas < 1:
            raise KVCacheError(f"--replicas must be >= 1, got {a.replicas}")
        if a.device != "cpu":
            raise KVCacheError("--replicas runs CPU replicas in this version; for CUDA serve one process: "
                               "drop --replicas")
        try:
            import ray.serve  # noqa: F401
        except ImportError as e:
            raise KVCacheError(f"--replicas needs the ray extra ({e.name} is missing): "
                               "pip install 'kvcache-infer[serve,ray]'") from None
        if a.threads is None and a.address is None:
            a.threads = max(1, (os.cpu_count() or 1) // a.replicas)      # the replicas share this machine
    elif a.address is not None:
        raise KVCacheError("--address names a Ray cluster for --replicas; add --replicas N")
    for opt, v, low in (("--port", a.port, 0), ("--max-sequences", a.max_sequences, 1), ("--max-queue", a.max_queue, 0),
                        ("--max-body-bytes", a.max_body_bytes, 1), ("--max-chunk", a.max_chunk, 1),
                        ("--prefill-budget", 1 if a.prefill_budget is None else a.prefill_budget, 1)):
        if v < low:
            raise KVCacheError(f"{opt} must be >= {low}, got {v}")
    if a.request_timeout <= 0:
        raise KVCacheError(f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    try:
        eng = Engine(a.model, max_sequences=a.max_sequences, max_seq_len=a.max_seq_len, max_chunk=a.max_chunk,
                     prefill_budget=a.prefill_budget, prefix_cache=not a.no_prefix_cache, device=a.device,
                     intra_op_threads=a.threads, speculative=_speculative(a))
    except KVCacheError as e:
        msg = str(e).replace("max_seq_len=", "--max-seq-len ").replace("max_sequences", "--max-sequences")
        raise KVCacheError(msg) from None
    if a.max_prompt_tokens is not None and not 1 <= a.max_prompt_tokens < eng.max_seq_len:
        raise KVCacheError(f"--max-prompt-tokens must be in [1, {eng.max_seq_len - 1}] (--max-seq-len "
                           f"{eng.max_seq_len} minus one generated token), got {a.max_prompt_tokens}")
    limits = ServeLimits(max_queue=a.max_queue, max_body_bytes=a.max_body_bytes, max_prompt_tokens=a.max_prompt_tokens,
                         request_timeout_s=a.request_timeout, api_key=a.api_key or os.environ.get(API_KEY_ENV) or None)
    where = "" if a.host in ("127.0.0.1", "localhost", "::1") else " (reachable from other machines)"
    if a.replicas is not None:                 # the Engine above only checked the options: each replica builds its own
        from .serve.ray_serve import ReplicaOptions
        options = ReplicaOptions(model=str(eng.model.dir.resolve()), name=a.served_model_name or eng.model.dir.name,
                                 max_sequences=eng.max_sequences, max_seq_len=eng.max_seq_len, max_chunk=a.max_chunk,
                                 prefill_budget=a.prefill_budget, prefix_cache=not a.no_prefix_cache,
                                 threads=a.threads, max_queue=a.max_queue,
                                 speculative=a.speculative)
        del eng
        return _serve_on_ray(a, options, limits, where)
    print(f"kvcache-infer serve: {a.served_model_name or eng.model.dir.name} ({eng.model.dir}), "
          f"{eng.max_sequences} sequences x {eng.max_seq_len} tokens, {eng.model.device}; "
          f"http://{a.host}:{a.port}/v1{where}; API key {'required' if limits.api_key else 'not required'}",
          file=sys.stderr, flush=True)
    serve(eng, host=a.host, port=a.port, model_name=a.served_model_name, limits=limits,
          shutdown_timeout_s=a.shutdown_timeout, log_level=a.log_level)
    return 0


def _serve_on_ray(a, options, limits, where) -> int:
    from .serve.ray_serve import run
    cores = os.cpu_count() or 1
    if a.address is None and a.replicas * (a.threads or 1) > cores:
        print(f"kvcache-infer serve: {a.replicas} replicas x {a.threads} threads on {cores} cores: they will "
              "take turns on the cores", file=sys.stderr)
    print(f"kvcache-infer serve: {options.name} ({options.model}), {a.replicas} Ray Serve replicas of "
          f"{options.max_sequences} sequences x {options.max_seq_len} tokens ({a.threads or 'default'} threads each), "
          f"sessions (`user`) routed by consistent hash; http://{a.host}:{a.port}/v1{where}; "
          f"API key {'required' if limits.api_key else 'not required'}", file=sys.stderr, flush=True)
    run(options, a.replicas, limits, host=a.host, port=a.port, address=a.address,
        shutdown_timeout_s=a.shutdown_timeout, log_level=a.log_level)
    return 0


def cmd_bench(a) -> int:
    inf = _inferencer(a, max_seq_len=None)
    V, cap = inf.manifest.vocab_size, inf.capacity
    positions = [p for p in a.positions if p + a.steps <= cap and p >= a.warmup]
    if not positions:
        raise KVCacheError(f"no --positions value in {a.positions} leaves room for --steps {a.steps} within the model's "
                           f"{cap} positions (and each must be >= --warmup {a.warmup})")
    ids = np.random.default_rng(0).integers(0, V, size=cap)
    greedy = a.output == "token"
    run = inf.next_tokens if greedy else inf.forward
    first = []
    for _ in range(a.repeats):
        inf.reset_cache()
        t = time.perf_counter()
        run(ids[:a.prompt_len])
        first.append((time.perf_counter() - t) * 1e3)
    res = {"model": a.model, "device": inf.device, "threads": a.threads, "dtype": inf.manifest.dtype, "output": a.output,
           "first_token_ms": {"prompt_len": a.prompt_len, "median": float(np.median(first)),
                              "min": float(min(first)), "max": float(max(first))}, "cached_token_ms": {}}
    print(f"each run returns {'the greedy next token' if greedy else 'the logits row'} (--output {a.output})")
    print(f"first token ({a.prompt_len}-token prompt): median {np.median(first):.3f} ms "
          f"(min {min(first):.3f}, max {max(first):.3f})")
    for p in positions:
        ms = [x for _ in range(a.repeats) for x in time_decode_steps(inf, ids, p, a.warmup, a.steps, greedy)]
        res["cached_token_ms"][str(p)] = {"median": float(np.median(ms)), "min": float(min(ms)), "max": float(max(ms))}
        print(f"cached token at position {p:5d}: median {np.median(ms):.3f} ms (min {min(ms):.3f}, max {max(ms):.3f})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_profile(a) -> int:
    from .runtime.cache import LAYOUTS, cache_bytes
    from .runtime.manifest import load_manifest
    from .runtime.metrics import MemoryProfile
    m = load_manifest(Path(a.model))
    if m is None:
        from .runtime.model import Model
        m = Model(a.model).manifest
    cap = a.max_seq_len or m.max_positions
    if cap > m.max_positions or cap < 1:
        raise KVCacheError(f"--max-seq-len {cap} is outside [1, {m.max_positions}] (the model's position limit)")
    if a.batch_size < 1:
        raise KVCacheError(f"--batch-size must be >= 1, got {a.batch_size}")
    total = cache_bytes(m, a.batch_size, cap)
    copies = LAYOUTS[m.layout].copies
    prof = MemoryProfile(layout=m.layout, device="(not allocated)", dtype=m.kv_dtype, total_cache_bytes=total,
                         used_cache_bytes=0, free_cache_bytes=total, bytes_per_token=m.cache_bytes_per_token,
                         tokens=0, capacity_tokens=cap * a.batch_size, active_sequences=a.batch_size,
                         io_buffer_bytes=0)
    print(f"{a.model}: {m.num_layers} layers x {m.num_kv_heads} heads x head_dim {m.head_dim}, cache {m.kv_dtype}")
    print(f"formula: {copies} x 2 x layers x heads x head_dim x max_seq_len x batch x bytes = "
          f"{copies} x 2 x {m.num_layers} x {m.num_kv_heads} x {m.head_dim} x {cap} x {a.batch_size} x "
          f"{m.cache_bytes_per_token // (2 * m.num_layers * m.num_kv_heads * m.head_dim)} = {total} bytes")
    print(prof.report())
    return 0


def cmd_info(a) -> int:
    from .runtime.model import Model
    model = Model(a.model)
    m = model.manifest
    print(f"model      : {model.file} ({model.file.stat().st_size / 1e6:.1f} MB)")
    print(f"manifest   : {m.source}")
    print(f"family     : {m.architecture}")
    print(f"geometry   : {m.num_layers} layers, {m.num_heads} heads ({m.num_kv_heads} KV), head_dim {m.head_dim}, "
          f"hidden {m.hidden_size}, vocab {m.vocab_size}, {m.max_positions} positions")
    print(f"precision  : weights {m.weights or m.dtype}, activations {m.dtype}, cache {m.kv_dtype}, logits {m.logits_dtype}")
    print(f"cache      : {m.layout} layout, {m.cache_bytes_per_token} bytes per token, attention {m.attention}")
    pick = (model.greedy_pick.reason if m.greedy_index
            else "ArgMax of the logits rows" if m.next_token else "argmax of the logits, on the host")
    print(f"greedy pick: {pick}")
    try:
        revision = json.loads((model.dir / "manifest.json").read_text()).get("exporter", {}).get("graph_revision")
    except (OSError, ValueError, AttributeError):
        revision = None
    print(f"exported   : graph revision {revision}" if revision else "exported   : graph revision not recorded")
    print(f"tokenizer  : {'tokenizer.json' if (model.dir / 'tokenizer.json').is_file() else 'none (token ids only)'}")
    print("inputs     :")
    for x in model.session.get_inputs():
        print(f"  {x.name:24s} {x.type:16s} {x.shape}")
    print("outputs    :")
    for x in model.session.get_outputs():
        print(f"  {x.name:24s} {x.type:16s} {x.shape}")
    try:
        import onnx
        g = onnx.load(str(model.file), load_external_data=False).graph
        counts: dict[str, int] = {}
        for node in g.node:
            key = f"{node.domain + '.' if node.domain else ''}{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
        print("ops        : " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    except ImportError:
        print("ops        : (install `onnx` to list the graph's operators)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvcache-infer", description="KV-cache decoding of GPT-2 and Llama-family ONNX models.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate tokens or text, streamed to the terminal",
                       description="Decode from a prompt, streaming new text (or ids) as they come, then print a "
                                   "latency summary on stderr.")
    _model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (the model folder must have a tokenizer.json)")
    src.add_argument("--ids", type=_ints, help="prompt token ids, e.g. '1,2,3'")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (default 0.8); 0 = greedy (small models fall into loops greedily)")
    g.add_argument("--top-k", type=int, default=40, help="sample only among the k most likely tokens (default 40)")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with probability >= p")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (repeatable output)")
    g.add_argument("--stop-ids", type=_ints, default=None, help="stop after any of these token ids, e.g. '0,10'")
    g.add_argument("--speculative", default=None, metavar="lookup|draft:PATH",
                   help=SPECULATIVE_HELP)
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions) over the Engine",
                       description="Serve POST /v1/completions (text or token ids, streamed or not), GET /v1/models, "
                                   "/health and /metrics (Prometheus) from one Engine with continuous batching and "
                                   "prefix reuse; with --replicas N, from N Engine replicas on Ray Serve, each "
                                   "session (`user`) on one replica. Needs the serve extra: pip install "
                                   "'kvcache-infer[serve]' (and [ray] for --replicas).")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-sequences", type=int, default=16, help="sequences decoded at once (default 16)")
    s.add_argument("--max-seq-len", type=int, default=None, help="tokens per sequence (default: the model's limit)")
    s.add_argument("--max-chunk", type=int, default=64, help="prompt tokens one sequence feeds per step (default 64)")
    s.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt tokens all sequences feed per step (default 256, at least --max-chunk; lower: fewer "
                        "pauses in streaming answers while prompts arrive, higher: prompts done sooner)")
    s.add_argument("--no-prefix-cache", action="store_true", help="do not keep finished sequences for prefix reuse")
    s.add_argument("--speculative", default=None, metavar="lookup|draft:PATH",
                   help=SPECULATIVE_HELP)
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its folder name)")
    s.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health (or set ${{{API_KEY_ENV}}})")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; past it: 429 (default 256)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt limit (default: --max-seq-len - 1)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds from arrival to the last token (default 600)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may finish before they are cancelled (default 30)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's (and with --replicas, Ray Serve's) log level (default warning)")
    s.add_argument("--replicas", type=int, default=None,
                   help="serve from N engine replicas on Ray Serve, each session (`user`) on one replica "
                        "(needs the ray extra; default: one engine in this process)")
    s.add_argument("--address", default=None,
                   help="with --replicas: a running Ray cluster's address ('auto', or HOST:6379); "
                        "default: start Ray on this machine")
    s.set_defaults(fn=cmd_serve)

    b = sub.add_parser("bench", help="first-token and cached-token latency of one model",
                       description="Time the first token of a prompt and one-token steps at several positions "
                                   "(random ids; medians with min/max). For side-by-side comparisons with other "
                                   "runtimes, use `python -m benchmarks.suite` from the checkout.")
    _model_args(b)
    b.add_argument("--prompt-len", type=int, default=32, help="prompt length for the first token (default 32)")
    b.add_argument("--positions", type=int, nargs="+", default=[32, 128, 512, 1000],
                   help="cache positions to time one-token steps at (default 32 128 512 1000; those that fit)")
    b.add_argument("--steps", type=int, default=16, help="timed steps per position and repeat (default 16)")
    b.add_argument("--warmup", type=int, default=4, help="untimed steps before each timed run (default 4)")
    b.add_argument("--repeats", type=int, default=3, help="repeats (default 3)")
    b.add_argument("--output", choices=["token", "logits"], default="token",
                   help="what each timed run returns: 'token', the greedy next token (next_tokens(), what generate "
                        "does at temperature 0 and what the comparison suite times; default), or 'logits', the last "
                        "position's logits row (forward(), what sampling needs)")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(fn=cmd_bench)

    p = sub.add_parser("profile", help="cache memory for a model and max_seq_len, without running it",
                       description="Compute the KV-cache memory from the manifest (nothing is allocated).")
    _model_args(p, runs=False)
    p.add_argument("--max-seq-len", type=int, default=None, help="cache capacity (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    p.set_defaults(fn=cmd_profile)

    i = sub.add_parser("info", help="what the manifest and the graph say",
                       description="Print geometry, precision, cache layout, I/O and the graph's operators.")
    _model_args(i, runs=False)
    i.set_defaults(fn=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except BrokenPipeError:                     # `kvcache-infer info | head -1`: the reader is gone, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # no second error when Python flushes stdout at exit
        return 0
    except (KVCacheError, OSError) as e:
        print(f"kvcache-infer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkvcache-infer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
