"""The Tierline Python SDK: the router's gRPC API as a few plain calls.

    from tierline import InferenceClient

    client = InferenceClient(api_key="YOUR_API_KEY", model_name="tierline-reasoner",
                             endpoint="127.0.0.1:50050/v1")
    response = client.infer(prompt="Q:2+3=?\\nA:",
                            parameters={"temperature": 0.3, "max_tokens": 64, "attention_window": 32})
    print(response.choices[0].text, response.tier, response.usage.total_tokens)

`stream()` yields the text as it is generated; `AsyncInferenceClient` is the same
for asyncio. Every call has a deadline (`timeout`, seconds) for the whole call,
retries included; `UNAVAILABLE` (router restarting, no tier up) is retried with
exponential backoff and jitter while the deadline leaves time for another attempt
(each attempt gets the time that is left; a backoff never sleeps past the
deadline), a stream only before its first chunk. Failures raise a `TierlineError` subclass carrying
the gRPC status (`.code`) and the server's message (`.message`), so a caller can
tell a bad key (`Unauthenticated`) from a used-up quota (`QuotaExceeded`).

The endpoint is `host[:port][/v1]`, optionally `grpc://` (plaintext) or `grpcs://`
(TLS). Without a scheme, loopback hosts are plaintext and any other host is TLS;
the default port is 50050 for plaintext, 443 for TLS.
"""

from __future__ import annotations

import asyncio
import decimal
import itertools
import math
import numbers
import os
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc

from tierline_shared.wire import PRIORITY_VALUES

API_VERSION = "v1"
DEFAULT_ENDPOINT = "127.0.0.1:50050"  # the router of infra/manifests/local.yaml
DEFAULT_PLAINTEXT_PORT = 50050
DEFAULT_TLS_PORT = 443
DEFAULT_TIMEOUT_S = 30.0  # each call's deadline, seconds, retries and backoff included
MAX_TIMEOUT_S = 1e6  # seconds (11.6 days): the longest deadline a call may have (gRPC overflows on far longer)
DEFAULT_RETRIES = 3  # extra attempts after UNAVAILABLE
DEFAULT_BACKOFF_S = 0.25  # first wait before a retry, seconds; doubles each time
MAX_BACKOFF_S = 4.0
MIN_ATTEMPT_S = 0.05  # no retry is started with less time than this left before the deadline
API_KEY_ENV = "TIERLINE_API_KEY"
ENDPOINT_ENV = "TIERLINE_ENDPOINT"
PARAMETERS = ("temperature", "top_p", "max_tokens", "attention_window", "stop", "seed")
_LOOPBACK = ("localhost", "127.", "::1", "[::1]")
# reconnect quickly after the router comes back, so retries are not spent on the channel's own backoff
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 2000)]


# -- errors -----------------------------------------------------------------------------------------------
class TierlineError(Exception):
    """A call that failed; `code` is the gRPC status, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message

    @property
    def status(self) -> str:
        return self.code.name


class InvalidArgument(TierlineError):
    """A request field the platform refuses; the message names the field."""


class Unauthenticated(TierlineError):
    """No API key, or one the platform does not know."""


class PermissionDenied(TierlineError):
    """The API key was revoked."""


class QuotaExceeded(TierlineError):
    """RESOURCE_EXHAUSTED: the key's daily quota is used (the message says when it resets) or a queue is full."""


class Unavailable(TierlineError):
    """No tier could answer, or the router cannot be reached (after the retries)."""


class DeadlineExceeded(TierlineError):
    """No answer within the call's timeout."""


_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
           grpc.StatusCode.PERMISSION_DENIED: PermissionDenied, grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceeded,
           grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded}


