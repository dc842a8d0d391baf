"""Tables and plots of the comparison suite's JSON (benchmarks/suite.py), and benchmarks/RESULTS.md."""
from __future__ import annotations

import json
from pathlib import Path

VARIANTS = ("kvcache-infer-int8", "kvcache-infer-int4")   # weight-only quantized exports of ours
ORDER = ("kvcache-infer", *VARIANTS, "hf-eager", "optimum", "optimum-iobinding", "genai", "ort-plain", "genai-on-our-graph",
         "no-cache")


def _cell(s: dict) -> str:
    return f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"


def _names(present: dict) -> list[str]:
    return [n for n in ORDER if n in present]


def markdown(r: dict) -> str:
    e, m, w = r["environment"], r["model"], r["workload"]
    d = r["decode"]
    bw = r["bandwidth"]
    lines = [(f"### {r['config']}: GPT-2 {m['layers']} layers, {m['heads']} heads, hidden {m['hidden']}, "
             f"vocab {m['vocab']}, {m['dtype']}"),
             "",
             (f"{e['cpu']}, {e['logical_cpus']} logical CPUs, {e['intra_op_threads']} threads (ORT intra-op, torch, "
             f"genai), onnxruntime {e['onnxruntime']}, {r['provider']}, {e['date_utc']}. "
             f"Command: `{r['command']}`."),
             "",
             (f"Read bandwidth of a matrix-vector product, measured in this run: {bw['start']['GB_per_s']:.1f} GB/s "
             f"at the start, {bw['end']['GB_per_s']:.1f} GB/s at the end (floor uses the mean). A step of ours "
             f"reads {m['weight_bytes_per_step'] / 1e6:.1f} MB of weights + {m['kv_bytes_per_token'] / 1e3:.1f} kB "
             "of K/V per cached token and row."),
             "",
             (f"**ms per generated token, batch 1** (median, min-max over {w['repeats']} x {w['steps']} steps; "
             "each step feeds one token and picks the next):"),
             ""]
    names = [n for n in _names(d) if n not in ("no-cache", *VARIANTS)]
    lines += ["| position | " + " | ".join(names) + " | ours: % of floor |", "|---" * (len(names) + 2) + "|"]
    for p in w["positions"]:
        row = [_cell(d[n]["1"][str(p)]) if str(p) in d[n].get("1", {}) else "-" for n in names]
        ours = d["kvcache-infer"]["1"][str(p)]
        lines.append(f"| {p} | " + " | ".join(row) + f" | {100 * ours['fraction_of_floor']:.0f}% "
                     f"({ours['floor_ms']:.2f} ms) |")
    bp = str(w["batch_position"])
    lines += ["", f"**Batch sweep at position {bp}**: ms per step (tokens/s = batch / step time):", "",
              "| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for b in w["batches"]:
        row = []
        for n in names:
            s = d[n].get(str(b), {}).get(bp)
            row.append(f"{s['median_ms']:.2f} ({s['tokens_per_s']:.0f} tok/s)" if s else "-")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    variants = [n for n in ("kvcache-infer", *VARIANTS) if n in d and n in r["model"].get("variants", {})]
    if len(variants) > 1:
        lines += ["", ("**Weight-only quantized exports of ours** (`python -m export ... --weights int8|int4`, "
                  "MatMulNBits, block 128, accuracy_level 4): ms per generated token at batch 1 (% of each one's own "
                  f"floor), and tokens/s at batch 16 (position {bp}):"), "",
                  "| export | file MB | MB read/step @32 | " + " | ".join(f"@{p}" for p in w["positions"])
                  + " | batch 16 tok/s |", "|---" * (len(w["positions"]) + 4) + "|"]
        for n in variants:
            v, row = r["model"]["variants"][n], d[n]["1"]
            b16 = d[n].get("16", {}).get(bp)
            cells = [f"{row[str(p)]['median_ms']:.2f} ({100 * row[str(p)]['fraction_of_floor']:.0f}%)"
                     if str(p) in row else "-" for p in w["positions"]]
            read32 = row[str(w["positions"][0])]["bytes_read"] / 1e6 if str(w["positions"][0]) in row else float("nan")
            label = n.removeprefix("kvcache-infer-") if n != "kvcache-infer" else "fp32"
            lines.append(f"| {label} | {v['file_bytes'] / 1e6:.1f} | {read32:.1f} | " + " | ".join(cells)
                         + (f" | {b16['tokens_per_s']:.0f} |" if b16 else " | - |"))
    ft = r["first_token"]
    lines += ["", (f"**First token** ({w['prompt_len']}-token prompt, prefill + first pick, batch 1, median of "
              f"{w['repeats']}) vs a cached token at position {w['positions'][0]}:"), "",
              "| system | first token ms | cached token ms | ratio |", "|---|---|---|---|"]
    for n in _names(ft):
        c = d.get(n, {}).get("1", {}).get(str(w["positions"][0]))
        lines.append(f"| {n} | {_cell(ft[n])} | {c['median_ms']:.2f} | {ft[n]['median_ms'] / c['median_ms']:.1f}x |"
                     if c else f"| {n} | {_cell(ft[n])} | - | - |")
    nc = d.get("no-cache", {}).get("1", {})
    if nc:
        lines += ["", ("**Cache vs no cache** (ms per generated token, batch 1; no cache = the whole prefix "
                  "recomputed):"), "", "| context | kvcache-infer | no cache | speedup |", "|---|---|---|---|"]
        for p in sorted(nc, key=int):
            o = d["kvcache-infer"]["1"].get(p)
            if o:
                lines.append(f"| {p} | {o['median_ms']:.2f} | {nc[p]['median_ms']:.2f} | "
                             f"{nc[p]['median_ms'] / o['median_ms']:.1f}x |")
    mem = r["memory"]
    if mem:
        bs = sorted({x["batch"] for x in mem})
        lines += ["", ("**Cache memory** (MiB allocated by kvcache-infer; equal to 2 x layers x heads x head_dim x "
                  f"max_seq_len x batch x bytes: {all(x['equal'] for x in mem)}):"), "",
                  "| max_seq_len | " + " | ".join(f"batch {b}" for b in bs) + " |", "|---" * (len(bs) + 1) + "|"]
        for L in sorted({x["max_seq_len"] for x in mem}):
            row = [next(x for x in mem if x["max_seq_len"] == L and x["batch"] == b) for b in bs]
            lines.append(f"| {L} | " + " | ".join(f"{x['allocated_bytes'] / 2**20:.1f}" for x in row) + " |")
    lines += ["", "**Bars**:", ""]
    for name, c in r["checks"].items():
        val = c.get("ratio", c.get("value"))
        extra = f" (best peer: {c['best_peer']})" if "best_peer" in c else ""
        op = ">=" if name.endswith(("floor", "tokens_per_s")) else "<="
        lines.append(f"- {name}: " + (f"{val:.3f} (bar {op} {c['bar']}){extra} " if val is not None else "")
                     + ("PASS" if c["pass"] else "FAIL"))
    for name, why in {**r["not_run"], **r["failed"]}.items():
        lines.append(f"- not measured: {name}: {why}")
    return "\n".join(lines)


def _save(fig, ax, stem: Path, kind: str) -> Path:
    import matplotlib.pyplot as plt
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}_{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(r: dict, stem: Path) -> list[Path]:
    """latency vs position, throughput vs batch, cache memory vs max_seq_len: three PNGs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    d, w, title = r["decode"], r["workload"], f"{r['config']} ({r['model']['layers']} layers, {r['model']['dtype']})"
    out = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for n in _names(d):
        pts = sorted((int(p), s) for p, s in d[n].get("1", {}).items() if int(p) in w["positions"] or n in
                     ("kvcache-infer", *VARIANTS))
        if not pts or n == "no-cache":
            continue
        xs = [p for p, _ in pts]
        ax.errorbar(xs, [s["median_ms"] for _, s in pts],
                    yerr=[[s["median_ms"] - s["min_ms"] for _, s in pts], [s["max_ms"] - s["median_ms"] for _, s in pts]],
                    marker="o", capsize=3, label=n, lw=2.5 if n == "kvcache-infer" else 1.2,
                    ls="--" if n in VARIANTS else "-")
    ours = d["kvcache-infer"]["1"]
    fl = sorted((int(p), s["floor_ms"]) for p, s in ours.items())
    ax.plot([p for p, _ in fl], [f for _, f in fl], "k:", lw=1.2, label="memory-bandwidth floor (fp32)")
    ax.set(xlabel="cache position (tokens before the step)", ylabel="ms per generated token (median, min-max)",
           title=f"{title}: batch 1")
    tops = [s["median_ms"] for n in d if n != "no-cache" for s in d[n].get("1", {}).values()]
    ax.set_ylim(0, 1.6 * max(tops))   # a few stalled steps would otherwise squash the medians; see the JSON
    out.append(_save(fig, ax, stem, "latency"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    bp = str(w["batch_position"])
    for n in _names(d):
        pts = sorted((int(b), v[bp]["tokens_per_s"]) for b, v in d[n].items() if bp in v and int(b) in w["batches"])
        if len(pts) > 1:
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=n,
                    lw=2.5 if n == "kvcache-infer" else 1.2, ls="--" if n in VARIANTS else "-")
    ax.set(xlabel="batch size", ylabel="generated tokens/s (median step)", title=f"{title}: position {bp}")
    ax.set_xticks(w["batches"])
    ax.set_ylim(bottom=0)
    out.append(_save(fig, ax, stem, "batch"))

    if r["memory"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for b in sorted({x["batch"] for x in r["memory"]}):
            rows = sorted((x["max_seq_len"], x["allocated_bytes"], x["formula_bytes"]) for x in r["memory"]
                          if x["batch"] == b)
            line, = ax.plot([L for L, _, _ in rows], [a / 2**20 for _, a, _ in rows], marker="o", label=f"batch {b}")
            ax.plot([L for L, _, _ in rows], [f / 2**20 for _, _, f in rows], "x", color=line.get_color(), ms=9)
        ax.set(xlabel="max_seq_len", ylabel="KV cache MiB (o allocated, x formula)", title=f"{title}: cache memory")
        out.append(_save(fig, ax, stem, "memory"))
    return out


def write_config_report(r: dict, json_path: Path) -> str:
    table = markdown(r)
    json_path.with_suffix(".md").write_text(table + "\n")
    plots(r, json_path.with_suffix(""))
    return table


def write_results_md(results_dir: Path, out: Path) -> None:
    """RESULTS.md from every suite_*_cpu.json in results_dir: tables, plots, the commands."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("suite_*_cpu.json"))]
    runs.sort(key=lambda r: r["config"] != "gpt2")
    rel = Path("results") if out.parent.resolve() == results_dir.resolve().parent else results_dir
    lines = ["# Benchmark results", "",
             "Written by `python -m benchmarks.suite` from the JSON next to the plots in `benchmarks/results/`;",
             "every number below was measured in the run named in its section, all systems in that one run.",
             "Systems: **kvcache-infer** (our export, `KVCacheInferencer.next_tokens`); **hf-eager** (transformers",
             "`GPT2LMHeadModel`, PyTorch eager, its DynamicCache); **optimum** / **optimum-iobinding**",
             "(`ORTModelForCausalLM` on Optimum's export, `use_io_binding` off/on); **genai** (onnxruntime-genai's",
             "`Generator` on Optimum's export with a `genai_config.json`: its model builder does not take GPT-2);",
             "**ort-plain** (a plain `InferenceSession.run` loop on Optimum's export, numpy past fed back);",
             "**genai-on-our-graph** (onnxruntime-genai running *our* export: same graph, other runtime; shown to",
             "separate graph from per-call cost, not counted as a peer in the bars); **no-cache** (our graph, whole",
             "prefix recomputed per token). Only generated tokens are counted; every step includes picking the",
             "next token. Every ORT-based system gets the same SessionOptions (threads, sequential execution, full",
             "graph optimization), PyTorch the same thread count. First token = what each tool does to start a",
             "sequence: genai creates a `Generator` (which allocates its cache), kvcache-infer reuses its",
             "preallocated inferencer (`reset_cache()`), the others start from an empty past.",
             "Floor = bytes a step of ours must read (weights + live K/V) / the matrix-vector read bandwidth",
             "measured in the same run.", ""]
    for r in runs:
        stem = f"suite_{r['config']}_cpu"
        lines += [markdown(r), ""]
        for kind in ("latency", "batch", "memory"):
            if (results_dir / f"{stem}_{kind}.png").is_file():
                lines.append(f"![{r['config']} {kind}]({rel / f'{stem}_{kind}.png'})")
        lines.append("")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    """Rebuilds the markdown, plots and RESULTS.md from the committed JSON (nothing is measured)."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--results-md", type=Path, default=Path("benchmarks/RESULTS.md"))
    a = ap.parse_args()
    for path in sorted(a.results_dir.glob("suite_*_cpu.json")):
        write_config_report(json.loads(path.read_text()), path)
    write_results_md(a.results_dir, a.results_md)


if __name__ == "__main__":
    main()
