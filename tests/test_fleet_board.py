"""What a board does on the fleet's JetStream, against a real nats-server with real identities (TLS, nkeys, the
generated permissions), without an agent process: the telemetry stream's per-board limit, the model download by
batched direct gets, the refusal a failure names, the newest verified update manifest.

Limits are made small by monkeypatching the fleet's constants (`raising=False`: a test also runs against a
fleet.py that does not have them, and fails there on its assertion rather than on a missing name).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
import threading
import time
import types
from pathlib import Path

import pytest
from nats.js import api
from nats.js.errors import NotFoundError

from tierline.devices import desired_model, publish_model
from tierline_device_agent import fleet
from tierline_device_agent.fleet import FleetAgent, open_fleet
from tierline_device_agent.ota import Artifact, DesiredModel, ModelStore, OtaCode, OtaError
from tierline_device_agent.outbox import Outbox
from tierline_infra.supervisor import NatsServer
from tierline_shared.models.artifacts import file_entry
from tierline_shared.security import signing
from tierline_shared.security.credentials import init_credentials
from tierline_shared.security.identities import OPERATOR, IdentityStore, device_identity, inbox_prefix, read_seed
from tierline_shared.transport.messaging import MODELS_BUCKET, TELEMETRY_STREAM, NatsOptions, connect, subject

BOARD, OTHER = "pi-board", "pi-other"  # two boards, each its own identity
TIMEOUT = 10  # seconds, every JetStream call here
CHUNK = 128 * 1024  # nats-py's object store chunk
STORE = f"OBJ_{MODELS_BUCKET}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """nats-server with JetStream, TLS and the identities' permissions, as `tierline creds init` and
    `tierline devices provision` make them."""
    work = tmp_path_factory.mktemp("fleet-board")
    init_credentials(work / "creds")
    for board in (BOARD, OTHER):
        IdentityStore(work / "creds").create(device_identity(board))
    nats = NatsServer(work, jetstream=True, credentials=work / "creds").start()
    try:
        yield nats
    finally:
        nats.stop()


def options(server: NatsServer, identity: str = OPERATOR) -> NatsOptions:
    seed = read_seed(IdentityStore(server.credentials).seed_path(identity))
    return NatsOptions(url=server.url, identity=identity, seed=seed, inbox_prefix=inbox_prefix(identity),
                       tls_ca=str(server.credentials / "ca.pem"))


@contextlib.asynccontextmanager
async def connected(server: NatsServer, identity: str = OPERATOR):
    nc = await connect(options(server, identity), name=f"test-{identity}", timeout_s=TIMEOUT)
    try:
        yield nc
    finally:
        await nc.close()


def board_agent(nc, state: Path | None = None) -> FleetAgent:
    """A FleetAgent with only what `_download`, `_duty` and `_why` read: the board's NATS connection, its model
    store (`state`) and the downloads it may resume."""
    agent = FleetAgent.__new__(FleetAgent)
    agent._nc, agent._failing, agent._resume = nc, {}, {}
    if state is not None:
        agent.store = ModelStore(state)
    return agent


# -- telemetry: one board cannot push the others' events out ------------------------------------------------
@pytest.mark.parametrize("made", ["by open_fleet", "before the per-board limit"])
def test_a_board_flooding_the_telemetry_stream_pushes_out_only_its_own_events(server, monkeypatch, made):
    """A stolen board publishes far beyond the stream's limit on its own subject (all it may publish to): the
    other board's events stay. A stream made before the per-board limit gets it when the operator opens the
    fleet (`tierline devices provision`, any `tierline devices` command)."""
    monkeypatch.setattr(fleet, "TELEMETRY_MAX_MSGS", 10)
    monkeypatch.setattr(fleet, "TELEMETRY_MAX_MSGS_PER_BOARD", 3, raising=False)

    async def events(identity: str, board: str, n: int) -> None:
        async with connected(server, identity) as nc:
            js = nc.jetstream(timeout=TIMEOUT)
            for i in range(n):
                await js.publish(subject("telemetry", board), json.dumps({"kind": "request", "n": i}).encode())

    async def run() -> dict[str, int]:
        async with connected(server) as op:
            js = op.jetstream(timeout=TIMEOUT)
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(TELEMETRY_STREAM)
            if made == "before the per-board limit":  # as open_fleet made it then: a limit on the total only
                await js.add_stream(name=TELEMETRY_STREAM, subjects=[subject("telemetry", ">")],
                                    storage=api.StorageType.FILE, max_msgs=10, duplicate_window=120)
            await open_fleet(op)
            await events(device_identity(BOARD), BOARD, 3)
            await events(device_identity(OTHER), OTHER, 50)  # five times the whole stream's limit
            return (await js.stream_info(TELEMETRY_STREAM, subjects_filter=">")).state.subjects or {}

    kept = asyncio.run(run())
    assert kept.get(subject("telemetry", BOARD)) == 3, kept
    assert kept.get(subject("telemetry", OTHER)) == 3, kept


# -- telemetry: a resend is read once, and the outbox counts as dropped only what was lost ------------------
class _AcksLost:
    """The board's JetStream over a link that loses what comes back (the fault hunt's one-way link: a proxy that
    passed the publishes and dropped the acks): each event reaches the server, and the board hears nothing."""

    def __init__(self, js):
        self.js = js

    async def publish(self, *args, **kwargs):
        await self.js.publish(*args, **kwargs)
        raise asyncio.TimeoutError("nats: timeout (the ack was lost)")


class _AnswersMeanwhile:
    """The board's JetStream while the board keeps answering: `n` answers' events come into the outbox as the
    drain's batch is on its way (inside the batch's first publish)."""

    def __init__(self, js, box: Outbox, n: int):
        self.js, self.box, self.n = js, box, n

    async def publish(self, *args, **kwargs):
        for _ in range(self.n):
            self.box.append({"kind": "request", "meanwhile": True})
        self.n = 0
        return await self.js.publish(*args, **kwargs)


def drain_agent(nc, box: Outbox, js) -> FleetAgent:
    """A FleetAgent with only what `_flush` reads: the board's id, its outbox and (its) JetStream."""
    agent = board_agent(nc)
    agent.device_id, agent.outbox, agent._fleet = BOARD, box, fleet.Fleet(js, None, None, None)
    return agent


