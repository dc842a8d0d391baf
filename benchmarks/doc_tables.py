"""The generated blocks of the documentation: every table between `<!-- generated: NAME ... -->` and
`<!-- end generated: NAME -->` in README.md and docs/*.md (NAME is a key of BLOCKS below), and
benchmarks/RESULTS.md, rebuilt from the committed JSON in benchmarks/results/ and nothing else (no plot,
no measurement). Run as `python -m benchmarks.report --docs [--check]`; tests/test_docs.py checks them.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from .report import VARIANTS, cell, results_md

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: (\S+)[^\n]*-->\n)(.*?)(<!-- end generated: \2 -->)", re.S)
PEER_NAMES = ("hf-eager", "optimum", "optimum-iobinding", "genai", "ort-plain")


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _r(f: dict, fmt: str = ".1f") -> str:
    """median (min-max) of a {median, min, max, rounds} figure."""
    return f"{f['median']:{fmt}} ({f['min']:{fmt}}-{f['max']:{fmt}})" if len(f.get("rounds", [0, 0])) > 1 \
        else f"{f['median']:{fmt}}"


def _leaders(name: str) -> str:
    from .leaders import markdown as leaders_markdown
    return leaders_markdown(_load(name))


def _suite_decode() -> str:
    r = _load("suite_gpt2_cpu")
    d = r["decode"]
    lines = ["| position | kvcache-infer | " + " | ".join(PEER_NAMES) + " | ours / best peer |", "|---" * 8 + "|"]
    for p in r["workload"]["positions"]:
        ours = d["kvcache-infer"]["1"][str(p)]
        peers = [d[n]["1"][str(p)]["median_ms"] for n in PEER_NAMES]
        lines.append(f"| {p} | **{cell(ours)}** | " + " | ".join(f"{v:.2f}" for v in peers)
                     + f" | {ours['median_ms'] / min(peers):.2f} |")
    return "\n".join(lines) + "\n"


def _suite_first_token() -> str:
    r = _load("suite_gpt2_cpu")
    ft, ch = r["first_token"], r["prefill_chunked"].get("kvcache-infer", {})
    lines = ["| prompt | kvcache-infer | " + " | ".join(PEER_NAMES) + f" | ours / best peer | ours, chunks of "
             f"{r['workload']['chunk']} |", "|---" * 9 + "|"]
    for n in r["workload"]["prompt_lens"]:
        ours = ft["kvcache-infer"][str(n)]
        peers = [ft[s][str(n)]["median_ms"] for s in PEER_NAMES]
        lines.append(f"| {n} | **{cell(ours)}** | " + " | ".join(f"{v:.1f}" for v in peers)
                     + f" | {ours['median_ms'] / min(peers):.2f} | " + (cell(ch[str(n)]) if str(n) in ch else "-") + " |")
    return "\n".join(lines) + "\n"


def _suite_exports() -> str:
    r = _load("suite_gpt2_cpu")
    d, w, m = r["decode"], r["workload"], r["model"]["variants"]
    bp = str(w["batch_position"])
    lines = ["| export | file MB | MB read per step @32 | " + " | ".join(f"@{p}" for p in w["positions"])
             + f" | batch 16 tokens/s (position {bp}) |", "|---" * (len(w["positions"]) + 4) + "|"]
    for n in ("kvcache-infer", *VARIANTS):
        row = d[n]["1"]
        lines.append(f"| {'fp32' if n == 'kvcache-infer' else n.removeprefix('kvcache-infer-')} | "
                     f"{m[n]['file_bytes'] / 1e6:.1f} | {row[str(w['positions'][0])]['bytes_read'] / 1e6:.1f} | "
                     + " | ".join(cell(row[str(p)]) for p in w["positions"])
                     + f" | {d[n]['16'][bp]['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _serving() -> str:
    a, p = _load("serving_gpt2_all"), _load("serving_gpt2_poisson")
    lines = ["| system | all at once: tokens/s | TTFT p50 / p99 (s) | per token p50 / p99 (ms) | Poisson 1/s: tokens/s "
             "| TTFT p50 / p99 (s) | identical to sequential (all at once) |", "|---" * 7 + "|"]
    for name, s in a["summary"].items():
        if "failed" in s:
            lines.append(f"| {name} | does not run (below) | | | | | |")
            continue
        q = p["summary"].get(name)
        pois = (f"{_r(q['tokens_per_s'])} | {q['ttft_p50_s']['median']:.2f} / {q['ttft_p99_s']['median']:.2f}"
                if q else "- | -")
        lines.append(f"| {name} | {_r(s['tokens_per_s'])} | {s['ttft_p50_s']['median']:.2f} / "
                     f"{s['ttft_p99_s']['median']:.2f} | {s['per_token_p50_ms']['median']:.1f} / "
                     f"{s['per_token_p99_ms']['median']:.1f} | {pois} | {a['agree_with_sequential'][name]}/{a['requests']} |")
    return "\n".join(lines) + "\n"


def _serving_table(name: str, first: str = "system", agreement: bool = True) -> str:
    """A serving JSON's summary: tokens/s, TTFT, per-token gaps (and agreement with sequential decoding)."""
    a = _load(name)
    cols = [first, "tokens/s", "TTFT p50 / p99 (s)", "per token p50 / p99 (ms)"] + \
        (["identical to sequential"] if agreement else [])
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for sys_name, s in a["summary"].items():
        cells = [sys_name, _r(s["tokens_per_s"]), f"{s['ttft_p50_s']['median']:.2f} / {s['ttft_p99_s']['median']:.2f}",
                 f"{s['per_token_p50_ms']['median']:.1f} / {s['per_token_p99_ms']['median']:.1f}"]
        if agreement:
            cells.append(f"{a['agree_with_sequential'][sys_name]}/{a['requests']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _attention_kernels() -> str:
    r = _load("attention_kernels")
    lines = ["| KV cache | tokens held | ms, 12 layers | cache read (MB) | GB/s |", "|---" * 5 + "|"]
    for row in r["rows"]:
        lines.append(f"| {row['form']} | {row['length']} | {_r(row['ms'], '.2f')} | {row['cache_bytes_read'] / 1e6:.0f} | "
                     f"{row['gb_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _shared_prefix() -> str:
    r = _load("shared_prefix_gpt2")
    lines = ["| prefix cache | total s | TTFT p50 / p99 (s) | model runs | prompt tokens reused |", "|---" * 5 + "|"]
    for name, s in r["summary"].items():
        lines.append(f"| {name.removeprefix('prefix-cache-')} | {_r(s['total_s'], '.2f')} | "
                     f"{s['ttft_p50_s']['median']:.2f} / {s['ttft_p99_s']['median']:.2f} | {s['runs']} | "
                     f"{s['prefix_tokens_reused']} |")
    return "\n".join(lines) + f"\n\non / off: {r['on_over_off_total']:.2f}x the time; same tokens: " \
                              f"{r['same_tokens_on_and_off']}.\n"


TREE_METHODS = {
    "no-cache": "no cache (paths recomputed, siblings batched)",
    "reprefill": "`KVCacheInferencer` reset + re-prefill of each leaf's path",
    "restore": "`KVCacheInferencer` snapshot/restore of the parent",
    "rewind": "`KVCacheInferencer` truncate to the shared prefix, `rewind(1)` per child",
    "engine-fork": "Engine: adopt the parent's retained rows, `fork` per child, one batched step",
    "engine-tree": "Engine: `TreeSequence` (tree attention, all new nodes in one run, nothing copied)",
}


def _tree_search(name: str) -> str:
    r = _load(name)
    lines = ["| method | evaluations/s | evaluations per run | x restore | x re-prefill |", "|---" * 5 + "|"]
    for m in r["search"]["methods"]:
        s, sp = r["summary"][m], r["speedup"].get(m, {})
        lines.append(f"| {TREE_METHODS.get(m, m)} | {_r(s['evals_per_s'])} | {s['evaluations']} | "
                     + (f"{sp['restore']:.1f} | {sp['reprefill']:.0f} |" if sp else "- | - |"))
    return "\n".join(lines) + "\n"


STEP_CASES = {
    "decode-1": "1 sequence decodes one token", "decode-2": "2 sequences decode one token each",
    "decode-4": "4 sequences decode one token each", "decode-8": "8 sequences decode one token each",
    "decode-16": "16 sequences decode one token each",
    "idle-slots": "1 sequence decodes, 15 others hold their slots and sit the step out",
    "mixed": "15 decode + one 64-token prompt chunk, one run",
    "split": "the same as two runs (15 decodes, then the chunk)", "fork": "`fork()` of a 256-token sequence",
}


def _engine_step() -> str:
    r = _load("engine_step_gpt2")
    lines = [f"| run (sequences at position {r['position']}) | ms |", "|---|---|"]
    for k, f in r["summary_ms"].items():
        lines.append(f"| {STEP_CASES.get(k, k)} | {_r(f)} |")
    return "\n".join(lines) + "\n"


def _http_load() -> str:
    r = _load("http_load_gpt2-int4")
    s, same = r["summary"], r["identical_outputs"]
    lines = ["| clients | HTTP tokens/s | in-process tokens/s | HTTP / in-process | HTTP TTFT p50 (s) | HTTP per token "
             "p50 / p99 (ms) | errors | identical tokens |", "|---" * 8 + "|"]
    for c in r["clients"]:
        h, i = s[f"http@{c}"], s[f"in-process@{c}"]
        lines.append(f"| {c} | {h['tokens_per_s']['median']:.1f} | {i['tokens_per_s']['median']:.1f} | "
                     f"{h['tokens_per_s']['median'] / i['tokens_per_s']['median']:.2f} | {h['ttft_p50_s']:.2f} | "
                     f"{h['per_token_p50_ms']:.1f} / {h['per_token_p99_ms']:.1f} | {h['errors']} | "
                     f"{same[f'http@{c}']['identical']} of {same[f'http@{c}']['compared']} |")
    return "\n".join(lines) + "\n"


def _http_ray() -> str:
    r = _load("http_load_gpt2-int4")
    s, same = r["summary"], r["identical_outputs"]
    lines = ["| clients | single process tokens/s | Ray, 1 replica | Ray, 2 replicas | Ray 2 replicas: TTFT p50 (s), "
             "per token p50 / p99 (ms) | errors (Ray 2) | identical tokens (Ray 2) |", "|---" * 7 + "|"]
    for c in r["clients"]:
        h, r1, r2 = s[f"http@{c}"], s[f"ray-1@{c}"], s[f"ray-2@{c}"]
        lines.append(f"| {c} | {h['tokens_per_s']['median']:.1f} | {r1['tokens_per_s']['median']:.1f} | "
                     f"{r2['tokens_per_s']['median']:.1f} | {r2['ttft_p50_s']:.2f}, {r2['per_token_p50_ms']:.1f} / "
                     f"{r2['per_token_p99_ms']:.1f} | {r2['errors']} | "
                     f"{same[f'ray-2@{c}']['identical']} of {same[f'ray-2@{c}']['compared']} |")
    return "\n".join(lines) + "\n"


SPEC_MODES = {"plain": "plain decoding (KVCacheInferencer.generate)", "lookup": "prompt lookup (inferencer)",
              "engine": "prompt lookup (Engine, one request)", "wrong": "every guess wrong (acceptance 0)",
              "ov-plain": "OpenVINO GenAI LLMPipeline, plain (its CPU default: bf16 compute)",
              "ov-lookup": "OpenVINO GenAI, its prompt lookup (bf16 compute)",
              "ov-f32-plain": "OpenVINO GenAI LLMPipeline, plain, strict f32",
              "ov-f32-lookup": "OpenVINO GenAI, its prompt lookup, strict f32",
              "llamacpp-plain": "llama.cpp llama-lookup, no drafts", "llamacpp-lookup": "llama.cpp llama-lookup, 5 drafts",
              "serving plain": "Engine, 16 slots, plain", "serving engine": "Engine, 16 slots, prompt lookup"}


def _paired(raw: dict, case: str, plain: str) -> str:
    """Each round's tokens/s over plain decoding's in the same round (rounds rotate the order, so a
    slow stretch of the host hits both): median (min-max)."""
    r = [x["tokens_per_s"] / p["tokens_per_s"] for x, p in zip(raw.get(case, []), raw.get(plain, []))
         if "failed" not in x and "failed" not in p]
    return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})" if r else "-"


