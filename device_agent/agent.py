"""The device agent's own front door: answer on the board when the policy allows, else go up.

Apps on the board call the agent's gRPC (loopback). The request runs through the router's
cascade (tierline_router.cascade), the same rule the router applies: the device tier is the
board's own LiteRT model, the edge and the cloud are asked over the agent's NATS
connection. When nothing above answers (no responders: at once; a timeout: bounded by the
manifest; no link: at once, `offline`), the board's own answer is given, marked `degraded`,
rather than hanging or failing (the edge fallback users of KubeEdge Sedna ask for). A
stream (InferStream) takes the same way, its first answer kept as the router's streams keep
theirs; a tier above streams to it over NATS. Every answer, unary or streamed, through the
front door or asked by the router over NATS, is one telemetry event (`on_answer`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from tierline_api.v1 import inference_pb2 as pb
from tierline_router.cascade import Cascade, Decision
from tierline_router.policy import Policy
from tierline_shared.config.manifest import RouterConfig
from tierline_shared.runtime.engine import Engine
from tierline_shared.runtime.scheduler import Scheduler
from tierline_shared.serving.servicer import (
    LRUCache,
    Served,
    TierServicer,
    as_tier_error,
    caller_deadline,
    status_of,
    validate_request,
)
from tierline_shared.transport.messaging import Offline, TierError
from tierline_shared.transport.tier_service import TierService
from tierline_shared.wire import TIERS


class DeviceAgentServicer(TierServicer):
    def __init__(self, *args, policy: Policy, upstream_timeout_s: float,
                 retries_per_tier: int = RouterConfig.retries_per_tier, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.upstream_timeout_s = upstream_timeout_s  # one request to a tier above, at most
        self.retries_per_tier = retries_per_tier
        self.link: TierService | None = None  # the NATS link to the tiers above (may be reconnecting)
        self.on_answer = None  # called with each answer, front door or NATS (the fleet agent's telemetry)
        # NATS answers finish in the scheduler's thread: their telemetry (a disk write) is recorded here instead
        self._telemetry = ThreadPoolExecutor(1, thread_name_prefix="telemetry")
        self._swap_lock = threading.Lock()

    def swap_engine(self, engine: Engine) -> None:
        """Serve a new model from now on (an OTA update); requests already queued finish on the old one, which is
        then closed: its runtime freed and its model file unmapped at once, not whenever the garbage collector
        comes to it (a board's memory cap holds one model, not several)."""
        scheduler = Scheduler(engine, self.batch_config, on_step=self.metrics.observe_step if self.metrics else None)
        with self._swap_lock:
            old = self.served
            # in one assignment: a request reads the model it is served by once (`Served`); the old model's answers,
            # those in flight included, are not the new one's, so the cache starts empty
            self.served = Served(engine, scheduler, LRUCache(self.cache.size))

        def retire() -> None:
            old.scheduler.retire()  # what it queued or runs finishes on the old model; a late submit goes to the new
            old.engine.close()

        threading.Thread(target=retire, name="retire-engine", daemon=True).start()

    def answer(self, req: pb.InferRequest, timeout_s: float | None) -> pb.InferResponse:
        """One request from the board's apps, through the cascade: this board's model or the tiers above."""
        asked = self._asked(req, timeout_s)
        cascade = asked.cascade
        while (tier := cascade.next_tier()) is not None:
            if (times := asked.times(tier)) is None:
                break
            left, budget = times
            try:
                if tier == asked.local:
                    cascade.answered(tier, self.handle(req, left))
                else:
                    link = asked.above()
                    req.draft = cascade.draft_for(req, self.limits.max_prompt_chars)
                    cascade.answered(tier, link.request(tier, req, budget, cascade.after_silence))
            except Exception as exc:  # noqa: BLE001 - the cascade sorts failures (and raises what is not one)
                asked.failed(tier, exc, f"no answer in {budget:.2f}s")
        return self._finish(cascade.decision(asked.out_of_time()), asked.score)

    def serve_stream(self, req: pb.InferRequest, is_active=lambda: True,
                     timeout_s: float | None = None) -> Iterator[pb.InferResponse]:
        """A stream from the board's apps (`InferStream`), through the cascade as `answer` takes a request, except
        that the first answer is kept (its text is out as it comes: the router's streams do the same): this board's
        model, or a tier above streaming over NATS (`TierService.stream`, the router's `stream_tier`). Before its
        first chunk a tier that fails is asked again or skipped, and with nothing above answering the board's own
        model streams, `degraded`. The final chunk carries the escalation path; its telemetry event is recorded
        then, once."""
        return self._recorded(self._cascade_stream(req, is_active, timeout_s), via="grpc")

    def _cascade_stream(self, req: pb.InferRequest, is_active, timeout_s: float | None) -> Iterator[pb.InferResponse]:
        asked = self._asked(req, timeout_s, stream=True)
        cascade = asked.cascade
        while (tier := cascade.next_tier()) is not None:
            if (times := asked.times(tier)) is None:
                break
            left, budget = times
            started = False
            try:
                if tier == asked.local:
                    chunks = self.stream(req, is_active, left)
                else:
                    link = asked.above()
                    req.draft = cascade.draft_for(req, self.limits.max_prompt_chars)
                    chunks = link.stream(tier, req, budget, cascade.after_silence, is_active)
                with contextlib.closing(chunks):  # closed early (the client went away): the tier stops decoding
                    for chunk in chunks:
                        started = True
                        if chunk.choices and chunk.choices[0].finish_reason:
                            cascade.answered(tier, chunk)
                            chunk = self._finish(cascade.decision(), asked.score)  # the same chunk, labelled
                        yield chunk
                return  # answered, or the client went away
            except Exception as exc:  # noqa: BLE001 - the cascade sorts failures (and raises what is not one)
                if started and (tier == asked.local or isinstance(exc, TierError)):
                    raise  # text is out: no other tier can take over (the board's own failure keeps its status)
                if started:
                    raise TierError(asked.local, "UNAVAILABLE", f"{tier} stopped mid-stream: {exc}") from None
                asked.failed(tier, exc, f"no first chunk in {budget:.2f}s")
        cascade.decision(asked.out_of_time())  # nothing streamed, so this raises: the refusal, or what each tier did

    def _asked(self, req: pb.InferRequest, timeout_s: float | None, stream: bool = False) -> "_Asked":
        """A request from the board's apps, validated, on its way through the cascade (a stream's keeps its first
        answer); bad input fails here, on the board; what only the board's model cannot serve goes up."""
        try:
            validate_request(req, self.limits, self.engine.info.model)
        except Exception as exc:
            self._failed(exc)
            raise
        timeout_s = caller_deadline(timeout_s)
        local = self.engine.info.tier
        first, score = self.policy.decide(req.prompt)
        link = self.link if self.link is not None and self.link.connected else None
        return _Asked(Cascade(self.policy, first, TIERS, self.retries_per_tier, origin=local,
                              keep_first_answer=stream),
                      score, local, None if timeout_s is None else time.monotonic() + timeout_s,  # one budget for all
                      self.upstream_timeout_s, link,
                      "no NATS link: not asked" if self.link is None else "NATS link down: not asked")

    @staticmethod
    def _finish(decision: Decision, score: float) -> pb.InferResponse:
        resp = decision.answer
        resp.complexity = score
        del resp.escalation_path[:]
        resp.escalation_path.extend(decision.path)
        resp.degraded = decision.degraded
        return resp

    def serve_nats(self, req: pb.InferRequest, timeout_s: float | None) -> futures.Future:
        """The router asks this board's model directly (no cascade here: the router runs it)."""
        answer = self.begin(req, timeout_s)
        if self.on_answer is not None:
            answer.add_done_callback(self._answered_over_nats)
        return answer

    def serve_nats_stream(self, req: pb.InferRequest, is_active=lambda: True) -> Iterator[pb.InferResponse]:
        """The router streams from this board's model directly (no cascade here: the router runs it)."""
        return self._recorded(self.stream(req, is_active), via="nats")

    def _answered_over_nats(self, answer: futures.Future) -> None:
        if not answer.cancelled() and answer.exception() is None:
            self._telemetry.submit(self._answered, answer.result(), "nats")

    def _answered(self, resp: pb.InferResponse, via: str) -> None:
        """The one place an answer becomes telemetry (the fleet agent's `on_answer`: one event per answer)."""
        if self.on_answer is not None:
            self.on_answer(resp, via=via)

    def _recorded(self, chunks: Iterator[pb.InferResponse], via: str) -> Iterator[pb.InferResponse]:
        """A stream's chunks, its telemetry recorded once, as its final chunk (the whole answer's) goes out."""
        with contextlib.closing(chunks):
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason:
                    self._answered(chunk, via)
                yield chunk

    def Infer(self, request, context):
        try:
            resp = self.answer(request, context.time_remaining())
            self._answered(resp, via="grpc")
            return resp
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status here
            code, msg = status_of(exc)
            context.abort(code, msg)



@dataclass
class _Asked:
    """One request from the board's apps on its way through the cascade: what its unary and its streamed answer
    share (`DeviceAgentServicer.answer`, `_cascade_stream`)."""

    cascade: Cascade
    score: float  # the policy's complexity score
    local: str  # this board's tier
    deadline: float | None  # monotonic; None: the caller set none
    upstream_timeout_s: float  # one try of a tier above, at most
    link: TierService | None  # the link to the tiers above as the request found it; None: down, or none
    offline: str  # why there is no link

    def times(self, tier: str) -> tuple[float | None, float] | None:
        """(the request's time left, the time `tier` is given); None when the deadline has passed (`expired`)."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            self.cascade.expired(tier)
            return None
        return left, self.upstream_timeout_s if left is None else min(self.upstream_timeout_s, left)

    def above(self) -> TierService:
        """The link a tier above is asked over; Offline (not asked) when there is none."""
        if self.link is None:
            raise Offline(self.offline)
        return self.link

    def failed(self, tier: str, exc: Exception, detail: str) -> None:
        """Asking `tier` failed: the board's own model's failure as the TierError a remote tier would answer."""
        self.cascade.failed(tier, as_tier_error(self.local, exc) if tier == self.local else exc, detail=detail)

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.deadline <= time.monotonic()