async def fresh_telemetry_stream(op, **config) -> None:
    js = op.jetstream(timeout=TIMEOUT)
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(TELEMETRY_STREAM)
    if config:
        await js.add_stream(name=TELEMETRY_STREAM, subjects=[subject("telemetry", ">")],
                            storage=api.StorageType.FILE, **config)


def test_the_duplicate_window_is_hours_and_an_older_stream_gets_it(server):
    """Found by a fault hunt: the stream kept ids 120 s, so a board whose acks were lost and that was offline longer
    resent events JetStream stored again. A stream made so (or with an operator's max_age shorter than the window:
    the window never longer) gets the window when the operator opens the fleet."""
    window = getattr(fleet, "TELEMETRY_DUPLICATE_WINDOW_S", 120)

    async def run() -> list[float]:
        seen = []
        async with connected(server) as op:
            js = op.jetstream(timeout=TIMEOUT)
            for made in ({}, {"duplicate_window": 120}, {"max_age": 3600.0, "duplicate_window": 120},
                         {"max_age": 86400.0, "duplicate_window": 43200.0}):  # an operator's longer one: kept
                await fresh_telemetry_stream(op, **made)
                await open_fleet(op)
                seen.append((await js.stream_info(TELEMETRY_STREAM)).config.duplicate_window)
        return seen

    assert window >= 3600
    assert asyncio.run(run()) == [window, window, 3600.0, 43200.0]


