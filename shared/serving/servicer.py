"""The InferenceService of one tier: validation, the result cache, batching, streaming, statuses.

Every tier (cloud, edge, device) serves this servicer around its engine, over gRPC and over
NATS alike (shared/serving/process.py). Requests are validated field by field
(INVALID_ARGUMENT naming the field), unary calls and streams alike queued in the tier's
iteration-level scheduler (shared/runtime/scheduler.py), and exceptions become
statuses in exactly one place (`status_of`), for both transports.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator

import grpc
from google.protobuf.message import DecodeError

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_shared.config.manifest import LimitsConfig, TierConfig
from tierline_shared.runtime.engine import (
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_TEMPERATURE,
    Engine,
    EngineError,
    GenerationParams,
    GenerationResult,
    prompt_ids,
)
from tierline_shared.runtime.engine_core import EngineCoreDied
from tierline_shared.runtime.scheduler import (
    END,
    BatchConfig,
    BatchedResult,
    DeadlineExceeded,
    Piece,
    QueueFull,
    Retired,
    Scheduler,
)
from tierline_shared.transport.grpc_server import DEFAULT_WORKERS
from tierline_shared.transport.messaging import TierError

MAX_WAIT_S = 3600.0  # seconds, the longest a tier keeps one request, whatever deadline its caller set
NO_DEADLINE_S = 1e12  # gRPC reports a call without a deadline as about 9.2e18 seconds left
STREAM_POLL_S = 0.5  # how often a stream waiting for its next chunk checks that the client is still there
MAX_OPEN_STREAMS = DEFAULT_WORKERS // 2  # gRPC handler threads streams may hold; the rest stay for unary calls
STALLED_STREAM_S = 10.0  # seconds: a stream whose client has not taken its last chunk for this long is cancelled


class RequestError(ValueError):
    """A request field that cannot be served; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def validate_request(req: pb.InferRequest, limits: LimitsConfig, model_name: str,
                     max_context: int | None = None) -> None:
    """The checks that need no model (the router runs these; `max_context`, when known, bounds max_tokens
    before the prompt is counted); RequestError names the field."""
    if not req.prompt:
        raise RequestError("prompt", "must not be empty")
    if len(req.prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"{len(req.prompt)} characters exceeds the limit of {limits.max_prompt_chars}")
    if len(req.draft) > limits.max_prompt_chars:
        raise RequestError("draft", f"{len(req.draft)} characters exceeds the limit of {limits.max_prompt_chars}")
    for name in ("request_id", "model"):
        if len(getattr(req, name)) > limits.max_id_chars:
            raise RequestError(name, f"{len(getattr(req, name))} characters exceeds the limit of {limits.max_id_chars}")
    if req.model and req.model != model_name:
        raise RequestError("model", f"unknown model {req.model!r}; this server serves {model_name!r}")
    p = req.parameters
    if not (p.temperature == 0 or MIN_TEMPERATURE <= p.temperature <= MAX_TEMPERATURE):
        raise RequestError("parameters.temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                                     f"{MAX_TEMPERATURE:g}], got {p.temperature}")
    if p.HasField("seed") and not 0 <= p.seed <= MAX_SEED:
        raise RequestError("parameters.seed", f"must be in [0, {MAX_SEED}], got {p.seed}")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):
        raise RequestError("parameters.top_p", f"must be in (0, 1], got {top_p}")
    max_tokens = resolved_max_tokens(req, limits)
    if max_tokens <= 0:
        raise RequestError("parameters.max_tokens", f"must be > 0, got {max_tokens}")
    if limits.max_tokens and max_tokens > limits.max_tokens:
        raise RequestError("parameters.max_tokens", f"{max_tokens} exceeds the limit of {limits.max_tokens}")
    if max_context and max_tokens >= max_context:
        raise RequestError("parameters.max_tokens", f"this model's maximum context length is {max_context} tokens; "
                                                    f"max_tokens {max_tokens} leaves no room for the prompt")
    if not 0 <= p.n <= limits.max_n:
        raise RequestError("parameters.n", f"must be in [1, {limits.max_n}] (0 means 1), got {p.n}")
    if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError("parameters.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs}")
    if p.top_logprobs and not p.logprobs:
        raise RequestError("parameters.top_logprobs", "needs parameters.logprobs")
    if p.attention_window < 0:
        raise RequestError("parameters.attention_window", f"must be >= 0, got {p.attention_window}")
    if len(p.stop) > limits.max_stop:
        raise RequestError("parameters.stop", f"{len(p.stop)} stop strings exceeds the limit of {limits.max_stop}")
    if any(not s for s in p.stop):
        raise RequestError("parameters.stop", "stop strings must not be empty")
    if any(len(s) > limits.max_stop_chars for s in p.stop):
        raise RequestError("parameters.stop", f"a stop string exceeds the limit of {limits.max_stop_chars} characters")
    if req.priority not in pb.Priority.values():
        raise RequestError("priority", f"unknown priority {req.priority}")


