"""The comparison suite: kvcache-infer against the tools people use instead, one command, one run.

    python -m benchmarks.suite                      # GPT-2 small and the tiny config, everything
    python -m benchmarks.suite --configs tiny --repeats 2

For each named config (seeded random weights; the exports are made first when missing, ours at
models/NAME and Optimum's at models/NAME-optimum) the same greedy workload runs through every
system in benchmarks/peers.py, in this one process, threads pinned to --threads:

  decode      one-token steps at cache positions 32, 128, 512, 1000 (batch 1) and at position
              --batch-position for batch 1, 4, 8, 16: a fresh sequence of random prompt tokens is
              prefilled to position - warmup, `warmup` untimed steps follow, then `steps` timed
              ones; each timed step feeds one token per row and picks the next (greedy, EOS
              ignored). Repeats are the outer loop; inside one, every cell runs every system in
              a rotating order with a settle pause between systems, so that a noisy moment of
              the machine is spread over all of them.
  first token a --prompt-len prompt, prefill and the first pick, batch 1.
  no cache    the whole prefix recomputed per token, at the seed design's contexts 10 .. 1000.
  floor       the read bandwidth of a matrix-vector product, measured at the start and at the
              end of the run; bytes a step must read = weights (embedding tables excepted: a
              Gather reads one row) + the live K/V of every row.
  memory      our cache allocation for max_seq_len 128 .. 1024 and batch 1 .. 16, against
              2 x layers x heads x head_dim x max_seq_len x batch x bytes.

Medians with min/max over all timed steps; ms per step, tokens/s = batch x steps / time (only
generated tokens). JSON, markdown and PNG plots per config under benchmarks/results/, and
benchmarks/RESULTS.md rebuilt from every suite_*.json there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .common import environment, summarize
from .floor import floor_ms, matvec_bandwidth, weight_bytes_per_step
from .peers import GenAI, HFEager, NoCache, OptimumORT, Ours, PlainOrtLoop, hf_model_for
from .report import write_config_report, write_results_md

SETTLE_S = 0.1   # idle pause between systems: each runtime's pool threads spin a while after a run
# The tools people would use instead.
PEERS = ("hf-eager", "optimum", "optimum-iobinding", "genai", "ort-plain")
ALL = ("kvcache-infer", *PEERS, "no-cache")


def ensure_exports(config: str, seed: int, root: Path, weights=()) -> tuple[Path, Path]:
    """Our export at root/CONFIG (and root/CONFIG-int8 ... per `weights`), Optimum's at root/CONFIG-optimum."""
    ours, optimum = root / config, root / f"{config}-optimum"
    for out, w in [(ours, None), *[(root / f"{config}-{w}", w) for w in weights]]:
        if not (out / "manifest.json").is_file():
            print(f"exporting {config} (seed {seed}{', ' + w if w else ''}) to {out}", flush=True)
            subprocess.run([sys.executable, "-m", "export", "--config", config, "--seed", str(seed), "--out", str(out),
                            *(["--weights", w] if w else [])], check=True)
    if not (optimum / "model.onnx").is_file():
        print(f"exporting {config} (seed {seed}) through Optimum to {optimum}", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.optimum_export", "--config", config, "--seed", str(seed),
                        "--out", str(optimum)], check=True)
    for path in [ours, *[root / f"{config}-{w}" for w in weights]]:
        src = json.loads((path / "manifest.json").read_text())["source"]
        if src.get("config") != config or src.get("seed") != seed:
            raise SystemExit(f"{path} holds {src}, not config {config} seed {seed}: remove it or pass --models-dir")
    return ours, optimum


