"""The OpenAI-compatible HTTP API of the router: /v1/models, /v1/completions, /v1/chat/completions, /health.

Runs on the router's own event loop (aiohttp next to grpc.aio) and calls the same
`RouterServicer.infer|stream|server_info` as gRPC, so keys, quotas, validation and
routing are the same whichever door a request comes through. `stream: true`
answers with Server-Sent Events (`data: {chunk}` ... `data: [DONE]`), one chunk
per token. Every answer names the tier that produced it (`tier`, and the
`x-tierline-tier` header); `tierline` adds confidence, escalation path and
whether the answer is degraded.

`n` choices are sampled each as its own request (router/choices.py; streamed chunks carry their
choice's `index`). `logprobs` are the model's own log-probabilities of the generated tokens (before
temperature and top_p, as vLLM's): completions take `logprobs: k` and answer OpenAI's legacy object
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); chat takes `logprobs: true` with
`top_logprobs: k` and answers `logprobs.content`. `max_tokens` is bounded by the model's context less
the prompt (a request without it gets the manifest's default, less when the prompt leaves less room).

Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy, the
platform's default); `attention_window` is accepted as an extension; in a stream the tokens'
logprobs come with each choice's last chunk (the one with its finish_reason), not with the chunk of
their text; the `n` choices are routed each on its own, so with sampling they may come from
different tiers (the top-level `tier` is the first choice's); penalties, `logit_bias` and
`response_format` are accepted at their neutral values only (0, {}, text), tools and functions not at
all (400 naming the parameter, as for a message carrying `tool_calls`); chat turns become the prompt through
the model's chat template (router/chat.py; the family's own puts them in its `Q:...\\nA:` format and ignores
`system` messages; `developer` messages are system ones, as OpenAI's newer models take them).
Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) and map the gRPC status
in one place (`error_body`); a stream that fails after its first chunk, for whatever reason, ends with that
body as an event, then `[DONE]`. `usage.prompt_tokens_details.cached_tokens`: the prompt's tokens the tier's
prefix cache held.

A body is at most MAX_BODY_BYTES, as sent and as decoded (413 past it), in the content codings of CONTENT_CODINGS
(415 for others: aiohttp's own decoding is off, so that br or zstd, which its parser cannot decode without optional
packages, come here instead of getting its parser's plain-text 400). What that parser refuses before any handler
runs (a header line over 8190 bytes, over 128 headers, a bad Content-Length or chunk size, a request line that is
not HTTP) aiohttp still answers itself, a plain-text 400: it offers no hook for that answer (aio-libs/aiohttp#3287).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
import zlib
from collections import deque

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from tierline_api.v1 import inference_pb2 as pb
from tierline_router.auth import AccessDenied, bearer_token
from tierline_router.cascade import paid_tokens
from tierline_router.chat import ChatTemplate, ChatTemplateError
from tierline_shared.models.tokenizer import CHAT_TEMPLATE
from tierline_shared.runtime.engine import MAX_TEMPERATURE, MIN_TEMPERATURE
from tierline_shared.transport.messaging import TierError

log = logging.getLogger("tierline.router.http")

# gRPC status name -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "FAILED_PRECONDITION": (409, "invalid_request_error"),  # e.g. cancelling a batch that has completed
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
MAX_BODY_BYTES = 1024 * 1024  # the largest request body, as sent and as decoded (aiohttp's client_max_size)
# a body larger than this is read as JSON only for a valid key: walking a big one costs the event loop (about 0.3 s a
# MiB), and without a key nobody should be able to spend that (the key of a smaller one is checked with its quota)
KEY_FIRST_BYTES = 64 * 1024
BUSY_LINGER_S = 2.0  # a connection refused with a 503 waits this long at most for its client to finish sending
BUSY_LINGERING = 256  # refused connections waiting so at once; past it they close at once
FILES_RESERVE = 256  # open files the router keeps for all but its HTTP connections (gRPC, NATS, logs, the store)
# content codings a body may come in (RFC 9110 8.4.1; x-gzip is gzip's old name) -> zlib's wbits (None: as it is)
CONTENT_CODINGS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                   "deflate": zlib.MAX_WBITS}
MAX_CODINGS = 2  # content codings one body may be put in (one is what clients send; each is decoded in turn)
SHUTDOWN_TIMEOUT_S = 1.0  # seconds a stopping router gives HTTP requests in flight, then as long for their cancelling
# parameters clients send at their neutral values even when they use none of them (LangChain always sends
# penalties of 0): accepted at exactly these, refused (400 naming the parameter) at anything else
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}}
COMMON_PARAMS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
                 "user", "attention_window", "logprobs", *NEUTRAL}
COMPLETION_PARAMS = COMMON_PARAMS | {"prompt"}
CHAT_PARAMS = COMMON_PARAMS | {"messages", "max_completion_tokens", "top_logprobs"}


class BadRequest(TierError):
    """A body the API cannot read; `param` names the offending parameter."""

    def __init__(self, param: str | None, message: str):
        super().__init__("router", "INVALID_ARGUMENT", message)
        self.param = param


class ModelNotFound(BadRequest):
    """A model this server does not serve: OpenAI's 404 `model_not_found` (the openai client's NotFoundError), where
    gRPC answers INVALID_ARGUMENT naming `model` (shared/serving/servicer.py:validate_request)."""

    def __init__(self, name: str, served: str):
        super().__init__("model", f"model: {_shown(name)} does not exist here; this server serves {_shown(served)}")
        self.status = "NOT_FOUND"


class BodyRefused(BadRequest):
    """A body refused before it is read as JSON, with the HTTP status HTTP has for it (413 too large, 415 a content
    coding not served) and no gRPC status has: INVALID_ARGUMENT where the router counts it."""

    def __init__(self, http_status: int, code: str, message: str):
        super().__init__(None, message)
        self.http_status, self.code = http_status, code


def coding_refused(message: str) -> BodyRefused:
    """415: a body in content codings this server does not decode (`message` names content-encoding)."""
    return BodyRefused(415, "unsupported_content_encoding", message)


def _stalled(idle_s: float) -> BodyRefused:
    """408: the body stopped arriving (router.http_read_timeout_ms with no byte of it)."""
    return BodyRefused(408, "request_timeout", f"the body stopped arriving: nothing of it for {idle_s:g} s "
                                               "(router.http_read_timeout_ms)")


def _too_large(what: str = "") -> BodyRefused:
    return BodyRefused(413, "request_too_large", f"the body{what} is over this server's limit of {MAX_BODY_BYTES} "
                                                 f"bytes ({MAX_BODY_BYTES / 2**20:g} MiB)")


_FIELD = re.compile(r"^(?:parameters\.)?([a-z_]+): ")  # "parameters.max_tokens: ..." from the platform's validation
# a prompt that leaves no room in the context (shared/runtime/engine.py:Engine.check, servicer.validate), whatever
# max_tokens: OpenAI's code `context_length_exceeded`, naming the prompt (chat: `messages`)
_CONTEXT_FULL = re.compile(r"^prompt: .*maximum context length is \d+ tokens")


def _client_names(chat: bool, body=None) -> dict[str, str]:
    """The platform's field names that a client's body spells otherwise: a chat client's prompt is its `messages`
    and its max_tokens its `max_completion_tokens` when it sent that one (the one in effect); a completions
    client's top_logprobs is its `logprobs`."""
    if not chat:
        return {"top_logprobs": "logprobs"}
    used = isinstance(body, dict) and body.get("max_completion_tokens") is not None
    return {"prompt": "messages", **({"max_tokens": "max_completion_tokens"} if used else {})}


