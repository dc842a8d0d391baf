"""The short headline comparison of `bash scripts/run.sh`: a few minutes, not the published numbers.

    python -m benchmarks.quick [--model models/gpt2] [--peers auto|leaders|core|none] [--threads 2]

GPT-2 small's fp32 checkpoint (our fp32 export at --model; the peers' own formats from models/peers/), one
round, every (system, workload) alone in its own process (benchmarks.isolate), short sizes
(benchmarks.cpu_peers.SHORT):
    decode    one sequence: a fresh 32-id prompt, then 32 greedy tokens; ms per token after the first
              (median of 2 runs after 1 untimed)
    serving   16 requests at once, prompts U[8,64], outputs U[16,64] (exactly that many tokens);
              generated tokens / wall time. Our Engine runs 16 sequences at a time.
Peers: the CPU leaders (OpenVINO GenAI, llama.cpp, CTranslate2; `bash scripts/setup_peers.sh`, then
`.venv-peers/bin/python -m benchmarks.peer_models`) where installed, at fp32; without any of them, the
core install's peers on the decode workload (HF transformers eager, onnxruntime-genai and a plain ORT
loop on Optimum's export at MODEL-optimum). Each peer that is not installed is named with the reason.
Pairs compute alike: our fp32 export against the peers' strict fp32 (OpenVINO with
INFERENCE_PRECISION_HINT=f32); OpenVINO's default for an fp32 model computes in bf16 with a u8 KV cache,
so it is paired with our export of the same checkpoint that computes in int8 (--best, default w8a8-kv8:
int8 GEMMs and an int8 KV cache; made when missing). Each row names what it computes.
The full comparison: `python -m benchmarks.leaders --rounds 3` and `python -m benchmarks.suite`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .isolate import Case, emit, out_dir, run_worker
from .leaders import OURS, ensure_exports, export_dir
from .peer_workloads import LLAMA_BIN, SHORT, workload_requests

REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEER_ROOT = REPO / "models" / "peers"
SETUP = "run `bash scripts/setup_peers.sh`, then `.venv-peers/bin/python -m benchmarks.peer_models`"
# leader: (precisions shown, what it needs beyond .venv-peers, label)
LEADERS = {"openvino": (("fp32-strict", "fp32-default"), [PEER_ROOT / "gpt2-ov-fp32"], "OpenVINO GenAI"),
           "llamacpp": (("f32",), [LLAMA_BIN / "llama-bench", LLAMA_BIN / "llama-server", PEER_ROOT / "gpt2-f32.gguf"],
                        "llama.cpp"),
           "ct2": (("float32",), [PEER_ROOT / "gpt2-ct2-float32"], "CTranslate2")}
LOW_PRECISION = {"fp32-default"}       # peer precisions paired with --best instead of our fp32 export
CORE = {"hf-eager": "HF transformers (eager, torch)", "genai": "onnxruntime-genai", "ort-plain": "a plain ORT loop"}


# -- the worker: ours (both workloads) and the core peers (decode), through benchmarks.peers' systems -----------
def _decode(system, V: int) -> dict:
    rng = np.random.default_rng(1)
    p, n = SHORT["decode_prompts"][0], SHORT["decode_new"]
    runs = []
    for k in range(SHORT["decode_timed"] + 1):
        tok = system.start(rng.integers(0, V - 1, (1, p)))       # a fresh prompt each run
        gaps = []
        for _ in range(n - 1):
            t0 = time.perf_counter()
            tok = system.step(np.asarray(tok).reshape(1))
            gaps.append((time.perf_counter() - t0) * 1e3)
        if k:                                                    # the first run is untimed
            runs.append(float(np.mean(gaps)))
    return {"ms_per_token": float(np.median(runs)), "runs_ms": runs, "prompt": p, "new_tokens": n}


def _serving(model_dir: Path, V: int, threads: int) -> dict:
    from kvcache_infer import Engine, Model

    from .common import session_options
    model = Model(model_dir, intra_op_threads=threads, session_options=session_options(threads))
    reqs = workload_requests("serving", SHORT, V)
    eng = Engine(model, max_sequences=16, max_seq_len=512)
    eng.generate(list(np.random.default_rng(1234).integers(0, V - 1, (2, 24))), max_new_tokens=4)
    t0 = time.perf_counter()
    handles = [eng.submit(r["prompt"], max_new_tokens=r["out"]) for r in reqs]
    while eng.busy:
        eng.tick()
    if [len(h.output) for h in handles] != [r["out"] for r in reqs]:
        raise RuntimeError("a request did not generate its exact length")
    got = sum(len(h.output) for h in handles)
    wall = max(h.token_times[-1] for h in handles) - t0
    return {"tokens_per_s": got / wall, "wall_s": wall, "generated_tokens": got, "requests": len(reqs),
            "ttft_p50_s": float(np.percentile([h.ttft for h in handles], 50))}


def worker(a) -> None:
    from .common import environment
    from .peers import GenAI, HFEager, Ours, PlainOrtLoop, hf_model_for
    model_dir = Path(a.model)
    optimum_dir = model_dir.with_name(f"{model_dir.name}-optimum")
    V = json.loads((model_dir / "manifest.json").read_text())["vocab_size"]
    cap = SHORT["decode_prompts"][0] + SHORT["decode_new"] + 1
    if a.workload == "serving":
        numbers = _serving(model_dir, V, a.threads)
    else:
        system = {"kvcache-infer": lambda: Ours(model_dir, a.threads, {1: cap}),
                  "hf-eager": lambda: HFEager(hf_model_for(model_dir), a.threads),
                  "genai": lambda: GenAI(optimum_dir, a.threads, cap),
                  "ort-plain": lambda: PlainOrtLoop(optimum_dir, a.threads)}[a.worker]()
        numbers = _decode(system, V)
    emit({"system": a.worker, "workload": a.workload, "numbers": numbers, "environment": environment(a.threads)})


# -- the runner -----------------------------------------------------------------------------------------------
def leaders_present() -> tuple[list[str], list[str]]:
    """(leaders that can run here, one line per leader that cannot, with the reason)."""
    if not PEERS_PYTHON.is_file():
        return [], [f"{label}: not installed ({PEERS_PYTHON.relative_to(REPO)} is missing); {SETUP}"
                    for _, _, label in LEADERS.values()]
    ok, skipped = [], []
    for peer, (_, needs, label) in LEADERS.items():
        missing = [p for p in needs if not p.exists()]
        if missing:
            skipped.append(f"{label}: {missing[0].relative_to(REPO)} is missing; {SETUP}")
        else:
            ok.append(peer)
    return ok, skipped


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its finished children)."""
    import resource
    ours = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), ours
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), ours


