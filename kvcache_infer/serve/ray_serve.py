"""Scale-out on Ray Serve (extra `[ray]`): Engine replicas behind one OpenAI-compatible HTTP front end,
each session's requests on one replica so that its prefix cache holds the session's tokens.

    kvcache-infer serve --replicas 2 [...]                 a local Ray instance on this machine
    kvcache-infer serve --replicas 8 --address auto [...]  a running cluster (`ray start --head` here,
                                                           `ray start --address HEAD:6379` elsewhere)
    serve run kvcache_infer.serve.ray_serve:app model=M replicas=2   Ray Serve's own CLI (and config files)

Two deployments:
- EngineReplica (N replicas): one Model, one Engine, one EngineWorker thread (continuous batching,
  prefix reuse) each; `generate` streams one prompt's events (backend.py's format).
- Frontend (the HTTP ingress): the single-process app (app.create_app) over a RayBackend. It checks
  and tokenizes requests and sends each prompt through a DeploymentHandle with session_id = the
  request's `user`; Ray Serve's ConsistentHashRouter maps a session to a replica on a hash ring (a
  replica that leaves or joins moves only its own share of the sessions). A request without `user`
  gets a random key: requests spread evenly.

A replica that dies: a prompt that has not produced a token yet is sent again (at most twice more,
the ring's next replica taking the dead one's sessions); a prompt that has ends with a 503 error that
says to retry (in a stream: an error event), never a hang. Ray Serve starts a replacement replica.

/metrics: the front end's request counters and latency histograms, and each replica's engine state
labelled replica="ID", as of that replica's latest finished prompt.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException

from .api import HTTPError, ServeLimits, retry_later
from .backend import Backend, Completion, ServedModel, engine_snapshot, event_value
from ..engine import Engine
from ..errors import KVCacheError
from .worker import EngineWorker

ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
RETRIES = 2                  # a prompt whose replica dies before its first token is sent again this often


@dataclass(frozen=True)
class ReplicaOptions:
    """What each EngineReplica builds (as `kvcache-infer serve` options)."""

    model: str = "pybytes"
    name: str | None = None
    max_sequences: int = 16
    max_seq_len: int | None = None
    max_chunk: int = 64
    prefill_budget: int | None = None   # None: the Engine's default
    prefix_cache: bool = True
    threads: int | None = None
    max_queue: int = 256
    speculative: str | None = None      # "lookup" or "draft:PATH"


class EngineReplica:
    """One Engine serving prompts streamed to it by the Frontend."""

    def __init__(self, options: dict):
        o = ReplicaOptions(**options)
        self.engine = Engine(o.model, max_sequences=o.max_sequences, max_seq_len=o.max_seq_len,
                             max_chunk=o.max_chunk, prefill_budget=o.prefill_budget, prefix_cache=o.prefix_cache,
                             intra_op_threads=o.threads, speculative=o.speculative)
        self.model = ServedModel.of(self.engine, o.name)
        self.worker = EngineWorker(self.engine, o.max_queue)
        self.worker.start()
        self.id = serve.get_replica_context().replica_id.unique_id
        self._snap, self._snap_at, self._refreshing = engine_snapshot(self.engine), time.monotonic(), None

    def info(self) -> ServedModel:
        return self.model

    def ping(self) -> str:
        return self.id

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine thread died."""
        if not self.worker.alive:
            raise RuntimeError("the engine thread is not running")

    async def generate(self, prompt: list[int], max_tokens: int, sampling: dict):
        """Yields lists of events: first [("accepted", replica id)] or [("refused", (status, message,
        kind, param, headers))], then ("token", id) ... and ("done", (reason, cached_tokens)) or ("error",
        (status, message)), then [("stats", (replica id, engine snapshot))]. Cancelling the stream
        cancels the prompt."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        push = lambda req, kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        try:
            [req] = self.worker.submit([prompt], max_tokens, sampling, push, time.perf_counter())
        except HTTPError as e:
            yield [("refused", (e.status, e.message, e.kind, e.param, e.headers))]
            return
        yield [("accepted", self.id)]
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():                 # what arrived meanwhile goes in one message
                    batch.append(queue.get_nowait())
                out = [(k, event_value(req, k, v)) for k, v in batch]
                yield out
                if out[-1][0] != "token":
                    break
        finally:
            if not req.done:
                self.worker.cancel([req])
        yield [("stats", (self.id, await self._snapshot_after(time.monotonic())))]

    async def _snapshot_after(self, t: float) -> dict:
        """An engine snapshot taken after monotonic time t; prompts finishing together share one."""
        while self._snap_at < t:
            if self._refreshing is None:
                self._refreshing = asyncio.ensure_future(self._refresh())
            await asyncio.shield(self._refreshing)
        return self._snap

    async def _refresh(self) -> None:
        started = time.monotonic()
        try:
            self._snap = await asyncio.to_thread(engine_snapshot, self.engine)    # waits for a step to end
            self._snap_at = started
        finally:
            self._refreshing = None


class RayBackend(Backend):
    """Prompts to EngineReplica through a DeploymentHandle (session-affine: see the module docstring)."""

    def __init__(self, replicas):
        self.replicas = replicas
        self.stats: dict[str, dict] = {}         # replica id -> its latest engine snapshot

    async def start(self) -> None:
        self.model = await self.replicas.info.remote()

    async def stop(self) -> None:
        pass

    async def healthy(self) -> bool:
        """Every EngineReplica of this application is running (Ray Serve's deployment status HEALTHY) and
        one answers. Not while replicas are still starting: a session routed then would move to another
        replica, away from its cached prefix, when the next one joins the hash ring."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5)
            app = status.applications.get(serve.get_replica_context().app_name)
            deployment = app and app.deployments.get("EngineReplica")
            if deployment is None or deployment.status != "HEALTHY":
                return False
            await asyncio.wait_for(self.replicas.ping.remote(), 5)
            return True
        except Exception:
            return False

    async def snapshots(self):
        return [({"replica": rid}, snap) for rid, snap in sorted(self.stats.items())]

    async def _open(self, key: str, prompt, max_tokens, sampling):
        """(stream, replica id) with the prompt accepted by a replica; HTTPError when refused or when
        no replica answers."""
        for attempt in range(RETRIES + 1):
            gen = self.replicas.options(stream=True, session_id=key).generate.remote(prompt, max_tokens, sampling)
            try:
                [(kind, value)] = await gen.__anext__()
            except asyncio.CancelledError:
                gen.cancel()                          # (awaiting it does not cancel the request)
                raise
            except BackPressureError:
                raise retry_later(429, "every replica's queue is full; retry later", "rate_limit_error") from None
            except RayActorError:
                if attempt == RETRIES:
                    raise retry_later(503, "the replicas failed; retry later") from None
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except (RayError, RayServeException) as e:
                raise retry_later(503, f"no replica could take the request ({type(e).__name__}); retry later") from None
            if kind == "refused":
                status, message, err_kind, param, headers = value
                raise HTTPError(status, message, err_kind, param, headers)
            return gen, value
        raise AssertionError("unreachable")

    async def submit(self, prompts, max_tokens, sampling, session=None) -> Completion:
        key = session or uuid.uuid4().hex
        opened, pumps = [], []
        try:
            for p in prompts:
                opened.append(await self._open(key, p, max_tokens, sampling))
        except BaseException:
            for gen, _ in opened:
                gen.cancel()
            raise

        def cancel(i):
            for j in ([i] if i is not None else range(len(pumps))):
                pumps[j].cancel()

        out = Completion(cancel, replica=",".join(sorted({rid for _, rid in opened})))
        for i, (gen, rid) in enumerate(opened):
            pumps.append(asyncio.ensure_future(self._pump(out, i, gen, rid, key, prompts[i], max_tokens, sampling)))
        return out

    async def _pump(self, out: Completion, i: int, gen, rid: str, key, prompt, max_tokens, sampling) -> None:
        """Moves prompt i's events from its replica into `out`; sends the prompt again if its replica
        dies before the first token, else ends it with a retryable 503."""
        tokens, tries = 0, 0
        try:
            while True:
                try:
                    async for batch in gen:
                        for kind, value in batch:
                            if kind == "stats":
                                self.stats[value[0]] = value[1]
                            else:
                                tokens += kind == "token"
                                out.queue.put_nowait((i, kind, value))
                    return
                except RayActorError:
                    self.stats.pop(rid, None)
                    if tokens or tries == RETRIES:
                        out.queue.put_nowait((i, "error", (503, f"the replica serving this prompt failed after "
                                                           f"{tokens} tokens; retry the request")))
                        return
                    tries += 1
                    try:
                        gen, rid = await self._open(key, prompt, max_tokens, sampling)
                    except HTTPError as e:
                        out.queue.put_nowait((i, "error", (e.status, e.message)))
                        return
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as e:
            out.queue.put_nowait((i, "error", (500, f"{type(e).__name__}: {e}")))


@serve.ingress()
class Frontend:
    """The HTTP ingress: app.create_app over a RayBackend."""

    def __init__(self, replicas, limits: dict):
        self.backend, self.limits = RayBackend(replicas), ServeLimits(**limits)

    def __serve_build_asgi_app__(self):
        from .app import create_app
        return create_app(self.backend, limits=self.limits)


def build(options: ReplicaOptions, replicas: int, limits: ServeLimits = ServeLimits(),
          shutdown_timeout_s: float = 30.0, log_level: str = "warning"):
    """The Ray Serve application: `replicas` EngineReplicas (each with `options`) behind one Frontend.
    log_level: the deployments' (Ray Serve logs every request at "info")."""
    from ray.serve.config import RequestRouterConfig

    if replicas < 1:
        raise KVCacheError(f"replicas must be >= 1, got {replicas}")
    ongoing = options.max_sequences + options.max_queue + 8     # a replica's own queue refuses past this
    engine = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=replicas, max_ongoing_requests=ongoing, max_queued_requests=replicas * ongoing,
        ray_actor_options={"num_cpus": options.threads or 1},
        graceful_shutdown_timeout_s=shutdown_timeout_s, logging_config={"log_level": log_level.upper()},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                  request_router_kwargs={"num_fallback_replicas": 1}))
    front = serve.deployment(Frontend, name="Frontend").options(
        num_replicas=1, max_ongoing_requests=replicas * ongoing + 64, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=shutdown_timeout_s, logging_config={"log_level": log_level.upper()})
    return front.bind(engine.bind(asdict(options)), asdict(limits))


