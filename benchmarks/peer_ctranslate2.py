"""CTranslate2 as a CPU peer (benchmarks/cpu_peers.py): Generator.generate_batch in static batches;
run in .venv-peers."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .peer_workloads import SERVING_SLOTS, need, pct, random_prompt, workload_requests


def ct2_setup(a, root: Path):
    import ctranslate2
    path = need(root / f"{a.model}-ct2-{a.precision}", a.model)
    gen = ctranslate2.Generator(str(path), device="cpu", compute_type=a.precision, intra_threads=a.threads,
                                inter_threads=1)
    vocab_file = path / "vocabulary.json"
    if vocab_file.exists():
        tokens = json.loads(vocab_file.read_text())
    else:
        tokens = (path / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    info = {"peer": "ct2", "versions": {"ctranslate2": ctranslate2.__version__},
            "precision_detail": {
                "weights": {"float32": "float32", "int8": "int8 (ct2-transformers-converter --quantization int8)"}[a.precision],
                "compute": {"float32": "float32",
                            "int8": "int8 matrix products (activations quantized on the fly), other layers float32"}[a.precision],
                "compute_type_reported": gen.compute_type,
                "kv_cache": "float32 (CTranslate2 keeps the decoder state in the activations' type)",
                "supported_compute_types_cpu": sorted(ctranslate2.get_supported_compute_types("cpu"))},
            "model_path": str(path)}
    return gen, tokens, info


def ct2_run(gen, batch: list[list[str]], lengths: list[int], **kw):
    """generate_batch with a step callback that stops each request at its own length; timestamps since the call."""
    t0 = time.perf_counter()
    stamps: list[list[float]] = [[] for _ in batch]

    def cb(step) -> bool:
        stamps[step.batch_id].append(time.perf_counter() - t0)
        return len(stamps[step.batch_id]) >= lengths[step.batch_id]

    res = gen.generate_batch(batch, max_length=max(lengths), min_length=max(lengths), include_prompt_in_result=False,
                             beam_size=1, sampling_topk=1, callback=cb, **kw)
    wall = time.perf_counter() - t0
    return res, stamps, wall


def ct2_worker(a, root: Path, vocab: int, sz: dict) -> dict:
    gen, tokens, info = ct2_setup(a, root)
    to_tok = lambda ids: [tokens[int(i)] for i in ids]                # noqa: E731
    warm = np.random.default_rng(1234).integers(0, vocab - 1, (2, 24))
    ct2_run(gen, [to_tok(x) for x in warm], [4, 4])
    numbers = {}
    common = {"api": "Generator(path, device='cpu', compute_type, intra_threads, inter_threads=1).generate_batch("
                     "token strings from vocabulary.json, include_prompt_in_result=False, beam_size 1, sampling_topk 1)",
              "threads": {"intra_threads": a.threads, "inter_threads": 1}}
    if a.workload == "decode":
        n = sz["decode_new"]
        for p in sz["decode_prompts"]:
            ct2_run(gen, [to_tok(random_prompt(p, vocab, 0))], [n])       # untimed
            runs = []
            for k in range(sz["decode_timed"]):
                res, st, wall = ct2_run(gen, [to_tok(random_prompt(p, vocab, k + 1))], [n])
                s = st[0]
                if len(s) != n or len(res[0].sequences_ids[0]) != n:
                    raise RuntimeError(f"asked for {n} tokens, got {len(s)} callbacks / {len(res[0].sequences_ids[0])} ids")
                gaps = np.diff(s) * 1000
                runs.append({"ms_per_token": float((s[-1] - s[0]) / (n - 1) * 1000), "median_gap_ms": float(np.median(gaps)),
                             "ttft_ms": s[0] * 1000, "wall_ms": wall * 1000})
            numbers[f"P{p}"] = {"ms_per_token": statistics.median(r["ms_per_token"] for r in runs), "runs": runs}
        settings = {**common, "generation": f"max_length = min_length = {n} (EOS suppressed until then)",
                    "measure": "step callback timestamps: (last - first) / (N - 1), median over "
                               f"{sz['decode_timed']} runs after 1 untimed run per prompt length, each a fresh "
                               "random prompt (seeds 1..k)"}
    elif a.workload == "first-token":
        for p in sz["first_prompts"]:
            gen.generate_batch([to_tok(random_prompt(p, vocab, 0))], max_length=1, include_prompt_in_result=False)
            ms = []
            for k in range(sz["first_timed"]):
                toks = to_tok(random_prompt(p, vocab, k + 1))
                t0 = time.perf_counter()
                gen.generate_batch([toks], max_length=1, include_prompt_in_result=False, beam_size=1, sampling_topk=1)
                ms.append((time.perf_counter() - t0) * 1000)
            numbers[f"P{p}"] = {"ttft_ms": statistics.median(ms), "runs_ms": ms}
        settings = {**common, "generation": "max_length 1",
                    "measure": f"wall time of generate_batch, median of {sz['first_timed']} after 1 untimed per "
                               "length, each a fresh random prompt (seeds 1..k)"}
    else:
        reqs = workload_requests(a.workload, sz, vocab)
        w = sz["serving" if a.workload == "serving" else "shared"]   # recorded with the results
        lengths = [r["out"] for r in reqs]
        res, st, wall = ct2_run(gen, [to_tok(r["prompt"]) for r in reqs], lengths, max_batch_size=SERVING_SLOTS)
        got = [len(s) for s in st]
        ids = [len(r.sequences_ids[0]) for r in res]
        if got != lengths or ids != lengths:
            raise RuntimeError(f"token counts differ from the requested lengths: callbacks {got}, ids {ids}")
        end = max(s[-1] for s in st)
        ttft = [s[0] for s in st]
        numbers = {"requests": len(reqs), "generated_tokens": int(sum(got)), "wall_s": end, "call_wall_s": wall,
                   "tokens_per_s": sum(got) / end, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}
        settings = {**common, "batching": f"one generate_batch over all requests, max_batch_size {SERVING_SLOTS}: CT2 "
                                          "sorts them by length and runs static batches of up to 16 one after another; "
                                          "a finished request leaves its batch, none joins a running one",
                    "generation": "max_length = min_length = the longest request; a step callback returns True at "
                                  "each request's own length, which stops that request (so each gets exactly its length)",
                    "prompts": "within a batch, the prompt tokens up to the shortest prompt are forwarded at once and "
                               "the rest are fed one step at a time (CT2's documented behaviour for "
                               "include_prompt_in_result=False with unequal lengths)",
                    "workload": {**w, "vocab": vocab, "arrival": "all at once"},
                    "warmup": "2 requests of 24 other ids, 4 tokens each"}
        if a.workload == "shared-prefix":
            numbers = {"total_s": end, **numbers}
            # CT2's one prefix cache: static_prompt (a common prompt computed once, cached, reused), first call
            head = to_tok(reqs[0]["prompt"][: w["prefix"]])
            res2, st2, wall2 = ct2_run(gen, [to_tok(r["prompt"][w["prefix"]:]) for r in reqs], lengths,
                                       max_batch_size=SERVING_SLOTS, static_prompt=head, cache_static_prompt=True)
            if [len(s) for s in st2] != lengths:
                raise RuntimeError("static_prompt run: token counts differ from the requested lengths")
            numbers["static_prompt"] = {"total_s": max(s[-1] for s in st2), "ttft_p50_s": pct([s[0] for s in st2], 50),
                                        "note": f"the same requests again in the same process, the {w['prefix']}-token prefix given "
                                                "as generate_batch(static_prompt=...), cache_static_prompt True, first "
                                                "call with it (includes computing the prefix once)"}
    return {**info, "settings": settings, "numbers": numbers}
