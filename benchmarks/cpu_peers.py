"""The CPU peers, each in its own fresh process: OpenVINO GenAI, llama.cpp and CTranslate2.

    python -m benchmarks.cpu_peers --worker PEER --precision P --workload W --threads 2 [--model-root models/peers]
                                   [--tiny]
    python -m benchmarks.cpu_peers [--tiny] [--peers ...] [--workloads ...] [--rounds 1]     every case, each alone

Run in .venv-peers (`bash scripts/setup_peers.sh`, then `python -m benchmarks.peer_models [--tiny]` for the
models). A worker prints exactly one line `RESULT {json}` (benchmarks.isolate's protocol) and raises, with
the reason, when it cannot run; the runner records that. Without --worker, every (peer, precision,
workload) runs alone through benchmarks.isolate.run_rounds and the results go to benchmarks/out/.

Peers and precisions (weights / compute / KV cache are recorded in each result as the peer reports them):
    openvino   fp32-default  fp32 IR, the CPU plugin's defaults (on an AVX-512 BF16 CPU: bf16 inference, u8 KV cache)
               fp32-strict   fp32 IR, INFERENCE_PRECISION_HINT f32 + KV_CACHE_PRECISION f32
               int8, int4    NNCF weight compression (int4: sym, group 128, ratio 1.0), plugin defaults otherwise
    llamacpp   f32, q8_0, q4_0  GGUF (llama-quantize), llama.cpp's defaults (f16 KV cache, flash attention auto)
    ct2        float32, int8    CTranslate2 compute_type of the same name
Workloads (greedy, token ids only, no text; every system gets `--threads` threads, 2 by default):
    decode        one sequence, a prompt of P random ids (P = 32 and 512), then N = 64 tokens; ms per generated
                  token after the first
    first-token   time to first token for prompts of 32 and 512 random ids, median of 5 after 1 untimed
    serving       benchmarks.serving's workload (48 requests, prompts U[8,128], outputs U[32,256], seed 0, all at
                  once), each request exactly its output length; generated tokens / wall time, TTFT p50/p99
    shared-prefix benchmarks.shared_prefix's workload (16 requests = one 512-token prefix + 16 distinct tokens,
                  32 new tokens each, all at once); total seconds
--tiny runs the same on the tiny models with smaller sizes (smoke tests; not results).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .isolate import emit, out_dir, run_rounds
from .peer_ctranslate2 import ct2_worker
from .peer_llamacpp import llama_bench, llama_server
from .peer_openvino import ov_many, ov_single
from .peer_workloads import PRECISIONS, REPO, SHORT, SIZES, WORKLOADS, environment, hf_config


# -- entry points ---------------------------------------------------------------------------------------------
def worker(a) -> None:
    if a.worker not in PRECISIONS:
        raise SystemExit(f"unknown peer {a.worker!r}: one of {', '.join(PRECISIONS)}")
    if a.precision not in PRECISIONS[a.worker]:
        raise SystemExit(f"{a.worker}: unknown precision {a.precision!r}: one of {', '.join(PRECISIONS[a.worker])}")
    root = a.model_root if a.model_root.is_absolute() else REPO / a.model_root
    cfg = hf_config(root, a.model)
    vocab = int(cfg["vocab_size"])
    sz = SHORT if a.short else SIZES[a.model]
    t0 = time.perf_counter()
    if a.worker == "openvino":
        res = ov_single(a, root, vocab, sz) if a.workload in ("decode", "first-token") else ov_many(a, root, vocab, sz)
    elif a.worker == "llamacpp":
        res = llama_bench(a, root, sz) if a.workload in ("decode", "first-token") else llama_server(a, root, vocab, sz)
    else:
        res = ct2_worker(a, root, vocab, sz)
    emit({"peer": a.worker, "precision": a.precision, "workload": a.workload, "model": a.model,
          "smoke_only": a.model == "tiny", "short": a.short, "threads": a.threads, **res,
          "worker_s": time.perf_counter() - t0, "environment": environment(a.threads)})


def cases(peers, workloads, model: str, threads: int, root: Path) -> dict[str, list[str]]:
    out = {}
    for peer in peers:
        for prec in PRECISIONS[peer]:
            for w in workloads:
                out[f"{peer}/{prec}/{w}"] = [peer, "--precision", prec, "--workload", w, "--threads", str(threads),
                                             "--model", model, "--model-root", str(root)]
    return out


def headline(res: dict) -> str:
    if "failed" in res:
        return "did not run: " + res["failed"][:160]
    n = res["numbers"]
    if res["workload"] == "decode":
        return ", ".join(f"{k}: {v['ms_per_token']:.2f} ms/token" for k, v in n.items())
    if res["workload"] == "first-token":
        return ", ".join(f"{k}: {v['ttft_ms']:.1f} ms" for k, v in n.items())
    if res["workload"] == "serving":
        return f"{n['tokens_per_s']:.1f} tokens/s, TTFT p50 {n['ttft_p50_s']:.2f} s"
    return f"total {n['total_s']:.2f} s, TTFT p50 {n['ttft_p50_s']:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, metavar="PEER", help="run one case in this process: " + ", ".join(PRECISIONS))
    ap.add_argument("--precision", default=None)
    ap.add_argument("--workload", default=None, choices=WORKLOADS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-root", type=Path, default=Path("models/peers"))
    ap.add_argument("--model", default="gpt2", choices=sorted(SIZES))
    ap.add_argument("--tiny", action="store_true", help="--model tiny: the tiny models and sizes (smoke tests)")
    ap.add_argument("--short", action="store_true", help="a worker's short sizes (scripts/run.sh's short run; not results)")
    ap.add_argument("--peers", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.tiny:
        a.model = "tiny"
    if a.worker:
        if not (a.precision and a.workload):
            ap.error("--worker needs --precision and --workload")
        worker(a)
        return
    runs = run_rounds("benchmarks.cpu_peers", cases(a.peers, a.workloads, a.model, a.threads, a.model_root),
                      a.rounds, a.timeout)
    path = out_dir(False) / f"cpu_peers-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": a.model, "rounds": a.rounds, "runs": runs}, indent=1, default=str) + "\n")
    for name, rs in runs.items():
        for r in rs:
            print(f"{name:32s} {headline(r)}")
    print(f"written: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
