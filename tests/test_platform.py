"""The running platform: real nats-server, real tier and router processes, tiny models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import processes_with
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack, write_manifest
from tierline_shared.tasks.problems import generate

TIMEOUT = 30  # seconds, every RPC here


def stub(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    return pb_grpc.InferenceServiceStub(channel)


def req(prompt: str = "Q:2+3=?\nA:", **params) -> pb.InferRequest:
    return pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=params.pop("max_tokens", 16),
                                                                   **params))


@pytest.fixture(scope="module")
def stack(tiny_family):
    # every request starts at the device but one of complexity 1.0 (the step-counting heuristic's: no learned
    # scorer), which starts at the cloud; no tier is ever confident enough: the full cascade
    with Stack(tiny_family, overrides={"router.scorer": "", "router.device_complexity": 1.0,
                                       "router.cloud_complexity": 1.0,
                                       "router.confidence_threshold": {"device": 1.0, "edge": 1.0},
                                       "nats.request_timeout_ms": 5000}) as s:
        yield s


def test_each_tier_answers_directly(stack):
    for name, tier in (("edge-0", "edge"), ("cloud-0", "cloud")):
        resp = stub(stack.port(name)).Infer(req(), timeout=TIMEOUT)
        assert resp.tier == tier
        assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
        assert resp.choices[0].finish_reason in ("stop", "length")
        info = stub(stack.port(name)).GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT)
        assert info.tier == tier and info.max_tokens_limit > 0


def test_device_agent_answers_locally_then_escalates_over_nats(stack):
    resp = stub(stack.port("device-0")).Infer(req(), timeout=TIMEOUT)
    # the board tried first, was not confident enough (threshold 1.0), the edge neither, the cloud answered
    assert [(a.tier, a.outcome) for a in resp.escalation_path] == [
        ("device", "low_confidence"), ("edge", "low_confidence"), ("cloud", "answered")]
    assert resp.tier == "cloud" and not resp.degraded



def test_a_stream_at_the_boards_front_door_goes_where_a_unary_request_goes(stack):
    """The board's InferStream takes its policy and cascade, as Infer does: a prompt the policy sends to the cloud
    streams from the cloud over NATS (chunk by chunk, the cloud's own text), with the path the unary answer has; one
    the policy leaves on the board streams from the board and, a stream's answer being out as it comes, is kept.
    It streamed every prompt from the board's own model."""
    hard = "Q:" + "+".join("1" * 14) + "=?\nA:"  # complexity 1.0: the cloud first
    board = stub(stack.port("device-0"))
    unary = board.Infer(req(hard), timeout=TIMEOUT)
    chunks = list(board.InferStream(req(hard), timeout=TIMEOUT))
    last = chunks[-1]
    assert unary.tier == "cloud" and [(a.tier, a.outcome) for a in unary.escalation_path] == [("cloud", "answered")]
    assert len(chunks) > 2 and all(c.tier == "cloud" for c in chunks) and last.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks) == unary.choices[0].text
    assert [(a.tier, a.outcome) for a in last.escalation_path] == [("cloud", "answered")] and not last.degraded
    assert last.complexity == unary.complexity
    easy = list(board.InferStream(req(), timeout=TIMEOUT))[-1]
    assert easy.tier == "device" and [(a.tier, a.outcome) for a in easy.escalation_path] == [("device", "answered")]


def test_device_agent_alone_answers_locally_and_fast(tiny_family):
    """No edge, no cloud: the agent fails the escalation at once and answers on the board, degraded."""
    import time

    with Stack(tiny_family, tiers=("device",), router=False,
               overrides={"router.device_complexity": 1.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"device": 1.0}, "nats.request_timeout_ms": 20000}) as s:
        t0 = time.perf_counter()
        resp = stub(s.port("device-0")).Infer(req(), timeout=TIMEOUT)
        assert time.perf_counter() - t0 < 5  # no responders is immediate, not the 20 s timeout
        assert resp.tier == "device" and resp.degraded
        assert [a.outcome for a in resp.escalation_path] == ["low_confidence", "no_responders", "no_responders"]


