"""Prometheus metrics of a Tierline process, named after vLLM's where one exists.

Each process (and each server a test starts) owns its own registry, served on
`/metrics` by `serve()` on a port that may be 0 (any free one), with the process's
own `process_*` and `python_*` series (CPU, memory, open files, GC).

A tier's series are `tierline_*` (`Metrics`, below); the router's are `tierline_router_*`
(router/metrics.py). They count different things (one routed request asks one or more
tiers), so no name is exported by both and a `sum()` over one name never counts a request
twice. Every series carries `model_name`, as vLLM's do. The list, with labels and meaning,
is docs/OBSERVABILITY.md; `tests/test_observability.py` checks it against a running stack.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

PREFIX = "tierline"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # tokens one step computes
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)  # seconds

# gRPC status names (HTTP 400/401/403/404/429 over the OpenAI API) of requests refused before any work was done:
# the request's (or its key's, or its quota's, or a full queue's) doing, not the platform failing
REJECTED = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                      "FAILED_PRECONDITION", "OUT_OF_RANGE"})
OUTCOMES = ("answered", "degraded", "cached", "rejected", "cancelled", "error")  # the `outcome` label's values


def outcome_of(code: str) -> str:
    """The `outcome` a request that ended with gRPC status `code` counts as (OK: answered)."""
    if code == "OK":
        return "answered"
    if code == "CANCELLED":
        return "cancelled"  # the caller went away (or stopped waiting) first
    return "rejected" if code in REJECTED else "error"


class MetricsEndpoint:
    """One process's registry (with its process and Python runtime collectors) and its /metrics server."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=self.registry)  # python_info
        GCCollector(registry=self.registry)  # python_gc_*
        self._http = None

    def watch_child(self, namespace: str, pid) -> None:
        """A child process's `process_*` series too, as `<namespace>_process_*` (`pid()`: its pid now, None while
        there is none: no series then). A tier's engine core runs its model: without these the tier's CPU and memory
        were its serving process's alone (15% of the CPU, a quarter of the memory)."""
        ProcessCollector(namespace=namespace, pid=lambda: pid() or "none", registry=self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start /metrics; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http = None


class Metrics(MetricsEndpoint):
    """A tier's series: what its scheduler and its model did, every request counted once with its outcome."""

    def __init__(self, tier: str, model_name: str = "", queue_limit: int | None = None):
        super().__init__()
        self.tier, self.model_name = tier, model_name
        r, t = self.registry, ["model_name", "tier"]
        self.requests = Counter(f"{PREFIX}_requests", "Requests this tier finished, by outcome and gRPC status code "
                                "(answered, cached: a result-cache hit, rejected, cancelled, error)",
                                [*t, "outcome", "code"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Request received to first token",
                              t, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request received to answer (result-cache "
                             "hits included)", t, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{PREFIX}_request_queue_time_seconds", "Waiting for a batch",
                                    t, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_limit = Gauge(f"{PREFIX}_num_requests_waiting_max", "The most requests the queue holds "
                                 "(tiers.<tier>.batching.max_queue): one more is refused, RESOURCE_EXHAUSTED",
                                 t, registry=r)
        self.steps = _StepSeries((model_name, tier), registry=r)  # running, batch size, tokens, inter-token
        self.cache_queries = Counter(f"{PREFIX}_result_cache_queries", "Result-cache lookups", t, registry=r)
        self.cache_hits = Counter(f"{PREFIX}_result_cache_hits", "Result-cache hits", t, registry=r)
        # vLLM's prefix-cache counters, in tokens (every tier exports them; the device's stay 0)
        self.prefix_queries = Counter(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      t, registry=r)
        self.prefix_hits = Counter(f"{PREFIX}_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache",
                                   t, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", t, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", t, registry=r)
        # vLLM's speculative-decoding counters: an escalated request's draft (the lower tier's answer), verified
        self.draft_tokens = Counter(f"{PREFIX}_spec_decode_num_draft_tokens", "Draft tokens verified (an escalated "
                                    "request's draft: the answer of the tier below)", t, registry=r)
        self.accepted_tokens = Counter(f"{PREFIX}_spec_decode_num_accepted_tokens", "Draft tokens the model's own "
                                       "choice agreed with (taken without a decode step each)", t, registry=r)
        me = (model_name, tier)
        # created at 0, so rate() and the dashboards see every series from the first scrape on
        for counter in (self.cache_queries, self.cache_hits, self.prefix_queries, self.prefix_hits,
                        self.prompt_tokens, self.generation_tokens, self.draft_tokens, self.accepted_tokens):
            counter.labels(*me)
        # the series every answer updates, looked up once (`labels` takes a lock and builds a key at each call)
        self._answer_series = (self.requests.labels(*me, "answered", "OK"), self.ttft.labels(*me),
                               self.e2e.labels(*me), self.queue_time.labels(*me), self.prompt_tokens.labels(*me),
                               self.generation_tokens.labels(*me))
        if queue_limit is not None:
            self.queue_limit.labels(*me).set(queue_limit)

    def observe_step(self, stats) -> None:
        """One scheduler step (shared.runtime.scheduler.StepStats)."""
        self.steps.observe(stats)
        if stats.draft_tokens:
            self.draft_tokens.labels(self.model_name, self.tier).inc(stats.draft_tokens)
            self.accepted_tokens.labels(self.model_name, self.tier).inc(stats.accepted_tokens)

    def cache_lookup(self, hit: bool) -> None:
        self.cache_queries.labels(self.model_name, self.tier).inc()
        if hit:
            self.cache_hits.labels(self.model_name, self.tier).inc()

    def prefix_cache_lookup(self, queries: int, hits: int) -> None:
        """One prompt looked up in the engine's prefix cache (see shared.engine.PrefixCache)."""
        self.prefix_queries.labels(self.model_name, self.tier).inc(queries)
        self.prefix_hits.labels(self.model_name, self.tier).inc(hits)

    def observe_response(self, ttft_s: float, total_s: float, queue_s: float, prompt_tokens: int,
                         completion_tokens: int) -> None:
        """A request the model answered."""
        answered, ttft, e2e, queue_time, prompt, generation = self._answer_series
        answered.inc()
        ttft.observe(ttft_s)
        e2e.observe(total_s)
        queue_time.observe(queue_s)
        prompt.inc(prompt_tokens)
        generation.inc(completion_tokens)

    def observe_cached(self, total_s: float) -> None:
        """A request answered from the result cache: no model ran, so no tokens and no time to first token."""
        self.requests.labels(self.model_name, self.tier, "cached", "OK").inc()
        self.e2e.labels(self.model_name, self.tier).observe(total_s)

    def observe_failure(self, code: str) -> None:
        """A request that ended without an answer, with gRPC status `code` (its outcome follows from it)."""
        self.requests.labels(self.model_name, self.tier, outcome_of(code), code).inc()


class _StepSeries:
    """The series a scheduler step updates, for one (model_name, tier): the requests running and waiting, and
    the batch size, tokens and every sequence's inter-token latency of each step, exposed as prometheus_client's
    Gauge and Histogram expose theirs (`_bucket`, `_count`, `_sum`).

    A collector of its own because a step comes at every token: prometheus_client's `observe` takes one value
    per call (a lock, a scan of the buckets, three increments), and a step of 16 sequences made 18 of them plus
    two gauge sets, about a tenth of an edge tier's serving CPU. Here a step costs one lock and one bisect per
    value.
    """

    _GAUGES = ((f"{PREFIX}_num_requests_running", "Requests in the running batch"),
               (f"{PREFIX}_num_requests_waiting", "Requests queued, not yet admitted to the batch"))
    _HISTOGRAMS = ((f"{PREFIX}_batch_size", "Sequences one scheduler step computed (batch occupancy)", BATCH_BUCKETS),
                   (f"{PREFIX}_iteration_tokens", "Tokens one scheduler step computed (decode tokens + prompt "
                    "chunks)", TOKEN_BUCKETS),
                   (f"{PREFIX}_inter_token_latency_seconds", "Time between a sequence's consecutive tokens",
                    ITL_BUCKETS))

    def __init__(self, labels: tuple[str, str], registry: CollectorRegistry):
        self._labels = labels
        self._lock = threading.Lock()
        self._gauges = [0, 0]  # running, waiting: after the last step
        self._bounds = [tuple(float(b) for b in buckets) for _, _, buckets in self._HISTOGRAMS]
        self._counts = [[0] * (len(b) + 1) for b in self._bounds]  # per bucket, the last one +Inf; not cumulative
        self._sums = [0.0] * len(self._HISTOGRAMS)
        registry.register(self)

    def observe(self, stats) -> None:
        """One step (shared.runtime.scheduler.StepStats)."""
        (seqs_b, tokens_b, itl_b), (seqs_c, tokens_c, itl_c) = self._bounds, self._counts
        with self._lock:
            self._gauges[0], self._gauges[1] = stats.running, stats.waiting
            seqs_c[bisect_left(seqs_b, stats.seqs)] += 1
            tokens_c[bisect_left(tokens_b, stats.tokens)] += 1
            for s in stats.inter_token_s:
                itl_c[bisect_left(itl_b, s)] += 1
            sums = self._sums
            sums[0] += stats.seqs
            sums[1] += stats.tokens
            sums[2] += sum(stats.inter_token_s)

    def collect(self):
        with self._lock:
            gauges, counts, sums = list(self._gauges), [list(c) for c in self._counts], list(self._sums)
        names = ["model_name", "tier"]
        for (name, doc), value in zip(self._GAUGES, gauges):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(self._labels, value)
            yield family
        for (name, doc, _), bounds, count, total in zip(self._HISTOGRAMS, self._bounds, counts, sums):
            family = HistogramMetricFamily(name, doc, labels=names)
            cumulative, buckets = 0, []
            for bound, n in zip((*bounds, float("inf")), count):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(self._labels, buckets, total)
            yield family

    def describe(self):
        return list(self.collect())
