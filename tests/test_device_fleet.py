"""The device agent as a fleet daemon: a real nats-server with JetStream, a real agent process, tiny models.

One agent runs for the whole module (heartbeat 0.2 s); the tests register it, update
its model over the Object Store (good, tampered, truncated, failing the health check),
restart nats-server under it and read back every telemetry event it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import nats.errors
import numpy as np
import pytest

from tests.conftest import run_cli, scrape
from tierline.devices import desired_model, fleet_rows, publish_model, read_devices, render
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_device_agent.engine import LiteRTEngine, load_engine
from tierline_device_agent.fleet import TELEMETRY_STREAM, Fleet, open_fleet, provision_fleet, read_telemetry
from tierline_device_agent.ota import DesiredModel, ModelStore, OtaCode, OtaError, health_check
from tierline_device_agent.outbox import Outbox
from tierline_infra.supervisor import Stack, accepted
from tierline_shared.config.manifest import ManifestError, load_manifest
from tierline_shared.models.artifacts import load_tokenizer, sha256_of
from tierline_shared.security.credentials import SIGNING_KEY, init_credentials
from tierline_shared.security.identities import ROUTER, IdentityStore, device_identity
from tierline_shared.security.signing import read_private_key
from tierline_shared.transport.messaging import (
    DESIRED_BUCKET,
    DEVICES_BUCKET,
    MODELS_BUCKET,
    RECONNECT_BASE_S,
    RECONNECT_JITTER,
    RECONNECT_MAX_S,
    NatsOptions,
    ask_tier,
    connect,
    kv_entries,
    reconnect_delay,
    stream_tier,
    subject,
)

DEVICE = "pi-test-1"
THIEF = "pi-stolen"  # a second board, stolen: its own identity, used against DEVICE
HEARTBEAT_S = 0.2
MEMORY_MAX_MB = 2048
TIMEOUT = 30  # seconds, every RPC and every wait here
CONNECTIONS = 2  # NATS connections of one agent: its tier link (TierService) and its fleet loop
OUTAGE_STEPS = 3  # the long outage outlasts this many reconnect waits of the schedule, at their longest
EASY = "Q:2+3=?\nA:"  # answered on the board (policy below)
HARD = "Q:" + "+".join("1" * 14) + "=?\nA:"  # complexity 1.0: the policy wants a tier above


def scramble_weights(src: Path, dst: Path, seed: int = 0) -> None:
    """A .tflite of the same shape whose weight buffers are noise: it loads, and answers nonsense."""
    from ai_edge_litert import schema_py_generated as schema

    data = bytearray(src.read_bytes())
    model = schema.Model.GetRootAs(data, 0)
    rng = np.random.default_rng(seed)
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength() >= 256:
            start = buf._tab.Vector(buf._tab.Offset(4))  # where the buffer's bytes begin in the file
            noise = rng.normal(0, 1, buf.DataLength() // 4).astype(np.float32).tobytes()
            data[start:start + len(noise)] = noise
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def broken_model(tiny_family, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("broken")
    scramble_weights(tiny_family / "device" / "model.tflite", out / "model.tflite")
    shutil.copyfile(tiny_family / "device" / "config.json", out / "config.json")
    return out / "model.tflite"


@pytest.fixture(scope="module")
def health_bar(tiny_family, broken_model) -> float:
    """Halfway between the tiny device model's health score and the broken one's (no hard-coded figure)."""
    good = health_check(load_engine(tiny_family, threads=1), 16, 0.0)
    bad = health_check(LiteRTEngine.load(broken_model, load_tokenizer(tiny_family), threads=1), 16, 0.0)
    assert good > bad, (good, bad)
    return round((good + bad) / 2, 4)


@pytest.fixture(scope="module")
def agent(tiny_family, health_bar):
    overrides = {
        # easy prompts are answered on the board with any confidence; HARD wants the cloud (the step-counting
        # heuristic's complexity: no learned scorer, which the board's policy uses as the router's does)
        "router.scorer": "", "router.device_complexity": 1.0, "router.confidence_threshold": {"device": 0.0},
        "nats.request_timeout_ms": 20000,
        "device_agent": {"device_id": DEVICE, "heartbeat_s": HEARTBEAT_S,
                         "stale_after_beats": 3, "outbox_max_events": 1000, "memory_max_mb": MEMORY_MAX_MB,
                         "health_problems": 16, "health_min_token_accuracy": health_bar},
    }
    with Stack(tiny_family, tiers=("device",), router=False, jetstream=True, overrides=overrides) as s:
        yield s


# -- helpers ----------------------------------------------------------------------------------------
def fleet_call(stack: Stack, work, create: bool = True):
    """`work(fleet)` as the operator: the fleet opened as the CLI does (what is missing is created), or, without
    `create`, only what is there (a test that deleted the telemetry stream keeps it deleted)."""
    async def run():
        nc = await connect(stack.nats_options(), name="test")
        try:
            if create:
                return await work(await open_fleet(nc))
            js = nc.jetstream(timeout=TIMEOUT)
            return await work(Fleet(js, await js.key_value(DEVICES_BUCKET), await js.key_value(DESIRED_BUCKET),
                                    await js.object_store(MODELS_BUCKET)))
        finally:
            await nc.close()

    return asyncio.run(run())


def publish(stack: Stack, version: str, tflite: bytes, config: bytes, key=None, **desired):
    """What `tierline devices set-model` does: the artifacts uploaded, the update manifest signed (by default
    with the operator's key, which the board pins) and made the board's desired model."""
    manifest = desired_model(DEVICE, "tierline-reasoner", version, tflite, config, **desired)
    key = key or read_private_key(stack.credentials / SIGNING_KEY)
    return fleet_call(stack, lambda f: publish_model(f, manifest, key, tflite, config))


def reported(stack: Stack) -> dict:
    async def get(fleet):
        return json.loads((await fleet.devices.get(DEVICE)).value)

    return fleet_call(stack, get, create=False)


def wait_for(check, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - not there yet (the bucket, the key, the server)
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stub(stack: Stack):
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.port('device-0')}")
    grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    return pb_grpc.InferenceServiceStub(channel)


def ask(stack: Stack, prompt: str = EASY) -> pb.InferResponse:
    return stub(stack).Infer(pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=8)), timeout=TIMEOUT)


@contextmanager
def serving_meanwhile(stack: Stack):
    """Requests sent back to back while the block runs; yields the list of outcomes."""
    outcomes: list = []
    stop = threading.Event()

    def loop():
        s = stub(stack)
        while not stop.is_set():
            try:
                r = s.Infer(pb.InferRequest(prompt=EASY, parameters=pb.Parameters(max_tokens=8)), timeout=TIMEOUT)
                outcomes.append(r.model_version)
            except grpc.RpcError as exc:
                outcomes.append(exc)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        yield outcomes
    finally:
        stop.set()
        worker.join(timeout=TIMEOUT)


def update_outcome(stack: Stack, version: str) -> dict:
    """The reported state once the update to `version` has finished (any outcome)."""
    def done():
        r = reported(stack)
        return r if r["ota"] and r["ota"]["version"] == version and r["ota"]["code"] != OtaCode.IN_PROGRESS else None

    return wait_for(done, f"the outcome of the update to {version}")


def tiny_bytes(tiny_family: Path) -> tuple[bytes, bytes]:
    return (tiny_family / "device" / "model.tflite").read_bytes(), (tiny_family / "device" / "config.json").read_bytes()


async def _list_many(fleet, n: int) -> tuple[list, int]:
    """`n` listings of the registry as `tierline devices list` reads it, and the consumers left on its stream."""
    listings = [sorted(await read_devices(fleet)) for _ in range(n)]
    return listings, (await fleet.js.stream_info(f"KV_{DEVICES_BUCKET}")).state.consumer_count


# -- registration and heartbeats --------------------------------------------------------------------
def test_registers_and_heartbeats(agent, tiny_family):
    first = wait_for(lambda: reported(agent), "the device in the KV bucket")
    models = json.loads((tiny_family / "manifest.json").read_text())
    assert first["model"]["version"] == models["version"]
    assert first["model"]["sha256"] == models["artifacts"]["device"]["weights"]["sha256"]
    assert first["status"] == "serving" and first["tier_link"] == "up"
    assert first["arch"] == platform.machine() and first["platform"] == platform.system().lower()
    assert set(first["load"]) == {"queue", "requests", "rss_mb", "loadavg_1m"} and first["load"]["rss_mb"] > 0
    later = wait_for(lambda: (r := reported(agent))["last_heartbeat"] > first["last_heartbeat"] and r,
                     "a later heartbeat")
    # the board's own series say the same (TierlineDeviceStale compares them)
    metrics = scrape(agent, "device-0")
    assert metrics.value("tierline_device_last_heartbeat_timestamp_seconds") >= first["last_heartbeat"]
    assert metrics.value("tierline_device_stale_after_seconds") == later["heartbeat_s"] * later["stale_after_beats"]
    assert later["started_at"] == first["started_at"]

    listed = run_cli("devices", "list", "--manifest", str(agent.manifest), timeout=60)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(DEVICE))
    assert "serving" in row and first["model"]["version"] in row
    as_json = json.loads(run_cli("devices", "list", "--manifest", str(agent.manifest), "--json").stdout)
    assert [d["device"] for d in as_json["devices"]] == [DEVICE]
    # every listing finds it (nats-py's keys() answered "no keys" now and then: a CI run failed here), and none
    # leaves a consumer on the server (keys() left one for 5 minutes a call)
    listings = fleet_call(agent, lambda f: _list_many(f, 200), create=False)
    assert all(got == [DEVICE] for got in listings[0]) and listings[1] == 0, listings

    # the fleet view's stale rule, on the real record: N missed beats and it is stale
    beat, n = later["heartbeat_s"], later["stale_after_beats"]
    assert fleet_rows({DEVICE: later}, now=later["last_heartbeat"] + (n - 1) * beat)[0]["state"] == "serving"
    assert fleet_rows({DEVICE: later}, now=later["last_heartbeat"] + (n + 1) * beat)[0]["state"] == "stale"


def test_a_board_that_wrote_the_longest_heartbeat_a_manifest_allows_is_stale_after_the_operators(agent):
    """A stolen board writes its own entry: with the longest heartbeat settings a manifest allows (a day, 1,000
    beats) it stayed `serving` in `tierline devices list` for 1,000 days after it stopped beating (revoked, its
    identity gone). The operator's manifest's `heartbeat_s` x `stale_after_beats` now bounds it: stale after that,
    as a board that keeps the operator's settings is."""
    now = time.time()
    forged = {"device_id": "pi-slow", "status": "serving", "last_heartbeat": now - 60, "heartbeat_s": 86400,
              "stale_after_beats": 1000, "model": {"version": "v1"}, "load": {"queue": 0, "requests": 0, "rss_mb": 1},
              "arch": "aarch64", "outbox": {"pending": 0, "dropped": 0}}
    fleet_call(agent, lambda f: f.devices.put("pi-slow", json.dumps(forged).encode()))
    try:
        listed = run_cli("devices", "list", "--manifest", str(agent.manifest), "--json", timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = {d["device"]: d for d in json.loads(listed.stdout)["devices"]}
        assert rows["pi-slow"]["state"] == "stale", rows["pi-slow"]  # 60 s without a beat; the operator's: 3 x 0.2 s
        assert rows[DEVICE]["state"] == "serving"  # the board that beats on the operator's settings
    finally:
        fleet_call(agent, lambda f: f.devices.purge("pi-slow"))


def test_memory_cap_and_threads_come_from_the_manifest(agent):
    pid = agent.procs[0].popen.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    data = next(line for line in limits.splitlines() if line.startswith("Max data size"))
    assert str(MEMORY_MAX_MB * 1024 * 1024) in data.split()
    assert reported(agent)["memory_max_mb"] == MEMORY_MAX_MB


# -- OTA -------------------------------------------------------------------------------------------------
def test_ota_update_succeeds_while_serving(agent, tiny_family):
    tflite, config = tiny_bytes(tiny_family)
    with serving_meanwhile(agent) as outcomes:
        publish(agent, "v2", tflite, config)
        state = update_outcome(agent, "v2")
        wait_for(lambda: "v2" in outcomes, "an answer from the new model")
    assert state["ota"]["code"] == OtaCode.APPLIED, state["ota"]
    assert state["model"]["version"] == "v2" and state["status"] == "serving"
    assert outcomes and not [o for o in outcomes if isinstance(o, Exception)]
    assert ask(agent).model_version == "v2"
    current = agent.workdir / "device-state" / "current"
    assert current.is_symlink() and current.resolve().name == "v2"


def mapped_models(pid: int) -> set[str]:
    """The .tflite files a process has mapped (a deleted one named without its " (deleted)")."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].endswith(("model.tflite", "model.tflite (deleted)")):
            out.add(parts[5].removesuffix(" (deleted)"))
    return out


def test_an_update_frees_the_model_it_replaces(agent, tiny_family):
    """Found by a fault hunt: after updates the boot model stayed mapped for good (its interpreter alive: a local of
    the process's serve function held its engine), and older ones until the garbage collector ran. The model an
    update replaces is closed once its requests are answered: the agent maps only the model it serves."""
    pid = agent.procs[0].popen.pid
    ask(agent)
    assert mapped_models(pid)  # LiteRT maps the model it serves: what this test looks at
    tflite, config = tiny_bytes(tiny_family)
    for version in ("v-freed-1", "v-freed-2"):
        publish(agent, version, tflite, config)
        assert update_outcome(agent, version)["ota"]["code"] == OtaCode.APPLIED
        ask(agent)
        serving = str((agent.workdir / "device-state" / "models" / version / "device" / "model.tflite").resolve())
        last: list[set[str]] = []
        try:  # the old one goes after its requests and the retire grace (1 s)
            wait_for(lambda: last.append(mapped_models(pid)) or last[-1] == {serving}, f"only {version} mapped", 10)
        except AssertionError:
            raise AssertionError(f"mapped after the update to {version}: {sorted(last[-1])}") from None


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_bad_digest_is_refused_and_the_model_keeps_serving(agent, tiny_family, tmp_path, damage):
    tflite, config = tiny_bytes(tiny_family)
    bad = bytearray(tflite)
    if damage == "tampered":
        bad[len(bad) // 2] ^= 0xFF
    else:
        bad = bad[: len(bad) // 2]
    (tmp_path / "model.tflite").write_bytes(bytes(bad))
    (tmp_path / "config.json").write_bytes(config)
    before = reported(agent)["model"]["version"]
    refused = scrape(agent, "device-0").value("tierline_device_ota_updates_total", status="digest_mismatch")
    version = f"bad-{damage}"
    with serving_meanwhile(agent) as outcomes:
        # the operator names the digest of the real model; the file on the way is not it
        proc = run_cli("devices", "set-model", "--manifest", str(agent.manifest), "--device", DEVICE,
                       "--tflite", str(tmp_path / "model.tflite"), "--version", version,
                       "--sha256", sha256_of(tiny_family / "device" / "model.tflite"), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "will refuse it" in proc.stderr
        state = update_outcome(agent, version)
    assert state["ota"]["code"] == OtaCode.DIGEST_MISMATCH, state["ota"]
    assert "refused" in state["ota"]["detail"]
    # what TierlineOtaUpdateFailed (infra/observability/alerts.yml) alerts on
    assert scrape(agent, "device-0").value("tierline_device_ota_updates_total", status="digest_mismatch") == refused + 1
    assert state["model"]["version"] == before
    assert outcomes and all(o == before for o in outcomes), outcomes[:5]
    assert not (agent.workdir / "device-state" / "models" / version).exists()


def test_an_object_not_of_the_signed_size_is_refused_before_download(agent, tiny_family):
    """The store's record of an object (its size) is read first: an object that is not the signed size is
    refused without fetching a chunk of it, however large it is."""
    tflite, config = tiny_bytes(tiny_family)
    desired = desired_model(DEVICE, "tierline-reasoner", "v-oversized", tflite, config)
    key = read_private_key(agent.credentials / SIGNING_KEY)
    fleet_call(agent, lambda f: publish_model(f, desired, key, tflite * 3, config))  # the store: three times it
    state = update_outcome(agent, "v-oversized")
    assert state["ota"]["code"] == OtaCode.DIGEST_MISMATCH, state["ota"]
    assert state["ota"]["detail"].endswith(f"{3 * len(tflite)} bytes in the object store, not the signed "
                                           f"{len(tflite)}; refused before download"), state["ota"]
    assert not (agent.workdir / "device-state" / "models" / "v-oversized").exists()


def test_a_failing_health_check_rolls_back(agent, broken_model):
    before = reported(agent)["model"]["version"]
    with serving_meanwhile(agent) as outcomes:
        publish(agent, "v-broken", broken_model.read_bytes(), (broken_model.parent / "config.json").read_bytes())
        state = update_outcome(agent, "v-broken")
    assert state["ota"]["code"] == OtaCode.HEALTH_CHECK_FAILED, state["ota"]
    assert "rolled back" in state["ota"]["detail"]
    assert state["model"]["version"] == before
    assert outcomes and all(o == before for o in outcomes)
    assert ask(agent).model_version == before
    assert not (agent.workdir / "device-state" / "models" / "v-broken").exists()


# -- offline ------------------------------------------------------------------------------------------
def test_an_unreachable_edge_is_answered_locally_and_fast(agent):
    t0 = time.perf_counter()
    resp = ask(agent, HARD)
    assert time.perf_counter() - t0 < 10  # no responders fails at once, not after the 20 s request timeout
    assert resp.tier == "device" and resp.degraded
    assert [a.outcome for a in resp.escalation_path] == ["no_responders", "no_responders", "answered"]


def telemetry(stack: Stack) -> list[dict]:
    """Every telemetry event the agent has sent so far, in order, each once, as the operator reads them
    (`read_telemetry`: a resend the duplicate window did not catch is dropped)."""
    return fleet_call(stack, lambda fleet: read_telemetry(fleet.js))


def test_answers_asked_over_nats_are_in_the_telemetry_too(agent):
    async def ask_over_nats():  # as the router does
        nc = await connect(agent.nats_options(ROUTER), name="test")
        try:
            req = pb.InferRequest(prompt=EASY, parameters=pb.Parameters(max_tokens=4))
            return await ask_tier(nc, "device", req, timeout_s=TIMEOUT)
        finally:
            await nc.close()

    before = time.time()
    answer = asyncio.run(ask_over_nats())
    assert answer.tier == "device"
    event = wait_for(lambda: next((e for e in telemetry(agent) if e["kind"] == "request" and e["at"] >= before
                                   and e.get("via") == "nats"), None), "a telemetry event for the NATS request")
    assert event["completion_tokens"] == answer.usage.completion_tokens



def path_of(resp: pb.InferResponse) -> list[tuple[str, str]]:
    return [(a.tier, a.outcome) for a in resp.escalation_path]


def request_events(stack: Stack, since: float, via: str) -> list[dict]:
    return [e for e in telemetry(stack) if e["kind"] == "request" and e["at"] >= since and e.get("via") == via]


def test_a_stream_at_the_front_door_takes_the_cascade_and_is_in_the_telemetry(agent):
    """A stream from the board's apps is routed as a unary request is (the policy, then the cascade; here nothing
    is above the board, so a hard prompt falls back to the board's model, degraded), and each answer, streamed or
    not, is one telemetry event. It was answered on the board as if the policy wanted it there, no event."""
    # the count to start from is one a heartbeat took after the earlier tests' requests were counted (a CI run read
    # an older one, and the count never came to it plus 3)
    settled = time.time() + 2 * HEARTBEAT_S
    wait_for(lambda: reported(agent)["last_heartbeat"] > settled, "a heartbeat after the earlier requests")
    before, requests = time.time(), reported(agent)["load"]["requests"]
    unary = ask(agent, HARD)
    board = stub(agent)
    streams = {p: list(board.InferStream(pb.InferRequest(prompt=p, parameters=pb.Parameters(max_tokens=8)),
                                         timeout=TIMEOUT)) for p in (HARD, EASY)}
    hard, easy = streams[HARD][-1], streams[EASY][-1]
    assert unary.degraded and path_of(unary) == [("cloud", "no_responders"), ("edge", "no_responders"),
                                                 ("device", "answered")]
    assert hard.choices[0].finish_reason and hard.tier == "device"
    assert hard.degraded and path_of(hard) == path_of(unary) and hard.complexity == unary.complexity
    assert not easy.degraded and path_of(easy) == [("device", "answered")]
    assert all(not c.escalation_path for c in streams[HARD][:-1])  # the path comes with the last chunk only
    events = wait_for(lambda: len(e := request_events(agent, before, "grpc")) >= 3 and e, "the answers' events")
    time.sleep(3 * HEARTBEAT_S)  # one more would have come by now
    events = request_events(agent, before, "grpc")
    assert [(e["tier"], e["degraded"]) for e in events] == [("device", True), ("device", True), ("device", False)]
    assert events[1]["completion_tokens"] == hard.usage.completion_tokens
    wait_for(lambda: reported(agent)["load"]["requests"] == requests + 3, "load.requests counting the streams")


def test_a_stream_the_router_sends_over_nats_is_in_the_telemetry_too(agent):
    async def stream_over_nats():  # as the router does
        nc = await connect(agent.nats_options(ROUTER), name="test")
        try:
            req = pb.InferRequest(prompt=EASY, parameters=pb.Parameters(max_tokens=4))
            return [chunk async for chunk in stream_tier(nc, "device", req, timeout_s=TIMEOUT)]
        finally:
            await nc.close()

    before = time.time()
    last = asyncio.run(stream_over_nats())[-1]
    assert last.tier == "device" and last.choices[0].finish_reason
    event = wait_for(lambda: next(iter(request_events(agent, before, "nats")), None),
                     "a telemetry event for the stream over NATS")
    assert event["completion_tokens"] == last.usage.completion_tokens
    time.sleep(3 * HEARTBEAT_S)
    assert len(request_events(agent, before, "nats")) == 1  # one event per answer, not one per chunk


def test_nats_restart_loses_no_telemetry(agent):
    wait_for(lambda: reported(agent)["outbox"]["pending"] == 0, "an empty outbox")
    stopped = time.time()
    agent.nats.stop()
    offline = [ask(agent) for _ in range(20)]
    t0 = time.perf_counter()
    escalated = ask(agent, HARD)
    assert time.perf_counter() - t0 < 10  # no link: the escalation fails at once
    assert escalated.degraded and [a.outcome for a in escalated.escalation_path] == ["offline", "offline", "answered"]
    assert all(r.choices[0].finish_reason for r in offline)
    outbox = Outbox(agent.workdir / "device-state" / "outbox.sqlite", max_events=1000)  # the agent's own file
    assert outbox.pending >= len(offline) + 1  # kept on disk while the link is down
    outbox.close()
    restarted = time.time()
    agent.nats.start()  # same port, same JetStream store

    state = wait_for(lambda: (r := reported(agent))["last_heartbeat"] > restarted and r["outbox"]["pending"] == 0
                     and r, "heartbeats and an empty outbox after the restart")
    assert state["outbox"]["dropped"] == 0

    sent = telemetry(agent)
    seqs = [e["seq"] for e in sent]
    assert seqs == list(range(1, len(seqs) + 1))  # every event, in order, none twice
    while_down = [e for e in sent if e["kind"] == "request" and stopped <= e["at"] < restarted]
    assert len(while_down) == len(offline) + 1
    assert [e["degraded"] for e in while_down] == [False] * len(offline) + [True]


def test_a_long_outage_backs_off_then_reconnects_and_sends_everything(agent):
    wait_for(lambda: (r := reported(agent))["outbox"]["pending"] == 0 and r["tier_link"] == "up", "a quiet agent")
    outage_s = sum(reconnect_delay(n, rand=0.0) for n in range(OUTAGE_STEPS)) + 0.5
    agent.nats.stop()
    dropped = time.monotonic()
    attempts: list[float] = []
    # a bare listener on the server's port stands in for it: it counts the agent's attempts and refuses them
    with socket.create_server(("127.0.0.1", agent.nats.port)) as listener:
        listener.settimeout(0.1)
        offline = [ask(agent) for _ in range(5)]
        deadline = time.monotonic() + outage_s
        while time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            attempts.append(time.monotonic())
            conn.close()
    away_s = time.monotonic() - dropped
    restarted = time.time()
    agent.nats.start()  # same port, same JetStream store

    # each connection tries no more often than the schedule's shortest waits allow (a fixed 1 s wait: ~7 each)
    shortest, per_connection = 0.0, 0
    while (shortest := shortest + reconnect_delay(per_connection, rand=1.0)) <= away_s:
        per_connection += 1
    assert CONNECTIONS <= len(attempts) <= CONNECTIONS * per_connection, attempts
    state = wait_for(lambda: (r := reported(agent))["last_heartbeat"] > restarted and r["tier_link"] == "up"
                     and r["outbox"]["pending"] == 0 and r, "heartbeats, the tier link and an empty outbox",
                     timeout=2 * RECONNECT_MAX_S)
    assert state["outbox"]["dropped"] == 0 and all(r.choices[0].finish_reason for r in offline)
    assert ask(agent, HARD).escalation_path[0].outcome == "no_responders"  # the link is back (no edge here)


def test_the_reconnect_schedule_doubles_from_the_base_up_to_the_cap():
    steps = [reconnect_delay(n, rand=0.0) for n in range(12)]
    assert steps[0] == RECONNECT_BASE_S
    for before, after in zip(steps, steps[1:]):
        assert after == min(2 * before, RECONNECT_MAX_S)
    assert steps[-1] == RECONNECT_MAX_S and reconnect_delay(10**6, rand=0.0) == RECONNECT_MAX_S
    for n in (0, 3, 40):  # jitter: only ever shortens a step, by at most RECONNECT_JITTER of it
        step = reconnect_delay(n, rand=0.0)
        draws = {reconnect_delay(n) for _ in range(50)}
        assert len(draws) > 1 and all((1 - RECONNECT_JITTER) * step <= d <= step for d in draws), (n, draws)
    with pytest.raises(ValueError, match="attempt"):
        reconnect_delay(-1)


def test_nats_py_waits_by_the_schedule_after_a_drop():
    from urllib.parse import urlparse

    from nats.aio.client import Server

    hook = NatsOptions("nats://127.0.0.1:4222").connect_kwargs()["reconnect_to_server_handler"]
    servers = [Server(uri=urlparse("nats://a:4222"), reconnects=4), Server(uri=urlparse("nats://b:4222"),
                                                                         reconnects=1)]
    chosen, delay = hook(servers, {})
    assert chosen is servers[1]  # the least-failed server
    assert reconnect_delay(1, rand=1.0) <= delay <= reconnect_delay(1, rand=0.0)


def test_an_agent_that_boots_offline_serves_then_registers(tiny_family, tmp_path):
    from tierline_infra.supervisor import write_manifest

    s = Stack(tiny_family, workdir=tmp_path, tiers=("device",), router=False, jetstream=True)
    try:
        init_credentials(s.credentials, ("device",))  # provisioned before it boots: its identity, the buckets
        IdentityStore(s.credentials).create(device_identity("pi-offline"))
        s.nats.start()
        s.manifest = write_manifest(tmp_path / "manifest.yaml", tiny_family, s.nats, tiers=("device",), overrides={
            "device_agent": {"device_id": "pi-offline", "heartbeat_s": HEARTBEAT_S}})
        asyncio.run(provision_fleet(s.nats_options()))
        s.nats.stop()
        s.start_process("device-0", "tierline_device_agent")  # no NATS: it must still come up
        assert ask(s).choices[0].finish_reason
        s.nats.start()

        async def entry(fleet):
            return json.loads((await fleet.devices.get("pi-offline")).value)

        state = wait_for(lambda: fleet_call(s, entry), "the late registration")
        assert state["device_id"] == "pi-offline"
        wait_for(lambda: fleet_call(s, entry)["tier_link"] == "up", "the tier link after NATS came up")
    finally:
        s.stop()


def test_answers_a_stopping_board_finishes_in_its_grace_are_in_its_telemetry(tiny_family, tmp_path):
    """A board told to stop (SIGTERM) finishes the requests it holds (tiers.device.stop_grace_s); found by a review
    of that change: its fleet agent stopped first, closing the telemetry outbox, so each answer finished in the
    grace lost its telemetry event ("not stored"). The fleet agent stops after the grace now: every answer the
    board gave has its event, sent or kept in the outbox for the next start. Eight clients keep asking while the
    SIGTERM comes; some of their answers come after it."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from tierline_device_agent.fleet import state_dir

    overrides = {"device_agent": {"device_id": "pi-grace", "heartbeat_s": HEARTBEAT_S},
                 "tiers.device.cache_size": 0}
    with Stack(tiny_family, workdir=tmp_path, tiers=("device",), router=False, jetstream=True,
               overrides=overrides) as s:
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port('device-0')}")
        board = pb_grpc.InferenceServiceStub(channel)
        before, stop_at = time.time(), [float("inf")]

        def client(i: int) -> list[float]:
            answered = []  # when each answer came
            while True:
                try:
                    board.Infer(pb.InferRequest(prompt=f"Q:{i}+{len(answered) % 90}=?\nA:",
                                                parameters=pb.Parameters(max_tokens=64)), timeout=TIMEOUT)
                except grpc.RpcError:
                    return answered  # the board has stopped taking requests
                answered.append(time.time())

        with ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client, i) for i in range(8)]
            time.sleep(1.0)
            stop_at[0] = time.time()
            s.kill("device-0", signal.SIGTERM)
            answered = [t for c in clients for t in c.result(timeout=TIMEOUT)]
        channel.close()
        assert any(t > stop_at[0] for t in answered), "no answer came in the grace: nothing was tested"
        outbox = Outbox(state_dir(load_manifest(s.manifest, check_artifacts=False)) / "outbox.sqlite", 100_000)
        try:
            kept = {outbox.message_id("pi-grace", seq): e for seq, e in outbox.peek(100_000)}
        finally:
            outbox.close()
        # an event stored by JetStream whose ack the stopping agent never read is both in the stream and in the
        # outbox (sent again at the next start, dropped there as a duplicate): each is counted once, by its id
        sent = {e["msg_id"]: e for e in telemetry(s)}
        events = [e for e in {**sent, **kept}.values() if e.get("kind") == "request" and e.get("at", 0) >= before]
        assert len(events) == len(answered), (len(events), len(answered))


