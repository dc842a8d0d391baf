"""First-token and cached-token latency: kvcache-infer vs a plain ORT loop vs no-cache recompute.

All systems run in this one process, one after another, on the same weights, threads pinned:
  kvcache-infer     our export (in-place GQA cache) through KVCacheInferencer
  ort-plain         Optimum's export (present = Concat(past, new)) in a plain
                    InferenceSession.run loop, numpy past fed back each step
  no-cache          our export, the whole prefix recomputed for every new token

Workload per position p: reset, prefill p - W tokens (untimed), W warm-up steps, then S timed
one-token steps (greedy ids), repeated R times (repeats outermost, positions and systems
interleaved inside); medians with min/max over the R x S steps. Only
generated tokens are counted. First-token latency: a P-token prompt, median of R.

    python -m benchmarks.latency --model models/gpt2 --optimum models/gpt2-optimum --threads 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from kvcache_infer import KVCacheInferencer, Model

from .common import environment, session_options, summarize

# Each ORT session has its own intra-op pool whose threads spin for a while after a run; on a
# 2-core machine they take a core from the next system (measured: a 32-token prefill right after
# the other session's run took ~100 ms instead of ~58 ms). Let them go idle between systems.
SETTLE_S = 0.05


class PlainOrtLoop:
    """What most people write: session.run with numpy inputs, the presents fed back as the past."""

    def __init__(self, path: Path, threads: int):
        self.sess = ort.InferenceSession(str(path / "model.onnx"), session_options(threads),
                                         providers=["CPUExecutionProvider"])
        names = [i.name for i in self.sess.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.sess.get_outputs()]
        shape = self.sess.get_inputs()[names.index(self.past_names[0])].shape
        self.heads, self.head_dim = shape[1], shape[3]
        self.has_pos = "position_ids" in names
        self.reset()

    def reset(self):
        self.past = {n: np.zeros((1, self.heads, 0, self.head_dim), np.float32) for n in self.past_names}
        self.pos = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[-1]
        feeds = {"input_ids": ids.reshape(1, n).astype(np.int64),
                 "attention_mask": np.ones((1, self.pos + n), np.int64), **self.past}
        if self.has_pos:
            feeds["position_ids"] = np.arange(self.pos, self.pos + n, dtype=np.int64)[None]
        outs = self.sess.run(self.out_names, feeds)
        self.past = {p: o for p, o in zip(self.past_names, outs[1:])}
        self.pos += n
        return outs[0][0, -1]


def time_decode(system, prompt: np.ndarray, position: int, warmup: int, steps: int, repeats: int) -> list[float]:
    """Milliseconds per generated token for one-token steps at positions position .. position+steps-1."""
    samples = []
    for _ in range(repeats):
        system.reset()
        logits = system.forward(prompt[: position - warmup])
        for _ in range(warmup):
            logits = system.forward(np.array([int(logits.argmax())]))
        for _ in range(steps):
            nxt = np.array([int(logits.argmax())])
            t0 = time.perf_counter()
            logits = system.forward(nxt)
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_prefill(system, prompt: np.ndarray, length: int, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        system.reset()
        t0 = time.perf_counter()
        system.forward(prompt[:length])
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


class Ours:
    def __init__(self, model: Model, capacity: int):
        self.inf = KVCacheInferencer(model, max_seq_len=capacity)
        self.reset, self.forward = self.inf.reset_cache, self.inf.forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/gpt2"))
    ap.add_argument("--optimum", type=Path, default=Path("models/gpt2-optimum"),
                    help="Optimum export of the same weights (python -m benchmarks.optimum_export)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", type=int, nargs="+", default=[32, 128, 512, 1000])
    ap.add_argument("--prompt-len", type=int, default=32, help="P for first-token latency")
    ap.add_argument("--steps", type=int, default=16, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--nocache-repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_cpu.json"))
    a = ap.parse_args()

    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    m = model.manifest
    capacity = min(m.max_positions, max(a.positions) + a.steps)
    if max(a.positions) + a.steps > m.max_positions:
        raise SystemExit(f"position {max(a.positions)} + {a.steps} steps exceeds the model's {m.max_positions}")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, m.vocab_size, size=capacity)
    systems = {"kvcache-infer": Ours(model, capacity)}
    skipped = {}
    if (a.optimum / "model.onnx").is_file():
        systems["ort-plain"] = PlainOrtLoop(a.optimum, a.threads)
    else:
        skipped["ort-plain"] = f"no Optimum export at {a.optimum} (python -m benchmarks.optimum_export)"

    results = {"environment": environment(a.threads),
               "model": {"path": str(a.model), "layers": m.num_layers, "heads": m.num_heads, "head_dim": m.head_dim,
                         "hidden": m.hidden_size, "vocab": m.vocab_size, "dtype": m.dtype, "layout": m.layout,
                         "cache_capacity": capacity, "batch": 1,
                         "cache_bytes": systems["kvcache-infer"].inf.memory_profile().total_cache_bytes},
               "provider": model.providers[0],
               "workload": {"positions": a.positions, "prompt_len": a.prompt_len, "steps": a.steps,
                            "warmup": a.warmup, "repeats": a.repeats, "token_ids": "random prompt, greedy steps",
                            "settle_s_between_systems": SETTLE_S},
               "first_token": {}, "decode": {name: {} for name in systems}, "no_cache": {}, "skipped": skipped}

    # Repeats are the outer loop and systems alternate inside each job, so that a noisy moment of
    # this (shared) machine is spread over every position and every system alike.
    jobs = [("prefill", a.prompt_len, r) for r in range(a.repeats)]
    jobs += [("decode", p, r) for r in range(a.repeats) for p in a.positions]
    jobs += [("recompute", p, r) for p in a.positions for r in range(a.nocache_repeats)]
    samples: dict = {}
    for kind, p, _ in tqdm(jobs, desc="latency", unit="job"):
        if kind == "recompute":  # the whole prefix of p + 1 tokens for one new token
            time.sleep(SETTLE_S)
            samples.setdefault(("no-cache", kind, p), []).extend(
                time_prefill(systems["kvcache-infer"], prompt, p + 1, 1))
            continue
        for name, system in systems.items():
            time.sleep(SETTLE_S)
            got = (time_prefill(system, prompt, p, 1) if kind == "prefill"
                   else time_decode(system, prompt, p, a.warmup, a.steps, 1))
            samples.setdefault((name, kind, p), []).extend(got)
    for (name, kind, p), ms in samples.items():
        if kind == "prefill":
            results["first_token"][name] = summarize(ms)
        elif kind == "decode":
            results["decode"][name][str(p)] = summarize(ms)
        else:
            results["no_cache"][str(p)] = summarize(ms)

    ours = results["decode"]["kvcache-infer"]
    checks = {}
    if "ort-plain" in results["decode"] and "512" in ours:
        r = ours["512"]["median_ms"] / results["decode"]["ort-plain"]["512"]["median_ms"]
        checks["pos512_vs_ort_plain"] = {"ratio": r, "bar": 0.80, "pass": r <= 0.80}
    if "1000" in ours and "32" in ours:
        r = ours["1000"]["median_ms"] / ours["32"]["median_ms"]
        checks["pos1000_vs_own_pos32"] = {"ratio": r, "bar": 1.20, "pass": r <= 1.20}
    results["checks"] = checks

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    a.out.with_suffix(".md").write_text(table + "\n")
    plot(results, a.out.with_suffix(".png"))
    print(table)
    print(f"\nwrote {a.out}, {a.out.with_suffix('.md')}, {a.out.with_suffix('.png')}")


def markdown(r: dict) -> str:
    e, mdl = r["environment"], r["model"]
    def cell(s):
        return f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"
    lines = [f"GPT-2 {mdl['layers']}L/{mdl['heads']}H/{mdl['hidden']}, {mdl['dtype']}, batch 1, {r['provider']}, "
             f"{e['intra_op_threads']} intra-op threads, onnxruntime {e['onnxruntime']}, {e['cpu']}", "",
             f"First token, {r['workload']['prompt_len']}-token prompt: " +
             ", ".join(f"{n} {cell(s)} ms" for n, s in r["first_token"].items()), "",
             "ms per generated token, median (min-max):", "",
             "| position | " + " | ".join(r["decode"]) + " | no-cache recompute |",
             "|---|" + "---|" * (len(r["decode"]) + 1)]
    for p in r["workload"]["positions"]:
        row = [cell(r["decode"][n][str(p)]) for n in r["decode"]] + [cell(r["no_cache"][str(p)])]
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    for name, c in r["checks"].items():
        lines.append(f"\ncheck {name}: ratio {c['ratio']:.3f} (bar <= {c['bar']}) {'PASS' if c['pass'] else 'FAIL'}")
    for name, why in r["skipped"].items():
        lines.append(f"\nnot run: {name}: {why}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pos = r["workload"]["positions"]
    for name, d in r["decode"].items():
        med = [d[str(p)]["median_ms"] for p in pos]
        lo = [d[str(p)]["median_ms"] - d[str(p)]["min_ms"] for p in pos]
        hi = [d[str(p)]["max_ms"] - d[str(p)]["median_ms"] for p in pos]
        ax.errorbar(pos, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xlabel("position (tokens already in the cache)")
    ax.set_ylabel("ms per generated token (median, min-max)")
    ax.set_title(f"GPT-2 {r['model']['layers']}L {r['model']['dtype']}, batch 1, "
                 f"{r['environment']['intra_op_threads']} threads")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
