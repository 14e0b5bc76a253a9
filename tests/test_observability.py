"""What operators watch (issue 26): the metrics of a real running platform, the alert rules, the scrape config,
the Grafana dashboard and the `tierline status` picture.

One stack for the module: nats-server with JetStream, the device (a fleet member), edge and cloud tiers and the
router with API keys. Every request starts on the device and is never good enough there (its threshold is 1.0);
the edge's answers are kept: the device escalates all it is asked, the edge none. The checks that need promtool
skip where it is not installed (Debian: `apt-get install prometheus`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
import yaml

from tests.conftest import ROOT, new_key, run_cli, scrape
from tierline import InferenceClient, InvalidArgument, PermissionDenied, QuotaExceeded, Unauthenticated
from tierline.status_view import bar, render_text, watch
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack
from tierline_shared.config.manifest import load_manifest

OBS = ROOT / "infra" / "observability"
TIMEOUT = 30  # seconds, every call here
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
PLANS = {"pro": {"calls_per_day": 1000, "tokens_per_day": 1_000_000, "priority": "high"},
         "two": {"calls_per_day": 2, "tokens_per_day": 100_000}}
PROCESSES = ("router", "device-0", "edge-0", "cloud-0")
# a series name in PromQL: not a recorded rule's name (those have colons), not part of a longer word
NAME = re.compile(r"(?<![\w:])((?:tierline|process|python)_\w+)(?![\w:(])")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$model": ".*"}


@pytest.fixture(scope="module")
def stack(tiny_family):
    overrides = {"router.device_complexity": 1.0, "router.cloud_complexity": 1.0,
                 "router.confidence_threshold": {"device": 1.0, "edge": 0.0}, "auth.plans": PLANS,
                 "device_agent": {"device_id": "pi-obs", "heartbeat_s": 0.5, "stale_after_beats": 4}}
    with Stack(tiny_family, auth=True, jetstream=True, overrides=overrides) as s:
        yield s


def client(stack, key: str | None) -> InferenceClient:
    return InferenceClient(api_key=key or "", endpoint=stack.router_address, retries=0, timeout=TIMEOUT)


def post_openai(stack, key: str, body: bytes) -> int:
    port = next(p.ready["http_port"] for p in stack.procs if p.name == "router")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST",
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def traffic(stack):
    """Answers (unary, streamed, a repeat the tiers answer from their result caches) and every kind of refusal,
    through gRPC and the OpenAI API; returns the key the answers used."""
    key = stack.api_key
    with client(stack, key) as c:
        for i in range(3):
            assert c.infer(f"Q:{i}+4=?\nA:", {"max_tokens": 6}).tier == "edge"
        c.infer("Q:0+4=?\nA:", {"max_tokens": 6})  # the same greedy request again: both tiers' caches answer
        assert "".join(c.stream("Q:7+1=?\nA:", {"max_tokens": 6}))
        with pytest.raises(InvalidArgument):
            c.infer("Q:1+1=?\nA:", {"max_tokens": 6, "attention_window": 100_000})  # refused by the tiers
    with pytest.raises(Unauthenticated), client(stack, "tl_00000000_not-a-key") as c:
        c.infer("Q:1+1=?\nA:")
    revoked_id, revoked = new_key(stack, "pro")
    assert run_cli("keys", "revoke", revoked_id, "--manifest", str(stack.manifest), timeout=60).returncode == 0
    with pytest.raises(PermissionDenied), client(stack, revoked) as c:
        c.infer("Q:1+1=?\nA:")
    _, two = new_key(stack, "two")
    with client(stack, two) as c:
        c.infer("Q:2+2=?\nA:", {"max_tokens": 4})
        c.infer("Q:2+2=?\nA:", {"max_tokens": 4})
        with pytest.raises(QuotaExceeded):
            c.infer("Q:2+2=?\nA:", {"max_tokens": 4})
    assert post_openai(stack, key, b"{not json") == 400  # refused by the HTTP API before the router's infer
    assert post_openai(stack, "tl_00000000_not-a-key", b"{not json") == 401
    return key


# -- the series the services export ------------------------------------------------------------------------------
def test_the_router_counts_every_request_by_outcome_and_status_code(stack, traffic):
    router = scrape(stack, "router")

    def count(**labels) -> float:
        return router.value("tierline_router_requests_total", **labels)

    assert count(outcome="answered", code="OK", tier="edge") == 6  # 3, the repeat, 2 with the key "two"
    assert count(outcome="answered", code="OK", tier="device") == 1  # the stream (streams stay on the first tier)
    assert count(outcome="rejected", code="INVALID_ARGUMENT", tier="none") == 2  # a tier's refusal, bad JSON
    assert count(outcome="rejected", code="UNAUTHENTICATED") == 2  # gRPC and HTTP
    assert count(outcome="rejected", code="PERMISSION_DENIED") == 1
    assert count(outcome="rejected", code="RESOURCE_EXHAUSTED") == 1  # the quota
    assert count(outcome="error") == 0
    assert count() == 13
    assert router.value("tierline_router_num_requests_running") == 0  # every request has finished
    # the stream's time to first chunk and the time between its chunks, as its client saw them
    assert router.value("tierline_router_time_to_first_token_seconds_count", tier="device") == 1
    assert router.value("tierline_router_inter_token_latency_seconds_count", tier="device") >= 1


def test_tiers_count_result_cache_hits_and_refusals(stack, traffic):
    edge, device = scrape(stack, "edge-0"), scrape(stack, "device-0")
    assert edge.value("tierline_requests_total", outcome="cached", code="OK") >= 1
    assert device.value("tierline_requests_total", outcome="cached", code="OK") >= 1
    assert edge.value("tierline_result_cache_hits_total") == edge.value("tierline_requests_total", outcome="cached")
    # the request every tier refused for its window (each refusal sent it a tier up), counted with its status
    assert device.value("tierline_requests_total", outcome="rejected", code="INVALID_ARGUMENT") == 1
    answered = edge.value("tierline_requests_total", outcome="answered")
    assert edge.value("tierline_e2e_request_latency_seconds_count") == answered + edge.value(
        "tierline_requests_total", outcome="cached")
    assert edge.value("tierline_num_requests_waiting_max") == 64  # the manifest's max_queue: saturation is a ratio


def test_router_and_tier_series_have_names_of_their_own_and_a_model_label(stack, traffic):
    router, edge = scrape(stack, "router"), scrape(stack, "edge-0")
    own = lambda s: {n for n in s.names() if n.startswith("tierline")}  # noqa: E731
    assert own(router) and own(edge) and not own(router) & own(edge)  # sum(tierline_requests_total): tiers only
    assert all(n.startswith("tierline_router_") for n in own(router))
    for name, s in (("router", router), ("edge-0", edge)):
        unlabelled = {x.name for x in s.samples if x.name.startswith("tierline") and
                      x.labels.get("model_name") != "tierline-reasoner"}
        assert not unlabelled, (name, unlabelled)


def test_every_process_exports_its_process_metrics(stack, traffic):
    """And a tier whose model runs in an engine core exports the core's as `engine_core_process_*` (found by a
    fault hunt: the cloud's /metrics said 0.61 s of CPU and 85 MiB while its core had used 3.84 s and 327 MiB)."""
    import psutil

    for name in PROCESSES:
        s = scrape(stack, name)
        assert s.value("process_resident_memory_bytes") > 0, name
        assert "process_cpu_seconds_total" in s.names(), name
    for name in ("edge-0", "cloud-0"):
        tier = next(p for p in stack.procs if p.name == name)
        core = max(psutil.Process(tier.popen.pid).children(recursive=True), key=lambda c: c.memory_info().rss)
        s = scrape(stack, name)
        rss = s.value("engine_core_process_resident_memory_bytes")
        assert abs(rss - core.memory_info().rss) < 0.2 * rss, (name, rss, core.memory_info().rss)
        assert s.value("engine_core_process_cpu_seconds_total") > 0, name


