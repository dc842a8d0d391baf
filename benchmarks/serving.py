"""Serving throughput: many requests of different lengths, each system alone in its own process.

    python -m benchmarks.serving --model models/gpt2 [--model models/gpt2-int4] [--arrival all poisson]
                                 [--rounds 3] [--systems ...] [--publish]

Workload (seeded): 48 requests, prompt lengths U[8,128] (random ids), output lengths U[32,256]
(exactly that many tokens: no stop ids), greedy. Arrival: all submitted at once, or a Poisson
stream (--rate requests/s). Measured per request: time to first token (from its arrival), the gaps
between its tokens; per run: generated tokens / (last token - first arrival).

Systems (each what a user of that tool would write):
    engine-16, engine-8   kvcache_infer.Engine, continuous batching (max_sequences 16 / 8)
    engine-N[-pB]         the same with N slots (and a prefill budget of B prompt tokens per step; default:
                          the Engine's own), e.g. engine-48 engine-48-p64 (not run unless named)
    sequential            KVCacheInferencer.stream, one request at a time, in arrival order
    hf-static             transformers batched generate(): batches of up to 16 arrived requests,
                          left-padded, run to the batch's longest output (a streamer timestamps steps)
    hf-continuous         transformers generate_batch() (continuous batching, paged attention)
    genai-static          onnxruntime-genai batched Generator on Optimum's export, padded batches of 16
    genai-engine          onnxruntime-genai Engine (continuous batching) on Optimum's export
A system that cannot run here is recorded with the reason.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from .common import Clock, environment, pyplot, session_options
from .serving_peers import WARMUP, run_genai_engine, run_genai_static, run_hf_continuous, run_hf_static
from .isolate import emit, out_dir, run_rounds, spread

SYSTEMS = ("engine-16", "engine-8", "sequential", "hf-static", "hf-continuous", "genai-static", "genai-engine")


def workload(n: int, vocab: int, seed: int, arrival: str, rate: float, prompt=(8, 128), out=(32, 256)) -> list[dict]:
    """Requests: prompt ids (never the last id, which padded peers use as their pad token), output length,
    arrival time in seconds."""
    rng = np.random.default_rng(seed)
    lens, outs = rng.integers(prompt[0], prompt[1] + 1, n), rng.integers(out[0], out[1] + 1, n)
    prompts = [rng.integers(0, vocab - 1, int(k)) for k in lens]
    t = np.zeros(n) if arrival == "all" else np.cumsum(rng.exponential(1.0 / rate, n)) - 0.0
    if arrival != "all":
        t -= t[0]
    return [{"prompt": p, "out": int(o), "arrival": float(a)} for p, o, a in zip(prompts, outs, t)]


# -- systems: each runs the whole workload and fills recs[i]["times"] (token timestamps) ---------------
def engine_system(name: str) -> tuple[int, int | None] | None:
    """(slots, prefill budget or None) of an engine-N[-pB] system name; None for other systems."""
    m = re.fullmatch(r"engine-(\d+)(?:-p(\d+))?", name)
    return (int(m[1]), int(m[2]) if m[2] else None) if m else None


def system_arg(name: str) -> str:
    engine = engine_system(name)
    if name in SYSTEMS or (engine and engine[0] >= 1 and (engine[1] is None or engine[1] >= 1)):
        return name
    raise argparse.ArgumentTypeError(f"unknown system {name!r}: one of {', '.join(SYSTEMS)} or engine-N[-pB] "
                                     "(N slots >= 1, B prompt tokens a step >= 1)")


def run_engine(model_dir: Path, reqs: list[dict], threads: int, slots: int, prefill_budget: int | None = None) -> dict:
    from kvcache_infer import Engine, Model
    model = Model(model_dir, intra_op_threads=threads, session_options=session_options(threads))
    eng = Engine(model, max_sequences=slots, max_seq_len=512, prefill_budget=prefill_budget)
    eng.generate([r["prompt"][:16] for r in reqs[:WARMUP]], max_new_tokens=8)
    clock, pending, handles, memory = Clock(), list(range(len(reqs))), {}, []
    per = eng.manifest.cache_bytes_per_token
    while pending or eng.busy:
        while pending and reqs[pending[0]]["arrival"] <= clock.now():
            i = pending.pop(0)
            handles[eng.submit(reqs[i]["prompt"], max_new_tokens=reqs[i]["out"]).id] = i
        if not eng.busy:
            clock.wait_until(reqs[pending[0]]["arrival"])
            continue
        events = eng.tick()
        now = clock.now()
        for req, tok in events:
            r = reqs[handles[req.id]]
            r["times"].append(now)
            r["tokens"].append(int(tok))
        p = eng.memory_profile()
        lens = [s.position for s in eng.live]
        memory.append({"t": now, "active": p.active_sequences, "tokens": p.total_tokens,
                       "retained_tokens": p.retained_tokens, "used_bytes": p.used_bytes,
                       "occupied_rows_bytes": p.occupied_slots * p.rows_per_slot * per,
                       "fragmentation": p.fragmentation_ratio,
                       "block16_bytes": int(sum(-(-n // 16) * 16 for n in lens) * per)})
    prof = eng.memory_profile()
    return {"memory_timeline": memory, "total_cache_bytes": prof.total_bytes, "slots": slots,
            "prefill_budget": eng.scheduler.prefill_budget,
            "rows_per_slot": prof.rows_per_slot, "bytes_per_token": per, "engine_stats": dict(eng.stats)}


def run_sequential(model_dir: Path, reqs: list[dict], threads: int) -> dict:
    from kvcache_infer import KVCacheInferencer, Model
    model = Model(model_dir, intra_op_threads=threads, session_options=session_options(threads))
    inf = KVCacheInferencer(model, max_seq_len=512)
    for r in reqs[:WARMUP]:
        inf.reset_cache()
        inf.generate(r["prompt"][:16], 8)
    clock = Clock()
    for r in reqs:
        clock.wait_until(r["arrival"])
        inf.reset_cache()
        for tok in inf.stream(r["prompt"], r["out"]):
            r["times"].append(clock.now())
            r["tokens"].append(int(tok))
    return {}


# -- one worker ------------------------------------------------------------------------------------
def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else None


def worker(a) -> None:
    model_dir = Path(a.model[-1])
    optimum_dir = model_dir.with_name(f"{a.base}-optimum")
    vocab = json.loads((model_dir / "manifest.json").read_text())["vocab_size"]
    a.arrival = a.arrival[-1]
    reqs = workload(a.requests, vocab, a.seed, a.arrival, a.rate, a.prompt_range, a.output_range)
    for r in reqs:
        r["times"], r["tokens"] = [], []
    name = a.worker
    runners = {"sequential": lambda: run_sequential(model_dir, reqs, a.threads),
               "hf-static": lambda: run_hf_static(model_dir, reqs, a.threads),
               "hf-continuous": lambda: run_hf_continuous(model_dir, reqs, a.threads),
               "genai-static": lambda: run_genai_static(optimum_dir, reqs, a.threads),
               "genai-engine": lambda: run_genai_engine(optimum_dir, reqs, a.threads)}
    engine = engine_system(name)
    extra = run_engine(model_dir, reqs, a.threads, *engine) if engine else runners[name]()
    bad = [i for i, r in enumerate(reqs) if len(r["tokens"]) != r["out"]]
    if bad:
        raise RuntimeError(f"{len(bad)} requests got a wrong number of tokens (first: request {bad[0]}, "
                           f"{len(reqs[bad[0]]['tokens'])} of {reqs[bad[0]]['out']})")
    first = min(r["arrival"] for r in reqs)
    end = max(r["times"][-1] for r in reqs)
    tokens = sum(r["out"] for r in reqs)
    ttft = [r["times"][0] - r["arrival"] for r in reqs]
    gaps = np.concatenate([np.diff(r["times"]) for r in reqs])
    emit({"system": name, "model": str(model_dir), "arrival": a.arrival, "rate": a.rate if a.arrival != "all" else None,
          "tokens": tokens, "makespan_s": end - first, "tokens_per_s": tokens / (end - first),
          "ttft_s": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
          "per_token_ms": {"p50": 1e3 * pct(gaps, 50), "p99": 1e3 * pct(gaps, 99)},
          "outputs": [r["tokens"] for r in reqs], "environment": environment(a.threads), **extra})


# -- the driver ------------------------------------------------------------------------------------
def summarize(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "failed" not in r]
    if not ok:
        return {"failed": rounds[0]["failed"]}
    return {"tokens_per_s": spread([r["tokens_per_s"] for r in ok]),
            "ttft_p50_s": spread([r["ttft_s"]["p50"] for r in ok]), "ttft_p99_s": spread([r["ttft_s"]["p99"] for r in ok]),
            "per_token_p50_ms": spread([r["per_token_ms"]["p50"] for r in ok]),
            "per_token_p99_ms": spread([r["per_token_ms"]["p99"] for r in ok]),
            "failed_rounds": [r["failed"] for r in rounds if "failed" in r]}


def agreement(results: dict[str, list[dict]], ref: str) -> dict:
    """Per system: requests whose tokens equal the reference system's (same greedy workload)."""
    base = next((r["outputs"] for r in results.get(ref, []) if "outputs" in r), None)
    out = {}
    for name, rounds in results.items():
        got = next((r["outputs"] for r in rounds if "outputs" in r), None)
        if base is not None and got is not None:
            out[name] = sum(a == b for a, b in zip(got, base))
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = [n for n in summary if "failed" not in summary[n]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in ((axes[0], "tokens_per_s", "generated tokens/s"), (axes[1], "ttft_p50_s", "time to first token p50 (s)"),
                           (axes[2], "per_token_p50_ms", "per-token latency p50 (ms)")):
        med = [summary[n][key]["median"] for n in names]
        lo = [summary[n][key]["median"] - summary[n][key]["min"] for n in names]
        hi = [summary[n][key]["max"] - summary[n][key]["median"] for n in names]
        ax.barh(names, med, xerr=[lo, hi], color=["tab:blue" if n.startswith("engine") else "tab:gray" for n in names])
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(run: dict, path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    tl = run["memory_timeline"]
    t = [m["t"] for m in tl]
    mib, per, rows = 1 / 2**20, run["bytes_per_token"], run["rows_per_slot"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    a1.axhline(run["total_cache_bytes"] * mib, color="k", lw=0.8, ls="--", label="allocated (all slots)")
    a1.plot(t, [m["active"] * rows * per * mib for m in tl], label="slots of live sequences (what slots reserve)")
    a1.plot(t, [m["block16_bytes"] * mib for m in tl], label="blocks of 16 tokens (what paging would reserve)")
    a1.plot(t, [m["used_bytes"] * mib for m in tl], label="live tokens")
    a1.plot(t, [m["retained_tokens"] * per * mib for m in tl], ls=":", label="retained for prefix reuse")
    a1.set_ylabel("KV cache MiB")
    a1.set_ylim(0, run["total_cache_bytes"] * mib * 1.45)
    a1.legend(fontsize=8, loc="upper center", ncol=2)
    l1 = a2.plot(t, [m["active"] for m in tl], color="tab:green", label="live sequences")
    a2.set_ylabel("live sequences")
    a2.set_ylim(0, run["slots"] * 1.1)
    a3 = a2.twinx()
    l2 = a3.plot(t, [100 * m["fragmentation"] for m in tl], color="tab:red",
                 label="fragmentation: unused rows of occupied slots (%)")
    a3.set_ylabel("fragmentation %")
    a3.set_ylim(0, 105)
    a2.legend(l1 + l2, [x.get_label() for x in l1 + l2], fontsize=8, loc="lower left")
    a2.set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(path: Path) -> None:
    """Rebuilds a run's plots from its JSON (no measuring)."""
    r = json.loads(path.read_text())
    stem = path.with_suffix("")
    model = Path(r["model"]).name
    arrival = "all at once" if r["arrival"] == "all" else f"Poisson {r['rate']}/s"
    plot(r["summary"], stem.with_suffix(".png"), f"{r['requests']} requests, {model}, {arrival}, "
         f"{r['environment']['intra_op_threads']} threads")
    if "memory_engine16_round1" in r:
        plot_memory(r["memory_engine16_round1"], Path(f"{stem}_memory.png"),
                    f"Engine (16 slots) cache memory over the serving workload, {model}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, help="our export(s); Optimum's export of the same "
                    "weights must sit beside it as BASE-optimum (default models/gpt2)")
    ap.add_argument("--arrival", nargs="+", default=["all"], choices=["all", "poisson"])
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second (default 1.0)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), type=system_arg,
                    help=f"of {', '.join(SYSTEMS)} (default: all) or engine-N[-pB]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--output-range", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--publish", action="store_true", help="write to benchmarks/results (committed) instead of "
                    "benchmarks/out")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (overrides --publish's choice)")
    ap.add_argument("--name", default=None, help="the files' stem before _ARRIVAL (default serving_MODEL)")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="rebuild the plots of a result file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.replot:
        return replot(a.replot)
    models = [Path(m) for m in (a.model or ["models/gpt2"])]
    base = models[0].name
    out = out_dir(a.publish) if a.out_dir is None else a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for model in models:
        for arrival in a.arrival:
            cases = {s: ["--model", str(model), "--base", base, "--arrival", arrival, "--rate", str(a.rate),
                         "--requests", str(a.requests), "--seed", str(a.seed), "--threads", str(a.threads),
                         "--prompt-range", *map(str, a.prompt_range), "--output-range", *map(str, a.output_range)]
                     for s in a.systems}
            print(f"== {model} ({arrival}{'' if arrival == 'all' else f', {a.rate}/s'}): {len(cases)} systems x "
                  f"{a.rounds} rounds, each alone in its own process", flush=True)
            results = run_rounds("benchmarks.serving", {s: [s, *args] for s, args in cases.items()}, a.rounds)
            summary = {s: summarize(r) for s, r in results.items()}
            record = {"benchmark": "serving", "model": str(model), "arrival": arrival,
                      "rate": a.rate if arrival != "all" else None, "requests": a.requests, "seed": a.seed,
                      "workload": f"prompts U[{a.prompt_range[0]},{a.prompt_range[1]}], outputs U[{a.output_range[0]},"
                        f"{a.output_range[1]}], greedy, no stop ids",
                      "environment": environment(a.threads), "summary": summary,
                      "agree_with_sequential": agreement(results, "sequential"),
                      "rounds": {s: [{k: v for k, v in r.items() if k not in ("outputs", "memory_timeline")}
                                     for r in rs] for s, rs in results.items()}}
            stem = f"{a.name or 'serving_' + model.name}_{arrival}"
            mem = next((r for r in results.get("engine-16", []) if "memory_timeline" in r), None)
            if mem:
                record["memory_engine16_round1"] = {k: mem[k] for k in ("memory_timeline", "total_cache_bytes",
                                                                        "slots", "rows_per_slot", "bytes_per_token")}
            (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")     # results first, plots after
            if mem:
                plot_memory(mem, out / f"{stem}_memory.png",
                            f"Engine (16 slots) cache memory over the serving workload, {model.name}")
            plot(summary, out / f"{stem}.png", f"{a.requests} requests, {model.name}, "
                 f"{'all at once' if arrival == 'all' else f'Poisson {a.rate}/s'}, {a.threads} threads")
            print(f"\n{'system':15s} {'tokens/s':>22s} {'TTFT p50 / p99 s':>20s} {'per-token p50 / p99 ms':>24s}")
            for s, v in summary.items():
                if "failed" in v:
                    print(f"{s:15s} not run: {v['failed'][:150]}")
                    continue
                print(f"{s:15s} {v['tokens_per_s']['median']:8.1f} ({v['tokens_per_s']['min']:.1f}-"
                      f"{v['tokens_per_s']['max']:.1f}) {v['ttft_p50_s']['median']:9.2f} / {v['ttft_p99_s']['median']:6.2f}"
                      f" {v['per_token_p50_ms']['median']:12.1f} / {v['per_token_p99_ms']['median']:7.1f}")
            print(f"agreement with sequential (requests with identical tokens of {a.requests}): "
                  f"{record['agree_with_sequential']}")
            print(f"wrote {out / (stem + '.json')} and plots", flush=True)


if __name__ == "__main__":
    main()
