"""`tierline bench [--quick]`: start what each scenario needs, measure, write the report.

Five phases, one after the other so that only the processes being measured are
up: (A) the whole platform (device, edge, cloud, router, NATS with JetStream) for edge vs
cloud, tiered vs cloud only, the router/NATS timings and the Batch API; (B) the edge behind a router, an edge
with batching off, the bare engine and the LitServe peer; (C) an edge with its
result cache on, and two edges with prefix KV reuse on and off; (D) the device
model alone in a process pinned to one core (the Pi-class profile); (E) the cloud tier
alone against `transformers serve` on its checkpoint, without and with continuous batching. The
throughput stacks run with the result cache off, so the same workload can be
replayed to every target. `--quick` (tiny models, a handful of
requests, one repeat) only proves that every section is produced.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tierline_bench import scenarios
from tierline_bench.batch_jobs import batch_api
from tierline_bench.device_profile import pi_profile
from tierline_bench.load import HttpClient
from tierline_bench.peer import MODES, PeerServer, available
from tierline_bench.report import write_report
from tierline_bench.transformers_peer import OpenAIClient, TransformersServe
from tierline_bench.transformers_peer import available as transformers_available
from tierline_edge_node.engine import load_engine
from tierline_infra.supervisor import Stack, demo_overrides
from tierline_shared.config.manifest import BatchConfig, load_manifest
from tierline_shared.models.artifacts import load_index
from tierline_shared.runtime.affinity import allowed, leave, pin, supported
from tierline_shared.tasks.problems import Problem, generate
from tierline_shared.wire import TIERS

PEER_BATCH_TIMEOUT_S = 0.005  # LitServe's batch_timeout: how long its first request waits for company
BATCHING = BatchConfig()  # the tiers' default scheduler limits; the peer batches as many requests
SECTION_ORDER = ("edge_vs_cloud", "tiered_vs_cloud", "batching", "cache", "platform_overhead", "peer_litserve",
                 "router_and_nats", "device_profile", "peer_transformers", "batch_api")


def _tiers(tiers, threads: int, cache: bool = False) -> dict:
    """Manifest overrides: every tier with the bench's thread count, its result cache off unless asked."""
    out = {f"tiers.{t}.threads": threads for t in tiers}
    if not cache:
        out.update({f"tiers.{t}.cache_size": 0 for t in tiers})
    return out


def engine_cpus() -> list[int]:
    """Phase B's CPU for the engines (the edge's engine core, LitServe's inference worker, the bare engine): the
    last this process may use; everything else (serving processes, router, nats-server, the load generator)
    runs on the others. None on a one-CPU machine."""
    have = sorted(allowed())
    return have[-1:] if len(have) > 1 and supported() else []


def _questions(n: int, seed: int, asked: list[Problem] = ()) -> list[Problem]:
    """n dialogue questions (levels 1 and 2), none twice and none of `asked`: a turn that repeated an earlier
    question would find its KV cached and make prefix reuse look better than it is."""
    seen, out = {p.prompt for p in asked}, []
    for p in generate("test", 20 * n, seed=seed, levels=(1, 2)):
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct dialogue questions of {n}")
    return out[:n]


