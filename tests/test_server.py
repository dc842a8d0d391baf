"""`kvcache-infer serve`: the OpenAI completions API over the Engine, checked through the official
`openai` client against Engine.generate, plus bad requests, keys, limits, cancellation and shutdown."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kvcache_infer import Engine, Model  # noqa: E402
from kvcache_infer.serve.app import ServeLimits, create_app  # noqa: E402

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Point:\n    def __init__(self", "for i in range(",
           "    return", "x = [", "# utils\n", "while True:\n    "]


class Server:
    """uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, engine: Engine, limits: ServeLimits = ServeLimits(), name: str = "pybytes"):
        self.app = create_app(engine, model_name=name, limits=limits)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 30, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, key: str = "unused", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def model():
    return Model("pybytes", intra_op_threads=1)


@pytest.fixture(scope="module")
def reference(model):
    return Engine(model, max_sequences=4, max_seq_len=256)


def _stream_one(client, prompt, **kw):
    text, ids, finish = "", [], None
    for chunk in client.completions.create(model="pybytes", prompt=prompt, stream=True, **kw):
        c = chunk.choices[0]
        text += c.text
        ids += c.token_ids
        finish = c.finish_reason or finish
    return text, ids, finish


def test_concurrent_streams_through_the_openai_client_equal_engine_generate(model, reference):
    eng = Engine(model, max_sequences=4, max_seq_len=256)
    greedy = reference.generate(PROMPTS, max_new_tokens=24, temperature=0)
    sampled = reference.generate(PROMPTS, max_new_tokens=24, temperature=0.8, top_k=40, seed=list(range(8)))
    with Server(eng) as srv, ThreadPoolExecutor(8) as pool:
        c = srv.client()
        g = list(pool.map(lambda p: _stream_one(c, p, max_tokens=24, temperature=0), PROMPTS))
        s = list(pool.map(lambda i: _stream_one(c, PROMPTS[i], max_tokens=24, temperature=0.8, seed=i,
                                                extra_body={"top_k": 40}), range(8)))
    assert [t for t, _, _ in g] == greedy
    assert [t for t, _, _ in s] == sampled
    assert all(f == "length" and len(ids) == 24 for _, ids, f in g + s)


def test_token_id_prompts_and_batched_prompts_without_streaming(model, reference):
    ids = [list(p.encode()) for p in PROMPTS[:3]]
    want = reference.generate(ids, max_new_tokens=12, temperature=0)
    with Server(Engine(model, max_sequences=2, max_seq_len=256)) as srv:
        r = srv.client().completions.create(model="pybytes", prompt=ids, max_tokens=12, temperature=0)
    assert [ch.token_ids for ch in sorted(r.choices, key=lambda ch: ch.index)] == want
    assert r.usage.completion_tokens == 36 and r.usage.prompt_tokens == sum(map(len, ids))


def test_stop_strings_cut_the_text_and_end_the_request(model, reference):
    full = reference.generate([PROMPTS[0]], max_new_tokens=60, temperature=0)[0]
    stop = full[5:8]                       # a string the greedy output contains
    with Server(Engine(model, max_sequences=2, max_seq_len=256)) as srv:
        c = srv.client()
        r = c.completions.create(model="pybytes", prompt=PROMPTS[0], max_tokens=60, temperature=0, stop=[stop])
        text, _, finish = _stream_one(c, PROMPTS[0], max_tokens=60, temperature=0, stop=stop)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert text == full[:full.index(stop)] and finish == "stop"