def _error(exc: grpc.RpcError) -> TierlineError:
    """The one place a gRPC failure becomes an SDK exception."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return _ERRORS.get(code, TierlineError)(code, details or "")


# -- results ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop", "length"
    index: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Attempt:
    tier: str
    outcome: str  # "answered", "low_confidence", "timeout", "no_responders", "error", "refused", "offline"
    detail: str
    confidence: float


@dataclass(frozen=True)
class Completion:
    """One answer: `choices[0].text`, what it cost (`usage`) and which tier answered (`tier`)."""

    id: str
    choices: list[Choice]
    usage: Usage
    tier: str
    model: str
    model_version: str
    confidence: float
    complexity: float
    degraded: bool  # a better tier was wanted but unreachable
    cached: bool
    escalation_path: list[Attempt] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @classmethod
    def from_proto(cls, resp, text: str | None = None) -> "Completion":
        choices = [Choice(c.text if text is None else text, c.finish_reason, i) for i, c in enumerate(resp.choices)]
        return cls(id=resp.request_id, choices=choices,
                   usage=Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens), tier=resp.tier,
                   model=resp.model, model_version=resp.model_version, confidence=resp.confidence,
                   complexity=resp.complexity, degraded=resp.degraded, cached=resp.cached,
                   escalation_path=[Attempt(a.tier, a.outcome, a.detail, a.confidence) for a in resp.escalation_path])


# -- request building ----------------------------------------------------------------------------------------
def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """(gRPC target, use TLS) from `[grpc://|grpcs://]host[:port][/v1]`."""
    text, secure = endpoint.strip(), None
    if "://" in text:
        scheme, text = text.split("://", 1)
        if scheme.lower() not in ("grpc", "grpcs"):
            raise ValueError(f"endpoint: scheme {scheme!r} not served by this SDK (grpc:// or grpcs://; "
                             f"the router's HTTP API is OpenAI-compatible: use an OpenAI client for it)")
        secure = scheme.lower() == "grpcs"
    hostport, _, path = text.partition("/")
    if path.strip("/") not in ("", API_VERSION):
        raise ValueError(f"endpoint: path /{path.strip('/')}: this SDK speaks /{API_VERSION}")
    if hostport.startswith("["):  # [v6 address]:port
        host, _, rest = hostport[1:].partition("]")
        port_text = rest.lstrip(":")
        host = f"[{host}]"
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"endpoint: no host in {endpoint!r}")
    if secure is None:
        secure = not host.startswith(_LOOPBACK)
    try:
        port = int(port_text) if port_text else (DEFAULT_TLS_PORT if secure else DEFAULT_PLAINTEXT_PORT)
    except ValueError:
        raise ValueError(f"endpoint: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"endpoint: port {port} out of range")
    return f"{host}:{port}", secure


def build_request(prompt: str, parameters: dict | None, model: str, priority: str | None = None):
    """An InferRequest; unknown parameters and wrong types fail here, ranges on the server."""
    from tierline_api.v1 import inference_pb2 as pb

    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected str, got {type(prompt).__name__}")
    params = dict(parameters or {})
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"parameters: unknown key {unknown[0]!r}; allowed: {', '.join(PARAMETERS)}")
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    params = {k: v for k, v in params.items() if v is not None}
    try:
        p = pb.Parameters(**params)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"parameters: {exc}") from None
    if priority is not None and priority not in PRIORITY_VALUES:
        raise ValueError(f"priority: must be one of {', '.join(PRIORITY_VALUES)}, got {priority!r}")
    return pb.InferRequest(prompt=prompt, model=model, parameters=p, priority=PRIORITY_VALUES.get(priority, 0))


class _Config:
    """What both clients share: key, model, endpoint, deadlines and retry policy, checked up front."""

    def __init__(self, api_key: str | None, model_name: str, endpoint: str | None, timeout: float, retries: int,
                 backoff: float):
        timeout, backoff = _seconds("timeout", timeout), _seconds("backoff", backoff, zero=True)
        if retries < 0:
            raise ValueError(f"retries: must be >= 0, got {retries}")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.model_name = model_name
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self.target, self.secure = parse_endpoint(self.endpoint)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter, so many clients do not retry in step."""
        return random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, self.backoff * 2 ** attempt)

    def channel_credentials(self):
        return grpc.ssl_channel_credentials() if self.secure else None

    def deadline(self, timeout: float | None) -> "_Deadline":
        """The deadline of one call (its own `timeout`, else the client's), retries included."""
        return _Deadline(self, self.timeout if timeout is None else _seconds("timeout", timeout))