@contextlib.contextmanager
def _off(cpus: list[int], *stacks: Stack):
    """This process (the load generator; the bare engine moves to `cpus` while it is measured) and the stacks'
    router and nats-server run off `cpus` within the block (their tiers' serving processes are there already:
    tiers.<tier>.engine_cpus)."""
    if not cpus:
        yield
        return
    everywhere = allowed()
    try:
        for stack in stacks:
            for pid in [stack.nats.proc.pid] + [p.popen.pid for p in stack.procs if p.name == "router"]:
                leave(cpus, pid)
        leave(cpus)
        yield
    finally:
        pin(everywhere)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(models_dir: Path, out_dir: Path, quick: bool = False, log=print) -> dict:
    """Measure every scenario and write BENCHMARKS.md, bench/results.json and bench/plots/ under out_dir."""
    cfg = scenarios.QUICK if quick else scenarios.FULL
    models_dir = Path(models_dir)
    t_start = time.perf_counter()
    problems = generate("test", cfg.requests, seed=cfg.seed)
    prompts = [p.prompt for p in problems]
    warm = [p.prompt for p in generate("test", cfg.warmup, seed=cfg.seed + 1000)]
    sections: dict[str, dict] = {}
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    log("phase A: nats-server, device, edge, cloud, router (result caches off)")
    # the demo's costs and router policy (the calibrated one when infra/manifests/local.yaml serves these models)
    # JetStream on for the Batch API (section 10), whose workers keep as many lines in flight as batching's clients
    batch_workers = cfg.batching_concurrency
    with Stack(models_dir, jetstream=True, overrides={**demo_overrides(models_dir), **_tiers(TIERS, cfg.threads),
                                                      "router.batch.workers": batch_workers}) as full:
        costs = load_manifest(full.manifest, check_artifacts=False).costs()
        log("  1. edge vs cloud")
        sections["edge_vs_cloud"] = scenarios.edge_vs_cloud(full, cfg, prompts, warm)
        log("  2. tiered vs cloud only")
        sections["tiered_vs_cloud"] = scenarios.tiered_vs_cloud(full, cfg, problems, warm, costs)
        scenarios.tiered_in_context(sections["tiered_vs_cloud"], sections["edge_vs_cloud"])
        log("  7. router decision time, NATS hop")
        decisions = [p.prompt for p in generate("test", cfg.decisions, seed=cfg.seed + 3000)]
        sections["router_and_nats"] = scenarios.router_and_nats(full, cfg, decisions)
        log(f"  10. Batch API: {cfg.batch_lines} lines")
        checks = generate("test", cfg.batch_lines, seed=cfg.seed + 5000)
        interactive = [p.prompt for p in generate("test", 2 * cfg.ttft_requests, seed=cfg.seed + 6000)]
        cloud_cost = sections["tiered_vs_cloud"]["metrics"]["cloud_only"]["cost_per_request"]
        sections["batch_api"] = batch_api(full, cfg, checks, interactive, costs, cloud_cost, batch_workers)
    phases["A"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cpus = engine_cpus()
    log(f"phase B: edge + router, edge with batching off, bare engine, LitServe (engines on CPU {cpus or 'any'})")
    pinned = {"tiers.edge.engine_cpus": cpus}
    edge_only = {**_tiers(["edge"], cfg.threads), **pinned, "router.confidence_threshold": {"edge": 0.0}}
    batching_off = {**_tiers(["edge"], cfg.threads), **pinned,
                    "tiers.edge.batching": {"max_num_seqs": 1}}
    with Stack(models_dir, tiers=("edge",), overrides=edge_only) as on, \
            Stack(models_dir, tiers=("edge",), router=False, overrides=batching_off) as off, _off(cpus, on, off):
        log("  3. batching on vs off")
        sections["batching"] = scenarios.batching(on, off, cfg, prompts, warm, cpus)
        engine = load_engine(models_dir, threads=cfg.threads)
        reason = available()
        peers: dict[str, PeerServer] = {}
        if reason is None:
            try:  # LitServe in both its modes: its batching loop and its continuous-batching loop
                for mode in MODES:
                    peers[mode] = PeerServer(models_dir, on.workdir, cfg.threads, BATCHING.max_num_seqs,
                                             PEER_BATCH_TIMEOUT_S, mode=mode, engine_cpus=cpus).start()
            except (RuntimeError, TimeoutError) as exc:
                reason = f"LitServe did not start: {exc}"
        try:
            log("  5. platform overhead, 6. LitServe peer")
            clients = {m: HttpClient("127.0.0.1", p.port, cfg.max_tokens) for m, p in peers.items()} \
                if reason is None else {}
            sections["platform_overhead"], sections["peer_litserve"] = scenarios.overhead_and_peer(
                on, engine, clients, reason, cfg, prompts, warm, servers=peers, engine_cpus=cpus)
        finally:
            for p in peers.values():
                p.stop()
        del engine
    phases["B"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("phase C: edge with its result cache on; edges with prefix KV reuse on and off (engines as in phase B)")
    reuse_on = {**_tiers(["edge"], cfg.threads), **pinned}
    reuse_off = {**reuse_on, "tiers.edge.prefix_cache_tokens": 0}
    with Stack(models_dir, tiers=("edge",), router=False,
               overrides={**_tiers(["edge"], cfg.threads, cache=True), **pinned}) as cached, \
            Stack(models_dir, tiers=("edge",), router=False, overrides=reuse_on) as reuse, \
            Stack(models_dir, tiers=("edge",), router=False, overrides=reuse_off) as no_reuse, \
            _off(cpus, cached, reuse, no_reuse):
        log("  4. cache")
        pool = generate("test", cfg.cache_prompts * (cfg.repeats + 1), seed=cfg.seed + 2000)
        dialogue = _questions(3 * cfg.dialogues, cfg.seed + 4000)
        together = _questions(3 * cfg.dialogues, cfg.seed + 7000, dialogue)  # other dialogues
        engine = load_engine(models_dir, threads=cfg.threads)  # in-process: what an idle CPU costs a prefill
        sections["cache"] = scenarios.cache(cached, reuse, no_reuse, cfg, pool, dialogue, together, engine, cpus)
        del engine
    phases["C"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("phase D: the device model alone, one pinned process (1 core, 1 thread)")
    log("  8. Pi-class device profile")
    sections["device_profile"] = pi_profile(models_dir, cfg)
    phases["D"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("phase E: the cloud tier alone; transformers serve on its checkpoint, without and with continuous batching")
    log("  9. cloud tier vs transformers serve")
    with Stack(models_dir, tiers=("cloud",), router=False, overrides=_tiers(["cloud"], cfg.threads)) as cloud:
        reason = transformers_available(models_dir)
        peers: dict = {}
        servers: list[TransformersServe] = []
        try:
            if reason is None:  # both start side by side (each loads transformers and the checkpoint)
                servers = [TransformersServe(models_dir, cloud.workdir, cfg.threads, continuous_batching=cb).launch()
                           for cb in (False, True)]
                for server in servers:
                    try:
                        server.wait_ready()
                    except (RuntimeError, TimeoutError) as exc:  # the other is measured; this one says why not
                        reason = f"transformers serve did not start: {exc}"
                        continue
                    peers[server.name] = OpenAIClient(server.port, str(server.checkpoint), cfg.max_tokens, server.name)
            sections["peer_transformers"] = scenarios.cloud_peer(cloud, peers, reason, cfg, prompts, warm)
        finally:
            for server in servers:
                server.stop()
    phases["E"] = time.perf_counter() - t0

    models = load_index(models_dir)
    results = {
        "meta": {
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "tierline bench" + (" --quick" if quick else ""),
            "quick": quick, "models_dir": str(models_dir), "family": models.get("family", "unknown"),
            "model_name": models.get("model_name", "unknown"),
            "machine": {"cpus": os.cpu_count() or 0, "cpu": _cpu_name(), "python": platform.python_version()},
            "config": asdict(cfg),
            "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
            "total_seconds": round(time.perf_counter() - t_start, 1),
        },
        "sections": {k: sections[k] for k in SECTION_ORDER},
    }
    write_report(results, out_dir)
    return results