def test_the_device_exports_its_heartbeat_staleness_and_updates(stack, traffic):
    device = scrape(stack, "device-0")
    beat = device.value("tierline_device_last_heartbeat_timestamp_seconds", device_id="pi-obs")
    assert device.value("tierline_device_stale_after_seconds", device_id="pi-obs") == 0.5 * 4
    record = json.loads(run_cli("devices", "list", "--manifest", str(stack.manifest), "--json").stdout)["devices"]
    assert [d["device"] for d in record] == ["pi-obs"]
    assert device.value("tierline_device_tier_link_up", device_id="pi-obs") == 1
    assert beat > 0 and device.value("tierline_device_ota_updates_total", device_id="pi-obs") == 0
    assert {s.labels["status"] for s in device.samples if s.name == "tierline_device_ota_updates_total"} >= {
        "applied", "digest_mismatch", "health_check_failed", "bad_signature"}


# -- tierline status: the picture -------------------------------------------------------------------------------
def test_status_reports_each_tiers_escalation_rate(stack, traffic):
    with client(stack, traffic) as c:
        st = c.status()
    tiers = {t.tier: t for t in st.tiers}
    # the device was asked 6 routed requests (all escalated), the stream (answered there: a stream keeps its
    # first answer) and the request every tier refuses for its window (each refusal sent it a tier up)
    assert (tiers["device"].asked, tiers["device"].escalated) == (8, 7)
    assert tiers["device"].escalation_rate == pytest.approx(7 / 8)
    assert (tiers["edge"].asked, tiers["edge"].escalated, tiers["edge"].escalation_rate) == (7, 1, pytest.approx(1 / 7))
    assert tiers["edge"].traffic_share == pytest.approx(6 / 7) and tiers["cloud"].asked == 1
    text = render_text(st)
    device_row = next(line for line in text.splitlines() if line.startswith("device"))
    assert bar(7 / 8) in device_row and "87.5% of 8" in device_row
    proc = run_cli("status", "--endpoint", stack.router_address, "--api-key", traffic, "--json", timeout=60)
    assert json.loads(proc.stdout)["tiers"][0]["escalationRate"] == pytest.approx(7 / 8)
    shown = run_cli("status", "--endpoint", stack.router_address, "--api-key", traffic, timeout=60).stdout
    assert "escalation rate" in shown and bar(7 / 8) in shown


