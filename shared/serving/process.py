"""One tier as a process: what every tier's `python -m tierline_<tier> --manifest FILE` shares.

A tier package subclasses `TierProcess` (its engine, its servicer, what it runs beside them)
and hands it to `run`, which loads the manifest, loads the engine (sha256-checked), serves
gRPC, /metrics and the tier's NATS service, prints one JSON line `{"event": "ready", ...}`
with the bound ports on stdout, and runs until SIGINT/SIGTERM (or until the supervisor that
started it is gone: shared/serving/supervised.py). A bad manifest, artifact or NATS login
prints one line and exits 2. Nothing here knows which tier it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import threading
from concurrent.futures import Future
from typing import Callable, Iterator

from tierline_api.v1 import inference_pb2 as pb
from tierline_shared.config.manifest import EXIT_BAD_MANIFEST, Manifest, ManifestError, load_manifest
from tierline_shared.models.artifacts import ArtifactError
from tierline_shared.runtime.affinity import allowed, leave, supported
from tierline_shared.runtime.engine import Engine
from tierline_shared.runtime.engine_core import EngineCore
from tierline_shared.security.identities import tier_identity
from tierline_shared.serving.metrics import Metrics
from tierline_shared.serving.servicer import TierServicer, status_of
from tierline_shared.serving.supervised import BACKSTOP_S, exit_with_supervisor
from tierline_shared.transport.grpc_server import create_server
from tierline_shared.transport.messaging import NatsAuthError, NatsOptions, subject
from tierline_shared.transport.tier_service import TierService


class TierProcess:
    """What a tier package says about its process; the defaults fit a tier that only serves its model."""

    tier = ""  # "cloud", "edge" or "device": the manifest's tiers.<tier> section, the NATS subjects
    loader: Callable[..., Engine] | None = None  # the tier's load_engine(models_dir, threads=...)
    accelerators = ("cpu",)  # what tiers.<tier>.accelerator may say for this tier's backend
    engine_process = True  # the engine may run in a core process of its own (tiers.<tier>.engine_process)

    def __init__(self, manifest: Manifest, use_nats: bool):
        self.manifest, self.use_nats = manifest, use_nats
        self.config = manifest.tier(self.tier)

    def load_engine(self) -> Engine:
        """The tier's model; ArtifactError (or ManifestError) when it cannot be served."""
        return self.engine_loader()()

    def engine_loader(self) -> Callable[[], Engine]:
        """A picklable callable that loads the tier's model (here, or in its engine core process)."""
        self.check_accelerator()
        return functools.partial(type(self).loader, self.manifest.models_path, threads=self.config.threads)

    def check_accelerator(self) -> None:
        """tiers.<tier>.accelerator names what this tier's backend runs on (ManifestError otherwise)."""
        if self.config.accelerator not in self.accelerators:
            raise ManifestError(f"{self.manifest.path}: tiers.{self.tier}.accelerator: {self.config.accelerator!r} "
                                f"is not supported by the {self.tier} tier; allowed: {', '.join(self.accelerators)}")

    def engine_core(self) -> EngineCore | None:
        """The scheduler and the model in a process of their own (None: they run in this one); raises what
        loading the model raises."""
        tc = self.config
        cpus = self._engine_cpus()
        if not (self.engine_process and tc.engine_process):
            return None
        core = EngineCore(self.engine_loader(), tc.batching, (tc.prefix_cache_tokens, tc.prefix_cache_min_match),
                          name=f"{self.tier}-engine", cpus=cpus)
        leave(cpus)  # this process serves on the CPUs the core leaves (none left: it shares the core's)
        return core

    def _engine_cpus(self) -> list[int]:
        """tiers.<tier>.engine_cpus, checked against what this tier and this machine can do."""
        tc, where = self.config, f"{self.manifest.path}: tiers.{self.tier}.engine_cpus"
        if not tc.engine_cpus:
            return []
        if not self.engine_process:
            raise ManifestError(f"{where}: the {self.tier} tier runs its model in its own process (it has no "
                                "engine core to bind)")
        if not supported():
            raise ManifestError(f"{where}: binding to CPUs needs Linux (sched_setaffinity)")
        have = allowed()
        missing = sorted(set(tc.engine_cpus) - have)
        if missing:
            raise ManifestError(f"{where}: CPU {', '.join(map(str, missing))} is not available to this process "
                                f"(it may use {', '.join(map(str, sorted(have)))})")
        return tc.engine_cpus

    def make_servicer(self, engine: Engine, metrics: Metrics, scheduler=None) -> TierServicer:
        return TierServicer(*self.servicer_args(engine, metrics), scheduler=scheduler)

    def servicer_args(self, engine: Engine, metrics: Metrics) -> tuple:
        tc = self.config
        return engine, tc.batching, self.manifest.limits, tc.cache_size, tc.timeout_ms / 1000, metrics

    def nats_identity(self) -> str:
        """Who this process is on NATS (shared/security/identities.py): its permissions follow."""
        return tier_identity(self.tier)

    def nats_retry_forever(self) -> bool:
        """Keep connecting in the background when NATS is unreachable at start (else: exit 2)."""
        return False

    def started(self, servicer: TierServicer, nats_service: TierService | None) -> dict:
        """Everything is serving: start what runs beside it; returns extra fields for the ready line."""
        return {}

    def stopping(self) -> None:
        """Stop what `started` started (once the servers have stopped, their requests in flight answered)."""


