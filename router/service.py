"""The router: the platform's front door, the same InferenceService as every tier.

For each request it scores the prompt (router/policy.py) and runs the cascade
(router/cascade.py: the rules for climbing device -> edge -> cloud on low confidence,
retrying, skipping and falling back), asking each tier it names over NATS. Nothing
is dropped: a request either gets an answer, possibly `degraded`, or a status saying
why not.

Before any of that, `_admit` checks the caller's API key and daily quota
(router/auth.py) and caps the request's batch priority at its plan's. The same
`infer` / `stream` / `status` serve gRPC here and HTTP in router/openai_http.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing

import grpc

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_router.auth import Admission, Gate, bearer_token, cut_short_cost
from tierline_router.cascade import ANSWER_MARGIN_S, CLIENT_ERRORS, Cascade, Decision
from tierline_router.choices import choices_of, fan_out, merge, merge_streams
from tierline_router.metrics import RouterMetrics
from tierline_router.policy import Policy
from tierline_shared.config.manifest import LimitsConfig, NatsConfig, RouterConfig
from tierline_shared.serving.servicer import RequestError, resolved_max_tokens, validate_request
from tierline_shared.transport.messaging import TierError, ask_tier, discover, stream_tier
from tierline_shared.wire import TIERS

DISCOVERY_WAIT_S = 0.25  # how long GetStatus gathers the replicas' $SRV.STATS replies
REPLICA_MEMORY_S = 60.0  # a replica that missed a discovery (busy, or gone) stays listed, silent, this long


class RouterServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, nc, policy: Policy, model_name: str, tiers: tuple[str, ...] = TIERS,
                 request_timeout_s: float = NatsConfig.request_timeout_ms / 1000,
                 retries_per_tier: int = RouterConfig.retries_per_tier, metrics: RouterMetrics | None = None,
                 limits: LimitsConfig | None = None, gate: Gate | None = None, max_context: int | None = None,
                 no_replica_wait_s: float = RouterConfig.no_replica_wait_ms / 1000):
        self.nc = nc
        self.policy = policy
        self.model_name = model_name
        self.tiers = tuple(t for t in TIERS if t in tiers)
        self.request_timeout_s = request_timeout_s
        self.retries_per_tier = retries_per_tier
        self.metrics = metrics or RouterMetrics(model_name, self.tiers)
        self.limits = limits or LimitsConfig()
        self.gate = gate or Gate(None, {})  # API keys and quotas; a gate without a store admits everyone
        self.gate.on_unsettled = self.metrics.unsettled
        self.max_context = max_context  # the served models' context (prompt + completion), None when unknown
        self.no_replica_wait_s = no_replica_wait_s  # at most, waiting for a tier with no replica up
        self.stopping = False  # the router is stopping: a request it cuts short is its own doing (`_left_cost`)
        self._replicas: dict[str, dict[str, tuple[dict, float]]] = {}  # tier -> id -> (last $SRV.STATS, when)

    async def _ask(self, tier: str, req: pb.InferRequest, timeout_s: float,
                   after_silence: bool = False) -> pb.InferResponse:
        return await ask_tier(self.nc, tier, req, timeout_s, after_silence)

    async def route(self, req: pb.InferRequest, deadline: float | None) -> pb.InferResponse:
        """The request through the cascade (router/cascade.py), each tier asked over NATS."""
        t0 = time.perf_counter()
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        tier, score = self.policy.decide(req.prompt, self.tiers)
        cascade = Cascade(self.policy, tier, self.tiers, self.retries_per_tier, on_escalate=self.metrics.escalated)
        end = self._replica_wait_end(deadline)
        asking = None  # the tier being asked: counted though its asker leaves before it answers
        try:
            while True:
                while (tier := cascade.next_tier()) is not None:
                    left = self.request_timeout_s if deadline is None else min(self.request_timeout_s,
                                                                               deadline - time.monotonic())
                    if deadline is not None and cascade.answer_in_hand:  # it must still reach the client in time
                        left -= ANSWER_MARGIN_S
                    if left <= 0:
                        cascade.expired(tier)
                        break
                    req.draft = cascade.draft_for(req, self.limits.max_prompt_chars)
                    asking = tier
                    try:
                        cascade.answered(tier, await self._ask(tier, req, left, cascade.after_silence))
                    except Exception as exc:  # noqa: BLE001 - the cascade sorts failures (raises what is not one)
                        cascade.failed(tier, exc, detail=f"no answer in {left:.2f}s")
                if not await self._waited(cascade.again(), end):
                    break
        finally:
            self.metrics.asked(cascade.path, asking)
        out_of_time = deadline is not None and deadline <= time.monotonic()
        return self._finish(cascade.decision(out_of_time), score, t0)

    def _replica_wait_end(self, deadline: float | None) -> float:
        """Until when tiers with no replica up are asked again: no_replica_wait_s, within the request's deadline."""
        end = time.monotonic() + self.no_replica_wait_s
        return end if deadline is None else min(end, deadline)

    @staticmethod
    async def _waited(wait: float | None, end: float) -> bool:
        """Sleep `wait` seconds before asking absent tiers again, when there is one and it ends before `end`."""
        if wait is None or time.monotonic() + wait >= end:
            return False
        await asyncio.sleep(wait)
        return True

    @staticmethod
    def _finish(decision: Decision, score: float, t0: float) -> pb.InferResponse:
        resp, degraded = decision.answer, decision.degraded
        resp.complexity = score
        del resp.escalation_path[:]
        resp.escalation_path.extend(decision.path)
        resp.degraded = degraded
        resp.timings.total_ms = (time.perf_counter() - t0) * 1000
        return resp

    def _validate(self, req: pb.InferRequest) -> None:
        """The checks that need no model; the tiers check the rest (window, the prompt's tokens in the context,
        vocabulary)."""
        try:
            validate_request(req, self.limits, self.model_name, self.max_context)
        except RequestError as exc:
            raise TierError("router", "INVALID_ARGUMENT", str(exc)) from None

    # -- the platform's operations, the same for every transport (gRPC here, HTTP in openai_http.py) ----------
    async def _admit(self, request: pb.InferRequest, key: str | None) -> Admission | None:
        """The key first (401/403 before anything else), then the fields, then the quota.

        One trip to the key store: a valid request's key is checked inside its admission
        (one transaction); an invalid one's key alone, so a bad key still answers first.
        """
        try:
            self._validate(request)
        except TierError:
            await self.gate.check(key)
            raise
        admission = await self.gate.admit(key, request.prompt,
                                          choices_of(request) * resolved_max_tokens(request, self.limits))
        if admission is not None:  # the plan's priority is the most a request may ask for
            request.priority = min(request.priority or admission.priority, admission.priority)
        return admission

    async def infer(self, request: pb.InferRequest, key: str | None, deadline: float | None = None
                    ) -> pb.InferResponse:
        """One routed answer; raises TierError (AccessDenied included) carrying the status to answer."""
        t0 = time.perf_counter()
        with self.metrics.request() as tracked:
            admission = await self._admit(request, key)
            used = None
            try:
                if not request.request_id:
                    request.request_id = uuid.uuid4().hex
                if choices_of(request) == 1:
                    resp = await self.route(request, deadline)
                else:  # each choice its own request (router/choices.py)
                    resp = merge(request.request_id,
                                 await asyncio.gather(*(self.route(one, deadline) for one in fan_out(request))))
                used = resp.usage.prompt_tokens + resp.usage.completion_tokens
            except TierError as exc:
                if exc.status in CLIENT_ERRORS:
                    used = 0  # refused by a tier for its own fields (say, too many tokens): the call counts
                raise
            except asyncio.CancelledError:
                used = self._left_cost()
                raise
            finally:
                await self.gate.settle(admission, used)
            tracked.answered(resp, time.perf_counter() - t0)
            return resp

    async def refuse(self, key: str | None, exc: TierError) -> None:
        """A request its transport could not read (say, a body that is not JSON): raises the key's refusal if
        there is one (401/403 come first), else `exc`; counted as every request is."""
        with self.metrics.request():
            await self.gate.check(key)
            raise exc

    async def stream(self, request: pb.InferRequest, key: str | None):
        """Tokens as the tier generates them, relayed from NATS.

        A stream goes to the policy's first tier and cannot be taken back once text
        has been sent, so its first answer is kept whatever its confidence; before its
        first chunk it fails over as a unary request does (`_stream`: the cascade).
        """
        t0 = time.perf_counter()
        with self.metrics.request() as tracked:
            admission = await self._admit(request, key)
            used, last = None, None
            seen: dict[int, pb.Usage] = {}  # each choice's tokens so far, as its chunks said
            if not request.request_id:
                request.request_id = uuid.uuid4().hex
            chunks = (self._stream(request) if choices_of(request) == 1 else
                      merge_streams(request.request_id, [self._stream(one) for one in fan_out(request)]))
            try:
                async for chunk in chunks:
                    last = self._chunk_timed(chunk, t0, last)
                    if chunk.choices and chunk.choices[0].finish_reason:
                        used = chunk.usage.prompt_tokens + chunk.usage.completion_tokens
                        tracked.answered(chunk, last - t0)  # the client has its answer once this is sent
                    elif chunk.HasField("usage"):
                        seen[chunk.choices[0].index if chunk.choices else 0] = chunk.usage
                    yield chunk
            except TierError as exc:
                if exc.status in CLIENT_ERRORS and last is None:
                    used = 0  # refused by the tiers for its own fields: the call counts, as for a unary request
                raise
            except (asyncio.CancelledError, GeneratorExit):  # its client went away (or the router stops)
                if last is None:
                    used = self._left_cost()
                raise
            finally:
                try:
                    # closed at once when our client goes away, so the tier hears the cancel now, not at GC
                    await chunks.aclose()
                finally:  # settled even when a second cancel (a stop) ends the close
                    # no final chunk: nothing sent costs nothing; a stream cut short costs what its chunks said
                    if used is None and last is not None and admission is not None:
                        used = cut_short_cost(request, seen, admission.reserved_tokens)
                    await self.gate.settle(admission, used)

    def _left_cost(self) -> int | None:
        """What a request whose client went away before its answer (or its first chunk) costs its key: the call
        (its tiers began the work, and a key that hangs up just before each answer must not make them work for
        free: found by a fault hunt), no tokens (none reached it). Nothing when the router stops: it cut it."""
        return None if self.stopping else 0

    def _chunk_timed(self, chunk: pb.InferResponse, t0: float, last: float | None) -> float:
        """A stream's time to its first chunk, then between chunks (what its client sees); returns now."""
        now = time.perf_counter()
        if last is None:
            self.metrics.first_chunk(chunk.tier, now - t0)
        else:
            self.metrics.next_chunk(chunk.tier, now - last)
        return now

    async def _stream(self, request: pb.InferRequest):
        """One choice's stream through the cascade (router/cascade.py) as unary requests take it, except that the
        first answer is kept: its text is out as it comes. Before its first chunk, a tier that fails is asked
        again, skipped for the next one up, or (nothing above answering) the tiers below are asked."""
        first, score = self.policy.decide(request.prompt, self.tiers)
        cascade = Cascade(self.policy, first, self.tiers, self.retries_per_tier, on_escalate=self.metrics.escalated,
                          keep_first_answer=True)
        end = self._replica_wait_end(None)
        asking = None  # the tier being asked: counted though its asker leaves before it answers
        try:
            while True:
                while (tier := cascade.next_tier()) is not None:
                    started, asking = False, tier
                    try:
                        # closed at once when our client goes away, so the tier hears the cancel now, not at GC
                        chunks = stream_tier(self.nc, tier, request, self.request_timeout_s, cascade.after_silence)
                        async with aclosing(chunks):
                            async for chunk in chunks:
                                started = True
                                chunk.complexity = score
                                if chunk.choices and chunk.choices[0].finish_reason:
                                    cascade.answered(tier, chunk)
                                    decision = cascade.decision()
                                    chunk.escalation_path.extend(decision.path)
                                    chunk.degraded = decision.degraded
                                yield chunk
                        return
                    except Exception as exc:  # noqa: BLE001 - the cascade sorts failures (raises what is not one)
                        if started and isinstance(exc, TierError):
                            raise
                        if started:
                            raise TierError("router", "UNAVAILABLE", f"{tier} stopped mid-stream") from None
                        cascade.failed(tier, exc, detail=f"no first chunk in {self.request_timeout_s:.2f}s")
                if not await self._waited(cascade.again(), end):
                    break
        finally:
            self.metrics.asked(cascade.path, asking)
        cascade.decision()  # nothing streamed, so this raises: the refusal, or UNAVAILABLE naming what each tier did

    def _known_replicas(self, tier: str, stats: list[dict]) -> list[tuple[dict, float]]:
        """This discovery's replies and the replicas that answered one in the last REPLICA_MEMORY_S but not this
        one, by id: (their last $SRV.STATS reply, seconds since it; 0 for this one's). A replica whose reply came
        after DISCOVERY_WAIT_S (it was busy) is listed, silent, rather than dropped from the status."""
        now = time.monotonic()
        known = self._replicas.setdefault(tier, {})
        known.update({s.get("id", ""): (s, now) for s in stats})
        for rid in [rid for rid, (_, seen) in known.items() if now - seen > REPLICA_MEMORY_S]:
            del known[rid]
        return [(s, now - seen) for _, (s, seen) in sorted(known.items())]

    async def status(self, key: str | None) -> pb.PlatformStatus:
        """Replicas and queues from nats.micro discovery, the traffic split from this router's counters."""
        await self.gate.check(key)
        replies = await asyncio.gather(*(discover(self.nc, t, "STATS", DISCOVERY_WAIT_S) for t in self.tiers))
        m = self.metrics
        answered = {t: sum(m.sample("tierline_router_requests_total", tier=t, outcome=o, code="OK")
                           for o in ("answered", "degraded")) for t in self.tiers}
        total = sum(answered.values())
        out = pb.PlatformStatus(model=self.model_name, answered=int(total), auth_enabled=self.gate.enabled)
        for tier, stats in zip(self.tiers, replies):
            asked = m.sample("tierline_router_tier_requests_total", tier=tier)
            escalated = m.escalated_from(tier)
            ts = out.tiers.add(tier=tier, answered=int(answered[tier]),
                               traffic_share=answered[tier] / total if total else 0.0, asked=int(asked),
                               escalated=int(escalated), escalation_rate=escalated / asked if asked else 0.0)
            for s, silent_s in self._known_replicas(tier, stats):
                infer = next((e for e in s.get("endpoints") or [] if e.get("name") == "infer"), {})
                data = infer.get("data") or {}
                depth = int(data.get("queue_depth", 0))
                (ts.silent_replicas if silent_s else ts.replicas).add(
                    id=s.get("id", ""), version=s.get("version", ""), requests=int(infer.get("num_requests", 0)),
                    errors=int(infer.get("num_errors", 0)), average_ms=infer.get("average_processing_time", 0) / 1e6,
                    queue_depth=depth, silent_s=round(silent_s, 3), cancelled=int(data.get("num_cancelled", 0)))
                ts.queue_depth += 0 if silent_s else depth
        return out

    def server_info(self) -> pb.ServerInfo:
        return pb.ServerInfo(tier="router", model=self.model_name, max_prompt_chars=self.limits.max_prompt_chars,
                             max_tokens_limit=self.limits.max_tokens or max(0, (self.max_context or 0) - 1),
                             max_context=self.max_context or 0)

    # -- gRPC: the key from the metadata, and the one place errors become statuses -------------------------
    @staticmethod
    async def _abort(context, exc: TierError) -> None:
        await context.abort(getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN), exc.message)

    async def Infer(self, request, context):
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return await self.infer(request, bearer_token(context.invocation_metadata()), deadline)
        except TierError as exc:
            await self._abort(context, exc)

    async def InferStream(self, request, context):
        try:
            async for chunk in self.stream(request, bearer_token(context.invocation_metadata())):
                yield chunk
        except TierError as exc:
            await self._abort(context, exc)

    async def GetServerInfo(self, request, context):
        try:
            await self.gate.check(bearer_token(context.invocation_metadata()))
        except TierError as exc:
            await self._abort(context, exc)
        return self.server_info()

    async def GetStatus(self, request, context):
        try:
            return await self.status(bearer_token(context.invocation_metadata()))
        except TierError as exc:
            await self._abort(context, exc)
