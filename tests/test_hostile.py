"""Hostile input and faults against the running platform (issue 21): one bad request never harms another."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack
from tierline_shared.config.manifest import LimitsConfig
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
    with Stack(tiny_family, tiers=("edge", "cloud"), auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                          "tiers.cloud.cache_size": 0}) as s:
        yield s


def keyed(stack) -> tuple:
    return (("authorization", f"Bearer {stack.api_key}"),)


def test_hostile_parameters_are_refused_and_harm_no_other_request(stack):
    """16 innocent requests and the inputs that used to break their batch, all at once through the router."""
    router = stub(stack.router_address)
    hostile = {"negative seed": req(temperature=0.5, seed=-1), "tiny temperature": req(temperature=1e-45),
               "NaN top_p": req(temperature=0.5, top_p=float("nan")), "five stops": req(stop=["a"] * 5),
               "long stop": req(stop=["x" * 65]), "long request id": pb.InferRequest(prompt="Q:1+1=?\nA:",
                                                                                    request_id="r" * 129),
               "long draft": pb.InferRequest(prompt="Q:1+1=?\nA:", draft="2" * (LimitsConfig().max_prompt_chars + 1))}
    innocent = [req(f"Q:{i}+{i}=?\nA:") for i in range(16)]

    def call(r):
        try:
            return router.Infer(r, timeout=TIMEOUT, metadata=keyed(stack))
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
                      "long stop": "parameters.stop", "long request id": "request_id", "long draft": "draft"}
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
    open_, refused = [], 0  # which calls got a slot is the server's order of arrival, not the list's
    for call in calls:
        try:
            next(call)
            open_.append(call)
        except grpc.RpcError as err:
            refused += err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused == 2 * MAX_OPEN_STREAMS and len(open_) == MAX_OPEN_STREAMS
    time.sleep(STALLED_STREAM_S * 1.5)  # the open ones stalled: cancelled, their threads and slots freed
    chunks = list(fast.InferStream(req(max_tokens=4), timeout=TIMEOUT))
    assert chunks[-1].choices[0].finish_reason
    cancelled = 0
    for call in open_:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            cancelled += exc.code() == grpc.StatusCode.CANCELLED
    assert cancelled > 0


def test_a_replica_killed_mid_request_costs_about_a_second_not_the_timeout(tiny_family):
    """SIGKILL one of two edge replicas under load (`tierline bench --failover`): the requests it held are answered
    by the other one after it falls silent (SILENCE_S), far inside the 20 s request timeout, and none fails."""
    from tierline_bench.reliability import failover

    result = failover(tiny_family, clients=8, before_s=2.0, after_s=3.0)
    assert result["failed"] == 0 and result["in_flight_at_kill"] > 0, result
    assert result["in_flight_latency_s"]["max"] < result["silence_s"] + 3.0 < result["request_timeout_s"], result


def test_a_replica_stopped_mid_request_hands_its_requests_to_the_other_at_once(tiny_family):
    """SIGTERM one of two edge replicas under load (an upgrade, a scale down): the requests it held end with
    UNAVAILABLE at once ("the tier is shutting down"), which the router asks another replica of the same tier:
    none fails (before, the edge-only router had no tier above to escalate to), none waits for a silence."""
    import signal

    from tierline_bench.reliability import failover

    result = failover(tiny_family, clients=8, before_s=2.0, after_s=3.0, sig=signal.SIGTERM)
    assert result["failed"] == 0 and result["in_flight_at_kill"] > 0, result
    assert result["in_flight_latency_s"]["max"] < result["silence_s"], result


def test_a_replica_stopped_with_requests_in_flight_finishes_them_in_its_grace(tiny_family):
    """SIGTERM the only edge replica (a rolling upgrade) while a request and a stream are in its batch: it takes no
    new request but finishes those in flight (tiers.edge.stop_grace_s), which reach their clients whole, and exits
    once they are answered, not at the end of the grace. Before, both ended UNAVAILABLE at once, the stream after
    its first chunks (no one can retry it then), and with no other replica the request failed too. The engine
    core is held (SIGSTOP) so that both are still running when the SIGTERM comes."""
    import os
    import signal
    import threading

    import psutil

    with Stack(tiny_family, tiers=("edge",),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                          "tiers.edge.stop_grace_s": 20}) as s:
        router = stub(s.router_address)
        prompts = ["Q:2+3=?\nA:", "Q:7+8=?\nA:"]
        want = [router.Infer(req(p, max_tokens=16), timeout=TIMEOUT).choices[0].text for p in prompts]
        edge = next(p for p in s.procs if p.name == "edge-0")
        core = max(psutil.Process(edge.popen.pid).children(recursive=True), key=lambda c: c.memory_info().rss)
        core.suspend()
        try:
            with ThreadPoolExecutor(2) as pool:
                unary = pool.submit(router.Infer, req(prompts[0], max_tokens=16), timeout=TIMEOUT)
                stream = pool.submit(lambda: "".join(c.choices[0].text for c in router.InferStream(
                    req(prompts[1], max_tokens=16), timeout=TIMEOUT)))
                time.sleep(0.5)  # both are in the tier, waiting on its engine core
                t0 = time.monotonic()
                stopping = threading.Thread(target=s.kill, args=("edge-0", signal.SIGTERM))
                stopping.start()
                time.sleep(0.5)
                assert edge.popen.poll() is None and not unary.done() and not stream.done()
                core.resume()
                assert unary.result(timeout=TIMEOUT).choices[0].text == want[0]
                assert stream.result(timeout=TIMEOUT) == want[1]
                stopping.join(TIMEOUT)
                assert edge.popen.poll() is not None and time.monotonic() - t0 < 10, time.monotonic() - t0
        finally:
            if core.is_running():
                os.kill(core.pid, signal.SIGCONT)


def test_stopping_the_platform_lets_each_tier_finish_its_requests(tiny_family):
    """Stopping the whole platform (`tierline up`'s Ctrl-C, `make down`: `Stack.stop`) gives each tier its grace:
    a request in the edge's batch when the stop comes is answered whole. Before, the supervisor sent each process
    a second SIGTERM as it waited for it, which now ends a tier's grace at once. Asked on the edge's own gRPC
    port (the router stops with the rest); its engine core is held (SIGSTOP) until the stop has begun."""
    import os
    import signal
    import threading

    import psutil

    with Stack(tiny_family, tiers=("edge",),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                          "tiers.edge.stop_grace_s": 20}) as s:
        edge_door = stub(f"127.0.0.1:{s.port('edge-0')}")
        want = edge_door.Infer(req(max_tokens=16), timeout=TIMEOUT).choices[0].text
        edge = next(p for p in s.procs if p.name == "edge-0")
        core = max(psutil.Process(edge.popen.pid).children(recursive=True), key=lambda c: c.memory_info().rss)
        core.suspend()
        try:
            with ThreadPoolExecutor(1) as pool:
                asked = pool.submit(edge_door.Infer, req(max_tokens=16), timeout=TIMEOUT)
                time.sleep(0.5)  # in the tier, waiting on its engine core
                stopping = threading.Thread(target=s.stop)
                stopping.start()
                time.sleep(1.5)  # past the supervisor's first look at the process
                assert edge.popen.poll() is None and not asked.done()
                core.resume()
                assert asked.result(timeout=TIMEOUT).choices[0].text == want
                stopping.join(TIMEOUT)
        finally:
            if core.is_running():
                os.kill(core.pid, signal.SIGCONT)


def test_a_second_sigterm_ends_the_grace_at_once(tiny_family):
    """An operator who will not wait (a second Ctrl-C, a second SIGTERM): the tier stops now instead of at the end
    of its grace (20 s here), and what it still held ends with an error at once, through both doors (a request
    over NATS from the router, a stream on its own gRPC port), not at the grace's end. Its engine core is held
    (SIGSTOP) so that both are still running. Before, a second signal did nothing: 20 s."""
    import os
    import signal

    import psutil

    with Stack(tiny_family, tiers=("edge",),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                          "tiers.edge.stop_grace_s": 20}) as s:
        router, edge_door = stub(s.router_address), stub(f"127.0.0.1:{s.port('edge-0')}")
        assert router.Infer(req(max_tokens=4), timeout=TIMEOUT).choices[0].text  # warm
        edge = next(p for p in s.procs if p.name == "edge-0")
        core = max(psutil.Process(edge.popen.pid).children(recursive=True), key=lambda c: c.memory_info().rss)
        core.suspend()

        def ended(call) -> tuple[str, float]:
            try:
                call()
                return "answered", time.monotonic()
            except grpc.RpcError as exc:
                return exc.code().name, time.monotonic()

        try:
            with ThreadPoolExecutor(2) as pool:
                unary = pool.submit(ended, lambda: router.Infer(req(max_tokens=16), timeout=TIMEOUT))
                stream = pool.submit(ended, lambda: list(edge_door.InferStream(req("Q:7+8=?\nA:", max_tokens=16),
                                                                               timeout=TIMEOUT)))
                time.sleep(0.5)  # both are in the tier, waiting on its engine core
                os.killpg(edge.popen.pid, signal.SIGTERM)
                time.sleep(1.0)
                assert edge.popen.poll() is None and not unary.done() and not stream.done()  # in its grace
                t0 = time.monotonic()
                s.hurry()  # what a second Ctrl-C of `tierline up` does: a second SIGTERM to every process
                outcomes = [unary.result(timeout=TIMEOUT), stream.result(timeout=TIMEOUT)]
                core.resume()  # its close then takes no time
                edge.popen.wait(timeout=TIMEOUT)
                stopped_after = time.monotonic() - t0
        finally:
            if core.is_running():
                os.kill(core.pid, signal.SIGCONT)
    assert all(what != "answered" and at - t0 < 5 for what, at in outcomes), outcomes
    assert stopped_after < 8, stopped_after


def test_a_restarted_nats_server_loses_no_request(tiny_family):
    """nats-server killed and started again on its port under load: every request is answered (after the
    reconnect), none is failed for the silence of a link that was down on the router's side too. Through the
    SDK, as users call: the moment after the router's reconnect and before a tier's, the tier has no responders
    (UNAVAILABLE), which the SDK retries with backoff."""
    from tierline import InferenceClient, TierlineError

    with Stack(tiny_family, tiers=("edge",),
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "tiers.edge.cache_size": 0,
                          "nats.request_timeout_ms": 20000}) as s:
        sdk = InferenceClient(api_key="", endpoint=s.router_address, timeout=TIMEOUT)
        stop_at = time.monotonic() + 8.0

        def client(c: int) -> list[str]:
            out, i = [], 0
            while time.monotonic() < stop_at:
                try:
                    sdk.infer(f"Q:{c}+{i % 50}=?\nA:", {"max_tokens": 32})
                    out.append("OK")
                except TierlineError as exc:
                    out.append(f"{exc.code.name}: {exc.message}")
                i += 1
            return out

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(client, c) for c in range(4)]
            time.sleep(2.0)
            s.nats.stop()
            time.sleep(1.5)  # longer than a replica's silence
            s.nats.start()
            results = [r for f in running for r in f.result()]
    assert results and set(results) == {"OK"}, [r for r in results if r != "OK"][:5]


def test_bytes_that_are_not_a_request_are_invalid_argument(stack):
    """Malformed protobuf: INVALID_ARGUMENT naming the message, from the router (gRPC) and a tier (gRPC, NATS)."""
    import asyncio

    from tierline_shared.transport.messaging import ERROR_CODE_HEADER, STATUS_HEADER, connect, subject

    garbage = b"\xff\xff\xff\x7f\x0a\x05"
    for address in (stack.router_address, f"127.0.0.1:{stack.port('edge-0')}"):
        raw = grpc.insecure_channel(address).unary_unary("/tierline.v1.InferenceService/Infer")
        with pytest.raises(grpc.RpcError) as err:
            raw(garbage, timeout=TIMEOUT, metadata=keyed(stack))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, address
        assert err.value.details() == "request: not a valid tierline.v1.InferRequest (protobuf)"

    async def over_nats():
        nc = await connect(stack.nats_options(), "test")
        try:
            return await nc.request(subject("edge"), garbage, timeout=TIMEOUT)
        finally:
            await nc.close()

    reply = asyncio.run(over_nats())
    assert ERROR_CODE_HEADER in reply.headers and reply.headers[STATUS_HEADER] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("method, message, kind", [
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest", "unary_stream"),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "grpc.reflection.v1alpha.ServerReflectionRequest",
     "stream_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
     "grpc.reflection.v1alpha.ServerReflectionRequest", "stream_stream"),
])
def test_bytes_that_are_not_a_health_or_reflection_request_are_invalid_argument(stack, method, message, kind):
    """Found by a fault hunt: health and reflection answered malformed protobuf with UNKNOWN (the router) or
    INTERNAL (a tier), where the InferenceService answers INVALID_ARGUMENT naming the message. They are now
    parsed as leniently, on the router's grpc.aio server and a tier's grpc server alike."""
    garbage = b"\xff\xff\xff\x7f\x0a\x05"
    for address in (stack.router_address, f"127.0.0.1:{stack.port('edge-0')}"):
        call = getattr(grpc.insecure_channel(address), kind)(method)
        with pytest.raises(grpc.RpcError) as err:
            if kind == "unary_unary":
                call(garbage, timeout=TIMEOUT)
            else:
                list(call(iter([garbage]) if kind == "stream_stream" else garbage, timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (address, err.value)
        assert err.value.details() == f"request: not a valid {message} (protobuf)", address


def test_a_health_watch_answers_serving_on_the_router_and_a_tier(stack):
    """Found by a review: registered leniently, grpc.aio's health Watch (a coroutine writing with context.write, not
    an async generator) failed every call on the router with UNKNOWN."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for address in (stack.router_address, f"127.0.0.1:{stack.port('edge-0')}"):
        watch = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Watch(
            health_pb2.HealthCheckRequest(service="tierline.v1.InferenceService"), timeout=TIMEOUT)
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING, address
        finally:
            watch.cancel()


