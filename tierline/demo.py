"""`make demo` and `make up`: the whole platform on this machine.

The demo starts nats-server (loopback, TLS, one NATS identity per role), the three tiers and the router,
sends a concurrent mixed workload drawn from the benchmark through the router,
prints what happened per tier, and stops everything.
"""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from tierline import running
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import REFERENCE_MANIFEST, ChildFailed, Stack, demo_overrides, host_share
from tierline_router.cascade import cost, paid_tokens
from tierline_shared.config.manifest import ManifestError, load_manifest
from tierline_shared.tasks.problems import generate, is_correct
from tierline_shared.wire import TIERS

DEMO_TIMEOUT_S = 60  # per request


def run_workload(address: str, n: int, concurrency: int, seed: int = 7, api_key: str | None = None) -> list[tuple]:
    """(problem, response or None, error or None, seconds) for n benchmark problems."""
    problems = generate("test", n, seed=seed)
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=DEMO_TIMEOUT_S)
    stub = pb_grpc.InferenceServiceStub(channel)
    auth = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def one(p):
        t0 = time.perf_counter()
        try:
            r = stub.Infer(pb.InferRequest(prompt=p.prompt, parameters=pb.Parameters(max_tokens=96)),
                           timeout=DEMO_TIMEOUT_S, metadata=auth)
            return p, r, None, time.perf_counter() - t0
        except grpc.RpcError as exc:
            return p, None, f"{exc.code().name}: {exc.details()}", time.perf_counter() - t0

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, problems))


def report(results: list[tuple], costs: dict[str, float], wall_s: float, console: Console) -> dict:
    by_tier: dict[str, list] = defaultdict(list)
    errors = Counter()
    for p, r, err, secs in results:
        if r is None:
            errors[err.split(":")[0]] += 1
            continue
        by_tier[r.tier].append((p, r, secs))
    table = Table(title=f"Tierline demo: {len(results)} requests through the router in {wall_s:.1f} s "
                        f"({len(results) / wall_s:.1f} req/s)")
    for col in ("tier", "requests", "share", "accuracy", "p50 ms", "p95 ms", "escalated", "degraded"):
        table.add_column(col, justify="right")
    spent = cloud_cost = 0.0
    answered = sum(len(v) for v in by_tier.values())
    for tier in TIERS:
        rows = by_tier.get(tier, [])
        for _, r, _ in rows:
            spent += cost(paid_tokens(r.escalation_path), costs)  # every tier tried, each for its own tokens
            cloud_cost += cost({"cloud": r.usage.prompt_tokens + r.usage.completion_tokens}, costs)
        if not rows:
            table.add_row(tier, "0", "0%", "-", "-", "-", "-", "-")
            continue
        lat = sorted(s * 1000 for _, _, s in rows)
        acc = sum(is_correct(p, r.choices[0].text) for p, r, _ in rows) / len(rows)
        table.add_row(tier, str(len(rows)), f"{len(rows) / max(answered, 1):.0%}", f"{acc:.1%}",
                      f"{statistics.median(lat):.0f}", f"{lat[int(0.95 * (len(lat) - 1))]:.0f}",
                      str(sum(len(paid_tokens(r.escalation_path)) > 1 for _, r, _ in rows)),
                      str(sum(r.degraded for _, r, _ in rows)))
    console.print(table)
    total_acc = sum(is_correct(p, r.choices[0].text) for rows in by_tier.values() for p, r, _ in rows)
    summary = {"requests": len(results), "answered": answered, "errors": dict(errors),
               "accuracy": total_acc / max(answered, 1), "cost_vs_cloud": spent / cloud_cost if cloud_cost else 0.0}
    console.print(f"overall accuracy {summary['accuracy']:.1%}; cost {summary['cost_vs_cloud']:.1%} of sending "
                  f"everything to the cloud; errors: {dict(errors) or 'none'}")
    return summary


def demo(models_dir: Path, n: int = 300, concurrency: int = 16) -> int:
    console = Console()
    with console.status("starting nats-server, device, edge, cloud and router..."):
        stack = Stack(models_dir, overrides=demo_overrides(models_dir), auth=True, jetstream=True).start()
    try:
        console.print(f"platform up: router at {stack.router_address}, NATS at {stack.nats.url} "
                      f"(TLS, one identity per role), API keys on (a pro key was made for the demo)")
        t0 = time.perf_counter()
        with console.status(f"sending {n} benchmark requests, {concurrency} at a time..."):
            results = run_workload(stack.router_address, n, concurrency, api_key=stack.api_key)
        costs = load_manifest(stack.manifest, check_artifacts=False).costs()
        summary = report(results, costs, time.perf_counter() - t0, console)
        summary["batch"] = batch_demo(stack, console)
    finally:
        stack.stop()
        console.print("stopped every process")
    return 0 if not summary["errors"] and summary["batch"]["status"] == "completed" else 1


