"""The cloud tier as a forwarder: an OpenAI-compatible server the user already runs answers (vLLM, TGI,
llama.cpp server, `transformers serve`), instead of a model loaded here (`tiers.cloud.upstream`).

`UpstreamScheduler` stands where the tier's scheduler stands, under the shared `TierServicer`, with the same
`submit -> ticket (future of a BatchedResult, a stream's chunk queue, cancel)`: validation, the result cache,
NATS and gRPC serving, deadlines, priorities of the queue bound and the metrics stay the tier's own. Each
request is one `POST <url>/completions` on a worker thread (at most `max_num_seqs` at once: the upstream
batches them itself; beyond `max_queue` waiting, RESOURCE_EXHAUSTED), within the request's deadline, retried
after a connection error or a 5xx (`upstream.retries`; a stream only before its first chunk). A 400, 413 or
422 is the request's own fault (INVALID_ARGUMENT, with the upstream's message); a 429 a busy upstream
(RESOURCE_EXHAUSTED) and another 4xx the tier's own setup (its key, its URL: UNAVAILABLE); an upstream that
stays away is UNAVAILABLE too, which the router's cascade handles as any failing tier. So is one that answers
something other than a completion (not JSON, no choices, an error event, finish_reason "abort", more than
MAX_ANSWER_BYTES, a stream that stops before its finish_reason or `[DONE]`): never a short or empty answer; and
one without what the client would read as the upstream's word (no text, no finish_reason, a whole answer without
usage): never a guess ("length", 0 tokens).
Every read waits at most what is left of the deadline (DEADLINE_EXCEEDED after it, however slowly the bytes
trickle), and a caller gone (`UpstreamTicket.cancel`) closes the HTTP request at once: the upstream stops
generating, and the worker is free for the next request.

Confidence is the lowest probability of a chosen token, from the logprobs the upstream returns for
`logprobs: 1` (vLLM and llama.cpp server do, in OpenAI's completions object or the chat one); `transformers serve`
and TGI return none: then it is 0.0, which changes nothing for the cloud, the top tier, whose answers are always
kept. A client that asks for logprobs (`parameters.logprobs`) from an upstream that returns none gets
INVALID_ARGUMENT naming the parameter (a stream: before its first chunk), not an empty list it cannot tell from
no tokens; one whose logprobs miss some of the answer's tokens is UNAVAILABLE, never the part that came. An answer
carries as many alternatives per token as `parameters.top_logprobs` asks (the upstream's `logprobs: k` may add
the chosen token).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tierline_shared.config.manifest import BatchConfig, UpstreamConfig
from tierline_shared.runtime.engine import (
    EngineError,
    EngineInfo,
    GenerationParams,
    GenerationResult,
    TokenLogprob,
)
from tierline_shared.runtime.scheduler import END, BatchedResult, DeadlineExceeded, Piece, QueueFull
from tierline_shared.serving.servicer import RequestError
from tierline_shared.transport.messaging import TierError

RETRY_WAIT_S = 0.2  # between two attempts (at most what is left of the deadline)
REFUSED_REQUEST = (400, 413, 422)  # what an upstream says of the request itself (INVALID_ARGUMENT); other 4xx: of us
# an answer's bytes at most (a whole body, or a whole stream): the tier's reply must fit a NATS message (1 MiB),
# and JSON with logprobs is a few times the size of its protobuf; more is an upstream gone wrong, not an answer
MAX_ANSWER_BYTES = 16 << 20
MAX_ERROR_BYTES = 64 << 10  # of an error body (its message is cut to 300 characters)
READ_BYTES = 64 << 10  # one read from the socket: the deadline is checked between two
MIN_LOGPROB = math.log(1e-12)  # the least a token's counts for in the confidence and the mean (the client: as sent)
FINISH_REASONS = ("stop", "length")  # what the wire knows (proto Choice.finish_reason)
# vLLM ends a request it gave up on (preempted, its own timeout) with "abort": the text is cut short, not an answer
FAILED_REASONS = ("abort", "error")


class _AnyText:
    """The tokenizer questions the servicer asks, for a model whose tokenizer runs elsewhere: this tier counts no
    token; the upstream does, and refuses a prompt outside its vocabulary or too long for its context with a 400
    (INVALID_ARGUMENT)."""

    @staticmethod
    def unknown_count(_text: str) -> int:
        return 0

    @staticmethod
    def encode(_text: str, bos: bool = True) -> tuple[()]:
        """No ids: not a count of the prompt, which only the upstream can make. The servicer fits a default
        max_tokens into the room the prompt leaves; here the whole context, and the manifest keeps
        limits.default_max_tokens below `upstream.max_context` (shared/config/manifest.py), so the default leaves
        a prompt one token at least."""
        return ()


class UpstreamEngine:
    """What the servicer asks of an engine, for a model that runs elsewhere: its name and limits."""

    def __init__(self, info: EngineInfo):
        self.info, self.tokenizer = info, _AnyText()

    @classmethod
    def of(cls, config: UpstreamConfig, model_name: str, served: str) -> UpstreamEngine:
        """The engine for `tiers.cloud.upstream`: its context is the manifest's `max_context` (0: unknown), which
        GetServerInfo reports and `check` holds requests to."""
        return cls(EngineInfo("cloud", model_name, f"upstream:{served}", params=0, bytes=0,
                              max_context=config.max_context, window_limit=0))

    def check(self, prompt: str, params: GenerationParams) -> None:
        """A max_tokens that leaves a prompt no room in the context the manifest gives (`upstream.max_context`)
        is refused here, before the upstream is asked: it would accept one far past its context, bounded only by
        the deadline (`transformers serve` does). The prompt's own length the upstream checks (its 400 comes back
        as INVALID_ARGUMENT). A prompt that carries its special tokens (`add_special_tokens` false) is refused: the
        upstream would add its own (`transformers serve` refuses the field)."""
        if not params.add_special_tokens:  # the upstream's own tokenizer adds them, and not every engine can be told
            raise EngineError("add_special_tokens: false: this tier forwards to an upstream engine, which puts the "
                              "model's special tokens around every prompt itself", "add_special_tokens")
        limit = self.info.max_context
        if limit and params.max_tokens >= limit:
            raise EngineError(f"this model's maximum context length is {limit} tokens; max_tokens "
                              f"{params.max_tokens} leaves no room for the prompt", "parameters.max_tokens")

    def enable_prefix_cache(self, *_args) -> None:
        """The upstream keeps its own KV (vLLM's prefix caching)."""


@dataclass
class UpstreamTicket:
    future: Future
    chunks: queue.Queue | None
    abandoned: threading.Event = field(default_factory=threading.Event)
    relayed: int = 0  # chunks put on `chunks`: once one is, a broken stream is not tried again (the text twice)
    _sock: socket.socket | None = None  # the attempt's connection, closed by `cancel`
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _out_of_queue: bool = False  # counted out of the scheduler's waiting (by its worker or by close), under _lock

    def cancel(self) -> None:
        """The caller is gone: its HTTP request is closed at once (vLLM and TGI abort a request whose connection
        closes), not when the upstream's next bytes come, nor at the deadline."""
        with self._lock:
            self.abandoned.set()
            sock = self._sock
        self.future.cancel()
        if sock is not None:
            _hang_up(sock)

    def _attach(self, sock: socket.socket | None) -> None:
        """The connection `cancel` closes (None: the attempt is over); a ticket cancelled already stops here."""
        with self._lock:
            if self.abandoned.is_set() and sock is not None:
                raise _Cancelled()
            self._sock = sock


def _hang_up(sock: socket.socket) -> None:
    """Shut the connection under a thread blocked reading it: its read returns at once, the upstream sees the
    request gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


class _Retryable(Exception):
    """A connection error or a 5xx: another attempt may succeed."""


class _Cancelled(Exception):
    """The caller went away (`UpstreamTicket.cancel`): no other attempt."""


def _broken(why: str) -> TierError:
    """An upstream that answered, but not with an OpenAI completion: the tier fails (the router moves on)."""
    return TierError("cloud", "UNAVAILABLE", f"the upstream's answer is not an OpenAI completion: {why}")


class UpstreamScheduler:
    """Requests forwarded to the upstream on at most `max_num_seqs` threads, with the scheduler's interface."""

    def __init__(self, config: UpstreamConfig, model: str, batch: BatchConfig):
        self.config, self.model, self.batch = config, model, batch
        url = urlsplit(config.url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream.url: {config.url!r} is not an http(s) URL")
        try:
            url.port  # noqa: B018 - parsed when read: a bad port must stop the start, not fail every request
        except ValueError as exc:
            raise ValueError(f"upstream.url: {config.url!r}: {exc}") from None
        if url.username or url.password or url.query or url.fragment:  # none of them would be sent
            raise ValueError(f"upstream.url: {config.url!r}: only scheme, host, port and path are used (a token "
                             "goes in the variable upstream.api_key_env names)")
        self._url = url
        self._token = os.environ.get(config.api_key_env, "").strip() if config.api_key_env else ""
        if config.api_key_env and not self._token:  # else every request would be refused (401): UNAVAILABLE
            raise ValueError(f"upstream.api_key_env: the environment variable {config.api_key_env} is not set "
                             "(or empty)")
        self._pool = ThreadPoolExecutor(batch.max_num_seqs, thread_name_prefix="upstream")
        self._lock = threading.Lock()
        self._waiting = self._running = 0
        self._tickets: dict[int, UpstreamTicket] = {}  # submitted, not yet answered (by id): what close() fails
        self._closed = False

    @property
    def depth(self) -> int:
        with self._lock:
            return self._waiting

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def close(self) -> None:
        """Stop, as the Scheduler does: requests waiting or running fail ("server shutting down") at once, the
        running ones' HTTP requests closed; none is left for its caller to wait out its deadline."""
        with self._lock:
            self._closed = True
            tickets, self._tickets = list(self._tickets.values()), {}
        self._pool.shutdown(wait=False, cancel_futures=True)
        for ticket in tickets:
            with ticket._lock:  # against its worker starting it meanwhile (`_serve`)
                ticket.abandoned.set()
                sock = ticket._sock
                queued = not (ticket.future.running() or ticket.future.done()) and \
                    ticket.future.set_running_or_notify_cancel()
                count_out, ticket._out_of_queue = not ticket._out_of_queue, True
            if sock is not None:
                _hang_up(sock)  # a running one: its worker fails it
            if count_out:  # its worker never took it from the pool's queue
                with self._lock:
                    self._waiting -= 1
            if queued:  # its worker will not start it
                ticket.future.set_exception(RuntimeError("server shutting down"))
                if ticket.chunks is not None:
                    ticket.chunks.put(END)

    def submit(self, prompt: str, params: GenerationParams, priority: int = 0, timeout_s: float | None = None,
               stream: bool = False) -> UpstreamTicket:
        ticket = UpstreamTicket(Future(), queue.Queue() if stream else None)
        with self._lock:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if self._waiting >= self.batch.max_queue:
                raise QueueFull(f"queue full ({self.batch.max_queue} requests waiting)")
            self._waiting += 1
            self._tickets[id(ticket)] = ticket
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 600.0)
        self._pool.submit(self._serve, prompt, params, deadline, ticket, time.perf_counter())
        return ticket

    # -- one request ---------------------------------------------------------------------------------
    def _serve(self, prompt: str, params: GenerationParams, deadline: float, ticket: UpstreamTicket,
               enqueued: float) -> None:
        with ticket._lock:
            count_out, ticket._out_of_queue = not ticket._out_of_queue, True
        with self._lock:
            self._waiting -= count_out
            self._running += 1
        try:
            with ticket._lock:
                start = not ticket.abandoned.is_set() and ticket.future.set_running_or_notify_cancel()
            if not start:
                return  # its caller gave up, or close() answered it
            started = time.perf_counter()
            try:
                result = self._with_retries(self._body(prompt, params, ticket.chunks is not None), params,
                                            deadline, ticket, started)
            except Exception as exc:  # noqa: BLE001 - the request's own failure, for its caller
                ticket.future.set_exception(RuntimeError("server shutting down") if self._closed else exc)
            else:
                ticket.future.set_result(BatchedResult(result, started - enqueued, 1))
            finally:
                if ticket.chunks is not None:
                    ticket.chunks.put(END)
        finally:
            with self._lock:
                self._running -= 1
                self._tickets.pop(id(ticket), None)

    def _body(self, prompt: str, params: GenerationParams, stream: bool) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "logprobs": max(1, params.top_logprobs),
                "stream": stream}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if stream:  # else a stream carries no usage (vLLM, transformers serve): a last event brings it
            body["stream_options"] = {"include_usage": True}
        return body

    def _with_retries(self, body: dict, params: GenerationParams, deadline: float, ticket: UpstreamTicket,
                      started: float) -> GenerationResult:
        why = "no attempt"
        for attempt in range(self.config.retries + 1):
            if ticket.abandoned.is_set():
                raise RuntimeError("cancelled by the caller")
            if deadline - time.monotonic() <= 0:
                raise DeadlineExceeded(f"deadline passed waiting for the upstream ({why})")
            try:
                return self._post(body, params, deadline, ticket, started)
            except _Cancelled:
                raise RuntimeError("cancelled by the caller") from None
            except _Retryable as exc:
                why = str(exc)
                if attempt < self.config.retries:  # a cancel ends the wait too
                    ticket.abandoned.wait(min(RETRY_WAIT_S, max(0.0, deadline - time.monotonic())))
        raise TierError("cloud", "UNAVAILABLE", f"the upstream {self.config.url} did not answer: {why}")

    def _post(self, body: dict, params: GenerationParams, deadline: float, ticket: UpstreamTicket,
              started: float) -> GenerationResult:
        """One attempt. Every read waits at most what is left of the deadline, and `ticket.cancel` closes the
        connection under it: an upstream that trickles or goes silent holds a worker no longer than that."""
        u = self._url
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname, u.port, timeout=max(0.001, deadline - time.monotonic()))
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            conn.connect()
            sock = conn.sock  # kept: http.client lets go of it once a response will close the connection
            ticket._attach(sock)
            conn.request("POST", f"{u.path}/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            if resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status >= 400:
                message = _error_message(_read(resp, sock, deadline, ticket, MAX_ERROR_BYTES, cut=True))
            if resp.status == 429:  # its rate limit or its full queue: another replica, or another tier, may answer
                after = resp.getheader("Retry-After")
                raise QueueFull(f"the upstream is busy (HTTP 429{f', Retry-After {after}' if after else ''}): "
                                f"{message}")
            if resp.status in REFUSED_REQUEST:
                raise RequestError("request", f"the upstream refused it (HTTP {resp.status}): {message}")
            if resp.status >= 400:  # 401, 403, 404...: the tier's own setup (its key, its URL), not the request
                raise TierError("cloud", "UNAVAILABLE", f"the upstream {self.config.url} refused the tier "
                                                        f"(HTTP {resp.status}): {message}")
            if body["stream"]:
                return self._read_stream(resp, sock, params, deadline, ticket, started)
            return _result(_read(resp, sock, deadline, ticket, MAX_ANSWER_BYTES), params, started)
        except (OSError, http.client.HTTPException) as exc:
            if ticket.abandoned.is_set():  # the read `cancel` cut short
                raise _Cancelled() from None
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed while the upstream answered") from None
            if ticket.relayed:  # the client has part of this answer: another attempt would send it twice
                raise TierError("cloud", "UNAVAILABLE", f"the upstream's stream broke after {ticket.relayed} "
                                                        f"chunk(s): {type(exc).__name__}: {exc}") from None
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        finally:
            ticket._attach(None)
            conn.close()

    def _read_stream(self, resp, sock: socket.socket, params: GenerationParams, deadline: float,
                     ticket: UpstreamTicket, started: float) -> GenerationResult:
        """Relay each SSE event's text as it comes. The stream must end with `[DONE]` or a finish_reason
        (`transformers serve` sends no `[DONE]`): one that just stops was cut short, and is no answer. Each
        event's logprobs are checked before its text is relayed: a client that asked for logprobs the upstream
        does not send gets its error before any text."""
        text, logprobs, reason, first, usage, done = [], _Logprobs(), None, 0.0, None, False
        for line in _lines(_pieces(resp, sock, deadline, ticket)):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = _parsed(data, "a stream's event")
            usage = chunk.get("usage") or usage
            for choice in _choices(chunk, "a stream's event"):
                piece = choice.get("text") or ""
                if not isinstance(piece, str):
                    raise _broken(f"a stream's event: text is a JSON {type(piece).__name__}")
                logprobs.add(choice.get("logprobs"), piece)
                logprobs.check(params)
                if piece:
                    first = first or time.perf_counter() - started
                    text.append(piece)
                    ticket.relayed += 1
                    # its prompt's tokens come with its usage, at the end: none so far
                    ticket.chunks.put(Piece(piece, 0, max(len(logprobs.tokens), ticket.relayed)))
                reason = choice.get("finish_reason") or reason
        if not done and reason is None:
            raise ConnectionError(f"the stream ended before its finish_reason or [DONE] (content-type "
                                  f"{resp.getheader('Content-Type')})")
        return _assemble("".join(text), logprobs, reason, usage, first, started, params, counted=len(text))


def _pieces(resp, sock: socket.socket, deadline: float, ticket: UpstreamTicket):
    """A response's body as it comes, one socket read at a time, each within what is left of the deadline."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline passed while the upstream answered")
        sock.settimeout(left)
        data = resp.read1(READ_BYTES)
        if ticket.abandoned.is_set():  # `cancel` shut the connection: what came is not the whole answer
            raise _Cancelled()
        if not data:
            if resp.length:  # a Content-Length the connection closed short of (read1 does not raise it)
                raise http.client.IncompleteRead(b"", resp.length)
            return
        yield data


def _read(resp, sock: socket.socket, deadline: float, ticket: UpstreamTicket, limit: int,
          cut: bool = False) -> bytes:
    """A whole body, or its first `limit` bytes when `cut`; longer without `cut` fails the tier: an answer that
    size is an upstream gone wrong, not one to hold in memory."""
    body = bytearray()
    for data in _pieces(resp, sock, deadline, ticket):
        body += data
        if len(body) > limit:
            if cut:
                return bytes(body[:limit])
            raise _broken(f"more than {limit >> 20} MiB")
    return bytes(body)


def _lines(pieces):
    """The lines of a stream's pieces (SSE: one event field a line), at most MAX_ANSWER_BYTES in all."""
    pending, size = bytearray(), 0  # a bytearray: a long line in many pieces is not copied again for each
    for data in pieces:
        size += len(data)
        if size > MAX_ANSWER_BYTES:
            raise _broken(f"a stream of more than {MAX_ANSWER_BYTES >> 20} MiB")
        pending += data
        if b"\n" in data:
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in lines:
                yield bytes(line).strip()
    if pending.strip():
        yield bytes(pending).strip()


def _parsed(data: bytes, what: str) -> dict:
    """A JSON object from the upstream; an error object (vLLM sends one mid-stream when its engine fails) or
    anything else fails the tier with what it said."""
    try:
        out = json.loads(data)
    except ValueError as exc:
        raise _broken(f"{what}: {exc} in {data[:80]!r}") from None
    if not isinstance(out, dict):
        raise _broken(f"{what}: a JSON {type(out).__name__}")
    if out.get("error") or out.get("object") == "error":
        raise TierError("cloud", "UNAVAILABLE", f"the upstream failed the request: {_error_message(data)}")
    return out


def _choices(out: dict, what: str) -> list[dict]:
    choices = out.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise _broken(f"{what}: choices is not a list of objects")
    return choices


def _finish_reason(reason) -> str:
    """The upstream's finish_reason as the wire knows it: "stop" or "length". A reason for giving up fails the
    tier, and so does none (OpenAI's answers always say one): "length" would tell the client its text was cut at
    max_tokens, "stop" that it is whole, and neither is the upstream's word. Any other (TGI's "eos_token",
    OpenAI's "content_filter") is the model's own end of its answer: "stop"."""
    if not isinstance(reason, str) or not reason:
        raise _broken(f"finish_reason: {reason!r}, so whether its text is whole is unknown")
    if reason in FINISH_REASONS:
        return reason
    if reason in FAILED_REASONS:
        raise TierError("cloud", "UNAVAILABLE", f"the upstream gave up on the request (finish_reason {reason!r})")
    return "stop"


def _tokens_of(usage: dict, name: str) -> int:
    value = usage.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
            (isinstance(value, float) and not value.is_integer()):
        raise _broken(f"usage.{name}: {value!r} is no count of tokens")
    return int(value)


def _usage(usage, counted: int | None) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) from an answer's `usage`. A whole answer must have it (OpenAI's does, and
    every engine's): 0 would be read as no tokens spent, and quotas charge what usage says. A stream has it only
    where the upstream honours `stream_options.include_usage`; without it the completion tokens are `counted`, and
    the prompt's, which only the upstream's tokenizer can count, 0."""
    if usage is None:
        if counted is None:
            raise _broken("usage: none, so the tokens it took are unknown")
        return 0, counted
    if not isinstance(usage, dict):
        raise _broken(f"usage: a JSON {type(usage).__name__}")
    return _tokens_of(usage, "prompt_tokens"), _tokens_of(usage, "completion_tokens")


class _Gap(Exception):
    """Logprobs that do not cover the tokens they come with: one without its value, lists that do not line up."""


def _is_logprob(value) -> bool:
    """A number JSON can carry (vLLM sends -9999.0 for a probability of 0, never -Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _alternatives(items, where: str) -> list[tuple[str, float]]:
    out = []
    for token, value in items:
        if not isinstance(token, str) or not _is_logprob(value):
            raise _Gap(f"{where}: an alternative {token!r} without its log-probability ({value!r})")
        out.append((token, float(value)))
    return sorted(out, key=lambda item: -item[1])


def _token_logprobs(logprobs) -> tuple[list[TokenLogprob], bool] | None:
    """The tokens of one choice's (or one stream event's) `logprobs`, each with its log-probability and every
    alternative given, most likely first, and whether alternatives were given; None when there are none (null,
    absent, or an object of nulls: `transformers serve`, TGI). Two shapes: OpenAI's completions object (`tokens`,
    `token_logprobs`, `top_logprobs`: vLLM, llama.cpp server now) and the chat one (`content: [{token, logprob,
    top_logprobs}]`: llama.cpp server before). _Gap when they do not cover their tokens."""
    if logprobs is None:
        return None
    if not isinstance(logprobs, dict):
        raise _Gap(f"logprobs: a JSON {type(logprobs).__name__}, not an object")
    if all(logprobs.get(key) is None for key in ("content", "tokens", "token_logprobs")):
        return None
    if logprobs.get("content") is not None:
        entries = logprobs["content"]
        if not isinstance(entries, list):
            raise _Gap(f"logprobs.content: a JSON {type(entries).__name__}, not a list")
        out, given = [], True
        for i, entry in enumerate(entries):
            entry = entry if isinstance(entry, dict) else {}
            token, value, alternatives = entry.get("token"), entry.get("logprob"), entry.get("top_logprobs")
            if not isinstance(token, str) or not _is_logprob(value):
                raise _Gap(f"logprobs.content[{i}]: token {token!r} without its log-probability ({value!r})")
            if alternatives is not None and not (isinstance(alternatives, list) and
                                                 all(isinstance(a, dict) for a in alternatives)):
                raise _Gap(f"logprobs.content[{i}].top_logprobs: not a list of objects")
            given = given and alternatives is not None
            out.append(TokenLogprob(token, float(value), _alternatives(
                ((a.get("token"), a.get("logprob")) for a in alternatives or ()), f"logprobs.content[{i}]")))
        return out, given
    tokens, values, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values) or \
            (tops is not None and (not isinstance(tops, list) or len(tops) != len(tokens))):
        sizes = ", ".join(f"{name} {len(v) if isinstance(v, list) else repr(v)}"
                          for name, v in (("tokens", tokens), ("token_logprobs", values), ("top_logprobs", tops)))
        raise _Gap(f"logprobs: lists that do not line up ({sizes})")
    out = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        top = tops[i] if tops is not None else {}
        if not isinstance(token, str) or not _is_logprob(value) or not isinstance(top, dict):
            raise _Gap(f"logprobs: token {i} ({token!r}) without its log-probability ({value!r}) or alternatives")
        out.append(TokenLogprob(token, float(value), _alternatives(top.items(), f"logprobs.top_logprobs[{i}]")))
    return out, tops is not None


class _Logprobs:
    """An answer's token logprobs, as its choice (or its stream's events, one by one) brings them: those of every
    token of its text, or none (not sent, or `gap`: not all)."""

    def __init__(self):
        self.tokens: list[TokenLogprob] = []
        self.sent = False  # an event carried some
        self.unsent = False  # an event with text carried none
        self.alternatives = True  # every event that carried some gave alternatives
        self.gap = ""  # why they do not cover the answer

    def add(self, logprobs, text: str) -> None:
        try:
            got = _token_logprobs(logprobs)
            if got is None:
                self.unsent = self.unsent or bool(text)
            elif text and not got[0]:
                raise _Gap(f"text {text[:20]!r} with no token in its logprobs")
            else:
                self.sent, self.alternatives = True, self.alternatives and got[1]
                self.tokens += got[0]
            if self.sent and self.unsent:
                raise _Gap("text without logprobs beside text with them")
        except _Gap as exc:
            self.gap = self.gap or str(exc)

    @property
    def whole(self) -> list[TokenLogprob] | None:
        """Every token's, or None."""
        return None if self.gap or self.unsent else self.tokens

    def check(self, params: GenerationParams) -> None:
        """A client that asked for logprobs gets them all or an error: the request's own (INVALID_ARGUMENT naming
        the parameter) when the upstream sends none, as an engine answers a parameter it does not serve; the
        upstream's (UNAVAILABLE: the router moves on) when it sent some tokens' only."""
        if not params.logprobs:
            return
        if self.gap:
            raise _broken(f"its logprobs do not cover its text: {self.gap}")
        if self.unsent:
            raise RequestError("parameters.logprobs", "not served here: the cloud tier's upstream engine returns no "
                                                      "logprobs (transformers serve and TGI compute none); ask "
                                                      "without them")
        if params.top_logprobs and self.sent and not self.alternatives:
            raise RequestError("parameters.top_logprobs", "not served here: the cloud tier's upstream engine "
                                                          "returns no alternatives with its logprobs; ask with "
                                                          "top_logprobs 0")