def run(process_cls: type[TierProcess], argv: list[str] | None = None) -> int:
    tier = process_cls.tier
    prog = f"python -m {process_cls.__module__.rsplit('.', 1)[0]}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Tierline {tier} tier")
    parser.add_argument("--manifest", required=True, help="YAML tier manifest")
    parser.add_argument("--no-nats", action="store_true", help="serve gRPC only (no NATS registration)")
    args = parser.parse_args(argv)
    try:
        process = process_cls(load_manifest(args.manifest), use_nats=not args.no_nats)
        # started by the supervisor: stops (SIGTERM, as below) if it is killed, rather than run on as an orphan
        exit_with_supervisor(tier, process.config.stop_grace_s + BACKSTOP_S)
        core = process.engine_core()
        # handed over in a list `_serve` empties: no frame here holds the model while the process serves (a
        # board's update replaces it, and the old one must be freed then, not when the process ends)
        handed = [core.engine if core is not None else process.load_engine()]
    except (ManifestError, ArtifactError) as exc:
        print(f"{tier}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_MANIFEST
    try:
        return _serve(process, handed, core)
    finally:
        if core is not None:  # every way out, an early one too, stops the engine core
            core.close()


def _serve(process: TierProcess, handed: list[Engine], core: EngineCore | None) -> int:
    """Serve until SIGINT/SIGTERM (0), or EXIT_BAD_MANIFEST when a port or NATS cannot be had. `handed`: the
    engine, taken out of the list; from the servicer on, only the servicer holds it."""
    tier, tc, manifest = process.tier, process.config, process.manifest
    engine = handed.pop()
    metrics = Metrics(tier, engine.info.model, queue_limit=tc.batching.max_queue)
    if core is not None:
        core.on_step, core.on_prefix_lookup = metrics.observe_step, metrics.prefix_cache_lookup
        metrics.watch_child("engine_core", lambda: core.pid)  # engine_core_process_*: where the model runs
    else:
        engine.enable_prefix_cache(tc.prefix_cache_tokens, tc.prefix_cache_min_match, metrics.prefix_cache_lookup)
    servicer = process.make_servicer(engine, metrics, scheduler=core)
    del engine  # the servicer's now: an update that replaces it (agent.py: swap_engine) leaves nothing holding it
    try:
        token = manifest.resolve(tc.grpc_token_file).read_text().strip() if tc.grpc_token_file else ""
        server, port = create_server(servicer, tc.grpc_host, tc.grpc_port, token=token)
    except (OSError, ValueError, RuntimeError) as exc:  # gRPC: RuntimeError when the port is taken
        print(f"{tier}: error: tiers.{tier}.grpc_host / grpc_port / grpc_token_file: {exc}", file=sys.stderr)
        return EXIT_BAD_MANIFEST
    server.start()
    try:
        metrics_port = metrics.serve(tc.grpc_host, tc.metrics_port) if tc.metrics_port >= 0 else None
    except OSError as exc:  # a port another process holds: named, exit 2 (as a taken gRPC port), not a traceback
        print(f"{tier}: error: tiers.{tier}.grpc_host / metrics_port: {exc.strerror or exc}", file=sys.stderr)
        server.stop(0)
        return EXIT_BAD_MANIFEST
    nats_service = None
    if process.use_nats:
        try:
            nats_service = nats_service_for(tier, NatsOptions.from_manifest(manifest, process.nats_identity()),
                                            servicer)
            nats_service.start(retry_forever=process.nats_retry_forever())
        except (NatsAuthError, ConnectionError, TimeoutError, ValueError) as exc:
            print(f"{tier}: error: {exc}", file=sys.stderr)
            server.stop(0)
            return EXIT_BAD_MANIFEST
    extra = process.started(servicer, nats_service)
    print(json.dumps({"event": "ready", "tier": tier, "grpc_port": port, "metrics_port": metrics_port,
                      "nats_subject": subject(tier) if nats_service else None, "stop_grace_s": tc.stop_grace_s,
                      **extra}), flush=True)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_) -> None:  # the first one stops the process; another one ends its grace at once
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    stop.wait()
    # no new request from now on, through either door; those in flight finish within the one grace
    grpc_stopped = server.stop(grace=tc.stop_grace_s)
    threading.Thread(target=_cut_grace_on, args=(hurry, server, nats_service, tier), name="cut-grace",
                     daemon=True).start()
    if nats_service:  # its link stays up while gRPC's requests finish: a board's escalate over it
        nats_service.stop(tc.stop_grace_s, serving=grpc_stopped)
    grpc_stopped.wait()
    process.stopping()  # after the grace: what was answered in it still uses it (a board's telemetry outbox)
    servicer.scheduler.close()
    metrics.stop()
    return 0