def test_the_outbox_is_bounded_drops_oldest_first_and_persists(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite", max_events=5)
    seqs = [box.append({"n": i}) for i in range(8)]
    assert box.pending == 5 and box.dropped == 3
    assert [s for s, _ in box.peek()] == seqs[3:]
    assert [e["n"] for _, e in box.peek()] == [3, 4, 5, 6, 7]
    box.ack(seqs[3])
    box.close()
    again = Outbox(tmp_path / "outbox.sqlite", max_events=5)
    assert again.pending == 4 and again.dropped == 3
    assert again.append({"n": 8}) > seqs[-1]  # a sequence number is never reused
    again.append({"n": 9})  # full again after the reopen: the oldest left (4) goes
    assert again.pending == 5 and again.dropped == 4
    assert [e["n"] for _, e in again.peek()] == [5, 6, 7, 8, 9]
    again.ack(seqs[5])
    again.ack(seqs[5])  # acknowledged twice (a resend): counted once
    assert again.pending == 4
    again.close()


def test_an_outbox_append_is_one_insert_without_fsync_per_commit(tmp_path):
    """The bound is kept without counting the table on every append; commits do not fsync (WAL, NORMAL)."""
    box = Outbox(tmp_path / "outbox.sqlite", max_events=3)
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)  # the SQL this outbox runs, as SQLite sees it
    for i in range(5):
        box.append({"n": i})
    assert box.pending == 3 and box.dropped == 2
    assert not [s for s in statements if "COUNT(" in s.upper()], statements
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    box.close()