def _result(body: bytes, params: GenerationParams, started: float) -> GenerationResult:
    """A whole answer's body as the result; anything but an OpenAI completion fails the tier."""
    out = _parsed(body, "its body")
    choices = _choices(out, "its body")
    if not choices:
        raise _broken(f"no choices in {body[:80]!r}")
    text = choices[0].get("text")
    if not isinstance(text, str):
        raise _broken(f"choices[0].text: {text!r}, not a string")
    logprobs = _Logprobs()
    logprobs.add(choices[0].get("logprobs"), text)
    return _assemble(text, logprobs, choices[0].get("finish_reason"), out.get("usage"),
                     time.perf_counter() - started, started, params, counted=None)


def _assemble(text: str, logprobs: _Logprobs, reason, usage, first_s: float, started: float,
              params: GenerationParams, counted: int | None) -> GenerationResult:
    """`counted`: a stream's chunks, for an upstream that reports no usage (`transformers serve` without
    stream_options): one token each, as vLLM, TGI and transformers serve send, or as many as its logprobs. The
    upstream's faults first (UNAVAILABLE), then what the request asked that it does not serve."""
    finish_reason = _finish_reason(reason)
    tokens = logprobs.whole
    lp = [min(0.0, max(t.logprob, MIN_LOGPROB)) for t in tokens or ()]
    prompt_tokens, completion_tokens = _usage(usage, None if counted is None else max(counted, len(lp)))
    logprobs.check(params)
    return GenerationResult(
        text=text, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, confidence=math.exp(min(lp)) if lp else 0.0,
        mean_logprob=sum(lp) / len(lp) if lp else 0.0, first_token_s=first_s, total_s=time.perf_counter() - started,
        logprobs=[TokenLogprob(t.token, t.logprob, t.top[:params.top_logprobs]) for t in tokens or ()]
        if params.logprobs else None)


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body)
        return str((err.get("error") or {}).get("message") or err.get("detail") or err)[:300]
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")
