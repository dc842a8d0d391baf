"""Speculative decoding against plain one-sequence decoding: generated tokens per second, greedy.

    python -m benchmarks.speculative [--cases pybytes:code-edit gpt2:random:plain,lookup ...] [--rounds 3] [--publish]

Workloads (each prompt decoded alone, greedy, every mode in its own process, rounds rotated):
    code-edit   the default model (pybytes, 256 positions): small functions of the standard library's
                held-out files (the ones its training left out), each prompt holding most of its answer:
                the function, then a comment asking for it again / with a parameter renamed / with a
                literal changed, then its first line as it would be written; max_new_tokens: the rest of
                the expected text. Reports how many greedy outputs begin with the expected text.
    code-edit-long  the same from functions of up to 400 characters (prompts up to 1,024 characters): a
                longer run for models of 1,024 positions (pycode), for the peers' comparison
    random      random prompt ids (64) and 128 new tokens: GPT-2 small with random weights.
    serving     benchmarks.serving's 48 requests submitted at once to an Engine of 16 slots (continuous
                batching): modes plain and engine only; counts the requests whose tokens equal plain's.
Modes:
    plain       KVCacheInferencer.generate (the fastest plain path: the graph's greedy pick)
    lookup      KVCacheInferencer.generate(speculative="lookup")
    engine      Engine.generate([prompt], speculative="lookup"), one request
    wrong       a proposer whose every guess is wrong: what AdaptiveLength costs at acceptance 0
    ov-plain, ov-lookup   OpenVINO GenAI's LLMPipeline on the same checkpoint (models/peers/MODEL-ov-fp32,
                `optimum-cli export openvino`), plain and with its prompt lookup (num_assistant_tokens 5,
                max_ngram_size 3), the same token ids in, EOS ignored; run in .venv-peers. The CPU plugin's
                defaults for an fp32 model: bf16 compute, u8 KV cache
    ov-f32-plain, ov-f32-lookup   the same with INFERENCE_PRECISION_HINT f32 and KV_CACHE_PRECISION f32:
                the arithmetic of ours
    llamacpp-plain, llamacpp-lookup   llama.cpp's prompt-lookup example (`llama-lookup`, built by
                scripts/setup_peers.sh) on the same checkpoint converted to GGUF f32 (models/peers/MODEL-f32.gguf,
                convert_hf_to_gguf.py), 2 threads, greedy, EOS ignored, --spec-draft-n-max 5 (0: plain);
                one process per prompt, timed by its own encode + decode clocks (model loading excluded);
                the prompt goes in as text (its tokenizer, converted from ours)
Counts generated tokens only; one untimed warm-up (the first prompt reversed; ours without guesses) first; --passes N decodes the prompts N times in each
process of ours (every pass timed, each giving the same outputs; the Engine's prefix cache is off, so
no pass reuses a prompt), for workloads too short to time once; the peers run one pass. JSON (--name, default speculative_cpu) under
benchmarks/out/ (benchmarks/results/ with --publish).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sysconfig
import time
from pathlib import Path

import numpy as np

from .common import environment
from .isolate import Case, emit, out_dir, run_rounds, spread, succeeded

MODELS = {"pybytes": "pybytes", "pycode": "models/pycode", "gpt2": "models/gpt2", "gpt2-int4": "models/gpt2-int4"}
MODES = ("plain", "lookup", "engine", "wrong")
OV_MODES = ("ov-plain", "ov-lookup", "ov-f32-plain", "ov-f32-lookup")
LLAMA_MODES = ("llamacpp-plain", "llamacpp-lookup")
REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"


def code_edit_prompts(limit: int = 24, positions: int = 256, longest: int = 130) -> list[tuple[str, str]]:
    """(prompt, expected continuation) pairs from held-out standard-library functions (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)[::20]   # the held-out files
    funcs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"^def [a-z_]+\((\w+)[^)]*\):\n(?:    .*\n){1,4}", text, re.M):
            body = m.group(0)
            if 70 <= len(body) <= longest and body.isascii() and len(m.group(1)) > 1:
                funcs.append((body, m.group(1)))
    out = []
    for i, (body, arg) in enumerate(funcs[: limit]):
        first, rest = body.split("\n", 1)
        kind = i % 3
        if kind == 0:
            prompt, want = f"{body}\n# the same function again:\n{first}\n", rest
        elif kind == 1:
            new = arg + "_"
            renamed = re.sub(rf"\b{arg}\b", new, body)
            first_r, rest_r = renamed.split("\n", 1)
            prompt, want = f"{body}\n# with {arg} renamed to {new}:\n{first_r}\n", rest_r
        else:
            changed = body.replace("def ", "def new_", 1)
            first_c, rest_c = changed.split("\n", 1)
            prompt, want = f"{body}\n# a copy named new_...:\n{first_c}\n", rest_c
        if len(prompt) + len(want) + 2 <= positions:
            out.append((prompt, want))
    return out