class _RecordingJetStream:
    """Stands in for JetStream's publish: records what the fleet loop sends."""

    def __init__(self):
        self.sent: list[tuple[str, dict, dict]] = []

    async def publish(self, subj: str, payload: bytes, timeout: float, headers: dict):
        self.sent.append((subj, json.loads(payload), headers))


def _flushing_agent(outbox: Outbox, js, heartbeat_s: float = HEARTBEAT_S):
    """A FleetAgent with only what `_flush` and `_send` read: its id, heartbeat, outbox, JetStream, link."""
    from types import SimpleNamespace

    from tierline_device_agent.fleet import FleetAgent

    agent = FleetAgent.__new__(FleetAgent)
    agent.device_id, agent.cfg, agent.outbox = DEVICE, SimpleNamespace(heartbeat_s=heartbeat_s), outbox
    agent._fleet, agent._failing = Fleet(js, None, None, None), {}
    agent._nc = SimpleNamespace(is_connected=True, last_error=None)
    return agent


def test_telemetry_message_ids_carry_the_outboxs_own_random_nonce(tmp_path):
    """JetStream deduplicates across the stream: an id another board can guess would get this board's
    events acknowledged as duplicates and never stored."""
    box = Outbox(tmp_path / "a" / "outbox.sqlite", max_events=100)
    other = Outbox(tmp_path / "b" / "outbox.sqlite", max_events=100)
    seqs = [box.append({"n": i}) for i in range(3)]
    js = _RecordingJetStream()
    asyncio.run(_flushing_agent(box, js)._flush())
    ids = [headers["Nats-Msg-Id"] for _, _, headers in js.sent]
    assert [event["seq"] for _, event, _ in js.sent] == seqs and box.pending == 0
    assert all(i != f"{DEVICE}-{seq}" and i.startswith(f"{DEVICE}-") for i, seq in zip(ids, seqs)), ids
    assert len(box.nonce) >= 32 and box.nonce != other.nonce and box.nonce in ids[0]
    nonce = box.nonce
    box.close()
    again = Outbox(tmp_path / "a" / "outbox.sqlite", max_events=100)  # kept in the file: a resend, the same id
    assert again.nonce == nonce and again.message_id(DEVICE, seqs[0]) == ids[0]
    again.close()
    other.close()


