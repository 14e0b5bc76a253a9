"""The Python SDK and `tierline infer|stream|status` against a real platform (nats-server, edge x2, router)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import pytest

from tests.conftest import run_cli
from tierline import AsyncInferenceClient, InferenceClient, InvalidArgument, TierlineError, Unavailable
from tierline_infra.supervisor import Stack

PROMPT = "Q:2+3=?\nA:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tiny_family):
    # a fixed router port, so a restarted router is found at the same address
    with Stack(tiny_family, tiers=("edge",), replicas={"edge": 2}, auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "router.grpc_port": free_port()}) as s:
        yield s


@pytest.fixture
def client(stack):
    with InferenceClient(api_key=stack.api_key, model_name="tierline-reasoner",
                         endpoint=f"{stack.router_address}/v1") as c:
        yield c


def test_infer_reads_like_the_article(stack, client):
    response = client.infer(prompt=PROMPT, parameters={"temperature": 0.3, "max_tokens": 16,
                                                       "attention_window": 8, "seed": 1})
    assert isinstance(response.choices[0].text, str)
    assert response.tier == "edge"
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.choices[0].finish_reason in ("stop", "length")


def test_stream_yields_the_same_text_as_infer(client):
    whole = client.infer(PROMPT, {"max_tokens": 12})
    stream = client.stream(PROMPT, {"max_tokens": 12})
    chunks = list(stream)
    assert "".join(chunks) == whole.text
    assert len(chunks) == stream.response.usage.completion_tokens == whole.usage.completion_tokens
    assert stream.response.tier == "edge" and stream.response.choices[0].finish_reason in ("stop", "length")


def test_async_client_gives_the_same_answers(stack, client):
    whole = client.infer(PROMPT, {"max_tokens": 10})

    async def run():
        async with AsyncInferenceClient(api_key=stack.api_key, endpoint=stack.router_address) as ac:
            answers = await asyncio.gather(*(ac.infer(PROMPT, {"max_tokens": 10}) for _ in range(4)))
            chunks = [c async for c in ac.stream(PROMPT, {"max_tokens": 10})]
            with pytest.raises(InvalidArgument) as err:
                await ac.infer(PROMPT, {"max_tokens": 0})
            return answers, chunks, err.value

    answers, chunks, err = asyncio.run(run())
    assert {a.text for a in answers} == {whole.text}
    assert "".join(chunks) == whole.text
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "parameters.max_tokens" in err.message


def test_errors_are_typed_and_carry_the_status(stack, client):
    with pytest.raises(InvalidArgument) as err:
        client.infer(PROMPT, {"temperature": -1})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "parameters.temperature" in err.value.message
    with pytest.raises(InvalidArgument):
        list(client.stream("", {"max_tokens": 4}))
    with pytest.raises(ValueError, match="temp"):
        client.infer(PROMPT, {"temp": 0.5})  # caught before any network call
    with pytest.raises(ValueError, match="endpoint"):
        InferenceClient(api_key="k", endpoint="http://example.com/v1")
    with pytest.raises(ValueError, match="/v2"):
        InferenceClient(api_key="k", endpoint="127.0.0.1:1/v2")
    # NaN passed `timeout <= 0` (found by a fault hunt: `tierline infer --timeout nan`); infinity made no deadline
    import decimal

    import numpy as np
    for bad in (float("nan"), float("inf"), 0, -1, "5", 1e10, True, np.True_, b"5", bytearray(b"5"), 10**400):
        with pytest.raises(ValueError, match="timeout"):
            InferenceClient(api_key="k", endpoint="127.0.0.1:1", timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            client.infer(PROMPT, {"max_tokens": 1}, timeout=bad)  # a call's own, before any network call
    with pytest.raises(ValueError, match="backoff"):
        InferenceClient(api_key="k", endpoint="127.0.0.1:1", backoff=float("nan"))
    for good in (np.float32(5), np.int64(5), decimal.Decimal("5")):  # numbers from elsewhere, as before
        with InferenceClient(api_key="k", endpoint="127.0.0.1:1", timeout=good, backoff=good, retries=0) as c:
            with pytest.raises(Unavailable):  # used, not only checked (a Decimal kept as it came failed each call)
                c.infer(PROMPT, {"max_tokens": 1})


def test_unavailable_is_retried_until_the_router_is_back(stack):
    stack.kill("router")
    with InferenceClient(api_key=stack.api_key, endpoint=stack.router_address, retries=0) as impatient:
        with pytest.raises(Unavailable) as err:
            impatient.infer(PROMPT, {"max_tokens": 4})
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    result: dict = {}

    def call():
        with InferenceClient(api_key=stack.api_key, endpoint=stack.router_address, retries=12,
                             backoff=0.2) as patient:
            try:
                result["answer"] = patient.infer(PROMPT, {"max_tokens": 4})
            except TierlineError as exc:
                result["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()  # its first attempts fail: nothing listens on the router's port
    stack.restart("router")
    worker.join(timeout=60)
    assert "error" not in result, result.get("error")
    assert result["answer"].tier == "edge"


def both_replicas(client):
    """The status once both edge replicas answered it: GetStatus gathers the replicas' $SRV.STATS replies for
    DISCOVERY_WAIT_S (0.25 s), and on a loaded machine a replica's reply can come after that (it is listed
    silent, with older figures, or not at all before it ever answered; the next status has it)."""
    import time

    deadline = time.monotonic() + 30
    while True:
        status = client.status()
        if len(status.tiers[0].replicas) == 2:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def test_status_shows_tiers_replicas_queues_and_split(stack, client):
    for _ in range(3):
        client.infer(PROMPT, {"max_tokens": 4})
    status = both_replicas(client)
    assert status.auth_enabled and status.model == "tierline-reasoner"
    [edge] = status.tiers
    assert edge.tier == "edge" and len(edge.replicas) == 2
    assert len({r.id for r in edge.replicas}) == 2
    assert edge.answered >= 3 and edge.traffic_share == pytest.approx(1.0)
    assert sum(r.requests for r in edge.replicas) >= 3  # every request reaches a replica (cached or not)
    assert edge.queue_depth == sum(r.queue_depth for r in edge.replicas) == 0

    for _ in range(10):  # each run is one GetStatus, which can leave out a replica that replied late (both_replicas)
        proc = run_cli("status", "--endpoint", stack.router_address, "--api-key", stack.api_key, "--json",
                       timeout=60)
        assert proc.returncode == 0, proc.stderr
        as_json = json.loads(proc.stdout)
        if [len(t["replicas"]) for t in as_json["tiers"]] == [2]:
            break
    assert [len(t["replicas"]) for t in as_json["tiers"]] == [2]
    assert isinstance(as_json["answered"], int) and isinstance(as_json["tiers"][0]["answered"], int)  # not "12"
    assert all(isinstance(r["requests"], int) for r in as_json["tiers"][0]["replicas"])
    table = run_cli("status", "--endpoint", stack.router_address, "--api-key", stack.api_key, timeout=60)
    assert table.returncode == 0 and "traffic share" in table.stdout and "edge" in table.stdout


def test_a_replica_that_misses_a_discovery_is_listed_silent_not_dropped(stack, client):
    """A replica too busy to answer $SRV.STATS within DISCOVERY_WAIT_S (here: stopped for the call) is still in
    the status, marked silent with its last figures, and the tier is not shown down while another answers; it is
    back to answering in the next status after it is."""
    import os
    import signal
    import time

    from tierline.status_view import render_text

    known = {r.id for r in both_replicas(client).tiers[0].replicas}
    edge1 = next(p for p in stack.procs if p.name == "edge-1").popen.pid
    os.kill(edge1, signal.SIGSTOP)
    try:  # the status of a moment edge-0 answered in time (on a loaded machine it too can miss a discovery)
        deadline = time.monotonic() + 30
        while True:
            [edge] = client.status().tiers
            if len(edge.replicas) == 1:
                break
            assert time.monotonic() < deadline, edge
    finally:
        os.kill(edge1, signal.SIGCONT)
    assert {r.id for r in [*edge.replicas, *edge.silent_replicas]} == known
    assert [r.silent_s for r in edge.replicas] == [0] and len(edge.silent_replicas) == 1
    assert 0 < edge.silent_replicas[0].silent_s < 60
    row = next(line for line in render_text(pb_status(edge)).splitlines() if line.startswith("edge "))
    assert "1 (+1 silent)" in row and "down" not in row
    assert {r.id for r in both_replicas(client).tiers[0].replicas} == known


def pb_status(tier):
    from tierline_api.v1 import inference_pb2 as pb

    st = pb.PlatformStatus(model="m")
    st.tiers.add().CopyFrom(tier)
    return st


def test_status_counts_each_replicas_requests_errors_and_time(stack, client):
    """$SRV.STATS is counted around each whole request: a tier's failure is an error, and the mean is real."""
    before = {r.id: r for r in both_replicas(client).tiers[0].replicas}
    for i in range(4):
        client.infer(f"Q:{i}+{i}=?\nA:", {"max_tokens": 4})
    with pytest.raises(InvalidArgument, match="attention_window"):  # passes the router, fails on the tier
        client.infer(PROMPT, {"max_tokens": 4, "attention_window": 100_000})
    after = both_replicas(client).tiers[0].replicas
    requests = sum(r.requests - before[r.id].requests for r in after)
    errors = sum(r.errors - before[r.id].errors for r in after)
    assert (requests, errors) == (5, 1)
    # each request waits for the batch window (5 ms) and decodes: a mean of about zero times only the hand-off
    assert all(r.average_ms > 1.0 for r in after if r.requests), [r.average_ms for r in after]