def _openai_error(exc: TierError, chat: bool = False, body=None) -> tuple[str, str | None]:
    """The message and `param` in the client's names: the platform's validation (router or tier) names its own
    fields (`parameters.max_tokens`, `prompt`), which `_client_names` renames; a field this API named itself
    (`BadRequest.param`) is the client's already."""
    param, message = getattr(exc, "param", None), exc.message
    if exc.status == "INVALID_ARGUMENT" and param is None and (m := _FIELD.match(message)):
        param = m.group(1)
        message = message.replace("parameters.", "")
        renamed = _client_names(chat, body)
        if param in renamed:
            param, message = renamed[param], renamed[param] + ": " + message.removeprefix(param + ": ")
    return message, param


def error_body(exc: TierError, chat: bool = False, body=None) -> tuple[int, dict]:
    """A failure as OpenAI answers it: (HTTP status, `{"error": {...}}`); also a batch line's answer. `body`: the
    request's, whose field names the error uses."""
    status, kind = HTTP_STATUS.get(exc.status, (500, "api_error"))
    message, param = _openai_error(exc, chat, body)
    if isinstance(exc, ModelNotFound):  # OpenAI's own words for it
        kind, code = "invalid_request_error", "model_not_found"
    elif isinstance(exc, BodyRefused):
        status, code = exc.http_status, exc.code
    elif exc.status == "INVALID_ARGUMENT" and _CONTEXT_FULL.match(exc.message):
        code = "context_length_exceeded"
    else:
        code = exc.status.lower()
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(exc: TierError, chat: bool = False, body=None) -> web.Response:
    """The one place a failure becomes an HTTP answer."""
    headers = {}
    if isinstance(exc, AccessDenied) and exc.retry_after_s:
        headers["retry-after"] = str(exc.retry_after_s)
    status, out = error_body(exc, chat, body)
    return web.json_response(out, status=status, headers=headers)


