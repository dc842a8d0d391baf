"""Tables and plots of the comparison suite's JSON (benchmarks/suite.py), RESULTS.md, and every generated block
of the documentation.

    python -m benchmarks.report [--results-dir benchmarks/out]     # rebuild from JSON, nothing measured
    python -m benchmarks.report --docs [--check]                     # README.md, docs/*.md, benchmarks/RESULTS.md

--docs rewrites, from the committed JSON in benchmarks/results/ and nothing else (no plot, no measurement),
benchmarks/RESULTS.md and every block between `<!-- generated: NAME ... -->` and `<!-- end generated: NAME -->`
in README.md and docs/*.md (benchmarks/doc_tables.py). --check writes nothing and exits 1 naming the
files that are out of date (tests/test_docs.py runs it).
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import pyplot

VARIANTS = ("kvcache-infer-int8", "kvcache-infer-int4")   # weight-only quantized exports of ours
ORDER = ("kvcache-infer", *VARIANTS, "hf-eager", "optimum", "optimum-iobinding", "genai", "ort-plain", "no-cache")


def cell(s: dict) -> str:
    return f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"


def _names(present: dict, skip=()) -> list[str]:
    return [n for n in ORDER if n in present and n not in skip]


def markdown(r: dict) -> str:
    e, m, w, d, ft = r["environment"], r["model"], r["workload"], r["decode"], r["first_token"]
    bws = [p["median"] for rounds in r["bandwidth"].values() for p in rounds]
    lines = [(f"### {r['config']}: GPT-2 {m['layers']} layers, {m['heads']} heads, hidden {m['hidden']}, "
              f"vocab {m['vocab']}, {m['dtype']}"), "",
             (f"{e['cpu']}, {e['logical_cpus']} logical CPUs, {e['intra_op_threads']} threads (ORT intra-op, torch, "
              f"genai), onnxruntime {e['onnxruntime']}, {r['provider']}, {e['date_utc']}. Each system alone in its own "
              f"process, {r['rounds']} rounds in a rotating order; figures are the median over rounds of each round's "
              f"median, with the range over rounds. Command: `{r['command']}`."), "",
             (f"Read bandwidth of a matrix-vector product, measured in every process: {min(bws):.1f}-{max(bws):.1f} "
              "GB/s; each process's floor uses its own."), ""]
    names = _names(d, skip=("no-cache", *VARIANTS))
    lines += ["**ms per generated token, batch 1** (each step feeds one token and picks the next):", "",
              "| position | " + " | ".join(names) + " | ours: % of floor |", "|---" * (len(names) + 2) + "|"]
    for p in w["positions"]:
        ours = d["kvcache-infer"]["1"].get(str(p))
        if not ours:
            continue
        row = [cell(d[n]["1"][str(p)]) if str(p) in d[n].get("1", {}) else "-" for n in names]
        lines.append(f"| {p} | " + " | ".join(row) + f" | {100 * ours['fraction_of_floor']:.0f}% "
                     f"({ours['floor_ms']:.2f} ms) |")
    bp = str(w["batch_position"])
    lines += ["", f"**Batch** at position {bp}: generated tokens/s (ms per step):", "",
              "| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for b in w["batches"]:
        row = []
        for n in names:
            s = d[n].get(str(b), {}).get(bp)
            row.append(f"{s['tokens_per_s']:.0f} ({s['median_ms']:.1f})" if s else "-")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    variants = [n for n in ("kvcache-infer", *VARIANTS) if n in d and n in m["variants"]]
    if len(variants) > 1:
        lines += ["", ("**Weight-only quantized exports of ours** (`python -m export ... --weights int8|int4`, "
                  "MatMulNBits, block 128, accuracy_level 4): ms per generated token at batch 1 (% of each one's own "
                  f"floor), and tokens/s at batch 16 (position {bp}):"), "",
                  "| export | file MB | MB read/step @32 | " + " | ".join(f"@{p}" for p in w["positions"])
                  + " | batch 16 tok/s |", "|---" * (len(w["positions"]) + 4) + "|"]
        for n in variants:
            v, row = m["variants"][n], d[n]["1"]
            b16 = d[n].get("16", {}).get(bp)
            cells = [f"{row[str(p)]['median_ms']:.2f} ({100 * row[str(p)]['fraction_of_floor']:.0f}%)"
                     if str(p) in row else "-" for p in w["positions"]]
            first = str(w["positions"][0])
            read = row[first]["bytes_read"] / 1e6 if first in row else float("nan")
            label = n.removeprefix("kvcache-infer-") if n != "kvcache-infer" else "fp32"
            lines.append(f"| {label} | {v['file_bytes'] / 1e6:.1f} | {read:.1f} | " + " | ".join(cells)
                         + (f" | {b16['tokens_per_s']:.0f} |" if b16 else " | - |"))
    fnames = _names(ft, skip=VARIANTS)
    if fnames:
        lens = sorted({int(n) for s in ft.values() for n in s})
        ch = r["prefill_chunked"].get("kvcache-infer", {})
        lines += ["", ("**First token** (prefill + first pick, batch 1), ms by prompt length; ours runs the last "
                  "layer's MLP and the lm_head for the last position only"
                  + (f"; last column: ours fed in chunks of {w['chunk']}" if ch else "") + ":"), "",
                  "| prompt | " + " | ".join(fnames) + (" | ours, chunked |" if ch else " |"),
                  "|---" * (len(fnames) + 1 + bool(ch)) + "|"]
        for n in lens:
            row = [cell(ft[s][str(n)]) if str(n) in ft[s] else "-" for s in fnames]
            extra = (f" | {cell(ch[str(n)])} |" if str(n) in ch else " | - |") if ch else " |"
            lines.append(f"| {n} | " + " | ".join(row) + extra)
    nc = d.get("no-cache", {}).get("1", {})
    if nc:
        lines += ["", ("**Cache vs no cache** (ms per generated token, batch 1; no cache = the whole prefix "
                  "recomputed):"), "", "| context | kvcache-infer | no cache | speedup |", "|---|---|---|---|"]
        for p in sorted(nc, key=int):
            o = d["kvcache-infer"]["1"].get(p)
            lines.append(f"| {p} | {o['median_ms']:.2f} | {nc[p]['median_ms']:.2f} | "
                         f"{nc[p]['median_ms'] / o['median_ms']:.1f}x |" if o else
                         f"| {p} | - | {nc[p]['median_ms']:.2f} | - |")
    mem = r["memory"]
    if mem:
        bs = sorted({x["batch"] for x in mem})
        lines += ["", ("**Cache memory** (MiB allocated by kvcache-infer; equal to 2 x layers x heads x head_dim x "
                  f"max_seq_len x batch x bytes: {all(x['equal'] for x in mem)}):"), "",
                  "| max_seq_len | " + " | ".join(f"batch {b}" for b in bs) + " |", "|---" * (len(bs) + 1) + "|"]
        for L in sorted({x["max_seq_len"] for x in mem}):
            row = [next(x for x in mem if x["max_seq_len"] == L and x["batch"] == b) for b in bs]
            lines.append(f"| {L} | " + " | ".join(f"{x['allocated_bytes'] / 2**20:.1f}" for x in row) + " |")
    for line in r["noisy"]:
        lines.append(f"\nNote: {line}.")
    for name, why in r["failed"].items():
        lines.append(f"\nNot measured: {name}: {why}")
    return "\n".join(lines)


def _finish(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line(ax, pts, label, **kw):
    xs = [x for x, _ in pts]
    ax.errorbar(xs, [s["median_ms"] for _, s in pts], capsize=3, marker="o", label=label,
                yerr=[[s["median_ms"] - s["min_ms"] for _, s in pts], [s["max_ms"] - s["median_ms"] for _, s in pts]],
                **kw)


def plots(r: dict, stem: Path) -> list[Path]:
    """latency vs position (peers | our exports), tokens/s vs batch, first token vs prompt, cache memory."""
    plt = pyplot()
    if plt is None:
        return []
    d, ft, w = r["decode"], r["first_token"], r["workload"]
    title = f"{r['config']} ({r['model']['layers']} layers, {r['model']['dtype']}), {r['rounds']} rounds"
    out = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for n in _names(d, skip=("no-cache", *VARIANTS)):
        pts = sorted((int(p), s) for p, s in d[n].get("1", {}).items())
        _line(a1, pts, n, lw=2.5 if n == "kvcache-infer" else 1.2)
    a1.set(xlabel="cache position (tokens before the step)", ylabel="ms per generated token (median; range over rounds)",
           title="fp32: kvcache-infer and the peers")
    for n in ("kvcache-infer", *VARIANTS):
        if n in d:
            pts = sorted((int(p), s) for p, s in d[n]["1"].items())
            line, = a2.plot([p for p, _ in pts], [s["median_ms"] for _, s in pts], marker="o",
                            label=n.replace("kvcache-infer", "ours") if n != "kvcache-infer" else "ours fp32")
            a2.plot([p for p, _ in pts], [s["floor_ms"] for _, s in pts], ls=":", color=line.get_color(),
                    label="its floor")
    a2.set(xlabel="cache position", title="our exports and their memory-bandwidth floors")
    tops = [s["max_ms"] for n in d if n != "no-cache" for s in d[n].get("1", {}).values()]
    a1.set_ylim(0, 1.1 * max(tops))
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    out.append(_finish(fig, stem.with_name(stem.name + "_latency.png")))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bp = str(w["batch_position"])
    for n in _names(d, skip=("no-cache",)):
        pts = sorted((int(b), v[bp]["tokens_per_s"]) for b, v in d[n].items() if bp in v)
        if len(pts) > 1:
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=n,
                    lw=2.5 if n == "kvcache-infer" else 1.2, ls="--" if n in VARIANTS else "-")
    ax.set(xlabel="batch size", ylabel="generated tokens/s (median over rounds)", title=f"{title}: position {bp}")
    ax.set_xticks(w["batches"])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    out.append(_finish(fig, stem.with_name(stem.name + "_batch.png")))

    if ft:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for n in _names(ft, skip=VARIANTS):
            _line(ax, sorted((int(k), s) for k, s in ft[n].items()), n, lw=2.5 if n == "kvcache-infer" else 1.2)
        ax.set(xlabel="prompt tokens", ylabel="first token ms (prefill + pick; range over rounds)", title=title)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        out.append(_finish(fig, stem.with_name(stem.name + "_first_token.png")))

    if r["memory"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for b in sorted({x["batch"] for x in r["memory"]}):
            rows = sorted((x["max_seq_len"], x["allocated_bytes"], x["formula_bytes"]) for x in r["memory"]
                          if x["batch"] == b)
            line, = ax.plot([L for L, _, _ in rows], [a / 2**20 for _, a, _ in rows], marker="o", label=f"batch {b}")
            ax.plot([L for L, _, _ in rows], [f / 2**20 for _, _, f in rows], "x", color=line.get_color(), ms=9)
        ax.set(xlabel="max_seq_len", ylabel="KV cache MiB (o allocated, x formula)", title=f"{title}: cache memory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append(_finish(fig, stem.with_name(stem.name + "_memory.png")))
    return out


def write_config_report(r: dict, json_path: Path) -> str:
    table = markdown(r)
    json_path.with_suffix(".md").write_text(table + "\n")
    plots(r, json_path.with_suffix(""))
    return table


INTRO = """# Benchmark results