def test_a_flush_sends_batch_after_batch_until_the_outbox_is_empty(tmp_path):
    from tierline_device_agent.fleet import FLUSH_BATCH

    box = Outbox(tmp_path / "outbox.sqlite", max_events=10 * FLUSH_BATCH)
    for i in range(2 * FLUSH_BATCH + 200):  # more than one batch arrived within one beat
        box.append({"n": i})
    js = _RecordingJetStream()
    asyncio.run(_flushing_agent(box, js, heartbeat_s=30)._flush())
    assert box.pending == 0 and [e["n"] for _, e, _ in js.sent] == list(range(2 * FLUSH_BATCH + 200))
    box.close()


def test_between_beats_telemetry_is_sent_as_it_arrives(tmp_path):
    """A busy board with the link up: events go out between beats, not only on them, so the outbox
    (here smaller than what arrives in one beat) never fills and drops."""
    box = Outbox(tmp_path / "outbox.sqlite", max_events=300)
    js = _RecordingJetStream()
    agent = _flushing_agent(box, js, heartbeat_s=30)

    def busy():  # 1,000 answers within the beat, 100 at a time
        for i in range(10):
            for j in range(100):
                box.append({"n": 100 * i + j})
            time.sleep(0.3)

    async def send_for(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent._send(), seconds)

    worker = threading.Thread(target=busy)
    worker.start()
    asyncio.run(send_for(4.0))
    worker.join()
    assert box.dropped == 0 and box.pending == 0 and [e["n"] for _, e, _ in js.sent] == list(range(1000))
    box.close()


def test_a_damaged_outbox_file_is_moved_aside_and_a_fresh_one_used(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"\x00garbage" * 512)  # a bad SD card sector: "file is not a database"
    box = Outbox(path, max_events=10)
    assert box.pending == 0 and box.dropped == 0 and box.damaged == 1  # the loss is counted
    assert box.append({"n": 1}) == 1 and [e for _, e in box.peek()] == [{"n": 1}]
    aside = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"\x00garbage" * 512  # kept for a post-mortem
    box.close()
    again = Outbox(path, max_events=10)  # the fresh file is sound: nothing moved aside again
    assert again.pending == 1 and again.damaged == 1 and len(list(tmp_path.glob("*.corrupt-*"))) == 1
    again.close()


def test_a_crash_mid_download_leaves_nothing_behind_after_a_restart(tmp_path):
    store = ModelStore(tmp_path)
    staged = store.staging()  # what a download writes into, then SIGKILL
    (staged / "device" / "model.tflite").write_bytes(b"half a model")
    (store.models / "v1").mkdir()  # an installed version (one that passed its health check) is kept
    store.mark_verified("v1")
    ModelStore(tmp_path)  # the agent starts again
    assert not staged.exists() and [p.name for p in store.models.iterdir()] == ["v1"]


def _install(store: ModelStore, tiny_family: Path, version: str) -> Path:
    """The tiny device model installed as `version`, the way an update does it, and made current."""
    tflite, config = tiny_bytes(tiny_family)
    staged = store.staging()
    (staged / "device" / "model.tflite").write_bytes(tflite)
    (staged / "device" / "config.json").write_bytes(config)
    installed = store.install(staged, desired_model(DEVICE, "tierline-reasoner", version, tflite, config),
                              tiny_family)
    store.activate(version)
    return installed


def test_a_damaged_installed_model_falls_back_to_the_newest_sound_one(tiny_family, tmp_path):
    from types import SimpleNamespace

    from tierline_device_agent.fleet import load_device_model

    manifest = SimpleNamespace(path=tmp_path / "device.yaml", models_path=tiny_family, device_agent=SimpleNamespace(
        device_id=DEVICE, state_dir="state", memory_max_mb=0))
    store = ModelStore(tmp_path / "state")
    v1 = _install(store, tiny_family, "v1")
    time.sleep(0.01)  # newest first goes by the directories' times
    v2 = _install(store, tiny_family, "v2")
    (v2 / "device" / "model.tflite").write_bytes(b"")  # a power loss after the update
    engine, report = load_device_model(manifest, threads=1)
    assert engine.info.version == "v1" and store.current() == v1 and not v2.exists()
    assert report["code"] == OtaCode.LOAD_FAILED and report["version"] == "v2" and "v1" in report["detail"]
    (v1 / "device" / "model.tflite").write_bytes(b"")  # the last installed one too: the board's own model
    engine, report = load_device_model(manifest, threads=1)
    assert engine.info.version == load_engine(tiny_family).info.version and store.current() is None
    assert report["version"] == "v1" and "board's own model" in report["detail"]
    assert load_device_model(manifest, threads=1)[1] is None  # nothing damaged any more: nothing to report
    _install(store, tiny_family, "v3")
    (tmp_path / "state" / "current").unlink()  # no `current` link: the board's own model, as before
    engine, report = load_device_model(manifest, threads=1)
    assert engine.info.version != "v3" and report is None and (store.models / "v3").is_dir()


def _candidate(store: ModelStore, tiny_family: Path, version: str) -> Path:
    """The tiny device model installed as `version` and not (yet) health-checked: the agent loads it next."""
    tflite, config = tiny_bytes(tiny_family)
    staged = store.staging()
    (staged / "device" / "model.tflite").write_bytes(tflite)
    (staged / "device" / "config.json").write_bytes(config)
    return store.install(staged, desired_model(DEVICE, "tierline-reasoner", version, tflite, config), tiny_family)


