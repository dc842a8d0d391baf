"""An OpenAI-compatible HTTP server over Engines (`kvcache-infer serve`, extra `[serve]`).

    POST /v1/completions   prompt as text or token ids (or a list of them), max_tokens, temperature,
                           top_p, top_k, seed, stop, stream (server-sent events), user (session key)
    GET  /v1/models        the served model
    GET  /health           200 while requests can be served (no key needed)
    GET  /metrics          Prometheus text: tokens, requests, latencies, and per engine: queue, cache,
                           prefix cache

The app talks to a backend.Backend: one Engine in this process (LocalBackend: one thread owns the
Engine and ticks its scheduler, continuous batching) or Engine replicas on Ray Serve (ray_serve.py).
Events come back through one asyncio queue per request. A client that disconnects, or a request past
its timeout, cancels its sequences and frees their slots at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from .api import Choice, CompletionRequest, HTTPError, ServeLimits, parse_completion
from .backend import Backend, LocalBackend
from ..engine import Engine
from .worker import ServerMetrics


def create_app(engine: Engine | Backend, *, model_name: str | None = None, limits: ServeLimits = ServeLimits()):
    """A Starlette app serving `engine` (an Engine in this process, or a Backend); its lifespan starts
    and stops the backend."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    class ClosingStream(StreamingResponse):
        """Runs on_close when the response ends for any reason (a client that went away included),
        so that its requests are cancelled at once rather than when the generator is collected."""

        def __init__(self, content, on_close, **kw):
            super().__init__(content, **kw)
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    backend = engine if isinstance(engine, Backend) else LocalBackend(engine, name=model_name, max_queue=limits.max_queue)
    metrics = ServerMetrics()
    api_key = limits.api_key.encode() if limits.api_key else None
    served = {}                                  # "model", "tokenizer": set when the backend has started

    def error(e: HTTPError) -> JSONResponse:
        metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return hmac.compare_digest(token.strip().encode(), api_key) and scheme.lower() == "bearer"

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise HTTPError(413, f"the body is {declared} bytes; at most {limits.max_body_bytes}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise HTTPError(413, f"the body exceeds {limits.max_body_bytes} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None

    def encode(c: CompletionRequest) -> list:
        """Each prompt's token ids (text through the tokenizer, here, once), checked against the limits
        in the request's terms; the engines get ids only."""
        model, tok = served["model"], served["tokenizer"]
        if c.stop and tok is None:
            raise HTTPError(400, "`stop` strings need a model with a tokenizer; use stop_token_ids", param="stop")
        max_prompt = limits.max_prompt_tokens or model.max_seq_len - 1
        out = []
        for p in c.prompts:
            if isinstance(p, str):
                if tok is None:
                    raise HTTPError(400, f"model {model.name!r} has no tokenizer: send the prompt as token ids",
                                    param="prompt")
                p = tok.encode(p).ids
                if not p:
                    raise HTTPError(400, "the prompt encodes to no tokens", param="prompt")
            bad = next((t for t in p if not 0 <= t < model.vocab_size), None)
            if bad is not None:
                raise HTTPError(400, f"token id {bad} is outside the vocabulary [0, {model.vocab_size})", param="prompt")
            if len(p) > max_prompt:
                raise HTTPError(400, f"the prompt has {len(p)} tokens; this server takes at most {max_prompt}",
                                param="prompt")
            if len(p) + c.max_tokens - 1 > model.max_seq_len:
                raise HTTPError(400, f"the prompt ({len(p)} tokens) and max_tokens={c.max_tokens} need "
                                f"{len(p) + c.max_tokens - 1} positions; the context is {model.max_seq_len}: "
                                f"lower max_tokens to at most {model.max_seq_len - len(p) + 1}", param="max_tokens")
            out.append(list(p))
        bad = next((t for t in c.sampling["stop_ids"] if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise HTTPError(400, f"stop token id {bad} is outside the vocabulary [0, {model.vocab_size})",
                            param="stop_token_ids")
        return out

    async def completions(request: Request):
        arrived = time.perf_counter()
        if not authorized(request):
            return error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"))
        try:
            c = parse_completion(await read_json(request), served["model"].name, limits)
            prompts = encode(c)
            left = arrived + limits.request_timeout_s - time.perf_counter()
            try:
                comp = await asyncio.wait_for(backend.submit(prompts, c.max_tokens, c.sampling, c.user),
                                              max(left, 0.001))     # (Ray: a replica may be restarting)
            except asyncio.TimeoutError:
                raise HTTPError(504, f"the request took longer than {limits.request_timeout_s:g} s",
                                "timeout_error") from None
        except HTTPError as e:
            return error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        choices = [Choice(i, len(p), c.stop, served["tokenizer"]) for i, p in enumerate(prompts)]
        cid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), served["model"].name
        deadline = arrived + limits.request_timeout_s
        headers = {"X-Kvcache-Replica": comp.replica} if comp.replica else {}

        async def events():
            """(choice, text, ids, finish) as the engines produce them; cancels what is left on exit."""
            open_, checked = set(range(len(choices))), time.perf_counter()
            try:
                while open_:
                    now = time.perf_counter()
                    if not c.stream and now - checked > 0.5:      # (a stream notices when a send fails)
                        checked = now
                        if await request.is_disconnected():
                            return
                    left = deadline - now
                    if left <= 0:
                        raise HTTPError(504, f"the request took longer than {limits.request_timeout_s:g} s",
                                        "timeout_error")
                    ev = await comp.get(min(left, 0.5))
                    if ev is None:
                        continue
                    i, kind, value = ev
                    ch = choices[i]
                    if i not in open_:
                        continue
                    if kind == "token":
                        now = time.perf_counter()
                        metrics.on_token(arrived, ch.last_at, now)
                        ch.last_at = now
                        text, ids = ch.push(value)
                        if ch.finish is not None:          # a stop string: this prompt ends here
                            comp.cancel(i)
                            open_.discard(i)
                            metrics.on_finish(ch.finish)
                        yield ch, text, ids, ch.finish
                    elif kind == "done":
                        reason, ch.cached_tokens = value
                        open_.discard(i)
                        text = ch.close(reason)
                        metrics.on_finish(ch.finish)
                        yield ch, text, [], ch.finish
                    else:
                        status, message = value
                        open_.discard(i)
                        metrics.on_finish("error")
                        raise HTTPError(status, message, "server_error",
                                        headers={"Retry-After": "1"} if status in (429, 503) else None)
            finally:
                if open_:                                  # the client went away, a timeout or an error
                    comp.cancel()
                    for _ in open_:
                        metrics.on_finish("cancelled")

        def usage() -> dict:
            out = sum(len(ch.ids) for ch in choices)
            inp = sum(ch.prompt_tokens for ch in choices)
            return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
                    "prompt_tokens_details": {"cached_tokens": sum(ch.cached_tokens for ch in choices)}}

        def chunk(ch, text, ids, finish) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": ch.index, "text": text, "token_ids": ids, "logprobs": None,
                                 "finish_reason": finish}]}

        if c.stream:
            async def sse():
                try:
                    async for ch, text, ids, finish in events():
                        if text or ids or finish:
                            yield f"data: {json.dumps(chunk(ch, text, ids, finish))}\n\n"
                    if c.include_usage:
                        yield f"data: {json.dumps({'id': cid, 'object': 'text_completion', 'created': created, 'model': name, 'choices': [], 'usage': usage()})}\n\n"
                except HTTPError as e:
                    metrics.rejected.labels(str(e.status)).inc()
                    yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
            return ClosingStream(sse(), on_close=comp.cancel, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        try:
            async for _ in events():
                pass
        except HTTPError as e:
            return error(e)
        if not all(ch.finish for ch in choices):
            return Response(status_code=499)                   # the client went away
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": ch.index, "text": ch.full_text, "token_ids": ch.ids, "logprobs": None,
                         "finish_reason": ch.finish} for ch in choices],
            "usage": usage()}, headers=headers)

    async def models(request: Request):
        if not authorized(request):
            return error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"))
        m = served["model"]
        return JSONResponse({"object": "list", "data": [{
            "id": m.name, "object": "model", "created": m.created, "owned_by": "kvcache-infer",
            "max_model_len": m.max_seq_len, "vocab_size": m.vocab_size, "tokenizer": m.tokenizer_json is not None}]})

    async def health(request: Request):
        ok = await backend.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def metrics_route(request: Request):
        if not authorized(request):
            return error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"))
        body, ctype = metrics.render(await backend.snapshots())
        return Response(body, media_type=ctype)

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        served["model"] = backend.model
        served["tokenizer"] = backend.model.tokenizer()
        try:
            yield
        finally:
            await backend.stop()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", models), Route("/health", health),
                            Route("/metrics", metrics_route)], lifespan=lifespan)
    app.state.backend, app.state.metrics = backend, metrics
    app.state.engine = engine if isinstance(engine, Engine) else None
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          limits: ServeLimits = ServeLimits(), shutdown_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serves until SIGTERM/SIGINT: then stops accepting, lets in-flight requests finish for up to
    shutdown_timeout_s, cancels the rest and returns (a second signal cuts the wait short). uvicorn runs
    in a thread so that the signals stay ours (uvicorn's own handling re-raises them on exit)."""
    import signal
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

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        thread = threading.Thread(target=server.run, name="uvicorn")
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the log above)")