def error_response(status: str, message: str, param: str | None = None) -> web.Response:
    """An error answer made here (not from a tier): `status` a gRPC status name, `param` the field it names."""
    exc = TierError("router", status, message)
    exc.param = param
    return _error_response(exc)


INT32 = (-2**31, 2**31 - 1)  # what the wire's int32 fields hold (max_tokens, attention_window)
INT64 = (-2**63, 2**63 - 1)  # seed


def _typed(body: dict, name: str, kinds: tuple, what: str, bounds: tuple[int, int] | None = None):
    """body[name] if it is of `kinds` (None when absent); integers within `bounds`, numbers as finite-or-not floats
    (the platform's validation judges the value; this only makes sure the wire can carry it)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise BadRequest(name, f"{name}: must be {what}, got {_shown(value)}")
    if bounds is not None and isinstance(value, int) and not bounds[0] <= value <= bounds[1]:
        raise BadRequest(name, f"{name}: {_shown(value)} is out of range [{bounds[0]}, {bounds[1]}]")
    if float in kinds and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise BadRequest(name, f"{name}: {_shown(value)} is out of range") from None
    return value


def _is_neutral(value, neutral) -> bool:
    """`value` is the neutral one: booleans as booleans, numbers as numbers (0 and 0.0), the rest by equality."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):
        return isinstance(value, (int, float)) and value == neutral
    return value == neutral


def _cut(text: str) -> str:
    """A text a client sent, as a message may repeat it: at most 40 characters, "..." marking the cut."""
    return text if len(text) <= 40 else text[:37] + "..."


def _shown(value) -> str:
    """A value as a message may quote it: short, whatever it is."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return _cut(text)


def _unencodable(body) -> str | None:
    """Where the first string of a JSON value (a key or a value) is one UTF-8 cannot carry: a lone surrogate,
    which JSON's \\ud800 escapes can spell and no protobuf or tokenizer takes. None when every string is text."""
    def text(s: str) -> bool:
        try:
            s.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False

    try:  # the common case in C: every string at once (a lone surrogate cannot be encoded)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return None
    except (UnicodeEncodeError, RecursionError):
        pass  # find which one, below
    todo = deque([("", body)])
    while todo:
        where, value = todo.popleft()
        if isinstance(value, str) and not text(value):
            return where
        if isinstance(value, (dict, list)):
            for k, v in value.items() if isinstance(value, dict) else enumerate(value):
                if isinstance(k, str) and not text(k):
                    return where  # a bad key: named by the object that holds it (the key cannot be shown)
                todo.append((f"{where}.{k}" if where else str(k), v))
    return None


