"""An OpenAI-compatible HTTP server over Engines (`kvcache-infer serve`, extra `[serve]`).

    POST /v1/completions   prompt as text or token ids (or a list of them), max_tokens, temperature,
                           top_p, top_k, seed, stop, stream (server-sent events), user (session key)
    GET  /v1/models        the served model
    GET  /health           200 while requests can be served (no key needed)
    GET  /metrics          Prometheus text: tokens, requests, latencies, and per engine: queue, cache,
                           prefix cache

The app talks to a backend.Backend: one Engine in this process (LocalBackend: one thread owns the
Engine and ticks it, continuous batching) or Engine replicas on Ray Serve (ray_serve.py). Events come
back through one asyncio queue per request. A client that disconnects, or a request past its timeout,
cancels its sequences and frees their slots at the next step.

Handlers holds what the routes share (the backend, limits, metrics, API key, the served model) and
has one method per route; Reply turns one accepted request's events into its response.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import signal
import time
import uuid
from contextlib import asynccontextmanager, contextmanager

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api import Choice, CompletionRequest, HTTPError, ServeLimits, parse_completion, retry_later
from .backend import Backend, Completion, LocalBackend
from ..engine import Engine
from .worker import ServerMetrics

POLL_S = 0.5        # a handler waiting for events looks at its deadline (and, not streaming, its client) this often


class ClosingStream(StreamingResponse):
    """Runs on_close when the response ends for any reason (a client that went away included), so that
    its requests are cancelled at once rather than when the generator is collected."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def keyed(route):
    """`route` behind the API key, when the server has one: a 401 without it."""
    @functools.wraps(route)
    async def guarded(self: Handlers, request: Request):
        if not self.authorized(request):
            return self.error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                        "authentication_error"))
        return await route(self, request)
    return guarded