def test_a_candidate_that_never_passed_its_check_is_never_kept_nor_booted(tiny_family, tmp_path):
    """Only a version that passed its health check counts as installed. The old store kept the two newest folders
    (a candidate the agent died on among them, its folder left on disk), so the next update pruned the last
    verified version, and a damaged current one fell back to the candidate that never passed."""
    from types import SimpleNamespace

    from tierline_device_agent.fleet import load_device_model

    manifest = SimpleNamespace(path=tmp_path / "device.yaml", models_path=tiny_family, device_agent=SimpleNamespace(
        device_id=DEVICE, state_dir="state", memory_max_mb=0))
    store = ModelStore(tmp_path / "state")
    v2 = _install(store, tiny_family, "v2")  # passed its check: current
    time.sleep(0.01)
    v3 = _candidate(store, tiny_family, "v3")  # being checked when the agent died (SIGKILL, the OOM killer)
    time.sleep(0.01)
    v4 = _install(store, tiny_family, "v4")  # the next update that passed: the rollback set is v4 and v2
    assert v2.is_dir() and not v3.exists() and store.installed() == [v4, v2]
    v5 = _candidate(store, tiny_family, "v5")
    store = ModelStore(tmp_path / "state")  # the agent starts again after dying on v5: removed
    assert not v5.exists() and store.installed() == [v4, v2]
    (v4 / "device" / "model.tflite").write_bytes(b"")  # a power loss after the update
    v6 = _candidate(store, tiny_family, "v6")  # and a candidate left on disk, the newest folder
    engine, report = load_device_model(manifest, threads=1)
    assert engine.info.version == "v2" and store.current() == v2 and not v4.exists() and not v6.exists()
    assert report["version"] == "v4" and report["detail"].endswith("serving v2"), report
    (v2 / "verified").unlink()  # a version made current by an agent that did not mark versions yet
    assert ModelStore(tmp_path / "state").current() == v2 and (v2 / "verified").is_file()


@contextlib.contextmanager
def slow_check_board(tiny_family: Path):
    """A registered board whose health check of a candidate takes about 2 s (1000 problems, any accuracy passes):
    time to kill or stop the agent in it. Yields the stack and the board's state dir."""
    overrides = {
        "device_agent": {"device_id": DEVICE, "heartbeat_s": HEARTBEAT_S, "stale_after_beats": 3,
                         "memory_max_mb": MEMORY_MAX_MB, "health_min_token_accuracy": 0.0,
                         "health_problems": 1000},
    }
    with Stack(tiny_family, tiers=("device",), router=False, jetstream=True, overrides=overrides) as s:
        wait_for(lambda: reported(s)["status"] == "serving", "the board registered")
        yield s, s.workdir / "device-state"


def test_an_update_the_agent_dies_in_is_reported_and_not_tried_forever(tiny_family):
    """SIGKILL while the candidate is health-checked (the OOM killer, a crash in the runtime on that model, a power
    cut): the next boot removes the candidate, reports the crash and tries once more; after the second crash the
    board serves on and does not try that manifest again until a new one is set. The old agent left the
    candidate on disk, reported nothing and retried it on every boot: a model that kills the agent crash-looped it."""
    tflite, config = tiny_bytes(tiny_family)
    with slow_check_board(tiny_family) as (s, state):
        before = reported(s)["model"]["version"]
        publish(s, "v-crash", tflite, config)
        for attempt in (1, 2):
            wait_for(lambda: (state / "models" / "v-crash" / "manifest.json").is_file()
                     and reported(s)["status"] == "updating", f"attempt {attempt}: the candidate installed")
            time.sleep(0.3)  # loaded, being checked
            s.kill("device-0")
            s.procs.remove(next(p for p in s.procs if p.name == "device-0"))
            s.start_process("device-0", "tierline_device_agent")

            def crash_reported():
                return [e for e in telemetry(s) if e["kind"] == "ota" and e["version"] == "v-crash"
                        and e["code"] in (OtaCode.LOAD_FAILED, OtaCode.HEALTH_CHECK_FAILED)]

            events = wait_for(lambda: len(crash_reported()) >= attempt and crash_reported(),
                              f"attempt {attempt}: the crash reported")
            assert f"attempt {attempt} of 2" in events[-1]["detail"], events
            assert f"serving {before}" in events[-1]["detail"], events
        assert events[0]["detail"].endswith("; tried again") and "not tried again" in events[-1]["detail"], events
        time.sleep(20 * HEARTBEAT_S)  # twenty beats: the old agent tried again at once
        r = reported(s)
        assert r["model"]["version"] == before and r["status"] == "serving", r
        assert r["ota"]["version"] == "v-crash" and "not tried again" in r["ota"]["detail"], r["ota"]
        assert not (state / "models" / "v-crash").exists()
        assert ask(s).model_version == before
        assert len(crash_reported()) == 2  # once per crash, not again on the beats after
        publish(s, "v-next", tflite, config)  # a new desired model is tried
        assert update_outcome(s, "v-next")["ota"]["code"] == OtaCode.APPLIED


def test_an_update_the_agent_is_stopped_in_is_no_crash(tiny_family):
    """Found by a review: SIGTERM (a systemd restart, an agent upgrade, a reboot) while the candidate is health-checked
    left its attempt record as a crash's; the next boot reported "the agent stopped while health-checking" and
    counted it against the two tries, so two clean restarts gave the manifest up. A stop drops the candidate and its
    record now, and the next start tries the update as if for the first time."""
    import signal

    tflite, config = tiny_bytes(tiny_family)
    with slow_check_board(tiny_family) as (s, state):
        publish(s, "v-stop", tflite, config)

        def checking() -> bool:  # the attempt record says the candidate is in its health check
            try:
                return json.loads((state / "attempt.json").read_text())["step"] == "health_check"
            except (OSError, ValueError, KeyError):
                return False

        wait_for(checking, "the candidate in its health check")  # checked about 2 s: polled every 0.1 s
        s.kill("device-0", signal.SIGTERM)
        assert not (state / "attempt.json").exists() and not (state / "models" / "v-stop").exists()
        s.procs.remove(next(p for p in s.procs if p.name == "device-0"))
        s.start_process("device-0", "tierline_device_agent")
        assert update_outcome(s, "v-stop")["ota"]["code"] == OtaCode.APPLIED
        assert not [e for e in telemetry(s) if e["kind"] == "ota" and e["version"] == "v-stop"
                    and e["code"] in (OtaCode.LOAD_FAILED, OtaCode.HEALTH_CHECK_FAILED)]


def _desired(**change) -> dict:
    raw = desired_model(DEVICE, "tierline-reasoner", "v1", b"weights", b"{}").to_dict()
    for key, value in change.items():
        if key in ("tflite", "config"):
            raw[key] = {**raw[key], "object": value}
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("change", [
    {"version": "v1\n"}, {"version": 7}, {"version": True}, {"version": None}, {"version": 1.5},
    {"version": "../up"}, {"name": 7}, {"name": "reasoner\n"}, {"name": ""}, {"device": 7},
    {"tflite": "v1/model.tflite\n"}, {"tflite": "../v1/model.tflite"}, {"config": 7}, {"config": "/etc/passwd"},
])
def test_a_desired_model_takes_only_plain_strings_as_names(change):
    DesiredModel.from_dict(_desired())  # the same record, unchanged, is fine
    with pytest.raises(OtaError) as err:
        DesiredModel.from_dict(_desired(**change))
    assert err.value.code == OtaCode.BAD_REQUEST


def test_the_fleet_view_names_a_device_by_its_key_and_marks_bad_entries_invalid():
    good = {"device_id": "pi-a", "status": "serving", "last_heartbeat": 100.0, "heartbeat_s": 1,
            "stale_after_beats": 3, "model": {"version": "v1"}, "load": {"queue": 0, "requests": 2, "rss_mb": 9.5},
            "arch": "aarch64", "outbox": {"pending": 0, "dropped": 0}, "ota": None}
    rows = fleet_rows({"pi-a": json.dumps(good).encode(),
                       "pi-b": json.dumps({**good, "model": {"version": "EVIL"}}).encode(),  # claims to be pi-a
                       "pi-c": b"{}", "pi-d": b"not json", "pi-e": b"[1]",
                       "pi-f": json.dumps({**good, "device_id": "pi-f", "arch": "x\x1b[2J"}).encode(),
                       "pi-g": json.dumps({**good, "device_id": "pi-g", "load": None}).encode()}, now=101.0)
    assert [r["device"] for r in rows] == ["pi-a", "pi-b", "pi-c", "pi-d", "pi-e", "pi-f", "pi-g"]
    assert rows[0]["state"] == "serving" and rows[0]["model"] == "v1"
    assert [r["state"] for r in rows[1:]] == ["invalid"] * 6 and "EVIL" not in json.dumps(rows)
    assert "pi-a" in rows[1]["invalid"] and rows[3]["invalid"] == "not JSON"
    render(rows)  # every row fills every column