def resolved_max_tokens(req: pb.InferRequest, limits: LimitsConfig) -> int:
    """The request's max_tokens, or the manifest's default when it sets none (also what quotas reserve)."""
    p = req.parameters
    return p.max_tokens if p.HasField("max_tokens") else limits.default_max_tokens


def validate(req: pb.InferRequest, engine: Engine, limits: LimitsConfig, model_name: str) -> GenerationParams:
    """GenerationParams for a request, or RequestError naming the first bad field."""
    validate_request(req, limits, model_name)
    p = req.parameters
    if p.attention_window > engine.info.window_limit:
        raise RequestError("parameters.attention_window",
                           f"{p.attention_window} exceeds the model's limit of {engine.info.window_limit}")
    if p.n > 1:
        raise RequestError("parameters.n", f"a tier answers one choice per request, got {p.n} (the router serves "
                                           "n > 1)")
    if engine.tokenizer.unknown_count(req.prompt):
        raise RequestError("prompt", "contains characters outside the model's vocabulary")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    specials = req.add_special_tokens if req.HasField("add_special_tokens") else True
    max_tokens = resolved_max_tokens(req, limits)
    if not p.HasField("max_tokens") and engine.info.max_context:  # the default, within the room the prompt leaves
        room = engine.info.max_context - len(prompt_ids(engine.tokenizer, req.prompt, specials))
        if room < 1:  # the prompt alone fills the context: its own fault, not that of a max_tokens never sent
            raise RequestError("prompt", f"{engine.info.max_context - room} tokens; this model's maximum context "
                                         f"length is {engine.info.max_context} tokens, which leaves no room for an "
                                         "answer: reduce the prompt")
        max_tokens = min(max_tokens, room)
    params = GenerationParams(max_tokens=max_tokens, temperature=p.temperature, top_p=top_p,
                              stop=tuple(p.stop), seed=p.seed if p.HasField("seed") else None,
                              attention_window=p.attention_window, logprobs=p.logprobs, top_logprobs=p.top_logprobs,
                              draft=req.draft, add_special_tokens=specials)
    try:
        engine.check(req.prompt, params)
    except EngineError as exc:
        raise RequestError(exc.field, str(exc)) from None
    return params


def _so_far(item: str) -> pb.Usage | None:
    """A stream chunk's usage: its sequence's tokens so far, when the engine said (a `Piece`)."""
    if not isinstance(item, Piece):
        return None
    return pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens)


