"""Section 10 of `make bench`: the Batch API on the whole platform, next to the article's 12 million checks a day.

A file of `batch_lines` benchmark problems goes through `/v1/files` + `/v1/batches` with the official
`openai` client, exactly as an operator would submit it; the router's workers run its lines at the
lowest priority through the routing policy. Measured: lines per second from `batches.create` to the
batch completed (polled), the share answered below the cloud, the cost per line in the manifest's
units against the cloud-only cost per request of section 2 (same workload, same run), and the latency
of a light interactive load (gRPC, through the router) alone and while the batch runs.
"""

from __future__ import annotations

import io
import json
import time

from tierline_bench.load import GrpcClient, LoadRun, run_load
from tierline_infra.supervisor import Stack
from tierline_shared.tasks.problems import Problem, is_correct
from tierline_shared.wire import TIERS

ARTICLE_LINES_PER_DAY = 12_000_000  # the article's risk service: 12 million transaction checks a day, one server
INTERACTIVE_CONCURRENCY = 2  # the interactive load measured beside the batch (a light one: a few users)
POLL_S = 0.25  # how often the batch's status is read
BATCH_TIMEOUT_S = 1500.0  # a batch not done by then is reported as not measured


def _num(value: float, digits: int = 2) -> float:
    return round(float(value), digits)


def batch_api(stack: Stack, cfg, problems: list[Problem], interactive: list[str], costs: dict[str, float],
              cloud_cost_per_request, workers: int) -> dict:
    import openai

    client = openai.OpenAI(api_key=stack.api_key or "none", base_url=stack.http_base_url, max_retries=2,
                           timeout=120)
    data = b"".join(json.dumps({"custom_id": f"check-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": stack_model(stack), "prompt": p.prompt,
                                         "max_tokens": cfg.max_tokens}}).encode() + b"\n"
                    for i, p in enumerate(problems))
    grpc = GrpcClient(stack.router_address, cfg.max_tokens)
    try:
        alone = run_load(grpc.infer, interactive, INTERACTIVE_CONCURRENCY, interactive[:4])
        file = client.files.create(file=("checks.jsonl", io.BytesIO(data)), purpose="batch")
        t0 = time.perf_counter()
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        while batch.status == "validating":
            time.sleep(POLL_S)
            batch = client.batches.retrieve(batch.id)
        beside = run_load(grpc.infer, interactive, INTERACTIVE_CONCURRENCY)
        overlapped = client.batches.retrieve(batch.id).status == "in_progress"  # the whole interactive run
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            if time.perf_counter() - t0 > BATCH_TIMEOUT_S:
                client.batches.cancel(batch.id)
                return _not_done(cfg, workers, f"not done in {BATCH_TIMEOUT_S:.0f} s: {batch.request_counts}")
            time.sleep(POLL_S)
            batch = client.batches.retrieve(batch.id)
        wall = time.perf_counter() - t0
    finally:
        grpc.close()
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).read().splitlines()] \
        if batch.output_file_id else []
    by_id = {f"check-{i}": p for i, p in enumerate(problems)}
    texts = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in out}
    info = batch.model_dump().get("tierline") or {}  # the platform's own figures on the batch object
    answered = info.get("answered_by_tier", {})
    n_ok = max(len(out), 1)
    per_s = len(problems) / wall
    cost_per_line = (info.get("cost") or 0.0) / n_ok
    metrics = {
        "lines": len(problems), "completed": batch.request_counts.completed, "failed": batch.request_counts.failed,
        "wall_s": _num(wall, 1), "lines_per_s": _num(per_s), "lines_per_day": int(per_s * 86400),
        "article_lines_per_day": ARTICLE_LINES_PER_DAY,
        "over_article": _num(per_s * 86400 / ARTICLE_LINES_PER_DAY),
        "share": {t: _num(answered.get(t, 0) / n_ok, 4) for t in TIERS},
        "share_below_cloud": _num(1 - answered.get("cloud", 0) / n_ok, 4),
        "accuracy": _num(sum(is_correct(by_id[c], t) for c, t in texts.items()) / n_ok, 4),
        "cost_per_line": _num(cost_per_line, 5),
        "cloud_only_cost_per_request": cloud_cost_per_request,
        "cost_reduction_vs_cloud_only": _num(1 - cost_per_line / cloud_cost_per_request, 4)
        if isinstance(cloud_cost_per_request, (int, float)) and cloud_cost_per_request > 0 else
        {"not_measured": "no cloud-only cost in section 2"},
        "interactive": {"alone": _latency(alone), "beside_batch": _latency(beside),
                        "p50_beside_over_alone": _num(beside.latency_ms(50) / alone.latency_ms(50))},
    }
    notes = [f"{ARTICLE_LINES_PER_DAY:,} lines a day is {ARTICLE_LINES_PER_DAY / 86400:.0f} lines/s sustained; "
             f"this machine ran {per_s:.1f} lines/s with every tier, the router and nats-server on its cores.",
             "Cost is in the manifest's relative units (cost_per_1k_tokens): each line pays every tier that ran a "
             "model for it (tierline_router.cascade.cost), summed by the batch itself (`tierline.cost` in the "
             "batch object).",
             "Batch lines run at the lowest priority; the interactive requests run at the plan's (normal). The "
             "interactive load " + ("ran entirely while the batch was in progress." if overlapped else
                                    "outlasted the batch: the 'beside' figures include time after it ended.")]
    return {"title": "Batch API: a file of checks through /v1/batches", "method": _method(cfg, workers, len(problems)),
            "metrics": metrics, "article": {"lines_per_day": "12M on one server"}, "notes": notes}


def stack_model(stack: Stack) -> str:
    from tierline_shared.config.manifest import load_manifest

    return load_manifest(stack.manifest, check_artifacts=False).model_name


def _latency(run: LoadRun) -> dict:
    return {"p50_ms": _num(run.latency_ms(50)), "p95_ms": _num(run.latency_ms(95)), "errors": run.errors}


def _method(cfg, workers: int, lines: int) -> dict:
    return {"load_generator": "one batch file through the openai client (files.create + batches.create, polled); "
                              f"beside it a closed loop of {INTERACTIVE_CONCURRENCY} gRPC clients through the router",
            "concurrency": f"{workers} batch workers (router.batch.workers)", "requests": lines, "warmup": 4,
            "repeats": 1, "max_tokens": cfg.max_tokens,
            "workload": f"{lines} benchmark problems (test split, all five levels, seed {cfg.seed + 5000})"}


def _not_done(cfg, workers: int, reason: str) -> dict:
    return {"title": "Batch API: a file of checks through /v1/batches", "method": _method(cfg, workers, 0),
            "metrics": {"lines_per_s": {"not_measured": reason}}, "notes": []}
