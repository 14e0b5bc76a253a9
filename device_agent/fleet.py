"""The device agent as a fleet member: registration, heartbeats, OTA, the telemetry outbox.

Everything goes through JetStream on the agent's own NATS connection:

| what | where | key / subject |
|---|---|---|
| reported state (model, status, load, heartbeat, platform) | KV `tierline_devices` | device id |
| desired model (name, version, objects, sha256) | KV `tierline_desired` | device id |
| model artifacts | Object Store `tierline_models` | `<sha256>/model.tflite`, `<sha256>/config.json` |
| telemetry (one event per answer, per update) | stream `TIERLINE_TELEMETRY` | `tierline.telemetry.<device id>` |

The agent connects as its own board (`device-<id>`, shared/security/identities.py): the
server lets it write only its own registry key and telemetry subject and read only its
own desired key and the model store (by direct gets), so no other board can take its
entry over; it binds the buckets by name, with no stream info (which would list every
board's key). The telemetry stream keeps at most TELEMETRY_MAX_MSGS_PER_BOARD events per
board, so a board that floods it pushes out its own oldest events, not the others'. Every
heartbeat writes the device's entry whole, never reading it (`register`). The loop beats
every `heartbeat_s`, doubling the wait (up to 8x) while NATS is away; the heartbeat, the
desired-model check and the telemetry drain (a task of its own) each fail alone, so a
telemetry stream that is gone or refused stops neither heartbeats nor updates, and its
events wait in the outbox. The connection itself reconnects forever, nats-py replaying
its subscriptions, with exponential backoff and jitter between attempts
(`shared.messaging.reconnect_delay`: 1 s doubling to 30 s, back to 1 s once connected).
The desired key is read on every beat (a plain read survives server restarts, where a
watch's consumer would not) and a new record (revision and SHA-256: a re-created store
counts revisions from 1 again) starts an update (device_agent/ota.py), one at a time. A newer
signed record that comes while the running update is still downloading supersedes it: that
update is cancelled (its partial download and staging folder removed, reported `superseded`)
and the newer one starts (`_supersede`); once its objects are all here (the install, the
health check, the swap) it is never cut short, and the newer record waits for it. An update that
failed on the link is tried again with backoff; one that failed on the board (a full
disk) is not. An artifact comes by batched direct gets, a round trip per
DOWNLOAD_BATCH_BYTES, not per chunk (`_fetch_chunks`); a download fails when no chunk comes
for DOWNLOAD_STALL_S (a stalled link), not because the link is slow, and the next try goes
on from the last chunk received.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nats.errors import NoRespondersError
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_META_PRE_TEMPLATE, ObjectStore
from nats.protocol.parser import PERMISSIONS_ERR

from tierline_device_agent.metrics import FleetMetrics
from tierline_device_agent.ota import (
    STAGING_PREFIX,
    Artifact,
    DesiredModel,
    ModelStore,
    OtaCode,
    OtaError,
    check_expiry,
    check_sequence,
    claimed_version,
    crash_outcome,
    given_up,
    health_check,
    load_candidate,
    outcome,
    verify_signed,
)
from tierline_device_agent.ota import verify as verify_digest
from tierline_device_agent.outbox import Outbox
from tierline_device_agent.profile import proc_status_mib
from tierline_shared.config.manifest import ManifestError
from tierline_shared.models.artifacts import ArtifactError, load_index
from tierline_shared.runtime.engine import Engine
from tierline_shared.security.identities import device_identity
from tierline_shared.transport.messaging import (
    DESIRED_BUCKET,
    DEVICES_BUCKET,
    MODELS_BUCKET,
    TELEMETRY_STREAM,
    NatsOptions,
    connect,
    stop_loop_thread,
    subject,
)

log = logging.getLogger("tierline.device")

TELEMETRY_MAX_MSGS = 1_000_000  # the stream keeps this many events at most (oldest go)
# of which one board's subject keeps this many (its own oldest go first): a stolen board that floods the stream
# pushes out at most this many of the other boards' events, then only its own. As many as a board's outbox keeps
# offline by default (device_agent.outbox_max_events), so a board back from an outage loses none to the limit.
TELEMETRY_MAX_MSGS_PER_BOARD = 10_000
# JetStream does not store an event again whose `Nats-Msg-Id` it saw this recently (a resend after a lost ack). The
# first line only: an outbox keeps its events as long as the board is offline, longer than any window, so the event
# also carries its id (`msg_id`) and `read_telemetry` drops a resend that came after the window. The cost: the server
# keeps every id it saw within the window in memory, about 300 bytes each (measured on nats-server 2.15: 200,000 ids
# of 55 characters, 280 bytes more resident memory each than the same events without ids), whatever the stream's
# limits keep: 2 h at 10 events/s fleet-wide is 72,000 ids, about 22 MB; at 100 events/s, about 220 MB.
TELEMETRY_DUPLICATE_WINDOW_S = 2 * 3600.0
JS_TIMEOUT_S = 5.0  # one JetStream call (KV, publish ack), at most
# a download fails when no chunk (128 KiB, nats-py's) arrives for this long: a stalled link, not a slow one (a link
# that brings a chunk every 30 s, about 4.4 KB/s, gets there)
DOWNLOAD_STALL_S = 30.0
# and one try at one artifact takes at most DOWNLOAD_TIMEOUT_S plus its size at DOWNLOAD_MIN_BYTES_PER_S (a bound
# on a link that trickles, below the stall's floor: 100 MB gets 7 hours); the next try goes on where it stopped
DOWNLOAD_TIMEOUT_S = 120.0
DOWNLOAD_MIN_BYTES_PER_S = 4096
RESUME_DIR = f"{STAGING_PREFIX}resume"  # state_dir/models/...: downloads that failed on the link, by sha256
# an artifact's chunks are asked for in batches of this many bytes (32 chunks of 128 KiB): one round trip per
# batch, not per chunk, while the server never holds more than this for a slow board (its buffer for a client
# is 64 MiB before it cuts it off as a slow consumer)
DOWNLOAD_BATCH_BYTES = 4 * 1024 * 1024
MODELS_STREAM = f"OBJ_{MODELS_BUCKET}"
MODELS_DIRECT_GET = f"$JS.API.DIRECT.GET.{MODELS_STREAM}"  # a board's one request on the model store
MAX_BACKOFF_FACTOR = 8  # heartbeats wait up to 8x their interval while NATS is away
READ_BATCH = 1000  # telemetry events the operator's reader fetches at a time
FLUSH_BATCH = 500  # telemetry events read from the outbox and published at a time (acks awaited together)
FLUSH_POLL_S = 0.2  # new telemetry is sent after this long at most (the outbox's count is polled)
MEMORY_CAP_HEADROOM_MB = 64  # device_agent.memory_max_mb: at least this above what the agent uses before its model
STOP_UPDATE_S = 5.0  # an update under way when the agent stops: what it may take to drop its candidate
RETRY_MAX_S = 600.0  # an update that failed on the link is tried again after heartbeat_s doubling, up to this


class LinkDown(ConnectionError):
    """NATS is not connected right now (nats-py is reconnecting)."""


@dataclass
class Fleet:
    """The JetStream buckets of the fleet, opened (created when missing) in one place."""

    js: object
    devices: object  # KeyValue
    desired: object  # KeyValue
    models: object  # ObjectStore


async def open_fleet(nc, board: bool = False) -> Fleet:
    """The fleet's buckets and telemetry stream: opened by the operator (the CLI, provisioning), which
    creates what is missing, always with the same settings.

    A `board` binds them by name instead, with no JetStream API call: it may neither create them nor
    read their stream info (asked with a subjects filter, that lists every key, hence every board's id).
    Its reads are direct gets (the buckets are made with `allow_direct`); a bucket that is missing
    shows up as a failed read or write, tried again on the next beat.
    """
    js = nc.jetstream(timeout=JS_TIMEOUT_S)
    if board:
        devices, desired = (KeyValue(name=b, stream=f"KV_{b}", pre=f"$KV.{b}.", js=js, direct=True)
                            for b in (DEVICES_BUCKET, DESIRED_BUCKET))
        return Fleet(js, devices, desired, ObjectStore(name=MODELS_BUCKET, stream=f"OBJ_{MODELS_BUCKET}", js=js))

    async def kv(bucket: str):
        try:
            return await js.key_value(bucket)
        except BucketNotFoundError:
            # direct gets: a read names its key in the subject, so permissions can allow one board its own key
            return await js.create_key_value(bucket=bucket, history=1, direct=True)

    try:
        models = await js.object_store(MODELS_BUCKET)
    except BucketNotFoundError:
        models = await js.create_object_store(MODELS_BUCKET)  # with allow_direct (nats-py sets it)
    # boards download by direct gets: a store made without them (by an older client) gets them here
    await _settle(js, MODELS_STREAM, allow_direct=True)
    # a stream made before the per-board limit or with a shorter duplicate window (120 s, before) gets them here
    # (its other settings, an operator's, are kept; the window never longer than an operator's max_age, which the
    # server refuses)
    try:
        config = (await js.stream_info(TELEMETRY_STREAM)).config
    except NotFoundError:
        await js.add_stream(name=TELEMETRY_STREAM, subjects=[subject("telemetry", ">")],
                            storage=api.StorageType.FILE, duplicate_window=TELEMETRY_DUPLICATE_WINDOW_S,
                            max_msgs=TELEMETRY_MAX_MSGS, max_msgs_per_subject=TELEMETRY_MAX_MSGS_PER_BOARD)
    else:
        # raised to ours, never lowered (an operator's longer window stays), within the operator's max_age
        window = min(max(config.duplicate_window or 0, TELEMETRY_DUPLICATE_WINDOW_S), config.max_age or math.inf)
        await _settle(js, TELEMETRY_STREAM, config, max_msgs_per_subject=TELEMETRY_MAX_MSGS_PER_BOARD,
                      duplicate_window=window)
    return Fleet(js, await kv(DEVICES_BUCKET), await kv(DESIRED_BUCKET), models)


def _event(msg) -> dict | None:
    """A telemetry message's event: a JSON object whose device_id is the board its subject names; None for anything
    else (a stolen board can have the server store an answer, protobuf or a PubAck, on any board's subject by naming
    it as a reply subject: docs/SECURITY.md), which must not stop the operator reading the others."""
    try:
        event = json.loads(msg.data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict) or event.get("device_id") != msg.subject.rsplit(".", 1)[-1]:
        return None
    return event


async def _settle(js, stream: str, config: api.StreamConfig | None = None, **settings) -> None:
    """Give an existing stream (`config`: its config, read here if not given) these settings where it has others
    (NotFoundError: no such stream). The operator's call: a board can neither read a stream's config nor change
    it."""
    config = config or (await js.stream_info(stream)).config
    if any(getattr(config, k) != v for k, v in settings.items()):
        await js.update_stream(config.evolve(**settings))
        log.info("stream %s updated: %s", stream, settings)


async def read_telemetry(js, device_id: str | None = None, timeout_s: float = JS_TIMEOUT_S) -> list[dict]:
    """The events in the telemetry stream (one board's, or all), oldest first, each once: the operator's reader.

    JetStream's duplicate window covers a resend only within TELEMETRY_DUPLICATE_WINDOW_S; a board offline longer
    with an ack lost resends events it had stored. Each event carries its message id (`msg_id`, as its
    `Nats-Msg-Id`: `<device id>-<outbox nonce>-<seq>`), and only the first of an id is kept, per subject: a board
    may publish only on its own subject, so a stolen one cannot have another board's events dropped here. An
    event from an agent that put no id in its body is known by its `Nats-Msg-Id` header; one with neither is kept.
    Every reader of the stream must drop duplicates so (a consumer of its own: by `msg_id`)."""
    filt = subject("telemetry", device_id or ">")
    sub = await js.pull_subscribe(filt, stream=TELEMETRY_STREAM, config=api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE, inactive_threshold=60.0))
    events: list[dict] = []
    seen: set[tuple[str, str]] = set()
    info = None
    try:
        info = await sub.consumer_info()
        left = info.num_pending  # a pull consumer: nothing is delivered before a fetch
        while left > 0:
            for msg in await sub.fetch(min(left, READ_BATCH), timeout=timeout_s):
                left = msg.metadata.num_pending
                event = _event(msg)
                if event is None:  # not a board's event (a server's answer a stolen board had stored there)
                    continue
                mid = event.get("msg_id")
                mid = mid if isinstance(mid, str) else (msg.headers or {}).get("Nats-Msg-Id")
                if mid is not None and (msg.subject, mid) in seen:
                    continue  # a resend the duplicate window did not catch
                if mid is not None:
                    seen.add((msg.subject, mid))
                events.append(event)
        return events
    finally:
        if info is not None:
            with contextlib.suppress(Exception):  # gone after its inactive_threshold anyway
                await js.delete_consumer(TELEMETRY_STREAM, info.name)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def provision_fleet(opts: NatsOptions) -> None:
    """Create the fleet's buckets and stream (the operator's identity: boards may use them, not create them)."""
    nc = await connect(opts, name="tierline-provision", timeout_s=JS_TIMEOUT_S)
    try:
        await open_fleet(nc)
    finally:
        await nc.close()


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; the peak elsewhere)."""
    now = proc_status_mib("VmRSS")
    if now is not None:
        return now
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def apply_memory_cap(memory_max_mb: int) -> None:
    """Cap this process's private writable memory, so a runaway model fails here, not the board (0 = none).

    RLIMIT_DATA (heap, anonymous mappings, thread stacks; Linux >= 4.7), not RLIMIT_AS:
    the address space of a Python process with a few runtimes is about 1 GB of mostly
    untouched reservations. The unit file's MemoryMax= caps real memory (cgroup).
    """
    if memory_max_mb > 0:
        limit = memory_max_mb * 1024 * 1024
        used = proc_status_mib("VmData")  # what RLIMIT_DATA counts
        if used is not None and memory_max_mb < used + MEMORY_CAP_HEADROOM_MB:  # it would fail at its next thread
            least = used + MEMORY_CAP_HEADROOM_MB
            raise ValueError(f"device_agent.memory_max_mb: {memory_max_mb} MB leaves the agent no room: it uses "
                             f"{used:.0f} MB before loading any model; give it at least {least:.0f} MB more than its "
                             "model needs (0: no cap)")
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def state_dir(manifest) -> Path:
    return (manifest.path.parent / manifest.device_agent.state_dir).resolve()


def load_device_model(manifest, threads: int) -> tuple[Engine, dict | None]:
    """The memory cap, then the engine of the model an update installed last, if any.

    A damaged installed model (its files fail their sha256 after a power loss, a bad sector)
    must not keep the board from booting: the other installed versions are tried newest
    first, then the board's own model (the manifest's). Installed means it passed its health
    check: a candidate the agent died on is removed when the ModelStore opens, never served.
    Returns the engine, and the `ota` outcome to report (LOAD_FAILED, naming the damaged
    version) when it fell back.
    """
    from tierline_device_agent.engine import load_engine  # the runtime: not needed by the CLI

    try:
        apply_memory_cap(manifest.device_agent.memory_max_mb)
    except ValueError as exc:
        raise ManifestError(f"{manifest.path}: {exc}") from None
    if not manifest.device_agent.device_id:
        return load_engine(manifest.models_path, threads=threads), None
    store = ModelStore(state_dir(manifest))
    installed = store.installed() if store.current() else []  # no `current`: the board's own model serves
    damaged: list[Path] = []
    why: list[str] = []
    for models_dir in [*installed, None]:  # None: the board's own model, last
        try:
            engine = load_engine(models_dir or manifest.models_path, threads=threads)
        except ArtifactError as exc:
            if models_dir is None:
                raise  # nothing left to serve: the board's own model is damaged too
            log.error("installed model %s is damaged (%s); trying the next one", models_dir.name, exc)
            damaged.append(models_dir)
            why.append(str(exc))
            continue
        if not damaged:
            return engine, None
        store.fall_back(damaged, models_dir)
        serving = models_dir.name if models_dir else "the board's own model"
        return engine, outcome(OtaCode.LOAD_FAILED, damaged[0].name,
                               f"installed model damaged on disk ({'; '.join(why)}); removed, serving {serving}")
    raise AssertionError("unreachable: the last candidate returns or raises")


class FleetAgent:
    """Runs the fleet loop on its own event loop thread beside the servicer."""

    def __init__(self, manifest, servicer, threads: int, fell_back: dict | None = None):
        self.cfg = manifest.device_agent
        self.device_id = self.cfg.device_id
        self.opts = NatsOptions.from_manifest(manifest, device_identity(self.device_id))
        self.servicer, self.threads = servicer, threads
        self.base_models = manifest.models_path
        self.store = ModelStore(state_dir(manifest))
        self.outbox = Outbox(state_dir(manifest) / "outbox.sqlite", self.cfg.outbox_max_events)
        self.serving_sha256 = load_index(self._models_dir())["artifacts"]["device"]["weights"]["sha256"]
        self.started_at = time.time()
        self.requests = 0
        self.status = "serving"
        self.ota: dict | None = fell_back  # the outcome of the last update (or of a damaged model at boot)
        # what the boot has to report, once: a damaged installed model, an update the agent died in
        self._boot_reports = [fell_back] if fell_back is not None else []
        crashed = self.store.crashed_attempt()  # its candidate was removed when the store opened
        self._crashed_digest = crashed["digest"] if crashed else None
        if crashed is not None:
            self.ota = crash_outcome(crashed, servicer.engine.info.version)
            self._boot_reports.append(self.ota)
        self._resume: dict[str, tuple[str, int, int]] = {}  # sha256 -> (object nuid, next sequence, bytes)
        self.metrics = None if servicer.metrics is None else FleetMetrics(
            servicer.metrics.registry, self.device_id, self.cfg.heartbeat_s * self.cfg.stale_after_beats,
            outbox_pending=lambda: self.outbox.pending, outbox_dropped=lambda: self.outbox.dropped,
            link_up=lambda: self.servicer.link is not None and self.servicer.link.connected)
        self._nc = None
        self._fleet: Fleet | None = None
        # (revision, sha256 of the value) of the desired entry acted on last: the digest, because a
        # re-created store starts its revisions from 1 again
        self._handled_desired: tuple[int, str] | None = None
        self._retries = 0  # failed tries of that entry on the link
        self._retry_at: float | None = None  # monotonic time of the next try (None: not to be tried again)
        self._update: asyncio.Task | None = None
        # the version the running update is downloading (None: it is not, or no longer, downloading): while it is
        # set, and only then, a newer desired record may cancel the update (`_supersede`)
        self._downloading: str | None = None
        self._superseded_by: str | None = None  # the version whose record cancelled the running update
        self._beat_lock: asyncio.Lock | None = None
        self._failing: dict[str, str] = {}  # duty -> why it failed last (logged when that changes)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet", daemon=True)
        self._main: asyncio.Future | None = None

    # -- called from the servicer's threads ------------------------------------------------------
    def record(self, kind: str, **fields) -> int:
        """One telemetry event into the outbox (sent when the link allows); returns its sequence number."""
        if kind == "request":
            self.requests += 1
        return self.outbox.append({"device_id": self.device_id, "kind": kind, "at": round(time.time(), 3),
                                   **fields})

    def on_answer(self, resp, via: str = "grpc") -> None:
        """One telemetry event per answer: `via` is "grpc" (the board's front door) or "nats" (the router)."""
        try:
            self.record("request", via=via, tier=resp.tier, degraded=resp.degraded, model_version=resp.model_version,
                        latency_ms=round(resp.timings.total_ms, 2), completion_tokens=resp.usage.completion_tokens)
        except Exception:  # noqa: BLE001 - a full disk must not fail the answer itself
            log.exception("telemetry event not stored")

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> "FleetAgent":
        self.servicer.on_answer = self.on_answer
        for report in self._boot_reports:  # a damaged model, a crashed update: said once, as an update
            self.record("ota", **report)
            if self.metrics is not None:
                self.metrics.updated(OtaCode(report["code"]))
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        return self

    def stop(self) -> None:
        async def _stop():
            if self._main:
                self._main.cancel()
            self._superseded_by = None  # what ends the running update now is this stop, not a newer record
            if self._update is not None and not self._update.done():
                # a stop is no crash: the candidate is dropped and its attempt record with it (it would count
                # against MAX_CRASHED_ATTEMPTS at the next boot); the next start tries the update again
                self._update.cancel()
                await asyncio.wait({self._update}, timeout=STOP_UPDATE_S)
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()

        stop_loop_thread(self._loop, self._thread, _stop)
        self.outbox.close()

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        """Each beat: registration, then the heartbeat and the desired-model check, each failing alone;
        the telemetry drain runs beside it (`_send`). A failed registration or heartbeat backs off."""
        self._beat_lock = asyncio.Lock()
        sender = asyncio.get_running_loop().create_task(self._send())
        failures = 0
        try:
            while True:
                failed = await self._duty("registration", self._ensure_registered)
                if failed is None:
                    failed = await self._duty("heartbeat", self.beat)
                    await self._duty("desired model check", self._reconcile)
                if failed is not None and not isinstance(failed, LinkDown):
                    self._fleet = None  # buckets may be gone (a fresh server): open and register again
                failures = 0 if failed is None else failures + 1
                await asyncio.sleep(self.cfg.heartbeat_s * min(2 ** failures, MAX_BACKOFF_FACTOR))
        finally:
            sender.cancel()

    async def _duty(self, name: str, work) -> Exception | None:
        """`work()`, failing alone: returns its exception (None: it worked). A failure is logged when it
        starts or its cause changes, not on every beat, and its end once, at the same level (the log that
        named a failure also says when it is over)."""
        refused_before = self._refusal()
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the link comes and goes, a stream may be gone: tried again
            why = self._why(exc, refused_before)
            if self._failing.get(name) != why:
                log.warning("fleet: %s failed: %s", name, why)
            self._failing[name] = why
            return exc
        if self._failing.pop(name, None) is not None:
            log.warning("fleet: %s works again", name)
        return None

    def _why(self, exc: Exception, refused_before: Exception | None = None) -> str:
        """A failure in words. The server refuses a publish (a permissions violation) apart from the request
        it refused, which then only times out: a timeout names the server's refusal too, if one came while
        the failed work ran. nats-py keeps its last error until the next reconnect, so one that was there
        before (`refused_before`, from `_refusal`) is old news: an unrelated timeout later must not repeat it."""
        why = f"{type(exc).__name__}: {exc}"
        refusal = self._refusal()
        timed_out = isinstance(exc, (asyncio.TimeoutError, TimeoutError))
        if timed_out and refusal is not None and refusal is not refused_before:
            why += f" (the server's last refusal: {refusal})"
        return why

    def _refusal(self) -> Exception | None:
        """The connection's last error if it is the server's refusal (a permissions violation); nats-py makes a
        new exception for each, so two calls return the same object only if no refusal came in between."""
        error = self._nc.last_error if self._nc is not None else None
        return error if PERMISSIONS_ERR in str(error).lower() else None

    async def _ensure_registered(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._nc = await connect(self.opts, name=f"tierline-device-{self.device_id}", timeout_s=JS_TIMEOUT_S)
        if not self._nc.is_connected:
            raise LinkDown("NATS is away; reconnecting")
        if self._fleet is None:
            # with an identity of its own the board may only bind the buckets; on a shared password it
            # opens them as the CLI does
            fleet = await open_fleet(self._nc, board=bool(self.opts.identity))
            await register(fleet.devices, self.device_id, self.state())
            self._fleet = fleet
            self._beaten()
            log.info("registered %s", self.device_id)

    def state(self) -> dict:
        """The reported state: what the fleet view shows for this device."""
        info = self.servicer.engine.info
        link = self.servicer.link
        return {
            "device_id": self.device_id,
            "model": {"name": info.model, "version": info.version, "sha256": self.serving_sha256,
                      "bytes": info.bytes},
            "status": self.status,
            "ota": self.ota,
            "load": {"queue": self.servicer.scheduler.depth, "requests": self.requests, "rss_mb": rss_mb(),
                     "loadavg_1m": round(os.getloadavg()[0], 2)},
            "outbox": {"pending": self.outbox.pending, "dropped": self.outbox.dropped,
                       "damaged": self.outbox.damaged},
            "tier_link": "up" if link is not None and link.connected else "down",
            "memory_max_mb": self.cfg.memory_max_mb,
            "heartbeat_s": self.cfg.heartbeat_s,
            "stale_after_beats": self.cfg.stale_after_beats,
            "last_heartbeat": round(time.time(), 3),
            "started_at": round(self.started_at, 3),
            "platform": platform.system().lower(),
            "arch": platform.machine(),
            "python": platform.python_version(),
        }

    async def beat(self) -> None:
        """Write the reported state over the entry (the board never reads it: `register`)."""
        async with self._beat_lock:
            if self._fleet is None or not self._nc.is_connected:
                raise LinkDown("NATS is away; reconnecting")
            await register(self._fleet.devices, self.device_id, self.state())
            self._beaten()

    def _beaten(self) -> None:
        if self.metrics is not None:
            self.metrics.beat()

    async def _send(self) -> None:
        """The telemetry drain, a task of its own beside the beats: a telemetry stream that is gone, refused
        or slow (a refused publish shows only when its ack times out) delays neither heartbeats nor updates,
        and its events wait in the outbox. The outbox's count is polled, so a busy board's events go out as
        they arrive instead of filling (and dropping) it between beats; after a failure it waits a beat."""
        while True:
            await asyncio.sleep(FLUSH_POLL_S)
            if self.outbox.pending and self._fleet is not None and self._nc.is_connected:
                if await self._duty("telemetry", self._flush) is not None:
                    await asyncio.sleep(self.cfg.heartbeat_s)

    async def _flush(self) -> None:
        """Send the outbox, oldest first, batch after batch until it is empty; an event leaves it only once
        JetStream has stored it."""
        js, subj = self._fleet.js, subject("telemetry", self.device_id)
        while batch := self.outbox.peek(FLUSH_BATCH):
            # published in order on one connection, the acks awaited together: one round trip per batch,
            # not per event (the fleet loop shares the GIL with the threads answering)
            acks = await asyncio.gather(*(
                js.publish(subj, json.dumps({**event, "seq": seq, "msg_id": mid}).encode(), timeout=JS_TIMEOUT_S,
                           headers={"Nats-Msg-Id": mid})
                for seq, event in batch for mid in (self.outbox.message_id(self.device_id, seq),)),
                return_exceptions=True)
            stored = [seq for (seq, _), ack in zip(batch, acks) if not isinstance(ack, BaseException)]
            # a resend after a lost ack has the same id: not stored again within the duplicate window, dropped by
            # the readers after it (`read_telemetry`)
            self.outbox.ack_all(stored)
            failed = next((ack for ack in acks if isinstance(ack, BaseException)), None)
            if failed is not None:
                raise failed

    async def _reconcile(self) -> None:
        """Desired vs reported: a new desired record starts an update (one at a time). One that comes while an
        update runs waits for it to end, unless it supersedes it (`_supersede`)."""
        running = self._update is not None and not self._update.done()
        if running and self._downloading is None:
            return  # installing, checking or swapping: it ends first
        try:
            entry = await self._fleet.desired.get(self.device_id)
        except KeyNotFoundError:
            return
        handled = (entry.revision, hashlib.sha256(entry.value or b"").hexdigest())
        if running:
            if handled[1] == self._handled_desired[1]:  # the same record put again: the same update, going on
                self._handled_desired = handled
                return
            if not await self._supersede(entry.value):
                return  # it goes on; the new record is acted on once it has ended
            self._handled_desired = None  # the new record is new, whatever its revision
        if handled == self._handled_desired:
            if self._retry_at is None or time.monotonic() < self._retry_at:
                return  # acted on (or waiting for its next try on the link)
        else:
            self._handled_desired, self._retries = handled, 0
        self._retry_at = None
        self._superseded_by = None
        self._update = asyncio.get_running_loop().create_task(self._apply(entry.value))

    async def _supersede(self, raw: bytes) -> bool:
        """The one rule for a desired record that changed (its content) while an update runs: True when that update
        was cancelled and has ended, so the new record is applied now. Only while the update is still downloading
        (`_downloading`: before its install, its health check and its swap, which a cancel could leave
        half-done), and only for a record this board would take (signed for it, not expired, above the newest
        manifest it verified, which is the running update's; or the model it serves): a record it would refuse
        cancels nothing, and is refused when the update has ended. The cancelled update cleans up after itself
        (`_download` drops its partial download, `_install` its staging folder; its attempt record and
        `verified` marker are made only after the downloads) and reports SUPERSEDED (`_apply`)."""
        if self._downloading is None or not self._would_take(raw):
            return False
        self._superseded_by = claimed_version(raw)
        log.info("update to %s superseded by %s while it downloaded: cancelled", self._downloading,
                 self._superseded_by)
        self._update.cancel()  # no await since `_downloading` was read: the update is still downloading
        await asyncio.wait({self._update}, timeout=STOP_UPDATE_S)
        return self._update.done()  # not yet: the next beat looks again

    def _would_take(self, raw: bytes) -> bool:
        """Whether `_apply` would go on with this record (its checks before the download, none of them recorded)."""
        try:
            desired = verify_signed(raw, self.cfg.update_keys, self.device_id)
            if (self.servicer.engine.info.version, self.serving_sha256) == (desired.version, desired.tflite.sha256):
                return True  # back to the model it serves: nothing to download
            check_expiry(desired)
            check_sequence(desired, self.store.sequence(), self.store.newest())
        except OtaError:
            return False
        return True

    async def _apply(self, raw: bytes) -> None:
        version = claimed_version(raw)
        try:  # signature, device, expiry and sequence first: nothing is downloaded for a refused update
            desired = verify_signed(raw, self.cfg.update_keys, self.device_id)
            version = desired.version
            # before the expiry: a board that serves exactly this model (rebooted after the manifest expired) has
            # applied it, not refused it
            if (self.servicer.engine.info.version, self.serving_sha256) == (version, desired.tflite.sha256):
                code, detail = OtaCode.APPLIED, "already serving this version"
            else:
                check_expiry(desired)  # EXPIRED
                self.store.admit(desired)  # DOWNGRADE below the installed or the newest verified manifest
                crashed = self.store.given_up(desired)
                if crashed is not None:  # the agent died on it MAX_CRASHED_ATTEMPTS times: not again
                    if crashed["digest"] == self._crashed_digest:  # this boot reported it already
                        return
                    raise given_up(crashed)
                code, detail = OtaCode.APPLIED, await self._install(desired)
        except asyncio.CancelledError:
            if self._superseded_by is None:
                raise  # the agent stops
            asyncio.current_task().uncancel()  # cancelled by `_supersede`, which is told it ended by its report
            code, detail = OtaCode.SUPERSEDED, (f"a newer desired model ({self._superseded_by}) was set while this "
                                                "one downloaded; dropped, nothing installed")
        except OtaError as exc:
            code, detail = exc.code, str(exc)
        except Exception as exc:  # noqa: BLE001 - an update never takes the agent down
            code = OtaCode.DOWNLOAD_FAILED if _is_link_error(exc) else OtaCode.INSTALL_FAILED
            detail = f"{type(exc).__name__}: {exc}" + ("" if code == OtaCode.DOWNLOAD_FAILED else "; not retried")
        if code == OtaCode.DOWNLOAD_FAILED:  # the link: the same entry is tried again, less and less often
            self._retries += 1
            self._retry_at = time.monotonic() + min(self.cfg.heartbeat_s * 2 ** self._retries, RETRY_MAX_S)
        self.status = "serving"
        self.ota = outcome(code, version, detail)
        if self.metrics is not None:
            self.metrics.updated(code)
        self.record("ota", **self.ota)
        log.info("update to %s: %s (%s)", version, code.name, detail)
        if code == OtaCode.SUPERSEDED:
            return  # the newer update reports at once (its telemetry event says this one's end)
        try:
            await self.beat()
        except Exception:  # noqa: BLE001 - the next beat reports it
            pass

    async def _install(self, desired: DesiredModel) -> str:
        self.status = "updating"
        self.ota = outcome(OtaCode.IN_PROGRESS, desired.version, "downloading")
        self._downloading = desired.version  # from here until its objects are here, a newer record may cancel it
        try:
            staged = await self._fetch(desired)
        finally:
            self._downloading = None
        loop = asyncio.get_running_loop()
        try:
            if asyncio.current_task().cancelling():  # a cancel that came with the last chunk, and was lost in a
                raise asyncio.CancelledError  # wait_for (Python 3.11) that returned the chunk: honoured here
            installed = await loop.run_in_executor(None, self.store.install, staged, desired, self._models_dir())
        except BaseException:
            self.store.discard(staged)
            raise
        cancelled = threading.Event()
        try:
            # recorded first: if the agent dies in the load or the check (the OOM killer, a crash in the runtime on
            # this model, a power cut), the next boot removes the candidate, reports it and, after
            # MAX_CRASHED_ATTEMPTS, does not try this manifest again. Written on the loop (a small file), so a stop's
            # cancel never finds a thread still writing a record the cleanup below has removed
            self.store.begin_attempt(desired)
            engine = await loop.run_in_executor(None, load_candidate, installed, self.threads)
            self.store.attempt_step("health_check")
            accuracy = await loop.run_in_executor(None, health_check, engine, self.cfg.health_problems,
                                                  self.cfg.health_min_token_accuracy, cancelled.is_set)
        except BaseException:
            cancelled.set()  # a stop: the check's thread ends at its next problem (the process waits for threads)
            self.store.discard(installed)  # rolled back: the previous model never stopped serving
            self.store.end_attempt()  # the failure is reported now (an exception here, not a crash)
            raise
        self.store.activate(desired.version)  # marked verified, then current
        self.store.end_attempt()
        self.servicer.swap_engine(engine)
        self.serving_sha256 = desired.tflite.sha256
        return f"serving {desired.version} (health check {accuracy:.2f})"

    async def _fetch(self, desired: DesiredModel) -> Path:
        """Both objects of `desired`, downloaded and checked against their signed digests, in a staging folder
        (removed if anything fails or the update is cancelled)."""
        await self.beat()
        fleet = self._fleet  # for both downloads: a heartbeat failing meanwhile sets self._fleet to None
        if fleet is None:
            raise OtaError(OtaCode.DOWNLOAD_FAILED, "the fleet's buckets are being opened again; tried again later")
        for sha256 in set(self._resume) - {desired.tflite.sha256, desired.config.sha256}:
            self._drop_partial(sha256)  # a download another update left: not needed any more
        staged = self.store.staging()
        try:
            for art, dest in ((desired.tflite, staged / "device" / "model.tflite"),
                              (desired.config, staged / "device" / "config.json")):
                await self._download(fleet, art, dest)
                verify_digest(dest, art)
        except BaseException:
            self.store.discard(staged)
            raise
        return staged

    def _models_dir(self) -> Path:
        return self.store.current() or self.base_models

    async def _download(self, fleet: Fleet, art: Artifact, dest: Path) -> None:
        """One artifact into `dest`, by direct gets alone: a board may create no consumer (a consumer's deliver
        subject is in its request's body, which permissions do not see, so a stolen board could have the server
        push the store to any subject). The object's record comes first, and its size must be the signed one
        before a chunk is fetched; its chunks then come in order by subject, in batches (`_fetch_chunks`).
        Whether they are the signed bytes is checked after, once: ota.verify. Both come on the agent's own
        connection; `fleet` is the caller's proof that the buckets are open.

        The bytes go to `models/.incoming-resume/<sha256>` first: a try that fails on the link (no chunk for
        DOWNLOAD_STALL_S, the connection lost, the try's time limit) leaves them there, and the next try of the
        same object (its nuid unchanged) asks for the chunks after the last one received. A restart starts over
        (the agent removes `.incoming-*` when it starts)."""
        if not self._nc.is_connected:
            raise OtaError(OtaCode.DOWNLOAD_FAILED, "NATS is away; tried again later")
        partial = self.store.models / RESUME_DIR / art.sha256
        progress = {"got": 0}
        limit = DOWNLOAD_TIMEOUT_S + art.size / DOWNLOAD_MIN_BYTES_PER_S
        started = time.monotonic()

        async def fetch() -> None:
            info = await _object_record(self._nc, art.object)
            if info.size != art.size:
                raise OtaError(OtaCode.DIGEST_MISMATCH, f"{art.object}: {info.size} bytes in the object store, not "
                                                        f"the signed {art.size}; refused before download")
            nuid, seq, got = self._resume.get(art.sha256, ("", 1, 0))
            if nuid != info.nuid or not partial.is_file():  # another object under the name, or nothing kept
                seq, got = 1, 0
            partial.parent.mkdir(exist_ok=True)
            with open(partial, "r+b" if got else "wb") as out:
                out.truncate(got)  # a write the last try's cancellation cut short
                out.seek(got)
                progress["got"] = got

                def received(next_seq: int, total: int) -> None:
                    self._resume[art.sha256] = (info.nuid, next_seq, total)
                    progress["got"] = total

                await _fetch_chunks(self._nc, art.object, info, out, start=(seq, got), received=received)

        try:
            # in this task (not wait_for's own): a cancel (a stop, a newer desired record) reaches the download itself
            async with asyncio.timeout(limit):
                await fetch()
        except OtaError as exc:
            if exc.code != OtaCode.DOWNLOAD_FAILED:
                self._drop_partial(art.sha256)
            raise
        except (asyncio.TimeoutError, TimeoutError, ConnectionError) as exc:
            elapsed = time.monotonic() - started
            why = (f"the limit for {art.size} bytes, {limit:.0f} s" if elapsed >= limit
                   else f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{art.object}: not downloaded ({why}; {progress['got']} of "
                                                    f"{art.size} bytes in {elapsed:.0f} s); tried again later, "
                                                    "from there") from None
        except BaseException:
            self._drop_partial(art.sha256)
            raise
        os.replace(partial, dest)
        self._drop_partial(art.sha256)

    def _drop_partial(self, sha256: str) -> None:
        """Forget a partial download (and its folder once it holds none: nothing half-made is left behind)."""
        self._resume.pop(sha256, None)
        folder = self.store.models / RESUME_DIR
        (folder / sha256).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not there, or another artifact's partial download in it
            folder.rmdir()


async def _object_record(nc, name: str) -> api.ObjectInfo:
    """An object's record in the model store (size, chunk count, the nuid its chunks' subject names), by a
    direct get of the last message on its record's subject."""
    meta = OBJ_META_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=base64.urlsafe_b64encode(name.encode()).decode())
    try:
        msg = await nc.request(MODELS_DIRECT_GET, json.dumps({"last_by_subj": meta}).encode(), timeout=JS_TIMEOUT_S)
    except (NoRespondersError, asyncio.TimeoutError) as exc:  # nats-py's TimeoutError is asyncio's too
        # a stream without allow_direct does not answer them (the request only times out), nor does a server
        # whose permissions predate them (its refusal is logged)
        raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: no answer from the object store {MODELS_BUCKET} "
                                                f"({type(exc).__name__}): the link, or a store without direct gets "
                                                "(allow_direct: `tierline devices provision` sets it); tried again "
                                                "later") from None
    status = (msg.headers or {}).get("Status")
    if status == "404":
        raise OtaError(OtaCode.NOT_FOUND, f"{name}: not in the object store {MODELS_BUCKET}")
    if status:
        raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: the object store answered {status} "
                                                f"{msg.headers.get('Description', '')}; tried again later")
    try:
        info = api.ObjectInfo.from_response(json.loads(msg.data))
    except (ValueError, TypeError, KeyError, AttributeError):
        info = None
    if info is None or info.deleted or info.is_link() or not info.nuid or not isinstance(info.size, int):
        raise OtaError(OtaCode.NOT_FOUND, f"{name}: deleted, a link or a bad record in {MODELS_BUCKET}, not an object")
    return info