def _speculative(name: str = "speculative_cpu") -> str:
    r = _load(name)
    lines = ["| model / workload | decoding | tokens/s | x plain | x plain, same round | guesses kept | "
             "tokens per verifying step | greedy tokens equal plain | outputs beginning with the expected text |",
             "|---" * 9 + "|"]
    for row in r["rows"]:
        sp = row["speculation"]
        verified = sp["speculative_steps"] > 0
        mode = SPEC_MODES.get(f"{row['workload']} {row['mode']}", SPEC_MODES.get(row["mode"], row["mode"]))
        plain = f"{row['model']} {row['workload']} plain"
        lines.append(f"| {row['model']} / {row['workload']} | {mode} | "
                     f"{_r(row['tokens_per_s'])} | {row.get('speedup', float('nan')):.2f} | "
                     + (f"{_paired(r['raw'], row['case'], plain)} | " if row["mode"] != "plain" else "1.00 | ")
                     + (f"{100 * sp['acceptance_rate']:.0f}% | {sp['tokens_per_speculative_step']:.2f} | "
                        if verified else "- | - | ")
                     + (f"{row['requests_equal_plain']} of {row['prompts']} requests | " if "requests_equal_plain" in row
                        else f"{({True: 'yes', False: 'no', None: '- (text, not compared)'})[row['same_outputs_as_plain']]} | ")
                     + (f"{row['copied']} of {row['prompts']} |" if row["workload"].startswith("code-edit") else "- |"))
    return "\n".join(lines) + "\n"


