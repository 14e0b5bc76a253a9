"""The router's Prometheus series: `tierline_router_*`, apart from the tiers' `tierline_*`.

A routed request asks one tier or several (the cascade), so the router's counts and the
tiers' are different things; their names differ, so `sum(tierline_requests_total)` counts
tier requests only and never a routed request twice. Every request the router receives is
counted once, with its outcome and gRPC status code, rejections (a bad key, bad fields, a
used-up quota) included; docs/OBSERVABILITY.md lists the series.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram

from tierline_api.v1 import inference_pb2 as pb
from tierline_shared.serving.metrics import ITL_BUCKETS, LATENCY_BUCKETS, MetricsEndpoint, outcome_of
from tierline_shared.transport.messaging import TierError
from tierline_shared.wire import TIERS

PREFIX = "tierline_router"
NO_TIER = "none"  # the `tier` of a request no tier answered (refused, failed, cancelled)
FALLBACK = "fallback"  # the escalation reason of a move down (router/cascade.py: nothing above answered)


def code_of(exc: BaseException) -> str:
    """The gRPC status name a request that raised `exc` ends with."""
    if isinstance(exc, TierError):
        return exc.status
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"  # the client went away
    return "INTERNAL"


class Tracked:
    """One request in flight; `answered` records its answer (what ends it otherwise is counted on the way out)."""

    def __init__(self, metrics: "RouterMetrics"):
        self._metrics = metrics
        self.done = False

    def answered(self, resp: pb.InferResponse, total_s: float) -> None:
        self.done = True
        self._metrics.observe_answer(resp, total_s)


class RouterMetrics(MetricsEndpoint):
    def __init__(self, model_name: str, tiers: Iterable[str] = TIERS):
        super().__init__()
        self.model_name = model_name
        r, m, mt = self.registry, ["model_name"], ["model_name", "tier"]
        self.requests = Counter(f"{PREFIX}_requests", "Requests the router finished, by the tier that answered "
                                f"({NO_TIER}: none did), outcome and gRPC status code", [*mt, "outcome", "code"],
                                registry=r)
        self.running = Gauge(f"{PREFIX}_num_requests_running", "Requests the router is working on (a stream until "
                             "its last chunk)", m, registry=r)
        self.tier_requests = Counter(f"{PREFIX}_tier_requests", "Requests that asked a tier (once each, however "
                                     "many of its replicas were tried)", mt, registry=r)
        self.escalations = Counter(f"{PREFIX}_escalations", "Requests moved from one tier to another, and why "
                                   f"({FALLBACK}: down, as nothing above answered)",
                                   [*m, "from_tier", "to_tier", "reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Stream received to its first chunk sent, "
                              "by the tier that streamed it", mt, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between a stream's consecutive chunks "
                             "at the router", mt, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request received to its answer (the last "
                             "chunk of a stream), by the tier that answered", mt, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of the answers given, by the tier "
                                     "that answered", mt, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens of the answers given, by the tier "
                                         "that answered", mt, registry=r)
        self._unsettled = Counter(f"{PREFIX}_unsettled_requests", "Requests whose token usage the API key store "
                                  "could not record (their reservation stays counted; router/auth.py Gate.settle)",
                                  m, registry=r)
        self._running = self.running.labels(model_name)
        self._unsettled.labels(model_name)
        self._answer_series: dict[tuple[str, bool], tuple] = {}  # (tier, degraded) -> its series, looked up once
        for tier in tiers:  # at 0 from the start: the traffic split and the dashboards see every tier
            self.requests.labels(model_name, tier, "answered", "OK")
            self.tier_requests.labels(model_name, tier)

    @contextmanager
    def request(self) -> Iterator[Tracked]:
        """Around one request: running while inside; one that leaves without an answer is counted with its code."""
        tracked = Tracked(self)
        running = self._running
        running.inc()
        try:
            yield tracked
        except BaseException as exc:
            if not tracked.done:
                self.observe_failure(code_of(exc))
            raise
        finally:
            running.dec()

    def observe_answer(self, resp: pb.InferResponse, total_s: float) -> None:
        series = self._answer_series.get((resp.tier, resp.degraded))
        if series is None:
            me = (self.model_name, resp.tier)
            series = self._answer_series[resp.tier, resp.degraded] = (
                self.requests.labels(*me, "degraded" if resp.degraded else "answered", "OK"), self.e2e.labels(*me),
                self.prompt_tokens.labels(*me), self.generation_tokens.labels(*me))
        requests, e2e, prompt_tokens, generation_tokens = series
        requests.inc()
        e2e.observe(total_s)
        prompt_tokens.inc(resp.usage.prompt_tokens)
        generation_tokens.inc(resp.usage.completion_tokens)

    def observe_failure(self, code: str) -> None:
        self.requests.labels(self.model_name, NO_TIER, outcome_of(code), code).inc()

    def unsettled(self) -> None:
        """A request whose usage the key store could not record."""
        self._unsettled.labels(self.model_name).inc()

    def escalated(self, from_tier: str, to_tier: str, reason: str) -> None:
        self.escalations.labels(self.model_name, from_tier, to_tier, reason).inc()

    def asked(self, path: Iterable[pb.Attempt], last: str | None = None) -> None:
        """The tiers one request asked (its escalation path, and `last`, the one it was asking when it ended:
        not in its path when its asker left first), each once."""
        for tier in dict.fromkeys([*(a.tier for a in path), *([last] if last else [])]):
            self.tier_requests.labels(self.model_name, tier).inc()

    def first_chunk(self, tier: str, since_s: float) -> None:
        self.ttft.labels(self.model_name, tier).observe(since_s)

    def next_chunk(self, tier: str, gap_s: float) -> None:
        self.itl.labels(self.model_name, tier).observe(gap_s)

    def escalated_from(self, tier: str) -> float:
        """Requests this router moved up from `tier` (a fallback down is not an escalation)."""
        return sum(s.value for metric in self.escalations.collect() for s in metric.samples
                   if s.name.endswith("_total") and s.labels["from_tier"] == tier and s.labels["reason"] != FALLBACK)

    def sample(self, name: str, **labels: str) -> float:
        """One of this router's own counters now (0 when the series does not exist)."""
        return self.registry.get_sample_value(name, {"model_name": self.model_name, **labels}) or 0.0
