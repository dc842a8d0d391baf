"""Shared prefix: requests that start with the same long prefix, with the Engine's prefix cache on and off.

    python -m benchmarks.shared_prefix --model models/gpt2 [--rounds 3] [--publish]

Workload (seeded): 16 requests = one 512-token prefix + 16 distinct tokens each, 32 new tokens each
(greedy), all submitted at once to an Engine with 16 slots. Measured: total time (first submit to
last token) and time to first token p50/p99. prefix_cache on: the scheduler prefills the prefix once
and the other requests adopt its rows (copied into their slots) and run only their 16 tokens; off:
every request computes all 528 prompt tokens. Each setting alone in its own process, rounds rotated.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import pyplot, environment, session_options
from .isolate import emit, out_dir, run_rounds, spread


def worker(a) -> None:
    from kvcache_infer import Engine, Model
    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    V = model.manifest.vocab_size
    rng = np.random.default_rng(a.seed)
    prefix = rng.integers(0, V, a.prefix)
    prompts = [np.concatenate([prefix, rng.integers(0, V, a.suffix)]) for _ in range(a.requests)]
    on = a.worker == "prefix-cache-on"
    eng = Engine(model, max_sequences=a.requests, max_seq_len=a.prefix + a.suffix + a.new_tokens, prefix_cache=on)
    warm = rng.integers(0, V, (2, 24))                         # warm-up: other tokens, so nothing is reused
    eng.generate(list(warm), max_new_tokens=4)
    t0 = time.perf_counter()
    reqs = [eng.submit(p, max_new_tokens=a.new_tokens) for p in prompts]
    while eng.busy:
        eng.tick()
    end = time.perf_counter()
    ttft = [r.ttft for r in reqs]
    emit({"setting": a.worker, "total_s": end - t0, "ttft_p50_s": float(np.percentile(ttft, 50)),
          "ttft_p99_s": float(np.percentile(ttft, 99)), "runs": eng.stats["runs"],
          "prefix_tokens_reused": eng.stats["prefix_tokens_reused"], "prefix_hits": eng.stats["prefix_hits"],
          "outputs": [r.output for r in reqs], "environment": environment(a.threads)})


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    summ = {k: v for k, v in record["summary"].items() if "failed" not in v}
    names = list(summ)
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
    for ax, key, label in ((axes[0], "total_s", "total time (s)"), (axes[1], "ttft_p50_s", "time to first token p50 (s)")):
        med = [summ[n][key]["median"] for n in names]
        err = [[m - summ[n][key]["min"] for n, m in zip(names, med)], [summ[n][key]["max"] - m for n, m in zip(names, med)]]
        ax.barh(names, med, xerr=err, color=["tab:blue", "tab:gray"][:len(names)])
        ax.set_xlabel(label + ", range over rounds")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    w = record["workload"]
    fig.suptitle(f"{w['requests']} requests = one {w['prefix']}-token prefix + {w['suffix']} own tokens, {w['new_tokens']} new "
                 f"each, {Path(record['model']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--publish", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (overrides --publish's choice)")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="rebuild the plot of a result file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.replot:
        return plot(json.loads(a.replot.read_text()), a.replot.with_suffix(".png"))
    args = ["--model", a.model, "--requests", str(a.requests), "--prefix", str(a.prefix), "--suffix", str(a.suffix),
            "--new-tokens", str(a.new_tokens), "--seed", str(a.seed), "--threads", str(a.threads)]
    settings = ("prefix-cache-on", "prefix-cache-off")
    print(f"== shared prefix, {a.model}: {a.requests} x ({a.prefix} shared + {a.suffix} own tokens), {a.new_tokens} new "
          f"each; {a.rounds} rounds, each setting alone in its own process", flush=True)
    res = run_rounds("benchmarks.shared_prefix", {s: [s, *args] for s in settings}, a.rounds)
    ok = {s: [r for r in rs if "failed" not in r] for s, rs in res.items()}
    summary = {s: {"total_s": spread([r["total_s"] for r in rs]), "ttft_p50_s": spread([r["ttft_p50_s"] for r in rs]),
                   "ttft_p99_s": spread([r["ttft_p99_s"] for r in rs]), "runs": rs[0]["runs"],
                   "prefix_tokens_reused": rs[0]["prefix_tokens_reused"]} if rs else {"failed": res[s][0]["failed"]}
               for s, rs in ok.items()}
    same = (ok["prefix-cache-on"] and ok["prefix-cache-off"]
            and ok["prefix-cache-on"][0]["outputs"] == ok["prefix-cache-off"][0]["outputs"])
    ratio = (summary["prefix-cache-on"]["total_s"]["median"] / summary["prefix-cache-off"]["total_s"]["median"]
             if all("failed" not in v for v in summary.values()) else None)
    record = {"benchmark": "shared_prefix", "model": a.model, "workload": vars(a) | {"worker": None, "out_dir": None},
              "environment": environment(a.threads), "summary": summary, "on_over_off_total": ratio,
              "same_tokens_on_and_off": bool(same),
              "rounds": {s: [{k: v for k, v in r.items() if k != "outputs"} for r in rs] for s, rs in res.items()}}
    folder = out_dir(a.publish) if a.out_dir is None else a.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"shared_prefix_{Path(a.model).name}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    for s, v in summary.items():
        if "failed" in v:
            print(f"{s}: not run: {v['failed']}")
            continue
        print(f"{s:17s} total {v['total_s']['median']:7.2f} s ({v['total_s']['min']:.2f}-{v['total_s']['max']:.2f}), "
              f"TTFT p50 {v['ttft_p50_s']['median']:.2f} s, p99 {v['ttft_p99_s']['median']:.2f} s, {v['runs']} runs, "
              f"{v['prefix_tokens_reused']} prompt tokens reused")
    if ratio is not None:
        print(f"total time, on / off: {ratio:.3f}; same tokens on and off: {same}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
