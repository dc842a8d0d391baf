"""The comparison suite: kvcache-infer against the tools people use instead, each alone in its own process.

    python -m benchmarks.suite                      # GPT-2 small and the tiny config, 3 rounds
    python -m benchmarks.suite --configs tiny --rounds 2
    python -m benchmarks.suite --publish            # rewrite benchmarks/results/ and benchmarks/RESULTS.md
    python -m benchmarks.suite --check              # also exit 1 when one of the project's targets is missed

For each named config (seeded random weights; the exports are made first when missing, ours at
models/NAME and Optimum's at models/NAME-optimum) every system of benchmarks/peers.py runs the same
greedy workload alone in a fresh process (ONNX Runtime's spinning pool threads make two live
sessions slow each other on 2 cores), round after round with the order rotated:

  first token  prompts of --prompt-lens tokens: prefill and the first pick, batch 1; per length one
               untimed prompt first (a new shape's first run allocates), then --prompt-repeats timed
  decode       one-token steps at cache positions --positions (batch 1) and at --batch-position for
               batches --batches: a sequence is prefilled to position - warmup, `warmup` untimed steps
               follow, then `steps` timed ones; each feeds one token per row and picks the next
  prefill      (ours) a long prompt one-shot against chunks of --chunk tokens
  no cache     the whole prefix recomputed per token, at the seed design's contexts 10 .. 1000
  floor        in every process, the read bandwidth of a matrix-vector product (median of probes at
               its start and end); a step of ours must read its weights (embedding tables excepted) +
               the live K/V of every row. A process whose probes disagree by > 15% is flagged.
  memory       our cache allocation for max_seq_len 128 .. 1024 and batch 1 .. 16 against the formula

Per process, the median of its steps; reported: the median over rounds, the spread over rounds, and
every round's figure (JSON). Results go to benchmarks/out/ unless --publish.
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

from export.skeleton import GRAPH_REVISION

from .common import environment, summarize
from kvcache_infer.runtime.runs import MAX_PICK_ROWS

from .floor import floor_ms, matvec_bandwidth, weight_bytes_per_step
from .isolate import RESULTS, emit, out_dir, run_rounds
from .peers import GenAI, HFEager, NoCache, OptimumORT, Ours, PlainOrtLoop, hf_model_for
from .report import write_config_report, write_results_md

PEERS = ("hf-eager", "optimum", "optimum-iobinding", "genai", "ort-plain")
ALL = ("kvcache-infer", *PEERS, "no-cache")
NOISY = 0.15      # bandwidth probes of one process further apart than this: the run is flagged


def _quietly(cmd: list[str], what: str) -> None:
    """Runs a command; its output (Optimum's tracer warnings, per-step logs) is shown only if it fails."""
    print(what, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    done = [ln for ln in p.stdout.splitlines() if ln.startswith(("  parity", "  quantized", "wrote"))]
    for ln in done[:3]:
        print("  " + ln.strip(), flush=True)


def _export_args(config: str, seed: int, out: Path, weights: str | None) -> list[str]:
    """`python -m export`'s arguments for our export of a named config (weights: None, "int8", "int4")."""
    return ["--config", config, "--seed", str(seed), "--out", str(out), *(["--weights", weights] if weights else [])]


def ensure_exports(config: str, seed: int, root: Path, weights=()) -> tuple[Path, Path]:
    """Our export at root/CONFIG (and root/CONFIG-int8 ... per `weights`), Optimum's at root/CONFIG-optimum.
    Makes the missing ones; refuses (naming every command that fixes it) exports of ours that are of
    another config or of another graph revision than this version writes, before making anything."""
    ours, optimum = root / config, root / f"{config}-optimum"
    exports = [(ours, None), *[(root / f"{config}-{w}", w) for w in weights]]
    stale = []
    for path, w in exports:
        if not (path / "manifest.json").is_file():
            continue
        m = json.loads((path / "manifest.json").read_text())
        src = m.get("source") or {}
        if src.get("config") != config or src.get("seed") != seed or m.get("tokens") != "packed":
            raise SystemExit(f"{path} holds {src} (tokens {m.get('tokens')}), not a current export of config {config} "
                             f"seed {seed}: move it away or pass --models-dir")
        revision = (m.get("exporter") or {}).get("graph_revision")
        if revision != GRAPH_REVISION:
            stale.append(f"  {path}: graph revision {revision or 'unrecorded (exported before revisions were recorded)'}"
                         f"; export it again: python -m export {shlex.join(_export_args(config, seed, path, w))}")
    if stale:
        raise SystemExit(f"these exports are not of graph revision {GRAPH_REVISION}, the one this version writes, so "
                         f"their timings would not be this version's (each command replaces only that export's "
                         f"files; or pass --models-dir):\n" + "\n".join(stale))
    for out, w in exports:
        if not (out / "manifest.json").is_file():
            _quietly([sys.executable, "-m", "export", *_export_args(config, seed, out, w)],
                     f"exporting {config} (seed {seed}{', ' + w if w else ''}) to {out}")
    if not (optimum / "model.onnx").is_file():
        _quietly([sys.executable, "-m", "benchmarks.optimum_export", "--config", config, "--seed", str(seed),
                  "--out", str(optimum)], f"exporting {config} (seed {seed}) through Optimum to {optimum}")
    return ours, optimum


def build(name: str, ours_dir: Path, optimum_dir: Path, threads: int, capacity: dict[int, int]):
    if name.startswith("kvcache-infer-"):
        w = name.removeprefix("kvcache-infer-")
        return Ours(ours_dir.with_name(f"{ours_dir.name}-{w}"), threads, capacity, name=name)
    return {"kvcache-infer": lambda: Ours(ours_dir, threads, capacity),
            "hf-eager": lambda: HFEager(hf_model_for(ours_dir), threads),
            "optimum": lambda: OptimumORT(optimum_dir, threads, io_binding=False),
            "optimum-iobinding": lambda: OptimumORT(optimum_dir, threads, io_binding=True),
            "genai": lambda: GenAI(optimum_dir, threads, max(capacity.values())),
            "ort-plain": lambda: PlainOrtLoop(optimum_dir, threads),
            "no-cache": lambda: NoCache(ours_dir, threads, {1: capacity[1]})}[name]()


def time_steps(system, ids: np.ndarray, position: int, warmup: int, steps: int) -> list[float]:
    """ms of each timed one-token step at positions position .. position + steps - 1 (ids: [B, >= position])."""
    tok = system.start(ids[:, :position - warmup])
    for _ in range(warmup):
        tok = system.step(tok)
    ms = []
    for _ in range(steps):
        t = time.perf_counter()
        tok = system.step(tok)
        ms.append((time.perf_counter() - t) * 1e3)
    return ms


def time_first_token(system, ids: np.ndarray, length: int) -> float:
    t = time.perf_counter()
    system.start(ids[:, :length])
    return (time.perf_counter() - t) * 1e3


def chunked_prefill(system, ids: np.ndarray, length: int, chunk: int) -> float:
    """ms to feed a `length`-token prompt in chunks of `chunk` and pick the first token (ours only)."""
    inf = system.inferencer(1)
    inf.reset_cache()
    t = time.perf_counter()
    for lo in range(0, length - chunk, chunk):
        inf.forward(ids[0, lo:lo + chunk])
    inf.next_tokens(ids[0, (length - 1) // chunk * chunk:length])
    return (time.perf_counter() - t) * 1e3


def worker(a) -> None:
    ours_dir, optimum_dir = a.models_dir / a.config, a.models_dir / f"{a.config}-optimum"
    m = json.loads((ours_dir / "manifest.json").read_text())
    P, V = m["max_positions"], m["vocab_size"]
    positions = [p for p in a.positions if p + a.steps <= P]
    lens = [n for n in a.prompt_lens if n < P]
    contexts = [p for p in a.contexts if 2 <= p < P]
    bpos = min(a.batch_position, P - a.steps)
    capacity = {1: P, **{b: bpos + a.steps + 1 for b in a.batches if b != 1}}
    probes = [matvec_bandwidth(a.threads)["GB_per_s"] for _ in range(3)]
    system = build(a.worker, ours_dir, optimum_dir, a.threads, capacity)
    rng = np.random.default_rng(a.seed)
    ids = {b: rng.integers(0, V, size=(b, capacity[b])) for b in capacity}
    time_steps(system, ids[1], min(16, P - 4), 2, 2)                      # untimed: first-call allocations
    res = {"system": a.worker, "info": system.info, "first_token": {}, "decode": {}, "prefill_chunked": {}}
    if a.worker == "no-cache":
        for p in contexts:
            res["decode"].setdefault("1", {})[str(p)] = summarize(
                [x for _ in range(a.nocache_repeats) for x in time_steps(system, ids[1], p, 0, a.nocache_steps)])
    else:
        for n in lens:
            time_first_token(system, ids[1], n)                                   # untimed: this shape's first run
            res["first_token"][str(n)] = summarize([time_first_token(system, ids[1], n)
                                                    for _ in range(a.prompt_repeats)])
        for p in positions:
            res["decode"].setdefault("1", {})[str(p)] = summarize(
                [x for _ in range(a.repeats) for x in time_steps(system, ids[1], p, a.warmup, a.steps)])
        for b in a.batches:
            if b != 1:
                res["decode"].setdefault(str(b), {})[str(bpos)] = summarize(
                    [x for _ in range(a.batch_repeats) for x in time_steps(system, ids[b], bpos, a.warmup, a.steps)])
        if a.worker == "kvcache-infer":
            for n in [n for n in lens if n > a.chunk]:
                chunked_prefill(system, ids[1], n, a.chunk)                       # untimed, as above
                res["prefill_chunked"][str(n)] = summarize([chunked_prefill(system, ids[1], n, a.chunk)
                                                            for _ in range(a.prompt_repeats)])
            res["memory"] = memory_sweep(system.model, a.mem_seq_lens, a.batches)
    if a.worker.startswith("kvcache-infer"):
        res["weight_bytes_per_step"], res["file_bytes"] = weight_bytes_per_step(system.model.dir)
        res["weight_bytes_per_logits_step"], _ = weight_bytes_per_step(system.model.dir, picks=False)
        res["kv_bytes_per_token"] = system.model.manifest.cache_bytes_per_token
    probes += [matvec_bandwidth(a.threads)["GB_per_s"] for _ in range(3)]
    res["bandwidth_GB_per_s"] = {"probes": probes, "median": float(np.median(probes)),
                                 "spread": max(probes) / min(probes) - 1}
    res["environment"] = environment(a.threads)
    emit(res)


def memory_sweep(model, seq_lens, batches) -> list[dict]:
    """Our cache allocation per (max_seq_len, batch), as the buffers report it, against the closed-form size."""
    from kvcache_infer import KVCacheInferencer
    from kvcache_infer.runtime.cache import cache_bytes
    m = model.manifest
    rows = []
    for L in [s for s in seq_lens if s <= m.max_positions]:
        for b in batches:
            inf = KVCacheInferencer(model, max_seq_len=L, batch_size=b)
            formula = cache_bytes(m, b, L)
            got = inf.memory_profile().total_cache_bytes          # the K/V buffers' allocated bytes
            rows.append({"max_seq_len": L, "batch": b, "allocated_bytes": got, "formula_bytes": formula,
                         "equal": got == formula})
            del inf
    return rows


def over_rounds(cells: list[dict]) -> dict:
    """One cell's per-round summaries -> the median over rounds, the spread over rounds, every round."""
    med = [c["median_ms"] for c in cells]
    return {"median_ms": float(np.median(med)), "min_ms": float(min(med)), "max_ms": float(max(med)),
            "rounds_ms": med, "steps_per_round": cells[0]["n"]}


def aggregate(config: str, results: dict[str, list[dict]], a) -> dict:
    ok = {n: [r for r in rs if "failed" not in r] for n, rs in results.items()}
    failed = {n: rs[0]["failed"] for n, rs in results.items() if not ok[n]}
    ours = ok.get("kvcache-infer", [])
    m = json.loads((a.models_dir / config / "manifest.json").read_text())
    res = {"config": config, "environment": environment(a.threads),
           "command": " ".join(["python", "-m", "benchmarks.suite", *sys.argv[1:]]),
           "provider": "CPUExecutionProvider", "isolation": "each system alone in its own process, order rotated",
           "rounds": a.rounds,
           "model": {"ours": str(a.models_dir / config), "layers": m["num_layers"], "heads": m["num_heads"],
                     "hidden": m["hidden_size"], "vocab": m["vocab_size"], "max_positions": m["max_positions"],
                     "dtype": m["dtype"], "variants": {}},
           "systems": {n: rs[0]["info"] for n, rs in ok.items() if rs}, "failed": failed,
           "workload": {"positions": a.positions, "batches": a.batches, "batch_position": a.batch_position,
                        "prompt_lens": a.prompt_lens, "contexts": a.contexts, "warmup": a.warmup, "steps": a.steps,
                        "repeats": a.repeats, "prompt_repeats": a.prompt_repeats, "batch_repeats": a.batch_repeats,
                        "chunk": a.chunk, "seed": a.seed,
                        "tokens": "random prompt ids, then greedy picks (EOS ignored)"},
           "first_token": {}, "decode": {}, "prefill_chunked": {}, "bandwidth": {}, "noisy": [],
           "per_round": {n: rs for n, rs in results.items()}}
    for name, rs in ok.items():
        if not rs:
            continue
        res["bandwidth"][name] = [r["bandwidth_GB_per_s"] for r in rs]
        res["noisy"] += [f"{name} round {i + 1}: bandwidth probes {100 * r['bandwidth_GB_per_s']['spread']:.0f}% apart"
                         for i, r in enumerate(rs) if r["bandwidth_GB_per_s"]["spread"] > NOISY]
        for n in rs[0]["first_token"]:
            res["first_token"].setdefault(name, {})[n] = over_rounds([r["first_token"][n] for r in rs])
        for n in rs[0]["prefill_chunked"]:
            res["prefill_chunked"].setdefault(name, {})[n] = over_rounds([r["prefill_chunked"][n] for r in rs])
        for b, cells in rs[0]["decode"].items():
            for p in cells:
                s = over_rounds([r["decode"][b][p] for r in rs])
                s["tokens_per_s"] = int(b) * 1e3 / s["median_ms"]
                if "weight_bytes_per_step" in rs[0]:
                    # batches above MAX_PICK_ROWS compute logits rows: they read the fp32 head, not the filter
                    key = "weight_bytes_per_step" if int(b) <= MAX_PICK_ROWS else "weight_bytes_per_logits_step"
                    key = key if key in rs[0] else "weight_bytes_per_step"
                    floors = [floor_ms(r[key], r["kv_bytes_per_token"], int(p), int(b),
                                       r["bandwidth_GB_per_s"]["median"]) for r in rs]
                    s["floor_ms"] = float(np.median(floors))
                    s["fraction_of_floor"] = float(np.median([f / r["decode"][b][p]["median_ms"]
                                                              for f, r in zip(floors, rs)]))
                    s["bytes_read"] = rs[0][key] + rs[0]["kv_bytes_per_token"] * int(p) * int(b)
                res["decode"].setdefault(name, {}).setdefault(b, {})[p] = s
        if "weight_bytes_per_step" in rs[0]:
            res["model"]["variants"][name] = {"file_bytes": rs[0]["file_bytes"],
                                              "weight_bytes_per_step": rs[0]["weight_bytes_per_step"],
                                              "kv_bytes_per_token": rs[0]["kv_bytes_per_token"]}
    res["memory"] = ours[0]["memory"] if ours else []
    res["checks"] = checks(res)
    return res


def checks(r: dict) -> dict:
    """The project's targets, from this run's numbers only (reported by --check)."""
    d, ft, out = r["decode"], r["first_token"], {}
    ours = d.get("kvcache-infer", {}).get("1", {})

    def best(table, key):
        got = {n: table[n][key]["median_ms"] for n in PEERS if key in table.get(n, {})}
        return min(got.items(), key=lambda kv: kv[1]) if got else None

    if r["config"] != "tiny":
        for p, bar in ((32, 0.85), (512, 0.75)):
            bp = best({n: d.get(n, {}).get("1", {}) for n in PEERS}, str(p))
            if bp and str(p) in ours:
                ratio = ours[str(p)]["median_ms"] / bp[1]
                out[f"decode@{p} vs best peer"] = {"value": ratio, "bar": f"<= {bar}", "met": ratio <= bar,
                                                   "best_peer": bp[0]}
        for n, bar in (("32", 0.72), ("512", 0.72)):
            bp = best(ft, n)
            if bp and n in ft.get("kvcache-infer", {}):
                ratio = ft["kvcache-infer"][n]["median_ms"] / bp[1]
                out[f"first token ({n}-token prompt) vs best peer"] = {"value": ratio, "bar": f"<= {bar}",
                                                                       "met": ratio <= bar, "best_peer": bp[0]}
        for name, p, bar in (("kvcache-infer-int8", 32, 7.0), ("kvcache-infer-int4", 32, 3.2),
                             ("kvcache-infer-int4", 512, 6.5)):
            got = d.get(name, {}).get("1", {}).get(str(p))
            if got:
                out[f"{name.removeprefix('kvcache-infer-')} decode@{p} ms"] = {
                    "value": got["median_ms"], "bar": f"<= {bar}", "met": got["median_ms"] <= bar}
    elif "ort-plain" in d and "32" in ours:
        ratio = ours["32"]["median_ms"] / d["ort-plain"]["1"]["32"]["median_ms"]
        out["tiny decode@32 vs ort-plain"] = {"value": ratio, "bar": "<= 0.5", "met": ratio <= 0.5}
    out["cache memory equals the formula"] = {"value": None, "bar": "all equal",
                                              "met": all(x["equal"] for x in r["memory"])}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["gpt2", "tiny"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--systems", nargs="+", default=list(ALL), choices=ALL)
    ap.add_argument("--weights", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                    help="weight-only quantized exports of ours to run too (models/NAME-int8 ...); none: --weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="processes per system, order rotated (default 3)")
    ap.add_argument("--positions", type=int, nargs="+", default=[32, 128, 512, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--batch-position", type=int, default=128)
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 128, 512, 1000])
    ap.add_argument("--chunk", type=int, default=128, help="chunk length for the chunked-prefill comparison")
    ap.add_argument("--contexts", type=int, nargs="+", default=[10, 50, 100, 200, 1000],
                    help="contexts for cache vs no-cache")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="sequences per cell in one process (default 3)")
    ap.add_argument("--prompt-repeats", type=int, default=5, help="timed prompts per first-token cell (default 5)")
    ap.add_argument("--batch-repeats", type=int, default=2)
    ap.add_argument("--nocache-steps", type=int, default=2)
    ap.add_argument("--nocache-repeats", type=int, default=1)
    ap.add_argument("--mem-seq-lens", type=int, nargs="+", default=[128, 256, 512, 768, 1024])
    ap.add_argument("--publish", action="store_true",
                    help="write benchmarks/results/ and benchmarks/RESULTS.md (default: benchmarks/out/)")
    ap.add_argument("--check", action="store_true", help="exit 1 when one of the project's targets is missed")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (overrides --publish's choice)")
    ap.add_argument("--exports-only", action="store_true", help="make the missing exports, measure nothing")
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if 1 not in a.batches:
        a.batches = [1, *a.batches]
    if a.worker:
        return worker(a)
    if a.exports_only:
        for config in a.configs:
            ensure_exports(config, a.seed, a.models_dir, a.weights)
        return
    out = a.out_dir or out_dir(a.publish)
    out.mkdir(parents=True, exist_ok=True)
    missed = []
    for config in a.configs:
        ensure_exports(config, a.seed, a.models_dir, a.weights)
        names = [*a.systems, *(f"kvcache-infer-{w}" for w in a.weights)]
        args = ["--config", config, "--seed", str(a.seed), "--models-dir", str(a.models_dir), "--threads", str(a.threads),
                "--positions", *map(str, a.positions), "--batches", *map(str, a.batches), "--batch-position",
                str(a.batch_position), "--prompt-lens", *map(str, a.prompt_lens), "--chunk", str(a.chunk),
                "--contexts", *map(str, a.contexts), "--warmup", str(a.warmup), "--steps", str(a.steps), "--repeats",
                str(a.repeats), "--prompt-repeats", str(a.prompt_repeats), "--batch-repeats", str(a.batch_repeats),
                "--nocache-steps", str(a.nocache_steps),
                "--nocache-repeats", str(a.nocache_repeats), "--mem-seq-lens", *map(str, a.mem_seq_lens)]
        print(f"\n== {config}: {len(names)} systems x {a.rounds} rounds, each alone in its own process", flush=True)
        results = run_rounds("benchmarks.suite", {n: [n, *args] for n in names}, a.rounds, timeout=3600)
        res = aggregate(config, results, a)
        path = out / f"suite_{config}_cpu.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(write_config_report(res, path))
        for line in res["noisy"]:
            print(f"note: {line}: this machine was busy; its figures are less certain")
        missed += [f"{config}: {k} = {v['value']}" for k, v in res["checks"].items() if not v["met"]]
    md = (RESULTS.parent / "RESULTS.md") if out.resolve() == RESULTS.resolve() else out / "RESULTS.md"
    write_results_md(out, md)
    print(f"\nwrote {out}/suite_*_cpu.{{json,md,png}} and {md}")
    if a.check:
        for line in missed:
            print(f"target missed: {line}")
        if missed:
            sys.exit(1)
        print("every target met")


if __name__ == "__main__":
    main()
