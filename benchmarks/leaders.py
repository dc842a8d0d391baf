"""kvcache-infer against the CPU runtimes people pick instead: OpenVINO GenAI, llama.cpp, CTranslate2.

    python -m benchmarks.leaders [--config gpt2|llama-small] [--rounds 3] [--ours fp32 int8 ...]
                                 [--peers openvino llamacpp ct2]
                                 [--workloads decode first-token serving shared-prefix] [--publish]

The same weights (--config: GPT-2 small, or llama-small, a Llama of GPT-2 small's size with 4 KV heads;
random, seed 0) in every system, each (system, precision, workload)
alone in a fresh process, the order rotated every round, medians over rounds. The workloads and the
peers' workers are benchmarks/cpu_peers.py's (run in .venv-peers: `bash scripts/setup_peers.sh`, then
`.venv-peers/bin/python -m benchmarks.peer_models [--model llama-small]`); ours runs the same workloads here:
    decode        one sequence: a prompt of 32 / 512 random ids, then 64 greedy tokens through
                  KVCacheInferencer.next_tokens; ms per token after the first (3 fresh prompts after 1 untimed)
    first-token   next_tokens of a fresh 32 / 512-id prompt from an empty cache (median of 5 after 1 untimed)
    serving       benchmarks.serving's 48 requests, all at once, through the Engine's scheduler: --slots
                  sequences at a time (default 48: every request admitted at once, as OpenVINO's scheduler
                  does with this workload; 16 is the other row)
    shared-prefix benchmarks.shared_prefix's 16 requests sharing a 512-token prefix, Engine with 16 slots and
                  its prefix cache
Our exports (models/CONFIG-NAME, made when missing; an export of another graph revision is refused):
    fp32 | int8, int4 (weight-only, MatMulNBits) | w8a8 (int8 weights per column and activations per row,
    ORT's int8 GEMM) | NAME-kv8: the same with an int8 KV cache (static per-channel scales)
Results: JSON (every round of every case) and a markdown table under benchmarks/out/ (benchmarks/results/
with --publish), one plot per workload.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .isolate import Case, emit, out_dir, run_rounds

REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
# name: (python -m export arguments beyond --config/--seed/--out, what it computes: weights / compute / KV cache)
OURS = {
    "fp32": ([], "fp32 / fp32 / fp32"),
    "int8": (["--weights", "int8"], "int8 blocks of 128 / int8 (MatMulNBits) / fp32"),
    "int4": (["--weights", "int4"], "int4 blocks of 128 / int8 (MatMulNBits) / fp32"),
    "w8a8": (["--weights", "w8a8"], "int8 per column / int8 per row (int8 GEMM) / fp32"),
    "w8a8-kv8": (["--weights", "w8a8", "--kv-cache", "int8"], "int8 per column / int8 per row (int8 GEMM) / int8"),
    "int8-kv8": (["--weights", "int8", "--kv-cache", "int8"], "int8 blocks of 128 / int8 (MatMulNBits) / int8"),
    "int4-kv8": (["--weights", "int4", "--kv-cache", "int8"], "int4 blocks of 128 / int8 (MatMulNBits) / int8"),
}
PEERS = ("openvino", "llamacpp", "ct2")
WORKLOADS = ("decode", "first-token", "serving", "shared-prefix")
SIZES = {"decode_prompts": (32, 512), "decode_new": 64, "decode_timed": 3, "first_prompts": (32, 512),
         "first_timed": 5}


CONFIGS = {"gpt2": "GPT-2 small", "llama-small": "Llama, GPT-2 small's size (4 KV heads)"}   # --config: title


def export_dir(root: Path, config: str, name: str) -> Path:
    return root / (config if name == "fp32" else f"{config}-{name}")


def ensure_exports(names, root: Path, config: str) -> None:
    """Makes the missing exports; refuses ones of another graph revision (their timings are not this version's)."""
    from export.skeleton import GRAPH_REVISION
    for name in names:
        out = export_dir(root, config, name)
        args = ["--config", config, "--seed", "0", "--out", str(out), *OURS[name][0]]
        if (out / "manifest.json").is_file():
            rev = (json.loads((out / "manifest.json").read_text()).get("exporter") or {}).get("graph_revision")
            if rev != GRAPH_REVISION:
                raise SystemExit(f"{out} is of graph revision {rev}, this version writes {GRAPH_REVISION}; export it again: "
                                 f"python -m export {shlex.join(args)}")
            continue
        print(f"exporting {out} ({' '.join(OURS[name][0]) or 'fp32'}) ...", flush=True)
        p = subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"export of {out} failed:\n{p.stdout[-1500:]}{p.stderr[-1500:]}")