def wrong_proposer(vocab: int):
    """Guesses each of the last k tokens plus one: almost never right (acceptance ~0)."""
    from kvcache_infer.runtime.speculative import Drafter, Proposer

    class Wrong(Proposer, Drafter):
        name = "wrong"

        def drafter(self):
            return self

        def propose(self, tokens, k):
            return (tokens[-k:] + 1) % vocab if k else tokens[:0]
    return Wrong()


CODE_EDIT = {"code-edit": dict(limit=24), "code-edit-long": dict(limit=96, positions=1024, longest=400)}


def prompts_and_answers(tokenize, workload: str) -> tuple[list[np.ndarray], list[list[int]]]:
    pairs = code_edit_prompts(**CODE_EDIT[workload])
    return [np.array(tokenize(p), np.int64) for p, _ in pairs], [tokenize(w) for _, w in pairs]


def timed(run, prompts, wants, passes: int = 1, warm=None) -> tuple[int, float, int, list[list[int]], bool]:
    """run(prompt, n) over every prompt, `passes` times, after an untimed warm-up (warm(prompt, n), default
    run; ours warm up without guesses, so the running acceptance starts from its prior): (generated tokens,
    seconds, outputs beginning with the expected text, the first pass's outputs, whether every pass gave
    those outputs: not so where the kernels are not batch invariant and the guesses differ between passes)."""
    (warm or run)(prompts[0][::-1].copy(), 8)   # warm-up on ids no timed prompt starts with (OpenVINO's
    tokens, seconds, first, same = 0, 0.0, None, True     # LLMPipeline reuses a prompt it has seen)
    for _ in range(passes):
        outputs = []
        for p, w in zip(prompts, wants):
            t0 = time.perf_counter()
            out = run(p, len(w))
            seconds += time.perf_counter() - t0
            tokens += len(out)
            outputs.append(out)
        same = same and (first is None or outputs == first)
        first = first or outputs
    copied = sum(out[:len(w)] == list(w) for out, w in zip(first, wants))
    return tokens, seconds, copied, first, same


def ov_worker(a) -> None:
    """OpenVINO GenAI (in .venv-peers): LLMPipeline, plain or with prompt lookup, on the code-edit workload."""
    import openvino as ov
    import openvino_genai as g
    from tokenizers import Tokenizer
    folder = REPO / "kvcache_infer" / "models" / a.model if a.model == "pybytes" else REPO / MODELS[a.model]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts, wants = prompts_and_answers(lambda t: tok.encode(t).ids, a.workload)
    lookup = a.mode.endswith("lookup")
    strict = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"} if "-f32-" in a.mode else {}
    pipe = g.LLMPipeline(str(REPO / "models" / "peers" / f"{a.model}-ov-fp32"), "CPU",
                         **({"prompt_lookup": True} if lookup else {}), INFERENCE_NUM_THREADS=a.threads, **strict)

    def run(p, n):
        cfg = g.GenerationConfig(max_new_tokens=n, ignore_eos=True, do_sample=False)
        if lookup:
            cfg.num_assistant_tokens, cfg.max_ngram_size = 5, 3
        ids = ov.Tensor(p[None].astype(np.int64))
        mask = ov.Tensor(np.ones_like(p[None], dtype=np.int64))
        return [int(t) for t in pipe.generate(g.TokenizedInputs(ids, mask), cfg).tokens[0]]
    tokens, seconds, copied, outputs, _ = timed(run, prompts, wants)   # one pass: its pipeline may keep a prompt's prefix between calls
    none = {"speculative_steps": 0, "draft_tokens": 0, "accepted_tokens": 0, "acceptance_rate": 0.0,
            "tokens_per_speculative_step": 0.0}
    emit({"model": a.model, "workload": a.workload, "mode": a.mode, "tokens": tokens, "seconds": seconds,
          "tokens_per_s": tokens / seconds, "prompts": len(prompts), "copied": copied, "speculation": none,
          "outputs_hash": hashlib.sha1(json.dumps(outputs).encode()).hexdigest(), "weights": "fp32 (OpenVINO IR)",
          "versions": {"openvino": ov.__version__, "openvino_genai": g.__version__}, "threads": a.threads})


