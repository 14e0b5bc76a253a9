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
stays away is UNAVAILABLE too, which the router's cascade handles as any failing tier.

Confidence is the lowest probability of a chosen token, from the logprobs the upstream returns for
`logprobs: 1` (vLLM, TGI and llama.cpp server do); `transformers serve` returns none: then it is 0.0, which
changes nothing for the cloud, the top tier, whose answers are always kept.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tierline_shared.config.manifest import BatchConfig, UpstreamConfig
from tierline_shared.runtime.engine import EngineInfo, GenerationParams, GenerationResult, TokenLogprob
from tierline_shared.runtime.scheduler import END, BatchedResult, DeadlineExceeded, QueueFull
from tierline_shared.serving.servicer import RequestError
from tierline_shared.transport.messaging import TierError

RETRY_WAIT_S = 0.2  # between two attempts (at most what is left of the deadline)
REFUSED_REQUEST = (400, 413, 422)  # what an upstream says of the request itself (INVALID_ARGUMENT); other 4xx: of us


class _AnyText:
    """The tokenizer question the servicer asks (characters outside the vocabulary): the upstream answers it."""

    @staticmethod
    def unknown_count(_text: str) -> int:
        return 0


class UpstreamEngine:
    """What the servicer asks of an engine, for a model that runs elsewhere: its name and limits."""

    def __init__(self, info: EngineInfo):
        self.info, self.tokenizer = info, _AnyText()

    def check(self, prompt: str, params: GenerationParams) -> None:
        """The upstream checks its own context (its 400 comes back as INVALID_ARGUMENT)."""

    def enable_prefix_cache(self, *_args) -> None:
        """The upstream keeps its own KV (vLLM's prefix caching)."""


@dataclass
class UpstreamTicket:
    future: Future
    chunks: queue.Queue | None
    abandoned: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.abandoned.set()
        self.future.cancel()


class _Retryable(Exception):
    """A connection error or a 5xx: another attempt may succeed."""