def test_a_call_without_a_deadline_is_answered_by_every_tier(stack):
    """Issue 21: gRPC reports 'no deadline' as ~9.2e18 s left; a tier must not overflow its clocks on it."""
    for i, name in enumerate(("edge-0", "cloud-0", "device-0", "router")):
        # a prompt of its own each (a result-cache hit would not wait), no timeout: no deadline on the call
        call = stub(stack.port(name)).Infer.future(req(f"Q:{i + 2}+{i}=?\nA:"))
        resp = call.result(timeout=TIMEOUT)
        assert resp.choices[0].finish_reason in ("stop", "length"), name


def test_low_confidence_escalates_to_the_cloud(stack):
    resp = stub(stack.port("router")).Infer(req(), timeout=TIMEOUT)
    assert resp.tier == "cloud"
    outcomes = [(a.tier, a.outcome) for a in resp.escalation_path]
    assert outcomes == [("device", "low_confidence"), ("edge", "low_confidence"), ("cloud", "answered")]
    assert not resp.degraded


def test_an_escalated_request_brings_the_answer_below_as_a_draft_and_gets_the_clouds_own_answer(stack, tiny_family):
    """The router sends the lower tier's answer up with the request (InferRequest.draft): the edge verifies the
    device's, the cloud the edge's (their spec_decode counters count them), and the answer is the cloud model's own,
    token for token, as it decodes alone in this process."""
    from tests.conftest import scrape
    from tierline.build.engines import load_engine
    from tierline_shared.runtime.engine import GenerationParams

    def drafted(name: str, tier: str) -> tuple[float, float]:
        m = scrape(stack, name)
        return (m.value("tierline_spec_decode_num_draft_tokens_total", tier=tier),
                m.value("tierline_spec_decode_num_accepted_tokens_total", tier=tier))

    before = {t: drafted(f"{t}-0", t) for t in ("edge", "cloud")}
    prompts = [p.prompt for p in generate("test", 6, seed=41)]  # prompts of their own: no result-cache hit
    answers = [stub(stack.port("router")).Infer(req(p, max_tokens=24), timeout=TIMEOUT) for p in prompts]
    assert all(r.tier == "cloud" and [a.outcome for a in r.escalation_path] == ["low_confidence", "low_confidence",
                                                                               "answered"] for r in answers)
    after = {t: drafted(f"{t}-0", t) for t in ("edge", "cloud")}
    for t in ("edge", "cloud"):
        assert after[t][0] > before[t][0], t  # every escalation brought a draft
        assert after[t][0] - before[t][0] >= after[t][1] - before[t][1] >= 0, t
    cloud = load_engine(tiny_family, "cloud", threads=1)
    alone = cloud.generate_batch(prompts, [GenerationParams(max_tokens=24)] * len(prompts))
    assert [r.choices[0].text for r in answers] == [a.text for a in alone]


def test_stream_reaches_the_client(stack):
    chunks = list(stub(stack.port("edge-0")).InferStream(req(max_tokens=12), timeout=TIMEOUT))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].text for c in chunks)
    direct = stub(stack.port("edge-0")).Infer(req(max_tokens=12), timeout=TIMEOUT)
    assert text == direct.choices[0].text


def test_router_streams_tokens_as_they_come(stack):
    chunks = list(stub(stack.port("router")).InferStream(req(max_tokens=12), timeout=TIMEOUT))
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.tier == "device"  # the policy's first tier here; streams do not cascade on confidence
    assert final.usage.completion_tokens == len(chunks) - 1  # one chunk per generated token
    assert [a.outcome for a in final.escalation_path] == ["answered"]


def test_router_stream_skips_a_tier_with_no_responders(tiny_family):
    with Stack(tiny_family, tiers=("edge", "cloud"),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0}) as s:
        s.kill("edge-0")
        chunks = list(stub(s.port("router")).InferStream(req(max_tokens=8), timeout=TIMEOUT))
        assert chunks[-1].tier == "cloud"
        assert [a.outcome for a in chunks[-1].escalation_path] == ["no_responders", "answered"]