def test_a_resend_after_the_duplicate_window_is_read_once(server, tmp_path):
    """Found by a fault hunt: acks lost, then the link down longer than the duplicate window, and the outbox's
    resend (the same `Nats-Msg-Id`) was stored again: 100 events for 50 answers. No window covers an outbox, which
    keeps its events for as long as the board is offline, so each event carries its message id and the reader
    keeps the first of each. The stream here keeps ids 0.5 s (any resend after the window is the same)."""
    box = Outbox(tmp_path / "outbox.sqlite", max_events=100)
    for i in range(5):
        box.append({"device_id": BOARD, "kind": "request", "n": i})

    async def run() -> tuple[int, list[dict], list[dict]]:
        async with connected(server) as op:
            await fresh_telemetry_stream(op, duplicate_window=0.5)
            js = op.jetstream(timeout=TIMEOUT)
            async with connected(server, device_identity(BOARD)) as nc:
                board_js = nc.jetstream(timeout=TIMEOUT)
                with pytest.raises(asyncio.TimeoutError):
                    await drain_agent(nc, box, _AcksLost(board_js))._flush()
                assert box.pending == 5  # no ack: kept, to be sent again
                await asyncio.sleep(2.0)  # past the window (the server purges ids on a timer of about the window)
                await drain_agent(nc, box, board_js)._flush()
                assert box.pending == 0
            async with connected(server, device_identity(OTHER)) as nc:  # another board, the same ids, its subject
                other = nc.jetstream(timeout=TIMEOUT)
                for seq in range(1, 6):
                    mid = box.message_id(BOARD, seq)
                    await other.publish(subject("telemetry", OTHER), json.dumps(
                        {"device_id": OTHER, "kind": "request", "seq": seq, "msg_id": mid}).encode(),
                        headers={"Nats-Msg-Id": mid + "-x"})
            # what a stolen board can have the server store on any board's subject, by naming it as the reply
            # subject of a request it may make (docs/SECURITY.md): a tier's protobuf answer, a PubAck
            for planted in (b"\n\x05ANSWER", b'{"stream":"TIERLINE_TELEMETRY","seq":1}'):
                await js.publish(subject("telemetry", BOARD), planted)
            stored = (await js.stream_info(TELEMETRY_STREAM)).state.messages
            return stored, await fleet.read_telemetry(js, BOARD), await fleet.read_telemetry(js)

    stored, events, everyone = asyncio.run(run())
    box.close()
    assert stored == 17  # the resend stored again (outside the window), the other board's five, the two planted
    assert [(e["n"], e["seq"]) for e in events] == [(i, i + 1) for i in range(5)]
    assert all(e["msg_id"] == box.message_id(BOARD, e["seq"]) for e in events)
    # all boards: each board's events once; the other's, whatever ids its bodies name, its own
    assert sorted((e["device_id"], e["seq"]) for e in everyone) == sorted(
        [(BOARD, s) for s in range(1, 6)] + [(OTHER, s) for s in range(1, 6)])


@pytest.mark.parametrize("acks", ["come", "lost"])
def test_events_the_bound_removes_while_their_batch_is_sent_count_as_dropped_only_if_lost(server, tmp_path, acks):
    """Found by a fault hunt: the outbox full while a batch was on its way, the oldest (in that batch) were removed
    and counted as dropped, then their acks came: `dropped: 5`, really lost 0. They count only if their acks do
    not come."""
    box = Outbox(tmp_path / "outbox.sqlite", max_events=10)
    for i in range(10):
        box.append({"device_id": BOARD, "kind": "request", "n": i})

    async def run() -> int:
        async with connected(server) as op:
            await fresh_telemetry_stream(op)
            await open_fleet(op)
            async with connected(server, device_identity(BOARD)) as nc:
                board_js = nc.jetstream(timeout=TIMEOUT)
                js = _AnswersMeanwhile(board_js if acks == "come" else _AcksLost(board_js), box, 5)
                with pytest.raises(asyncio.TimeoutError) if acks == "lost" else contextlib.nullcontext():
                    await drain_agent(nc, box, js)._flush()
                assert box.pending == 10 if acks == "lost" else box.pending == 0
                await drain_agent(nc, box, board_js)._flush()  # what is left, on a link that works
            return (await op.jetstream(timeout=TIMEOUT).stream_info(TELEMETRY_STREAM)).state.messages

    stored = asyncio.run(run())
    # ten in the batch (all stored), five that came meanwhile: none lost when the acks come; when they are lost,
    # the five oldest were removed unacknowledged (stored in fact, but the board cannot know): counted
    assert stored == 15
    assert box.dropped == (0 if acks == "come" else 5)
    assert box.pending == 0
    box.close()


# -- the model download: batched direct gets ---------------------------------------------------------------
async def upload(op, name: str, data: bytes) -> None:
    await (await open_fleet(op)).models.put(name, data)


async def download(server: NatsServer, art: Artifact, dest) -> tuple[list[dict], OtaError | None]:
    """`art` downloaded into `dest` as a board does (its own identity and rights). Returns the requests the board
    made on the model store, as the operator saw them published (their bodies), and the refusal, if any."""
    async with connected(server) as op:
        seen = await op.subscribe("$JS.API.>")  # the operator may read any subject: the board's requests too
        await op.flush()
        refused = None
        async with connected(server, device_identity(BOARD)) as nc:
            try:
                await board_agent(nc, Path(dest).parent / "state")._download(await open_fleet(nc, board=True), art,
                                                                              dest)
            except OtaError as exc:
                refused = exc
        await op.flush()  # each request reached this subscription before its answer went back to the board
        asks = []
        while seen.pending_msgs:
            msg = await seen.next_msg(timeout=TIMEOUT)
            if msg.subject.endswith(STORE):
                asks.append(json.loads(msg.data) if msg.data else {})
    return asks, refused


def artifact(name: str, data: bytes, size: int | None = None) -> Artifact:
    return Artifact(name, hashlib.sha256(data).hexdigest(), len(data) if size is None else size)


