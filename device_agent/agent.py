"""The device agent's own front door: answer on the board when the policy allows, else go up.

Apps on the board call the agent's gRPC (loopback). The request runs through the router's
cascade (tierline_router.cascade), the same rule the router applies: the device tier is the
board's own LiteRT model, the edge and the cloud are asked over the agent's NATS
connection. When nothing above answers (no responders: at once; a timeout: bounded by the
manifest; no link: at once, `offline`), the board's own answer is given, marked `degraded`,
rather than hanging or failing (the edge fallback users of KubeEdge Sedna ask for).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

from tierline_api.v1 import inference_pb2 as pb
from tierline_router.cascade import Cascade, Decision, Offline
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
from tierline_shared.transport.tier_service import TierService
from tierline_shared.wire import TIERS

RETIRE_GRACE_S = 1.0  # an old engine's scheduler lives this long after it has nothing left (late submits)


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
        """Serve a new model from now on (an OTA update); requests already queued finish on the old one."""
        scheduler = Scheduler(engine, self.batch_config, on_step=self.metrics.observe_step if self.metrics else None)
        with self._swap_lock:
            old = self.scheduler
            # in one assignment: a request reads the model it is served by once (`Served`); the old model's answers,
            # those in flight included, are not the new one's, so the cache starts empty
            self.served = Served(engine, scheduler, LRUCache(self.cache.size))

        def retire() -> None:
            while old.busy:  # what it queued or runs finishes on the old model
                time.sleep(0.05)
            time.sleep(RETIRE_GRACE_S)
            old.close()

        threading.Thread(target=retire, name="retire-engine", daemon=True).start()

    def answer(self, req: pb.InferRequest, timeout_s: float | None) -> pb.InferResponse:
        """One request from the board's apps, through the cascade: this board's model or the tiers above."""
        try:  # bad input fails here, on the board; what only the board's model cannot serve goes up (the cascade)
            validate_request(req, self.limits, self.engine.info.model)
        except Exception as exc:
            self._failed(exc)
            raise
        timeout_s = caller_deadline(timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s  # one budget for every try
        local = self.engine.info.tier
        first, score = self.policy.decide(req.prompt)
        cascade = Cascade(self.policy, first, TIERS, self.retries_per_tier, origin=local)
        link = self.link if self.link is not None and self.link.connected else None
        while (tier := cascade.next_tier()) is not None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                cascade.expired(tier)
                break
            budget = self.upstream_timeout_s if left is None else min(self.upstream_timeout_s, left)
            try:
                if tier == local:
                    cascade.answered(tier, self.handle(req, left))
                elif link is None:
                    raise Offline("no NATS link: not asked" if self.link is None else "NATS link down: not asked")
                else:
                    req.draft = cascade.draft_for(req, self.limits.max_prompt_chars)
                    cascade.answered(tier, link.request(tier, req, budget, cascade.after_silence))
            except Exception as exc:  # noqa: BLE001 - the cascade sorts failures (and raises what is not one)
                cascade.failed(tier, as_tier_error(local, exc) if tier == local else exc,
                               detail=f"no answer in {budget:.2f}s")
        return self._finish(cascade.decision(deadline is not None and deadline <= time.monotonic()), score)

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

    def _answered_over_nats(self, answer: futures.Future) -> None:
        if not answer.cancelled() and answer.exception() is None:
            self._telemetry.submit(self.on_answer, answer.result(), via="nats")

    def Infer(self, request, context):
        try:
            resp = self.answer(request, context.time_remaining())
            if self.on_answer is not None:
                self.on_answer(resp)
            return resp
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status here
            code, msg = status_of(exc)
            context.abort(code, msg)