def test_one_boards_own_entry_cannot_break_the_fleet_view():
    """What a stolen board may write, its own entry, against a fleet of 100: a 900 KB version padded every row to
    900,091 columns (90 MB for `tierline devices list`), a heartbeat years ahead kept a revoked board `serving`
    for good, and NaN made `--json` invalid JSON. Texts are now cut (marked), and a row whose numbers are not
    finite or bounded, whose heartbeat settings no manifest allows or whose heartbeat is ahead of the clock
    (beyond a clock's skew) is invalid."""
    now = 1_000_000.0
    good = {"status": "serving", "last_heartbeat": now, "heartbeat_s": 30, "stale_after_beats": 3,
            "model": {"version": "v1"}, "load": {"queue": 0, "requests": 2, "rss_mb": 9.5}, "arch": "aarch64",
            "outbox": {"pending": 0, "dropped": 0}, "ota": {"status": "applied", "code": 0}}
    fleet = {f"pi-{i:03d}": json.dumps({**good, "device_id": f"pi-{i:03d}"}).encode() for i in range(100)}

    def entry(board: str, **change) -> bytes:
        return json.dumps({**good, "device_id": board, **change}).encode()

    fleet.update({
        "pi-long": entry("pi-long", model={"version": "x" * 900_000}, arch="y" * 1000,
                         ota={"status": "z" * 1000, "code": "w" * 1000}),
        "pi-ahead": entry("pi-ahead", last_heartbeat=now + 10 * 365 * 86400),
        "pi-skewed": entry("pi-skewed", last_heartbeat=now + 60),  # a clock a minute fast: believed
        "pi-nan": entry("pi-nan").replace(str(now).encode(), b"NaN"),
        "pi-inf": entry("pi-inf", load={"queue": 0, "requests": 1e400, "rss_mb": 1.0}),  # Infinity in JSON
        "pi-huge": entry("pi-huge", load={"queue": 10 ** 3000, "requests": 1, "rss_mb": 1.0}),
        "pi-forever": entry("pi-forever", heartbeat_s=1e12),  # never stale under its own rule
        "pi-code": entry("pi-code", ota={"status": "applied", "code": 10 ** 3000}),
        "pi-" + "k" * 200: entry("pi-" + "k" * 200),  # a key no board has (ids are at most 64 characters)
    })
    rows = {r["device"]: r for r in fleet_rows(fleet, now=now)}
    table = render(list(rows.values()))
    assert max(len(line) for line in table.splitlines()) < 400 and len(table) < 400 * 110, len(table)
    long = rows["pi-long"]
    assert long["state"] == "serving" and long["model"] == "x" * 63 + "…" and len(long["arch"]) == 64
    assert long["ota"].endswith("…") and long["code"].endswith("…")
    assert rows["pi-skewed"]["state"] == "serving" and rows["pi-skewed"]["beat_age_s"] == 0
    for board in ("pi-ahead", "pi-nan", "pi-inf", "pi-huge", "pi-forever", "pi-code"):
        assert rows[board]["state"] == "invalid", (board, rows[board])
    assert "ahead" in rows["pi-ahead"]["invalid"] and "heartbeat_s" in rows["pi-forever"]["invalid"]
    assert any(d.endswith("…") and len(d) == 64 for d in rows)
    assert fleet_rows({"pi-ahead": fleet["pi-ahead"]}, now=now + 86400)[0]["state"] == "invalid"  # a day later
    out = json.dumps({"devices": list(rows.values())}, allow_nan=False)  # raises on NaN or Infinity
    assert len(out) < 500 * 110
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in --json"))


# -- configuration and CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("fleet, field", [
    ({"device_id": "pi-1", "heartbeat_s": 0}, "device_agent.heartbeat_s"),
    ({"device_id": "pi-1", "credential": "a shared secret"}, "device_agent.credential"),  # replaced by identities
    ({"device_id": "pi 1"}, "device_id"),
    ({"device_id": "pi-1", "outbox_max_events": 0}, "device_agent.outbox_max_events"),
    ({"device_id": "pi-1", "colour": "red"}, "device_agent.colour"),
    ({"device_id": "pi-1", "health_min_token_accuracy": 2}, "device_agent.health_min_token_accuracy"),
    ({"device_id": "pi-1", "update_keys": ["ed25519:not-a-key"]}, "update_keys[0]"),
])
def test_bad_device_agent_config_names_the_field(tmp_path, fleet, field):
    import yaml

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model_name": "m", "models_dir": ".", "tiers": {}, "device_agent": fleet}))
    with pytest.raises(ManifestError) as err:
        load_manifest(path, check_artifacts=False)
    assert field in str(err.value) and str(path) in str(err.value)


def test_two_boards_given_different_files_under_one_version_keep_their_own():
    """The model store is shared by every board: objects are named by their content, so publishing `v3` to one
    board and another `v3` to the next does not replace the first's files (the first, still offline, found the
    second's bytes and refused them for good as digest_mismatch)."""
    first = desired_model(DEVICE, "tierline-reasoner", "v3", b"weights of board 1", b"{}")
    second = desired_model("pi-other", "tierline-reasoner", "v3", b"weights of board 2", b"{}")
    assert first.tflite.object != second.tflite.object
    assert first.config.object == second.config.object  # the same bytes may share one object
    assert first.tflite.object == f"{first.tflite.sha256}/model.tflite"


def test_set_model_refuses_bad_input_in_one_line(agent, tiny_family, tmp_path):
    missing = run_cli("devices", "set-model", "--manifest", str(agent.manifest), "--device", DEVICE,
                      "--tflite", str(tmp_path / "none.tflite"), "--version", "v9", timeout=60)
    assert missing.returncode == 2 and "none.tflite" in missing.stderr and "Traceback" not in missing.stderr
    bad_version = run_cli("devices", "set-model", "--manifest", str(agent.manifest), "--device", DEVICE,
                          "--tflite", str(tiny_family / "device" / "model.tflite"), "--version", "../up", timeout=60)
    assert bad_version.returncode == 2 and "--version" in bad_version.stderr
    assert len(bad_version.stderr.strip().splitlines()) == 1


