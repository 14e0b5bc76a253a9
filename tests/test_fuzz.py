"""Fuzzing the running platform (issue 21): random requests, raw bytes, malformed HTTP; only documented answers.

The router (gRPC and HTTP) and a tier (gRPC) of a real platform get random InferRequests, random bytes and
random or broken HTTP bodies and headers. Every answer must be a documented one (gRPC: OK, INVALID_ARGUMENT,
UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE with a reason; HTTP: 2xx
or 4xx with an OpenAI error body), never INTERNAL, UNKNOWN or a 5xx, and every process must still be alive and
serving afterwards. `make test` runs a few hundred cases per target (HYPOTHESIS_PROFILE=ci, the default);
`make fuzz` runs the long profile (HYPOTHESIS_PROFILE=fuzz, 2,500 per target, 10,000 in all) and writes the
counts of every status to runs/fuzz.json.
"""

from __future__ import annotations

import http.client
import json
import os
from collections import Counter
from urllib.parse import urlsplit

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack

CASES = {"ci": 150, "fuzz": 2500}
settings.register_profile("ci", max_examples=CASES["ci"], deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=CASES["fuzz"], deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
TIMEOUT = 30
GRPC_OK = {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
           "DEADLINE_EXCEEDED", "UNAVAILABLE"}
SEEN: dict[str, Counter] = {}  # target -> status -> count (written by make fuzz)
INT32, INT64 = 2**31 - 1, 2**63 - 1

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["Q:2+3=?\nA:", "Q:a=3;b=a+4;b=?\nA:", "", "Q:" + "9" * 300 + "+1=?\nA:", "\x00", "Q:\u00e9\u4e2d=?\nA:"])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-45, 0.01, 1.0, -0.5])
parameters = st.builds(
    pb.Parameters, temperature=floats, top_p=st.none() | floats, max_tokens=st.none() | st.integers(-5, 300),
    attention_window=st.integers(-3, 300) | st.integers(-2**31, INT32), stop=st.lists(texts, max_size=6),
    seed=st.none() | st.integers(-2**63, INT64))
models = st.sampled_from(["", "tierline-reasoner", "other", "m" * 200])
anything = st.builds(pb.InferRequest, prompt=texts, model=models, parameters=parameters, priority=st.integers(0, 3),
                     request_id=st.text(max_size=200), draft=texts)
# a valid request with one field made hostile: most cases then reach a model, where the harm would be
valid = st.builds(lambda a, b, n, t: pb.InferRequest(prompt=f"Q:{a}+{b}=?\nA:", parameters=pb.Parameters(
    max_tokens=n, temperature=t)), st.integers(0, 99), st.integers(0, 99), st.integers(1, 32),
    st.sampled_from([0.0, 0.7]))


@st.composite
def one_field_off(draw) -> pb.InferRequest:
    req, other = draw(valid), draw(anything)
    field = draw(st.sampled_from(["prompt", "model", "priority", "request_id", "temperature", "top_p", "max_tokens",
                                  "attention_window", "stop", "seed", "draft"]))
    if hasattr(req, field):
        setattr(req, field, getattr(other, field))
    elif field == "stop":
        req.parameters.stop.extend(other.parameters.stop)
    elif other.parameters.HasField(field) if field in ("top_p", "max_tokens", "seed") else True:
        setattr(req.parameters, field, getattr(other.parameters, field))
    return req


requests = valid | one_field_off() | anything
json_values = st.recursive(st.none() | st.booleans() | st.integers() | floats.filter(lambda f: f == f) | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=12)
bodies = st.dictionaries(st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p",
                                          "stop", "seed", "n", "stream", "attention_window", "user", "logprobs"])
                         | texts, json_values, max_size=8)


@pytest.fixture(scope="module")
def stack(tiny_family):
    with Stack(tiny_family, tiers=("edge", "cloud"), auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 0.9,
                          "router.confidence_threshold": {"edge": 0.3}}) as s:
        yield s
        for p in s.procs:  # after every target: every process alive and serving
            assert p.popen.poll() is None, f"{p.name} died"
        resp = pb_grpc.InferenceServiceStub(grpc.insecure_channel(s.router_address)).Infer(
            pb.InferRequest(prompt="Q:2+3=?\nA:"), timeout=TIMEOUT,
            metadata=(("authorization", f"Bearer {s.api_key}"),))
        assert resp.choices[0].finish_reason
    if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz":
        out = ROOT / "runs" / "fuzz.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({t: dict(c) for t, c in SEEN.items()}, indent=2) + "\n")


def _record(target: str, status: str) -> None:
    SEEN.setdefault(target, Counter())[status] += 1


def _grpc_outcome(target: str, call) -> None:
    try:
        call()
        status = "OK"
    except grpc.RpcError as exc:
        status = exc.code().name
        assert status in GRPC_OK, (status, exc.details())
        assert exc.details() and "Traceback" not in exc.details(), exc.details()
        if status == "UNAVAILABLE":
            assert "no tier could answer" in exc.details() or "shutting down" in exc.details(), exc.details()
    _record(target, status)


def _channel(address: str):
    return grpc.insecure_channel(address)


@given(request=requests)
def test_random_requests_to_the_router(stack, request):
    stub = pb_grpc.InferenceServiceStub(_channel(stack.router_address))
    _grpc_outcome("router_grpc", lambda: stub.Infer(request, timeout=TIMEOUT,
                                                    metadata=(("authorization", f"Bearer {stack.api_key}"),)))


@given(request=requests)
def test_random_requests_to_a_tier(stack, request):
    stub = pb_grpc.InferenceServiceStub(_channel(f"127.0.0.1:{stack.port('edge-0')}"))
    _grpc_outcome("edge_grpc", lambda: stub.Infer(request, timeout=TIMEOUT))


@given(data=st.binary(max_size=300), to_tier=st.booleans())
def test_random_bytes(stack, data, to_tier):
    address = f"127.0.0.1:{stack.port('edge-0')}" if to_tier else stack.router_address
    raw = _channel(address).unary_unary("/tierline.v1.InferenceService/Infer")
    _grpc_outcome("raw_bytes", lambda: raw(data, timeout=TIMEOUT,
                                           metadata=(("authorization", f"Bearer {stack.api_key}"),)))


@given(body=bodies | json_values, raw=st.none() | st.binary(max_size=200),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nothing"]),
       content_type=st.sampled_from(["application/json", "application/json; charset=nope-42", "text/plain",
                                     "application/json; charset=latin-1"]),
       auth=st.sampled_from(["key", "none", "garbage", "nonutf8"]))
def test_random_http(stack, body, raw, path, content_type, auth):
    url = urlsplit(stack.http_base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.putrequest("POST" if path != "/v1/models" else "GET", path)
    conn.putheader("content-type", content_type)
    conn.putheader("content-length", str(len(data)))
    header = {"key": f"Bearer {stack.api_key}".encode(), "none": None, "garbage": b"Bearer tl_x_y",
              "nonutf8": b"Bearer \xff\xfe"}[auth]
    if header is not None:
        conn.putheader("authorization", header)
    conn.endheaders(data)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    assert resp.status < 500, (resp.status, text[:300])
    if resp.status >= 400:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, text[:300]
    _record("http", str(resp.status))