class Handlers:
    """The routes over one backend, and what they share."""

    def __init__(self, backend: Backend, limits: ServeLimits):
        self.backend, self.limits = backend, limits
        self.metrics = ServerMetrics()
        self.api_key = limits.api_key.encode() if limits.api_key else None
        self.model = self.tokenizer = None            # the backend's ServedModel and its tokenizer, once started

    @asynccontextmanager
    async def lifespan(self, app):
        await self.backend.start()
        self.model = self.backend.model
        self.tokenizer = self.model.tokenizer()
        try:
            yield
        finally:
            await self.backend.stop()

    # -- shared pieces ----------------------------------------------------------------------------------
    def error(self, e: HTTPError) -> JSONResponse:
        self.metrics.on_rejected(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def timeout(self) -> HTTPError:
        return HTTPError(504, f"the request took longer than {self.limits.request_timeout_s:g} s", "timeout_error")

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return hmac.compare_digest(token.strip().encode(), self.api_key) and scheme.lower() == "bearer"

    async def read_json(self, request: Request):
        """The body as JSON, read up to limits.max_body_bytes (413 past it)."""
        most = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > most:
            raise HTTPError(413, f"the body is {declared} bytes; at most {most}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > most:
                raise HTTPError(413, f"the body exceeds {most} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None

    def encode(self, c: CompletionRequest) -> list:
        """Each prompt's token ids (text through the tokenizer, here, once: the engines get ids only),
        within the server's prompt limit. The engine checks the ids, stop ids and the context: its
        refusal comes back from backend.submit as a 400 (api.refused)."""
        model, tok = self.model, self.tokenizer
        if c.stop and tok is None:
            raise HTTPError(400, "`stop` strings need a model with a tokenizer; use stop_token_ids", param="stop")
        max_prompt = self.limits.max_prompt_tokens or model.max_seq_len - 1
        out = []
        for p in c.prompts:
            if isinstance(p, str):
                if tok is None:
                    raise HTTPError(400, f"model {model.name!r} has no tokenizer: send the prompt as token ids",
                                    param="prompt")
                p = tok.encode(p).ids
            if len(p) > max_prompt:
                raise HTTPError(400, f"the prompt has {len(p)} tokens; this server takes at most {max_prompt}",
                                param="prompt")
            out.append(list(p))
        return out

    async def submit(self, c: CompletionRequest, prompts: list, arrived: float) -> Completion:
        """The backend's Completion of the request, waited for until the request's deadline (on Ray a
        replica may be restarting)."""
        left = arrived + self.limits.request_timeout_s - time.perf_counter()
        try:
            return await asyncio.wait_for(self.backend.submit(prompts, c.max_tokens, c.sampling, c.user),
                                          max(left, 0.001))
        except asyncio.TimeoutError:
            raise self.timeout() from None

    # -- routes -----------------------------------------------------------------------------------------
    @keyed
    async def completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            c = parse_completion(await self.read_json(request), self.model.name, self.limits)
            prompts = self.encode(c)
            comp = await self.submit(c, prompts, arrived)
        except HTTPError as e:
            return self.error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        reply = Reply(self, c, prompts, comp, arrived)
        return reply.stream(request) if c.stream else await reply.whole(request)

    @keyed
    async def models(self, request: Request) -> Response:
        m = self.model
        return JSONResponse({"object": "list", "data": [{
            "id": m.name, "object": "model", "created": m.created, "owned_by": "kvcache-infer",
            "max_model_len": m.max_seq_len, "vocab_size": m.vocab_size, "tokenizer": m.tokenizer_json is not None}]})

    async def health(self, request: Request) -> Response:
        ok = await self.backend.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @keyed
    async def metrics_text(self, request: Request) -> Response:
        body, ctype = self.metrics.render(await self.backend.snapshots())
        return Response(body, media_type=ctype)


class Reply:
    """One accepted completions request: its choices as the backend's events fill them, sent as one JSON
    body or as server-sent events."""

    def __init__(self, handlers: Handlers, c: CompletionRequest, prompts: list, comp: Completion, arrived: float):
        self.handlers, self.metrics, self.c, self.comp = handlers, handlers.metrics, c, comp
        self.choices = [Choice(i, len(p), c.stop, handlers.tokenizer) for i, p in enumerate(prompts)]
        self.open = set(range(len(self.choices)))      # the prompts still generating
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), handlers.model.name
        self.arrived, self.deadline = arrived, arrived + handlers.limits.request_timeout_s
        self.headers = {"X-Kvcache-Replica": comp.replica} if comp.replica else {}

    async def events(self, request: Request):
        """(choice, text, ids, finish) as the engines produce them; cancels what is left on exit."""
        checked = time.perf_counter()
        try:
            while self.open:
                now = time.perf_counter()
                if not self.c.stream and now - checked > POLL_S:      # (a stream notices when a send fails)
                    checked = now
                    if await request.is_disconnected():
                        return
                left = self.deadline - now
                if left <= 0:
                    raise self.handlers.timeout()
                ev = await self.comp.get(min(left, POLL_S))
                if ev is not None and ev[0] in self.open:
                    yield self.take(*ev)
        finally:
            if self.open:                                  # the client went away, a timeout or an error
                self.comp.cancel()
                for _ in self.open:
                    self.metrics.on_finish("cancelled")

    def take(self, i: int, kind: str, value) -> tuple:
        """One backend event (see backend.py) applied to choice i: (choice, text, ids, finish)."""
        ch = self.choices[i]
        if kind == "token":
            now = time.perf_counter()
            self.metrics.on_token(self.arrived, ch.last_at, now)
            ch.last_at = now
            text, ids = ch.push(value)
            if ch.finish is not None:                      # a stop string: this prompt ends here
                self.comp.cancel(i)
                self.end(i, ch.finish)
            return ch, text, ids, ch.finish
        if kind == "done":
            reason, ch.cached_tokens = value
            text = ch.close(reason)
            self.end(i, ch.finish)
            return ch, text, [], ch.finish
        status, message = value
        self.end(i, "error")
        raise retry_later(status, message) if status in (429, 503) else HTTPError(status, message, "server_error")

    def end(self, i: int, reason: str) -> None:
        self.open.discard(i)
        self.metrics.on_finish(reason)

    def usage(self) -> dict:
        out = sum(len(ch.ids) for ch in self.choices)
        inp = sum(ch.prompt_tokens for ch in self.choices)
        return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
                "prompt_tokens_details": {"cached_tokens": sum(ch.cached_tokens for ch in self.choices)}}

    def body(self, choices: list, **extra) -> dict:
        """A response body or stream chunk with these choices ({index, text, token_ids, logprobs,
        finish_reason} each)."""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    @staticmethod
    def choice(ch: Choice, text: str, ids: list, finish: str | None) -> dict:
        return {"index": ch.index, "text": text, "token_ids": ids, "logprobs": None, "finish_reason": finish}

    def stream(self, request: Request) -> Response:
        """Server-sent events: a chunk per piece of text, the usage (stream_options.include_usage), then
        [DONE]; an error after the first byte is an error event."""
        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            try:
                async for ch, text, ids, finish in self.events(request):
                    if text or ids or finish:
                        yield event(self.body([self.choice(ch, text, ids, finish)]))
                if self.c.include_usage:
                    yield event(self.body([], usage=self.usage()))
            except HTTPError as e:
                self.metrics.on_rejected(e.status)
                yield event(e.body())
            yield "data: [DONE]\n\n"
        return ClosingStream(sse(), on_close=self.comp.cancel, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **self.headers})

    async def whole(self, request: Request) -> Response:
        """One JSON body once every prompt has finished (499 if the client went away first)."""
        try:
            async for _ in self.events(request):
                pass
        except HTTPError as e:
            return self.handlers.error(e)
        if not all(ch.finish for ch in self.choices):
            return Response(status_code=499)                   # the client went away
        return JSONResponse(self.body([self.choice(ch, ch.full_text, ch.ids, ch.finish) for ch in self.choices],
                                      usage=self.usage()), headers=self.headers)


def create_app(engine: Engine | Backend, *, model_name: str | None = None, limits: ServeLimits = ServeLimits()):
    """A Starlette app serving `engine` (an Engine in this process, or a Backend); its lifespan starts
    and stops the backend."""
    backend = engine if isinstance(engine, Backend) else LocalBackend(engine, name=model_name, max_queue=limits.max_queue)
    h = Handlers(backend, limits)
    app = Starlette(routes=[Route("/v1/completions", h.completions, methods=["POST"]),
                            Route("/v1/models", h.models), Route("/health", h.health),
                            Route("/metrics", h.metrics_text)], lifespan=h.lifespan)
    app.state.backend, app.state.metrics = backend, h.metrics
    app.state.engine = engine if isinstance(engine, Engine) else None
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          limits: ServeLimits = ServeLimits(), shutdown_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serves until SIGTERM/SIGINT: then stops accepting, lets in-flight requests finish for up to
    shutdown_timeout_s, cancels the rest and returns (a second signal cuts the wait short). uvicorn runs
    in a thread so that the signals stay ours (uvicorn's own handling re-raises them on exit)."""
    import threading

    import uvicorn
    app = create_app(engine, model_name=model_name, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_timeout_s,
                                           limit_concurrency=limits.max_queue + 2 * engine.max_sequences + 16))

    def stop(signum, frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    with on_signals(stop):
        thread = threading.Thread(target=server.run, name="uvicorn")
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the log above)")


@contextmanager
def on_signals(handler):
    """SIGTERM and SIGINT go to handler(signum, frame) inside the block; the previous handlers after it."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