def test_pi_profile_bench_reports_speed_latency_and_rss(tiny_family):
    proc = run_cli("devices", "bench", "--profile", "pi", "--models", str(tiny_family), "--prompts", "4",
                   "--repeats", "2", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["profile"] == "pi" and r["threads"] == 1 and r["cores"] == 1 and len(r["cpus"]) == 1
    for key in ("decode_tokens_per_s", "tokens_per_s", "first_token_ms_p50", "first_token_ms_p95", "rss_mib",
                "peak_rss_mib"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["peak_rss_mib"] >= r["rss_mib"] and len(r["decode_tokens_per_s_runs"]) == 2
    assert r["params"] > 0 and r["bytes"] == (tiny_family / "device" / "model.tflite").stat().st_size
    text = run_cli("devices", "bench", "--models", str(tiny_family), "--prompts", "2", timeout=120)
    assert text.returncode == 0 and "decode" in text.stdout and "median of 1" in text.stdout, text.stderr


def test_pi_profile_bench_on_a_missing_family_is_one_line(tmp_path):
    proc = run_cli("devices", "bench", "--models", str(tmp_path / "nowhere"), timeout=60)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# -- signed updates ------------------------------------------------------------------------------------
def _refused(agent, version: str, code: OtaCode) -> None:
    """The update to `version` was refused with `code` before anything was downloaded; the model serves on."""
    before = reported(agent)["model"]["version"]
    state = update_outcome(agent, version)
    assert state["ota"]["code"] == code, state["ota"]
    assert "refused" in state["ota"]["detail"]
    assert state["model"]["version"] == before and ask(agent).model_version == before
    models = agent.workdir / "device-state" / "models"
    assert not (models / version).exists() and not list(models.glob(".incoming-*"))


def test_an_update_signed_by_another_key_is_refused_before_download(agent, broken_model):
    """The attack of issue 24: a perturbed model with its own matching sha256, announced by someone who can
    write the desired record (here with the operator's NATS identity) but does not hold the signing key."""
    from tierline_shared.security.signing import generate_key

    publish(agent, "v-attacker", broken_model.read_bytes(), (broken_model.parent / "config.json").read_bytes(),
            key=generate_key())
    _refused(agent, "v-attacker", OtaCode.BAD_SIGNATURE)


def test_an_unsigned_update_is_refused(agent, tiny_family):
    tflite, config = tiny_bytes(tiny_family)
    unsigned = desired_model(DEVICE, "tierline-reasoner", "v-unsigned", tflite, config)
    fleet_call(agent, lambda f: f.desired.put(DEVICE, json.dumps(unsigned.to_dict()).encode()))
    _refused(agent, "v-unsigned", OtaCode.UNSIGNED)


def test_an_expired_update_is_refused(agent, tiny_family):
    tflite, config = tiny_bytes(tiny_family)
    publish(agent, "v-expired", tflite, config, expires_in_s=-60)  # signed properly, a minute too late
    _refused(agent, "v-expired", OtaCode.EXPIRED)


def test_a_board_rebooted_after_its_models_manifest_expired_still_reports_it_applied(agent, tiny_family):
    """It serves exactly its desired model, whose signed manifest expired since (7 days by default): nothing to
    refuse. The old agent checked the expiry first and reported `expired` (28) after every such reboot."""
    tflite, config = tiny_bytes(tiny_family)
    desired = publish(agent, "v-expiring", tflite, config, expires_in_s=4)
    assert update_outcome(agent, "v-expiring")["ota"]["code"] == OtaCode.APPLIED
    time.sleep(max(desired.expires - time.time() + 0.5, 0))
    restarted = time.time()
    agent.restart("device-0", "tierline_device_agent")  # a reboot, a power cycle, an agent upgrade
    state = wait_for(lambda: (r := reported(agent))["ota"] and r["ota"]["at"] >= restarted and r,
                     "the desired model checked after the reboot")
    assert state["ota"]["code"] == OtaCode.APPLIED and state["ota"]["version"] == "v-expiring", state["ota"]
    assert state["ota"]["detail"] == "already serving this version"
    assert state["model"]["version"] == "v-expiring"


def test_an_older_signed_update_is_refused_as_a_downgrade(agent, tiny_family):
    tflite, config = tiny_bytes(tiny_family)
    current = publish(agent, "v-current", tflite, config)
    assert update_outcome(agent, "v-current")["ota"]["code"] == OtaCode.APPLIED
    publish(agent, "v-older", tflite, config, sequence=current.sequence - 1)  # genuine, signed, but older
    _refused(agent, "v-older", OtaCode.DOWNGRADE)


def test_an_older_update_replayed_after_a_newer_one_failed_is_refused(agent, tiny_family, broken_model):
    """The bound is the newest manifest the board has verified, not the one it installed: a newer update that
    failed (here its health check; a download alike) left the installed sequence below an older manifest, which
    someone holding it (a captured record, a stale copy) puts back as the desired model."""
    from tierline_shared.security.signing import sign

    tflite, config = tiny_bytes(tiny_family)
    key = read_private_key(agent.credentials / SIGNING_KEY)
    older = desired_model(DEVICE, "tierline-reasoner", "v-replayed", tflite, config)  # genuine, never sent
    publish(agent, "v-newer-failed", broken_model.read_bytes(), (broken_model.parent / "config.json").read_bytes(),
            sequence=older.sequence + 1)
    assert update_outcome(agent, "v-newer-failed")["ota"]["code"] == OtaCode.HEALTH_CHECK_FAILED

    async def replay(fleet):  # its objects are in the store; the old signed record is put back
        for art, data in ((older.tflite, tflite), (older.config, config)):
            await fleet.models.put(art.object, data)
        await fleet.desired.put(DEVICE, sign(older.to_dict(), key))

    fleet_call(agent, replay)
    _refused(agent, "v-replayed", OtaCode.DOWNGRADE)


# -- a stolen board, a failed install, a re-created store (run last: they change the fleet's state) ------
@pytest.fixture(scope="module")
def thief(agent) -> str:
    """A second board's identity (stolen): the server lets it write only its own key and subject."""
    IdentityStore(agent.credentials).create(device_identity(THIEF))
    agent.nats.reload()
    accepted(agent.nats_options(device_identity(THIEF)))
    return device_identity(THIEF)


def as_board(stack: Stack, identity: str, work):
    async def run():
        nc = await connect(stack.nats_options(identity), name="thief")
        try:
            return await work(nc.jetstream(timeout=5))
        finally:
            await nc.close()

    return asyncio.run(run())


def test_another_board_cannot_have_this_boards_telemetry_deduplicated_away(agent, thief):
    before = time.time()
    ask(agent)  # its event stored: every request event after it is one of the ten answers' below
    last = wait_for(lambda: max((e["seq"] for e in telemetry(agent) if e.get("device_id") == DEVICE
                                 and e["kind"] == "request" and e["at"] >= before), default=0),
                    "this answer's event stored")

    async def forge(js):  # on its own subject, the ids the agent would give its next events (`<id>-<seq>`)
        for seq in range(last + 1, last + 41):
            await js.publish(subject_of(THIEF), b'{"kind": "noise"}', headers={"Nats-Msg-Id": f"{DEVICE}-{seq}"})

    as_board(agent, thief, forge)
    answers = [ask(agent) for _ in range(10)]

    def stored() -> list[dict]:  # the answers' events in the stream (the old ids: acknowledged, never stored)
        return [e for e in telemetry(agent) if e.get("device_id") == DEVICE and e["seq"] > last
                and e["kind"] == "request"]

    wait_for(lambda: len(stored()) >= len(answers), "the answers' events stored")
    assert len(stored()) == len(answers)


def subject_of(board: str) -> str:
    return subject("telemetry", board)


def test_devices_list_trusts_the_key_not_the_body(agent, thief):
    real = wait_for(lambda: reported(agent), "the board registered")

    def listed() -> dict:
        proc = run_cli("devices", "list", "--manifest", str(agent.manifest), "--json", timeout=60)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return {row["device"]: row for row in json.loads(proc.stdout)["devices"]}

    spoof = {**real, "model": {**real["model"], "version": "EVIL"}, "last_heartbeat": time.time() + 10**6}
    try:
        for body in (json.dumps(spoof).encode(), b"{}", b"not json"):  # its own key: the server allows it
            as_board(agent, thief, lambda js, body=body: js.publish(f"$KV.{DEVICES_BUCKET}.{THIEF}", body))
            rows = listed()
            assert rows[THIEF]["state"] == "invalid", rows[THIEF]
            assert rows[DEVICE]["model"] == real["model"]["version"] and rows[DEVICE]["state"] == "serving"
            assert "EVIL" not in json.dumps(rows)
    finally:
        fleet_call(agent, lambda f: f.devices.purge(THIEF))



def test_a_stolen_boards_own_entry_cannot_break_devices_list(agent, thief):
    """With only its own rights the thief writes its own entry: a 900 KB version (every row of the table was padded
    to it), a heartbeat years ahead (`serving` for good, though it beats no more), NaN (`--json` not JSON)."""
    real = wait_for(lambda: reported(agent), "the board registered")
    own = {**real, "device_id": THIEF}

    def listed(*flags: str) -> str:
        proc = run_cli("devices", "list", "--manifest", str(agent.manifest), *flags, timeout=60)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc.stdout

    def strict(out: str) -> dict:
        return {row["device"]: row for row in json.loads(out, parse_constant=lambda c: pytest.fail(c))["devices"]}

    def write(body: dict) -> None:
        data = json.dumps(body).encode()  # NaN as Python writes it
        as_board(agent, thief, lambda js: js.publish(f"$KV.{DEVICES_BUCKET}.{THIEF}", data))

    try:
        write({**own, "model": {**real["model"], "version": "x" * 900_000}})
        table = listed()
        assert len(table) < 5000 and max(len(line) for line in table.splitlines()) < 400, len(table)
        assert "x" * 63 + "…" in table and "x" * 65 not in table
        for body, why in (({**own, "last_heartbeat": time.time() + 3e8}, "ahead"),
                          ({**own, "last_heartbeat": math.nan}, "last_heartbeat")):
            write(body)
            rows = strict(listed("--json"))
            assert rows[THIEF]["state"] == "invalid" and why in rows[THIEF]["invalid"], rows[THIEF]
            assert rows[DEVICE]["state"] == "serving"
    finally:
        fleet_call(agent, lambda f: f.devices.purge(THIEF))


def board_requests(stack: Stack, identity: str, requests: list[tuple[str, dict]]) -> list[str]:
    """Each (subject, body) asked as `identity`, each on a connection of its own: the server's answer, or its
    refusal (a permissions violation reaches the client apart from the request, which then times out)."""
    async def one(subj: str, body: dict) -> str:
        nc = await connect(stack.nats_options(identity), name="thief")
        try:
            return (await nc.request(subj, json.dumps(body).encode(), timeout=2)).data.decode()
        except nats.errors.TimeoutError:
            return f"refused: {nc.last_error}"
        finally:
            await nc.close()

    async def run():
        return await asyncio.gather(*(one(subj, body) for subj, body in requests))

    return asyncio.run(run())


def test_a_stolen_board_cannot_have_the_model_store_pushed_to_another_subject(agent, thief):
    """A consumer's deliver subject is in its request's body, which permissions do not see: a board allowed to
    create consumers on the model store could have the server push the store's messages anywhere (here the
    edge tier's requests; another board's desired key or the telemetry stream alike). Boards read objects by
    direct gets: the OTA tests above install models with this board's rights."""
    store, target = f"OBJ_{MODELS_BUCKET}", subject("edge", "infer")
    config = {"deliver_subject": target, "deliver_policy": "all", "ack_policy": "none"}

    async def attack():
        nc = await connect(agent.nats_options(), name="test")  # the operator watches the target subject
        try:
            pushed = await nc.subscribe(target)
            answers = await asyncio.to_thread(board_requests, agent, thief, [
                (f"$JS.API.CONSUMER.CREATE.{store}", {"stream_name": store, "config": config}),
                (f"$JS.API.CONSUMER.CREATE.{store}.grab", {"stream_name": store, "config": {**config, "name": "grab"}}),
                (f"$JS.API.CONSUMER.DURABLE.CREATE.{store}.grab2",
                 {"stream_name": store, "config": {**config, "durable_name": "grab2"}})])
            await asyncio.sleep(0.5)
            return answers, pushed.pending_msgs, (await nc.jetstream().stream_info(store)).state.consumer_count
        finally:
            js = nc.jetstream()
            for info in await js.consumers_info(store):  # what the attack made, if it made anything
                await js.delete_consumer(store, info.name)
            await nc.close()

    answers, pushed, consumers = asyncio.run(attack())
    assert all(a.startswith("refused") and "permissions violation" in a for a in answers), answers
    assert pushed == 0 and consumers == 0


def test_a_stolen_board_cannot_write_bytes_of_its_choosing_into_another_bucket(agent, thief):
    """The server answers a request on the reply subject the request names, and a stream capturing that subject
    stores the answer. A board that could read back its own registry entry (bytes it wrote) could so plant them
    in any bucket (the API keys', a batch's results): it writes its entry and never reads it."""
    target = "tierline_test_target"  # any bucket of the account: the API keys' would be the prize

    async def attack() -> tuple[list, str]:
        op = await connect(agent.nats_options(), name="test")
        board = await connect(agent.nats_options(thief), name="thief")
        try:
            await op.jetstream().create_key_value(bucket=target)
            await board.publish(f"$KV.{DEVICES_BUCKET}.{THIEF}", b'{"planted": true}')  # its own entry: allowed
            await board.publish(f"$JS.API.DIRECT.GET.KV_{DEVICES_BUCKET}.$KV.{DEVICES_BUCKET}.{THIEF}", b"",
                                reply=f"$KV.{target}.hash.planted")
            await board.flush(timeout=TIMEOUT)
            await asyncio.sleep(0.5)
            return sorted(await kv_entries(op.jetstream(), target)), str(board.last_error)
        finally:
            with contextlib.suppress(Exception):
                await op.jetstream().delete_key_value(target)
            await board.close()
            await op.close()

    try:
        planted, refusal = asyncio.run(attack())
    finally:
        fleet_call(agent, lambda f: f.devices.purge(THIEF))
    assert planted == [] and "permissions violation" in refusal.lower(), (planted, refusal)


def test_a_stolen_board_cannot_list_the_other_boards(agent, thief):
    """Stream info with a subjects filter lists every subject of a stream and its count: on the fleet's buckets
    and the telemetry stream, every board's id. A board needs none: it binds its buckets by name."""
    before = wait_for(lambda: reported(agent), "the board registered")["last_heartbeat"]
    streams = (f"KV_{DEVICES_BUCKET}", f"KV_{DESIRED_BUCKET}", TELEMETRY_STREAM, f"OBJ_{MODELS_BUCKET}")
    answers = board_requests(agent, thief, [(f"$JS.API.STREAM.INFO.{s}", {"subjects_filter": ">"}) for s in streams]
                             + [("$JS.API.STREAM.NAMES", {})])
    assert all(a.startswith("refused") and "permissions violation" in a for a in answers), answers
    assert not [a for a in answers if DEVICE in a]
    # and the board itself, with the same rights as the thief's, still beats and sends telemetry
    wait_for(lambda: reported(agent)["last_heartbeat"] > before, "a heartbeat")
    asked = time.time()
    ask(agent)
    wait_for(lambda: [e for e in telemetry(agent) if e["kind"] == "request" and e["at"] >= asked], "its telemetry")


def _heartbeat_lags(stack: Stack, seconds: float) -> list[float]:
    """How old the board's reported heartbeat is, read every 0.1 s for `seconds`."""
    lags, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        lags.append(time.time() - reported(stack)["last_heartbeat"])
        time.sleep(0.1)
    return lags


def _agent_log(stack: Stack) -> str:
    return (stack.workdir / "device-0.log").read_text(errors="replace")


def test_without_the_telemetry_stream_heartbeats_and_updates_go_on(agent, tiny_family):
    """A telemetry failure fails alone: with the stream deleted (by the operator) the board still beats and
    installs updates, and keeps its events in the outbox, none dropped, until the operator provisions the
    stream again (a board may not create it); then they are sent."""
    wait_for(lambda: reported(agent)["outbox"]["pending"] == 0, "an empty outbox")
    dropped, since = reported(agent)["outbox"]["dropped"], time.time()
    fleet_call(agent, lambda f: f.js.delete_stream(TELEMETRY_STREAM))
    try:
        answers = [ask(agent) for _ in range(5)]
        wait_for(lambda: reported(agent)["outbox"]["pending"] >= len(answers), "the events kept in the outbox")
        lags = _heartbeat_lags(agent, 3.0)  # longer than the bound: a stalled loop shows
        assert max(lags) < 10 * HEARTBEAT_S, lags  # the old loop stalled ~5 s a beat (a refused re-create)
        tflite, config = tiny_bytes(tiny_family)
        update = desired_model(DEVICE, "tierline-reasoner", "v-no-telemetry", tflite, config)
        key = read_private_key(agent.credentials / SIGNING_KEY)
        fleet_call(agent, lambda f: publish_model(f, update, key, tflite, config), create=False)
        assert update_outcome(agent, "v-no-telemetry")["ota"]["code"] == OtaCode.APPLIED
        state = reported(agent)
        assert state["outbox"]["pending"] >= len(answers) + 1 and state["outbox"]["dropped"] == dropped, state
        assert "fleet: telemetry failed: NoStreamResponseError" in _agent_log(agent)
    finally:
        asyncio.run(provision_fleet(agent.nats_options()))  # the operator provisions the fleet again
    state = wait_for(lambda: (r := reported(agent))["outbox"]["pending"] == 0 and r, "the outbox sent")
    assert state["outbox"]["dropped"] == dropped
    sent = [e for e in telemetry(agent) if e["at"] >= since]
    assert len([e for e in sent if e["kind"] == "request"]) == len(answers)
    assert [e for e in sent if e["kind"] == "ota" and e["version"] == "v-no-telemetry" and e["code"] == 0]
    assert "fleet: telemetry works again" in _agent_log(agent)


def test_a_refused_telemetry_publish_delays_no_heartbeat_and_is_logged_with_its_cause(agent):
    """The server refuses a publish apart from the request (it then times out, JS_TIMEOUT_S): the drain waits
    on its own task, heartbeats go on, and the log names the refusal."""
    wait_for(lambda: reported(agent)["outbox"]["pending"] == 0, "an empty outbox")
    dropped = reported(agent)["outbox"]["dropped"]
    conf = agent.credentials / "nats-auth.conf"
    allowed = conf.read_text()
    own = json.dumps(subject_of(DEVICE))
    assert own in allowed
    conf.write_text(allowed.replace(own, json.dumps(subject_of(DEVICE) + "-not")))  # its telemetry refused
    agent.nats.reload()
    try:
        def kept() -> bool:  # asked until the board's events stay in its outbox (the reload applied)
            ask(agent)
            return reported(agent)["outbox"]["pending"] >= 3

        wait_for(kept, "the events kept in the outbox")
        lags = _heartbeat_lags(agent, 6.0)  # longer than one refused publish's timeout
        assert max(lags) < 10 * HEARTBEAT_S, lags
        def said() -> list[str]:  # the fleet's own line: the telemetry failure, with the refusal it met
            return [x for x in _agent_log(agent).splitlines()
                    if "fleet: telemetry failed" in x and "permissions violation for publish to" in x]

        line = wait_for(lambda: said() and said()[0], "the refusal in the fleet's log line")
        assert subject_of(DEVICE) in line, line
    finally:
        conf.write_text(allowed)
        agent.nats.reload()
    state = wait_for(lambda: (r := reported(agent))["outbox"]["pending"] == 0 and r, "the outbox sent")
    assert state["outbox"]["dropped"] == dropped


def test_an_install_that_fails_on_the_board_is_reported_once_not_retried(agent, tiny_family):
    """Not the link (here the version's directory cannot be made; a full disk alike): a terminal code."""
    tflite, config = tiny_bytes(tiny_family)
    blocker = agent.workdir / "device-state" / "models" / "v-blocked"
    blocker.write_bytes(b"a file where the version's directory goes")
    try:
        publish(agent, "v-blocked", tflite, config)
        state = update_outcome(agent, "v-blocked")

        def tries() -> list[dict]:
            return [e for e in telemetry(agent) if e["kind"] == "ota" and e["version"] == "v-blocked"
                    and e["code"] != OtaCode.IN_PROGRESS]

        wait_for(tries, "the failed install's event stored")
        time.sleep(10 * HEARTBEAT_S)  # ten beats: the old agent tried (and reported) again on each
        beaten = time.time()  # then every event those beats made is sent: a heartbeat after them says so
        wait_for(lambda: (r := reported(agent))["last_heartbeat"] > beaten and r["outbox"]["pending"] == 0,
                 "the events of those beats sent")
        sent = tries()
    finally:
        blocker.unlink()
    assert len(sent) == 1, sent
    assert state["ota"]["status"] == "install_failed" and "not retried" in state["ota"]["detail"], state["ota"]
    assert reported(agent)["model"]["version"] == state["model"]["version"] != "v-blocked"
    assert not list((agent.workdir / "device-state" / "models").glob(".incoming-*"))


def test_a_new_update_after_the_store_is_recreated_is_applied(agent, tiny_family):
    """A fresh JetStream store starts revisions from 1 again: the same revision, another record."""
    tflite, config = tiny_bytes(tiny_family)
    publish(agent, "v-before-wipe", tflite, config)
    assert update_outcome(agent, "v-before-wipe")["ota"]["code"] == OtaCode.APPLIED
    handled = fleet_call(agent, lambda f: f.desired.get(DEVICE)).revision
    agent.nats.stop()
    shutil.rmtree(agent.workdir / "jetstream")  # a new server, a replaced disk
    restarted = time.time()
    agent.nats.start()
    asyncio.run(provision_fleet(agent.nats_options()))  # the operator provisions the fleet again
    wait_for(lambda: reported(agent)["last_heartbeat"] > restarted, "the board registered again", timeout=60)

    async def fill(fleet):  # other keys, so the board's next record lands on the revision it handled
        for i in range(handled - 1):
            await fleet.desired.put(f"filler-{i}", b"{}")

    fleet_call(agent, fill)
    publish(agent, "v-after-wipe", tflite, config)
    assert fleet_call(agent, lambda f: f.desired.get(DEVICE)).revision == handled
    state = update_outcome(agent, "v-after-wipe")
    assert state["ota"]["code"] == OtaCode.APPLIED and state["model"]["version"] == "v-after-wipe", state["ota"]


def test_a_board_whose_installed_model_is_damaged_boots_on_the_one_before(agent, tiny_family):
    models = agent.workdir / "device-state" / "models"
    before = reported(agent)["model"]["version"]
    fallback = before if (models / before).is_dir() else "the board's own model"
    tflite, config = tiny_bytes(tiny_family)
    publish(agent, "v-damaged", tflite, config)
    assert update_outcome(agent, "v-damaged")["ota"]["code"] == OtaCode.APPLIED
    (models / "v-damaged" / "device" / "model.tflite").write_bytes(b"")  # a power loss after the update
    restarted = time.time()
    agent.restart("device-0", "tierline_device_agent")  # it comes up (it used to exit with the sha256 error)
    assert ask(agent).choices[0].finish_reason
    event = wait_for(lambda: next((e for e in telemetry(agent) if e["kind"] == "ota" and e["at"] >= restarted), None),
                     "the report of the damaged model")
    assert event["code"] == OtaCode.LOAD_FAILED and event["version"] == "v-damaged", event
    assert event["detail"].endswith(f"serving {fallback}"), event
    # its desired model is still v-damaged: the board installs it again
    wait_for(lambda: (r := reported(agent))["model"]["version"] == "v-damaged" and r["ota"]["code"] == 0,
             "v-damaged installed again")


def test_a_name_the_import_takes_is_pushed_to_the_board_and_served_under_it(agent, tiny_family):
    """`set-model` signs the manifest's model_name. The boards took only letters, digits, '.', '_', '-' (64 to a
    part), where the import took any name of 128 characters: a model imported and served as `Acme Labs/...` could
    not be pushed (exit 2), and the user learnt it only then. One rule now (shared/models/names.py): the board
    installs it and answers requests naming it; a name no rule takes is refused naming the manifest's field."""
    import yaml

    tflite, config = tiny_bytes(tiny_family)
    data = yaml.safe_load(agent.manifest.read_text())

    def set_model(name: str, version: str):
        manifest = agent.manifest.with_name("named.yaml")  # beside it: the same relative paths
        manifest.write_text(yaml.safe_dump({**data, "model_name": name}))
        return run_cli("devices", "set-model", "--manifest", str(manifest), "--device", DEVICE, "--tflite",
                       str(tiny_family / "device" / "model.tflite"), "--version", version, timeout=60)

    name = "Acme Labs/reasoner-" + "x" * 60
    try:
        proc = set_model(name, "v-named")
        assert proc.returncode == 0, proc.stderr
        state = update_outcome(agent, "v-named")
        assert state["ota"]["code"] == OtaCode.APPLIED and state["model"]["name"] == name, state["ota"]
        answer = stub(agent).Infer(pb.InferRequest(prompt=EASY, model=name, parameters=pb.Parameters(max_tokens=8)),
                                   timeout=TIMEOUT)
        assert answer.model_version == "v-named"
    finally:  # the module's board serves its own name again
        publish(agent, "v-named-back", tflite, config)
        assert update_outcome(agent, "v-named-back")["model"]["name"] == "tierline-reasoner"
    refused = set_model("what?", "v-refused")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "named.yaml: model_name: 'what?' holds '?'" in refused.stderr, refused.stderr