def build_systems(names, ours_dir: Path, optimum_dir: Path, threads: int, capacity: dict[int, int], weights=()):
    """name -> system, and name -> why it could not be built (never silently dropped)."""
    makers = {
        **{f"kvcache-infer-{w}": (lambda w=w: Ours(ours_dir.with_name(f"{ours_dir.name}-{w}"), threads, capacity,
                                                   name=f"kvcache-infer-{w}")) for w in weights},
        "kvcache-infer": lambda: Ours(ours_dir, threads, capacity),
        "hf-eager": lambda: HFEager(hf_model_for(ours_dir), threads),
        "optimum": lambda: OptimumORT(optimum_dir, threads, io_binding=False),
        "optimum-iobinding": lambda: OptimumORT(optimum_dir, threads, io_binding=True),
        "genai": lambda: GenAI(optimum_dir, threads, max(capacity.values())),
        "ort-plain": lambda: PlainOrtLoop(optimum_dir, threads),
        "no-cache": lambda: NoCache(ours_dir, threads, {1: capacity[1]}),
    }
    systems, not_run = {}, {}
    for name in [*names, *(f"kvcache-infer-{w}" for w in weights)]:
        try:
            systems[name] = makers[name]()
        except Exception as e:  # noqa: BLE001  (a peer that cannot run is reported with the reason)
            not_run[name] = f"{type(e).__name__}: {e}"
            print(f"not running {name}: {not_run[name]}", flush=True)
    return systems, not_run


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