# NAME: what goes between <!-- generated: NAME ... --> and <!-- end generated: NAME -->
BLOCKS = {
    "leaders": lambda: _leaders("leaders_gpt2_cpu"),
    "leaders-rerun": lambda: _leaders("leaders_gpt2_cpu_rerun"),
    "leaders-llama": lambda: _leaders("leaders_llama-small_cpu"),
    "leaders-first-token-chunked": lambda: _leaders("leaders_gpt2_cpu_first_token_chunked"),
    "leaders-serving-again": lambda: _leaders("leaders_gpt2_cpu_serving_again"),
    "leaders-serving-budget256": lambda: _leaders("leaders_gpt2_cpu_serving_budget256"),
    "suite-decode": _suite_decode,
    "suite-first-token": _suite_first_token,
    "suite-exports": _suite_exports,
    "serving": _serving,
    "serving-int4": lambda: _serving_table("serving_gpt2-int4_all"),
    "serving-budget": lambda: _serving_table("serving_budget_gpt2-w8a8-kv8_all",
                                             "system (slots, prompt tokens per step)", agreement=False),
    "attention-kernels": _attention_kernels,
    "shared-prefix": _shared_prefix,
    "tree-search": lambda: _tree_search("tree_search_gpt2"),
    "tree-search-pybytes": lambda: _tree_search("tree_search_pybytes"),
    "engine-step": _engine_step,
    "http-load": _http_load,
    "http-ray": _http_ray,
    "speculative": _speculative,
    "speculative-peers": lambda: _speculative("speculative_peers_cpu"),
}


def render_blocks(text: str, where: str = "") -> str:
    """text with every generated block rebuilt; an unknown NAME raises."""
    def one(m: re.Match) -> str:
        if m[2] not in BLOCKS:
            raise SystemExit(f"{where}: unknown generated block {m[2]!r} (known: {', '.join(BLOCKS)})")
        return m[1] + BLOCKS[m[2]]() + m[4]
    return BLOCK.sub(one, text)


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def render_docs(check: bool = False) -> list[Path]:
    """Rebuilds benchmarks/RESULTS.md and every generated block of README.md and docs/*.md from the committed
    JSON; returns the files that changed (with check, the files that would change; nothing is written)."""
    targets = {REPO / "benchmarks" / "RESULTS.md": lambda old: results_md(RESULTS, REPO / "benchmarks" / "RESULTS.md")}
    for path in doc_files():
        targets[path] = lambda old, path=path: render_blocks(old, str(path.relative_to(REPO)))
    changed = []
    for path, render in targets.items():
        old = path.read_text() if path.is_file() else ""
        new = render(old)
        if new != old:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed
