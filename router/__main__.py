"""`python -m tierline_router --manifest FILE`: the front door, on gRPC, routing over NATS."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import sys

import grpc

from tierline_router.auth import Gate, open_key_store
from tierline_router.batch_http import BatchApi
from tierline_router.chat import ChatTemplate
from tierline_router.metrics import RouterMetrics
from tierline_router.openai_http import OpenAIServer
from tierline_router.policy import Policy
from tierline_router.service import RouterServicer
from tierline_shared.config.manifest import EXIT_BAD_MANIFEST, ManifestError, load_manifest
from tierline_shared.models.artifacts import served_context
from tierline_shared.security.identities import ROUTER
from tierline_shared.serving.supervised import BACKSTOP_S, exit_with_supervisor
from tierline_shared.transport.grpc_server import (
    SERVER_OPTIONS,
    add_health_and_reflection,
    add_inference_service,
    set_serving_async,
)
from tierline_shared.transport.messaging import NatsAuthError, NatsOptions, connect

GRPC_GRACE_S = 2.0  # a stopping router's gRPC calls in flight get this long


async def serve(manifest_path: str) -> int:
    try:
        manifest = load_manifest(manifest_path, check_artifacts=False)
    except ManifestError as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        return EXIT_BAD_MANIFEST
    rc = manifest.router
    try:
        nc = await connect(NatsOptions.from_manifest(manifest, ROUTER), name="tierline-router")
    except (NatsAuthError, ConnectionError, ValueError) as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        return EXIT_BAD_MANIFEST
    metrics = RouterMetrics(manifest.model_name, tuple(manifest.tiers))
    try:
        policy = Policy.of_manifest(manifest)
    except ValueError as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        await nc.close()
        return EXIT_BAD_MANIFEST
    try:  # API keys: the store the manifest names (SQLite, created on first use; or JetStream KV)
        gate = Gate(open_key_store(manifest, ROUTER) if manifest.auth.enabled else None, manifest.auth.plans)
    except (OSError, sqlite3.Error, ConnectionError, TimeoutError, ValueError) as exc:
        where = manifest.key_store_path if manifest.auth.store == "sqlite" else manifest.nats.url
        print(f"router: error: {manifest.path}: auth.store {manifest.auth.store}: {where}: {exc}", file=sys.stderr)
        await nc.close()
        return EXIT_BAD_MANIFEST
    servicer = RouterServicer(nc, policy, manifest.model_name, tuple(manifest.tiers),
                              manifest.nats.request_timeout_ms / 1000, rc.retries_per_tier, metrics,
                              manifest.limits, gate, served_context(manifest.models_path, tuple(manifest.tiers)),
                              rc.no_replica_wait_ms / 1000)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_inference_service(servicer, server, aio=True)
    health_servicer = add_health_and_reflection(server, aio=True)
    try:
        port = server.add_insecure_port(f"{rc.grpc_host}:{rc.grpc_port}")
    except RuntimeError as exc:  # the port is taken (by another router, say)
        print(f"router: error: router.grpc_host / grpc_port: {exc}", file=sys.stderr)
        await nc.close()
        await gate.close()
        return EXIT_BAD_MANIFEST
    await server.start()
    # a cloud that forwards to an upstream engine tokenizes there: chat prompts stay plain text for it
    forwards = any(t.upstream.url for t in manifest.tiers.values())
    chat = ChatTemplate.of_models(manifest.models_path, tiers_tokenize=not forwards)
    http = OpenAIServer(servicer, chat, rc.http_read_timeout_ms / 1000,
                        rc.http_max_connections) if rc.http_port >= 0 else None
    batch = BatchApi(http, rc.batch, manifest.costs()) if http and rc.batch.enabled else None  # /v1/files, /v1/batches
    field = "router.metrics_port"
    try:  # a port another process holds: one line naming it, exit 2 (as a taken gRPC port), not a traceback
        metrics_port = metrics.serve(rc.grpc_host, rc.metrics_port) if rc.metrics_port >= 0 else None
        if batch:
            await batch.start(nc)
        field = "router.http_port"
        http_port = await http.start(rc.grpc_host, rc.http_port) if http else None
    except OSError as exc:
        print(f"router: error: router.grpc_host / {field}: {exc.strerror or exc}", file=sys.stderr)
        if batch:
            await batch.stop()
        await asyncio.gather(*([http.stop()] if http else []), server.stop(0))
        await nc.close()
        await gate.close()
        metrics.stop()
        return EXIT_BAD_MANIFEST
    await set_serving_async(health_servicer)  # ready: every door is open
    print(json.dumps({"event": "ready", "tier": "router", "grpc_port": port, "metrics_port": metrics_port,
                      "http_port": http_port, "auth": gate.enabled,
                      "batch": bool(batch and batch.runner)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    servicer.stopping = True  # what its doors cut short from here costs its keys nothing
    if batch:
        await batch.stop()
    # both doors close together (aiohttp: up to 2 x SHUTDOWN_TIMEOUT_S; gRPC: its grace), then the NATS drain
    # (DRAIN_TIMEOUT_S) and, beside it, the key store's wait for the usage of the requests just ended
    # (SETTLE_TIMEOUT_S: it needs no NATS of the router's): within the supervisor's STOP_TIMEOUT_S
    await asyncio.gather(*([http.stop()] if http else []), server.stop(grace=GRPC_GRACE_S))
    for what, failed in zip(("NATS drain", "key store close"),
                            await asyncio.gather(nc.drain(), gate.close(), return_exceptions=True)):
        if isinstance(failed, Exception):  # nats-server gone first (stopped with the platform): one line, and
            # the key store still closes after its settles, metrics stop, and the router exits 0
            print(f"router: warning: {what} at stop: {type(failed).__name__}: {failed}", file=sys.stderr, flush=True)
    metrics.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierline_router", description="Tierline router")
    parser.add_argument("--manifest", required=True, help="YAML tier manifest")
    args = parser.parse_args(argv)
    exit_with_supervisor("router", BACKSTOP_S)  # its supervisor killed: it stops as on SIGTERM, not an orphan
    return asyncio.run(serve(args.manifest))


if __name__ == "__main__":
    sys.exit(main())