def test_an_artifact_comes_in_batches_not_a_request_per_chunk(server, tmp_path, monkeypatch):
    """The old download asked for each 128 KiB chunk and waited for it: 800 round trips for 100 MB. Now one request
    brings a batch of chunks, which the server sends back to back; the file is the object, byte for byte."""
    monkeypatch.setattr(fleet, "DOWNLOAD_BATCH_BYTES", 2 * CHUNK, raising=False)  # two chunks a batch
    data = os.urandom(5 * CHUNK + 1000)  # six chunks: three batches
    chunks = math.ceil(len(data) / CHUNK)

    async def run():
        async with connected(server) as op:
            await upload(op, "batched/model.tflite", data)
        return await download(server, artifact("batched/model.tflite", data), tmp_path / "model.tflite")

    asks, refused = asyncio.run(run())
    assert refused is None and (tmp_path / "model.tflite").read_bytes() == data
    chunk_asks = [a for a in asks if "next_by_subj" in a]
    assert len(chunk_asks) == math.ceil(chunks / 2) < chunks, asks
    assert all(a.get("batch", 0) > 1 for a in chunk_asks), chunk_asks


class Link:
    """A TCP link between a board and nats-server that the test slows down (`rate`: bytes/s from the server) or
    stops (`budget`: bytes from the server it passes, then it holds the rest: the link stalls, the socket open)."""

    def __init__(self, server: NatsServer, rate: float | None = None, budget: int | None = None):
        self.target, self.rate, self.budget = server.port, rate, budget
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tls://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                board, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self.sockets += [board, upstream]
            threading.Thread(target=self._pipe, args=(board, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, board, True), daemon=True).start()

    def _pipe(self, src, dst, from_server: bool):
        with contextlib.suppress(OSError):
            while data := src.recv(1024):
                if from_server and self.budget is not None:
                    if self.budget <= 0:
                        continue  # held: the board sees a link that brings nothing more
                    self.budget -= len(data)
                if from_server and self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def through(server: NatsServer, link: Link, identity: str) -> NatsOptions:
    return dataclasses.replace(options(server, identity), url=link.url)


def test_a_slow_link_downloads_at_its_own_pace(server, tmp_path):
    """A link that brings a 128 KiB chunk in 8 s (16 KB/s). The old download gave each chunk 5 s (JS_TIMEOUT_S):
    a board below about 26 KB/s could never install an update, every try failing after the first chunk's 5 s with
    a message that named the 120 s limit. Now only a stall (no chunk for DOWNLOAD_STALL_S) fails it."""
    data = os.urandom(CHUNK + 1000)  # two chunks
    art = artifact("slow-link/model.tflite", data)

    async def run():
        async with connected(server) as op:
            await upload(op, art.object, data)
        link = Link(server, rate=16_000)
        try:
            nc = await connect(through(server, link, device_identity(BOARD)), name="slow", timeout_s=TIMEOUT)
            try:
                agent = board_agent(nc, tmp_path / "state")
                await agent._download(await open_fleet(nc, board=True), art, tmp_path / "model.tflite")
            finally:
                await nc.close()
        finally:
            link.close()

    started = time.monotonic()
    asyncio.run(run())
    assert (tmp_path / "model.tflite").read_bytes() == data
    assert time.monotonic() - started > 6  # it was slow: slower than the old limit for a chunk
    assert not list((tmp_path / "state" / "models").iterdir())  # nothing half-made left beside it


