"""An OpenAI-compatible HTTP server over one Engine (`kvcache-infer serve`, extra `[serve]`).

    POST /v1/completions   prompt as text or token ids (or a list of them), max_tokens, temperature,
                           top_p, top_k, seed, stop, stream (server-sent events), user
    GET  /v1/models        the served model
    GET  /health           200 while the engine thread is alive (no key needed)
    GET  /metrics          Prometheus text: tokens, requests, queue, cache, prefix cache, latencies

One thread owns the Engine and ticks its scheduler while requests are in flight (continuous
batching); the HTTP side (Starlette on uvicorn, one asyncio loop) hands requests to it and gets
tokens back through one asyncio queue per request. A client that disconnects, or a request past its
timeout, cancels its sequence and frees its slot at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from .api import Choice, CompletionRequest, HTTPError, ServeLimits, parse_completion
from .engine import Engine
from .errors import KVCacheError
from .generation import encode_prompt
from .worker import EngineWorker, ServerMetrics


def create_app(engine: Engine, *, model_name: str | None = None, limits: ServeLimits = ServeLimits()):
    """A Starlette app serving `engine`; its lifespan starts and stops the engine thread."""
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

    name = model_name or engine.model.dir.name
    metrics = ServerMetrics(engine)
    worker = EngineWorker(engine, metrics, limits.max_queue)
    max_prompt = limits.max_prompt_tokens or engine.max_seq_len - 1
    api_key = limits.api_key.encode() if limits.api_key else None

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
        """Each prompt's token ids (text through the tokenizer once), checked against the limits in the
        request's terms; the engine thread gets ids only."""
        if c.stop and engine.model.tokenizer is None:
            raise HTTPError(400, "`stop` strings need a model with a tokenizer; use stop_token_ids", param="stop")
        out = []
        for p in c.prompts:
            try:
                _, toks = encode_prompt(engine.model, p)
            except KVCacheError as e:
                raise HTTPError(400, str(e), param="prompt") from None
            if len(toks) > max_prompt:
                raise HTTPError(400, f"the prompt has {len(toks)} tokens; this server takes at most {max_prompt}",
                                param="prompt")
            if len(toks) + c.max_tokens - 1 > engine.max_seq_len:
                raise HTTPError(400, f"the prompt ({len(toks)} tokens) and max_tokens={c.max_tokens} need "
                                f"{len(toks) + c.max_tokens - 1} positions; the context is {engine.max_seq_len}: "
                                f"lower max_tokens to at most {engine.max_seq_len - len(toks) + 1}", param="max_tokens")
            out.append(list(toks))
        return out

    async def completions(request: Request):
        arrived = time.perf_counter()
        if not authorized(request):
            return error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"))
        try:
            c = parse_completion(await read_json(request), name, limits)
            prompts = encode(c)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            push = lambda req, kind, value: loop.call_soon_threadsafe(queue.put_nowait, (req.id, kind, value))
            try:
                reqs = worker.submit(prompts, c.max_tokens, c.sampling, push, arrived)
            except KVCacheError as e:
                raise HTTPError(400, str(e)) from None
        except HTTPError as e:
            return error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        choices = {r.id: Choice(i, r, c.stop, engine.model.tokenizer) for i, r in enumerate(reqs)}
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        deadline = arrived + limits.request_timeout_s

        async def events():
            """(choice, text, ids, finish) as the engine produces them; cancels what is left on exit."""
            open_, checked = set(choices), time.perf_counter()
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
                    try:
                        rid, kind, value = await asyncio.wait_for(queue.get(), min(left, 0.5))
                    except asyncio.TimeoutError:
                        continue
                    ch = choices[rid]
                    if kind == "token":
                        if ch.finish is not None:
                            continue
                        text, ids = ch.push(value)
                        if ch.finish is not None:          # a stop string: the request ends here
                            worker.cancel([ch.req])
                            open_.discard(rid)
                        yield ch, text, ids, ch.finish
                    elif kind == "done":
                        if rid in open_:
                            open_.discard(rid)
                            yield ch, ch.close(value), [], ch.finish
                    else:
                        raise HTTPError(500, value, "server_error")
            finally:
                worker.cancel([ch.req for ch in choices.values() if not ch.req.done])

        def usage() -> dict:
            out = sum(len(ch.ids) for ch in choices.values())
            inp = sum(ch.req.prompt.size for ch in choices.values())
            return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}

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
            return ClosingStream(sse(), on_close=lambda: worker.cancel([ch.req for ch in choices.values()]),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in events():
                pass
        except HTTPError as e:
            return error(e)
        if not all(ch.finish for ch in choices.values()):
            return Response(status_code=499)                   # the client went away
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": ch.index, "text": ch.full_text, "token_ids": ch.ids, "logprobs": None,
                         "finish_reason": ch.finish} for ch in choices.values()],
            "usage": usage()})

    async def models(request: Request):
        if not authorized(request):
            return error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"))
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(engine.model.file.stat().st_mtime), "owned_by": "kvcache-infer",
            "max_model_len": engine.max_seq_len, "vocab_size": engine.manifest.vocab_size,
            "tokenizer": engine.model.tokenizer is not None}]})

    async def health(request: Request):
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def metrics_route(request: Request):
        if not authorized(request):
            return error(HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"))
        body, ctype = await asyncio.to_thread(metrics.render)   # reading the cache waits for a step
        return Response(body, media_type=ctype)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", models), Route("/health", health),
                            Route("/metrics", metrics_route)], lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics
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