def test_a_stream_whose_first_tier_is_down_falls_back_below_as_a_unary_request_does(tiny_family):
    with Stack(tiny_family, tiers=("edge", "cloud"),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 0.0,
                          "router.no_replica_wait_ms": 0}) as s:
        s.kill("cloud-0")
        router = stub(s.port("router"))
        unary = router.Infer(req(max_tokens=8), timeout=TIMEOUT)
        chunks = list(router.InferStream(req(max_tokens=8), timeout=TIMEOUT))
        for final in (unary, chunks[-1]):
            assert final.tier == "edge" and final.degraded
            assert [(a.tier, a.outcome) for a in final.escalation_path] == [("cloud", "no_responders"),
                                                                             ("edge", "answered")]


def test_a_request_waits_for_a_tier_whose_only_replica_is_coming_back(tiny_family):
    """No replica up for a moment (one restarting, or reconnecting after the NATS node it was on died): the
    router asks again with backoff within the request's time instead of failing at once, unary and streamed."""
    # the wait made long enough for a whole restart here (the default, 3 s, covers a NATS reconnect)
    with Stack(tiny_family, tiers=("edge",), overrides={"router.confidence_threshold": {"edge": 0.0},
                                                        "router.no_replica_wait_ms": 20000}) as s:
        s.kill("edge-0")
        router = stub(s.port("router"))
        out: dict = {}
        threads = [threading.Thread(target=lambda: out.update(unary=router.Infer(req(max_tokens=4), timeout=TIMEOUT))),
                   threading.Thread(target=lambda: out.update(stream=list(router.InferStream(req(max_tokens=4),
                                                                                             timeout=TIMEOUT))))]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both are in the router, which finds no replica
        assert not out
        s.restart("edge-0", "tierline_edge_node")
        for t in threads:
            t.join(TIMEOUT)
        for resp in (out["unary"], out["stream"][-1]):
            outcomes = [a.outcome for a in resp.escalation_path]
            assert resp.tier == "edge" and not resp.degraded, resp
            assert set(outcomes[:-1]) == {"no_responders"} and len(outcomes) > 2 and outcomes[-1] == "answered"


