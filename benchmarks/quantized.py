"""fp32 vs weight-only int8/int4 exports: decode latency, bytes read per step, and the floor.

    python -m benchmarks.quantized --models models/gpt2 models/gpt2-int8 models/gpt2-int4 --threads 2

One run: first the sustainable read bandwidth of this machine for a matrix-vector product (an ORT
MatMul [1,K] x [K,N] streaming ~200 MB of fp32 weights, median of runs); then each model's
cached-token latency at each position (repeats outermost, models interleaved, 50 ms settle
between models). Bytes a step must read: every weight initializer except embedding tables (a
Gather reads one row) plus the live K/V; floor = bytes / bandwidth.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvcache_infer import KVCacheInferencer, Model
from kvcache_infer.bench import time_decode_steps

from .common import environment, session_options, summarize
from .floor import matvec_bandwidth, weight_bytes_per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, nargs="+", default=[Path("models/gpt2"), Path("models/gpt2-int8"),
                                                                Path("models/gpt2-int4"), Path("models/gpt2-int4-fp16")])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", type=int, nargs="+", default=[32, 128, 512, 1000])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/quantized_cpu.json"))
    a = ap.parse_args()

    bw = matvec_bandwidth(a.threads)
    print(f"matrix-vector read bandwidth: {bw['GB_per_s']:.1f} GB/s ({bw['bytes'] / 1e6:.0f} MB in "
          f"{bw['median_ms']:.2f} ms)", flush=True)
    cap = max(a.positions) + a.steps
    infs, info = {}, {}
    for p in a.models:
        model = Model(p, intra_op_threads=a.threads, session_options=session_options(a.threads))
        infs[str(p)] = KVCacheInferencer(model, max_seq_len=cap)
        wb, fb = weight_bytes_per_step(p, picks=False)           # forward(): logits rows
        data = json.loads((p / "manifest.json").read_text())
        info[str(p)] = {"weights": data.get("weights", data["dtype"]), "quantization": data.get("quantization"),
                        "file_bytes": fb, "weight_bytes_per_step": wb,
                        "kv_bytes_per_token": model.manifest.cache_bytes_per_token}
    V = next(iter(infs.values())).manifest.vocab_size
    ids = np.random.default_rng(0).integers(0, V, size=cap)
    samples: dict = {}
    for _ in tqdm(range(a.repeats), desc="repeats"):
        for pos in a.positions:
            for name, inf in infs.items():
                time.sleep(0.05)
                samples.setdefault((name, pos), []).extend(time_decode_steps(inf, ids, pos, a.warmup, a.steps))
    res = {"environment": environment(a.threads), "bandwidth": bw, "models": info, "decode": {}}
    lines = ["| model | weights | file MB | MB read/step @32 | " + " | ".join(f"ms @{p}" for p in a.positions)
             + " | floor ms @32 | of floor @32 |", "|---" * (6 + len(a.positions)) + "|"]
    for name in infs:
        d = {}
        for pos in a.positions:
            s = summarize(samples[(name, pos)])
            read = info[name]["weight_bytes_per_step"] + info[name]["kv_bytes_per_token"] * (pos + a.steps // 2)
            s["bytes_read"] = read
            s["floor_ms"] = read / (bw["GB_per_s"] * 1e6)
            s["fraction_of_floor"] = s["floor_ms"] / s["median_ms"]
            d[str(pos)] = s
        res["decode"][name] = d
        i = info[name]
        lines.append(f"| {name} | {i['weights']} | {i['file_bytes'] / 1e6:.0f} | {d['32']['bytes_read'] / 1e6:.0f} | "
                     + " | ".join(f"{d[str(p)]['median_ms']:.2f} ({d[str(p)]['min_ms']:.2f}-{d[str(p)]['max_ms']:.2f})"
                                  for p in a.positions)
                     + f" | {d['32']['floor_ms']:.2f} | {100 * d['32']['fraction_of_floor']:.0f}% |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
