"""Load on `kvcache-infer serve` over loopback, against the same Engine driven in-process.

    python -m benchmarks.http_load --model models/gpt2-int4 [--clients 1 4 16 64] [--duration 60]
                                   [--systems http in-process] [--rounds 1] [--publish]

Closed loop: C clients each send a request, read it to the end, and send the next, for --duration
seconds. Request k (the same k for every system) has a prompt of U[8,128] random ids and asks for
U[32,128] tokens, greedy (no stop ids). Counted: tokens that arrive inside the window (tokens/s),
time to first token from the request's send, gaps between a request's tokens, errors.
    http          `kvcache-infer serve` in its own process; the clients are the official `openai`
                  package's AsyncOpenAI, streaming, in the worker process
    in-process    Engine.submit/tick in the worker process (no HTTP, no second process)
Both share this machine's cores with everything else they need (the http clients included): on 2
cores that is what a loopback test can show, not what a client on another machine would see.
Each (system, clients) cell runs alone in its own process; the server's RSS is sampled through the
run. Every completed request's tokens are kept, so that the systems' outputs can be compared.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import environment
from .isolate import emit, out_dir, run_rounds, spread

SYSTEMS = ("http", "in-process")


def request(k: int, vocab: int, seed: int) -> tuple[list[int], int]:
    rng = np.random.default_rng([seed, k])
    return rng.integers(0, vocab, int(rng.integers(8, 129))).tolist(), int(rng.integers(32, 129))


class Tally:
    def __init__(self, t0: float, duration: float):
        self.t0, self.end = t0, t0 + duration
        self.tokens, self.ttft, self.gaps, self.errors, self.done = 0, [], [], [], {}

    def token(self, now: float, last: float | None, sent: float) -> None:
        if now <= self.end:
            self.tokens += 1
            (self.ttft if last is None else self.gaps).append(now - (sent if last is None else last))

    def summary(self) -> dict:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
        return {"tokens": self.tokens, "tokens_per_s": self.tokens / (self.end - self.t0),
                "ttft_p50_s": pct(self.ttft, 50), "ttft_p99_s": pct(self.ttft, 99),
                "per_token_p50_ms": pct([g * 1e3 for g in self.gaps], 50),
                "per_token_p99_ms": pct([g * 1e3 for g in self.gaps], 99),
                "completed": len(self.done), "errors": len(self.errors), "error_samples": self.errors[:5]}


def run_in_process(a, clients: int) -> dict:
    from kvcache_infer import Engine
    eng = Engine(a.model, max_sequences=a.max_sequences, intra_op_threads=a.threads)
    V = eng.manifest.vocab_size
    eng.generate([request(10**6 + i, V, a.seed)[0] for i in range(4)], max_new_tokens=8)    # warm-up
    tally, k, live = Tally(time.perf_counter(), a.duration), 0, {}

    def send():
        nonlocal k
        prompt, n = request(k, V, a.seed)
        live[eng.submit(prompt, max_new_tokens=n)] = (k, time.perf_counter(), None)
        k += 1

    for _ in range(clients):
        send()
    while time.perf_counter() < tally.end:
        events = eng.tick()
        now = time.perf_counter()
        for req, _ in events:
            kk, sent, last = live[req]
            tally.token(now, last, sent)
            live[req] = (kk, sent, now)
            if req.done:
                del live[req]
                if now <= tally.end:
                    tally.done[kk] = list(req.output)
                send()
    for req in list(live):
        eng.cancel(req)
    return tally.summary() | {"outputs": tally.done}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(a, clients: int) -> dict:
    import httpx
    import psutil
    from openai import AsyncOpenAI

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "kvcache_infer.cli", "serve", "--model", a.model, "--port",
                               str(port), "--threads", str(a.threads), "--max-sequences", str(a.max_sequences),
                               "--max-queue", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.monotonic()
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited: " + server.stderr.read()[-500:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t > 120:
                raise RuntimeError("the server did not come up in 120 s")
            time.sleep(0.2)
        info = httpx.get(url + "/v1/models").json()["data"][0]
        V, name = info["vocab_size"], info["id"]
        proc, rss = psutil.Process(server.pid), []

        async def main() -> Tally:
            client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600,
                                 http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)))
            for i in range(4):                                  # warm-up
                await client.completions.create(model=name, prompt=request(10**6 + i, V, a.seed)[0], max_tokens=8)
            rss.append(proc.memory_info().rss)
            tally, counter = Tally(time.perf_counter(), a.duration), iter(range(10**9))

            async def one_client():
                while time.perf_counter() < tally.end:
                    k = next(counter)
                    prompt, n = request(k, V, a.seed)
                    sent, last, ids = time.perf_counter(), None, []
                    try:
                        stream = await client.completions.create(model=name, prompt=prompt, max_tokens=n,
                                                                  temperature=0, stream=True)
                        async for chunk in stream:
                            now = time.perf_counter()
                            for tok in chunk.choices[0].token_ids if chunk.choices else ():
                                tally.token(now, last, sent)
                                last = now
                                ids.append(tok)
                            if now > tally.end:
                                await stream.close()
                                return
                        tally.done[k] = ids
                    except Exception as e:                      # counted, never hidden
                        tally.errors.append(f"request {k}: {type(e).__name__}: {str(e)[:200]}")

            async def sample_rss():
                while time.perf_counter() < tally.end:
                    await asyncio.sleep(2)
                    rss.append(proc.memory_info().rss)

            await asyncio.gather(sample_rss(), *[one_client() for _ in range(clients)])
            return tally

        tally = asyncio.run(main())
        return tally.summary() | {"outputs": tally.done, "server_rss_mib": [r / 2**20 for r in rss]}
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def worker(a) -> None:
    system, clients = a.worker.rsplit("@", 1)
    res = (run_http if system == "http" else run_in_process)(a, int(clients))
    emit({"system": system, "clients": int(clients), "environment": environment(a.threads), **res})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2-int4")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per cell (default 60)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--max-sequences", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--publish", action="store_true", help="write to benchmarks/results/ (default benchmarks/out/)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    common = ["--model", a.model, "--duration", str(a.duration), "--max-sequences", str(a.max_sequences),
              "--threads", str(a.threads), "--seed", str(a.seed)]
    cases = {f"{s}@{c}": [f"{s}@{c}", *common] for s in a.systems for c in a.clients}
    print(f"== {a.model}: {len(cases)} cells x {a.rounds} rounds, {a.duration:g} s each, each alone in its own "
          "process", flush=True)
    got = run_rounds("benchmarks.http_load", cases, a.rounds, timeout=a.duration * 3 + 300)
    summary, agree = {}, {}
    for cell, rs in got.items():
        ok = [r for r in rs if "failed" not in r]
        if not ok:
            summary[cell] = {"failed": rs[0]["failed"]}
            print(f"{cell:16s} not run: {rs[0]['failed'][:150]}")
            continue
        summary[cell] = {k: spread([r[k] for r in ok]) for k in ("tokens_per_s",)}
        summary[cell] |= {k: float(np.median([r[k] for r in ok if r[k] is not None] or [np.nan]))
                          for k in ("ttft_p50_s", "ttft_p99_s", "per_token_p50_ms", "per_token_p99_ms")}
        summary[cell]["errors"] = sum(r["errors"] for r in ok)
        summary[cell]["completed"] = sum(r["completed"] for r in ok)
        if "server_rss_mib" in ok[0]:
            summary[cell]["server_rss_mib"] = ok[0]["server_rss_mib"]
        s = summary[cell]
        print(f"{cell:16s} {s['tokens_per_s']['median']:7.1f} tokens/s ({s['tokens_per_s']['min']:.1f}-"
              f"{s['tokens_per_s']['max']:.1f})  TTFT p50 {s['ttft_p50_s']:.3f} s  per token p50 "
              f"{s['per_token_p50_ms']:.1f} ms  completed {s['completed']}  errors {s['errors']}")
    for c in a.clients:
        h, e = got.get(f"http@{c}", []), got.get(f"in-process@{c}", [])
        if h and e and "failed" not in h[0] and "failed" not in e[0]:
            ho, eo = h[0]["outputs"], e[0]["outputs"]
            both = set(ho) & set(eo)
            agree[str(c)] = {"compared": len(both), "identical": sum(ho[k] == eo[k] for k in both)}
            print(f"{c} clients: {agree[str(c)]['identical']} of {len(both)} requests completed by both systems "
                  "have identical tokens")
    out = out_dir(a.publish) / f"http_load_{Path(a.model).name}.json"
    out.write_text(json.dumps({"benchmark": "http_load", "model": a.model, "clients": a.clients,
                               "duration_s": a.duration, "max_sequences": a.max_sequences, "rounds": a.rounds,
                               "environment": environment(a.threads),
                               "summary": summary, "identical_outputs": agree,
                               "rounds_raw": {k: [{kk: vv for kk, vv in r.items() if kk != "outputs"} for r in rs]
                                              for k, rs in got.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