def run_config(config: str, a) -> dict:
    ours_dir, optimum_dir = ensure_exports(config, a.seed, a.models_dir, a.weights)
    m = json.loads((ours_dir / "manifest.json").read_text())
    max_pos = m["max_positions"]
    positions = [p for p in a.positions if p + a.steps <= max_pos]
    contexts = [p for p in a.contexts if p + 1 <= max_pos and p >= 2]
    batch_pos = min(a.batch_position, max_pos - a.steps)
    # cells: (system filter, batch, position, warmup, steps)
    cells = [("cached", 1, p, a.warmup, a.steps) for p in positions]
    cells += [("cached", b, batch_pos, a.warmup, a.steps) for b in a.batches if b != 1 or batch_pos not in positions]
    cells += [("ours-only", 1, p, a.warmup, a.steps) for p in contexts if p not in positions and p >= a.warmup]
    cells += [("no-cache", 1, p, 0, a.nocache_steps) for p in sorted(set(contexts) | set(positions))]
    capacity = {b: max(p + s for _, bb, p, _, s in cells if bb == b) + 1 for _, b, _, _, _ in cells}

    print(f"\n== {config}: {ours_dir} and {optimum_dir}", flush=True)
    bw_start = matvec_bandwidth(a.threads)
    print(f"read bandwidth (matrix-vector): {bw_start['GB_per_s']:.1f} GB/s", flush=True)
    systems, not_run = build_systems(a.systems, ours_dir, optimum_dir, a.threads, capacity, a.weights)
    if "kvcache-infer" not in systems:
        raise SystemExit(f"kvcache-infer itself could not run: {not_run.get('kvcache-infer')}")
    rng = np.random.default_rng(a.seed)
    V = m["vocab_size"]
    prompts = {b: rng.integers(0, V, size=(b, capacity[b])) for b in capacity}

    def members(kind):
        if kind == "no-cache":
            return ["no-cache"] if "no-cache" in systems else []
        if kind == "ours-only":
            return [s for s in systems if s.startswith("kvcache-infer")]
        return [s for s in systems if s != "no-cache"]

    samples: dict = {}
    failed: dict = {}
    jobs = [("first", 1, a.prompt_len, 0, 0, r) for r in range(a.repeats)]
    for r in range(a.repeats):
        jobs += [(k, b, p, w, s, r) for k, b, p, w, s in cells if k != "no-cache" and (b == 1 or r < a.batch_repeats)]
    jobs += [(k, b, p, w, s, r) for r in range(a.nocache_repeats) for k, b, p, w, s in cells if k == "no-cache"]
    for name, system in systems.items():     # one untimed pass: first-call allocations, lazy init
        if name != "no-cache":
            time_steps(system, prompts[1], min(16, max_pos - 4), 2, 2)
    with tqdm(jobs, desc=config, unit="cell") as bar:
        for kind, b, p, w, s, r in bar:
            names = members("cached" if kind == "first" else kind)
            k = r % max(1, len(names))
            for name in names[k:] + names[:k]:             # rotate who goes first
                if name in failed:
                    continue
                bar.set_postfix_str(f"{name} b{b} @{p}")
                time.sleep(SETTLE_S)
                try:
                    got = ([time_first_token(systems[name], prompts[1], p)] if kind == "first"
                           else time_steps(systems[name], prompts[b], p, w, s))
                except Exception as e:  # noqa: BLE001  (reported, and the system is dropped)
                    failed[name] = f"{type(e).__name__} at batch {b}, position {p}: {e}"
                    print(f"\n{name} failed: {failed[name]}", flush=True)
                    continue
                samples.setdefault((name, "first" if kind == "first" else "decode", b, p), []).extend(got)
    bw_end = matvec_bandwidth(a.threads)
    print(f"read bandwidth at the end: {bw_end['GB_per_s']:.1f} GB/s", flush=True)

    # bytes a step must read, per system of ours: (weights, file size, K/V bytes per token and row)
    reads = {n: (*weight_bytes_per_step(s.model.dir), s.model.manifest.cache_bytes_per_token)
             for n, s in systems.items() if n.startswith("kvcache-infer")}
    weights, file_bytes, kv_tok = reads["kvcache-infer"]
    gbps = float(np.mean([bw_start["GB_per_s"], bw_end["GB_per_s"]]))
    res = {"config": config, "environment": environment(a.threads),
           "command": " ".join(["python", "-m", "benchmarks.suite", *sys.argv[1:]]),
           "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "torch_threads": a.threads, "provider": "CPUExecutionProvider",
           "model": {"ours": str(ours_dir), "optimum": str(optimum_dir), "layers": m["num_layers"],
                     "heads": m["num_heads"], "head_dim": m["head_dim"], "hidden": m["hidden_size"],
                     "vocab": V, "max_positions": max_pos, "dtype": m["dtype"], "file_bytes": file_bytes,
                     "weight_bytes_per_step": weights, "kv_bytes_per_token": kv_tok,
                     "variants": {n: {"path": str(systems[n].model.dir), "file_bytes": fb, "weight_bytes_per_step": wb,
                                      "kv_bytes_per_token": kv} for n, (wb, fb, kv) in reads.items()}},
           "bandwidth": {"start": bw_start, "end": bw_end, "GB_per_s_used": gbps},
           "systems": {n: s.info for n, s in systems.items()}, "not_run": not_run, "failed": failed,
           "workload": {"positions": positions, "batches": a.batches, "batch_position": batch_pos,
                        "contexts": contexts, "prompt_len": a.prompt_len, "warmup": a.warmup, "steps": a.steps,
                        "repeats": a.repeats, "batch_repeats": a.batch_repeats, "nocache_steps": a.nocache_steps,
                        "nocache_repeats": a.nocache_repeats, "settle_s": SETTLE_S, "seed": a.seed,
                        "tokens": "random prompt ids, then greedy picks (EOS ignored)"},
           "first_token": {}, "decode": {}}
    for (name, kind, b, p), ms in samples.items():
        if kind == "first":
            res["first_token"][name] = summarize(ms)
            continue
        s = summarize(ms)
        s["tokens_per_s"] = b * 1e3 / s["median_ms"]
        if name in reads:
            wb, _, kv = reads[name]
            s["bytes_read"] = wb + kv * p * b
            s["floor_ms"] = floor_ms(wb, kv, p, b, gbps)
            s["fraction_of_floor"] = s["floor_ms"] / s["median_ms"]
        res["decode"].setdefault(name, {}).setdefault(str(b), {})[str(p)] = s
    res["memory"] = memory_sweep(systems["kvcache-infer"].model, a.mem_seq_lens, a.batches)
    res["checks"] = checks(res)
    return res


def memory_sweep(model, seq_lens, batches) -> list[dict]:
    """Our cache allocation per (max_seq_len, batch) against the closed-form size."""
    from kvcache_infer import KVCacheInferencer
    m = model.manifest
    rows = []
    for L in [s for s in seq_lens if s <= m.max_positions]:
        for b in batches:
            inf = KVCacheInferencer(model, max_seq_len=L, batch_size=b)
            formula = 2 * m.num_layers * m.num_kv_heads * m.head_dim * L * b * np.dtype(m.dtype).itemsize
            got = inf.memory_profile().total_cache_bytes
            rows.append({"max_seq_len": L, "batch": b, "allocated_bytes": got, "formula_bytes": formula,
                         "equal": got == formula})
            del inf
    return rows