def app(args: dict):
    """`serve run kvcache_infer.serve.ray_serve:app model=M replicas=2 threads=1 max_sequences=16 ...`: every
    ReplicaOptions field and ServeLimits field by name."""
    kinds = {**ReplicaOptions.__annotations__, **ServeLimits.__annotations__}
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    log_level = args.pop("log_level", "info")
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise KVCacheError(f"unknown argument(s) {unknown}; expected replicas or any of {sorted(kinds)}")

    def value(k, v):
        if not isinstance(v, str) or "str" in kinds[k]:
            return v
        if "bool" in kinds[k]:
            return v.lower() in ("1", "true", "yes")
        try:
            return (float if "float" in kinds[k] else int)(v)
        except ValueError:
            raise KVCacheError(f"{k}={v!r}: expected {kinds[k]}") from None

    args = {k: value(k, v) for k, v in args.items()}
    replica = ReplicaOptions(**{k: v for k, v in args.items() if k in ReplicaOptions.__annotations__})
    limits = ServeLimits(**{k: v for k, v in args.items() if k in ServeLimits.__annotations__})
    return build(replica, replicas, limits, log_level=log_level)


def run(options: ReplicaOptions, replicas: int, limits: ServeLimits = ServeLimits(), *, host: str = "127.0.0.1",
        port: int = 8000, address: str | None = None, shutdown_timeout_s: float = 30.0, log_level: str = "warning",
        name: str = "kvcache-infer") -> None:
    """Deploys the application (on a Ray instance started here, or the cluster at `address`) and serves
    until SIGTERM/SIGINT; then in-flight requests get up to shutdown_timeout_s to finish, and the
    application is removed (a Ray instance started here is stopped too)."""
    import logging
    import threading

    import ray

    from .app import on_signals

    logging.getLogger("ray.serve").setLevel(log_level.upper())
    ray.init(address=address, include_dashboard=False, logging_level=log_level.upper(),
             **({} if address else {"num_cpus": max(os.cpu_count() or 1, replicas * (options.threads or 1))}))
    stop = threading.Event()
    try:
        with on_signals(lambda *_: stop.set()):
            serve.start(http_options={"host": host, "port": port})
            serve.run(build(options, replicas, limits, shutdown_timeout_s, log_level), name=name, route_prefix="/",
                      blocking=False)      # returns when every replica runs
            print(f"kvcache-infer serve: ready on http://{host}:{port}/v1", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
            print("kvcache-infer serve: stopping (in-flight requests finish first)", file=sys.stderr, flush=True)
    finally:
        # A signal to the whole process group (systemd's default KillMode, `kill -- -PGID`) stops Ray's
        # own processes too, and every call into Ray would then wait for them: each step gets a deadline.
        if _within(2, serve.status):
            drained = _within(shutdown_timeout_s + 2, lambda: serve.delete(name))   # the replicas drain
            if drained and not address:
                _within(10, serve.shutdown)
        if not _within(3, ray.shutdown):
            print("kvcache-infer serve: Ray's processes do not answer (stopped by the same signal?); exiting "
                  "without them", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(0)                # Ray's exit hooks would wait for the processes that are gone


def _within(seconds: float, call) -> bool:
    """Runs call() in a daemon thread; whether it returned (without raising) within `seconds`."""
    import threading
    done = threading.Event()

    def target():
        try:
            call()
            done.set()
        except Exception:
            pass
    threading.Thread(target=target, daemon=True).start()
    return done.wait(seconds)
