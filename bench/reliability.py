"""Reliability figures: `tierline bench --soak MINUTES` and `tierline bench --failover` (docs/RELIABILITY.md).

Soak: the whole platform under steady load, each process's memory over time.
The platform (device, edge, cloud, router; result caches and prefix KV caches on, as deployed) gets
benchmark problems through the router from `concurrency` closed-loop clients, fresh prompts all along
(a pool far larger than any cache, so the caches fill to their bounds). Each process's resident set
(VmRSS) is read every `sample_s` seconds. The report gives, per process, the RSS after the warm-up and
at the end, the growth over the measured minutes and over their last half: memory that grows with
traffic must level off at the caches' bounds, so the last half's growth is the figure to watch.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np

from tierline_bench.load import GrpcClient
from tierline_device_agent.profile import proc_status_mib
from tierline_infra.supervisor import Stack, demo_overrides
from tierline_shared.tasks.problems import generate
from tierline_shared.transport.messaging import SILENCE_S

SAMPLE_S = 10.0  # seconds between RSS readings
MAX_TOKENS = 96  # per request, as make demo


def soak(models_dir: Path, minutes: float, warmup_minutes: float = 1.0, concurrency: int = 4,
         log=print) -> dict:
    pool = [p.prompt for p in generate("test", 20_000, seed=11)]
    with Stack(models_dir, overrides=demo_overrides(models_dir)) as stack:
        client = GrpcClient(stack.router_address, MAX_TOKENS)
        stop = threading.Event()
        counts = {"ok": 0, "errors": 0}
        lock = threading.Lock()

        def drive(worker: int) -> None:
            i = worker
            while not stop.is_set():
                ok = client.infer(pool[i % len(pool)]).ok
                with lock:
                    counts["ok" if ok else "errors"] += 1
                i += concurrency

        threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in range(concurrency)]
        for t in threads:
            t.start()
        samples: list[dict] = []
        t0 = time.monotonic()
        end = t0 + (warmup_minutes + minutes) * 60
        log(f"soak: {warmup_minutes} min warm-up, then {minutes} min, {concurrency} clients")
        while True:
            now = time.monotonic()
            samples.append({"t_s": round(now - t0, 1), "requests": counts["ok"] + counts["errors"],
                            "rss_mib": {p.name: proc_status_mib("VmRSS", p.popen.pid) for p in stack.procs}})
            if now >= end:
                break
            time.sleep(min(SAMPLE_S, end - now))
        stop.set()
        for t in threads:
            t.join(timeout=120)
        client.close()
    return report(samples, warmup_minutes * 60, counts)


def report(samples: list[dict], warmup_s: float, counts: dict) -> dict:
    """RSS after the warm-up, at the end and half-way between, per process; growth in MiB."""
    measured = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    first, last = measured[0], measured[-1]
    middle = min(measured, key=lambda s: abs(s["t_s"] - (first["t_s"] + last["t_s"]) / 2))
    procs = {}
    for name in last["rss_mib"]:
        a, m, b = (s["rss_mib"].get(name) for s in (first, middle, last))
        if None in (a, m, b):
            procs[name] = {"not_measured": "/proc/<pid>/status unreadable"}
            continue
        procs[name] = {"rss_after_warmup_mib": round(a, 1), "rss_end_mib": round(b, 1),
                       "growth_mib": round(b - a, 1), "growth_last_half_mib": round(b - m, 1)}
    minutes = (last["t_s"] - first["t_s"]) / 60
    return {"measured_minutes": round(minutes, 2), "warmup_minutes": round(warmup_s / 60, 2),
            "requests": last["requests"] - first["requests"], "errors": counts["errors"],
            "processes": procs, "samples": samples}


def failover(models_dir: Path, clients: int = 8, before_s: float = 3.0, after_s: float = 4.0,
             sig: int = signal.SIGKILL) -> dict:
    """Failover: two edge replicas behind the router under load; one is SIGKILLed (`sig` SIGTERM: stopped, as for an
    upgrade). Reports how long the requests in flight at the kill took (they are answered by the other replica once
    the dead one falls silent, SILENCE_S; a stopped one says UNAVAILABLE at once), against the request timeout they
    used to wait, and whether any failed."""
    timeout_s = 20.0
    overrides = {"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                 "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                 "nats.request_timeout_ms": int(timeout_s * 1000)}
    pool = [p.prompt for p in generate("test", 2000, seed=13)]
    with Stack(models_dir, tiers=("edge",), replicas={"edge": 2}, overrides=overrides) as stack:
        client = GrpcClient(stack.router_address, MAX_TOKENS)
        stop_at = time.monotonic() + before_s + after_s
        results: list[tuple[float, float, bool]] = []
        lock = threading.Lock()

        def drive(worker: int) -> None:
            i = worker
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                ok = client.infer(pool[i % len(pool)]).ok
                with lock:
                    results.append((t0, time.monotonic() - t0, ok))
                i += clients

        threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in range(clients)]
        for t in threads:
            t.start()
        time.sleep(before_s)
        killed = time.monotonic()
        stack.kill("edge-0", sig)
        for t in threads:
            t.join(timeout=timeout_s * 3)
        client.close()
    in_flight = sorted(secs for t0, secs, _ in results if t0 < killed < t0 + secs)
    steady = [secs for t0, secs, _ in results if t0 + secs < killed]
    return {"clients": clients, "requests": len(results), "failed": sum(not ok for _, _, ok in results),
            "request_timeout_s": timeout_s, "silence_s": SILENCE_S, "in_flight_at_kill": len(in_flight),
            "in_flight_latency_s": {"p50": round(float(np.median(in_flight)), 3) if in_flight else None,
                                    "max": round(in_flight[-1], 3) if in_flight else None},
            "steady_latency_s_p50": round(float(np.median(steady)), 3) if steady else None}