# -- our worker: the peers' workloads through kvcache-infer --------------------------------------------------
def _decode(model, rng, V) -> dict:
    from kvcache_infer import KVCacheInferencer
    numbers = {}
    n = SIZES["decode_new"]
    for p in SIZES["decode_prompts"]:
        inf = KVCacheInferencer(model, max_seq_len=p + n + 1)
        runs = []
        for k in range(SIZES["decode_timed"] + 1):
            inf.reset_cache()
            tok = inf.next_tokens(rng.integers(0, V, (1, p)))
            gaps = []
            for _ in range(n - 1):
                t0 = time.perf_counter()
                tok = inf.next_tokens(tok[:, None])
                gaps.append((time.perf_counter() - t0) * 1e3)
            if k:                                       # the first run of each length is untimed
                runs.append(float(np.mean(gaps)))
        numbers[f"P{p}"] = {"ms_per_token": float(np.median(runs)), "runs_ms": runs}
    return numbers


def _first_token(model, rng, V) -> dict:
    from kvcache_infer import KVCacheInferencer
    numbers = {}
    for p in SIZES["first_prompts"]:
        inf = KVCacheInferencer(model, max_seq_len=p + 1)
        times = []
        for k in range(SIZES["first_timed"] + 1):
            ids = rng.integers(0, V, (1, p))
            inf.reset_cache()
            t0 = time.perf_counter()
            inf.next_tokens(ids)
            if k:
                times.append((time.perf_counter() - t0) * 1e3)
        numbers[f"P{p}"] = {"ttft_ms": float(np.median(times)), "ttft_runs_ms": times}
    return numbers


def _serving(model, V, slots: int) -> dict:
    from kvcache_infer import Engine

    from .serving import workload
    reqs = workload(48, V, 0, "all", 1.0)
    eng = Engine(model, max_sequences=slots, max_seq_len=512)
    warm = np.random.default_rng(1234).integers(0, V - 1, (2, 24))
    eng.generate(list(warm), max_new_tokens=4)
    t0 = time.perf_counter()
    handles = [eng.submit(r["prompt"], max_new_tokens=r["out"]) for r in reqs]
    while eng.busy:
        eng.tick()
    end = max(h.token_times[-1] for h in handles) - t0
    got = sum(len(h.output) for h in handles)
    if [len(h.output) for h in handles] != [r["out"] for r in reqs]:
        raise RuntimeError("a request did not generate its exact length")
    ttft = [h.ttft for h in handles]
    return {"requests": len(reqs), "slots": slots, "generated_tokens": got, "wall_s": end, "tokens_per_s": got / end,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "runs": eng.stats["runs"], "prefill_budget": eng.scheduler.prefill_budget}


def _shared_prefix(model, V) -> dict:
    from kvcache_infer import Engine
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, V, 512)
    prompts = [np.concatenate([prefix, rng.integers(0, V, 16)]) for _ in range(16)]
    eng = Engine(model, max_sequences=16, max_seq_len=512 + 16 + 32, prefix_cache=True)
    eng.generate(list(rng.integers(0, V, (2, 24))), max_new_tokens=4)
    t0 = time.perf_counter()
    reqs = [eng.submit(p, max_new_tokens=32) for p in prompts]
    while eng.busy:
        eng.tick()
    ttft = [r.ttft for r in reqs]
    return {"total_s": time.perf_counter() - t0, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "prefix_tokens_reused": eng.stats["prefix_tokens_reused"]}


