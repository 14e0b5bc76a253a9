"""Hostile input and faults against the running platform (issue 21): one bad request never harms another."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack
from tierline_shared.serving.servicer import MAX_OPEN_STREAMS, STALLED_STREAM_S

TIMEOUT = 30
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256)]  # a client that barely reads


def stub(address: str, options=None) -> pb_grpc.InferenceServiceStub:
    channel = grpc.insecure_channel(address, options=options)
    grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    return pb_grpc.InferenceServiceStub(channel)


def req(prompt: str = "Q:2+3=?\nA:", **params) -> pb.InferRequest:
    return pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=params.pop("max_tokens", 8), **params))


@pytest.fixture(scope="module")
def stack(tiny_family):
    # every prompt starts on the edge and stays there; the result caches are off so that every request decodes
    with Stack(tiny_family, tiers=("edge", "cloud"),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                          "tiers.cloud.cache_size": 0}) as s:
        yield s


def test_hostile_parameters_are_refused_and_harm_no_other_request(stack):
    """16 innocent requests and the inputs that used to break their batch, all at once through the router."""
    router = stub(stack.router_address)
    hostile = {"negative seed": req(temperature=0.5, seed=-1), "tiny temperature": req(temperature=1e-45),
               "NaN top_p": req(temperature=0.5, top_p=float("nan")), "five stops": req(stop=["a"] * 5),
               "long stop": req(stop=["x" * 65]), "long request id": pb.InferRequest(prompt="Q:1+1=?\nA:",
                                                                                    request_id="r" * 129)}
    innocent = [req(f"Q:{i}+{i}=?\nA:") for i in range(16)]

    def call(r):
        try:
            return router.Infer(r, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return exc

    with ThreadPoolExecutor(24) as pool:
        bad = dict(zip(hostile, pool.map(call, hostile.values())))
        good = list(pool.map(call, innocent + [req(attention_window=1)]))
    for name, outcome in bad.items():
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    fields = {name: outcome.details().split(":")[0] for name, outcome in bad.items()}
    assert fields == {"negative seed": "parameters.seed", "tiny temperature": "parameters.temperature",
                      "NaN top_p": "parameters.top_p", "five stops": "parameters.stop",
                      "long stop": "parameters.stop", "long request id": "request_id"}
    assert all(isinstance(r, pb.InferResponse) and r.choices[0].finish_reason for r in good)  # window 1 too


def test_streams_that_are_never_read_cannot_starve_a_tier(stack):
    """Streams a client does not read hold a tier's gRPC threads (flow control blocks their sends): at most
    MAX_OPEN_STREAMS are open, the rest are refused at once, unary calls go on, and a stalled stream is cancelled."""
    edge = f"127.0.0.1:{stack.port('edge-0')}"
    slow = stub(edge, SLOW_READER)
    calls = [slow.InferStream(req(f"Q:{i}+{i}*3-2=?\nA:", max_tokens=96)) for i in range(3 * MAX_OPEN_STREAMS)]
    time.sleep(2)
    fast = stub(edge)
    t0 = time.monotonic()
    for k in range(3):  # served at once, not after the streams' deadlines
        assert fast.Infer(req(f"Q:{k}+1=?\nA:"), timeout=5).choices[0].finish_reason
    assert time.monotonic() - t0 < 5
    refused = 0
    for call in calls[MAX_OPEN_STREAMS:]:
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        refused += err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused == 2 * MAX_OPEN_STREAMS
    time.sleep(STALLED_STREAM_S * 1.5)  # the open ones stalled: cancelled, their threads and slots freed
    chunks = list(fast.InferStream(req(max_tokens=4), timeout=TIMEOUT))
    assert chunks[-1].choices[0].finish_reason
    cancelled = 0
    for call in calls[:MAX_OPEN_STREAMS]:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            cancelled += exc.code() == grpc.StatusCode.CANCELLED
    assert cancelled > 0