class UpstreamScheduler:
    """Requests forwarded to the upstream on at most `max_num_seqs` threads, with the scheduler's interface."""

    def __init__(self, config: UpstreamConfig, model: str, batch: BatchConfig):
        self.config, self.model, self.batch = config, model, batch
        url = urlsplit(config.url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream.url: {config.url!r} is not an http(s) URL")
        self._url = url
        self._token = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self._pool = ThreadPoolExecutor(batch.max_num_seqs, thread_name_prefix="upstream")
        self._lock = threading.Lock()
        self._waiting = self._running = 0

    @property
    def depth(self) -> int:
        with self._lock:
            return self._waiting

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt: str, params: GenerationParams, priority: int = 0, timeout_s: float | None = None,
               stream: bool = False) -> UpstreamTicket:
        with self._lock:
            if self._waiting >= self.batch.max_queue:
                raise QueueFull(f"queue full ({self.batch.max_queue} requests waiting)")
            self._waiting += 1
        ticket = UpstreamTicket(Future(), queue.Queue() if stream else None)
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 600.0)
        self._pool.submit(self._serve, prompt, params, deadline, ticket, time.perf_counter())
        return ticket

    # -- one request ---------------------------------------------------------------------------------
    def _serve(self, prompt: str, params: GenerationParams, deadline: float, ticket: UpstreamTicket,
               enqueued: float) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1
        try:
            if not ticket.future.set_running_or_notify_cancel():
                return
            started = time.perf_counter()
            try:
                result = self._with_retries(self._body(prompt, params, ticket.chunks is not None), deadline,
                                            ticket, started)
            except Exception as exc:  # noqa: BLE001 - the request's own failure, for its caller
                ticket.future.set_exception(exc)
            else:
                if not params.logprobs:
                    result.logprobs = None
                ticket.future.set_result(BatchedResult(result, started - enqueued, 1))
            finally:
                if ticket.chunks is not None:
                    ticket.chunks.put(END)
        finally:
            with self._lock:
                self._running -= 1

    def _body(self, prompt: str, params: GenerationParams, stream: bool) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "logprobs": max(1, params.top_logprobs),
                "stream": stream}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _with_retries(self, body: dict, deadline: float, ticket: UpstreamTicket, started: float) -> GenerationResult:
        why = "no attempt"
        for attempt in range(self.config.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"deadline passed waiting for the upstream ({why})")
            try:
                return self._post(body, left, ticket, started)
            except _Retryable as exc:
                why = str(exc)
                if attempt < self.config.retries:
                    time.sleep(min(RETRY_WAIT_S, max(0.0, deadline - time.monotonic())))
        raise TierError("cloud", "UNAVAILABLE", f"the upstream {self.config.url} did not answer: {why}")

    def _post(self, body: dict, timeout_s: float, ticket: UpstreamTicket, started: float) -> GenerationResult:
        u = self._url
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname, u.port, timeout=timeout_s)
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            conn.request("POST", f"{u.path}/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            if resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status == 429:  # its rate limit or its full queue: another replica, or another tier, may answer
                raise QueueFull(f"the upstream is busy (HTTP 429): {_error_message(resp.read())}")
            if resp.status in REFUSED_REQUEST:
                raise RequestError("request", f"the upstream refused it (HTTP {resp.status}): "
                                              f"{_error_message(resp.read())}")
            if resp.status >= 400:  # 401, 403, 404...: the tier's own setup (its key, its URL), not the request
                raise TierError("cloud", "UNAVAILABLE", f"the upstream {self.config.url} refused the tier "
                                                        f"(HTTP {resp.status}): {_error_message(resp.read())}")
            if body["stream"]:
                return self._read_stream(resp, ticket, started)
            return _result(json.loads(resp.read()), started)
        except (OSError, http.client.HTTPException) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    def _read_stream(self, resp, ticket: UpstreamTicket, started: float) -> GenerationResult:
        text, probs, reason, first, usage, tokens = [], [], "length", 0.0, {}, []
        for raw in resp:
            line = raw.strip()
            if ticket.abandoned.is_set():
                return _assemble(text, probs, "cancelled", usage, first, started, tokens)
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter() - started
                    text.append(choice["text"])
                    ticket.chunks.put(choice["text"])
                probs += _probs(choice.get("logprobs"))
                tokens += _token_logprobs(choice.get("logprobs"))
                reason = choice.get("finish_reason") or reason
        return _assemble(text, probs, reason, usage, first, started, tokens)


def _probs(logprobs) -> list[float]:
    """Chosen tokens' probabilities from an OpenAI completions `logprobs` object (absent: none)."""
    values = (logprobs or {}).get("token_logprobs") or []
    return [math.exp(v) for v in values if isinstance(v, (int, float))]


def _token_logprobs(logprobs) -> list[TokenLogprob]:
    """The tokens, their log-probabilities and alternatives from an OpenAI completions `logprobs` object."""
    lp = logprobs or {}
    tokens, values, tops = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    out = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        if isinstance(token, str) and isinstance(value, (int, float)):
            top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
            out.append(TokenLogprob(token, float(value), sorted(((a, float(b)) for a, b in top.items()),
                                                                key=lambda item: -item[1])))
    return out


def _result(out: dict, started: float) -> GenerationResult:
    choice = out["choices"][0]
    elapsed = time.perf_counter() - started
    return _assemble([choice.get("text") or ""], _probs(choice.get("logprobs")),
                     choice.get("finish_reason") or "length", out.get("usage") or {}, elapsed, started,
                     _token_logprobs(choice.get("logprobs")))


def _assemble(text: list[str], probs: list[float], reason: str, usage: dict, first_s: float,
              started: float, tokens: list[TokenLogprob]) -> GenerationResult:
    lp = [math.log(max(p, 1e-12)) for p in probs]
    return GenerationResult(
        text="".join(text), finish_reason=reason, prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or len(probs)),
        confidence=min(probs) if probs else 0.0, mean_logprob=sum(lp) / len(lp) if lp else 0.0,
        first_token_s=first_s, total_s=time.perf_counter() - started, logprobs=tokens)


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body)
        return str((err.get("error") or {}).get("message") or err.get("detail") or err)[:300]
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")