def test_a_stalled_download_says_so_and_the_next_try_goes_on_from_the_last_chunk(server, tmp_path, monkeypatch):
    """The link stops bringing bytes after a few chunks: the try fails as a stall, naming how long nothing came and
    how far it got (the old message named a limit of 120 s whatever happened). The next try asks only for the
    chunks after the last one received (the old one started from byte 0 on every try, so a link that fails more
    often than a whole model takes never got one)."""
    monkeypatch.setattr(fleet, "DOWNLOAD_STALL_S", 1.0, raising=False)
    monkeypatch.setattr(fleet, "DOWNLOAD_BATCH_BYTES", 2 * CHUNK, raising=False)  # two chunks a batch
    data = os.urandom(5 * CHUNK + 1000)  # six chunks: three batches
    art = artifact("stalled/model.tflite", data)
    dest = tmp_path / "model.tflite"

    async def run():
        async with connected(server) as op:
            await upload(op, art.object, data)
            seen = await op.subscribe("$JS.API.>")  # the board's requests, as the operator sees them
            link = Link(server, budget=int(2.5 * CHUNK))  # the TLS handshake, two chunks and half the third
            agent = None
            try:
                nc = await connect(through(server, link, device_identity(BOARD)), name="stalls", timeout_s=TIMEOUT)
                agent = board_agent(nc, tmp_path / "state")
                started = time.monotonic()
                with pytest.raises(OtaError) as stalled:
                    await agent._download(await open_fleet(nc, board=True), art, dest)
                took = time.monotonic() - started
            finally:
                link.close()
                await nc.close()
            await op.flush()
            while seen.pending_msgs:  # the first try's requests
                await seen.next_msg(timeout=TIMEOUT)
            async with connected(server, device_identity(BOARD)) as nc:  # the link is back
                agent._nc = nc
                await agent._download(await open_fleet(nc, board=True), art, dest)
            await op.flush()
            asks = []
            while seen.pending_msgs:
                msg = await seen.next_msg(timeout=TIMEOUT)
                if msg.subject.endswith(STORE) and msg.data and "next_by_subj" in json.loads(msg.data):
                    asks.append(json.loads(msg.data))
        return stalled.value, took, asks

    stalled, took, asks = asyncio.run(run())
    assert stalled.code == OtaCode.DOWNLOAD_FAILED, stalled
    assert "no chunk for 1 s" in str(stalled) and f"{2 * CHUNK} of {len(data)} bytes" in str(stalled), stalled
    assert took < 4, took  # the stall's time, not a limit for the whole file
    assert dest.read_bytes() == data
    assert len(asks) == 2 and asks[0]["seq"] > 1, asks  # chunks 3-4 and 5-6: the first two were not asked again


class _Servicer:
    """What an update reads and does on the board's servicer: the engine that serves, and the swap."""

    def __init__(self, version: str):
        self.engine = types.SimpleNamespace(info=types.SimpleNamespace(version=version))
        self.swapped: list[str] = []

    def swap_engine(self, engine) -> None:
        self.engine = engine
        self.swapped.append(engine.info.version)


def update_agent(nc, state: Path, key) -> FleetAgent:
    """A FleetAgent with what `_reconcile`, `_apply` and `_install` read: `board_agent`, its fleet, the publisher
    key it pins, a servicer that records its swaps, a telemetry outbox, and a board's own model (a tokenizer only:
    the candidate's load and health check are the test's, `fake_runtime`). `beat` does nothing (the registry's
    entry is not what is tested)."""
    agent = board_agent(nc, state)
    agent.device_id, agent.threads, agent.metrics, agent.requests = BOARD, 1, None, 0
    agent.cfg = types.SimpleNamespace(update_keys=[signing.public_key_text(key)], heartbeat_s=0.2, health_problems=1,
                                      health_min_token_accuracy=0.0)
    agent.servicer, agent.serving_sha256 = _Servicer("v-boot"), "0" * 64
    agent.outbox = Outbox(state / "outbox.sqlite", max_events=100)
    agent.status, agent.ota, agent._crashed_digest = "serving", None, None
    agent._handled_desired, agent._retries, agent._retry_at, agent._update = None, 0, None, None
    agent._downloading = agent._superseded_by = None
    base = state.parent / "board-model"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    (base / "manifest.json").write_text(json.dumps({"artifacts": {"tokenizer": file_entry(base,
                                                                                          base / "tokenizer.json")}}))
    agent.base_models = base

    async def beat() -> None:
        pass

    agent.beat = beat
    return agent


def fake_runtime(monkeypatch, loaded: list[str]) -> None:
    """The candidate's engine (named by its version) loads and passes its health check; `loaded` lists them."""
    def load(models_dir: Path, threads: int):
        loaded.append(models_dir.name)
        return types.SimpleNamespace(info=types.SimpleNamespace(version=models_dir.name))

    monkeypatch.setattr(fleet, "load_candidate", load)
    monkeypatch.setattr(fleet, "health_check", lambda engine, n, least, stopped: 1.0)