def _engine_cores(pid: int) -> list[int]:
    """The engine core processes a tier process runs (its multiprocessing `spawn` children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    out.append(int(child))
            except OSError:
                pass
    return out


def test_a_killed_engine_core_loses_no_request_and_starts_again(stack):
    """The edge and cloud run their models in an engine core process (the device in its own); killing the edge's
    under load: what it held fails UNAVAILABLE, the router asks the cloud, and the core comes back."""
    procs = {p.name: p.popen.pid for p in stack.procs}
    assert _engine_cores(procs["device-0"]) == [] and len(_engine_cores(procs["cloud-0"])) == 1
    [core] = _engine_cores(procs["edge-0"])
    router = stub(stack.port("router"))
    prompts = [p.prompt for p in generate("test", 32, seed=11)]
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(router.Infer, req(p, max_tokens=48), timeout=TIMEOUT) for p in prompts]
        time.sleep(0.2)
        os.kill(core, signal.SIGKILL)
        answers = [a.result() for a in answers]  # an error would raise here
    assert all(a.choices[0].text or a.usage.completion_tokens for a in answers)
    end = time.monotonic() + TIMEOUT
    while len(_engine_cores(procs["edge-0"])) != 1 or _engine_cores(procs["edge-0"]) == [core]:
        assert time.monotonic() < end, "the edge's engine core did not start again"
        time.sleep(0.1)
    while True:  # until the new core has loaded its model, the edge answers UNAVAILABLE
        try:  # a prompt no test sent before: not an answer from the edge's result cache
            resp = stub(stack.port("edge-0")).Infer(req("Q:17+25=?\nA:", max_tokens=12), timeout=TIMEOUT)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < end, exc
            time.sleep(0.1)
    assert resp.tier == "edge" and resp.usage.completion_tokens > 0 and not resp.cached


def test_identical_greedy_request_is_cached_at_the_edge(stack):
    edge = stub(stack.port("edge-0"))
    first = edge.Infer(req("Q:max(4,7)=?\nA:"), timeout=TIMEOUT)
    again = edge.Infer(req("Q:max(4,7)=?\nA:"), timeout=TIMEOUT)
    assert not first.cached and again.cached
    assert again.choices[0].text == first.choices[0].text


@pytest.mark.parametrize("request_, field", [
    (pb.InferRequest(prompt=""), "prompt"),
    (pb.InferRequest(prompt="x" * 5000), "prompt"),
    (req(max_tokens=0), "parameters.max_tokens"),
    (req(max_tokens=100000), "parameters.max_tokens"),
    (req(temperature=-0.5), "parameters.temperature"),
    (pb.InferRequest(prompt="Q:1+1=?\nA:", model="gpt-9"), "model"),
    (req(attention_window=100000), "parameters.attention_window"),
])
def test_bad_fields_are_invalid_argument(stack, request_, field):
    for name in ("router", "edge-0", "device-0"):
        with pytest.raises(grpc.RpcError) as err:
            stub(stack.port(name)).Infer(request_, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        assert field in err.value.details()


def test_reflection_lists_the_services(stack):
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.port('edge-0')}")
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        timeout=TIMEOUT)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"tierline.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_health_is_serving_for_the_server_and_the_service(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name in ("router", "edge-0", "device-0"):
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{stack.port(name)}"))
        for service in ("", "tierline.v1.InferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)


def test_killing_an_edge_replica_loses_no_request(tiny_family):
    prompts = [p.prompt for p in generate("test", 40, seed=5)]
    with Stack(tiny_family, tiers=("edge", "cloud"), replicas={"edge": 2},
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "nats.request_timeout_ms": 3000,
                          "router.retries_per_tier": 2}) as s:
        router = stub(s.port("router"))
        killed = threading.Event()

        def one(i: int):
            if i == 10:
                s.kill("edge-1")
                killed.set()
            return router.Infer(req(prompts[i]), timeout=TIMEOUT)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(len(prompts))))
        assert killed.is_set()
        assert len(answers) == len(prompts)
        assert all(a.choices[0].finish_reason for a in answers)
        assert {a.tier for a in answers} <= {"edge", "cloud"}


def test_a_hung_replica_fails_no_request_while_another_is_up(tiny_family):
    """Found by a fault hunt: one of two edge replicas hung (SIGSTOP: its NATS connection stays open, so the server
    keeps handing it requests) made about a quarter of the requests fail. A request it took went silent, and the one
    retry went to the queue group again, which drew the hung replica half the time. Now the retry goes to a replica
    answering $SRV.PING first, on its own subject: never to the hung one, under load or one request at a time.
    Streams waited for their first chunk for the whole request timeout; they now have heartbeats too."""
    prompts = [p.prompt for p in generate("test", 24, seed=11)]
    with Stack(tiny_family, tiers=("edge",), replicas={"edge": 2},
               overrides={"router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0}) as s:
        router = stub(s.port("router"))
        router.Infer(req(), timeout=TIMEOUT)
        hung = next(p.popen.pid for p in s.procs if p.name == "edge-1")
        os.kill(hung, signal.SIGSTOP)
        try:
            def one(prompt: str):
                try:
                    return router.Infer(req(prompt, max_tokens=8), timeout=TIMEOUT)
                except grpc.RpcError as exc:
                    return exc

            with ThreadPoolExecutor(8) as pool:  # under load: the healthy replica answers all the time
                answers = list(pool.map(one, prompts))
            answers += [one(p) for p in prompts[:12]]  # one at a time: no other answer to tell who is alive
            failed = [(a.code().name, a.details()) for a in answers if isinstance(a, grpc.RpcError)]
            assert not failed, failed
            for a in answers:  # a silent attempt is followed by an answer, never by a second silence
                assert [x.outcome for x in a.escalation_path] in (["answered"], ["timeout", "answered"]), a
            # streams too: a replica streaming says it is alive, so a hung one costs a second, not the request
            # timeout (nats.request_timeout_ms, 10 s: the client's 5 s deadline would pass)
            for prompt in prompts[:8]:
                last = list(router.InferStream(req(prompt, max_tokens=8), timeout=5))[-1]
                assert last.choices[0].finish_reason
                assert [x.outcome for x in last.escalation_path] in (["answered"], ["timeout", "answered"]), last
        finally:
            os.kill(hung, signal.SIGCONT)


def test_cloud_down_gives_degraded_answers_not_errors(tiny_family):
    with Stack(tiny_family, tiers=("edge", "cloud"),
               overrides={"router.confidence_threshold": {"edge": 1.0}, "router.device_complexity": 0.0,
                          "router.cloud_complexity": 1.0, "nats.request_timeout_ms": 3000}) as s:
        s.kill("cloud-0")
        resp = stub(s.port("router")).Infer(req(), timeout=TIMEOUT)
        assert resp.tier == "edge" and resp.degraded
        assert [a.outcome for a in resp.escalation_path] == ["low_confidence", "no_responders"]


def test_a_prompt_sent_straight_to_a_dead_cloud_falls_back_to_a_lower_tier(tiny_family):
    """Issue 21: the scorer sends a prompt to the cloud and the cloud has no responders: the edge answers, degraded."""
    with Stack(tiny_family, tiers=("edge", "cloud"),
               overrides={"router.cloud_complexity": 0.0, "router.device_complexity": 0.0,
                          "nats.request_timeout_ms": 3000}) as s:
        s.kill("cloud-0")
        resp = stub(s.port("router")).Infer(req("Q:2*9-1*5-7*1=?\nA:"), timeout=TIMEOUT)
        assert resp.tier == "edge" and resp.degraded
        assert [(a.tier, a.outcome) for a in resp.escalation_path] == [("cloud", "no_responders"), ("edge", "answered")]


def test_full_queue_is_resource_exhausted(tiny_family):
    with Stack(tiny_family, tiers=("edge",), router=False,
               overrides={"tiers.edge.batching": {"max_num_seqs": 1, "max_queue": 1}}) as s:
        edge = stub(s.port("edge-0"))

        def one(i):
            # a prompt of its own each: one prompt sent 16 times is answered from the edge's result cache as soon as
            # its first answer is done, so only the requests that came within that first answer's time (as long as
            # the tiny model's answer to it, which a rebuilt family may end early) could meet a full queue
            try:
                edge.Infer(req(f"Q:max(1,2,3,4,5,{i})=?\nA:", max_tokens=120), timeout=TIMEOUT)
                return "ok"
            except grpc.RpcError as exc:
                return exc.code()

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(one, range(16)))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert "ok" in codes


def test_wrong_nats_password_is_refused_clearly(tiny_family, tmp_path):
    from tierline_infra.supervisor import NatsServer

    nats = NatsServer(tmp_path).start()
    try:
        nats.password = "wrong-" + nats.password
        manifest = write_manifest(tmp_path / "m.yaml", tiny_family, nats, tiers=("edge",))
        cores = set(processes_with(lambda args: any(b"spawn_main" in a for a in args)))
        proc = subprocess.run([sys.executable, "-m", "edge_node", "--manifest", str(manifest)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert "refused the credentials" in proc.stderr
        # its engine core had loaded the model: it was stopped, and not started again as the process left
        for _ in range(20):
            assert not set(processes_with(lambda args: any(b"spawn_main" in a for a in args))) - cores
            time.sleep(0.1)
    finally:
        nats.stop()


def test_metrics_are_served(stack):
    from tests.conftest import scrape

    stub(stack.port("edge-0")).Infer(req("Q:min(3,8)=?\nA:"), timeout=TIMEOUT)
    stub(stack.port("router")).Infer(req("Q:min(5,8)=?\nA:"), timeout=TIMEOUT)
    edge, router = scrape(stack, "edge-0"), scrape(stack, "router")
    assert {"tierline_time_to_first_token_seconds_bucket", "tierline_batch_size_bucket",
            "tierline_result_cache_queries_total", "tierline_num_requests_waiting"} <= edge.names()
    assert edge.value("tierline_requests_total", tier="edge", outcome="answered") >= 1
    assert {"tierline_router_escalations_total", "tierline_router_e2e_request_latency_seconds_bucket"} <= router.names()



def test_router_refuses_a_scorer_trained_for_other_models(tiny_family, tmp_path):
    from tests.conftest import ROOT
    from tierline_infra.supervisor import NatsServer

    nats = NatsServer(tmp_path).start()
    try:
        other = ROOT / "models" / "router" / "scorer.json"  # the default family's scorer, not the tiny one's
        manifest = write_manifest(tmp_path / "m.yaml", tiny_family, nats, overrides={"router.scorer": str(other)})
        proc = subprocess.run([sys.executable, "-m", "router", "--manifest", str(manifest)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert "scorer.json" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        nats.stop()


def _with_context(tmp_path: Path, tier: str, context: int) -> Path:
    """The committed family, `tier`'s model given another context (its config, and its hash in the index)."""
    from tests.conftest import COMMITTED_MODELS

    models = tmp_path / "models"
    shutil.copytree(COMMITTED_MODELS, models)
    config = models / tier / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": context}, indent=2))
    index = json.loads((models / "manifest.json").read_text())
    entry = index["artifacts"][tier]["config"]
    entry["sha256"], entry["bytes"] = hashlib.sha256(config.read_bytes()).hexdigest(), config.stat().st_size
    (models / "manifest.json").write_text(json.dumps(index, indent=2))
    return models


