"""The seven measurements of `make bench`, each returning one section of bench/results.json.

Every section has the same shape: `title`, `method` (load generator, concurrency,
requests, warm-up, repeats), `metrics` (numbers, or `{"not_measured": reason}`),
`article` (the figures the issue quotes, for comparison) and `notes`. Targets that
are compared are run interleaved, repeat by repeat (in ABBA order), and ratios are
taken within a repeat before the median, so machine drift cancels.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from tierline_bench.load import (
    GrpcClient,
    HttpClient,
    LoadRun,
    Outcome,
    cpu_by_process,
    median,
    peak_rss_mib,
    percentile,
    process_groups,
    run_load,
)
from tierline_infra.supervisor import Stack
from tierline_router.cascade import cost
from tierline_shared.config.manifest import BatchConfig, load_manifest
from tierline_shared.runtime.affinity import on
from tierline_shared.runtime.engine import Engine, GenerationParams
from tierline_shared.tasks.problems import Problem, is_correct
from tierline_shared.wire import TIERS

T = TypeVar("T")

NATS_TIMEOUT_S = 5.0  # one echo request over NATS
METRICS_TIMEOUT_S = 5.0  # one scrape of a tier's /metrics


@dataclass(frozen=True)
class BenchConfig:
    """How much of everything one run measures (full `make bench` vs `--quick`)."""

    quick: bool
    repeats: int  # runs per target, interleaved between compared targets; medians are reported
    requests: int  # requests per measured run (the same workload for every target)
    warmup: int  # requests sent to each target before its first measured run, not counted
    ttft_requests: int  # first-token probes per run (concurrency 1)
    decisions: int  # router decisions timed
    nats_hops: int  # NATS request/reply round trips timed
    cache_prompts: int  # distinct prompts per cache run
    dialogues: int  # multi-turn dialogues
    concurrency: int = 16  # clients for every throughput row but batching
    batching_concurrency: int = 32  # clients for batching on vs off
    max_tokens: int = 96  # completion tokens at most per request (as `make demo`)
    threads: int = 1  # runtime threads of every engine: each tier, the bare engine, the peer
    seed: int = 7  # the workload's seed (test split)
    batch_lines: int = 10_000  # lines of the Batch API's file (section 10)
    # runs per target of the serving rows (batching; bare engine vs edge, platform and LitServe), whose ratios sit
    # near their targets while this machine's speed drifts 10-25% between runs: more pairs, a steadier median
    serving_repeats: int = 9


FULL = BenchConfig(quick=False, repeats=5, requests=384, warmup=32, ttft_requests=48, decisions=2000,
                   nats_hops=2000, cache_prompts=64, dialogues=60)
QUICK = BenchConfig(quick=True, repeats=1, requests=16, warmup=4, ttft_requests=4, decisions=50, nats_hops=50,
                    cache_prompts=6, dialogues=2, batch_lines=40, serving_repeats=1)


def not_measured(reason: str) -> dict:
    return {"not_measured": reason}


def num(value: float | None, digits: int = 2):
    """A finite number rounded for the report, or an explicit not-measured entry."""
    if value is None or not math.isfinite(value):
        return not_measured("no successful sample")
    return round(float(value), digits)


def _method(cfg: BenchConfig, generator: str, concurrency, requests: int, warmup: int | None = None, **extra) -> dict:
    return {"load_generator": generator, "concurrency": concurrency, "requests": requests,
            "warmup": cfg.warmup if warmup is None else warmup, "repeats": cfg.repeats, **extra}


GRPC_GEN = "closed loop (bench/load.py): N client threads on one gRPC channel, next request when the last returns"


def _grpc(stack: Stack, name: str, cfg: BenchConfig) -> GrpcClient:
    return GrpcClient(f"127.0.0.1:{stack.port(name)}", cfg.max_tokens)


def _interleaved(targets: dict, repeat: int) -> list:
    """The targets in order on even repeats, reversed on odd ones (ABBA), so a steady drift hits all alike."""
    items = list(targets.items())
    return items if repeat % 2 == 0 else items[::-1]


def _errors(runs: list[LoadRun]) -> int:
    return sum(r.errors for r in runs)


# -- 1. edge vs cloud ---------------------------------------------------------------------------------------------
def edge_vs_cloud(stack: Stack, cfg: BenchConfig, prompts: list[str], warm: list[str]) -> dict:
    """The same requests to the edge and the cloud tier directly (gRPC), interleaved repeat by repeat."""
    clients = {t: _grpc(stack, f"{t}-0", cfg) for t in ("edge", "cloud")}
    ttft: dict[str, list[tuple[float, float]]] = {t: [] for t in clients}
    loads: dict[str, list[LoadRun]] = {t: [] for t in clients}
    idle: dict[str, list[float]] = {t: [] for t in clients}
    probes = prompts[:cfg.ttft_requests]
    for r in range(cfg.repeats):
        for t, c in _interleaved(clients, r):
            run = run_load(c.first_token, probes, 1, warm[:cfg.ttft_requests] if r == 0 else ())
            ttft[t].append((run.latency_ms(50), run.latency_ms(95)))
            idle[t].append(run_load(c.infer, probes, 1).server_first_token_ms(50))  # the tier's timing, unloaded
            loads[t].append(run_load(c.infer, prompts, cfg.concurrency, warm if r == 0 else ()))
    for c in clients.values():
        c.close()
    rss = {p.name.split("-")[0]: peak_rss_mib(p.popen.pid) for p in stack.procs}
    metrics: dict = {}
    for t in clients:
        metrics[t] = {
            "first_token_ms_p50": num(median([a for a, _ in ttft[t]])),
            "first_token_ms_p95": num(median([b for _, b in ttft[t]])),
            "qps": num(median([run.qps for run in loads[t]])),
            "loaded_first_token_ms_p50": num(median([run.server_first_token_ms(50) for run in loads[t]])),
            "loaded_first_token_ms_p95": num(median([run.server_first_token_ms(95) for run in loads[t]])),
            "unloaded_first_token_ms_p50": num(median(idle[t])),
            # issue 23's target: <= 3x; both the tier's own timing (queue + prefill + first token), per repeat
            "loaded_over_unloaded_first_token": num(median([run.server_first_token_ms(50) / i
                                                            for run, i in zip(loads[t], idle[t]) if i > 0])),
            "latency_ms_p50": num(median([run.latency_ms(50) for run in loads[t]])),
            "peak_rss_mib": (num(rss[t], 1) if rss.get(t) is not None
                             else not_measured("/proc/<pid>/status unreadable")),
            "errors": _errors(loads[t]),
            "qps_runs": [round(run.qps, 2) for run in loads[t]],
        }
    e, c = metrics["edge"], metrics["cloud"]
    metrics["ratio"] = {
        "first_token_p50_cloud_over_edge": num(median([tc[0] / te[0] for te, tc in zip(ttft["edge"], ttft["cloud"])])),
        "qps_edge_over_cloud": num(median([le.qps / lc.qps for le, lc in zip(loads["edge"], loads["cloud"])
                                           if lc.qps > 0])),
        "peak_rss_cloud_over_edge": (num(c["peak_rss_mib"] / e["peak_rss_mib"]) if isinstance(e["peak_rss_mib"], float)
                                     and isinstance(c["peak_rss_mib"], float) else not_measured("no RSS reading")),
    }
    metrics["peak_rss_mib_other"] = {name: (num(v, 1) if v is not None else not_measured("unreadable"))
                                     for name, v in rss.items() if name not in clients}
    return {
        "title": "Edge vs cloud on the same requests",
        "method": _method(cfg, GRPC_GEN + "; first token: a gRPC stream at concurrency 1, cancelled after the first "
                          "chunk; throughput: unary Infer", cfg.concurrency, len(prompts),
                          first_token_requests=len(probes), max_tokens=cfg.max_tokens, threads=cfg.threads,
                          target="each tier's own gRPC port (no router)"),
        "metrics": metrics,
        "article": {"first_token_ms": "230 (edge) vs 850 (cloud)", "qps": "120 (edge) vs 45 (cloud)",
                    "memory": "1.2 GB (edge) vs 4.8 GB (cloud)"},
        "notes": ["Both tiers run on this machine's CPU with one runtime thread each, and the models are small "
                  "(see models/REPORT.md); the article compares an edge box with a cloud GPU server and far larger "
                  "models, so compare the ratios, not the absolute figures.",
                  "Peak RSS is VmHWM of each tier's own process (the whole Python process: runtime, gRPC, NATS, "
                  "model), read after the runs.",
                  "Loaded first token is the tier's own timing (queue + prefill + first token) at the throughput "
                  "row's concurrency."],
    }


# -- 2. tiered vs cloud only ------------------------------------------------------------------------------------------
def tiered_vs_cloud(stack: Stack, cfg: BenchConfig, problems: list[Problem], warm: list[str],
                    costs: dict[str, float]) -> dict:
    """The same workload through the router (device + edge + cloud) and straight to the cloud, interleaved."""
    prompts = [p.prompt for p in problems]
    clients = {"tiered": GrpcClient(stack.router_address, cfg.max_tokens), "cloud_only": _grpc(stack, "cloud-0", cfg)}
    runs: dict[str, list[LoadRun]] = {k: [] for k in clients}
    groups = process_groups({**{p.name: p.popen.pid for p in stack.procs}, "nats-server": stack.nats.proc.pid})
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in clients}  # per run: process -> ms per request
    for c in clients.values():
        run_load(c.infer, warm, cfg.concurrency)
    spec = ("tierline_spec_decode_num_draft_tokens_total", "tierline_spec_decode_num_accepted_tokens_total")
    ports = {t: _metrics_port(stack, f"{t}-0") for t in ("edge", "cloud")}
    drafts_before = {t: _samples(port, *spec) for t, port in ports.items()}
    for r in range(cfg.repeats):
        for k, c in _interleaved(clients, r):
            before, mine = cpu_by_process(groups), time.process_time()
            run = run_load(c.infer, prompts, cfg.concurrency)
            after, mine = cpu_by_process(groups), time.process_time() - mine
            used = {name: after[name] - before[name] for name in groups} | {"load generator": mine}
            cpu[k].append({**{name: 1000 * v / max(len(run.ok), 1) for name, v in used.items()},
                           "cores": sum(used.values()) / run.wall_s})
            runs[k].append(run)
    for c in clients.values():
        c.close()
    drafts = {}  # only escalations bring drafts: all of them came with the tiered runs
    for t, port in ports.items():
        d, a = (x - y for x, y in zip(_samples(port, *spec), drafts_before[t]))
        drafts[t] = {"draft_tokens": int(d), "accepted_tokens": int(a),
                     "acceptance": num(a / d, 4) if d else {"not_measured": "no escalated request brought it a draft"}}

    def summary(run: LoadRun) -> dict:
        answered = [(p, o) for p, o in zip(problems, run.outcomes) if o.ok]
        share = Counter(o.tier for _, o in answered)
        n = max(len(answered), 1)
        return {"qps": run.qps, "accuracy": sum(is_correct(p, o.text) for p, o in answered) / n,
                "cost_per_request": sum(cost(o.paid, costs) for _, o in answered) / n,
                "share": {t: share.get(t, 0) / n for t in TIERS},
                "escalated": sum(len(o.paid) > 1 for _, o in answered) / n}

    s = {k: [summary(run) for run in v] for k, v in runs.items()}
    rc = load_manifest(stack.manifest, check_artifacts=False).router
    policy = {"scorer": rc.scorer or "heuristic", "device_complexity": rc.device_complexity,
              "cloud_complexity": rc.cloud_complexity, "confidence_threshold": dict(rc.confidence_threshold)}
    metrics: dict = {}
    for k in clients:
        metrics[k] = {"qps": num(median([x["qps"] for x in s[k]])),
                      "accuracy": num(median([x["accuracy"] for x in s[k]]), 4),
                      "cost_per_request": num(median([x["cost_per_request"] for x in s[k]]), 5),
                      "share": {t: num(median([x["share"][t] for x in s[k]]), 4) for t in TIERS},
                      "escalated_share": num(median([x["escalated"] for x in s[k]]), 4),
                      "latency_ms_p50": num(median([run.latency_ms(50) for run in runs[k]])),
                      "latency_ms_p95": num(median([run.latency_ms(95) for run in runs[k]])),
                      "errors": _errors(runs[k]),
                      "cpu_ms_per_request": {name: num(median([x[name] for x in cpu[k]]), 3)
                                             for name in [*groups, "load generator"]},
                      "cores_busy": num(median([x["cores"] for x in cpu[k]]))}
    metrics["tiered"]["drafts"] = drafts
    pairs = list(zip(s["tiered"], s["cloud_only"]))
    metrics["ratio"] = {
        "throughput_tiered_over_cloud": num(median([a["qps"] / b["qps"] for a, b in pairs if b["qps"] > 0])),
        "cost_reduction": num(median([1 - a["cost_per_request"] / b["cost_per_request"] for a, b in pairs
                                      if b["cost_per_request"] > 0]), 4),
        "share_below_cloud": num(median([1 - a["share"]["cloud"] for a, _ in pairs]), 4),
        "accuracy_delta": num(median([a["accuracy"] - b["accuracy"] for a, b in pairs]), 4),
    }
    return {
        "title": "Tiered system vs cloud only",
        "method": _method(cfg, GRPC_GEN, cfg.concurrency, len(prompts), max_tokens=cfg.max_tokens,
                          workload=f"{len(prompts)} benchmark problems (test split, all five levels, seed {cfg.seed})",
                          costs_per_1k_tokens=costs, router_policy=policy,
                          target="tiered: the router (scorer + confidence cascade) over device, edge and cloud; "
                                 "cloud only: the cloud tier's gRPC port"),
        "metrics": metrics,
        "article": {"throughput": "2.8x", "cost": "-80%", "share_at_edge": "90%"},
        "notes": ["Every tier shares this machine's two cores, so requests the router keeps at the device or edge "
                  "still take CPU from the cloud; on separate machines the tiers would not compete.",
                  "Cost per request is in the manifest's relative units (cost_per_1k_tokens, above); an escalated "
                  "request pays every tier that ran a model for it, each for its own tokens "
                  "(tierline_router.cascade.cost).",
                  "Accuracy is exact match of the final answer (tierline_shared.tasks.problems.is_correct).",
                  "CPU per request: each process's CPU time (user + system, /proc) over a run divided by its answered "
                  "requests, median over the repeats; a tier's engine core apart from its serving process; cores "
                  f"busy: all of it over the run's wall time ({os.cpu_count()} here). One runtime thread per tier "
                  "(cfg.threads), so the cloud alone is bound by its engine core's one core, while the tiered system "
                  "spreads over all.",
                  "An escalated request brings the answer it escalates from as a draft (docs/ARCHITECTURE.md, "
                  "\"Escalation with a draft\"): the tier above verifies it in one forward and decodes on from where "
                  "its own model parts from it; drafts accepted: the share of draft tokens its own greedy choice "
                  "agreed with (tierline_spec_decode_num_accepted_tokens_total over ..._draft_tokens_total, over the "
                  "tiered runs). The answers are the same tokens as without a draft."],
    }


def tiered_in_context(tiered: dict, edge_vs_cloud: dict) -> None:
    """A note for the tiered section from this run's section 1: the edge tier alone against the cloud alone, the
    scale a system that answers most requests at the edge (through the router) can reach on the same cores."""
    edge_over_cloud = edge_vs_cloud["metrics"]["ratio"]["qps_edge_over_cloud"]
    shares = tiered["metrics"]["tiered"]["share"]
    if not isinstance(edge_over_cloud, (int, float)) or not isinstance(shares.get("edge"), float):
        return
    tiered["notes"].append(
        f"For scale, from this run: the edge tier alone, asked straight on its gRPC port, served {edge_over_cloud}x "
        f"the cloud tier alone (section 1). The tiered system answers {100 * shares['edge']:.0f}% of its requests at "
        f"the edge through the router (section 5 measures that path against the bare engine), "
        f"{100 * shares['device']:.0f}% on the device and {100 * shares['cloud']:.0f}% in the cloud, whose few "
        f"requests at a time fill its batches poorly. Its gain over the cloud alone, on the same cores: "
        f"{tiered['metrics']['ratio']['throughput_tiered_over_cloud']}x.")


# -- 3. dynamic batching on vs off ----------------------------------------------------------------------------------
def batching(on: Stack, off: Stack, cfg: BenchConfig, prompts: list[str], warm: list[str],
             engine_cpus: list[int] | None = None) -> dict:
    """The edge with its scheduler's batch on and off (`engine_cpus`: where both engine cores run, for the report)."""
    clients = {"on": _grpc(on, "edge-0", cfg), "off": _grpc(off, "edge-0", cfg)}
    runs: dict[str, list[LoadRun]] = {k: [] for k in clients}
    for r in range(cfg.serving_repeats):
        for k, c in _interleaved(clients, r):
            runs[k].append(run_load(c.infer, prompts, cfg.batching_concurrency, warm if r == 0 else ()))
    for c in clients.values():
        c.close()
    metrics: dict = {k: {"qps": num(median([x.qps for x in v])),
                         "latency_ms_p50": num(median([x.latency_ms(50) for x in v])),
                         "latency_ms_p95": num(median([x.latency_ms(95) for x in v])),
                         "errors": _errors(v), "qps_runs": [round(x.qps, 2) for x in v]} for k, v in runs.items()}
    metrics["ratio"] = {"qps_on_over_off": num(median([a.qps / b.qps for a, b in zip(runs["on"], runs["off"])
                                                       if b.qps > 0]))}
    return {
        "title": "Continuous batching on vs off",
        "method": _method(cfg, GRPC_GEN, cfg.batching_concurrency, len(prompts), max_tokens=cfg.max_tokens,
                          repeats=cfg.serving_repeats, engine_cpus=engine_cpus or [],
                          target=f"the edge tier's gRPC port; on: max_num_seqs {BatchConfig().max_num_seqs} (the "
                                 "default); off: max_num_seqs 1; result cache off in both"),
        "metrics": metrics,
        "article": {"throughput": "about 3x (Triton's tutorial; 3.3x at concurrency 16)"},
        "notes": ["Off is the same scheduler with a running batch of one sequence (manifest "
                  "tiers.edge.batching.max_num_seqs: 1)."],
    }