def test_a_newer_desired_model_supersedes_an_update_still_downloading(server, tmp_path, monkeypatch):
    """Found by a review: while an update downloaded over a slow link (a try may take minutes, and the next one
    resumes), the desired-model check returned at once, so a newer record (the operator replacing a bad version)
    waited until the board had downloaded, checked, installed and even served the one it replaces. Now a newer
    signed record cancels an update that is still downloading: the board serves the newer one, never installs the
    older, reports it superseded, and leaves no partial download, staging folder, attempt record behind."""
    monkeypatch.setattr(fleet, "DOWNLOAD_BATCH_BYTES", 2 * CHUNK, raising=False)  # the board's requests (the
    # desired key's read) wait behind two chunks at most, not the whole object
    loaded: list[str] = []
    fake_runtime(monkeypatch, loaded)
    key = signing.generate_key()
    config = b'{"layers": 1}'
    old, new = os.urandom(16 * CHUNK), os.urandom(CHUNK + 10)  # about 10 s through the link below, and 1 s
    state = tmp_path / "state"

    async def publish(op, version: str, tflite: bytes) -> DesiredModel:
        return await publish_model(await open_fleet(op), desired_model(BOARD, "tierline-reasoner", version, tflite,
                                                                       config), key, tflite, config)

    async def until(check, what: str, timeout: float, agent: FleetAgent | None = None) -> None:
        """Bounded: `check()`, every 0.1 s; with `agent`, a beat's desired-model check each time (as `_run` does)."""
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            if agent is not None:
                await asyncio.wait_for(agent._reconcile(), TIMEOUT)
            await asyncio.sleep(0.1)

    async def run():
        async with connected(server) as op:
            link = Link(server, rate=200_000)
            nc = await connect(through(server, link, device_identity(BOARD)), name="supersede", timeout_s=TIMEOUT)
            agent = update_agent(nc, state, key)
            try:
                agent._fleet = await open_fleet(nc, board=True)
                first = await publish(op, "v-old", old)
                installs = []
                install = agent.store.install
                agent.store.install = lambda staged, desired, base: (installs.append(desired.version),
                                                                     install(staged, desired, base))[1]
                await agent._reconcile()
                partial = state / "models" / fleet.RESUME_DIR / first.tflite.sha256
                await until(lambda: partial.is_file() and first.tflite.sha256 in agent._resume,
                            "the first chunks of v-old", TIMEOUT)
                await publish(op, "v-new", new)  # while v-old downloads
                await until(lambda: agent.servicer.swapped, "a model swapped in", 60, agent)
                await asyncio.wait_for(asyncio.shield(agent._update), TIMEOUT)
                return agent, installs, partial, [e for _, e in agent.outbox.peek(100) if e["kind"] == "ota"]
            finally:
                await nc.close()
                link.close()
                agent.outbox.close()

    agent, installs, partial, reports = asyncio.run(run())
    assert agent.servicer.swapped == ["v-new"] and installs == ["v-new"] and loaded == ["v-new"], (
        agent.servicer.swapped, installs, loaded)
    assert agent.store.current().name == "v-new" and agent.ota["status"] == "applied", agent.ota
    # the board's reports, in order: the superseded update ended, then the newer one applied
    events = [(e["version"], e["status"]) for e in reports]
    assert events == [("v-old", "superseded"), ("v-new", "applied")], events
    # nothing of v-old left: its partial download, its resume record, a staging folder, a version, an attempt
    assert not partial.exists() and not partial.parent.exists() and agent._resume == {}
    assert sorted(p.name for p in (state / "models").iterdir()) == ["v-new"]
    assert not (state / "attempt.json").exists()


def test_a_newer_desired_model_waits_for_an_update_in_its_health_check(server, tmp_path, monkeypatch):
    """The other half of the rule: once its objects are here, an update is never cut short (a cancel in its health
    check or its swap could leave the board half-updated). A newer record set meanwhile waits, then is applied."""
    loaded: list[str] = []
    fake_runtime(monkeypatch, loaded)
    checking, release = threading.Event(), threading.Event()

    def slow_check(engine, n, least, stopped) -> float:  # in the executor's thread, as the real one
        checking.set()
        assert release.wait(TIMEOUT)
        return 1.0

    monkeypatch.setattr(fleet, "health_check", slow_check)
    key = signing.generate_key()
    config = b'{"layers": 2}'
    state = tmp_path / "state"

    async def run():
        async with connected(server) as op, connected(server, device_identity(BOARD)) as nc:
            agent = update_agent(nc, state, key)
            agent._fleet = await open_fleet(nc, board=True)
            try:
                for version in ("v-checked", "v-after"):
                    data = os.urandom(CHUNK)
                    await publish_model(await open_fleet(op), desired_model(BOARD, "tierline-reasoner", version, data,
                                                                            config), key, data, config)
                    if version == "v-checked":
                        await agent._reconcile()
                        deadline = time.monotonic() + TIMEOUT
                        while not checking.is_set():
                            assert time.monotonic() < deadline, "the candidate never reached its health check"
                            await asyncio.sleep(0.05)
                checked = agent._update
                for _ in range(3):  # three beats while it is checked
                    await asyncio.wait_for(agent._reconcile(), TIMEOUT)
                    await asyncio.sleep(0.1)
                assert agent._update is checked and not checked.done()
                release.set()
                await asyncio.wait_for(asyncio.shield(checked), TIMEOUT)
                deadline = time.monotonic() + TIMEOUT
                while agent.servicer.swapped != ["v-checked", "v-after"]:
                    assert time.monotonic() < deadline, agent.servicer.swapped
                    await asyncio.wait_for(agent._reconcile(), TIMEOUT)
                    await asyncio.sleep(0.1)
                await asyncio.wait_for(asyncio.shield(agent._update), TIMEOUT)
                return [(e["version"], e["status"]) for _, e in agent.outbox.peek(100) if e["kind"] == "ota"]
            finally:
                release.set()
                agent.outbox.close()

    assert asyncio.run(run()) == [("v-checked", "applied"), ("v-after", "applied")]


