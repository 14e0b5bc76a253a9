"""Prometheus metrics of a Tierline process, named after vLLM's where one exists.

Each process (and each server a test starts) owns its own registry, served on
`/metrics` by `serve()` on a port that may be 0 (any free one).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "tierline"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # tokens one step computes
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)  # seconds


class Metrics:
    def __init__(self, tier: str):
        self.tier = tier
        self.registry = CollectorRegistry()
        r, t = self.registry, ["tier"]
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by tier and outcome",
                                ["tier", "outcome"], registry=r)
        self.escalations = Counter(f"{PREFIX}_escalations", "Requests moved to another tier",
                                   ["from_tier", "to_tier", "reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Request received to first token",
                              t, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request received to answer",
                             t, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{PREFIX}_request_queue_time_seconds", "Waiting for a batch",
                                    t, buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge(f"{PREFIX}_num_requests_waiting", "Requests queued, not yet admitted to the batch",
                             t, registry=r)
        self.running = Gauge(f"{PREFIX}_num_requests_running", "Requests in the running batch", t, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Sequences one scheduler step computed (batch occupancy)",
                                    t, buckets=BATCH_BUCKETS, registry=r)
        self.iteration_tokens = Histogram(f"{PREFIX}_iteration_tokens", "Tokens one scheduler step computed "
                                          "(decode tokens + prompt chunks)", t, buckets=TOKEN_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between a sequence's consecutive tokens",
                             t, buckets=ITL_BUCKETS, registry=r)
        self.cache_queries = Counter(f"{PREFIX}_result_cache_queries", "Result-cache lookups", t, registry=r)
        self.cache_hits = Counter(f"{PREFIX}_result_cache_hits", "Result-cache hits", t, registry=r)
        # vLLM's prefix-cache counters, in tokens; created at 0 so every tier exports them (the device's stay 0)
        self.prefix_queries = Counter(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      t, registry=r)
        self.prefix_hits = Counter(f"{PREFIX}_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache",
                                   t, registry=r)
        self.prefix_queries.labels(tier)
        self.prefix_hits.labels(tier)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", t, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", t, registry=r)
        self._http = None
        # the scheduler thread observes a step at every token: its series looked up once, not at every step
        self._step_series = (self.running.labels(tier), self.waiting.labels(tier), self.batch_size.labels(tier),
                             self.iteration_tokens.labels(tier), self.itl.labels(tier))

    def observe_step(self, stats) -> None:
        """One scheduler step (shared.runtime.scheduler.StepStats)."""
        running, waiting, batch_size, iteration_tokens, itl = self._step_series
        running.set(stats.running)
        waiting.set(stats.waiting)
        batch_size.observe(stats.seqs)
        iteration_tokens.observe(stats.tokens)
        for s in stats.inter_token_s:
            itl.observe(s)

    def cache_lookup(self, hit: bool) -> None:
        self.cache_queries.labels(self.tier).inc()
        if hit:
            self.cache_hits.labels(self.tier).inc()

    def prefix_cache_lookup(self, queries: int, hits: int) -> None:
        """One prompt looked up in the engine's prefix cache (see shared.engine.PrefixCache)."""
        self.prefix_queries.labels(self.tier).inc(queries)
        self.prefix_hits.labels(self.tier).inc(hits)

    def observe_response(self, tier: str, outcome: str, ttft_s: float, total_s: float, queue_s: float,
                         prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(tier, outcome).inc()
        self.ttft.labels(tier).observe(ttft_s)
        self.e2e.labels(tier).observe(total_s)
        self.queue_time.labels(tier).observe(queue_s)
        self.prompt_tokens.labels(tier).inc(prompt_tokens)
        self.generation_tokens.labels(tier).inc(completion_tokens)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start /metrics; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http = None

