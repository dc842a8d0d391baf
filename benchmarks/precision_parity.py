"""A lower-precision export against its fp32 twin: top-1 agreement and logit differences.

    python -m benchmarks.precision_parity --ref models/gpt2 --test models/gpt2-fp16 --steps 1000

From several random prompts the fp32 model decodes greedily; the test model is fed the same tokens
(teacher forcing, so one disagreement does not change every later step) and every step compares
its argmax and logits with fp32's. A free-running greedy decode of the test model is also compared
token by token with fp32's. Runs on whatever device the models are loaded on (CPU here).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvcache_infer import KVCacheInferencer, Model

from .common import environment, session_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", type=Path, default=Path("models/gpt2"))
    ap.add_argument("--test", type=Path, default=Path("models/gpt2-fp16"))
    ap.add_argument("--steps", type=int, default=1000, help="greedy steps in all, split over the prompts")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/fp16_parity_cpu.json"))
    a = ap.parse_args()

    load = lambda p: Model(p, device=a.device, intra_op_threads=a.threads,  # noqa: E731
                           session_options=session_options(a.threads))
    ref_m, test_m = load(a.ref), load(a.test)
    per = a.steps // a.prompts
    cap = a.prompt_len + per
    ref, test = KVCacheInferencer(ref_m, max_seq_len=cap), KVCacheInferencer(test_m, max_seq_len=cap)
    rng = np.random.default_rng(0)
    agree, diffs, rel, free_match, first_div = [], [], [], [], []
    t0 = time.perf_counter()
    bar = tqdm(total=per * a.prompts, desc="steps", unit="step")
    for _ in range(a.prompts):
        prompt = rng.integers(0, ref_m.manifest.vocab_size, size=a.prompt_len)
        ref.reset_cache(); test.reset_cache()
        lr, lt = ref.forward(prompt), test.forward(prompt)
        ref_tokens = []
        for _ in range(per):
            agree.append(int(lr.argmax()) == int(lt.argmax()))
            diffs.append(float(np.abs(lr - lt).max()))
            rel.append(diffs[-1] / float(lr.max() - lr.min()))
            tok = int(lr.argmax())
            ref_tokens.append(tok)
            if len(ref_tokens) < per:
                lr, lt = ref.forward([tok]), test.forward([tok])
            bar.update()
        test.reset_cache()                          # free-running greedy decode of the test model
        lt = test.forward(prompt)
        own = []
        for i in range(per):
            own.append(int(lt.argmax()))
            if i + 1 < per:
                lt = test.forward([own[-1]])
        match = [x == y for x, y in zip(own, ref_tokens)]
        free_match.append(float(np.mean(match)))
        first_div.append(match.index(False) if False in match else per)
    bar.close()
    m = test_m.manifest
    res = {"environment": environment(a.threads), "device": a.device, "provider": test_m.providers[0],
           "ref": str(a.ref), "test": str(a.test), "ref_dtype": ref_m.manifest.dtype, "test_dtype": m.dtype,
           "ref_weights": ref_m.manifest.weights or ref_m.manifest.dtype, "test_weights": m.weights or m.dtype,
           "steps": len(agree), "prompts": a.prompts, "prompt_len": a.prompt_len,
           "teacher_forced_top1_agreement": float(np.mean(agree)),
           "max_abs_logit_diff": float(np.max(diffs)), "median_abs_logit_diff": float(np.median(diffs)),
           "max_diff_over_logit_range": float(np.max(rel)),
           "free_running_token_match": free_match, "free_running_first_divergence": first_div,
           "cache_bytes_per_token": {"ref": ref_m.manifest.cache_bytes_per_token, "test": m.cache_bytes_per_token},
           "seconds": time.perf_counter() - t0}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    divs = ", ".join(str(d) if d < per else f"never (all {per} equal)" for d in first_div)
    print(f"{res['test_weights']} vs {res['ref_weights']} over {res['steps']} greedy steps ({a.prompts} prompts): top-1 "
          f"agreement {100 * res['teacher_forced_top1_agreement']:.1f}% (teacher-forced), max |logit diff| "
          f"{res['max_abs_logit_diff']:.2e} ({100 * res['max_diff_over_logit_range']:.2f}% of the logit range); "
          f"free-running greedy decodes of the two first differ at step: {divs} (per prompt); cache bytes/token "
          f"{res['cache_bytes_per_token']['ref']} -> {res['cache_bytes_per_token']['test']}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