def test_an_update_stopped_in_its_health_check_leaves_no_check_running(server, tmp_path, monkeypatch):
    """Found by a review: a stop (or a cancel) while the candidate was health-checked ended the update's task, but
    the check ran on in its thread to its last problem, and the agent's process, which waits for its threads,
    with it (minutes on a board's CPU, past systemd's stop timeout). The check now ends at its next problem.
    The real check, on a candidate that takes 20 ms a problem (1,000 problems: 20 s)."""
    asked: list[float] = []

    class SlowCandidate:
        info = types.SimpleNamespace(version="v-check")

        def teacher_forced_hits(self, prompt: str, target: str) -> tuple[int, int]:
            asked.append(time.monotonic())
            time.sleep(0.02)
            return 1, 1

    monkeypatch.setattr(fleet, "load_candidate", lambda models_dir, threads: SlowCandidate())
    key = signing.generate_key()
    state = tmp_path / "state"

    async def run():
        async with connected(server) as op, connected(server, device_identity(BOARD)) as nc:
            agent = update_agent(nc, state, key)
            agent.cfg.health_problems = 1000
            agent._fleet = await open_fleet(nc, board=True)
            try:
                data, config = os.urandom(CHUNK), b'{"layers": 2}'
                await publish_model(await open_fleet(op), desired_model(BOARD, "tierline-reasoner", "v-check", data,
                                                                        config), key, data, config)
                await agent._reconcile()
                deadline = time.monotonic() + TIMEOUT
                while len(asked) < 5:
                    assert time.monotonic() < deadline, "the candidate never reached its health check"
                    await asyncio.sleep(0.05)
                agent._update.cancel()  # as the agent's stop does
                await asyncio.wait({agent._update}, timeout=TIMEOUT)
                assert agent._update.done()
                stopped_at = len(asked)
                await asyncio.sleep(0.5)  # 25 problems' time
                return stopped_at, len(asked)
            finally:
                agent.outbox.close()

    stopped_at, then = asyncio.run(run())  # (which waits for the executor's threads, as the process's exit does)
    assert then <= stopped_at + 1, (stopped_at, then)  # the problem it was in, at most
    assert not (state / "models" / "v-check").exists()


def forge_record(op, name: str, size: int):
    """The operator's record of `name` rewritten to claim `size` bytes (its chunks as they are)."""
    async def run():
        meta = f"$O.{MODELS_BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        js = op.jetstream(timeout=TIMEOUT)
        record = json.loads((await js.get_last_msg(STORE, meta)).data)
        await js.publish(meta, json.dumps({**record, "size": size}).encode(), headers={"Nats-Rollup": "sub"})

    return run()


@pytest.mark.parametrize("case, code, detail", [
    ("not the signed size", OtaCode.DIGEST_MISMATCH, "refused before download"),
    ("more bytes than its record", OtaCode.DIGEST_MISMATCH, "more bytes in the object store than its record's"),
    ("fewer chunks than its record", OtaCode.DOWNLOAD_FAILED, "then no more chunks"),
    ("missing", OtaCode.NOT_FOUND, "not in the object store"),
])
def test_a_bad_object_is_answered_as_before(server, tmp_path, monkeypatch, case, code, detail):
    monkeypatch.setattr(fleet, "DOWNLOAD_BATCH_BYTES", 2 * CHUNK, raising=False)
    data = os.urandom(3 * CHUNK + 10)  # four chunks
    name = f"{case.replace(' ', '-')}/model.tflite"

    async def run():
        async with connected(server) as op:
            if case != "missing":
                await upload(op, name, data)
            if case == "not the signed size":
                await upload(op, name, data * 3)
            elif case == "more bytes than its record":  # the record and the signature agree, the chunks do not
                await forge_record(op, name, len(data) - 5)
            elif case == "fewer chunks than its record":
                await forge_record(op, name, len(data) + CHUNK)
        # what the operator signed: the bytes' size, or the forged record's (so it passes the first check)
        forged = {"more bytes than its record": len(data) - 5, "fewer chunks than its record": len(data) + CHUNK}
        return await download(server, artifact(name, data, forged.get(case)), tmp_path / "model.tflite")

    asks, refused = asyncio.run(run())
    assert refused is not None and refused.code == code and detail in str(refused), refused
    if case in ("not the signed size", "missing"):
        assert not [a for a in asks if "next_by_subj" in a], asks  # no chunk asked for


