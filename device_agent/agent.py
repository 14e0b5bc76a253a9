"""The device agent's own front door: answer on the board when the policy allows, else go up.

Apps on the board call the agent's gRPC (loopback). Easy prompts are answered by
the local LiteRT model; when the policy wants a bigger tier, or the local answer's
confidence is below the device threshold, the agent asks the edge (then the cloud)
over its NATS connection. When nothing above answers (no responders: at once; a
timeout: bounded by the manifest), the agent answers locally and marks the answer
`degraded`, rather than hanging or failing (the edge-fallback users of KubeEdge
Sedna ask for).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tierline.v1 import inference_pb2 as pb
from tierline_router.policy import Policy
from tierline_shared.runtime.batching import Batcher
from tierline_shared.runtime.engine import Engine
from tierline_shared.serving.servicer import LRUCache, TierServicer, validate
from tierline_shared.transport.messaging import TierError, TierService

UPSTREAM = ("edge", "cloud")  # asked in this order
CLIENT_ERRORS = {"INVALID_ARGUMENT"}
RETIRE_GRACE_S = 1.0  # an old engine's batcher lives this long after its queue empties (late submits)


class DeviceAgentServicer(TierServicer):
    def __init__(self, *args, policy: Policy, upstream_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.upstream_timeout_s = upstream_timeout_s
        self.link: TierService | None = None  # the NATS link to the tiers above (may be reconnecting)
        self.on_answer = None  # called with each answer, front door or NATS (the fleet agent's telemetry)
        self._swap_lock = threading.Lock()

    def swap_engine(self, engine: Engine) -> None:
        """Serve a new model from now on (an OTA update); requests already queued finish on the old one."""
        batcher = Batcher(engine, self.batch_config, on_batch=self.metrics.observe_batch if self.metrics else None)
        with self._swap_lock:
            old = self.batcher
            self.engine, self.batcher = engine, batcher
            self.cache = LRUCache(self.cache.size)  # the old model's answers are not the new one's

        def retire() -> None:
            while old.depth:
                time.sleep(0.05)
            time.sleep(RETIRE_GRACE_S)
            old.close()  # finishes the batch it is decoding, then stops

        threading.Thread(target=retire, name="retire-engine", daemon=True).start()

    def answer(self, req: pb.InferRequest, timeout_s: float | None) -> pb.InferResponse:
        validate(req, self.engine, self.limits, self.engine.info.model)  # bad input fails here, on the board
        deadline = None if timeout_s is None else time.monotonic() + timeout_s  # one budget for every try

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        first, score = self.policy.decide(req.prompt)
        path: list[pb.Attempt] = []
        local = None
        link = self.link if self.link is not None and self.link.connected else None
        if first == "device" or link is None:
            local = self.handle(req, timeout_s)
            confident = self.policy.accept("device", local.confidence)
            if confident and first == "device":
                return self._finish(local, score, [_attempt(local, "answered")], degraded=False)
            if link is None:  # offline: fail the escalation at once, the board's answer is the best there is
                detail = "no NATS link: not asked" if self.link is None else "NATS link down: not asked"
                return self._finish(local, score, [pb.Attempt(tier=UPSTREAM[0], outcome="offline", detail=detail),
                                                   _attempt(local, "answered")], degraded=True)
            path.append(_attempt(local, "low_confidence"))
        for tier in UPSTREAM:
            budget = self.upstream_timeout_s if deadline is None else min(self.upstream_timeout_s, left())
            if budget <= 0:
                path.append(pb.Attempt(tier=tier, outcome="timeout", detail="the request's deadline has passed"))
                break
            try:
                resp = link.request(tier, req, budget)
            except NoRespondersError:
                path.append(pb.Attempt(tier=tier, outcome="no_responders", detail="no replica is up"))
                continue
            except (NatsTimeout, concurrent.futures.TimeoutError, TimeoutError):
                path.append(pb.Attempt(tier=tier, outcome="timeout", detail="no answer in time"))
                continue
            except TierError as exc:
                if exc.status in CLIENT_ERRORS:
                    raise
                path.append(pb.Attempt(tier=tier, outcome="error", detail=f"{exc.status}: {exc.message}"))
                continue
            accepted = self.policy.accept(tier, resp.confidence) or tier == UPSTREAM[-1]
            path.append(_attempt(resp, "answered" if accepted else "low_confidence"))
            if accepted:
                return self._finish(resp, score, path, degraded=False)
            local = local if local is not None and local.confidence > resp.confidence else resp
        # nothing above could answer: the board's own answer, marked degraded
        if local is None:
            local = self.handle(req, left())
            path.append(_attempt(local, "answered"))
        return self._finish(local, score, path, degraded=True)

    @staticmethod
    def _finish(resp: pb.InferResponse, score: float, path, degraded: bool) -> pb.InferResponse:
        resp.complexity = score
        del resp.escalation_path[:]
        resp.escalation_path.extend(path)
        resp.degraded = degraded
        return resp

    def Infer(self, request, context):
        try:
            resp = self.answer(request, context.time_remaining())
            if self.on_answer is not None:
                self.on_answer(resp)
            return resp
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status here
            code, msg = self._status_of(exc)
            context.abort(code, msg)


def _attempt(resp: pb.InferResponse, outcome: str) -> pb.Attempt:
    return pb.Attempt(tier=resp.tier, outcome=outcome, confidence=resp.confidence)