def test_bad_requests_get_4xx_and_the_next_good_one_is_right(model, reference):
    want = reference.generate([PROMPTS[1]], max_new_tokens=8, temperature=0)[0]
    good = {"model": "pybytes", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    bad = [(b"{not json", 400), (json.dumps([1, 2]), 400), (json.dumps({**good, "prompt": 5}), 400),
           (json.dumps({**good, "prompt": []}), 400), (json.dumps({**good, "max_tokens": -1}), 400),
           (json.dumps({**good, "max_tokens": "8"}), 400), (json.dumps({**good, "temperature": "hot"}), 400),
           (json.dumps({**good, "prompt": [1, 2, 256]}), 400), (json.dumps({**good, "prompt": [True]}), 400),
           (json.dumps({**good, "prompt": "x" * 300}), 400), (json.dumps({**good, "max_tokens": 10_000}), 400),
           (json.dumps({**good, "n": 2}), 400), (json.dumps({**good, "logprobs": 3}), 400),
           (json.dumps({**good, "stop": ["a"] * 5}), 400), (json.dumps({**good, "model": "gpt-4"}), 404),
           (json.dumps({**good, "seed": -3}), 400), (json.dumps({**good, "top_p": 0}), 400)]
    with Server(Engine(model, max_sequences=2, max_seq_len=256)) as srv:
        for body, status in bad:
            r = httpx.post(srv.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json=good)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        big = httpx.post(srv.url + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}")
        assert big.status_code == 413
        assert srv.app.state.engine.live == []


def test_what_the_engine_refuses_is_a_400_in_the_requests_terms(model):
    """The engine's own checks (vocabulary, stop ids, context) are the server's: each refusal is a 400
    with the engine's message, the context's naming max_tokens, and nothing of the request is queued."""
    good = {"model": "pybytes", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    bad = [({"prompt": [PROMPTS[0], [1, 2, 256]]}, None), ({"stop_token_ids": [300]}, None),
           ({"prompt": ""}, None), ({"prompt": [1] * 200, "max_tokens": 100}, "max_tokens")]
    eng = Engine(model, max_sequences=2, max_seq_len=256)
    with Server(eng) as srv:
        for change, param in bad:
            r = httpx.post(srv.url + "/v1/completions", json={**good, **change})
            assert r.status_code == 400, (change, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param, err
        assert httpx.post(srv.url + "/v1/completions", json=good).status_code == 200
        assert not eng.busy and eng.stats["sequences"] == 1
        assert 'kvcache_rejected_requests_total{status="400"} 4.0' in httpx.get(srv.url + "/metrics").text


def test_api_key(model):
    with Server(Engine(model, max_sequences=1, max_seq_len=64), ServeLimits(api_key="s3cret")) as srv:
        body = {"prompt": "a", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 401
        for h in ({"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            assert httpx.post(srv.url + "/v1/completions", json=body, headers=h).status_code == 401
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        assert srv.client("s3cret").completions.create(model="pybytes", prompt="a", max_tokens=2).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            srv.client("nope").completions.create(model="pybytes", prompt="a", max_tokens=2)


def test_a_client_that_disconnects_frees_its_slot(model):
    eng = Engine(model, max_sequences=2, max_seq_len=256)
    with Server(eng) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={"prompt": PROMPTS[0], "max_tokens": 240, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(g.startswith("data: ") for g in got)
            assert len(eng.live) == 1
        t0 = time.monotonic()
        while eng.live or eng.running_requests:
            assert time.monotonic() - t0 < 10, "the disconnected request still holds its slot"
            time.sleep(0.05)
        m = httpx.get(srv.url + "/metrics").text
        assert 'kvcache_requests_total{reason="cancelled"} 1.0' in m


def test_queue_limit_429_and_timeout_504(model):
    eng = Engine(model, max_sequences=1, max_seq_len=256, prefix_cache=False)
    with Server(eng, ServeLimits(max_queue=1, request_timeout_s=1.5)) as srv:
        body = {"prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=30)
            while not eng.running_requests:
                time.sleep(0.01)
            # No step from here until the third is answered: the first cannot finish, the second waits.
            # The lock is taken before the second arrives: taking it can wait for the engine thread
            # (it re-takes it tick after tick), and the second's 1.5 s must not run out meanwhile.
            with eng.lock:
                second = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=30)
                t0 = time.monotonic()
                while not eng.waiting_requests:
                    assert not second.done(), second.result().text
                    assert time.monotonic() - t0 < 10, "the second request never reached the queue"
                    time.sleep(0.01)
                third = httpx.post(srv.url + "/v1/completions", json=body)
            assert third.status_code == 429 and third.headers["retry-after"]
            # 250 tokens take longer than 1.5 s here only on a slow machine; either way nothing hangs
            for f in (first, second):
                r = f.result()
                assert r.status_code in (200, 504), r.text
                if r.status_code == 504:
                    assert "longer than" in r.json()["error"]["message"]
        t0 = time.monotonic()
        while eng.live or eng.busy:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)


def test_timeout_cancels_a_waiting_request(model):
    eng = Engine(model, max_sequences=1, max_seq_len=256, prefix_cache=False)
    with Server(eng, ServeLimits(request_timeout_s=0.3)) as srv:
        eng.lock.acquire()                  # the engine thread cannot step: nothing can finish in time
        try:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 5}, timeout=10)
        finally:
            eng.lock.release()
        assert r.status_code == 504
        t0 = time.monotonic()
        while eng.busy:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)


def test_models_health_and_metrics(model):
    eng = Engine(model, max_sequences=2, max_seq_len=256)
    with Server(eng) as srv:
        c = srv.client()
        assert [m.id for m in c.models.list().data] == ["pybytes"]
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        prompt = "import numpy as np\nimport os\n"
        for _ in range(2):                  # the second turn adopts the first one's retained rows
            c.completions.create(model="pybytes", prompt=prompt, max_tokens=4, temperature=0)
        m = httpx.get(srv.url + "/metrics").text
    assert "kvcache_generated_tokens_total 8.0" in m
    assert "kvcache_prefix_cache_hits_total 1.0" in m
    for name in ("kvcache_time_to_first_token_seconds_bucket", "kvcache_time_per_output_token_seconds_count",
                 "kvcache_queue_depth", "kvcache_cache_fragmentation_ratio", "kvcache_cache_occupancy_ratio",
                 "kvcache_prefix_cache_hit_ratio"):
        assert name in m


def test_speculative_server_streams_plain_greedy_tokens_and_reports_acceptance(model, reference):
    """serve --speculative lookup: through the openai client, every greedy stream equals plain decoding;
    /metrics counts the verified and kept guesses."""
    greedy = reference.generate(PROMPTS, max_new_tokens=40, temperature=0)
    with Server(Engine(model, max_sequences=4, max_seq_len=256, speculative="lookup")) as srv, \
            ThreadPoolExecutor(8) as pool:
        c = srv.client()
        got = list(pool.map(lambda p: _stream_one(c, p, max_tokens=40, temperature=0), PROMPTS))
        m = httpx.get(srv.url + "/metrics").text
    assert [t for t, _, _ in got] == greedy
    values = {ln.split()[0]: float(ln.split()[1]) for ln in m.splitlines() if ln.startswith("kvcache_")}
    assert values["kvcache_speculative_steps_total"] > 0
    assert 0 < values["kvcache_draft_tokens_accepted_total"] <= values["kvcache_draft_tokens_total"]
    assert values["kvcache_tokens_per_speculative_step"] > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_and_exits_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "KVCACHE_INFER_API_KEY": "k"}
    p = subprocess.Popen([sys.executable, "-m", "kvcache_infer.cli", "serve", "--port", str(port), "--threads", "1",
                          "--max-sequences", "2", "--shutdown-timeout", "20"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert p.poll() is None, p.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 60
            time.sleep(0.1)
        h = {"Authorization": "Bearer k"}
        started = threading.Event()

        def stream():
            ids, finish = [], None
            with httpx.stream("POST", url + "/v1/completions", headers=h, timeout=60, json={
                    "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        c = json.loads(line[6:])["choices"][0]
                        ids += c["token_ids"]
                        finish = c["finish_reason"] or finish
                        started.set()
            return ids, finish

        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(stream)
            assert started.wait(30)
            p.send_signal(signal.SIGTERM)          # in flight: it finishes, then the server exits
            ids, finish = inflight.result()
        assert len(ids) == 200 and finish == "length"
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_cli_serve_refuses_bad_options_in_option_terms():
    r = subprocess.run([sys.executable, "-m", "kvcache_infer.cli", "serve", "--max-sequences", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-sequences" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvcache_infer.cli", "serve", "--speculative", "ngram"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--speculative must be 'lookup', 'draft:PATH'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvcache_infer.cli", "serve", "--prefill-budget", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--prefill-budget must be >= 1, got 0" in r.stderr and "Traceback" not in r.stderr