def test_a_request_too_long_for_one_tier_goes_up_to_one_whose_context_fits_it(tmp_path):
    """Tiers differ in context: the router admits what its largest tier serves, so a tier with a shorter one
    refuses (INVALID_ARGUMENT) and the request goes on up, unary and streamed; what no tier serves is refused
    with the top tier's words."""
    models = _with_context(tmp_path, "edge", 128)
    with Stack(models, tiers=("edge", "cloud"), overrides={"router.scorer": "", "router.device_complexity": 0.0,
                                                           "router.cloud_complexity": 1.0,
                                                           "router.confidence_threshold": {"edge": 0.0}}) as s:
        router = stub(s.port("router"))
        assert router.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT).max_context == 256
        long = req(max_tokens=150)
        resp = router.Infer(long, timeout=TIMEOUT)
        assert resp.tier == "cloud" and [(a.tier, a.outcome) for a in resp.escalation_path] == [
            ("edge", "refused"), ("cloud", "answered")]
        chunks = list(router.InferStream(long, timeout=TIMEOUT))
        assert chunks[-1].tier == "cloud" and chunks[-1].choices[0].finish_reason
        with pytest.raises(grpc.RpcError) as err:
            router.Infer(req(max_tokens=250, attention_window=0), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "256" in err.value.details()


def test_what_only_the_boards_model_cannot_serve_goes_up_from_its_front_door(tmp_path):
    """An app on the board asks for more than the board's model holds: its front door sends it to the edge (its
    model given a context of 512 here; the board's .tflite is built for 256)."""
    models = _with_context(tmp_path, "edge", 512)
    with Stack(models, tiers=("device", "edge"), router=False,
               overrides={"router.device_complexity": 1.0, "router.confidence_threshold": {"device": 0.0}}) as s:
        board = stub(s.port("device-0"))
        assert board.Infer(req(), timeout=TIMEOUT).tier == "device"  # what it can serve stays on the board
        resp = board.Infer(req(max_tokens=300), timeout=TIMEOUT)
        assert resp.tier == "edge" and [(a.tier, a.outcome) for a in resp.escalation_path] == [
            ("device", "refused"), ("edge", "answered")]