def test_status_counts_the_requests_given_up_on_apart(stack, client):
    """A request its asker gave up on is neither an answer nor an error: the replicas count it apart (num_cancelled
    in $SRV.STATS), which `tierline status` did not show. Both edges' engine cores stopped (SIGSTOP), a call with a
    short deadline is given up by the router, which cancels it on the tier."""
    import os
    import signal

    import psutil

    from tierline import DeadlineExceeded

    before = {r.id: r for r in both_replicas(client).tiers[0].replicas}
    cores = [c for p in stack.procs if p.name.startswith("edge-")
             for c in psutil.Process(p.popen.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert len(cores) == 2, cores
    for core in cores:
        os.kill(core.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DeadlineExceeded):
            client.infer("Q:97+68=?\nA:", {"max_tokens": 4}, timeout=1.5)  # asked nowhere else: not cached
        deadline = time.monotonic() + 10
        while True:  # the tier hears the cancel as the router gives up, about when the client does
            after = both_replicas(client).tiers[0].replicas
            cancelled = sum(r.cancelled - before[r.id].cancelled for r in after)
            if cancelled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        # the cores go on only now. Started as soon as the client gave up, they could fail the request for its
        # deadline before a loaded router's cancel came (an error, not a cancel): the suspected cause of this test
        # counting no cancel in 3 of 6 full runs of the suite (never alone)
        for core in cores:
            os.kill(core.pid, signal.SIGCONT)
    seen = [(r.id, r.requests - before[r.id].requests, r.errors - before[r.id].errors,
             r.cancelled - before[r.id].cancelled) for r in after]  # (replica, requests, errors, cancelled)
    assert cancelled == 1 and sum(r.requests - before[r.id].requests for r in after) == 0, seen
    table = run_cli("status", "--endpoint", stack.router_address, "--api-key", stack.api_key, timeout=60).stdout
    assert "cancelled" in table


def test_cli_infer_and_stream(stack, client):
    expected = client.infer(PROMPT, {"max_tokens": 8}).text
    common = ("--endpoint", stack.router_address, "--api-key", stack.api_key, "--max-tokens", "8")
    proc = run_cli("infer", "2+3=?", *common, "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tier"] == "edge" and out["choices"][0]["text"] == expected
    proc = run_cli("stream", "Q:2+3=?\\nA:", "--raw", *common, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == expected and "tier edge" in proc.stderr
    bad = run_cli("infer", "2+3=?", "--endpoint", stack.router_address, "--api-key", "nope", timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "tierline: error: UNAUTHENTICATED: unknown API key"
    nan = run_cli("infer", "2+3=?", "--endpoint", stack.router_address, "--timeout", "nan", timeout=60)
    assert nan.returncode == 2 and "--timeout must be positive, got nan" in nan.stderr, nan.stderr


class SlowlyUnavailable:
    """A real gRPC server whose every call waits `delay_s`, then answers UNAVAILABLE (a tier-less router)."""

    def __init__(self, delay_s: float):
        from concurrent import futures

        from tierline_api.v1 import inference_pb2_grpc as pb_grpc

        outer = self

        class Servicer(pb_grpc.InferenceServiceServicer):
            def Infer(self, request, context):
                outer.calls += 1
                threading.Event().wait(delay_s)
                context.abort(grpc.StatusCode.UNAVAILABLE, "no tier could answer")

            def InferStream(self, request, context):
                self.Infer(request, context)
                yield from ()

        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_InferenceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def call_once(kind: str, method: str, endpoint: str, **config) -> TierlineError:
    """One call that must fail: the SDK error it raised."""
    if kind == "sync":
        with InferenceClient(api_key="k", endpoint=endpoint, **config) as c, pytest.raises(TierlineError) as err:
            if method == "infer":
                c.infer(PROMPT)
            else:
                list(c.stream(PROMPT))
        return err.value

    async def run():
        async with AsyncInferenceClient(api_key="k", endpoint=endpoint, **config) as c:
            with pytest.raises(TierlineError) as err:
                if method == "infer":
                    await c.infer(PROMPT)
                else:
                    [x async for x in c.stream(PROMPT)]
        return err.value

    return asyncio.run(run())


TIMEOUT_S = 1.0
BOUND_S = 3 * TIMEOUT_S  # a correctness bound (the whole call keeps its deadline), not a speed target


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("method", ["infer", "stream"])
def test_timeout_bounds_the_whole_call_when_nothing_listens(kind, method):
    """Refused at once, every time: the backoff alone (at least 0.5 x (1+2+4+4+4) s) would pass the deadline."""
    import time

    t0 = time.monotonic()
    err = call_once(kind, method, f"127.0.0.1:{free_port()}", timeout=TIMEOUT_S, retries=5, backoff=1.0)
    assert time.monotonic() - t0 < BOUND_S
    assert err.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("method", ["infer", "stream"])
def test_timeout_bounds_the_whole_call_when_each_attempt_is_slow(kind, method):
    """Each attempt takes most of the timeout before UNAVAILABLE: 5 attempts x 0.9 s would pass the deadline."""
    import time

    server = SlowlyUnavailable(0.9 * TIMEOUT_S)
    try:
        t0 = time.monotonic()
        err = call_once(kind, method, f"127.0.0.1:{server.port}", timeout=TIMEOUT_S, retries=4, backoff=0.01)
        assert time.monotonic() - t0 < BOUND_S
    finally:
        server.stop()
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert server.calls >= 1