def worker(a) -> None:
    from kvcache_infer import Model

    from .common import environment, session_options
    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    V = model.manifest.vocab_size
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    if a.workload == "decode":
        numbers = _decode(model, rng, V)
    elif a.workload == "first-token":
        numbers = _first_token(model, rng, V)
    elif a.workload == "serving":
        numbers = _serving(model, V, a.slots)
    else:
        numbers = _shared_prefix(model, V)
    manifest = json.loads((Path(a.model) / "manifest.json").read_text())
    emit({"system": "kvcache-infer", "precision": a.precision, "workload": a.workload, "numbers": numbers,
          "computes": OURS[a.precision][1], "export": str(a.model),
          "graph_revision": (manifest.get("exporter") or {}).get("graph_revision"),
          "worker_s": time.perf_counter() - t0, "environment": environment(a.threads)})


# -- the runner -------------------------------------------------------------------------------------------
def headline(workload: str, numbers: dict) -> dict[str, float]:
    """The figures a table shows: decode/first-token ms at 32 and 512, serving tokens/s, shared-prefix s."""
    if workload == "decode":
        return {f"decode_ms_{k[1:]}": v["ms_per_token"] for k, v in numbers.items()}
    if workload == "first-token":
        return {f"first_token_ms_{k[1:]}": v["ttft_ms"] for k, v in numbers.items()}
    if workload == "serving":
        return {"serving_tokens_per_s": numbers["tokens_per_s"]}
    return {"shared_prefix_s": numbers["total_s"]}


def cases(a) -> dict[str, list[str] | Case]:
    out: dict[str, list[str] | Case] = {}
    for name in a.ours:
        for w in a.workloads:
            slots = [a.slots, 16] if w == "serving" and a.slots != 16 else [a.slots]
            for s in slots:
                key = f"kvcache-infer/{name}/{w}" + (f"-{s}" if w == "serving" and s != a.slots else "")
                out[key] = ["ours", "--precision", name, "--model", str(export_dir(a.models_dir, a.config, name)),
                            "--workload", w, "--threads", str(a.threads), "--slots", str(s)]
    if a.peers and not PEERS_PYTHON.is_file():
        raise SystemExit(f"the peers are not installed ({PEERS_PYTHON} is missing): run `bash scripts/setup_peers.sh` "
                         "and `.venv-peers/bin/python -m benchmarks.peer_models`, or pass --peers with no names")
    from .cpu_peers import PRECISIONS
    for peer in a.peers:
        for prec in PRECISIONS[peer]:
            for w in a.workloads:
                out[f"{peer}/{prec}/{w}"] = Case(str(PEERS_PYTHON), "benchmarks.cpu_peers",
                                                 [peer, "--precision", prec, "--workload", w, "--threads", str(a.threads),
                                                  "--model", a.config])
    return out


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """{system/precision: {figure: {median, min, max, rounds}, "computes": ...}} and the failures."""
    table: dict[str, dict] = {}
    failed = {}
    for key, rs in runs.items():
        system, prec, w = key.split("/")
        row = f"{system}/{prec}"
        ok = [r for r in rs if "failed" not in r]
        if not ok:
            failed[key] = rs[0]["failed"] if rs else "not run"
            continue
        entry = table.setdefault(row, {})
        entry["computes"] = ok[0].get("computes") or ok[0].get("precision_detail")
        slots = w.split("-")[-1] if w.startswith("serving-") else None
        figures: dict[str, list[float]] = {}
        for r in ok:
            for k, v in headline(w.split("-")[0] if slots else w, r["numbers"]).items():
                figures.setdefault(k + (f"_{slots}_slots" if slots else ""), []).append(v)
        for k, vs in figures.items():
            entry[k] = {"median": float(np.median(vs)), "min": float(min(vs)), "max": float(max(vs)), "rounds": vs}
    return {"table": table, "failed": failed}