def _cut_grace_on(hurry: threading.Event, server, nats_service: TierService | None, tier: str) -> None:
    """A second SIGTERM or Ctrl-C while the process stops ends its grace now (an operator who will not wait, as
    uvicorn's): what is still in flight is answered UNAVAILABLE, through both doors, as at the grace's end. A
    thread (a daemon: a process that stopped in its grace leaves it waiting), not the signal handler, which may
    have interrupted the main thread inside the server's own stop."""
    hurry.wait()
    print(f"{tier}: stopping now: the requests still in flight are answered UNAVAILABLE", file=sys.stderr, flush=True)
    server.stop(0)  # grpc: a shorter grace than the one running ends it
    if nats_service is not None:
        nats_service.hurry()


def nats_service_for(tier: str, opts: NatsOptions, servicer: TierServicer) -> TierService:
    """The servicer on `tierline.<tier>.infer` and `.stream`, protobuf bytes in and out (not started)."""
    def handle(data: bytes, timeout_s: float | None) -> Future:
        return servicer.serve_nats(pb.InferRequest.FromString(data), timeout_s)

    def stream(data: bytes, is_active) -> Iterator[bytes]:
        for chunk in servicer.serve_nats_stream(pb.InferRequest.FromString(data), is_active):
            yield chunk.SerializeToString()

    # the live queue depth: read through the servicer, whose scheduler a device's model update replaces
    return TierService(tier, opts, handle, status_of, stream=stream,
                       stats=lambda: {"queue_depth": servicer.scheduler.depth})