Written by `python -m benchmarks.suite --publish` from the JSON next to the plots in
`benchmarks/results/`. Systems: **kvcache-infer** (our export, `KVCacheInferencer.next_tokens`);
**hf-eager** (transformers `GPT2LMHeadModel`, PyTorch eager, its DynamicCache); **optimum** /
**optimum-iobinding** (`ORTModelForCausalLM` on Optimum's export, `use_io_binding` off/on); **genai**
(onnxruntime-genai's `Generator` on Optimum's export with a `genai_config.json`: its model builder does
not take GPT-2); **ort-plain** (a plain `InferenceSession.run` loop on Optimum's export, numpy past fed
back); **no-cache** (our graph, whole prefix recomputed per token). Each system runs alone in a fresh
process (ONNX Runtime's pool threads spin after a run and would slow whatever runs next on 2 cores),
in a rotating order, over several rounds. Only generated tokens are counted; every step includes
picking the next token. Every ORT-based system gets the same SessionOptions (threads, sequential
execution, full graph optimization), PyTorch the same thread count. First token = what each tool does
to start a sequence: genai creates a `Generator` (which allocates its cache), kvcache-infer reuses its
preallocated inferencer (`reset_cache()`), the others start from an empty past. Floor = bytes a step
of ours must read (weights + live K/V) / the matrix-vector read bandwidth measured in the same process.
The Engine's benchmarks (serving, shared prefix, tree search, step costs) and the CPU leaders
comparison are in [docs/performance.md](../docs/performance.md).
"""


def results_md(results_dir: Path, out: Path) -> str:
    """RESULTS.md (to be written at out) from every suite_*_cpu.json in results_dir: tables, plots, the commands."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("suite_*_cpu.json"))]
    runs.sort(key=lambda r: r["config"] != "gpt2")
    rel = Path("results") if out.parent.resolve() == results_dir.resolve().parent else Path(".")
    lines = [INTRO]
    for r in runs:
        stem = f"suite_{r['config']}_cpu"
        lines += [markdown(r), ""]
        for kind in ("latency", "batch", "first_token", "memory"):
            if (results_dir / f"{stem}_{kind}.png").is_file():
                lines.append(f"![{r['config']} {kind}]({rel / f'{stem}_{kind}.png'})")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_results_md(results_dir: Path, out: Path) -> None:
    out.write_text(results_md(results_dir, out))


def main() -> None:
    """Rebuilds the markdown, plots and RESULTS.md from the JSON (nothing is measured)."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--docs", action="store_true",
                    help="measure and plot nothing: rewrite benchmarks/RESULTS.md and every generated block of README.md "
                         "and docs/*.md from the committed JSON in benchmarks/results/")
    ap.add_argument("--check", action="store_true",
                    help="with --docs: write nothing; exit 1 naming the files that are out of date")
    a = ap.parse_args()
    if a.docs:
        from .doc_tables import REPO, render_docs       # doc_tables builds on this module's RESULTS.md
        changed = render_docs(check=a.check)
        for path in changed:
            print(f"{'out of date' if a.check else 'updated'}: {path.relative_to(REPO)}")
        if a.check and changed:
            raise SystemExit(f"{len(changed)} file(s) out of date: run python -m benchmarks.report --docs")
        return
    for path in sorted(a.results_dir.glob("suite_*_cpu.json")):
        write_config_report(json.loads(path.read_text()), path)
    md = a.results_dir.parent / "RESULTS.md" if a.results_dir.name == "results" else a.results_dir / "RESULTS.md"
    write_results_md(a.results_dir, md)


if __name__ == "__main__":
    main()
