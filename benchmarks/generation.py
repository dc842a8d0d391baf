"""What the generation loop and the cache controls cost, next to a bare decode step (one run).

    python -m benchmarks.generation --model models/gpt2 --threads 2

1. greedy generate: the time of each next() of stream(), vs a bare forward() step at the same
   positions, and what the in-graph argmax saves: forward() + host argmax (the [V] logits row
   copied out) vs the greedy step that fetches only next_token; the three advance in turn;
2. fork: copy a 500-token prefix from one slot into the 7 others of a batch-8 cache, vs one
   batch-8 decode step at position 500; snapshot and restore of the same prefix.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvcache_infer import KVCacheInferencer, Model

from .common import environment, session_options, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/gpt2"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per generate/forward run")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/generation_cpu.json"))
    a = ap.parse_args()

    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    m = model.manifest
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, m.vocab_size, size=a.prompt_len)
    # Three inferencers on one Model advance token by token in turn, so that the machine's noise
    # falls on all three alike: stream() (greedy: in-graph argmax), a bare forward(), and
    # forward() + host argmax (the logits row copied out, then argmax).
    cap = a.prompt_len + a.tokens + 1
    g_inf, f_inf, fa_inf = (KVCacheInferencer(model, max_seq_len=cap) for _ in range(3))
    gen, fwd, fwd_argmax = [], [], []
    for _ in tqdm(range(a.repeats), desc="generate vs forward", unit="repeat"):
        for x in (g_inf, f_inf, fa_inf):
            x.reset_cache()
        it = g_inf.stream(prompt, a.tokens)
        next(it)                                            # the prompt
        f_logits = f_inf.forward(prompt)
        fa_tok = int(fa_inf.forward(prompt).argmax())
        for _ in range(a.tokens - 1):
            t = time.perf_counter(); next(it); gen.append((time.perf_counter() - t) * 1e3)
            nxt = [int(f_logits.argmax())]
            t = time.perf_counter(); f_logits = f_inf.forward(nxt); fwd.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter(); fa_tok = int(fa_inf.forward([fa_tok]).argmax())
            fwd_argmax.append((time.perf_counter() - t) * 1e3)
    g, f, fa = summarize(gen), summarize(fwd), summarize(fwd_argmax)

    B, P = a.batch, a.prefix
    binf = KVCacheInferencer(model, batch_size=B, max_seq_len=P + 8)
    forks, steps, snaps, restores = [], [], [], []
    snap = None
    for _ in tqdm(range(a.repeats), desc="fork vs batch step", unit="repeat"):
        del snap                                            # free the last one: its pages get reused
        binf.reset_cache()
        binf.forward(rng.integers(0, m.vocab_size, size=(B, P)))
        t = time.perf_counter(); binf.fork(0); forks.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter(); snap = binf.snapshot(); snaps.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter(); binf.restore(snap); restores.append((time.perf_counter() - t) * 1e3)
        for _ in range(3):
            t = time.perf_counter()
            binf.forward(rng.integers(0, m.vocab_size, size=(B, 1)))
            steps.append((time.perf_counter() - t) * 1e3)
        binf.truncate(P)
    fk, st = summarize(forks), summarize(steps)
    res = {"environment": environment(a.threads), "model": str(a.model), "dtype": m.dtype,
           "layers": m.num_layers, "vocab": m.vocab_size, "next_token_in_graph": bool(m.next_token),
           "generate_per_token": g, "forward_step": f, "forward_plus_host_argmax": fa,
           "generate_over_forward": g["median_ms"] / f["median_ms"],
           "argmax_in_graph_saves_ms": fa["median_ms"] - g["median_ms"],
           "fork": {"prefix": P, "batch": B, "slots_written": B - 1, **fk},
           "batch_step_at_prefix": st, "fork_over_batch_step": fk["median_ms"] / st["median_ms"],
           "snapshot": summarize(snaps), "restore": summarize(restores),
           "snapshot_bytes": snap.nbytes,
           "snapshot_note": "the first snapshot pays first-touch page faults for fresh host memory"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"greedy generate {g['median_ms']:.3f} ms/token vs bare forward() {f['median_ms']:.3f} ms "
          f"(ratio {res['generate_over_forward']:.3f}; bar <= 1.05); forward()+host argmax {fa['median_ms']:.3f} ms "
          f"(in-graph argmax saves {res['argmax_in_graph_saves_ms']:.3f} ms/token)")
    print(f"fork of a {P}-token prefix into {B - 1} slots: {fk['median_ms']:.2f} ms vs a batch-{B} step "
          f"{st['median_ms']:.2f} ms (ratio {res['fork_over_batch_step']:.2f}; bar <= 2); snapshot "
          f"{res['snapshot']['median_ms']:.2f} ms, restore {res['restore']['median_ms']:.2f} ms "
          f"({snap.nbytes / 2**20:.0f} MiB)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