def _request(body: dict, prompt: str, allowed: set[str], chat: bool) -> pb.InferRequest:
    """An InferRequest from an OpenAI body; the platform's validation checks ranges afterwards."""
    unknown = sorted(set(body) - allowed)
    if unknown:  # named as sent, cut: a client's key may be any length
        name = _cut(unknown[0])
        raise BadRequest(name, f"{name}: unsupported parameter")
    model = _typed(body, "model", (str,), "a string")
    if not model:  # the platform's validation takes "" as "the served one"; OpenAI requires a name
        raise BadRequest("model", "model: required")
    params = pb.Parameters()
    for name in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        value = _typed(body, name, (int,), "an integer", INT32)
        if value is not None:
            params.max_tokens = value
    # ranges judged here on the JSON's value too where float32 would round it into them: a temperature below its
    # range arrives as 0 (greedy), one or a top_p just above their bound as the bound itself
    if (t := _typed(body, "temperature", (int, float), "a number")) is not None:
        params.temperature = t
        if t and not params.temperature or t > MAX_TEMPERATURE:
            raise BadRequest("temperature", f"temperature: must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                            f"{MAX_TEMPERATURE:g}], got {_shown(body['temperature'])}")
    if (p := _typed(body, "top_p", (int, float), "a number")) is not None:
        if p > 1:
            raise BadRequest("top_p", f"top_p: must be in (0, 1], got {_shown(body['top_p'])}")
        params.top_p = p
    if (w := _typed(body, "attention_window", (int,), "an integer", INT32)) is not None:
        params.attention_window = w
    if (seed := _typed(body, "seed", (int,), "an integer", INT64)) is not None:
        params.seed = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop", "stop: must be a string or a list of strings")
        params.stop.extend(stops)
    n = _typed(body, "n", (int,), "an integer", INT32)
    if n is not None:
        if n < 1:
            raise BadRequest("n", f"n: must be at least 1, got {n}")
        params.n = n
    _logprobs(body, params, chat)
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and not _is_neutral(body[name], neutral):
            raise BadRequest(name, f"{name}: not supported here; only {json.dumps(neutral)} (the default) is "
                                   f"accepted, got {_shown(body[name])}")
    stream = _typed(body, "stream", (bool,), "a boolean")
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is not None:  # as OpenAI: only with stream, and only include_usage, a boolean
        if not stream:
            raise BadRequest("stream_options", "stream_options: only allowed when stream is true")
        if set(options) - {"include_usage"}:
            raise BadRequest("stream_options", f"stream_options: unsupported option "
                                               f"{_shown(sorted(set(options) - {'include_usage'})[0])}")
        if not isinstance(options.get("include_usage", False), bool):
            raise BadRequest("stream_options.include_usage", "stream_options.include_usage: must be a boolean, got "
                                                             f"{_shown(options['include_usage'])}")
    _typed(body, "user", (str,), "a string")
    return pb.InferRequest(prompt=prompt, model=model, parameters=params, request_id=uuid.uuid4().hex)


def _logprobs(body: dict, params: pb.Parameters, chat: bool) -> None:
    """Chat: `logprobs: true` and `top_logprobs: k`; completions (legacy): `logprobs: k`, the alternatives."""
    if chat:
        wanted = _typed(body, "logprobs", (bool,), "a boolean")
        top = _typed(body, "top_logprobs", (int,), "an integer", INT32)
        if top and not wanted:
            raise BadRequest("top_logprobs", "top_logprobs: needs logprobs set to true")
        params.logprobs, params.top_logprobs = bool(wanted), top or 0
    else:
        top = body.get("logprobs")
        if top is None or top is False:  # LangChain sends `logprobs: null`; some clients false
            return
        top = _typed(body, "logprobs", (int,), "an integer (the alternatives per token) or null", INT32)
        if top < 0:
            raise BadRequest("logprobs", f"logprobs: must be >= 0, got {top}")
        params.logprobs, params.top_logprobs = True, top


def _chat_logprobs(choice: pb.Choice) -> dict | None:
    """OpenAI's chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs}]}."""
    def entry(t: pb.TokenLogprob) -> dict:
        return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top_logprobs]} for t in choice.logprobs],
            "refusal": None}


def _legacy_logprobs(choice: pb.Choice) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    offsets, at = [], 0
    for t in choice.logprobs:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in choice.logprobs], "token_logprobs": [t.logprob for t in choice.logprobs],
            "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in choice.logprobs],
            "text_offset": offsets}


def connection_room(wanted: int) -> int:
    """How many HTTP connections this process can hold: `wanted`, or fewer when its open-file limit leaves less
    room (FILES_RESERVE kept for the rest). The soft limit is raised to the hard one first, as servers do: a
    soft limit of 1024 (systemd's and containers' default) would run out before a cap of 1024 connections."""
    try:
        import resource
    except ImportError:  # not a POSIX system: no limit to read
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # the kernel's own ceiling (nr_open) is lower: keep the soft limit
            pass
    return max(1, min(wanted, soft - FILES_RESERVE))