def llama_worker(a) -> None:
    """llama.cpp's llama-lookup, plain (no drafts) or with its prompt lookup, on the code-edit workload."""
    import subprocess

    from .peer_workloads import LLAMA_BIN
    from kvcache_infer import Model
    tool, gguf = LLAMA_BIN / "llama-lookup", REPO / "models" / "peers" / f"{a.model}-f32.gguf"
    for p in (tool, gguf):
        if not p.exists():
            raise SystemExit(f"{p} is missing: run `bash scripts/setup_peers.sh` and convert the checkpoint "
                             "(benchmarks/peer_models.py's make_gguf)")
    tok = Model(MODELS[a.model]).tokenizer
    pairs = code_edit_prompts(**CODE_EDIT[a.workload])
    drafts = 5 if a.mode == "llamacpp-lookup" else 0
    timing = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([0-9.]+) seconds")

    retries = 0

    def run(prompt: str, n: int, tries: int = 5) -> tuple[int, float, str, dict]:
        nonlocal retries
        # -n N decodes N + 1 tokens (and -n 0 decodes until the context is full)
        p = subprocess.run([str(tool), "-m", str(gguf), "-p", prompt, "-n", str(max(n - 1, 1)), "-t", str(a.threads),
                            "-c", "1024", "--temp", "0", "--ignore-eos", "--spec-draft-n-max", str(drafts),
                            "--seed", "0"], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"llama-lookup exited {p.returncode}: {p.stderr.strip().splitlines()[-3:]}")
        log = p.stdout + p.stderr
        got = {k: (int(t), float(s)) for k, t, s in timing.findall(log)}
        counts = {k: int(v) for k, v in re.findall(r"(n_drafted|n_accept)\s+=\s+(\d+)", log)}
        # its output echoes the prompt, then the new text; without the echo nothing is counted as copied
        text = p.stdout[p.stdout.find(prompt) + len(prompt):] if prompt in p.stdout else None
        if len(got) < 2 or len(counts) < 2:                 # its log thread sometimes loses the last lines
            if tries > 1:
                retries += 1
                return run(prompt, n, tries - 1)
            raise RuntimeError(f"llama-lookup printed no timings: ...{log[-600:]}")
        return got["decoded"][0], got["encoded"][1] + got["decoded"][1], text, counts
    run(pairs[0][0], len(tok.encode(pairs[0][1]).ids))             # untimed
    tokens, seconds, copied, outputs, drafted, kept, unechoed = 0, 0.0, 0, [], 0, 0, 0
    for prompt, want in pairs:
        # it may decode a few tokens past -n (guesses kept in its last step): its own count is used
        n, s, text, counts = run(prompt, len(tok.encode(want).ids))
        tokens, seconds = tokens + n, seconds + s
        copied += text is not None and text.startswith(want)
        unechoed += text is None
        outputs.append(text)
        drafted, kept = drafted + counts.get("n_drafted", 0), kept + counts.get("n_accept", 0)
    version = subprocess.run([str(tool), "--version"], capture_output=True, text=True)
    steps = tokens - kept if drafts else 0            # each of its steps yields the guesses kept + 1
    stats = {"speculative_steps": steps, "draft_tokens": drafted, "accepted_tokens": kept,
             "acceptance_rate": kept / drafted if drafted else 0.0,
             "tokens_per_speculative_step": tokens / steps if steps else 0.0}
    emit({"model": a.model, "workload": a.workload, "mode": a.mode, "tokens": tokens, "seconds": seconds,
          "tokens_per_s": tokens / seconds, "prompts": len(pairs), "copied": copied, "speculation": stats,
          "outputs_hash": hashlib.sha1(json.dumps(outputs).encode()).hexdigest(), "weights": "f32 (GGUF)", "outputs_kind": "text",
          "versions": {"llama.cpp": " ".join((version.stdout + version.stderr).split())[:200]},
          "threads": a.threads, "draft_max": drafts,
          "reruns_for_lost_timings": retries, "outputs_without_the_prompt_echoed": unechoed,
          "tokens_per_step_counts": "every step (llama-lookup does not say which steps had guesses)"})