async def _fetch_chunks(nc, name: str, info: api.ObjectInfo, out, start: tuple[int, int] = (1, 0),
                        received=None) -> None:
    """An object's chunks into `out`, in order, by batched direct gets (nats-server 2.11+): one request asks for
    the chunks from a sequence on, the server sends them back to back, up to DOWNLOAD_BATCH_BYTES, and ends the
    batch with a status message (204 EOB). A request per batch, not per chunk: 100 MB over a 100 ms link is 25
    round trips, not 800. More bytes than the record says are refused (DIGEST_MISMATCH); fewer, with no chunk
    left (the object replaced meanwhile), fail the download (tried again later).

    `start`: the stream sequence to ask from and the bytes already in `out` (a resumed download); `received`
    (next sequence, bytes) is called after each chunk is written. No chunk for DOWNLOAD_STALL_S fails it
    (DOWNLOAD_FAILED): the link stalled; a slow one that keeps bringing chunks goes on."""
    chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=info.nuid)
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()  # under the board's own inbox prefix: the one it may subscribe to
    sub = await nc.subscribe(inbox)
    try:
        seq, got = start
        while got < info.size:
            ask = {"seq": seq, "next_by_subj": chunks, "batch": max(info.chunks or 0, 1),
                   "max_bytes": DOWNLOAD_BATCH_BYTES}
            await nc.publish(MODELS_DIRECT_GET, json.dumps(ask).encode(), reply=inbox)
            came = 0
            while True:
                try:
                    msg = await sub.next_msg(timeout=DOWNLOAD_STALL_S)
                    if asyncio.current_task().cancelling():  # a cancel that came with this chunk, which next_msg's
                        raise asyncio.CancelledError  # wait_for returned instead (Python 3.11): honoured here
                except asyncio.TimeoutError:  # nats-py's TimeoutError is asyncio's too
                    raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: no chunk for {DOWNLOAD_STALL_S:.0f} s after "
                                                            f"{got} of {info.size} bytes (a stalled link); tried "
                                                            "again later, from there") from None
                status = (msg.headers or {}).get("Status")
                if status == "204":  # end of the batch; the next one starts after its last chunk
                    if not came:  # an empty batch would be asked again and again, to the time limit
                        raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: {got} of {info.size} bytes, then an empty "
                                                                "batch; tried again later")
                    break
                if status == "404":  # no chunk at or after `seq`
                    raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: {got} of {info.size} bytes, then no more "
                                                            "chunks (replaced while downloading?); tried again later")
                if status:
                    raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: the object store answered {status} "
                                                            f"{msg.headers.get('Description', '')}; tried again later")
                got += len(msg.data)
                if got > info.size:
                    raise OtaError(OtaCode.DIGEST_MISMATCH, f"{name}: more bytes in the object store than its "
                                                            f"record's {info.size}; refused")
                try:
                    next_seq = int(msg.headers["Nats-Sequence"]) + 1
                except (KeyError, TypeError, ValueError):  # a direct get's answer always names it
                    raise OtaError(OtaCode.DOWNLOAD_FAILED, f"{name}: a chunk without its sequence; tried again "
                                                            "later") from None
                await loop.run_in_executor(None, out.write, msg.data)
                came += 1
                seq = next_seq
                if received is not None:
                    received(seq, got)
    finally:
        with contextlib.suppress(Exception):  # a closed connection has dropped the subscription already
            await sub.unsubscribe()


def _is_link_error(exc: BaseException) -> bool:
    """A failure the link explains (worth another try); anything else (a full disk) is not retried."""
    from nats.errors import Error as NatsError

    return isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, NatsError))


async def register(devices, device_id: str, state: dict) -> int:
    """This device's entry, written whole (the server allows each board its own key only); returns its revision.

    A put, never a read: a board may not read even its own entry back. A read is a request, and the server
    sends its answer (here, bytes the board chose) to whatever reply subject the request names, where any
    stream capturing that subject stores it: another bucket's key, the API keys' among them."""
    return await devices.put(device_id, json.dumps(state).encode())