def checks(r: dict) -> dict:
    """The issue's bars, from this run's numbers only."""
    d, out = r["decode"], {}
    ours = d.get("kvcache-infer", {}).get("1", {})

    def best_peer(p):
        got = {n: d[n]["1"][str(p)]["median_ms"] for n in PEERS if n in d and str(p) in d[n].get("1", {})}
        return min(got.items(), key=lambda kv: kv[1]) if got else None

    if r["config"] != "tiny":
        for p, bar in ((32, 0.85), (512, 0.75)):
            bp = best_peer(p)
            if bp and str(p) in ours:
                ratio = ours[str(p)]["median_ms"] / bp[1]
                out[f"pos{p}_vs_best_peer"] = {"ratio": ratio, "bar": bar, "best_peer": bp[0], "pass": ratio <= bar}
        if "32" in ours:
            f = ours["32"]["fraction_of_floor"]
            out["pos32_fraction_of_floor"] = {"value": f, "bar": 0.85, "pass": f >= 0.85}
        if "ort-plain" in d and "512" in ours:
            ratio = ours["512"]["median_ms"] / d["ort-plain"]["1"]["512"]["median_ms"]
            out["pos512_vs_ort_plain"] = {"ratio": ratio, "bar": 0.80, "pass": ratio <= 0.80}
        if "1000" in ours and "32" in ours:
            ratio = ours["1000"]["median_ms"] / ours["32"]["median_ms"]
            out["pos1000_vs_own_pos32"] = {"ratio": ratio, "bar": 1.20, "pass": ratio <= 1.20}
        bp_ = str(r["workload"]["batch_position"])
        b16 = d.get("kvcache-infer", {}).get("16", {}).get(bp_)
        b1 = ours.get(bp_)
        if b16 and b1:
            ratio = b16["tokens_per_s"] / b1["tokens_per_s"]
            out["batch16_vs_batch1_tokens_per_s"] = {"ratio": ratio, "bar": 8.0, "pass": ratio >= 8.0}
        for name, p, bar in (("kvcache-infer-int8", 32, 7.0), ("kvcache-infer-int4", 32, 3.2),
                             ("kvcache-infer-int4", 512, 6.5)):
            got = d.get(name, {}).get("1", {}).get(str(p))
            if got:
                out[f"{name.removeprefix('kvcache-infer-')}_pos{p}_ms"] = {
                    "value": got["median_ms"], "bar": bar, "pass": got["median_ms"] <= bar}
    elif "ort-plain" in d and "32" in ours:
        ratio = ours["32"]["median_ms"] / d["ort-plain"]["1"]["32"]["median_ms"]
        out["tiny_pos32_vs_ort_plain"] = {"ratio": ratio, "bar": 0.5, "pass": ratio <= 0.5}
    out["memory_matches_formula"] = {"pass": all(x["equal"] for x in r["memory"])}
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
    ap.add_argument("--positions", type=int, nargs="+", default=[32, 128, 512, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--batch-position", type=int, default=128)
    ap.add_argument("--contexts", type=int, nargs="+", default=[10, 50, 100, 200, 1000],
                    help="contexts for cache vs no-cache")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-repeats", type=int, default=3)
    ap.add_argument("--nocache-steps", type=int, default=2)
    ap.add_argument("--nocache-repeats", type=int, default=2)
    ap.add_argument("--mem-seq-lens", type=int, nargs="+", default=[128, 256, 512, 768, 1024])
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--results-md", type=Path, default=Path("benchmarks/RESULTS.md"))
    a = ap.parse_args(argv)
    if 1 not in a.batches:
        a.batches = [1, *a.batches]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for config in a.configs:
        res = run_config(config, a)
        path = a.out_dir / f"suite_{config}_cpu.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        table = write_config_report(res, path)
        print(table)
    write_results_md(a.out_dir, a.results_md)
    print(f"\nwrote {a.out_dir}/suite_*_cpu.{{json,md,png}} and {a.results_md}")


if __name__ == "__main__":
    main()