def test_watch_redraws_the_status_each_interval(capsys):
    st = pb.PlatformStatus(model="m", answered=3)
    st.tiers.add(tier="edge", answered=3, traffic_share=1.0, asked=4, escalated=1, escalation_rate=0.25)
    fetched = []
    watch(lambda: fetched.append(1) or st, 0.01, rounds=3)
    out = capsys.readouterr().out
    assert len(fetched) == 3 and out.count("Tierline: m - 3 requests") == 3 and "25.0% of 4" in out


def test_bars_are_drawn_to_an_eighth_of_a_character():
    assert bar(0.0, 4) == "    " and bar(1.0, 4) == "████" and bar(2.0, 4) == "████"
    assert bar(0.5, 4) == "██  " and bar(1 / 32, 4) == "▏   "


# -- infra/observability: scrape config, alert rules, dashboard -------------------------------------------------
def _dashboard_queries() -> list[str]:
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if isinstance(var.get("query"), dict):
            exprs.append(var["query"]["query"].replace("label_values(", "count by (model_name) (")
                         .replace(", model_name)", ")"))
    for var, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(var, value) for e in exprs]
    return exprs


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load((OBS / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_the_dashboard_and_the_alerts_query_only_series_the_services_export(stack, traffic):
    exported = set().union(*(scrape(stack, name).names() for name in PROCESSES))
    recorded = {r["record"] for r in _rules() if "record" in r}
    queries = _dashboard_queries() + [r["expr"] for r in _rules()]
    used = {n for q in queries for n in NAME.findall(q)}
    assert len(used) > 25
    assert not used - exported, sorted(used - exported)
    records_used = {n for q in queries for n in re.findall(r"\b(\w+:\w+:\w+)\b", q)}
    assert records_used and records_used <= recorded


def test_the_scrape_config_scrapes_the_local_manifests_ports():
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in config["scrape_configs"]}
    m = load_manifest(ROOT / "infra" / "manifests" / "local.yaml", check_artifacts=False)
    expected = {"tierline-router": [f"127.0.0.1:{m.router.metrics_port}"],
                **{f"tierline-{t}": [f"127.0.0.1:{m.tiers[t].metrics_port}"] for t in m.tiers}}
    assert targets == expected
    jobs_in_rules = {j for r in _rules() for j in re.findall(r"tierline-\w+", r["expr"])}
    assert jobs_in_rules <= set(targets)


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=OBS)


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules_and_every_alert_fires_in_its_unit_test():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                 ("test", "rules", "alerts_test.yml")):
        proc = _promtool(*args)
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
    tested = set(re.findall(r"alertname: (\w+)", (OBS / "alerts_test.yml").read_text()))
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts and not alerts - tested, alerts - tested


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}:expr", "expr": q}
                                                         for i, q in enumerate(_dashboard_queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_lints_what_every_process_exports(stack, traffic):
    for name in PROCESSES:
        proc = _promtool("check", "metrics", stdin=scrape(stack, name).text)
        assert proc.returncode == 0, (name, proc.stdout + proc.stderr)


def test_a_stream_its_client_leaves_is_counted_once(stack, traffic):
    """Cancelled by the client after its first chunk: counted once (cancelled, or answered if its last chunk was
    already on the way), and nothing is left running."""
    finished = ("tierline_router_requests_total",)
    before = scrape(stack, "router").value(*finished)
    channel = grpc.insecure_channel(stack.router_address)
    call = pb_grpc.InferenceServiceStub(channel).InferStream(
        pb.InferRequest(prompt="Q:9+9=?\nA:", parameters=pb.Parameters(max_tokens=64)),
        metadata=(("authorization", f"Bearer {traffic}"),), timeout=TIMEOUT)
    next(call)
    call.cancel()
    channel.close()
    deadline = time.monotonic() + TIMEOUT
    while (router := scrape(stack, "router")).value(*finished) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a second count would come now
    router = scrape(stack, "router")
    assert router.value(*finished) == before + 1
    assert router.value("tierline_router_num_requests_running") == 0


def test_a_steps_series_read_as_prometheus_clients_own_gauges_and_histograms_would():
    """A scheduler step's series (one collector that takes a step's values at once: tierline_shared.serving.metrics
    `_StepSeries`) expose what prometheus_client's Gauge and Histogram expose for the same values, bucket by
    bucket, values on a bucket's bound included."""
    import random

    from prometheus_client import CollectorRegistry, Gauge, Histogram

    from tierline_shared.runtime.scheduler import StepStats
    from tierline_shared.serving.metrics import BATCH_BUCKETS, ITL_BUCKETS, TOKEN_BUCKETS, Metrics

    ours, ref = Metrics("edge", "m"), CollectorRegistry()
    labels = {"model_name": "m", "tier": "edge"}
    reference = {"tierline_num_requests_running": Gauge("tierline_num_requests_running", "", list(labels),
                                                        registry=ref).labels(**labels),
                 "tierline_num_requests_waiting": Gauge("tierline_num_requests_waiting", "", list(labels),
                                                        registry=ref).labels(**labels)}
    for name, buckets in (("tierline_batch_size", BATCH_BUCKETS), ("tierline_iteration_tokens", TOKEN_BUCKETS),
                          ("tierline_inter_token_latency_seconds", ITL_BUCKETS)):
        reference[name] = Histogram(name, "", list(labels), buckets=buckets, registry=ref).labels(**labels)
    rng = random.Random(7)
    for _ in range(500):
        itl = [rng.choice([*ITL_BUCKETS, rng.uniform(0, 2), 0.0]) for _ in range(rng.randint(0, 20))]
        stats = StepStats(running=rng.randint(0, 16), waiting=rng.randint(0, 9), seqs=rng.choice([*BATCH_BUCKETS, 99]),
                          tokens=rng.randint(1, 5000), inter_token_s=itl, first_tokens=0)
        ours.observe_step(stats)
        reference["tierline_num_requests_running"].set(stats.running)
        reference["tierline_num_requests_waiting"].set(stats.waiting)
        reference["tierline_batch_size"].observe(stats.seqs)
        reference["tierline_iteration_tokens"].observe(stats.tokens)
        for s in itl:
            reference["tierline_inter_token_latency_seconds"].observe(s)

    def samples(registry):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in registry.collect()
                for s in family.samples if s.name.startswith(tuple(reference)) and not s.name.endswith("_created")}

    expected, got = samples(ref), samples(ours.registry)
    assert len(expected) == 2 + sum(len(b) + 3 for b in (BATCH_BUCKETS, TOKEN_BUCKETS, ITL_BUCKETS))
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-12) for k, v in expected.items())