# -- 4. the layered cache ----------------------------------------------------------------------------------------------
def cache(stack: Stack, reuse_on: Stack, reuse_off: Stack, cfg: BenchConfig, pool: list[Problem],
          dialogue_problems: list[Problem], concurrent_dialogue_problems: list[Problem], engine: Engine,
          engine_cpus: list[int] | None = None) -> dict:
    """Exact-repeat hits vs misses and the hit rate on traffic with repeats (result cache, `stack`); the same
    multi-turn dialogues with prefix KV reuse on and off (`reuse_on` / `reuse_off`, result caches off), one at a
    time, then other dialogues DIALOGUE_CONCURRENCY at a time; and what an idle CPU costs the next prefill, on
    `engine` (the edge model, in-process, on `engine_cpus`: where the tiers' engine cores run)."""
    client = _grpc(stack, "edge-0", cfg)
    distinct = list(dict.fromkeys(p.prompt for p in pool))
    per = max(1, len(distinct) // (cfg.repeats + 1))
    miss_ms, hit_ms, speedups = [], [], []
    for r in range(cfg.repeats):  # fresh prompts every repeat: the first pass misses, the second hits
        batch = distinct[r * per:(r + 1) * per]
        first = run_load(client.infer, batch, 1)
        again = run_load(client.infer, batch, 1)
        m = [o.latency_s * 1000 for o in first.ok if not o.cached]
        h = [o.latency_s * 1000 for o in again.ok if o.cached]
        miss_ms.append(median(m))
        hit_ms.append(median(h))
        speedups.append(median(m) / median(h) if h and m else math.nan)
    # traffic with repeats: a Zipf draw over a pool of prompts the cache has not seen yet
    rest = distinct[cfg.repeats * per:] or distinct
    rng = random.Random(cfg.seed)
    weights = [1 / (i + 1) for i in range(len(rest))]
    traffic = rng.choices(rest, weights=weights, k=cfg.requests)
    repeat_share = 1 - len(set(traffic)) / len(traffic)
    zipf = run_load(client.infer, traffic, cfg.concurrency)
    hit_rate = sum(o.cached for o in zipf.ok) / max(len(zipf.ok), 1)

    client.close()
    turns = _dialogues({"on": reuse_on, "off": reuse_off}, dialogue_problems, cfg)
    together = _dialogues({"on": reuse_on, "off": reuse_off}, concurrent_dialogue_problems, cfg, DIALOGUE_CONCURRENCY)
    idle = _on_cpus(engine_cpus, lambda: _after_idle(engine, [p.prompt for p in dialogue_problems]))
    metrics = {
        "repeat": {"miss_latency_ms_p50": num(median(miss_ms)), "hit_latency_ms_p50": num(median(hit_ms)),
                   "hit_speedup": num(median(speedups)),
                   "zipf_repeat_share": num(repeat_share, 4), "zipf_hit_rate": num(hit_rate, 4),
                   "zipf_qps": num(zipf.qps), "errors": zipf.errors},
        "multi_turn": turns["metrics"],
        "multi_turn_concurrent": together["metrics"],
        "prefill_after_idle": idle,
    }
    return {
        "title": "The layered cache",
        "method": _method(cfg, "closed loop (bench/load.py), gRPC to the edge tier", "1 (hit/miss), "
                          f"{cfg.concurrency} (Zipf traffic), 1 and {DIALOGUE_CONCURRENCY} (dialogues)",
                          cfg.requests, warmup=0, hit_miss_prompts_per_repeat=per, dialogues=turns["dialogues"],
                          concurrent_dialogues=together["dialogues"], dialogue_concurrency=[1, DIALOGUE_CONCURRENCY],
                          dialogue_max_tokens=DIALOGUE_MAX_TOKENS, engine_cpus=engine_cpus or [],
                          target="repeats: the edge tier with its LRU result cache on (cache_size 1024); "
                                 "dialogues: two edge tiers with result caches off, prefix KV reuse on "
                                 "(prefix_cache_tokens 4096, the default) and off (prefix_cache_tokens 0), "
                                 "interleaved repeat by repeat, each repeat with its own dialogues"),
        "metrics": metrics,
        "article": {"multi_turn": "reusing the shared prefix's KV cache: 40% less compute"},
        "notes": ["Hits are exact repeats of a greedy request (same prompt, max_tokens, stop, window), answered by "
                  "the tier's LRU before the scheduler; identical requests in flight at the same time both miss "
                  "(no request coalescing), so the hit rate is below the traffic's repeat share.",
                  "Multi-turn: each turn's prompt is the whole dialogue so far plus the next question. With reuse "
                  "on, the tier keeps each prompt's KV (shared/runtime/engine.py PrefixCache) and a later prompt "
                  "prefills only what follows the longest cached prefix; a finished answer's KV is kept too, so "
                  "turn k reuses turn k-1's prompt and answer. Prefill tokens computed are each answer's "
                  "usage (prompt_tokens - cached_tokens), checked against the tier's tierline_prefix_cache_hits_total "
                  "counter read before and after each run (cached_tokens_disagree_with_metrics: runs that differ). "
                  "later_turns_prefill_time_saving is prefill_time_saving on turns 2 and 3 alone.",
                  f"multi_turn: one dialogue at a time (concurrency 1); multi_turn_concurrent: other dialogues, "
                  f"{DIALOGUE_CONCURRENCY} at a time (each one's turns in order), as a tier serving several users "
                  "sees them; there a turn's prefill + first token can include the prefill of a request that joined "
                  "the same step (a warm row's forward runs after the fresh rows'). One at a time, the engine is "
                  "idle while the client reads an answer and sends the next turn. prefill_after_idle shows what an "
                  "idle CPU costs one prefill on this machine: the bare edge engine, in-process on the engine CPU, "
                  "prefills each dialogue question (max_tokens 1) right after another forward, then after sleeping "
                  f"{', '.join(str(ms) for ms in IDLE_MS)} ms, interleaved question by question; medians. That extra "
                  "time is the same with reuse on and off: it lowers the share of prefill time reuse saves, not the "
                  "time saved.",
                  "Compute saving = 1 - prefill tokens computed with reuse / without (all turns; later turns "
                  "alone); the decode steps are the same either way, so all_tokens_compute_saving counts them "
                  "too. prefill_time_saving is the same ratio on the tiers' prefill + first-token times, per "
                  "repeat, median. shared_prefix_token_share is what a cache that also kept answers could skip.",
                  "identical_answer_share: greedy answers must be the same with and without reuse (the "
                  "contract, tested in tests/test_prefix_cache.py); anything below 1 is a bug."],
    }


DIALOGUE_TURNS = 3
DIALOGUE_MAX_TOKENS = 32  # completion tokens per turn
DIALOGUE_CONCURRENCY = 4  # dialogues in flight in the second run (each one's turns in order)
IDLE_MS = (1, 2, 5, 10)  # prefill_after_idle: how long the engine sleeps before a timed prefill


def _after_idle(engine: Engine, prompts: list[str]) -> dict:
    """Prefill + first token of each prompt (max_tokens 1), run right after another forward and run after each of
    IDLE_MS asleep, interleaved prompt by prompt: what an engine idle between requests pays (caches, clocks)."""
    params = GenerationParams(max_tokens=1)
    for p in prompts[:8]:
        engine.generate(p, params)  # warm
    warm, idle = [], {ms: [] for ms in IDLE_MS}
    for i, p in enumerate(prompts):
        engine.generate(p, params)
        warm.append(engine.generate(p, params).first_token_s * 1000)  # right after another forward
        for ms in IDLE_MS[i % len(IDLE_MS):] + IDLE_MS[:i % len(IDLE_MS)]:  # each idle length first in turn
            time.sleep(ms / 1000)
            idle[ms].append(engine.generate(p, params).first_token_s * 1000)
    base = median(warm)
    return {"prompts": len(prompts), "first_token_ms_p50_back_to_back": num(base),
            "after_idle": {str(ms): {"first_token_ms_p50": num(median(v)),
                                     "over_back_to_back": num(median(v) / base, 3) if base else not_measured(
                                         "no time measured")} for ms, v in idle.items()}}


def _dialogues(targets: dict[str, Stack], problems: list[Problem], cfg: BenchConfig, concurrency: int = 1) -> dict:
    """The same three-turn dialogues on each target (prefix reuse on / off), `concurrency` dialogues at a time
    (each one's turns in order), ABBA by repeat.

    Turn k's prompt repeats turns 1..k-1 with their answers. Answers are greedy, so both targets see the
    same prompts (checked: identical_answer_share).
    """
    clients = {name: _grpc(s, "edge-0", cfg) for name, s in targets.items()}
    ports = {name: _metrics_port(s, "edge-0") for name, s in targets.items()}
    max_context = clients["on"].server_info().max_context
    dialogues = [problems[d:d + DIALOGUE_TURNS] for d in range(0, len(problems) - DIALOGUE_TURNS + 1, DIALOGUE_TURNS)]
    per = max(1, len(dialogues) // cfg.repeats)
    mismatches = 0
    rows: list[dict] = []  # one per answered turn: repeat, target, dialogue, turn, token counts, times, text

    def dialogue_rows(client: GrpcClient, r: int, name: str, d: int, dialogue: list[Problem]) -> list[dict]:
        out, history = [], ""
        for k, p in enumerate(dialogue):
            prompt = (history + "\n" if history else "") + p.prompt
            if len(prompt) + DIALOGUE_MAX_TOKENS + 2 > max_context:  # one token per character, plus BOS
                break
            o = client.infer(prompt, max_tokens=DIALOGUE_MAX_TOKENS)
            if not o.ok:
                out.append({"repeat": r, "target": name, "turn": k, "ok": False})
                break
            out.append({"repeat": r, "target": name, "dialogue": d, "turn": k, "ok": True,
                        "prompt": o.prompt_tokens, "computed": o.prompt_tokens - o.cached_tokens,
                        "completion": o.completion_tokens, "text": o.text, "e2e_ms": o.latency_s * 1000,
                        "prefill_ms": o.server_first_token_ms - o.server_queue_ms})
            history = prompt + o.text
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        for r in range(cfg.repeats):
            chunk = dialogues[r * per:(r + 1) * per] or dialogues[:per]
            for name, client in _interleaved(clients, r):
                hits_before, answered = _prefix_hits(ports[name]), len(rows)
                for out in pool.map(lambda d: dialogue_rows(client, r, name, r * per + d, chunk[d]),
                                    range(len(chunk))):
                    rows += out
                # each answer's usage.cached_tokens against the tier's own counter over the run (read outside the
                # timed requests, so that a scrape never shares the tier's time with a request)
                reused = sum(x["prompt"] - x["computed"] for x in rows[answered:] if x["ok"])
                mismatches += reused != _prefix_hits(ports[name]) - hits_before
    for c in clients.values():
        c.close()
    metrics = _multi_turn_metrics(rows)
    metrics["cached_tokens_disagree_with_metrics"] = mismatches  # runs whose answers' counts and the tier's differ
    metrics["concurrency"] = concurrency
    return {"metrics": metrics, "dialogues": len({(x["repeat"], x.get("dialogue")) for x in rows})}


def _multi_turn_metrics(rows: list[dict]) -> dict:
    """Per turn and overall: prefill tokens computed and times with reuse on vs off, and the savings."""
    ok = [x for x in rows if x["ok"]]

    def pick(target: str, turn: int | None = None, repeat: int | None = None) -> list[dict]:
        return [x for x in ok if x["target"] == target and turn in (None, x["turn"]) and repeat in (None, x["repeat"])]

    def saving(on: float, off: float):
        return num(1 - on / off, 4) if off else not_measured("no prefill tokens without reuse")

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else math.nan

    per_turn = {}
    for k in range(DIALOGUE_TURNS):
        row = {"prompt_tokens_mean": num(mean([x["prompt"] for x in pick("off", k)]), 1)}
        for t in ("on", "off"):
            xs = pick(t, k)
            row[f"prefill_tokens_computed_mean_{t}"] = num(mean([x["computed"] for x in xs]), 1)
            row[f"prefill_first_token_ms_p50_{t}"] = num(median([x["prefill_ms"] for x in xs]))
            row[f"e2e_latency_ms_p50_{t}"] = num(median([x["e2e_ms"] for x in xs]))
            # prompt tokens served per second of prefill + first token (the turn's prompt throughput)
            row[f"prompt_tokens_per_s_{t}"] = num(median([x["prompt"] / x["prefill_ms"] * 1000 for x in xs
                                                          if x["prefill_ms"] > 0]), 1)
        per_turn[f"turn{k + 1}"] = row
    on, off = pick("on"), pick("off")
    later_on, later_off = [x for x in on if x["turn"]], [x for x in off if x["turn"]]
    time_savings = []
    for r in sorted({x["repeat"] for x in ok}):
        t_on = sum(x["prefill_ms"] for x in pick("on", repeat=r))
        t_off = sum(x["prefill_ms"] for x in pick("off", repeat=r))
        if t_on and t_off:
            time_savings.append(1 - t_on / t_off)
    later_time_savings = []  # turns 2 and 3 alone: where the reuse is
    for r in sorted({x["repeat"] for x in ok}):
        t_on = sum(x["prefill_ms"] for x in pick("on", repeat=r) if x["turn"])
        t_off = sum(x["prefill_ms"] for x in pick("off", repeat=r) if x["turn"])
        if t_on and t_off:
            later_time_savings.append(1 - t_on / t_off)
    answers = {(x["repeat"], x["dialogue"], x["turn"]): x["text"] for x in off}
    same = [answers.get((x["repeat"], x["dialogue"], x["turn"])) == x["text"] for x in on]
    # what a cache of whole turns (prompt + answer) could skip: the previous turn's prompt and completion
    prev = {(x["repeat"], x["dialogue"], x["turn"]): x["prompt"] + x["completion"] for x in off}
    shareable = sum(prev.get((x["repeat"], x["dialogue"], x["turn"] - 1), 0) for x in later_off)
    later_tokens = sum(x["prompt"] for x in later_off)
    return {
        "per_turn": per_turn,
        "prefill_tokens_computed_on": sum(x["computed"] for x in on),
        "prefill_tokens_computed_off": sum(x["computed"] for x in off),
        "prefix_kv_reuse_compute_saving": saving(sum(x["computed"] for x in on), sum(x["computed"] for x in off)),
        "later_turns_compute_saving": saving(sum(x["computed"] for x in later_on),
                                             sum(x["computed"] for x in later_off)),
        "all_tokens_compute_saving": saving(sum(x["computed"] + x["completion"] for x in on),
                                            sum(x["computed"] + x["completion"] for x in off)),
        "prefill_time_saving": num(median(time_savings), 4),
        "later_turns_prefill_time_saving": num(median(later_time_savings), 4),
        "shared_prefix_token_share": num(shareable / later_tokens, 4) if later_tokens else not_measured(
            "no later turn fitted the context"),
        "identical_answer_share": num(mean(same), 4),
        "turns_answered_on": len(on), "turns_answered_off": len(off),
        "errors": len(rows) - len(ok),
    }


def _metrics_port(stack: Stack, name: str) -> int:
    return next(p.ready["metrics_port"] for p in stack.procs if p.name == name)


def _samples(port: int, *names: str) -> tuple[float, ...]:
    """Each named sample of a tier's /metrics (e.g. tierline_prefix_cache_hits_total), summed over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=METRICS_TIMEOUT_S) as resp:
        text = resp.read().decode()
    got = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in got:
                got[sample.name] += sample.value
    return tuple(got.values())


def _prefix_hits(port: int) -> float:
    """The tier's tierline_prefix_cache_hits_total (prompt tokens whose KV was reused)."""
    return _samples(port, "tierline_prefix_cache_hits_total")[0]


STEP_SIZES = ("tierline_batch_size_sum", "tierline_batch_size_count")  # sequences over all steps, steps


def _occupancy(port: int, measure: Callable[[], LoadRun]) -> tuple[LoadRun, float]:
    """`measure()` and the tier's mean sequences per scheduler step over it (its tierline_batch_size histogram)."""
    seqs0, steps0 = _samples(port, *STEP_SIZES)
    run = measure()
    seqs1, steps1 = _samples(port, *STEP_SIZES)
    return run, (seqs1 - seqs0) / (steps1 - steps0) if steps1 > steps0 else math.nan


def bare_occupancy(run: LoadRun) -> float:
    """The bare engine's mean rows per decode step: each batch decodes until its longest answer ends, its
    rows leaving as they finish (a row's completion tokens are its decode steps)."""
    tokens = steps = 0
    for i in range(0, len(run.outcomes), run.concurrency):
        batch = [o.completion_tokens for o in run.outcomes[i:i + run.concurrency]]
        tokens, steps = tokens + sum(batch), steps + max(batch)
    return tokens / steps if steps else math.nan


# -- 5. platform overhead and 6. the LitServe peer ---------------------------------------------------------------
def run_bare(engine, prompts: list[str], batch: int, max_tokens: int) -> LoadRun:
    """The limit: the same engine in this process, fed ready-made batches, no queue, no network."""
    from tierline_shared.runtime.engine import GenerationParams

    params = GenerationParams(max_tokens=max_tokens)
    outcomes = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        b0 = time.perf_counter()
        results = engine.generate_batch(chunk, [params] * len(chunk))
        took = time.perf_counter() - b0
        outcomes += [Outcome(took, tier="bare", prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                             text=r.text) for r in results]
    return LoadRun(outcomes, time.perf_counter() - t0, batch)


def _awake(server, measure: Callable[[], LoadRun]) -> LoadRun:
    """Measure with `server` (a PeerServer, or None) running, and freeze it again after."""
    if server is None:
        return measure()
    server.resume()
    try:
        return measure()
    finally:
        server.pause()


def _on_cpus(cpus: list[int] | None, measure: Callable[[], T]) -> T:
    """`measure()` with this thread on `cpus`, then back: the bare engine runs on the CPU the edge's engine core
    and LitServe's worker run on (CPUs of one machine differ in speed, from run to run)."""
    with on(cpus or ()):  # this thread only (the engine runs one thread: cfg.threads)
        return measure()


BARE_BATCHES = (4, 8, 16, 32)  # the bare engine's batch sizes tried; it is measured at its fastest


def best_bare_batch(engine, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[int, dict[int, float]]:
    """The batch size at which the bare engine is fastest on these prompts, among those `concurrency` requests in
    flight can form (a load of 16 never makes a batch of 32), and each size's req/s (all tried, for the report)."""
    qps = {b: run_bare(engine, prompts, b, max_tokens).qps for b in BARE_BATCHES}
    allowed = {b: q for b, q in qps.items() if b <= concurrency} or {min(qps): qps[min(qps)]}
    return max(allowed, key=allowed.get), {b: round(q, 1) for b, q in qps.items()}


def overhead_and_peer(platform: Stack, engine, peers: dict[str, HttpClient], peer_reason: str | None,
                      cfg: BenchConfig, prompts: list[str], warm: list[str],
                      servers: dict | None = None, engine_cpus: list[int] | None = None) -> tuple[dict, dict]:
    """Bare engine (at its best batch size), edge tier alone (gRPC), edge behind router + NATS + gRPC, and
    LitServe in each of its modes (`peers`: mode -> client); interleaved. `servers` (mode -> PeerServer): each
    is frozen while the other targets are measured. `engine_cpus`: where the edge's engine core and LitServe's
    inference worker run (the rest run elsewhere), for the report."""
    servers = servers or {}
    for s in servers.values():
        s.pause()
    batch, tried = _on_cpus(engine_cpus, lambda: best_bare_batch(engine, (warm * 4)[:4 * max(BARE_BATCHES)],
                                                                 cfg.max_tokens, cfg.concurrency))
    edge = _grpc(platform, "edge-0", cfg)
    router = GrpcClient(platform.router_address, cfg.max_tokens)
    port = _metrics_port(platform, "edge-0")
    occupancy: dict[str, list[float]] = {"bare": [], "edge_node": [], "platform": []}

    def occupied(name: str, measure: Callable[[], LoadRun]) -> LoadRun:
        run, seqs = _occupancy(port, measure)
        occupancy[name].append(seqs)
        return run

    def bare(r: int) -> LoadRun:
        run = _on_cpus(engine_cpus, lambda: run_bare(engine, prompts, batch, cfg.max_tokens))
        occupancy["bare"].append(bare_occupancy(run))
        return run

    targets: dict[str, Callable[[int], LoadRun]] = {
        "bare": bare,
        "edge_node": lambda r: occupied("edge_node", lambda: run_load(edge.infer, prompts, cfg.concurrency,
                                                                      warm if r == 0 else ())),
        "platform": lambda r: occupied("platform", lambda: run_load(router.infer, prompts, cfg.concurrency,
                                                                    warm if r == 0 else ())),
    }
    for mode, client in peers.items():
        targets[f"litserve_{mode}"] = lambda r, c=client, s=servers.get(mode): _awake(
            s, lambda: run_load(c.infer, prompts, cfg.concurrency, warm if r == 0 else ()))
    runs: dict[str, list[LoadRun]] = {k: [] for k in targets}
    for r in range(cfg.serving_repeats):
        for k, fn in _interleaved(targets, r):
            runs[k].append(fn(r))
    edge.close()
    router.close()

    def row(v: list[LoadRun]) -> dict:
        return {"qps": num(median([x.qps for x in v])), "latency_ms_p50": num(median([x.latency_ms(50) for x in v])),
                "latency_ms_p95": num(median([x.latency_ms(95) for x in v])), "errors": _errors(v),
                "tokens_per_s": num(median([sum(o.completion_tokens for o in x.ok) / x.wall_s for x in v]), 1),
                "qps_runs": [round(x.qps, 2) for x in v]}

    def ratio(a: str, b: str):
        return num(median([x.qps / y.qps for x, y in zip(runs[a], runs[b]) if y.qps > 0]), 3)

    overhead = {
        "title": "Platform overhead: the edge behind router + NATS + gRPC vs bare onnxruntime",
        "method": _method(cfg, GRPC_GEN + f"; bare: the same OnnxEngine in the harness process, batches of {batch} "
                          "in sequence", cfg.concurrency, len(prompts), max_tokens=cfg.max_tokens,
                          threads=cfg.threads, engine_cpus=engine_cpus or [], repeats=cfg.serving_repeats,
                          target="bare engine (the limit); the edge tier's gRPC port; the "
                          "router (NATS request to tierline.edge.infer, edge only, no escalation)"),
        "metrics": {**{k: {**row(runs[k]), "seqs_per_step": num(median(occupancy[k]), 2)}
                       for k in ("bare", "edge_node", "platform")},
                    "ratio": {"platform_over_bare": ratio("platform", "bare"),
                              "edge_node_over_bare": ratio("edge_node", "bare")},
                    "bare_batch": batch, "bare_qps_by_batch": tried},
        "article": {"target": "edge node >= 90% and router + NATS + edge >= 85% of the bare engine (issue 23)",
                    "target_ratio": 0.85, "edge_target_ratio": 0.9},
        "notes": [f"The bare engine gets perfectly formed batches in sequence, at its fastest batch size among "
                  f"{', '.join(str(b) for b in BARE_BATCHES if b <= cfg.concurrency)} (those {cfg.concurrency} "
                  f"requests in flight can form; measured on the warm-up prompts, every size tried: {tried} req/s), "
                  "and pays no serialization, queueing or network; on this machine the load generator, router, "
                  "nats-server and the edge's two processes (serving, and its engine core: scheduler and model) share "
                  "its CPUs. " + (f"The edge's engine core runs on CPU {engine_cpus} (tiers.edge.engine_cpus), and "
                                  "LitServe's inference worker and the bare engine likewise; its serving process, "
                                  "LitServe's HTTP server, the router, nats-server and the load generator run on the "
                                  "other CPUs."
                                  if engine_cpus else
                                  "No process is bound to a CPU (one CPU: tiers.edge.engine_cpus not set)."),
                  "Sequences per step: the edge's mean sequences per scheduler step over each run (its "
                  "tierline_batch_size histogram, read before and after), and the bare engine's mean rows per decode "
                  "step (its batches decode until their longest answer ends, rows leaving as they finish: fewer "
                  "rows, but steps with nothing else in them). Between the edge alone and behind the router, "
                  "whose engine cores run the same steps, throughput follows the sequences a step holds, as a "
                  "forward's cost grows far slower than its rows (bare_qps_by_batch): a request's slot stays empty "
                  "from its answer leaving the engine core until its client's next request arrives there, and "
                  "that round trip is longer through the router and NATS than straight to the edge's gRPC port."],
    }
    if not peers:
        missing = not_measured(peer_reason or "not run")
        peer_metrics = {f"litserve_{m}": {k: missing for k in ("qps", "latency_ms_p50", "latency_ms_p95",
                                                                "tokens_per_s")} for m in ("batch", "continuous")}
        best = missing
        peer_metrics |= {"edge_node": row(runs["edge_node"]),
                         "ratio": {"edge_node_over_litserve": missing, "edge_node_over_litserve_batch": missing,
                                   "edge_node_over_litserve_continuous": missing, "litserve_batch_over_bare": missing,
                                   "litserve_continuous_over_bare": missing,
                                   "edge_node_over_bare": ratio("edge_node", "bare")}}
    else:
        best = max(peers, key=lambda m: median([x.qps for x in runs[f"litserve_{m}"]]))
        peer_metrics = {f"litserve_{m}": row(runs[f"litserve_{m}"]) for m in peers}
        peer_metrics |= {"edge_node": row(runs["edge_node"]),
                         "ratio": {"edge_node_over_litserve": ratio("edge_node", f"litserve_{best}"),
                                   **{f"edge_node_over_litserve_{m}": ratio("edge_node", f"litserve_{m}")
                                      for m in peers},
                                   **{f"litserve_{m}_over_bare": ratio(f"litserve_{m}", "bare") for m in peers},
                                   "edge_node_over_bare": ratio("edge_node", "bare")}}
    peer = {
        "title": "A peer: the same int8 ONNX model served by LitServe, in both its modes",
        "method": _method(cfg, "closed loop (bench/load.py); LitServe: N client threads, one keep-alive HTTP "
                          "connection each, JSON POST /predict; edge node: gRPC", cfg.concurrency, len(prompts),
                          max_tokens=cfg.max_tokens, threads=cfg.threads,
                          target=f"LitServe 1 worker on the same OnnxEngine (bench/litserve_api.py): its batching "
                                 f"loop (max_batch_size {BatchConfig().max_num_seqs}, batch_timeout 5 ms) and its "
                                 "continuous-batching loop (ContinuousBatchingLoop stepping the same ModelRunner, "
                                 f"{BatchConfig().max_num_seqs} sequences) vs the edge tier's gRPC port"),
        "metrics": peer_metrics,
        "litserve_best_mode": best,  # the mode the edge node is compared with
        "article": {},
        "notes": ["All serve the same engine and decoding loop, so the difference is the serving layer: LitServe's "
                  "HTTP front end and worker loop vs Tierline's gRPC servicer and scheduler. The edge node is "
                  "compared with LitServe's faster mode in this run (litserve_best_mode).",
                  "Each LitServe process group is frozen (SIGSTOP) while the other targets are measured: idle, "
                  "its loops still poll."],
    }
    return overhead, peer


# -- 7. router decision time and one NATS hop ------------------------------------------------------------------------
def router_and_nats(stack: Stack, cfg: BenchConfig, prompts: list[str]) -> dict:
    from tierline_router.policy import Policy
    from tierline_router.scorer import load_scorer

    manifest = load_manifest(stack.manifest, check_artifacts=False)
    rc = manifest.router
    scorer = load_scorer(manifest)
    policy = Policy.from_config(rc, scorer)
    tiers = tuple(manifest.tiers)
    for p in prompts[:50]:
        policy.decide(p, tiers)
    decide_us = []
    for p in prompts:
        t0 = time.perf_counter_ns()
        policy.decide(p, tiers)
        decide_us.append((time.perf_counter_ns() - t0) / 1000)
    from tierline_api.v1 import inference_pb2 as pb

    request = pb.InferRequest(prompt=prompts[0], parameters=pb.Parameters(max_tokens=cfg.max_tokens))
    payload = request.SerializeToString()
    hops = asyncio.run(_nats_round_trips(stack, payload, cfg.nats_hops))
    security = nats_security_cost(payload, cfg.nats_hops, cfg.repeats)
    return {
        "title": "Router decision time and one NATS hop",
        "method": {"load_generator": "sequential calls in the harness process", "concurrency": 1,
                   "requests": len(prompts), "warmup": 50, "repeats": 1, "nats_round_trips": len(hops),
                   "scorer": "learned (router.scorer)" if scorer is not None else "step-counting heuristic",
                   "target": "Policy.decide as the router calls it; NATS: request/reply through the stack's "
                             "nats-server (auth on) to an echo responder on its own connection"},
        "metrics": {"decision_us": {"p50": num(percentile(decide_us, 50)), "p99": num(percentile(decide_us, 99))},
                    "nats_round_trip_ms": {"p50": num(percentile(hops, 50), 3), "p99": num(percentile(hops, 99), 3)},
                    "nats_security": security},
        "article": {},
        "notes": ["A NATS round trip is two messages through nats-server (request and reply) with an InferRequest "
                  f"payload of {len(payload)} bytes; the router pays one per tier it asks.",
                  "nats_security: the same round trip through two fresh nats-servers, interleaved: one with a "
                  "shared user and password and no TLS (before issue 24), one with TLS and per-role identities "
                  "and permissions (the router asking `tierline.edge.infer`, an echo in the edge's queue group, "
                  "as their own identities): what security costs per hop."],
    }


async def _nats_round_trips(stack: Stack, payload: bytes, n: int) -> list[float]:
    from tierline_shared.transport.messaging import subject

    opts = stack.nats_options()
    return await _echo_round_trips(opts, opts, payload, n, subject("bench", "echo"))


def nats_security_cost(payload: bytes, n: int, rounds: int) -> dict:
    """One NATS round trip without and with TLS + identities + permissions, on two fresh servers, interleaved."""
    import tempfile

    from nats.micro.service import DEFAULT_QUEUE_GROUP

    from tierline_infra.supervisor import NatsServer
    from tierline_shared.security.credentials import init_credentials
    from tierline_shared.security.identities import ROUTER, IdentityStore, inbox_prefix, read_seed, tier_identity
    from tierline_shared.transport.messaging import NatsOptions, subject

    with tempfile.TemporaryDirectory(prefix="tierline-natsbench-") as tmp:
        plain_dir, secure_dir = Path(tmp) / "plain", Path(tmp) / "secure"
        plain_dir.mkdir()
        secure_dir.mkdir()
        creds = init_credentials(secure_dir / "creds", tiers=("edge",))
        plain = NatsServer(plain_dir).start()
        secure = NatsServer(secure_dir, credentials=secure_dir / "creds").start()
        try:
            store = IdentityStore(creds["directory"])

            def as_identity(identity: str) -> NatsOptions:
                return NatsOptions(secure.url, seed=read_seed(store.seed_path(identity)), identity=identity,
                                   inbox_prefix=inbox_prefix(identity), tls_ca=creds["tls_ca"])

            pairs = {"plain": (NatsOptions(plain.url, plain.user, plain.password),) * 2,
                     "secure": (as_identity(tier_identity("edge")), as_identity(ROUTER))}
            trips: dict[str, list[float]] = {k: [] for k in pairs}
            per_round = max(1, n // rounds)
            for r in range(rounds):
                for name in (("plain", "secure") if r % 2 == 0 else ("secure", "plain")):
                    trips[name] += asyncio.run(_echo_round_trips(*pairs[name], payload, per_round, subject("edge"),
                                                                 DEFAULT_QUEUE_GROUP))
        finally:
            plain.stop()
            secure.stop()
    p50 = {k: percentile(v, 50) for k, v in trips.items()}
    return {"plain_ms_p50": num(p50["plain"], 3), "secure_ms_p50": num(p50["secure"], 3),
            "plain_ms_p99": num(percentile(trips["plain"], 99), 3),
            "secure_ms_p99": num(percentile(trips["secure"], 99), 3),
            "secure_over_plain": num(p50["secure"] / p50["plain"], 3), "round_trips_each": len(trips["plain"])}


async def _echo_round_trips(echo_opts, client_opts, payload: bytes, n: int, subj: str, queue: str = "") -> list[float]:
    """Round trips (ms) from `client_opts`'s connection to an echo on `subj` (in `queue`, as a tier serves)."""
    from tierline_shared.transport.messaging import connect

    echo, client = await connect(echo_opts, "bench-echo"), await connect(client_opts, "bench-client")
    try:
        async def reply(msg):
            await msg.respond(msg.data)

        await echo.subscribe(subj, queue=queue, cb=reply)
        await echo.flush(timeout=NATS_TIMEOUT_S)
        await _until_answered(client, subj, payload)
        for _ in range(min(50, n)):
            await client.request(subj, payload, timeout=NATS_TIMEOUT_S)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.request(subj, payload, timeout=NATS_TIMEOUT_S)
            out.append((time.perf_counter() - t0) * 1000)
        return out
    finally:
        await client.drain()
        await echo.drain()


async def _until_answered(client, subj: str, payload: bytes, attempts: int = 50) -> None:
    """Wait until the echo's subscription is visible to the requester (seen to lag once on a loaded machine)."""
    from nats.errors import NoRespondersError

    for _ in range(attempts - 1):
        try:
            await client.request(subj, payload, timeout=NATS_TIMEOUT_S)
            return
        except NoRespondersError:
            await asyncio.sleep(0.1)
    await client.request(subj, payload, timeout=NATS_TIMEOUT_S)


# -- 9. the cloud tier vs transformers serve ------------------------------------------------------------------------
PEERS = ("transformers_serve", "transformers_serve_cb")


def cloud_peer(stack: Stack, peers: dict, reason: str | None, cfg: BenchConfig, prompts: list[str],
               warm: list[str]) -> dict:
    """The cloud tier (gRPC) and `transformers serve` on the same checkpoint (OpenAI HTTP), without and with its
    continuous batching: throughput at the bench's concurrency, first token at concurrency 1, interleaved; then
    whether their greedy answers equal the cloud tier's on the same prompts."""
    clients: dict = {"cloud": _grpc(stack, "cloud-0", cfg), **peers}
    probes = prompts[:cfg.ttft_requests]
    loads: dict[str, list[LoadRun]] = {k: [] for k in clients}
    ttft: dict[str, list[float]] = {k: [] for k in clients}
    for r in range(cfg.repeats):
        for k, c in _interleaved(clients, r):
            first = run_load(c.first_token, probes, 1, warm[:cfg.ttft_requests] if r == 0 else ())
            ttft[k].append(first.latency_ms(50))
            loads[k].append(run_load(c.infer, prompts, cfg.concurrency, warm if r == 0 else ()))
    clients["cloud"].close()

    def row(k: str) -> dict:
        v = loads[k]
        return {"qps": num(median([x.qps for x in v])), "first_token_ms_p50": num(median(ttft[k])),
                "latency_ms_p50": num(median([x.latency_ms(50) for x in v])),
                "tokens_per_s": num(median([sum(o.completion_tokens for o in x.ok) / x.wall_s for x in v]), 1),
                "errors": _errors(v), "qps_runs": [round(x.qps, 2) for x in v]}

    cloud_text = {p: o.text for p, o in zip(prompts, loads["cloud"][0].outcomes) if o.ok}
    metrics: dict = {"cloud": row("cloud")}
    ratio: dict = {}
    for k in PEERS:
        if k not in peers:
            metrics[k] = {m: not_measured(reason or "not run") for m in ("qps", "first_token_ms_p50", "latency_ms_p50",
                                                                         "tokens_per_s", "same_greedy_text")}
            ratio[f"cloud_over_{k}"] = not_measured(reason or "not run")
            continue
        metrics[k] = row(k)
        theirs = [(cloud_text[p], o.text) for p, o in zip(prompts, loads[k][0].outcomes) if o.ok and p in cloud_text]
        metrics[k]["same_greedy_text"] = num(sum(a == b for a, b in theirs) / len(theirs), 4) if theirs else \
            not_measured("no answers to compare")
        metrics[k]["compared"] = len(theirs)
        ratio[f"cloud_over_{k}"] = num(median([a.qps / b.qps for a, b in zip(loads["cloud"], loads[k]) if b.qps > 0]),
                                       3)
    metrics["ratio"] = ratio
    return {
        "title": "A peer for the cloud tier: transformers serve on the same checkpoint",
        "method": _method(cfg, "closed loop (bench/load.py); cloud tier: gRPC; transformers serve: N client threads, "
                          "one keep-alive HTTP connection each, POST /v1/completions, temperature 0",
                          cfg.concurrency, len(prompts), max_tokens=cfg.max_tokens, threads=cfg.threads,
                          target="the cloud tier's gRPC port (torch fp32, its batcher) vs `transformers serve "
                                 "models/cloud --device cpu --dtype float32`, without and with "
                                 "--continuous-batching --cb-num-blocks 128 (bench/transformers_peer.py)"),
        "metrics": metrics,
        "article": {},
        "notes": ["Both run the same fp32 checkpoint with PyTorch on the same cores; the greedy answers are compared "
                  "prompt by prompt from the first repeat (same_greedy_text: the share identical)."],
    }
