"""Each system measured alone in its own process, in a rotating order, over several rounds.

Every ONNX Runtime session keeps its own intra-op threads, which spin for a while after a run and
take the cores from whatever runs next; on 2 cores two live sessions slow each other, the fast
configurations most. So a benchmark here runs each (system, case) as `python -m MODULE --worker ...`
in a fresh process with nothing else alive, round after round with the order rotated, and reports
the median over rounds with the spread and every round's figures.

A worker prints one line `RESULT {json}` (anything else it prints is progress). A worker that fails
is recorded with the tail of its stderr, never dropped.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

RESULTS = Path(__file__).parent / "results"     # committed: written only with --publish
SCRATCH = Path(__file__).parent / "out"         # git-ignored: every run without --publish


def out_dir(publish: bool) -> Path:
    d = RESULTS if publish else SCRATCH
    d.mkdir(parents=True, exist_ok=True)
    return d


def emit(result: dict) -> None:
    """A worker's one result line, with the peak resident memory of its process."""
    import resource
    result = {**result, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("RESULT " + json.dumps(result), flush=True)


class Case(NamedTuple):
    """A worker to run with another interpreter or module than the benchmark's own (peers' venvs)."""

    python: str
    module: str
    args: list


def run_worker(module: str, args: list[str], timeout: float, python: str | None = None) -> dict:
    """Runs `python -m module --worker args...` alone; its RESULT, or {"failed": why}."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([python or sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-3:]
        return {"failed": f"exit {p.returncode}: " + " | ".join(tail)}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def rotated(names: list, r: int) -> list:
    k = r % len(names)
    return names[k:] + names[:k]


def run_rounds(module: str, cases: dict[str, list[str] | Case], rounds: int, timeout: float = 1800,
               journal: Path | None = None) -> dict[str, list[dict]]:
    """{case name: worker args, or a Case} -> {case name: [result of each round]}, each case alone in its own
    process, the order rotated every round; progress on stderr.

    With a `journal` (a JSON-lines file), every result is appended as it arrives and results already in
    it for the same cases are taken instead of being measured again, so an interrupted run resumes
    where it stopped."""
    names = list(cases)
    out: dict[str, list[dict]] = {n: [] for n in names}
    kept: dict[tuple[int, str], dict] = {}
    if journal is not None and journal.is_file():
        for line in journal.read_text().splitlines():
            e = json.loads(line)
            if e["case"] in cases and e["spec"] == _spec(cases[e["case"]]):
                kept[(e["round"], e["case"])] = e["result"]
    total, done, t0 = rounds * len(names), 0, time.perf_counter()
    for r in range(rounds):
        for name in rotated(names, r):
            c = cases[name]
            res = kept.get((r, name))
            if res is None:
                res = run_worker(c.module, c.args, timeout, c.python) if isinstance(c, Case) else \
                    run_worker(module, c, timeout)
                if journal is not None:
                    with journal.open("a") as f:
                        f.write(json.dumps({"round": r, "case": name, "spec": _spec(c), "result": res}) + "\n")
                how = "failed: " + res["failed"][:80] if "failed" in res else f"{res['process_wall_s']:.0f} s"
            else:
                how = f"from {journal.name}"
            out[name].append(res)
            done += 1
            print(f"[{done}/{total}, {time.perf_counter() - t0:.0f} s] round {r + 1}: {name}: {how}",
                  file=sys.stderr, flush=True)
    return out


def succeeded(res: dict[str, list[dict]]):
    """(name, the rounds that ran) for each case of run_rounds' result that ran at least once; says
    which cases did not run, and why."""
    for name, runs in res.items():
        ok = [r for r in runs if "failed" not in r]
        if ok:
            yield name, ok
        else:
            print(f"{name}: did not run: {runs[0]['failed']}")


def _spec(case: list[str] | Case) -> list:
    return [case.python, case.module, *case.args] if isinstance(case, Case) else list(case)


def spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "rounds": [float(x) for x in a]}