DEMO_BATCH_LINES = 60  # the demo's batch: a file of benchmark problems through /v1/batches


def batch_demo(stack: Stack, console) -> dict:
    """A small batch through the OpenAI Batch API, as `tierline batch submit --wait` sends it."""
    from tierline.batch_cli import Api, follow, submit, summary

    model = load_manifest(stack.manifest, check_artifacts=False).model_name
    data = b"".join(json.dumps({"custom_id": f"check-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": model, "prompt": p.prompt, "max_tokens": 32}}).encode() + b"\n"
                    for i, p in enumerate(generate("test", DEMO_BATCH_LINES, seed=99)))
    api = Api(stack.http_base_url, stack.api_key)
    t0 = time.perf_counter()
    with console.status(f"a batch of {DEMO_BATCH_LINES} lines through /v1/files + /v1/batches..."):
        batch = follow(api, submit(api, "demo.jsonl", data, "/v1/completions"))
    console.print(f"batch {summary(batch)}; {DEMO_BATCH_LINES / (time.perf_counter() - t0):.0f} lines/s")
    return batch


def endpoints(stack: Stack) -> list[dict]:
    """Every endpoint a stack started: per process its gRPC, metrics and (the router) HTTP addresses."""
    rows = []
    for p in stack.procs:
        r = p.ready
        rows.append({"process": p.name, "grpc": f"127.0.0.1:{r['grpc_port']}",
                     "metrics": f"http://127.0.0.1:{r['metrics_port']}/metrics" if r.get("metrics_port") else "-",
                     "http": f"http://127.0.0.1:{r['http_port']}/v1" if r.get("http_port") else "-"})
    return rows


def up(models_dir: Path, pidfile: Path, manifest: Path | None = None, replicas: dict | None = None,
       host: Path | None = None) -> int:
    """Start the platform and keep it running until Ctrl-C or `make down` (SIGTERM); one at a time.

    `manifest`: its ports (0 = a free one), infra/manifests/local.yaml's when None (the README's examples use
    them); `replicas`: tier -> count, the extra ones on free ports;
    `host`: instead, this host's share of a deployment as that manifest says (`host_share`)."""
    from tierline.cli import UsageError

    if (pid := running.alive(pidfile)) is not None:
        raise UsageError(f"a platform is already up (pid {pid}, {pidfile}): stop it first with `make down`")
    console = Console()
    stop, stopping = threading.Event(), []

    def on_signal(*_) -> None:  # a second Ctrl-C (or SIGTERM) while the tiers finish their requests: stop them now
        if stop.is_set() and stopping:
            console.print("Stopping now: the requests still in flight are answered UNAVAILABLE.")
            stopping[0].hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:  # a start that fails stops what it started (Stack.start): the error is the child's own line
        if host is not None:
            stack = host_share(host, replicas).start()
        else:
            stack = Stack(models_dir, overrides=demo_overrides(models_dir), auth=True, jetstream=True,
                          replicas=replicas, ports_from=manifest or REFERENCE_MANIFEST).start()
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    except ChildFailed as exc:
        raise UsageError(f"the platform did not start: {exc.name} {exc.last_line}") from None
    except TimeoutError as exc:
        raise UsageError(f"the platform did not start: {exc}") from None
    stopping.append(stack)
    try:
        try:
            running.record(pidfile, stack.manifest)  # `tierline keys` finds the key store this router reads
        except OSError as exc:
            raise UsageError(f"--pidfile {pidfile}: cannot write it ({exc.strerror or exc}); the platform "
                             "was stopped") from None
        table = Table(title="endpoints")
        for col in ("process", "grpc", "metrics", "http"):
            table.add_column(col)
        for row in endpoints(stack):
            table.add_row(*row.values())
        console.print(table)
        if host is not None:
            keys = f" API keys: tierline keys create --plan pro --manifest {host}." if stack.with_router else ""
            console.print(f"This host's share of {host} is up (NATS: {stack.nats.url}).{keys} "
                          "Stop with Ctrl-C or `make down`.")
            stop.wait()
            return 0
        console.print(f"Tierline is up. Router (gRPC): {stack.router_address}  NATS: {stack.nats.url}\n"
                      f"OpenAI-compatible API: {stack.http_base_url}\n"
                      f"API key (pro plan, shown once): {stack.api_key}\n"
                      f"Manifest: {stack.manifest} (more keys: tierline keys create --plan free)\n"
                      f"NATS identities, update signing key, CA: {stack.credentials} (docs/SECURITY.md)\n"
                      f"Stop with Ctrl-C or `make down`.")
        stop.wait()
    finally:
        stack.stop()
        running.forget(pidfile)
    return 0