def worker(a) -> None:
    if a.mode in OV_MODES:
        return ov_worker(a)
    if a.mode in LLAMA_MODES:
        return llama_worker(a)
    from kvcache_infer import Engine, KVCacheInferencer, Model
    model = Model(MODELS[a.model], intra_op_threads=a.threads)
    m = model.manifest
    if a.workload == "serving":
        return serving_worker(a, model)
    if a.workload in CODE_EDIT:
        prompts, wants = prompts_and_answers(lambda t: model.tokenizer.encode(t).ids, a.workload)
    else:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, m.vocab_size, 64) for _ in range(a.prompts)]
        wants = [[0] * 128 for _ in prompts]
    spec = {"plain": None, "lookup": "lookup", "engine": "lookup", "wrong": wrong_proposer(m.vocab_size)}[a.mode]
    if a.mode == "engine":
        eng = Engine(model, max_sequences=1, max_seq_len=m.max_positions, prefix_cache=False)   # no prompt reused
        run = lambda p, n: eng.generate([p], n, speculative="lookup")[0]      # noqa: E731
        warm = lambda p, n: eng.generate([p], n, speculative=False)[0]        # noqa: E731
    else:
        inf = KVCacheInferencer(model, max_seq_len=m.max_positions)

        def run(p, n, guesses=True):
            inf.reset_cache()
            return inf.generate(p, n, speculative=spec if guesses else None)
        warm = lambda p, n: run(p, n, guesses=False)                          # noqa: E731
    tokens, seconds, copied, outputs, same = timed(run, prompts, wants, a.passes, warm)
    stats = eng.speculation_stats if a.mode == "engine" else inf.speculation_stats
    emit({"model": a.model, "workload": a.workload, "mode": a.mode, "tokens": tokens, "seconds": seconds,
          "tokens_per_s": tokens / seconds, "prompts": len(prompts), "copied": copied, "speculation": stats,
          "outputs_hash": hashlib.sha1(json.dumps(outputs).encode()).hexdigest(),
          "weights": m.weights or m.dtype, "passes": a.passes, "passes_agree": same, "environment": environment(a.threads)})