def test_a_prompt_with_a_huge_number_is_scored_and_answered(stack):
    """A number of 400 digits used to overflow the learned scorer's features (UNKNOWN)."""
    router = stub(stack.router_address)
    resp = router.Infer(req("Q:" + "9" * 400 + "+1=?\nA:"), timeout=TIMEOUT, metadata=keyed(stack))
    assert resp.choices[0].finish_reason


@pytest.mark.parametrize("body, content_type, param", [
    ({"max_tokens": 2**31}, None, "max_tokens"),
    ({"seed": 2**64}, None, "seed"),
    ({"attention_window": 2**40}, None, "attention_window"),
    ({"temperature": 10**400}, None, "temperature"),
    ({"stop": ["a"] * 5}, None, "stop"),
    ("[" * 100_000 + "]" * 100_000, None, None),
    # valid JSON whose \ud800 escapes spell a lone surrogate: no UTF-8, no protobuf string, no token
    ('{"model": "tierline-reasoner", "prompt": "Q:\\ud800=?\\nA:"}', None, "prompt"),
    ('{"model": "tierline-reasoner", "prompt": "Q:1+1=?\\nA:", "stop": ["a", "\\udfff"]}', None, "stop.1"),
    ('{"model": "\\udfff", "prompt": "Q:1+1=?\\nA:"}', None, "model"),
    ({}, "application/json; charset=nope-42", None),
])
def test_malformed_http_requests_are_4xx_json(stack, body, content_type, param):
    import json
    import urllib.error
    import urllib.request

    if isinstance(body, dict):
        body = json.dumps({"model": "tierline-reasoner", "prompt": "Q:1+1=?\nA:", **body})
    request = urllib.request.Request(f"{stack.http_base_url}/completions", data=body.encode(), headers={
        "content-type": content_type or "application/json", "authorization": f"Bearer {stack.api_key}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    error = json.loads(err.value.read())["error"]
    assert err.value.code == 400 and set(error) == {"message", "type", "param", "code"}, error
    assert param is None or param in (error["param"] or error["message"]), error


def _post(stack, path: str, data: bytes, **headers) -> tuple[int, dict]:
    import http.client
    import json
    from urllib.parse import urlsplit

    url = urlsplit(stack.http_base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    conn.request("POST", path, body=data, headers={"content-type": "application/json",
                                                    "authorization": f"Bearer {stack.api_key}", **headers})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    return resp.status, out


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(stack, encoding):
    import gzip
    import json
    import zlib

    body = json.dumps({"model": "tierline-reasoner", "prompt": "Q:1+1=?\nA:", "max_tokens": 2}).encode()
    status, out = _post(stack, "/v1/completions", b"not compressed at all", **{"content-encoding": encoding})
    assert status == 400 and out["error"]["code"] == "invalid_argument", out
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert _post(stack, "/v1/completions", packed, **{"content-encoding": encoding})[0] == 200


def test_a_lone_surrogate_in_a_chat_message_is_a_400_naming_the_message(stack):
    data = b'{"model": "tierline-reasoner", "messages": [{"role": "user", "content": "2+\\ud800=?"}]}'
    status, out = _post(stack, "/v1/chat/completions", data)
    assert status == 400 and out["error"]["param"] == "messages.0.content", out


def test_a_non_utf8_authorization_header_is_401_and_an_unknown_path_a_json_404(stack):
    import http.client
    import json
    from urllib.parse import urlsplit

    url = urlsplit(stack.http_base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    conn.putrequest("GET", "/v1/models")
    conn.putheader("Authorization", b"Bearer \xff\xfe\x80")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["error"]["type"] == "authentication_error"
    conn.request("GET", "/v1/no-such-path")  # (/health is a real path since issue 26)
    resp = conn.getresponse()
    assert resp.status == 404 and "error" in json.loads(resp.read())


def test_slow_and_endless_http_clients_cannot_hold_the_router(tiny_family):
    """Found by a fault hunt: connections that never finish their request head, or stop sending their body, stayed
    open for good, and enough of them took every file the router may open (then its gRPC door and NATS link
    failed too). Now a head not finished within router.http_read_timeout_ms is closed, a body that stops coming
    for as long is a 408, and past router.http_max_connections a new connection gets a 503 and is closed, while
    the router keeps serving, and serves HTTP again once they are gone."""
    import json
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    with Stack(tiny_family, tiers=("edge",), jetstream=True,  # the Batch API's uploads too
               overrides={"router.http_read_timeout_ms": 2000, "router.http_max_connections": 6,
                          "router.device_complexity": 0.0, "router.cloud_complexity": 1.0}) as s:
        url = urlsplit(s.http_base_url)
        body = json.dumps({"model": "tierline-reasoner", "prompt": "Q:1+1=?\nA:", "max_tokens": 2}).encode()

        def post() -> int:
            request = urllib.request.Request(f"{s.http_base_url}/completions", data=body,
                                             headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                assert json.loads(err.read())["error"]["code"] == "server_busy" and err.headers["retry-after"]
                return err.code

        def opened(data: bytes) -> socket.socket:
            sock = socket.create_connection((url.hostname, url.port), timeout=TIMEOUT)
            sock.sendall(data)
            return sock

        def answer(sock: socket.socket) -> bytes:
            """What the router sent: one answer (its head and Content-Length body), or b"" when it closed."""
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
                head, _, rest = out.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
            return out

        head_only = opened(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # the head never ends
        half_body = opened(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: 100\r\n\r\n{\"mo")  # 4 bytes of 100, then nothing
        assert answer(head_only) == b""  # closed by the router, no answer
        stalled = answer(half_body)
        assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
        assert json.loads(stalled.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert post() == 200
        # an upload whose bytes keep coming, in gaps shorter than the timeout, is not cut off, however long it takes
        # (part headers included: they are bytes of the body too)
        lines = b"".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/completions",
                                     "body": json.loads(body)}).encode() + b"\n" for c in "abcdefgh")
        form = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--B\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
                + lines + b"\r\n--B--\r\n")
        upload = opened(b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=B\r\n"
                        b"content-length: %d\r\n\r\n" % len(form))
        for i in range(0, len(form), 128):  # about 3 s in all: longer than the timeout, no gap as long
            upload.sendall(form[i:i + 128])
            time.sleep(0.4)
        uploaded = answer(upload)
        assert uploaded.startswith(b"HTTP/1.1 200"), uploaded[:300]
        upload.close()

        idle = [opened(b"") for _ in range(6)]  # the limit's worth of connections that send nothing
        try:
            deadline = time.monotonic() + TIMEOUT  # counted once the router has taken them in (its next loop turn)
            while (status := post()) != 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status == 503  # told, not left hanging: the door's files stay free
            assert stub(s.router_address).Infer(pb.InferRequest(prompt="Q:1+1=?\nA:", parameters=pb.Parameters(
                max_tokens=2)), timeout=TIMEOUT).choices[0].text is not None  # gRPC is served meanwhile
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + TIMEOUT
        while (status := post()) != 200 and time.monotonic() < deadline:  # the router sees them close
            time.sleep(0.1)
        assert status == 200


def test_an_answer_in_hand_reaches_a_client_whose_deadline_the_tier_above_would_miss(tiny_family):
    """Found by a fault hunt: every request escalates (edge threshold 1) to a cloud that is hung (SIGSTOP: on NATS,
    silent). The edge's answer was in hand after a few ms, but the cloud was given all the time left, so its last
    try ended at the client's deadline: DEADLINE_EXCEEDED instead of the degraded edge answer, and the key charged
    for it. Now a tier above gets the time less ANSWER_MARGIN_S when there is an answer to give. The silent
    replica's attempt says it went silent (it said "no answer in <the time given>")."""
    import os
    import signal

    from tests.conftest import new_key
    from tierline import InferenceClient

    with Stack(tiny_family, tiers=("edge", "cloud"), auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 1.0}, "tiers.edge.cache_size": 0}) as s:
        _, key = new_key(s, "pro")
        cloud = next(p.popen.pid for p in s.procs if p.name == "cloud-0")
        os.kill(cloud, signal.SIGSTOP)
        try:
            sdk = InferenceClient(api_key=key, endpoint=s.router_address, retries=0)
            answer = sdk.infer("Q:2+3=?\nA:", {"max_tokens": 4}, timeout=1.6)  # one silent try and a short one
            assert answer.degraded and answer.tier == "edge", answer
            cloud_tries = [a for a in answer.escalation_path if a.tier == "cloud"]
            assert cloud_tries and "went silent" in cloud_tries[0].detail, answer.escalation_path
        finally:
            os.kill(cloud, signal.SIGCONT)


def test_the_http_connection_cap_fits_the_open_file_limit():
    """Found by a review: a cap of 1024 connections under a soft open-file limit of 1024 (systemd's and
    containers' default) ran out of files before the cap engaged. The soft limit is raised to the hard one, and
    the cap lowered to what the hard one leaves room for; in a process of its own (the limits are process-wide)."""
    import subprocess
    import sys

    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, tuple(map(int, sys.argv[1:3])));"
              "from tierline_router.openai_http import FILES_RESERVE, connection_room;"
              "print(connection_room(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0], FILES_RESERVE)")

    def room(soft: int, hard: int) -> tuple[int, int, int]:
        out = subprocess.run([sys.executable, "-c", script, str(soft), str(hard)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return tuple(int(x) for x in out.stdout.split())

    cap, soft, reserve = room(1024, 4096)
    assert (cap, soft) == (1024, 4096)  # raised: the whole cap fits
    cap, soft, reserve = room(512, 512)
    assert (cap, soft) == (512 - reserve, 512)  # no room to raise it: the cap is what the limit leaves