def _seconds(name: str, value, zero: bool = False) -> float:
    """`value` as seconds (a float): a real number (numpy's, Fraction and Decimal too; not a bool, a string or bytes),
    finite, > 0 (`zero`: >= 0) and at most MAX_TIMEOUT_S; else ValueError naming `name`. NaN passes every
    comparison and would have made a deadline that never comes; gRPC overflows on a huge one and fails the call at
    once."""
    real = isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool)
    try:
        seconds = float(value) if real else math.nan
    except (TypeError, ValueError, OverflowError):
        seconds = math.nan
    if not (0 <= seconds <= MAX_TIMEOUT_S) or (seconds == 0 and not zero):
        raise ValueError(f"{name}: must be a number of seconds {'>=' if zero else '>'} 0 and at most "
                         f"{MAX_TIMEOUT_S:.0f}, got {value!r}")
    return seconds


class _Deadline:
    """One call's deadline, shared by its attempts: the arithmetic both clients' retry loops use."""

    def __init__(self, config: _Config, timeout: float):
        self.config, self.end = config, time.monotonic() + timeout

    def left(self) -> float:
        """The time the next attempt may take (the gRPC timeout to pass), never negative."""
        return max(0.0, self.end - time.monotonic())

    def retry_wait(self, exc: grpc.RpcError, attempt: int, started: bool = False) -> float | None:
        """The backoff before retrying after `exc`, or None: not retryable, retries used, or no time left.

        Only UNAVAILABLE before any answer was received is retried, and only when the
        backoff still leaves MIN_ATTEMPT_S before the deadline.
        """
        if exc.code() != grpc.StatusCode.UNAVAILABLE or started or attempt >= self.config.retries:
            return None
        wait = self.config.delay(attempt)
        return wait if self.left() - wait >= MIN_ATTEMPT_S else None


