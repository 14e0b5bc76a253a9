"""The router: the platform's front door, the same InferenceService as every tier.

For each request it scores the prompt, asks the first tier over NATS, and climbs
device -> edge -> cloud while the answer's confidence is below the tier's threshold.
A tier with no responders is skipped at once; a timeout is retried on another
replica (`retries_per_tier`), then the next tier is tried. When the cloud cannot be
reached, the best lower answer is returned with `degraded=true`. Nothing is dropped:
a request either gets an answer or a status saying why not.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from router.policy import TIER_ORDER, Policy
from shared.messaging import TierError, ask_tier, stream_tier
from shared.metrics import Metrics
from shared.serving import Limits, RequestError, validate_request
from tierline.v1 import inference_pb2 as pb
from tierline.v1 import inference_pb2_grpc as pb_grpc

# tier errors that are the request's fault: returned to the client, never escalated
CLIENT_ERRORS = {"INVALID_ARGUMENT"}


class RouterServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, nc, policy: Policy, model_name: str, tiers: tuple[str, ...] = TIER_ORDER,
                 request_timeout_s: float = 10.0, retries_per_tier: int = 1, metrics: Metrics | None = None,
                 limits: Limits | None = None):
        self.nc = nc
        self.policy = policy
        self.model_name = model_name
        self.tiers = tuple(t for t in TIER_ORDER if t in tiers)
        self.request_timeout_s = request_timeout_s
        self.retries_per_tier = retries_per_tier
        self.metrics = metrics or Metrics("router")
        self.limits = limits or Limits()

    async def _ask(self, tier: str, req: pb.InferRequest, timeout_s: float) -> pb.InferResponse:
        return await ask_tier(self.nc, tier, req, timeout_s)

    async def route(self, req: pb.InferRequest, deadline: float | None) -> pb.InferResponse:
        t0 = time.perf_counter()
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        tier, score = self.policy.decide(req.prompt, self.tiers)
        path: list[pb.Attempt] = []
        best: pb.InferResponse | None = None
        failure: TierError | None = None
        while tier is not None:
            answer = None
            for attempt in range(1 + self.retries_per_tier):
                left = self.request_timeout_s if deadline is None else min(self.request_timeout_s,
                                                                           deadline - time.monotonic())
                if left <= 0:
                    break
                try:
                    answer = await self._ask(tier, req, left)
                    break
                except NoRespondersError:
                    path.append(pb.Attempt(tier=tier, outcome="no_responders", detail="no replica is up"))
                    break  # no replica at all: retrying cannot help
                except (NatsTimeout, asyncio.TimeoutError):
                    path.append(pb.Attempt(tier=tier, outcome="timeout", detail=f"no answer in {left:.2f}s"))
                except TierError as exc:
                    if exc.status in CLIENT_ERRORS:
                        raise
                    failure = exc
                    path.append(pb.Attempt(tier=tier, outcome="error", detail=f"{exc.status}: {exc.message}"))
                    if exc.status != "RESOURCE_EXHAUSTED":
                        break
            nxt = self.policy.next_tier(tier, self.tiers)
            if answer is not None:
                accepted = self.policy.accept(tier, answer.confidence)
                path.append(pb.Attempt(tier=tier, outcome="answered" if accepted else "low_confidence",
                                       confidence=answer.confidence,
                                       detail="" if accepted else
                                       f"confidence {answer.confidence:.3f} < {self.policy.thresholds[tier]}"))
                if best is None or answer.confidence >= best.confidence or tier == "cloud":
                    best = answer
                if accepted or nxt is None:
                    return self._finish(best, score, path, degraded=not accepted and tier != "cloud", t0=t0)
            if nxt is not None:
                self.metrics.escalations.labels(tier, nxt, path[-1].outcome if path else "none").inc()
            tier = nxt
        if best is not None:  # a better tier was wanted but could not answer
            return self._finish(best, score, path, degraded=True, t0=t0)
        raise TierError("router", "UNAVAILABLE", "no tier could answer: " +
                        "; ".join(f"{a.tier} {a.outcome} {a.detail}".strip() for a in path)
                        if path else str(failure))

    def _finish(self, resp: pb.InferResponse, score: float, path, degraded: bool, t0: float) -> pb.InferResponse:
        resp.complexity = score
        del resp.escalation_path[:]
        resp.escalation_path.extend(path)
        resp.degraded = degraded
        total = time.perf_counter() - t0
        resp.timings.total_ms = total * 1000
        self.metrics.observe_response(resp.tier, "degraded" if degraded else "answered",
                                      resp.timings.first_token_ms / 1000, total, resp.timings.queue_ms / 1000,
                                      resp.usage.prompt_tokens, resp.usage.completion_tokens)
        return resp

    def _validate(self, req: pb.InferRequest) -> None:
        """The checks that need no model; the tiers check the rest (window, context, vocabulary)."""
        try:
            validate_request(req, self.limits, self.model_name)
        except RequestError as exc:
            raise TierError("router", "INVALID_ARGUMENT", str(exc)) from None

    async def Infer(self, request, context):
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            self._validate(request)
            return await self.route(request, deadline)
        except TierError as exc:
            code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN)
            await context.abort(code, exc.message)

    async def InferStream(self, request, context):
        """Tokens as the tier generates them, relayed from NATS.

        A stream goes to the policy's first tier and cannot be taken back once text
        has been sent, so there is no confidence cascade here; a tier that has no
        responders or times out before its first chunk is skipped for the next one up.
        """
        try:
            self._validate(request)
        except TierError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.status), exc.message)
        tier, score = self.policy.decide(request.prompt, self.tiers)
        path: list[pb.Attempt] = []
        while tier is not None:
            started = False
            try:
                async for chunk in stream_tier(self.nc, tier, request, self.request_timeout_s):
                    started = True
                    chunk.complexity = score
                    if chunk.choices and chunk.choices[0].finish_reason:
                        path.append(pb.Attempt(tier=tier, outcome="answered", confidence=chunk.confidence))
                        chunk.escalation_path.extend(path)
                    yield chunk
                return
            except TierError as exc:
                if exc.status in CLIENT_ERRORS or started:
                    await context.abort(getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN), exc.message)
                path.append(pb.Attempt(tier=tier, outcome="error", detail=f"{exc.status}: {exc.message}"))
            except (NoRespondersError, NatsTimeout, asyncio.TimeoutError) as exc:
                if started:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{tier} stopped mid-stream")
                outcome = "no_responders" if isinstance(exc, NoRespondersError) else "timeout"
                path.append(pb.Attempt(tier=tier, outcome=outcome))
            tier = self.policy.next_tier(tier, self.tiers)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no tier could stream an answer: " +
                            "; ".join(f"{a.tier} {a.outcome}" for a in path))

    async def GetServerInfo(self, request, context):
        return pb.ServerInfo(tier="router", model=self.model_name, max_prompt_chars=self.limits.max_prompt_chars,
                             max_tokens_limit=self.limits.max_tokens)
