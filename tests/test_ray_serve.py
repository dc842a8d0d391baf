"""`kvcache-infer serve --replicas 2`: Engine replicas on Ray Serve (a local Ray instance, loopback only).
A session's turns land on one replica and its second turn adopts the first's tokens from that replica's
prefix cache; a replica killed under load: every request completes or gets a retryable error, none
hangs, and the replica comes back and takes sessions again."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kvcache_infer import Engine  # noqa: E402

CLI = [sys.executable, "-m", "kvcache_infer.cli"]
SESSIONS = [f"s{k}" for k in range(12)]   # on 2 replicas of 16 slots: both get some (all on one: p = 2^-11),
                                          # and no first turn is evicted before its second, whatever the split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_waits_for_every_replica_and_sigterm_to_the_process_group_stops_within_the_timeout(tmp_path):
    """Straight after start-up, as soon as /health answers 200: the README's three-turn block, every later
    turn adopting its earlier turns (no replica joins the hash ring after /health says ready, so the
    session stays put); then SIGTERM to the whole process group (systemd's default KillMode), which
    stops Ray's own processes too: the server exits within --shutdown-timeout + 5 s. (Runs before the
    module's cluster starts: one local Ray instance at a time.)"""
    port, log, timeout = free_port(), tmp_path / "serve.log", 5
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "serve", "--replicas", "2", "--threads", "1", "--port", str(port),
                                 "--shutdown-timeout", str(timeout)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < 240, f"never healthy:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        c = client(url)
        history, previous = "def parse(line):\n", None
        for turn in range(3):
            r = c.completions.create(model="pybytes", prompt=history, max_tokens=40, temperature=0, user="session-42")
            if previous is not None:
                assert r.usage.prompt_tokens_details.cached_tokens >= previous, (turn, r.usage, previous)
            previous = r.usage.prompt_tokens
            history += r.choices[0].text + "\n# next\n"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout + 5)
        assert time.monotonic() - t0 < timeout + 5
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # whatever of Ray is left in the group
        except ProcessLookupError:
            pass
        proc.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`kvcache-infer serve --replicas 2` in its own process group; yields its URL."""
    port, log = free_port(), tmp_path_factory.mktemp("ray") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "serve", "--replicas", "2", "--threads", "1", "--port", str(port),
                                 "--max-sequences", "16", "--request-timeout", "60", "--shutdown-timeout", "5"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while "ready on" not in log.read_text():
            assert proc.poll() is None, f"serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < 240, f"serve did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(url: str, prompt: str, user: str, max_tokens: int = 12) -> tuple[str, dict]:
    """(the replica that served it, the response body), greedy."""
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "user": user})
    assert r.status_code == 200, r.text
    return r.headers["x-kvcache-replica"], r.json()


def metric(text: str, name: str) -> dict[str, float]:
    """{replica: value} of one per-replica metric."""
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}{{replica="([^"]+)"}} (\S+)$', text, re.M)}


def replicas() -> set[str]:
    return {a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
            if "#EngineReplica#" in a["name"]}


def test_a_session_stays_on_its_replica_and_its_second_turn_hits_the_prefix_cache(cluster):
    url, _, _ = cluster
    reference = Engine("pybytes", max_sequences=4, intra_op_threads=1)
    first = {u: complete(url, f"# session {u}\ndef handler_{u}(event):\n", u) for u in SESSIONS}
    want = reference.generate([f"# session {u}\ndef handler_{u}(event):\n" for u in SESSIONS], 12)
    assert [first[u][1]["choices"][0]["text"] for u in SESSIONS] == want      # same as Engine.generate
    before = httpx.get(url + "/metrics").text
    for u in SESSIONS:
        replica, body = first[u]
        prompt = f"# session {u}\ndef handler_{u}(event):\n" + body["choices"][0]["text"] + "\n    return"
        again, second = complete(url, prompt, u)
        assert again == replica, f"session {u}: turn 1 on {replica}, turn 2 on {again}"
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= body["usage"]["prompt_tokens"], (u, cached, body["usage"])
    after = httpx.get(url + "/metrics").text
    served = {r for r, _ in first.values()}
    assert len(served) == 2 and set(metric(after, "kvcache_prefix_cache_hits_total")) == served
    hits = {r: metric(after, "kvcache_prefix_cache_hits_total")[r] - metric(before, "kvcache_prefix_cache_hits_total").get(r, 0)
            for r in served}
    per_replica = Counter(r for r, _ in first.values())
    assert hits == {r: float(per_replica[r]) for r in served}, (hits, per_replica)   # every second turn, on its replica


def test_a_replica_killed_under_load_fails_no_request_silently_and_comes_back(cluster):
    url, _, _ = cluster
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        outcomes, stop = [], time.monotonic() + 20

        def load(k: int):
            c = client(url)
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    got = [ch.choices[0].finish_reason for ch in c.completions.create(
                        model="pybytes", prompt=f"def load_{k}():\n", max_tokens=48, temperature=0, stream=True,
                        user=f"load{k}") if ch.choices]
                    outcomes.append(("ok" if got[-1] == "length" and len(got) >= 2 else f"short {got}",
                                     time.monotonic() - t0, k, t0))
                except openai.APIStatusError as e:
                    outcomes.append((f"status {e.status_code}: {e.message}", time.monotonic() - t0, k, t0))
                except openai.APIError as e:        # an error event in the stream
                    outcomes.append((f"error: {e.message}", time.monotonic() - t0, k, t0))

        home = {k: complete(url, "x", f"load{k}", 1)[0] for k in range(8)}
        old = replicas()
        victim = Counter(home.values()).most_common(1)[0][0]       # the replica with the most load sessions
        assert victim in old, (victim, old)
        threads = [threading.Thread(target=load, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(6)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::kvcache-infer#EngineReplica#{victim}", namespace="serve"),
                 no_restart=True)
        killed_at = time.monotonic()
        gone = time.monotonic() + 30                               # the kill hit the replica
        while victim in replicas():
            assert time.monotonic() < gone, f"{victim} is still listed after ray.kill"
            time.sleep(0.2)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hangs"
        kinds = Counter("ok" if o == "ok" else "retryable" if "retry" in o else o for o, *_ in outcomes)
        assert set(kinds) <= {"ok", "retryable"}, kinds
        assert kinds["ok"] >= 8 and max(s for _, s, *_ in outcomes) < 60, (kinds, max(s for _, s, *_ in outcomes))
        orphans = {k for k, r in home.items() if r == victim}        # sessions of the killed replica ...
        assert any(o == "ok" and k in orphans and t0 > killed_at for o, _, k, t0 in outcomes), \
            "no session of the killed replica was served after the kill"     # ... served elsewhere since

        t0 = time.monotonic()
        while not (len(replicas()) == 2 and victim not in replicas()):
            assert time.monotonic() - t0 < 120, f"no replacement replica: {replicas()}"
            time.sleep(0.5)
        fresh = (replicas() - old).pop()
        t0 = time.monotonic()
        while True:                      # sessions move to the new replica once the router knows it
            served = {complete(url, f"print({u!r})\n", u, 4)[0] for u in SESSIONS}
            if fresh in served:
                break
            assert time.monotonic() - t0 < 60, f"the new replica {fresh} gets no sessions: {served}"
            time.sleep(1)
        assert served <= replicas()
    finally:
        ray.shutdown()


def test_sigterm_stops_ray_serve_cleanly(cluster):
    url, proc, log = cluster
    assert httpx.get(url + "/health").status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, log.read_text()[-3000:]
    assert "stopping" in log.read_text()


def test_replica_options_are_checked_in_option_terms():
    for args, says in ((["--replicas", "0"], "--replicas must be >= 1"),
                       (["--address", "auto"], "--address names a Ray cluster for --replicas")):
        r = subprocess.run([*CLI, "serve", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr, (r.returncode, r.stderr)


def test_the_serve_run_builder_takes_the_cli_options_by_name():
    from ray.serve import Application

    from kvcache_infer.errors import KVCacheError
    from kvcache_infer.serve.ray_serve import app
    assert isinstance(app({"model": "pybytes", "replicas": "2", "threads": "1", "prefix_cache": "false",
                           "max_seq_len": "128", "request_timeout_s": "30", "api_key": "k"}), Application)
    with pytest.raises(KVCacheError, match="unknown argument"):
        app({"model": "pybytes", "replica": "2"})