# -- the synchronous client ---------------------------------------------------------------------------------------
class TextStream:
    """The text chunks of one streamed answer; after the last, `response` holds usage, tier and finish reason."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks = chunks
        self.response: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        return self._chunks


class InferenceClient:
    """Blocking client of a Tierline router (thread-safe: one channel, many calls).

    `timeout` (seconds; a call's own `timeout=` overrides it) bounds the whole call:
    every retry after UNAVAILABLE and every backoff fit inside it.
    """

    def __init__(self, api_key: str | None = None, model_name: str = "", endpoint: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF_S):
        from tierline_api.v1 import inference_pb2_grpc as pb_grpc

        self.config = _Config(api_key, model_name, endpoint, timeout, retries, backoff)
        creds = self.config.channel_credentials()
        self._channel = (grpc.secure_channel(self.config.target, creds, options=_CHANNEL_OPTIONS) if creds else
                         grpc.insecure_channel(self.config.target, options=_CHANNEL_OPTIONS))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def _call(self, method, request, timeout: float | None):
        deadline = self.config.deadline(timeout)
        for attempt in itertools.count():
            try:
                return method(request, timeout=deadline.left(), metadata=self.config.metadata)
            except grpc.RpcError as exc:
                wait = deadline.retry_wait(exc, attempt)
                if wait is None:
                    raise _error(exc) from None
            time.sleep(wait)

    def infer(self, prompt: str, parameters: dict | None = None, *, timeout: float | None = None,
              priority: str | None = None) -> Completion:
        """One complete answer (`parameters`: temperature, top_p, max_tokens, attention_window, stop, seed)."""
        req = build_request(prompt, parameters, self.config.model_name, priority)
        return Completion.from_proto(self._call(self._stub.Infer, req, timeout))

    def stream(self, prompt: str, parameters: dict | None = None, *, timeout: float | None = None,
               priority: str | None = None) -> TextStream:
        """The answer's text chunk by chunk, as the tier generates it."""
        req = build_request(prompt, parameters, self.config.model_name, priority)
        out = TextStream(iter(()))

        def chunks() -> Iterator[str]:
            text: list[str] = []
            deadline = self.config.deadline(timeout)
            for attempt in itertools.count():
                call = self._stub.InferStream(req, timeout=deadline.left(), metadata=self.config.metadata)
                try:
                    for chunk in call:
                        piece = chunk.choices[0].text if chunk.choices else ""
                        if chunk.choices and chunk.choices[0].finish_reason:
                            text.append(piece)
                            out.response = Completion.from_proto(chunk, text="".join(text))
                            if piece:
                                yield piece
                            return
                        text.append(piece)
                        yield piece
                    return
                except grpc.RpcError as exc:
                    wait = deadline.retry_wait(exc, attempt, started=bool(text))
                    if wait is None:
                        raise _error(exc) from None
                finally:
                    call.cancel()  # a caller that stops iterating stops the generation too
                time.sleep(wait)

        out._chunks = chunks()
        return out

    def status(self, *, timeout: float | None = None):
        """The platform's tiers, replicas, queues and traffic split (a `PlatformStatus` message)."""
        from tierline_api.v1 import inference_pb2 as pb

        return self._call(self._stub.GetStatus, pb.StatusRequest(), timeout)

    def server_info(self, *, timeout: float | None = None):
        from tierline_api.v1 import inference_pb2 as pb

        return self._call(self._stub.GetServerInfo, pb.ServerInfoRequest(), timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the asyncio client -------------------------------------------------------------------------------------
class AsyncInferenceClient:
    """The same calls for asyncio (grpc.aio); create it inside the event loop that uses it.

    `timeout` bounds the whole call, retries and backoff included, as in `InferenceClient`.
    """

    def __init__(self, api_key: str | None = None, model_name: str = "", endpoint: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF_S):
        from tierline_api.v1 import inference_pb2_grpc as pb_grpc

        self.config = _Config(api_key, model_name, endpoint, timeout, retries, backoff)
        creds = self.config.channel_credentials()
        self._channel = (grpc.aio.secure_channel(self.config.target, creds, options=_CHANNEL_OPTIONS) if creds else
                         grpc.aio.insecure_channel(self.config.target, options=_CHANNEL_OPTIONS))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    async def _call(self, method, request, timeout: float | None):
        deadline = self.config.deadline(timeout)
        for attempt in itertools.count():
            try:
                return await method(request, timeout=deadline.left(), metadata=self.config.metadata)
            except grpc.RpcError as exc:
                wait = deadline.retry_wait(exc, attempt)
                if wait is None:
                    raise _error(exc) from None
            await asyncio.sleep(wait)

    async def infer(self, prompt: str, parameters: dict | None = None, *, timeout: float | None = None,
                    priority: str | None = None) -> Completion:
        req = build_request(prompt, parameters, self.config.model_name, priority)
        return Completion.from_proto(await self._call(self._stub.Infer, req, timeout))

    async def stream(self, prompt: str, parameters: dict | None = None, *, timeout: float | None = None,
                     priority: str | None = None) -> AsyncIterator[str]:
        """The answer's text chunk by chunk (an async generator)."""
        req = build_request(prompt, parameters, self.config.model_name, priority)
        started = False
        deadline = self.config.deadline(timeout)
        for attempt in itertools.count():
            call = self._stub.InferStream(req, timeout=deadline.left(), metadata=self.config.metadata)
            try:
                async for chunk in call:
                    piece = chunk.choices[0].text if chunk.choices else ""
                    started = True
                    if piece:
                        yield piece
                return
            except grpc.RpcError as exc:
                wait = deadline.retry_wait(exc, attempt, started)
                if wait is None:
                    raise _error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    async def status(self, *, timeout: float | None = None):
        from tierline_api.v1 import inference_pb2 as pb

        return await self._call(self._stub.GetStatus, pb.StatusRequest(), timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncInferenceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
