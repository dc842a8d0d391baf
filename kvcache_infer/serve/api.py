"""The OpenAI completions request and response pieces of `kvcache-infer serve`: limits, errors, field
checks (a field the server cannot honour is a 400, never ignored), and one choice's text as tokens
arrive (stop strings cut it). No web framework here: app.py wires these to HTTP."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import CapacityError, KVCacheError
from ..runtime.generation import IncrementalText


@dataclass(frozen=True)
class ServeLimits:
    """What one client may ask of the server."""

    max_queue: int = 256               # requests waiting for a slot; past it: 429 with Retry-After
    max_body_bytes: int = 1 << 20      # request body; past it: 413
    max_prompt_tokens: int | None = None    # default: max_seq_len - 1
    max_prompts: int = 16              # prompts in one request (a list prompt)
    request_timeout_s: float = 600.0   # from arrival to the last token; past it the request is cancelled
    api_key: str | None = None         # every route but /health needs `Authorization: Bearer KEY`


class HTTPError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def retry_later(status: int, message: str, kind: str = "server_error", after_s: int = 1) -> HTTPError:
    """A refusal the client may retry (429: busy, 503: unavailable) after `after_s` seconds."""
    return HTTPError(status, message, kind, headers={"Retry-After": str(after_s)})


def refused(e: KVCacheError) -> HTTPError:
    """The engine's refusal of a request (Engine.make_request: token ids outside the vocabulary, a prompt
    and max_tokens past the context, ...) as a 400; the engine's check is the only one."""
    return HTTPError(400, str(e), param="max_tokens" if isinstance(e, CapacityError) else None)


def _is_int(v) -> bool:
    """A JSON integer (true and false are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(body: dict, name: str, ok, expected: str, default=None):
    """body[name], or `default` where it is absent or null; a 400 naming the field unless ok(value)."""
    v = body.get(name, default)
    if v is None:
        return default
    if not ok(v):
        raise HTTPError(400, f"`{name}` must be {expected}, got {json.dumps(v)[:80]}", param=name)
    return v


def _prompts(body: dict) -> list:
    """The request's prompts: a text, a list of ids, or a list of either."""
    p = body.get("prompt")
    ids = lambda x: isinstance(x, list) and x and all(map(_is_int, x))
    if isinstance(p, str) or ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or ids(x) for x in p):
        return list(p)
    raise HTTPError(400, "`prompt` must be a non-empty string, a non-empty list of token ids, or a list of those",
                    param="prompt")


@dataclass
class CompletionRequest:
    prompts: list
    max_tokens: int
    sampling: dict
    stop: list[str]
    stream: bool
    include_usage: bool
    user: str | None


def parse_completion(body: Any, model_name: str, limits: ServeLimits) -> CompletionRequest:
    """The OpenAI completions fields this server implements; a field it cannot honour is a 400."""
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise HTTPError(404, f"model {model!r} is not served here; this server serves {model_name!r}",
                        param="model")
    prompts = _prompts(body)
    if len(prompts) > limits.max_prompts:
        raise HTTPError(400, f"{len(prompts)} prompts in one request; at most {limits.max_prompts}", param="prompt")
    max_tokens = _field(body, "max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1", 16)
    sampling = {
        "temperature": float(_field(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2,
                                    "a number in [0, 2]", 1.0)),
        "top_p": _field(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": _field(body, "top_k", lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1: all)"),
        "seed": _field(body, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "stop_ids": _field(body, "stop_token_ids", lambda v: isinstance(v, list) and all(isinstance(t, int) for t in v),
                           "a list of token ids", []),
    }
    if sampling["top_k"] == -1:
        sampling["top_k"] = None
    if sampling["top_p"] is not None:
        sampling["top_p"] = float(sampling["top_p"])
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise HTTPError(400, "`stop` must be a non-empty string or a list of at most 4 of them", param="stop")
    for name, ok in (("n", lambda v: v == 1), ("best_of", lambda v: v == 1), ("echo", lambda v: v is False),
                     ("logprobs", lambda v: False), ("suffix", lambda v: False),
                     ("frequency_penalty", lambda v: v == 0), ("presence_penalty", lambda v: v == 0),
                     ("logit_bias", lambda v: not v)):
        if body.get(name) is not None and not ok(body[name]):
            raise HTTPError(400, f"`{name}`={json.dumps(body[name])[:40]} is not supported by this server",
                            param=name)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    opts = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    user = _field(body, "user", lambda v: isinstance(v, str), "a string")
    return CompletionRequest(prompts, max_tokens, sampling, stop, stream, bool(opts.get("include_usage")), user)


class Choice:
    """One prompt's completion as it arrives: token ids in, text out (stop strings cut the text)."""

    def __init__(self, index: int, prompt_tokens: int, stops: list[str], tokenizer):
        self.index, self.prompt_tokens, self.stops = index, prompt_tokens, stops
        self.cached_tokens = 0                   # prompt tokens the engine took from its prefix cache
        self.last_at: float | None = None        # when the latest token arrived (perf_counter)
        self.text = IncrementalText(tokenizer) if tokenizer is not None else None
        self.buffer, self.sent = "", 0           # decoded text; how much of it went out
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.finish: str | None = None

    def push(self, token: int) -> tuple[str, list[int]]:
        """A new token -> (text that may go out now, its ids). Sets finish on a stop string."""
        self.ids.append(token)
        if self.text is None:
            return "", [token]
        self.buffer += self.text.push(token)
        return self._release(final=False), [token]

    def close(self, reason: str) -> str:
        if self.text is not None and self.finish is None:
            self.buffer += self.text.flush()
            out = self._release(final=True)
        else:
            out = ""
        self.finish = self.finish or reason
        return out

    def _release(self, final: bool) -> str:
        if self.finish is not None:
            return ""
        for s in self.stops:
            at = self.buffer.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.buffer, self.finish = self.buffer[:at], "stop"
                final = True
        end = len(self.buffer) if final else max(self.sent, len(self.buffer) - self.hold)
        out, self.sent = self.buffer[self.sent:end], end
        return out

    @property
    def full_text(self) -> str:
        return self.buffer