class _CappedSite(web.TCPSite):
    """aiohttp's TCP site, answering a connection past `max_connections` open ones with a 503 and closing it: a client
    that opens connections without end cannot take the process's files (its gRPC door and NATS link need some).
    Connections count once aiohttp has taken them in (`connection_made`, the loop turn after their accept), so one
    burst of accepts can pass the limit by at most the listen backlog (128)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int):
        super().__init__(runner, host, port)
        self.max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner (as TCPSite.start does)
        server = self._runner.server

        def protocol() -> asyncio.BaseProtocol:
            return server() if len(server.connections) < self.max_connections else _Busy(self.max_connections)

        self._server = await asyncio.get_running_loop().create_server(protocol, self._host, self._port,
                                                                      backlog=self._backlog, reuse_address=True)
        self._bound_port = self._server.sockets[0].getsockname()[1]


class _Busy(asyncio.Protocol):
    """A connection past the limit: a 503 in OpenAI's error shape, then closed once the client is done sending (or
    after BUSY_LINGER_S): closed with its request unread, the socket would be reset, and a client still writing its
    body would see a broken pipe instead of the answer. At most BUSY_LINGERING of them wait so; the others close
    at once."""

    lingering = 0  # refused connections waiting for their client to finish sending

    def __init__(self, limit: int):
        body = json.dumps({"error": {"message": f"too many open connections ({limit}) on this server; retry later",
                                     "type": "server_error", "param": None, "code": "server_busy"}}).encode()
        self._answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.write(self._answer)
        if _Busy.lingering >= BUSY_LINGERING or not self._transport.can_write_eof():
            self._transport.close()
            return
        _Busy.lingering += 1
        self._transport.write_eof()  # the answer is all; what the client still sends is read and dropped
        self._timer = asyncio.get_running_loop().call_later(BUSY_LINGER_S, self._transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            _Busy.lingering -= 1


def _logprobs_of(choice: pb.Choice, wanted: bool, chat: bool) -> dict | None:
    if not wanted:
        return None
    return _chat_logprobs(choice) if chat else _legacy_logprobs(choice)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's -> turns
TOOL_FIELDS = ("tool_calls", "function_call", "audio")  # a message's parts this API cannot serve (tools are refused)


def chat_messages(messages) -> list[dict]:
    """The conversation checked and reduced to text turns: {"role", "content"}, the last one the user's.

    OpenAI's `developer` messages are its newer models' `system` ones, and become system turns; a message
    carrying tool calls (or audio) is refused, naming the field, as `tools` are, never passed on without them."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages: must be a non-empty list")
    turns, last_role = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise BadRequest(f"messages.{i}.role", f"messages.{i}.role: must be system, developer, user or assistant")
        if field := next((f for f in TOOL_FIELDS if m.get(f)), None):  # null or empty: as absent
            raise BadRequest(f"messages.{i}.{field}", f"messages.{i}.{field}: not supported here (no tools, text only)")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is served, at least one (as OpenAI)
            if not content:
                raise BadRequest(f"messages.{i}.content", f"messages.{i}.content: an empty list of parts; give at "
                                                          "least one text part")
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest(f"messages.{i}.content", f"messages.{i}.content: only text parts are served")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages.{i}.content", f"messages.{i}.content: must be a string")
        turns.append({"role": ROLES[m["role"]], "content": content})
        if turns[-1]["role"] != "system":
            last_role = turns[-1]["role"]
    if last_role != "user":
        raise BadRequest("messages", "messages: the last non-system message must be from the user")
    return turns


def _tierline(resp: pb.InferResponse) -> dict:
    return {"confidence": round(resp.confidence, 6), "complexity": round(resp.complexity, 6),
            "degraded": resp.degraded, "cached": resp.cached, "model_version": resp.model_version,
            "escalation_path": [{"tier": a.tier, "outcome": a.outcome, "detail": a.detail} for a in
                                resp.escalation_path],
            "paid_tokens": paid_tokens(resp.escalation_path)}  # tier -> tokens its model spent (what it costs)


def _usage(resp: pb.InferResponse) -> dict:
    """OpenAI's usage; the prompt's tokens whose KV the tier's prefix cache held are its `cached_tokens`."""
    u = resp.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _decoded(body: bytes, coding: str) -> bytes:
    """`body` decoded from one of CONTENT_CODINGS; BodyRefused past MAX_BODY_BYTES, BadRequest when it is not
    in that coding."""
    wbits = CONTENT_CODINGS[coding]
    if wbits is None:
        return body
    if wbits == zlib.MAX_WBITS and body[:1] and body[0] & 0x0F != 8:  # deflate without zlib's header, as aiohttp took
        wbits = -zlib.MAX_WBITS
    inflate = zlib.decompressobj(wbits)
    try:
        out = inflate.decompress(body, MAX_BODY_BYTES + 1)  # no further: a small body may inflate without bound
    except zlib.error as exc:
        raise BadRequest(None, f"content-encoding: the body is not {coding} ({exc})") from None
    if len(out) > MAX_BODY_BYTES:
        raise _too_large(", decompressed,")
    if not inflate.eof or inflate.unused_data:
        raise BadRequest(None, f"content-encoding: the body is not {coding} (it "
                               f"{'goes on past its end' if inflate.eof else 'ends early'})")
    return out


