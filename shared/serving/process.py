"""`python -m cloud_node|edge_node|device_agent --manifest FILE`: one tier as a process.

Loads the manifest and the tier's engine (sha256-checked), serves gRPC, /metrics
and the NATS micro service, prints one JSON line `{"event": "ready", ...}` with the
bound ports on stdout, and runs until SIGINT/SIGTERM. A bad manifest, artifact or
NATS login prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import asdict

from tierline.v1 import inference_pb2 as pb
from tierline_shared.config.manifest import EXIT_BAD_MANIFEST, ManifestError, load_manifest
from tierline_shared.models.artifacts import ArtifactError, load_engine
from tierline_shared.serving.metrics import Metrics
from tierline_shared.serving.servicer import Limits, TierServicer, create_server
from tierline_shared.transport.messaging import NatsAuthError, NatsOptions, TierService, subject


def main(tier: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {tier}", description=f"Tierline {tier} tier")
    parser.add_argument("--manifest", required=True, help="YAML tier manifest")
    parser.add_argument("--no-nats", action="store_true", help="serve gRPC only (no NATS registration)")
    args = parser.parse_args(argv)
    tier_name = {"tierline_cloud_node": "cloud", "tierline_edge_node": "edge",
                 "tierline_device_agent": "device"}.get(tier, tier)
    try:
        manifest = load_manifest(args.manifest)
        tc = manifest.tier(tier_name)
        models_dir = manifest.models_path
        if tier_name == "device":  # the memory cap; the model an OTA update installed last, if any
            from tierline_device_agent.fleet import prepare_device

            models_dir = prepare_device(manifest)
        engine = load_engine(models_dir, tier_name, threads=tc.threads)
    except (ManifestError, ArtifactError) as exc:
        print(f"{tier}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_MANIFEST
    metrics = Metrics(tier_name)
    engine.enable_prefix_cache(tc.prefix_cache_tokens, tc.prefix_cache_min_match, metrics.prefix_cache_lookup)
    servicer_args = (engine, tc.batching, Limits(**asdict(manifest.limits)), tc.cache_size, tc.timeout_ms / 1000,
                     metrics)
    if tier_name == "device":  # the board's front door: local first, the edge over NATS when needed
        from tierline_device_agent.agent import DeviceAgentServicer
        from tierline_router.policy import Policy

        rc = manifest.router
        servicer = DeviceAgentServicer(*servicer_args, policy=Policy(rc.device_complexity, rc.cloud_complexity,
                                                                     dict(rc.confidence_threshold)),
                                       upstream_timeout_s=manifest.nats.request_timeout_ms / 1000)
    else:
        servicer = TierServicer(*servicer_args)
    server, port = create_server(servicer, tc.grpc_host, tc.grpc_port)
    server.start()
    metrics_port = metrics.serve(tc.grpc_host, tc.metrics_port) if tc.metrics_port >= 0 else None
    nats_service = None
    if not args.no_nats:
        def handle(data: bytes, timeout_s: float | None) -> bytes:
            resp = servicer.handle(pb.InferRequest.FromString(data), timeout_s)
            on_answer = getattr(servicer, "on_answer", None)  # a device agent's telemetry, if it has a fleet
            if on_answer is not None:
                on_answer(resp, via="nats")
            return resp.SerializeToString()

        def stream(data: bytes, is_active):
            for chunk in servicer.stream(pb.InferRequest.FromString(data), is_active):
                yield chunk.SerializeToString()

        nats_service = TierService(tier_name, NatsOptions.from_manifest(manifest), handle, servicer._status_of,
                                   stream=stream, stats=lambda: {"queue_depth": servicer.batcher.depth})
        fleet_member = tier_name == "device" and bool(manifest.device_agent.device_id)
        try:
            nats_service.start(retry_forever=fleet_member)  # a board that boots offline still serves
        except (NatsAuthError, ConnectionError, TimeoutError) as exc:
            print(f"{tier}: error: {exc}", file=sys.stderr)
            server.stop(0)
            return EXIT_BAD_MANIFEST
        if hasattr(servicer, "link"):
            servicer.link = nats_service
    fleet = None
    if tier_name == "device" and manifest.device_agent.device_id and not args.no_nats:
        from tierline_device_agent.fleet import FleetAgent

        fleet = FleetAgent(manifest, servicer, threads=tc.threads).start()
    print(json.dumps({"event": "ready", "tier": tier_name, "grpc_port": port, "metrics_port": metrics_port,
                      "nats_subject": None if args.no_nats else subject(tier_name),
                      "device_id": fleet.device_id if fleet else None}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if fleet:
        fleet.stop()
    if nats_service:
        nats_service.stop()
    server.stop(grace=2).wait()
    servicer.batcher.close()
    metrics.stop()
    return 0
