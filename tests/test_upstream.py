"""The cloud tier forwarding to a serving engine the user already runs (issue 25): a real `transformers serve`
on the committed cloud checkpoint behind a real cloud tier process, asked over gRPC, streamed, and through
the router (gRPC and its OpenAI HTTP API); then the upstream goes away."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import openai
import pytest

from tests.conftest import COMMITTED_MODELS, scrape
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_bench.transformers_peer import TransformersServe, available
from tierline_cloud_node.engine import load_engine
from tierline_infra.supervisor import Stack
from tierline_shared.runtime.engine import GenerationParams

TIMEOUT = 60
PROMPTS = ["Q:2+3=?\nA:", "Q:a=4;b=a*2;b=?\nA:", "Q:7-5=?\nA:"]
HARD = "Q:" + "+".join("1" * 14) + "=?\nA:"  # complexity 1.0: the cloud's
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    reason = available(COMMITTED_MODELS)
    if reason:
        pytest.fail(f"transformers serve cannot serve the committed cloud checkpoint: {reason}")
    with TransformersServe(COMMITTED_MODELS, tmp_path_factory.mktemp("ts"), threads=1) as ts:
        yield ts


def _req(prompt: str) -> pb.InferRequest:
    return pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=MAX_TOKENS))


def test_the_cloud_tier_forwards_to_transformers_serve(upstream):
    overrides = {"tiers.cloud.upstream": {"url": f"http://127.0.0.1:{upstream.port}/v1",
                                          "model": str(upstream.checkpoint), "retries": 1},
                 "router.scorer": "", "router.cloud_complexity": 0.9, "router.device_complexity": 0.0,
                 "router.confidence_threshold": {"edge": 0.0}}
    local = load_engine(COMMITTED_MODELS, threads=1)  # the same checkpoint, decoded here: the reference
    with Stack(COMMITTED_MODELS, tiers=("edge", "cloud"), overrides=overrides) as s:
        cloud = pb_grpc.InferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.port('cloud-0')}"))
        for prompt in PROMPTS:
            want = local.generate(prompt, GenerationParams(max_tokens=MAX_TOKENS)).text
            got = cloud.Infer(_req(prompt), timeout=TIMEOUT)
            assert got.choices[0].text == want, (prompt, got.choices[0].text, want)
            assert got.tier == "cloud" and got.model_version.startswith("upstream:")
            assert got.usage.completion_tokens > 0 and got.usage.prompt_tokens > 0
            streamed = list(cloud.InferStream(_req(prompt), timeout=TIMEOUT))
            assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason
            # its stream says its usage only when asked (stream_options.include_usage): what quotas count
            assert streamed[-1].usage.completion_tokens == got.usage.completion_tokens > 0
            assert streamed[-1].usage.prompt_tokens == got.usage.prompt_tokens > 0
        info = cloud.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT)
        assert info.model_version == f"upstream:{upstream.checkpoint}"
        with pytest.raises(grpc.RpcError) as err:  # not something an OpenAI completions server does
            cloud.Infer(pb.InferRequest(prompt=PROMPTS[0], parameters=pb.Parameters(attention_window=4)),
                        timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        router = pb_grpc.InferenceServiceStub(grpc.insecure_channel(s.router_address))
        assert router.Infer(_req(HARD), timeout=TIMEOUT).tier == "cloud"  # through NATS to the forwarder
        assert scrape(s, "cloud-0").value("tierline_requests_total", tier="cloud", outcome="answered") >= 1

        # transformers serve computes no logprobs: asked for, they are refused naming the parameter (an empty list
        # would read as no tokens), whole or streamed, over gRPC and as OpenAI's 400 through the router
        asked = _req(PROMPTS[1])
        asked.parameters.logprobs = True
        for call in (cloud.Infer, lambda req, timeout: list(cloud.InferStream(req, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as err:
                call(asked, timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("parameters.logprobs: "), err.value.details()
        api = openai.OpenAI(api_key="unused", base_url=s.http_base_url, max_retries=0, timeout=TIMEOUT)
        model = api.models.list().data[0].id
        for stream in (False, True):  # a prompt the cloud answers first (none lower is asked for a refusal)
            with pytest.raises(openai.BadRequestError) as err:
                answer = api.completions.create(model=model, prompt=HARD.replace("1", "3"), max_tokens=MAX_TOKENS,
                                                logprobs=0, stream=stream)
                if stream:
                    list(answer)
            assert err.value.body["param"] == "logprobs", err.value.body

        upstream.stop()  # the serving engine goes away: the tier says so at once, the router falls back
        with pytest.raises(grpc.RpcError) as err:  # (prompts not asked before: the tier's result cache has those)
            cloud.Infer(_req("Q:9-4=?\nA:"), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "did not answer" in err.value.details()
        fallback = router.Infer(_req(HARD.replace("1", "2")), timeout=TIMEOUT)
        assert fallback.degraded and fallback.tier == "edge"


def _answering(status: int) -> ThreadingHTTPServer:
    """An OpenAI-compatible server that answers every request with `status` and OpenAI's error body: the
    upstream engine a user runs, rate limiting (429) or refusing the tier's key (401)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = json.dumps({"error": {"message": f"upstream says {status}"}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status", [429, 401])
def test_an_upstream_that_is_busy_or_refuses_the_tiers_key_fails_the_tier_not_the_request(status):
    """Neither is the client's fault: the router falls back to the edge (a prompt that starts on the cloud) or
    keeps the edge's answer it escalated, degraded, as when the upstream is down."""
    server = _answering(status)
    overrides = {"tiers.cloud.upstream": {"url": f"http://127.0.0.1:{server.server_port}/v1", "retries": 0},
                 "router.scorer": "", "router.cloud_complexity": 0.9, "router.device_complexity": 0.0,
                 "router.confidence_threshold": {"edge": 1.0}}  # every edge answer goes on to the cloud
    try:
        with Stack(COMMITTED_MODELS, tiers=("edge", "cloud"), overrides=overrides) as s:
            router = pb_grpc.InferenceServiceStub(grpc.insecure_channel(s.router_address))
            for prompt in (HARD, PROMPTS[0]):
                resp = router.Infer(_req(prompt), timeout=TIMEOUT)
                assert resp.tier == "edge" and resp.degraded, prompt
                cloud = [a for a in resp.escalation_path if a.tier == "cloud"]
                assert cloud[-1].outcome == "error" and f"HTTP {status}" in cloud[-1].detail, cloud
    finally:
        server.shutdown()
