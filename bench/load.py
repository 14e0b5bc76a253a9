"""The one load generator every scenario uses, its clients, and the statistics it reports.

Closed loop at a fixed concurrency (like Triton's perf_analyzer): each of N client
threads sends its next request as soon as its previous answer is back, so the
throughput is answers / wall time and the concurrency is exactly N. The same
prompts go to every target; only the client differs (gRPC, a gRPC stream, HTTP).
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc
import numpy as np

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_router.cascade import paid_tokens

REQUEST_TIMEOUT_S = 60.0  # one request, any client
CONNECT_TIMEOUT_S = 30.0  # a channel becoming ready


@dataclass
class Outcome:
    """One request as the client saw it."""

    latency_s: float  # send -> whole answer (or -> first token for a first-token client)
    ok: bool = True
    error: str = ""
    tier: str = ""  # the tier that answered
    cached: bool = False  # answered from the tier's result cache
    server_first_token_ms: float = 0.0  # the tier's own count: queue + prefill + first token
    server_queue_ms: float = 0.0  # of which waiting for a batch
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the tier's prefix cache
    text: str = ""
    paid: dict[str, int] = field(default_factory=dict)  # tier -> tokens its model spent on this answer


@dataclass
class LoadRun:
    """What one closed-loop run measured."""

    outcomes: list[Outcome]
    wall_s: float
    concurrency: int

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def errors(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    @property
    def qps(self) -> float:
        """Answered requests per second of wall time."""
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile([o.latency_s * 1000 for o in self.ok], q)

    def server_first_token_ms(self, q: float) -> float:
        return percentile([o.server_first_token_ms for o in self.ok], q)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values, so a gap can never pass as a number."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def run_load(call: Callable[[str], Outcome], prompts: Sequence[str], concurrency: int,
             warmup: Sequence[str] = ()) -> LoadRun:
    """Send every prompt through `call`, `concurrency` at a time; warm-up prompts first, not counted."""
    with ThreadPoolExecutor(concurrency, thread_name_prefix="load") as pool:
        list(pool.map(call, warmup))
        t0 = time.perf_counter()
        outcomes = list(pool.map(call, prompts))
        wall = time.perf_counter() - t0
    return LoadRun(outcomes, wall, concurrency)


def outcome_of(resp: pb.InferResponse, latency_s: float) -> Outcome:
    return Outcome(latency_s=latency_s, tier=resp.tier, cached=resp.cached,
                   server_first_token_ms=resp.timings.first_token_ms, server_queue_ms=resp.timings.queue_ms,
                   prompt_tokens=resp.usage.prompt_tokens,
                   completion_tokens=resp.usage.completion_tokens, cached_tokens=resp.usage.cached_tokens,
                   text=resp.choices[0].text if resp.choices else "",
                   paid=paid_tokens(resp.escalation_path))


@dataclass
class GrpcClient:
    """Tierline's InferenceService at one address (a tier or the router); one channel, thread-safe."""

    address: str
    max_tokens: int
    _channel: grpc.Channel = field(init=False, repr=False)

    def __post_init__(self):
        self._channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self._channel).result(timeout=CONNECT_TIMEOUT_S)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def _request(self, prompt: str, max_tokens: int | None = None) -> pb.InferRequest:
        return pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=max_tokens or self.max_tokens))

    def infer(self, prompt: str, max_tokens: int | None = None) -> Outcome:
        t0 = time.perf_counter()
        try:
            resp = self._stub.Infer(self._request(prompt, max_tokens), timeout=REQUEST_TIMEOUT_S)
        except grpc.RpcError as exc:
            return Outcome(time.perf_counter() - t0, ok=False, error=f"{exc.code().name}: {exc.details()}")
        return outcome_of(resp, time.perf_counter() - t0)

    def first_token(self, prompt: str) -> Outcome:
        """Time to the first streamed chunk as the client sees it; the rest of the stream is cancelled."""
        t0 = time.perf_counter()
        stream = self._stub.InferStream(self._request(prompt), timeout=REQUEST_TIMEOUT_S)
        try:
            chunk = next(stream)
        except grpc.RpcError as exc:
            return Outcome(time.perf_counter() - t0, ok=False, error=f"{exc.code().name}: {exc.details()}")
        except StopIteration:
            return Outcome(time.perf_counter() - t0, ok=False, error="empty stream")
        latency = time.perf_counter() - t0
        stream.cancel()
        return Outcome(latency, tier=chunk.tier)

    def server_info(self) -> pb.ServerInfo:
        return self._stub.GetServerInfo(pb.ServerInfoRequest(), timeout=REQUEST_TIMEOUT_S)

    def close(self) -> None:
        self._channel.close()


class HttpClient:
    """A JSON-over-HTTP predict endpoint (the LitServe peer); one keep-alive connection per client thread."""

    def __init__(self, host: str, port: int, max_tokens: int, path: str = "/predict"):
        self.host, self.port, self.max_tokens, self.path = host, port, max_tokens, path
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        return conn

    def post(self, body: dict, t0: float, path: str | None = None) -> tuple[float, dict] | Outcome:
        """POST `body` as JSON: (latency since t0, the parsed reply), or a failed Outcome naming the error."""
        try:
            conn = self._conn()
            conn.request("POST", path or self.path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._local.conn = None  # a broken connection is not reused
            return Outcome(time.perf_counter() - t0, ok=False, error=f"{type(exc).__name__}: {exc}")
        latency = time.perf_counter() - t0
        if resp.status != 200:
            return Outcome(latency, ok=False, error=f"HTTP {resp.status}: {data[:200]!r}")
        return latency, json.loads(data)

    def infer(self, prompt: str) -> Outcome:
        reply = self.post({"prompt": prompt, "max_tokens": self.max_tokens}, time.perf_counter())
        if isinstance(reply, Outcome):
            return reply
        latency, out = reply
        return Outcome(latency, tier="litserve", prompt_tokens=out["prompt_tokens"],
                       completion_tokens=out["completion_tokens"], text=out["text"])


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident set (VmHWM) in MiB with its children's (a tier's engine core), from /proc;
    None where it cannot be read."""
    from tierline_device_agent.profile import proc_status_mib

    peaks = [proc_status_mib("VmHWM", p) for p in _process_tree(pid)]
    return None if peaks[0] is None else round(sum(p for p in peaks if p is not None), 1)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used, from /proc/<pid>/stat; None where it cannot be read."""
    import os
    from pathlib import Path

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_groups(pids: dict[str, int]) -> dict[str, list[int]]:
    """Each named process (a tier, the router, nats-server) and, apart as `<name> core`, its children (a tier's
    engine core), for `cpu_by_process`."""
    out = {}
    for name, pid in pids.items():
        tree = _process_tree(pid)
        out[name] = tree[:1]
        if tree[1:]:
            out[f"{name} core"] = tree[1:]
    return out


def cpu_by_process(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds each group of `process_groups` has used so far (a process gone reads as 0)."""
    return {name: sum(cpu_seconds(p) or 0.0 for p in pids) for name, pids in groups.items()}


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc/<pid>/task/*/children."""
    from pathlib import Path

    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except (OSError, ValueError):
                pass
    return out