def pairing(leaders: list[str], best: str | None) -> dict[str, tuple[str, str, str]]:
    """{peer row: (peer, precision, our row computed alike)}: strict fp32 against our fp32 export, the
    low-precision defaults against `best` (our row of the export that computes in int8; None: left out)."""
    pairs = {}
    for peer in leaders:
        for prec in LEADERS[peer][0]:
            if prec in LOW_PRECISION and best is None:
                continue
            pairs[f"{LEADERS[peer][2]} {prec}"] = (peer, prec, best if prec in LOW_PRECISION else "kvcache-infer fp32")
    return pairs


def detail(res: dict) -> str:
    """What a peer's run computed (weights / compute / KV cache), from its worker's precision_detail."""
    d = res.get("precision_detail") or {}
    short = lambda v: str(v).split(" (")[0].split(";")[0]          # noqa: E731 -- the head of each description
    return " / ".join(short(d[k]) for k in ("weights", "compute", "kv_cache") if k in d)


def figure(res: dict) -> float | None:
    if "failed" in res:
        return None
    n = res["numbers"]
    if res["workload"] == "decode":
        if "ms_per_token" in n:
            return n["ms_per_token"]
        return next(iter(n.values()))["ms_per_token"]             # cpu_peers: {"P32": {...}}
    return n["tokens_per_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/gpt2", help="our fp32 export of GPT-2 small (seed 0)")
    ap.add_argument("--peers", default="auto", choices=["auto", "leaders", "core", "none"],
                    help="auto: the CPU leaders that are installed, else the core install's peers")
    ap.add_argument("--best", default="w8a8-kv8", choices=["none", *OURS],
                    help="our export of the same checkpoint paired with OpenVINO's bf16 default (default w8a8-kv8; "
                         "made next to --model when missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per process")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/out)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    t = str(a.threads)
    ours = lambda w, m: ["kvcache-infer", "--model", str(m), "--workload", w, "--threads", t]   # noqa: E731
    cases: dict[str, list[str] | Case] = {f"kvcache-infer fp32 / {w}": ours(w, a.model) for w in ("decode", "serving")}
    computes = {"kvcache-infer fp32": OURS["fp32"][1]}
    leaders, skipped = leaders_present() if a.peers in ("auto", "leaders") else ([], [])
    best = None
    if a.best != "none" and any(p in LOW_PRECISION for peer in leaders for p in LEADERS[peer][0]):
        root, config = Path(a.model).parent, "gpt2"        # the same checkpoint as --model: GPT-2 small, seed 0
        ensure_exports([a.best], root, config)
        best = f"kvcache-infer {a.best}"
        computes[best] = OURS[a.best][1]
        cases.update({f"{best} / {w}": ours(w, export_dir(root, config, a.best)) for w in ("decode", "serving")})
    pairs = pairing(leaders, best)
    for row, (peer, prec, _) in pairs.items():
        for w in ("decode", "serving"):
            cases[f"{row} / {w}"] = Case(str(PEERS_PYTHON), "benchmarks.cpu_peers",
                                         [peer, "--precision", prec, "--workload", w, "--threads", t, "--short"])
    pairs = {row: mine for row, (_, _, mine) in pairs.items()}
    core = a.peers == "core" or (a.peers == "auto" and not leaders)
    if core:
        for name, label in CORE.items():
            cases[f"{label} / decode"] = [name, "--model", a.model, "--workload", "decode", "--threads", t]
            pairs[label] = "kvcache-infer fp32"
    print(f"short run: GPT-2 small ({a.model}, random weights, seed 0), its fp32 checkpoint, {a.threads} threads, "
          f"one round, each system alone in its own process", flush=True)
    print("  decode: one sequence, 32-token prompt, then 32 tokens; serving: 16 requests at once, outputs of "
          "16-64 tokens", flush=True)
    if a.best == "none" and "openvino" in leaders:
        skipped.append("OpenVINO GenAI fp32-default: --best none (it computes in bf16 with a u8 cache; no export of "
                       "ours computes alike)")
    for line in skipped:
        print(f"  skipped: {line}", flush=True)
    if core:
        print("  peers: the core install's (no CPU leader is installed here)", flush=True)
    cpu0, runs, t0 = cpu_seconds(), {}, time.perf_counter()
    for i, (name, c) in enumerate(cases.items()):
        res = run_worker(c.module, c.args, a.timeout, c.python) if isinstance(c, Case) else \
            run_worker("benchmarks.quick", c, a.timeout)
        runs[name] = res
        how = "did not run" if "failed" in res else f"{res['process_wall_s']:.0f} s"
        print(f"  [{i + 1}/{len(cases)}, {time.perf_counter() - t0:.0f} s] {name}: {how}", flush=True)
    rows: dict[str, dict] = {}
    notes = []
    for name, res in runs.items():
        system, w = name.rsplit(" / ", 1)
        v = figure(res)
        rows.setdefault(system, {})[w] = v
        if v is None:
            notes.append(f"{name} could not run here: {res['failed'][:200]}")
        elif system not in computes:
            computes[system] = detail(res)
    print(f"\n{'system':34s} {'decode ms/token':>15s} {'serving tokens/s':>16s}   weights / compute / KV cache")
    for system, r in rows.items():
        d, s = r.get("decode"), r.get("serving")
        print(f"{system:34s} {'-' if d is None else f'{d:.2f}':>15s} {'-' if s is None else f'{s:.0f}':>16s}   "
              f"{computes.get(system, '')}")
    for system, mine in pairs.items():
        r, ours = rows.get(system, {}), rows.get(mine, {})
        said = [f"decode ms/token {ours['decode'] / r['decode']:.2f}x theirs (lower is better)"
                if ours.get("decode") and r.get("decode") else "",
                f"serving tokens/s {ours['serving'] / r['serving']:.2f}x theirs (higher is better)"
                if ours.get("serving") and r.get("serving") else ""]
        if any(said):
            print(f"{mine} against {system}: " + ", ".join(x for x in said if x))
    for line in notes:
        print("note: " + line)
    cpu1, wall = cpu_seconds(), time.perf_counter() - t0
    others = ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (wall * (os.cpu_count() or 1))
    if others > 0.1:              # the machine's busy time beyond this run's own processes
        print(f"note: other work used about {100 * min(others, 1):.0f}% of the {os.cpu_count()} cores meanwhile: these "
              f"figures are slower and noisier than on an idle machine")
    folder = out_dir(False) if a.out_dir is None else a.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "quick_gpt2.json"
    path.write_text(json.dumps({"benchmark": "quick", "model": a.model, "threads": a.threads, "sizes": SHORT,
                                "skipped": skipped,
                                "other_work_cpu_share": others, "runs": runs}, indent=1, default=str) + "\n")
    full = ("python -m benchmarks.suite --rounds 3 (the core install's peers, every position and batch)" if core else
            "python -m benchmarks.leaders --rounds 3 (every precision, every workload)")
    print(f"\nThis is a short run (one round, short workloads, on a machine that may be busy): not the "
          f"published numbers.\nThe full comparison: {full}; everything: bash scripts/run.sh --full\n"
          f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