def test_a_model_store_without_direct_gets_gets_them_from_the_operator(server, tmp_path):
    """Boards download by direct gets, which a stream answers only with `allow_direct` (nats-py's
    create_object_store sets it). A store made without: the board's download fails on the link (tried again
    later), until the operator opens the fleet, which turns them on."""
    data = os.urandom(CHUNK + 10)

    async def run():
        async with connected(server) as op:
            js = op.jetstream(timeout=TIMEOUT)
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(STORE)
            await js.add_stream(name=STORE, subjects=[f"$O.{MODELS_BUCKET}.C.>", f"$O.{MODELS_BUCKET}.M.>"],
                                discard=api.DiscardPolicy.NEW, allow_rollup_hdrs=True, allow_direct=False)
            await (await js.object_store(MODELS_BUCKET)).put("old-store/model.tflite", data)
        _, before = await download(server, artifact("old-store/model.tflite", data), tmp_path / "model.tflite")
        async with connected(server) as op:
            await open_fleet(op)
            direct = (await op.jetstream(timeout=TIMEOUT).stream_info(STORE)).config.allow_direct
        _, after = await download(server, artifact("old-store/model.tflite", data), tmp_path / "model.tflite")
        return before, direct, after

    before, direct, after = asyncio.run(run())
    assert before is not None and before.code == OtaCode.DOWNLOAD_FAILED and "allow_direct" in str(before), before
    assert direct is True and after is None
    assert (tmp_path / "model.tflite").read_bytes() == data


# -- a failure names the server's refusal only if it came meanwhile -----------------------------------------
def test_a_timeout_names_a_refusal_only_if_it_came_while_the_work_ran(server):
    """The server refuses a publish apart from the request, which then times out: that timeout names the refusal.
    nats-py keeps its last error until the next reconnect: a later timeout with nothing refused must not."""
    async def run() -> dict[str, str]:
        async with connected(server, device_identity(BOARD)) as nc:
            agent = board_agent(nc)

            async def refused_then_timed_out():
                await nc.publish(subject("telemetry", OTHER), b"{}")  # another board's subject: refused
                await nc.flush(timeout=TIMEOUT)
                end = asyncio.get_running_loop().time() + TIMEOUT  # the server's -ERR may come after the PONG
                while "permissions violation" not in str(nc.last_error).lower():
                    assert asyncio.get_running_loop().time() < end, "the server never refused the publish"
                    await asyncio.sleep(0.01)
                raise asyncio.TimeoutError

            async def timed_out():
                raise asyncio.TimeoutError

            await agent._duty("refused", refused_then_timed_out)
            await agent._duty("later", timed_out)
            return agent._failing

    failing = asyncio.run(run())
    assert "permissions violation" in failing["refused"].lower(), failing
    assert "refusal" not in failing["later"] and "permissions" not in failing["later"].lower(), failing


# -- rollback protection: the newest manifest verified, installed or not -------------------------------------
def manifest(sequence: int, version: str = "v") -> DesiredModel:
    art = Artifact(f"{'0' * 64}/model.tflite", "0" * 64, 10)
    return DesiredModel("tierline-reasoner", f"{version}{sequence}", sequence, 2e9, BOARD, art, art)


def test_the_newest_verified_manifest_bounds_the_next_one_and_survives_a_restart(tmp_path):
    store = ModelStore(tmp_path)
    store.admit(manifest(5))  # verified, then failed (its download, its health check): nothing installed
    store.admit(manifest(5))  # the same manifest again: a retry
    for older in (manifest(4), manifest(5, "other-")):  # an older one replayed; another one with its sequence
        with pytest.raises(OtaError) as refused:
            store.admit(older)
        assert refused.value.code == OtaCode.DOWNGRADE and "replay" in str(refused.value)
    again = ModelStore(tmp_path)  # the agent restarted
    with pytest.raises(OtaError):
        again.admit(manifest(4))
    again.admit(manifest(5))
    again.admit(manifest(6))
    assert again.newest()[0] == 6 and not list(tmp_path.glob(".newest-*"))