def serving_worker(a, model) -> None:
    from kvcache_infer import Engine

    from .serving import workload
    reqs = workload(48, model.manifest.vocab_size, 0, "all", 1.0)
    eng = Engine(model, max_sequences=16, max_seq_len=512, speculative="lookup" if a.mode == "engine" else None)
    eng.generate([r["prompt"][:16] for r in reqs[:4]], max_new_tokens=8)          # warm-up, untimed
    t0 = time.perf_counter()
    outs = eng.generate([r["prompt"] for r in reqs], [r["out"] for r in reqs])
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, outs))
    emit({"model": a.model, "workload": "serving", "mode": a.mode, "tokens": tokens, "seconds": seconds,
          "tokens_per_s": tokens / seconds, "prompts": len(reqs), "copied": 0, "speculation": eng.speculation_stats,
          "outputs": outs, "outputs_hash": hashlib.sha1(json.dumps(outs).encode()).hexdigest(),
          "weights": model.manifest.weights or model.manifest.dtype, "environment": environment(a.threads)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["pybytes:code-edit", "gpt2:random", "gpt2-int4:random"],
                    help="MODEL:WORKLOAD[:MODE,MODE...[:PASSES]] (models: %s; modes: --modes by default; passes: "
                         "--passes by default)" % ", ".join(MODELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + OV_MODES + LLAMA_MODES,
                    help="ov-* and llamacpp-* need `bash scripts/setup_peers.sh` and the model's OpenVINO IR / GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4, help="random workload: prompts (default 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1,
                    help="times each process of ours decodes the prompts (all timed); ov-* and llamacpp-* run one pass")
    ap.add_argument("--publish", action="store_true")
    ap.add_argument("--name", default="speculative_cpu", help="the JSON's file name (default speculative_cpu)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--workload", default=None)
    ap.add_argument("--mode", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    cases = {}
    for c in a.cases:
        model, workload, *rest = c.split(":")
        only = rest[0].split(",") if rest and rest[0] else a.modes
        passes = int(rest[1]) if len(rest) > 1 else a.passes
        for mode in only:
            if workload == "serving" and mode not in ("plain", "engine"):
                continue
            args = ["--model", model, "--workload", workload, "--mode", mode, "--threads", str(a.threads),
                    "--prompts", str(a.prompts), "--passes", str(passes)]
            cases[f"{model} {workload} {mode}"] = Case(str(PEERS_PYTHON), "benchmarks.speculative", args) \
                if mode in OV_MODES else args
    res = run_rounds("benchmarks.speculative", cases, a.rounds, timeout=1800)
    rows = []
    for name, ok in succeeded(res):
        s = spread([r["tokens_per_s"] for r in ok])
        r0 = ok[0]
        rows.append({"case": name, "model": r0["model"], "workload": r0["workload"], "mode": r0["mode"],
                     "tokens_per_s": s, "prompts": r0["prompts"], "passes": r0.get("passes", 1),
                     "passes_agree": all(r.get("passes_agree", True) for r in ok), "copied": r0["copied"],
                     "speculation": r0["speculation"], "same_outputs_as_plain": None,
                     "outputs_hash": r0["outputs_hash"], "outputs_kind": r0.get("outputs_kind", "token ids")})
    for r in rows:
        plain = next((p for p in rows if p["model"] == r["model"] and p["workload"] == r["workload"]
                      and p["mode"] == "plain"), None)
        if plain is not None:
            r["speedup"] = r["tokens_per_s"]["median"] / plain["tokens_per_s"]["median"]
            if r["outputs_kind"] == plain["outputs_kind"]:       # llama.cpp's outputs are text: not compared
                r["same_outputs_as_plain"] = r["outputs_hash"] == plain["outputs_hash"]
            if r["workload"] == "serving":      # requests whose tokens equal plain decoding's
                mine = next(x for x in res[r["case"]] if "failed" not in x)["outputs"]
                ref = next(x for x in res[plain["case"]] if "failed" not in x)["outputs"]
                r["requests_equal_plain"] = sum(x == y for x, y in zip(mine, ref))
        sp = r["speculation"]
        print(f"{r['case']:>28}: {r['tokens_per_s']['median']:8.1f} tokens/s ({r['tokens_per_s']['min']:.1f}-"
              f"{r['tokens_per_s']['max']:.1f}), x{r.get('speedup', float('nan')):.2f} plain, kept "
              f"{sp['acceptance_rate']:.2f} of drafts, {sp['tokens_per_speculative_step']:.2f} tokens/step, "
              f"outputs {({True: 'equal', False: 'differ from'}[r['same_outputs_as_plain']] + ' plain') if r['same_outputs_as_plain'] is not None else 'not compared (text or no plain run)'}, "
              f"{r['copied']}/{r['prompts']} begin with the expected text")
    for runs in res.values():                  # the outputs were compared above; the hashes stay
        for x in runs:
            x.pop("outputs", None)
    path = out_dir(a.publish) / f"{a.name}.json"
    path.write_text(json.dumps({"environment": environment(a.threads), "rows": rows, "raw": res}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