COLUMNS = (("decode_ms_32", "decode ms/token @32"), ("decode_ms_512", "@512"),
           ("first_token_ms_32", "first token ms, 32-token prompt"), ("first_token_ms_512", "512-token prompt"),
           ("serving_tokens_per_s", "serving tokens/s (48 requests at once)"),
           ("serving_tokens_per_s_16_slots", "serving, our Engine at 16 sequences"), ("shared_prefix_s", "shared prefix s"))


def markdown(agg: dict) -> str:
    lines = ["| system / precision | weights / compute / KV cache | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for row, e in agg["table"].items():
        comp = e.get("computes")
        if isinstance(comp, dict):      # the peers' own words, up to their first parenthesis
            comp = " / ".join(str(comp.get(k, "?")).split(" (")[0].split(";")[0] for k in ("weights", "compute", "kv_cache"))
        cells = []
        for key, _ in COLUMNS:
            f = e.get(key)
            cells.append("-" if f is None else f"{f['median']:.3g} ({f['min']:.3g}-{f['max']:.3g})"
                         if len(f["rounds"]) > 1 else f"{f['median']:.3g}")
        lines.append(f"| {row} | {comp or ''} | " + " | ".join(cells) + " |")
    for key, why in agg["failed"].items():
        lines.append(f"\n{key} could not run: {why}")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path, title: str) -> list[Path]:
    """One bar chart per figure (every system and precision; medians with min-max whiskers)."""
    from .common import pyplot
    plt = pyplot()
    if plt is None:
        return []
    written = []
    for key, label in COLUMNS:
        rows = [(r, e[key]) for r, e in agg["table"].items() if key in e]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
        names = [r for r, _ in rows]
        med = np.array([f["median"] for _, f in rows])
        err = np.array([[f["median"] - f["min"] for _, f in rows], [f["max"] - f["median"] for _, f in rows]])
        colors = ["tab:blue" if n.startswith("kvcache-infer") else "tab:gray" for n in names]
        ax.barh(range(len(rows)), med, xerr=err, color=colors)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        better = "higher is better" if key.startswith("serving") else "lower is better"
        ax.set_title(f"{title}, 2 threads\n{label} ({better})", fontsize=9)
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_{key}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="gpt2", choices=list(CONFIGS),
                    help="the weights every system runs (python -m export --config NAME, seed 0; default gpt2)")
    ap.add_argument("--ours", nargs="*", default=list(OURS), choices=list(OURS))
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=48, help="our Engine's sequences at once for serving (default 48)")
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--publish", action="store_true", help="write to benchmarks/results/ (committed)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--resume", action="store_true",
                    help="take the results an interrupted run left in its journal instead of measuring them again")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="measure nothing: rebuild the table and the plots from a results JSON (and, for a committed one, the generated tables of README.md and docs/)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.render:
        record = json.loads(a.render.read_text())
        return publish(record, a.render)
    ensure_exports(a.ours, a.models_dir, a.config)
    out = out_dir(a.publish) / f"leaders_{a.config}_cpu.json"
    journal = out_dir(False) / f"leaders_{a.config}_cpu.journal.jsonl"
    if not a.resume:
        journal.unlink(missing_ok=True)
    runs = run_rounds("benchmarks.leaders", cases(a), a.rounds, a.timeout, journal)
    agg = aggregate(runs)
    from .common import environment
    record = {"benchmark": "leaders", "config": a.config, "rounds": a.rounds, "threads": a.threads, "serving_slots": a.slots,
              "environment": environment(a.threads), **agg, "runs": runs}
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")          # results first, plots after
    publish(record, out)


def publish(record: dict, out: Path) -> None:
    """The markdown table and the plots beside the JSON; for the committed JSON, every generated block of the
    README and docs/ too (python -m benchmarks.report --docs)."""
    table = markdown(record)
    out.with_suffix(".md").write_text(table)
    print(table)
    for p in plot(record, out, CONFIGS[record.get("config", "gpt2")]):
        print(f"wrote {p}")
    print(f"wrote {out.with_suffix('.md')}")
    if out.resolve().parent == (REPO / "benchmarks" / "results").resolve():
        from .doc_tables import render_docs
        for path in render_docs():
            print(f"updated the generated tables in {path}")


if __name__ == "__main__":
    main()
