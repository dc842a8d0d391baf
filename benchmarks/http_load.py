"""Load on `kvcache-infer serve` over loopback, against the same Engine driven in-process.

    python -m benchmarks.http_load --model models/gpt2-int4 [--clients 1 4 16 64] [--duration 60]
                                   [--systems http in-process ray-1 ray-2] [--rounds 1] [--publish]
    python -m benchmarks.http_load --systems ray-2 --clients 64 --duration 120 --kill-at 40

Closed loop: C clients each send a request, read it to the end, and send the next, for --duration
seconds. Request k (the same k for every system) has a prompt of U[8,128] random ids and asks for
U[32,128] tokens, greedy (no stop ids). Counted: tokens that arrive inside the window (tokens/s),
time to first token from the request's send, gaps between a request's tokens, errors.
    http          `kvcache-infer serve` in its own process; the clients are the official `openai`
                  package's AsyncOpenAI, streaming, in the worker process
    in-process    Engine.submit/tick in the worker process (no HTTP, no second process)
    ray-N         `kvcache-infer serve --replicas N` (Ray Serve on this machine, --threads split
                  between the replicas); requests carry no session key, so they spread evenly
--kill-at S (ray-N only): S seconds into the window one replica is killed (ray.kill); the JSON gets
tokens per second-long bin, when the replacement was serving, and tokens/s before the kill against
tokens/s from the replacement's return to the end. Errors then are the clean, retryable 503s of
requests whose replica died after their first token.
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

from .common import pyplot, environment
from .isolate import emit, out_dir, run_rounds, spread

SYSTEMS = ("http", "in-process", "ray-1", "ray-2")


def request(k: int, vocab: int, seed: int) -> tuple[list[int], int]:
    rng = np.random.default_rng([seed, k])
    return rng.integers(0, vocab, int(rng.integers(8, 129))).tolist(), int(rng.integers(32, 129))


class Tally:
    def __init__(self, t0: float, duration: float):
        self.t0, self.end = t0, t0 + duration
        self.tokens, self.ttft, self.gaps, self.errors, self.done = 0, [], [], [], {}
        self.bins = [0] * (int(duration) + 1)          # tokens per second of the window

    def token(self, now: float, last: float | None, sent: float) -> None:
        if now <= self.end:
            self.tokens += 1
            self.bins[int(now - self.t0)] += 1
            (self.ttft if last is None else self.gaps).append(now - (sent if last is None else last))

    def summary(self) -> dict:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
        return {"tokens": self.tokens, "tokens_per_s": self.tokens / (self.end - self.t0),
                "ttft_p50_s": pct(self.ttft, 50), "ttft_p99_s": pct(self.ttft, 99),
                "per_token_p50_ms": pct([g * 1e3 for g in self.gaps], 50),
                "per_token_p99_ms": pct([g * 1e3 for g in self.gaps], 99),
                "completed": len(self.done), "errors": len(self.errors), "error_samples": self.errors[:5],
                "tokens_per_second_bins": self.bins}


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


def run_http(a, clients: int, replicas: int | None = None) -> dict:
    import httpx
    import psutil
    from openai import AsyncOpenAI

    port = _free_port()
    threads = a.threads if replicas is None else max(1, a.threads // replicas)
    scale = [] if replicas is None else ["--replicas", str(replicas)]
    server = subprocess.Popen([sys.executable, "-m", "kvcache_infer.cli", "serve", "--model", a.model, "--port",
                               str(port), "--threads", str(threads), "--max-sequences", str(a.max_sequences),
                               "--max-queue", "4096", *scale], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    killed = {}
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
            if time.monotonic() - t > 300:
                raise RuntimeError("the server did not come up in 300 s")
            time.sleep(0.2)
        info = httpx.get(url + "/v1/models").json()["data"][0]
        V, name = info["vocab_size"], info["id"]
        proc, rss = psutil.Process(server.pid), []
        tree_rss = lambda: sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])   # Ray: all its processes

        async def main() -> Tally:
            client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600,
                                 http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)))
            for i in range(4):                                  # warm-up
                await client.completions.create(model=name, prompt=request(10**6 + i, V, a.seed)[0], max_tokens=8)
            rss.append(tree_rss())
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
                    rss.append(tree_rss())

            async def kill_one():
                await asyncio.sleep(a.kill_at)
                killed.update(await asyncio.to_thread(kill_replica, tally.t0))

            extra = [kill_one()] if a.kill_at is not None and replicas else []
            await asyncio.gather(sample_rss(), *extra, *[one_client() for _ in range(clients)])
            return tally

        tally = asyncio.run(main())
        out = tally.summary() | {"outputs": tally.done, "server_rss_mib": [r / 2**20 for r in rss]}
        if killed:
            bins, at, back = tally.bins, int(killed["killed_at_s"]), killed.get("back_at_s")
            out |= killed | {"tokens_per_s_before_kill": float(np.mean(bins[5:at])) if at > 5 else None,
                             "tokens_per_s_after_return": float(np.mean(bins[int(back) + 1:int(a.duration)]))
                             if back is not None and back + 2 < a.duration else None}
        return out
    finally:
        server.terminate()
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            import os
            import signal
            os.killpg(server.pid, signal.SIGKILL)


def kill_replica(t0: float) -> dict:
    """Kills one EngineReplica actor; returns when (seconds after t0) and when a replacement answered."""
    import ray
    from ray import serve
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        names = lambda: {x["name"] for x in ray.util.list_named_actors(all_namespaces=True)
                         if "#EngineReplica#" in x["name"]}
        before = names()
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        out = {"killed_at_s": time.perf_counter() - t0, "killed": victim}
        while time.perf_counter() - t0 < 600:
            now = names()
            st = serve.status().applications["kvcache-infer"].deployments["EngineReplica"]
            if victim not in now and len(now) == len(before) and st.status == "HEALTHY":
                out["back_at_s"] = time.perf_counter() - t0
                break
            time.sleep(0.25)
        return out
    finally:
        ray.shutdown()


def worker(a) -> None:
    system, clients = a.worker.rsplit("@", 1)
    if system.startswith("ray-"):
        res = run_http(a, int(clients), replicas=int(system[4:]))
    else:
        res = (run_http if system == "http" else run_in_process)(a, int(clients))
    emit({"system": system, "clients": int(clients), "environment": environment(a.threads), **res})


def plot_kill(got: dict, path: Path) -> None:
    """Tokens/s over the window of each --kill-at run, the kill and the replacement's return marked."""
    plt = pyplot()
    if plt is None:
        return
    runs = [(cell, r) for cell, rs in got.items() for r in rs if "killed_at_s" in r]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for cell, r in runs:
        bins = np.array(r["tokens_per_second_bins"][:-1], dtype=float)
        ax.plot(range(len(bins)), bins, color="tab:blue", lw=0.6, alpha=0.35, label=f"{cell}, per second")
        smooth = np.convolve(bins, np.ones(5) / 5, mode="valid")            # 5-second mean, centred
        ax.plot(np.arange(len(smooth)) + 2, smooth, color="tab:blue", lw=2, label=f"{cell}, 5-second mean")
        ax.axvline(r["killed_at_s"], color="tab:red", ls="--", lw=1)
        if r.get("back_at_s") is not None:
            ax.axvline(r["back_at_s"], color="tab:green", ls="--", lw=1)
    ax.text(runs[0][1]["killed_at_s"], ax.get_ylim()[1] * 0.95, " replica killed", color="tab:red", va="top")
    if runs[0][1].get("back_at_s") is not None:
        ax.text(runs[0][1]["back_at_s"], ax.get_ylim()[1] * 0.85, " replacement serving", color="tab:green", va="top")
    ax.set_xlabel("seconds into the window")
    ax.set_ylabel("generated tokens per second")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", frameon=True, framealpha=0.9, fontsize=8)
    ax.set_title("Ray Serve, one replica killed under load (loopback, this machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


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
    ap.add_argument("--kill-at", type=float, default=None,
                    help="ray-N: kill one replica this many seconds into each cell's window")
    ap.add_argument("--publish", action="store_true", help="write to benchmarks/results/ (default benchmarks/out/)")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="redraw the plot of a --kill-at result")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.replot:
        return plot_kill(json.loads(a.replot.read_text())["rounds_raw"], a.replot.with_suffix(".png"))
    common = ["--model", a.model, "--duration", str(a.duration), "--max-sequences", str(a.max_sequences),
              "--threads", str(a.threads), "--seed", str(a.seed),
              *(["--kill-at", str(a.kill_at)] if a.kill_at is not None else [])]
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
        for r in ok:
            if "killed_at_s" in r:
                back = r.get("back_at_s")
                print(f"{'':16s} replica killed at {r['killed_at_s']:.1f} s, replacement serving "
                      + (f"at {back:.1f} s" if back is not None else "not within the window")
                      + f"; tokens/s before the kill {r['tokens_per_s_before_kill'] or float('nan'):.1f}, after the "
                      f"return {r['tokens_per_s_after_return'] or float('nan'):.1f}")
    for system in [s for s in a.systems if s != "in-process"]:
        for c in a.clients:
            h, e = got.get(f"{system}@{c}", []), got.get(f"in-process@{c}", [])
            if h and e and "failed" not in h[0] and "failed" not in e[0]:
                ho, eo = h[0]["outputs"], e[0]["outputs"]
                both = set(ho) & set(eo)
                agree[f"{system}@{c}"] = {"compared": len(both), "identical": sum(ho[k] == eo[k] for k in both)}
                print(f"{system}, {c} clients: {agree[f'{system}@{c}']['identical']} of {len(both)} requests completed "
                      "by it and in-process have identical tokens")
    tag = "_kill" if a.kill_at is not None else ""
    out = out_dir(a.publish) / f"http_load{tag}_{Path(a.model).name}.json"
    if a.kill_at is not None:
        plot_kill(got, out.with_suffix(".png"))
    out.write_text(json.dumps({"benchmark": "http_load", "model": a.model, "clients": a.clients,
                               "duration_s": a.duration, "max_sequences": a.max_sequences, "rounds": a.rounds,
                               "environment": environment(a.threads),
                               "summary": summary, "identical_outputs": agree,
                               "rounds_raw": {k: [{kk: vv for kk, vv in r.items() if kk != "outputs"} for r in rs]
                                              for k, rs in got.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