def caller_deadline(remaining: float | None) -> float | None:
    """A caller's time left, as the tier keeps to it: None when it set no deadline (the tier's own default
    applies), else at most MAX_WAIT_S (a deadline far away must not overflow the clocks it is added to)."""
    if remaining is None or not math.isfinite(remaining) or remaining >= NO_DEADLINE_S:
        return None
    return max(0.0, min(remaining, MAX_WAIT_S))


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The one place a tier's exceptions become statuses: the gRPC code and the message to send
    (the gRPC methods abort with it; the NATS service puts it in its error headers)."""
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DecodeError):  # bytes over NATS that are not an InferRequest
        return grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid tierline.v1.InferRequest (protobuf)"
    if isinstance(exc, TierError):  # a tier above answered with an error: pass its status on
        return getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN), exc.message
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineCoreDied):  # another replica, or the tier above, may answer
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (DeadlineExceeded, futures.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the answer was ready"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def as_tier_error(tier: str, exc: Exception) -> TierError:
    """A tier's own exception as the TierError a remote tier would have answered (the device's local model)."""
    if isinstance(exc, TierError):
        return exc
    code, message = status_of(exc)
    return TierError(tier, code.name, message)


class LRUCache:
    """The exact-repeat result cache: a thread-safe LRU of answers (size 0 = off)."""

    def __init__(self, size: int):
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class StreamGuard:
    """Bounds what gRPC streams can take from a tier's threads.

    A stream's handler thread blocks while it hands a chunk to a client that does not read
    (HTTP/2 flow control), so clients that open streams and never read could hold every thread
    and starve the unary calls. At most `limit` streams are open at once (beyond: RESOURCE_EXHAUSTED
    at once), and a stream whose client has not taken a chunk for `stall_s` seconds is cancelled,
    which frees its thread.
    """

    def __init__(self, limit: int = MAX_OPEN_STREAMS, stall_s: float = STALLED_STREAM_S):
        self.limit, self.stall_s = limit, stall_s
        self._slots = threading.BoundedSemaphore(limit)
        self._handing: dict = {}  # gRPC context -> when its current chunk was handed over (monotonic)
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def open(self) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="stream-guard", daemon=True)
                self._watcher.start()
        return True

    def handing(self, context) -> None:
        with self._lock:
            self._handing[context] = time.monotonic()

    def taken(self, context) -> None:
        with self._lock:
            self._handing.pop(context, None)

    def close(self, context) -> None:
        self.taken(context)
        self._slots.release()

    def _watch(self) -> None:
        while True:
            time.sleep(self.stall_s / 4)
            now = time.monotonic()
            with self._lock:
                stalled = [c for c, since in self._handing.items() if now - since > self.stall_s]
                for c in stalled:
                    del self._handing[c]
            for c in stalled:
                c.cancel()  # the blocked send returns; the stream's generator closes and frees its slot


def _cache_key(req: pb.InferRequest, params: GenerationParams) -> tuple | None:
    """What a greedy answer is cached under (its parameters as validated for the model that answers); None for a
    sampled request, which is never cached."""
    return (req.prompt, params.add_special_tokens, params.max_tokens, params.stop, params.attention_window,
            params.logprobs, params.top_logprobs) if params.greedy else None


@dataclass(frozen=True)
class Served:
    """The model a tier serves and what belongs to it: its engine, the scheduler that runs it and the result cache
    of its answers. Replaced as a whole (a device's model update: `DeviceAgentServicer.swap_engine`), and read once
    per request, which is validated, queued, answered, labelled and cached with the same model's."""

    engine: Engine
    scheduler: object  # a Scheduler, or another with its submit/ticket interface (an EngineCore, an upstream)
    cache: LRUCache


class TierServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, batch: BatchConfig | None = None, limits: LimitsConfig | None = None,
                 cache_size: int = TierConfig.cache_size, default_timeout_s: float = TierConfig.timeout_ms / 1000,
                 metrics=None, scheduler=None):
        self.limits = limits or LimitsConfig()
        self.batch_config = batch or BatchConfig()
        self.metrics = metrics
        # `scheduler`: another with the same submit/ticket interface (the cloud's upstream forwarder)
        self.served = Served(engine, scheduler or Scheduler(engine, self.batch_config,
                                                            on_step=metrics.observe_step if metrics else None),
                             LRUCache(cache_size))
        self.default_timeout_s = default_timeout_s
        self.streams = StreamGuard()

    # the model served now (a request in flight keeps the one it was queued with: `Served`)
    @property
    def engine(self) -> Engine:
        return self.served.engine

    @property
    def scheduler(self):
        return self.served.scheduler

    @property
    def cache(self) -> LRUCache:
        return self.served.cache

    def serve_nats(self, req: pb.InferRequest, timeout_s: float | None) -> futures.Future:
        """One request that came over NATS (from the router or a device's front door), without a thread
        waiting on it: a future of the response, resolved when the scheduler finishes the request."""
        return self.begin(req, timeout_s)

    def serve_nats_stream(self, req: pb.InferRequest, is_active=lambda: True) -> Iterator[pb.InferResponse]:
        """One stream that came over NATS (from the router): its chunks, as `stream` makes them."""
        return self.stream(req, is_active)

    def handle(self, req: pb.InferRequest, timeout_s: float | None, on_abandon=None) -> pb.InferResponse:
        """Serve one request and wait for it; raises on failure.

        `on_abandon(callback)` lets the transport register what to call when the client goes away; False from it
        (gRPC's add_callback on an RPC already over) cancels the request at once.
        """
        answer = self.begin(req, timeout_s)
        if on_abandon is not None and on_abandon(answer.cancel) is False:
            answer.cancel()  # the client went away before its callback was registered (gRPC: add_callback False)
        try:
            return answer.result(timeout=self._timeout(timeout_s))
        except futures.TimeoutError:
            answer.timed_out = True  # counted as the caller's DEADLINE_EXCEEDED, not as a cancel (`finished`)
            answer.cancel()  # stops the row at its next decode step
            raise DeadlineExceeded("deadline exceeded before the answer was ready") from None
        except futures.CancelledError:  # the client went away (`on_abandon`): counted as a cancel
            raise DeadlineExceeded("cancelled before the answer was ready") from None

    def begin(self, req: pb.InferRequest, timeout_s: float | None) -> futures.Future:
        """Validate, look the result cache up, and queue the request: a future of its response.

        Bad input raises here. The response is built in the scheduler's thread when the request
        finishes; cancelling the future takes the request out of the batch at the next step.
        """
        t0 = time.perf_counter()
        try:
            served, params = self._validated(req)  # one model from here to the answer's label and cache
            request_id = req.request_id or uuid.uuid4().hex
            key = _cache_key(req, params)
            hit = served.cache.get(key) if key else None
            if key and self.metrics:
                self.metrics.cache_lookup(hit is not None)
            answer: futures.Future = futures.Future()
            if hit is not None:
                resp = pb.InferResponse()
                resp.CopyFrom(hit)
                resp.request_id, resp.cached = request_id, True
                total_s = time.perf_counter() - t0
                resp.timings.CopyFrom(pb.Timings(total_ms=total_s * 1000))
                if self.metrics:
                    self.metrics.observe_cached(total_s)
                answer.set_result(resp)
                return answer
            served, params, ticket = self._queued(req, served, params, timeout_s)
            key = _cache_key(req, params)  # as the model that runs it validated it (an update may have come)
        except Exception as exc:  # bad input or a full queue: refused before any work
            self._failed(exc)
            raise

        def finished(done: futures.Future) -> None:
            if not answer.set_running_or_notify_cancel():  # the caller cancelled it, or gave up waiting
                self._failed(DeadlineExceeded("") if getattr(answer, "timed_out", False) else futures.CancelledError())
                return
            try:
                out: BatchedResult = done.result()
                resp = self._response(request_id, out, t0, served.engine.info)
                self._observe(out, resp.timings)
                if key:  # a copy: callers annotate the answer they get (the device's front door does)
                    stored = pb.InferResponse()
                    stored.CopyFrom(resp)
                    served.cache.put(key, stored)
            except Exception as exc:  # noqa: BLE001 - the request's own failure, for its caller
                self._failed(exc)
                answer.set_exception(exc)
            else:
                answer.set_result(resp)

        answer.add_done_callback(lambda f: f.cancelled() and ticket.cancel())
        ticket.future.add_done_callback(finished)
        return answer

    def _timeout(self, timeout_s: float | None) -> float:
        timeout = caller_deadline(timeout_s)
        return self.default_timeout_s if timeout is None else timeout

    def _observe(self, out: BatchedResult, timings: pb.Timings) -> None:
        if self.metrics:
            r = out.result
            self.metrics.observe_response(timings.first_token_ms / 1000, timings.total_ms / 1000, out.queue_s,
                                          r.prompt_tokens, r.completion_tokens)

    def _failed(self, exc: BaseException) -> None:
        """A request that ended without an answer, counted with the status its caller gets."""
        if self.metrics:
            code = "CANCELLED" if isinstance(exc, futures.CancelledError) else status_of(exc)[0].name
            self.metrics.observe_failure(code)

    def _validated(self, req: pb.InferRequest) -> tuple[Served, GenerationParams]:
        """The model served now and the request's parameters, validated against it; again if an update replaced it
        meanwhile (a request is queued on the model it read: `_queued`)."""
        while True:
            served = self.served
            params = validate(req, served.engine, self.limits, served.engine.info.model)
            if served is self.served:
                return served, params

    def _queued(self, req: pb.InferRequest, served: Served, params: GenerationParams, timeout_s: float | None,
                stream: bool = False):
        """Queue `req` on the model it was validated against; if an update replaced that model since it was read,
        its scheduler takes no new request (`Scheduler.retire`): validated again and queued on the new one (whose
        result cache starts empty: nothing to look up)."""
        while True:
            try:
                return served, params, served.scheduler.submit(req.prompt, params, priority=_priority(req),
                                                               timeout_s=self._timeout(timeout_s), stream=stream)
            except Retired:
                served, params = self._validated(req)

    @staticmethod
    def _response(request_id: str, out: BatchedResult, t0: float, info) -> pb.InferResponse:
        """The answer of the model `info` describes (the one that ran it)."""
        r = out.result
        total_ms = (time.perf_counter() - t0) * 1000
        usage = pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                         cached_tokens=r.cached_tokens)
        return pb.InferResponse(
            request_id=request_id,
            choices=[pb.Choice(text=r.text, finish_reason=r.finish_reason, logprobs=wire_logprobs(r))],
            usage=usage, tier=info.tier, model=info.model, model_version=info.version, confidence=r.confidence,
            escalation_path=[pb.Attempt(tier=info.tier, outcome="answered", confidence=r.confidence, usage=usage)],
            timings=pb.Timings(queue_ms=out.queue_s * 1000, first_token_ms=out.queue_s * 1000 + r.first_token_s * 1000,
                               total_ms=total_ms),
        )

    # -- gRPC methods -------------------------------------------------------------------------------
    def Infer(self, request, context):
        try:
            return self.handle(request, context.time_remaining(),
                               on_abandon=lambda cancel: context.add_callback(cancel))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status here
            code, msg = status_of(exc)
            context.abort(code, msg)

    def stream(self, request: pb.InferRequest, is_active=lambda: True,
               timeout_s: float | None = None) -> Iterator[pb.InferResponse]:
        """Chunks as tokens are generated, then a final message with finish_reason and usage.

        Validation errors raise before the first chunk; `is_active()` False stops generating.
        The stream is one more sequence in the scheduler's running batch: each step puts its
        new text on the ticket's queue, so a slow reader never holds the engine (the queue
        holds at most max_tokens chunks, the scheduler never waits for it).
        """
        t0 = time.perf_counter()
        try:
            served, params = self._validated(request)  # one model for the whole stream (`Served`)
            served, params, ticket = self._queued(request, served, params, timeout_s, stream=True)
        except Exception as exc:  # bad input or a full queue: refused before any work
            self._failed(exc)
            raise
        request_id = request.request_id or uuid.uuid4().hex
        info = served.engine.info
        ended = False  # the scheduler said its last word (END); otherwise the client went away first
        try:
            while True:
                try:
                    item = ticket.chunks.get(timeout=STREAM_POLL_S)
                except queue.Empty:
                    if not is_active():
                        return
                    continue
                if item is END:
                    ended = True
                    break
                if not is_active():
                    return  # the client went away: stop generating
                yield pb.InferResponse(request_id=request_id, choices=[pb.Choice(text=item)], tier=info.tier,
                                       model=info.model, model_version=info.version, usage=_so_far(item))
        finally:
            if not ended:  # counted once, as cancelled, even when the answer was ready but never reached it
                if not ticket.future.done():
                    ticket.cancel()  # the sequence leaves the batch at the next step
                self._failed(futures.CancelledError())
        try:
            out: BatchedResult = ticket.future.result()  # the request's own error, if it failed
        except Exception as exc:
            self._failed(exc)
            raise
        r = out.result
        timings = pb.Timings(queue_ms=out.queue_s * 1000, first_token_ms=(out.queue_s + r.first_token_s) * 1000,
                             total_ms=(time.perf_counter() - t0) * 1000)
        self._observe(out, timings)
        yield pb.InferResponse(
            request_id=request_id,
            choices=[pb.Choice(text="", finish_reason=r.finish_reason, logprobs=wire_logprobs(r))],
            usage=pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                           cached_tokens=r.cached_tokens),
            tier=info.tier, model=info.model, model_version=info.version, confidence=r.confidence, timings=timings,
        )

    def serve_stream(self, request: pb.InferRequest, is_active=lambda: True,
                     timeout_s: float | None = None) -> Iterator[pb.InferResponse]:
        """The chunks of one gRPC stream (`InferStream`): this tier's model's, as `stream` makes them (a device's
        front door takes its cascade instead)."""
        return self.stream(request, is_active, timeout_s)

    def InferStream(self, request, context):
        if not self.streams.open():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many open streams ({self.streams.limit}) on this server; retry later")
        try:
            for chunk in self.serve_stream(request, context.is_active, context.time_remaining()):
                self.streams.handing(context)
                yield chunk
                self.streams.taken(context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status here
            code, msg = status_of(exc)
            context.abort(code, msg)
        finally:
            self.streams.close(context)

    def GetServerInfo(self, request, context):
        info, b = self.engine.info, self.batch_config
        return pb.ServerInfo(tier=info.tier, model=info.model, model_version=info.version,
                             max_context=info.max_context, max_prompt_chars=self.limits.max_prompt_chars,
                             max_tokens_limit=self.limits.max_tokens or max(0, info.max_context - 1),
                             attention_window_limit=info.window_limit,
                             max_batch_size=b.max_num_seqs, max_queue=b.max_queue)


def wire_logprobs(r: GenerationResult) -> list[pb.TokenLogprob]:
    """A result's token log-probabilities as the wire carries them (none unless the request asked)."""
    return [pb.TokenLogprob(token=t.token, logprob=t.logprob,
                            top_logprobs=[pb.TokenLogprob(token=a, logprob=lp) for a, lp in t.top])
            for t in r.logprobs or ()]


def _priority(req: pb.InferRequest) -> int:
    """PRIORITY_UNSPECIFIED is served as NORMAL (the proto's promise), not below LOW."""
    return int(req.priority) or pb.PRIORITY_NORMAL