def content_codings(request: web.Request) -> list[str]:
    """The codings the request's body was put in, in the order they were applied (every Content-Encoding line)."""
    return [c.strip().lower() for line in request.headers.getall("content-encoding", ())
            for c in line.split(",") if c.strip()]


@contextlib.asynccontextmanager
async def arriving(request: web.Request, idle_s: float):
    """The request's body read within: when no byte of it came for `idle_s` (its stream's count, watched every
    quarter of that: the headers of a multipart part count too), a 408; a client whose data keeps coming is not cut
    off, and a stalled or trickling one holds its connection no longer than that."""
    loop, content = asyncio.get_running_loop(), request.content
    seen, handle = content.total_bytes, None
    try:
        async with asyncio.timeout(idle_s) as deadline:
            def watch() -> None:
                nonlocal seen, handle
                if content.total_bytes != seen:
                    seen = content.total_bytes
                    deadline.reschedule(loop.time() + idle_s)
                handle = loop.call_later(idle_s / 4, watch)

            handle = loop.call_later(idle_s / 4, watch)
            try:
                yield
            finally:
                handle.cancel()
    except TimeoutError:
        raise _stalled(idle_s) from None


async def read_body(request: web.Request, idle_s: float) -> bytes:
    """The request's body, decoded from its content-encoding (BodyRefused: too large, a content coding not served,
    or stalled for `idle_s`)."""
    codings = content_codings(request)
    if len(codings) > MAX_CODINGS:  # each layer decoded in turn on the event loop: a stack of them is a way to hold it
        raise coding_refused(f"content-encoding: {len(codings)} codings; at most {MAX_CODINGS} are decoded here")
    if unserved := [c for c in codings if c not in CONTENT_CODINGS]:
        raise coding_refused(f"content-encoding: {_shown(unserved[0])} is not served here; send the body as it is, "
                             "gzip or deflate")
    body = bytearray()
    try:
        async with arriving(request, idle_s):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _too_large()
    except (RequestPayloadError, HttpProcessingError) as exc:  # a body its framing (chunks, length) cannot deliver
        raise BadRequest(None, "the body could not be read: " + " ".join(str(exc).split())) from None
    out = bytes(body)
    for coding in reversed(codings):  # the last one applied first (RFC 9110 8.4)
        out = _decoded(out, coding)
    return out


async def read_json(request: web.Request, idle_s: float):
    """The request's JSON body (`read_body`); BadRequest when it is not JSON."""
    return parse_json(await read_body(request, idle_s), request)


def parse_json(body: bytes, request: web.Request):
    """`body` (read_body's) as JSON; BadRequest when it is not JSON."""
    try:
        return json.loads(body.decode(request.charset or "utf-8"))
    except (ValueError, RecursionError):  # not JSON, not in its charset, or nested too deep to read
        raise BadRequest(None, "the body is not valid JSON (in UTF-8 or its declared charset)") from None
    except LookupError:  # content-type: ...; charset=<no such codec>
        raise BadRequest(None, f"unknown charset {request.charset!r} in content-type") from None


@web.middleware
async def _json_errors(request: web.Request, handler):
    """Every answer a handler gives is JSON in OpenAI's error shape, an unknown path or a bug included (aiohttp's
    text only for what its parser refuses before a handler runs: the module's docstring)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.json_response({"error": {"message": exc.reason, "type": "invalid_request_error", "param": None,
                                            "code": exc.reason.lower().replace(" ", "_")}}, status=exc.status,
                                 headers=headers)  # a 405's `Allow` (which HTTP requires) kept
    except Exception as exc:  # noqa: BLE001 - a bug: logged, answered as one
        if isinstance(exc, ConnectionResetError) and request.transport is None:  # the client hung up mid-body:
            return error_response("INVALID_ARGUMENT", "the connection closed before the body ended")  # for nobody
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return web.json_response({"error": {"message": "internal error", "type": "api_error", "param": None,
                                            "code": "internal"}}, status=500)


class OpenAIServer:
    """The aiohttp application around a RouterServicer."""

    def __init__(self, router, chat: ChatTemplate | None = None, read_timeout_s: float = 30.0,
                 max_connections: int = 1024):
        """`read_timeout_s`, `max_connections`: router.http_read_timeout_ms and router.http_max_connections."""
        self.router = router
        self.chat_template = chat or ChatTemplate(CHAT_TEMPLATE)  # turns a conversation into the model's prompt
        self.read_timeout_s, self.max_connections = read_timeout_s, max_connections
        # read_body decodes (CONTENT_CODINGS); a connection is closed when no whole request head came within
        # read_timeout_s of its opening or its last answer (aiohttp's keep-alive timer runs from the start)
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors],
                                   handler_args={"auto_decompress": False, "keepalive_timeout": read_timeout_s})
        # {model:.+}: a name may hold '/' (Hugging Face's org/model), which `{model}` would not match
        self.app.add_routes([web.get("/v1/models", self.models), web.get("/v1/models/{model:.+}", self.model),
                             web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
                             web.get("/health", self.health)])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (port 0 = any free one)."""
        # stopping waits this long for requests in flight (aiohttp: 60 s), within the supervisor's STOP_TIMEOUT_S.
        # handler_cancellation: a client that closes its connection cancels its handler, as grpc.aio cancels a call
        # whose client went away: its request leaves the tier's batch, counts as cancelled and costs its key what a
        # cancelled gRPC call costs (aiohttp runs an orphaned handler to its end by default). What must not stop
        # half-way (the Batch API's stored records) is shielded where it is done (router/batch_http.py)
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                                     handler_cancellation=True)
        await self._runner.setup()
        room = connection_room(self.max_connections)
        if room < self.max_connections:
            log.warning("router.http_max_connections %d is more than this process's open-file limit leaves room "
                        "for: %d HTTP connections at most (raise the limit: ulimit -n, LimitNOFILE=)",
                        self.max_connections, room)
            self.max_connections = room
        site = _CappedSite(self._runner, host, port, max_connections=self.max_connections)
        await site.start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        try:
            await self.router.gate.check(bearer_token(request.headers))
        except TierError as exc:
            return _error_response(exc)
        return web.json_response({"object": "list", "data": [self._model()]})

    def _model(self) -> dict:
        return {"id": self.router.model_name, "object": "model", "created": 0, "owned_by": "tierline"}

    async def model(self, request: web.Request) -> web.Response:
        try:
            await self.router.gate.check(bearer_token(request.headers))
        except TierError as exc:
            return _error_response(exc)
        name = request.match_info["model"]
        if name != self.router.model_name:
            return _error_response(ModelNotFound(name, self.router.model_name))
        return web.json_response(self._model())

    async def health(self, request: web.Request) -> web.Response:
        """Liveness for load balancers: this process answers (no key needed; the tiers' own health is gRPC's)."""
        return web.json_response({"status": "ok"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        key = bearer_token(request.headers)
        try:
            raw = await read_body(request, self.read_timeout_s)
            if len(raw) > KEY_FIRST_BYTES:  # a big body is walked for a valid key only: 401/403 before it
                try:
                    await self.router.gate.check(key)
                except TierError as exc:
                    return await self._refused(exc, key, chat)
            body = parse_json(raw, request)
        except BadRequest as exc:
            return await self._refused(exc, key, chat)
        return await self.respond(body, key, chat, request)

    async def _refused(self, exc: TierError, key: str | None, chat: bool = False) -> web.Response:
        """A body the API cannot read: 401/403 first when the key is bad, else the 400 (counted either way)."""
        try:
            await self.router.refuse(key, exc)
        except TierError as refusal:
            return _error_response(refusal, chat)

    async def respond(self, body: dict, key: str | None, chat: bool, request: web.Request | None = None,
                      priority: int = 0) -> web.StreamResponse:
        """The answer to one completion body: the HTTP door's, and a batch line's (router/batch.py), which has
        no connection to stream to (`request` None) and runs at the `priority` it is given."""
        try:
            try:
                req = self.parse(body, chat)
                if body.get("stream") and request is None:
                    raise BadRequest("stream", "stream: a batch line cannot stream; leave stream out")
            except BadRequest as exc:
                await self.router.refuse(key, exc)  # 401/403 before a bad body; counted in the router's metrics
            # the key is checked once, with the quota, when the router admits the request
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return await self._stream(request, req, key, chat, include_usage, body)
            if priority:
                req.priority = priority
            resp = await self.router.infer(req, key)
        except TierError as exc:
            return _error_response(exc, chat, body)
        wanted = req.parameters.logprobs
        out = {"id": ("chatcmpl-" if chat else "cmpl-") + resp.request_id,
               "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
               "model": resp.model or self.router.model_name,
               "choices": [{"index": c.index, "finish_reason": c.finish_reason or None,
                            "logprobs": _logprobs_of(c, wanted, chat),
                            **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})}
                           for c in resp.choices],
               "usage": _usage(resp), "tier": resp.tier, "tierline": _tierline(resp)}
        return web.json_response(out, headers={"x-tierline-tier": resp.tier})

    def parse(self, body: dict, chat: bool) -> pb.InferRequest:
        """The InferRequest a completion body asks for; BadRequest names what cannot be read."""
        if not isinstance(body, dict):
            raise BadRequest(None, "the body must be a JSON object")
        if (where := _unencodable(body)) is not None:
            raise BadRequest(where or None, f"{where or 'the body'}: not text (a lone surrogate such as \\ud800 "
                                            "has no UTF-8 encoding)")
        if chat:
            try:
                prompt, specials = self.chat_template.request(chat_messages(body.get("messages")))
            except ChatTemplateError as exc:
                raise BadRequest("messages", f"messages: {exc}") from None
            req = _request(body, prompt, CHAT_PARAMS, chat=True)
            if not specials:  # the prompt carries the template's special tokens: the tiers add none
                req.add_special_tokens = False
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt", "prompt: must be a string (or a list of one string)")
            req = _request(body, prompt, COMPLETION_PARAMS, chat=False)
        if req.model != self.router.model_name:
            raise ModelNotFound(req.model, self.router.model_name)
        return req

    async def _stream(self, request: web.Request, req: pb.InferRequest, key: str | None, chat: bool,
                      include_usage: bool, asked: dict) -> web.StreamResponse:
        """SSE; errors before the first chunk are ordinary error answers, later ones an `error` event (OpenAI's
        error body, as `error_body` makes it) before `[DONE]`: whatever fails, the stream ends in one."""
        chunks = self.router.stream(req, key)
        first = await chunks.__anext__()  # admission, validation and the first tier happen here
        ident = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        created, model = int(time.time()), first.model or self.router.model_name
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                               "x-tierline-tier": first.tier})

        async def send(data) -> None:
            await response.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())

        started: set[int] = set()  # choices whose first chunk went out (chat: the one with the role)
        # as OpenAI: with include_usage every chunk has a `usage` key, null but in the last (usage-only) one
        no_usage = {"usage": None} if include_usage else {}

        def event(chunk: pb.InferResponse, choice: pb.Choice) -> dict:
            if chat:
                delta = {"content": choice.text} if choice.text else {}
                if choice.index not in started:
                    delta["role"] = "assistant"
                body = {"index": choice.index, "delta": delta}
            else:
                body = {"index": choice.index, "text": choice.text}
            started.add(choice.index)
            body.update(finish_reason=choice.finish_reason or None,
                        logprobs=_logprobs_of(choice, req.parameters.logprobs and bool(choice.finish_reason), chat))
            out = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": model, "choices": [body], **no_usage, "tier": chunk.tier}
            if choice.finish_reason:
                out["tierline"] = _tierline(chunk)
            return out

        failure: TierError | None = None
        try:
            await response.prepare(request)  # in the try: a client gone before the first chunk is one gone later
            chunk = first
            while True:
                for choice in chunk.choices or [pb.Choice()]:  # the last message: every choice's finish_reason
                    await send(event(chunk, choice))
                if chunk.choices and chunk.choices[0].finish_reason:
                    if include_usage:
                        await send({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "created": created, "model": model, "choices": [], "usage": _usage(chunk),
                                    "tier": chunk.tier})
                    break
                chunk = await chunks.__anext__()
        except ConnectionResetError:  # the client went away: stop generating (aclose), answer nobody
            return response
        except TierError as exc:  # the answer started: the status can only travel as an event
            failure = exc
        except StopAsyncIteration:  # never silently: a stream that stops without its last chunk is cut short
            failure = TierError("router", "UNAVAILABLE", "the stream ended before its answer")
        except Exception:  # noqa: BLE001 - a bug: logged, and the stream still ends in an error event, not garbage
            log.exception("unexpected error streaming %s %s", request.method, request.path)
            failure = TierError("router", "INTERNAL", "internal error")
        finally:
            try:
                await chunks.aclose()
            except Exception:  # noqa: BLE001 - the answer is out (or failing already): logged, not raised
                log.exception("closing the stream of %s failed", ident)
        try:
            if failure is not None:
                await send(error_body(failure, chat, asked)[1])
            await send("[DONE]")
            await response.write_eof()
        except ConnectionResetError:
            pass
        except Exception:  # noqa: BLE001 - the headers are out: an error answer now would corrupt the stream
            log.exception("ending the stream of %s failed", ident)
        return response
