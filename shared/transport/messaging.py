"""NATS for Tierline, the client side: subject names, connecting with credentials, asking a tier.

Every subject is built by `subject()`. A tier answers on `tierline.<tier>.infer` (and
`.stream`) through its nats.micro service (transport/tier_service.py), and each replica on
`tierline.<tier>.infer.<replica id>` too, for a retry that must avoid a silent one; payloads are the
protobuf `InferRequest` / `InferResponse` of proto/tierline_api/v1, and errors travel as
nats.micro's error headers plus `Tierline-Status` with the gRPC status name, which
`ask_tier` / `stream_tier` turn back into `TierError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

import nats
import nats.errors
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from tierline_api.v1 import inference_pb2 as pb

SUBJECT_PREFIX = "tierline"
STATUS_HEADER = "Tierline-Status"  # the gRPC status name of an error reply
STREAM_ID_HEADER = "Tierline-Stream"  # names a request (its reply subject) so the requester can cancel it
TIMEOUT_HEADER = "Tierline-Timeout"  # seconds the requester waits: the tier stops waiting when it does
HEARTBEAT_HEADER = "Tierline-Heartbeat"  # seconds: the requester asks the tier to say it is alive this often
PROGRESS_HEADER = "Tierline-Progress"  # marks a tier's "still working on it" message (no body)
# on an error reply: this replica could not serve it (it is stopping), another replica of the tier may
OTHER_REPLICA_HEADER = "Tierline-Other-Replica"
HEARTBEAT_S = 0.2  # how often a tier working on a request says so
SILENCE_S = 1.0  # a replica silent this long (while the link is up) is taken for dead: ask another
PROBE_S = 0.25  # seconds a retry after a silence waits for a replica to answer $SRV.PING (4 round trips if longer)
STALL_S = 0.25  # a wait for a reply that ends this much later than due: this side's own event loop stalled
RECONNECT_BASE_S = 1.0  # seconds, the first wait after the link drops (doubles after each failed attempt)
RECONNECT_MAX_S = 30.0  # seconds, the longest wait between two attempts (forever)
RECONNECT_JITTER = 0.2  # each wait is drawn from [1 - 0.2, 1] x its step, so a fleet does not reconnect in step
START_TIMEOUT_S = 10.0  # connecting and registering, at most
ERROR_LOG_S = 60.0  # a connection's error (a permissions violation, a failed reconnect) is logged once in this long
DRAIN_TIMEOUT_S = 2.0  # a drain (a process stopping) waits this long for its subscriptions, then closes (nats-py: 30)
CAS_ATTEMPTS = 100  # compare-and-set retries of one KV change before giving up (kv_change)
CAS_BACKOFF_S = 0.005  # seconds, the most a writer that lost a race waits before reading again
# the device fleet's JetStream names (device_agent/fleet.py uses them; the NATS permissions name them)
DEVICES_BUCKET = "tierline_devices"  # KV: reported state per device
DESIRED_BUCKET = "tierline_desired"  # KV: the signed desired model per device
MODELS_BUCKET = "tierline_models"  # Object Store: the artifacts
TELEMETRY_STREAM = "TIERLINE_TELEMETRY"  # stream of `tierline.telemetry.<device id>`
# API keys and daily usage shared by the routers (router/auth.py:KvKeyStore, `auth.store: nats`)
KEYS_BUCKET = "tierline_keys"  # KV: id.<key id> -> record, hash.<sha256> -> key id
USAGE_BUCKET = "tierline_usage"  # KV: <key id>.<UTC day> -> calls and tokens
# the Batch API (router/batch.py): files, batch records, the durable work queue of lines, their results
FILES_BUCKET = "tierline_files"  # Object Store: uploaded input files and the output/error files
BATCH_BUCKET = "tierline_batches"  # KV: file.<id> / batch.<id> -> record (JSON), active.<batch id> while it runs
RESULTS_BUCKET = "tierline_batch_results"  # KV: <batch id>.<line> -> that line's output line, written once
BATCH_STREAM = "TIERLINE_BATCH"  # work queue of `tierline.batch.work.<batch id>` (one message per line)
BATCH_CONSUMER = "batch-workers"  # the durable pull consumer every router's workers share


log = logging.getLogger("tierline.nats")


class _QuietTlsClose(logging.Filter):
    """asyncio warns on every TLS connection nats-py closes ("returning true from eof_received() has no effect
    when using ssl": its protocol asks to keep a half-closed socket, which TLS cannot); nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsClose())


def subject(tier: str, verb: str = "infer", replica: str | None = None) -> str:
    """The one place subject names are made: tierline.<tier>.<verb>, and one replica's own
    tierline.<tier>.<verb>.<replica id> (`replica="*"`: every replica's, for permissions)."""
    return f"{SUBJECT_PREFIX}.{tier}.{verb}" + (f".{replica}" if replica else "")


class KvConflict(Exception):
    """A KV entry that other writers kept changing for CAS_ATTEMPTS tries in a row."""


async def kv_get(bucket, key: str) -> tuple[dict | None, int]:
    """A KV entry's JSON value and its revision; (None, 0) when there is none (never written, deleted, purged)."""
    from nats.js.errors import KeyDeletedError, KeyNotFoundError

    try:
        entry = await bucket.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return None, 0
    return json.loads(entry.value), entry.revision


async def kv_entries(js, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every entry of KV bucket `bucket` whose key starts with `prefix`: its value by its key (deleted or purged
    keys left out). The one listing of a bucket: the fleet (`tierline devices list`), API keys (router/auth.py).

    Not nats-py's `KeyValue.keys()`: that opens a watcher, whose "no more keys" marker can come before the first
    key (it compares the consumer's pending count, already 0 once the server has sent everything, with what the
    client has received, still 0 while it is in flight), so it answers "no keys" for a bucket that has some
    (measured: about 1 call in 1000 on a bucket of one key; `tierline devices list` once listed no devices in
    CI), and each call leaves its consumer on the server for 5 minutes. Here the bucket's stream is asked
    which subjects it holds (stream info with a subjects filter; no consumer), and each key is read; the names
    are JetStream KV's own (ADR-8): stream `KV_<bucket>`, subjects `$KV.<bucket>.<key>`.
    """
    from nats.js.errors import KeyDeletedError, KeyNotFoundError

    pre = f"$KV.{bucket}."
    kv = await js.key_value(bucket)
    for again in (True, False):  # counted apart by the server: a purge between the two counts is asked again
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{pre}>")
        subjects = info.state.subjects or {}
        if sum(subjects.values()) >= info.state.messages:
            break
        if not again:  # the server answers at most 100,000 subjects at once
            raise RuntimeError(f"KV bucket {bucket} holds more keys than one listing answers ({len(subjects)})")
    listed = sorted(s[len(pre):] for s in subjects if s.startswith(pre + prefix))
    entries = {}
    for key in listed:
        try:
            entries[key] = (await kv.get(key)).value or b""
        except (KeyNotFoundError, KeyDeletedError):
            continue  # its last entry is a delete or purge marker, or it went meanwhile
    return entries


async def kv_change(bucket, key: str, change) -> dict | None:
    """`change(value or None) -> new value, or None to leave the entry as it is`, applied by compare-and-set on
    the entry's revision (created when new) and retried while other writers interfere (KvConflict after
    CAS_ATTEMPTS); returns the value the entry holds afterwards. The one read-modify-write of JetStream KV:
    quotas shared by routers (router/auth.py), batch records (router/batch.py)."""
    from nats.js.errors import KeyWrongLastSequenceError

    for _ in range(CAS_ATTEMPTS):
        value, revision = await kv_get(bucket, key)
        new = change(value)
        if new is None:
            return value
        body = json.dumps(new).encode()
        try:
            if revision:
                await bucket.update(key, body, last=revision)
            else:
                await bucket.create(key, body)
            return new
        except KeyWrongLastSequenceError:  # another writer was first (create: KeyWrongLastSequence too)
            await asyncio.sleep(random.uniform(0, CAS_BACKOFF_S))
    raise KvConflict(f"{key} changed by others {CAS_ATTEMPTS} times in a row")


def batch_subject(batch_id: str = "*") -> str:
    """Where a batch's lines wait for a worker: tierline.batch.work.<batch id>."""
    return f"{SUBJECT_PREFIX}.batch.work.{batch_id}"


def service_name(tier: str) -> str:
    """A tier's nats.micro service name (discovery: $SRV.PING|INFO|STATS.<name>)."""
    return f"{SUBJECT_PREFIX}-{tier}"


async def discover(nc, tier: str, verb: str = "STATS", wait_s: float = 0.25,
                   until: Callable[[dict], bool] | None = None, none_up_raises: bool = False) -> list[dict]:
    """Every replica's reply to `$SRV.<verb>.tierline-<tier>` (a JSON object), gathered for `wait_s` seconds, or
    until one that `until` accepts (then the last in the list); none at once when no replica is up (or, with
    `none_up_raises`, NoRespondersError).

    nats.micro replicas all answer a discovery request, so this is a scatter-gather on a
    reply subject (the connection's shared one: `_replies`) rather than `nc.request` (which
    keeps only the first reply).
    """
    loop = asyncio.get_running_loop()
    found: list[dict] = []
    async with _replies(nc).box() as (inbox, replies):
        await nc.publish(f"$SRV.{verb}.{service_name(tier)}", b"", reply=inbox)
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await replies.get(timeout=left)
            except nats.errors.TimeoutError:
                break
            if (msg.headers or {}).get("Status") == "503":  # no responders: nobody else will answer
                if none_up_raises:
                    raise nats.errors.NoRespondersError
                break
            try:
                reply = json.loads(msg.data)
            except ValueError:
                continue  # not a nats.micro reply
            if isinstance(reply, dict):
                found.append(reply)
                if until is not None and until(reply):
                    break
    return found


class Offline(ConnectionError):
    """No link to the tiers above (a board whose NATS connection is down, or a process whose link has stopped):
    the tier is not asked."""


class TierError(Exception):
    """A tier answered with an error; `status` is the gRPC status name; `other_replica`: the replica said another
    replica of its tier may serve it (OTHER_REPLICA_HEADER: it is stopping)."""

    def __init__(self, tier: str, status: str, message: str, other_replica: bool = False):
        super().__init__(f"{tier}: {status}: {message}")
        self.tier, self.status, self.message, self.other_replica = tier, status, message, other_replica


class ReplicaSilent(TimeoutError):
    """The replica working on a request stopped saying so (it died, or its link did): ask another (ask_tier's
    `after_silence`)."""


class _Box:
    """The replies to one request, in order; `get` waits for the next."""

    def __init__(self):
        self._msgs: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, msg) -> None:
        self._msgs.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float):
        """The next reply; nats' TimeoutError after `timeout` seconds without one."""
        if not self._msgs:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(max(timeout, 0.0), lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._msgs:
                raise nats.errors.TimeoutError
        return self._msgs.popleft()


class _Replies:
    """Every reply to one connection's requests on one wildcard subscription (`<inbox>.*`, one token per
    request), as nats-py's own `request` does: a request costs one PUB instead of SUB + PUB + UNSUB, each a
    write and an interest change on the server (the router asks a tier for every request it serves). nats-py
    subscribes it again after a reconnect."""

    def __init__(self, nc):
        from nats.nuid import NUID

        self._nc, self._prefix, self._nuid = nc, nc.new_inbox() + ".", NUID()
        self._boxes: dict[str, _Box] = {}
        self._sub = None
        self._lock = asyncio.Lock()

    async def _deliver(self, msg) -> None:
        box = self._boxes.get(msg.subject[len(self._prefix):])
        if box is not None:  # else a late reply to a request given up (timed out, cancelled)
            box.put(msg)

    @asynccontextmanager
    async def box(self):
        """(reply subject, its _Box) for one request; replies after the block are dropped."""
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._deliver)
        token = self._nuid.next().decode()
        box = self._boxes[token] = _Box()
        try:
            yield self._prefix + token, box
        finally:
            del self._boxes[token]


def _replies(nc) -> _Replies:
    """The connection's _Replies, kept on the connection itself (it holds the connection: a weak mapping from
    the connection to it would keep every connection alive)."""
    replies = getattr(nc, "_tierline_replies", None)
    if replies is None:
        replies = nc._tierline_replies = _Replies(nc)
    return replies


def _answer(tier: str, msg) -> pb.InferResponse:
    """A tier's reply: its InferResponse, or what it said instead raised (NoRespondersError: no replica;
    TierError: the tier's error, with its gRPC status name)."""
    headers = msg.headers or {}
    if headers.get("Status") == "503":
        raise nats.errors.NoRespondersError
    if ERROR_CODE_HEADER in headers:
        raise TierError(tier, headers.get(STATUS_HEADER, "UNKNOWN"), headers.get(ERROR_HEADER, ""),
                        other_replica=OTHER_REPLICA_HEADER in headers)
    return pb.InferResponse.FromString(msg.data)


async def ask_tier(nc, tier: str, request, timeout_s: float, after_silence: bool = False):
    """One InferRequest to a tier over NATS, with an explicit timeout.

    The replica that takes the request says every HEARTBEAT_S that it is still working on it,
    so a replica that dies mid-request is noticed after SILENCE_S (ReplicaSilent, a timeout the
    cascade retries on another replica), not after the whole `timeout_s`. Silence while this
    side's link is down does not count: the answer may come after the reconnect. Given up
    without an answer (a timeout, a silent replica, cancelled), it tells the tier, which stops
    decoding the request (`tierline.<tier>.cancel`, as a stream closed early).

    `after_silence` (a retry after a ReplicaSilent): the request goes to a replica that is alive, on
    its own subject, not to the queue group, which may draw the silent replica again (a hung process
    keeps its NATS subscription until the server gives up on it, minutes later): the first replica
    to answer $SRV.PING within PROBE_S, or four round trips to the server on a slower link (a hung
    one does not answer; nor does a stopping one). None up: NoRespondersError at once. When none
    answers in time (all hung, or a link slower than it seemed), or the one that did has left since
    (no responders) or is silent too (it hung since; a server whose permissions predate these
    subjects drops the request unsaid), the queue group, in the time left.
    Raises nats' NoRespondersError (no replica: at once), TimeoutError, or TierError.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if after_silence and (replica := await _alive_replica(nc, tier, timeout_s)):
        try:
            return await _ask_one(nc, tier, subject(tier, replica=replica), request, deadline)
        except (nats.errors.NoRespondersError, ReplicaSilent):
            pass  # it left, or hung, since: the queue group
    return await _ask_one(nc, tier, subject(tier), request, deadline)


async def _alive_replica(nc, tier: str, timeout_s: float) -> str | None:
    """The id of the first replica of `tier` to answer $SRV.PING: a retry after a silence goes there. It waits
    PROBE_S, or four of this link's round trips to the server where that is longer (a board on a cellular link),
    within a quarter of `timeout_s`; None when no usable reply came; NoRespondersError when no replica is up."""
    def usable(reply: dict) -> bool:
        rid = reply.get("id")
        return isinstance(rid, str) and rid.isascii() and rid.isalnum()  # a subject token, nothing else

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        await nc.flush(timeout=max(timeout_s / 4, 0.001))  # a round trip to the server: how slow the link is
    except (nats.errors.Error, asyncio.TimeoutError):
        return None  # slower than the time there is, or the link is down: no probe
    wait_s = min(max(PROBE_S, 4 * (loop.time() - t0)), timeout_s / 4)
    found = await discover(nc, tier, "PING", wait_s=wait_s, until=usable, none_up_raises=True)
    return found[-1]["id"] if found and usable(found[-1]) else None


async def _ask_one(nc, tier: str, to: str, request, deadline: float):
    """ask_tier's request to the subject `to`, answered by `deadline` (loop time)."""
    loop = asyncio.get_running_loop()
    async with _replies(nc).box() as (inbox, replies):
        ended = False  # the tier said its last word (an answer, an error, or no responders)
        try:
            sent = loop.time()
            await nc.publish(to, request.SerializeToString(), reply=inbox,
                             headers={TIMEOUT_HEADER: f"{max(deadline - sent, 0.0):.3f}",
                                      HEARTBEAT_HEADER: f"{HEARTBEAT_S}", STREAM_ID_HEADER: inbox})
            msg = await _next_word(nc, tier, replies, sent, deadline)
            ended = True
            return _answer(tier, msg)
        finally:
            if not ended:  # given up (a deadline, a silent replica, the caller gone): the tier stops decoding it
                await _publish_cancel(nc, tier, inbox)


async def _next_word(nc, tier: str, replies: _Box, heard: float, until: float):
    """The replica's next reply that is not a heartbeat, by `until` (loop time; nats' TimeoutError after), its
    silence counted from `heard` (its last word): ReplicaSilent after SILENCE_S without one while this side's link
    is up. A wait that ended STALL_S or more after it was due means this side's own event loop stalled (what the
    replica sent may still be unread in the socket): that is not the replica's silence, whose count starts again."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        wait = min(HEARTBEAT_S, max(until - asked, 0.0))
        try:  # what came while the caller held the last chunk is read before any silence counts
            msg = await replies.get(timeout=wait)
        except nats.errors.TimeoutError:
            now = loop.time()
            if now >= until:
                raise
            if not nc.is_connected or now - asked >= wait + STALL_S:
                heard = now  # our own link is down, or our own loop stalled: the replica may be fine
            elif now - heard >= SILENCE_S:
                raise ReplicaSilent(f"{tier}: the replica went silent for {SILENCE_S} s") from None
            continue
        heard = loop.time()
        if PROGRESS_HEADER not in (msg.headers or {}):
            return msg


async def stream_tier(nc, tier: str, request, timeout_s: float, after_silence: bool = False):
    """The chunks of one streamed answer from a tier over NATS, ending with finish_reason set.

    `timeout_s` bounds the wait for each chunk. The replica streaming it says every HEARTBEAT_S that
    it is still working (before its first chunk, and between chunks), so a replica that hangs or dies
    is noticed after SILENCE_S (ReplicaSilent), as for `ask_tier`, whose `after_silence` this takes too.
    Raises NoRespondersError before the first chunk when no replica is up, TimeoutError, ReplicaSilent
    or TierError.
    """
    if after_silence and (replica := await _alive_replica(nc, tier, timeout_s)):
        started = False
        try:
            async for chunk in _stream_one(nc, tier, subject(tier, "stream", replica), request, timeout_s):
                started = True
                yield chunk
            return
        except (nats.errors.NoRespondersError, ReplicaSilent):
            if started:
                raise
            # it left, or hung, since (before its first chunk): the queue group
    async for chunk in _stream_one(nc, tier, subject(tier, "stream"), request, timeout_s):
        yield chunk


async def _stream_one(nc, tier: str, to: str, request, timeout_s: float):
    """stream_tier's request to the subject `to`."""
    loop = asyncio.get_running_loop()
    ended = False  # the tier said its last word (the final chunk, an error, or no responders)
    async with _replies(nc).box() as (inbox, replies):
        try:
            await nc.publish(to, request.SerializeToString(), reply=inbox,
                             headers={TIMEOUT_HEADER: f"{timeout_s:.3f}", HEARTBEAT_HEADER: f"{HEARTBEAT_S}",
                                      STREAM_ID_HEADER: inbox})
            waiting = loop.time()  # since when the next chunk is awaited (the replica's last word, too)
            while True:
                msg = await _next_word(nc, tier, replies, waiting, waiting + timeout_s)
                ended = True  # unless this is a chunk before the last
                chunk = _answer(tier, msg)
                ended = bool(chunk.choices and chunk.choices[0].finish_reason)
                yield chunk
                if ended:
                    return
                waiting = loop.time()  # the caller held it: that time is neither silence nor waiting
        finally:
            if not ended:  # closed early (client gone, timeout): the replica decoding it stops at its next token
                await _publish_cancel(nc, tier, inbox)


async def _publish_cancel(nc, tier: str, inbox: str) -> None:
    try:
        await nc.publish(subject(tier, "cancel"), inbox.encode())
    except Exception:  # noqa: BLE001 - the link is gone: the tier's own deadline ends the stream instead
        pass


def reconnect_delay(attempt: int, rand: float | None = None) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0: the first since the link dropped or last worked).

    RECONNECT_BASE_S doubling per failed attempt up to RECONNECT_MAX_S, less a random
    share of up to RECONNECT_JITTER; `rand` in [0, 1) fixes the draw. A board that lost
    its uplink for hours then tries twice a minute, not every second.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    step = RECONNECT_MAX_S if attempt > 30 else min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2 ** attempt)
    return step * (1 - RECONNECT_JITTER * (random.random() if rand is None else rand))


def _next_server(servers: list, _server_info: dict) -> tuple:
    """nats-py's reconnect hook (`reconnect_to_server_handler`): the least-failed server, after our backoff.

    nats-py counts failed attempts per server (`reconnects`, back to 0 once connected),
    sleeps the returned delay, then tries; its own `reconnect_time_wait` is fixed.
    """
    best = min(servers, key=lambda s: s.reconnects)
    return best, reconnect_delay(best.reconnects)


class NatsAuthError(ConnectionError):
    """The NATS server refused the credentials."""


@dataclass
class NatsOptions:
    """How one process connects: the server, its identity (an nkey seed, or a user and password), TLS."""

    url: str
    user: str = ""
    password: str = ""
    connect_timeout_s: float = 2.0
    identity: str = ""  # who connects (shared/security/identities.py), for messages
    seed: str = ""  # this process's nkey seed (`SU...`): its identity, whose permissions the server enforces
    inbox_prefix: str = ""  # its reply subjects (`_INBOX_<identity>`), the only inboxes it may read
    tls_ca: str = ""  # PEM file of the CA that signed the server's certificate: the server is verified

    def connect_kwargs(self) -> dict:
        kw = {"servers": [u.strip() for u in self.url.split(",")], "connect_timeout": self.connect_timeout_s,
              "max_reconnect_attempts": -1, "allow_reconnect": True,
              "reconnect_time_wait": RECONNECT_BASE_S,  # nats-py's wait within the first connect() only
              "reconnect_to_server_handler": _next_server,  # after a drop: exponential backoff with jitter
              "drain_timeout": DRAIN_TIMEOUT_S}  # within the supervisor's STOP_TIMEOUT_S, with a server's grace
        if self.seed:
            kw["nkeys_seed_str"] = self.seed
        elif self.user:
            kw.update(user=self.user, password=self.password)
        if self.inbox_prefix:
            kw["inbox_prefix"] = self.inbox_prefix
        if self.tls_ca:
            from tierline_shared.security.tls import client_context

            kw["tls"] = client_context(self.tls_ca)
        return kw

    @classmethod
    def from_manifest(cls, manifest, identity: str) -> "NatsOptions":
        """The manifest's `nats:` section as `identity` connects with it (every process names its own:
        shared/security/identities.py). With `nats.credentials`, the identity's seed file is read there."""
        n = manifest.nats
        if n.tls_ca and not manifest.resolve(n.tls_ca).is_file():  # ValueError, which every process names; not a
            raise ValueError(f"{manifest.path}: nats.tls_ca: file not found: {manifest.resolve(n.tls_ca)}")  # trace
        opts = cls(url=n.url, user=n.user, password=n.password, connect_timeout_s=n.connect_timeout_ms / 1000,
                   tls_ca=str(manifest.resolve(n.tls_ca)) if n.tls_ca else "")
        if n.credentials:
            from tierline_shared.security.identities import IdentityStore, inbox_prefix, read_seed

            opts.seed = read_seed(IdentityStore(manifest.resolve(n.credentials)).seed_path(identity))
            opts.identity, opts.inbox_prefix = identity, inbox_prefix(identity)
        return opts


class _ErrorLog:
    """nats-py's error callback for one connection: while connecting, the errors are kept (a refused login is
    told apart from an unreachable server); once connected, each is logged, the same text at most once per
    ERROR_LOG_S. The server reports a refused publish or subscription (a permissions violation) apart from the
    call it refused, which then only times out: this is where it is said."""

    def __init__(self, name: str):
        self.name, self.connecting, self.errors = name, True, []
        self.refused = asyncio.Event()
        self._logged: dict[str, float] = {}  # text -> when it was last logged (monotonic)

    async def on_error(self, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if self.connecting:
            self.errors = [*self.errors[-9:], text]
            if "authorization" in text.lower() or "authentication" in text.lower():
                self.refused.set()
            return
        now = time.monotonic()
        # a slow consumer's text names the message's subject, on the shared reply subscription another each time
        same = type(exc).__name__ if isinstance(exc, nats.errors.SlowConsumerError) else text
        if now - self._logged.get(same, -ERROR_LOG_S) >= ERROR_LOG_S:
            self._logged = {t: at for t, at in self._logged.items() if now - at < ERROR_LOG_S}
            self._logged[same] = now
            log.warning("NATS (%s): %s", self.name, text)


async def connect(opts: NatsOptions, name: str, timeout_s: float = START_TIMEOUT_S):
    """Connect; it reconnects forever (waits: `reconnect_delay`); a refused login raises NatsAuthError at once.
    The server's errors after that (a permissions violation, a failed reconnect) are logged (_ErrorLog)."""
    on_error = _ErrorLog(name)
    connecting = asyncio.ensure_future(nats.connect(name=name, error_cb=on_error.on_error, **opts.connect_kwargs()))
    waiting = asyncio.ensure_future(on_error.refused.wait())
    done, _ = await asyncio.wait({connecting, waiting}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    errors = on_error.errors
    if connecting in done and connecting.exception() is None:
        on_error.connecting = False
        return connecting.result()
    if connecting not in done:
        connecting.cancel()
    if on_error.refused.is_set() or any("authorization" in e.lower() for e in errors):
        who = f"identity {opts.identity!r}" if opts.identity else f"user {opts.user!r}"
        raise NatsAuthError(f"NATS at {opts.url} refused the credentials for {who}")
    why = connecting.exception() if connecting in done else f"no connection in {timeout_s:.0f} s"
    raise ConnectionError(f"cannot connect to NATS at {opts.url}: {why or errors[-1:]}")


def stop_loop_thread(loop: asyncio.AbstractEventLoop, thread, cleanup, timeout_s: float = 5.0) -> None:
    """Run `cleanup()` (a coroutine function) on a background event loop, then stop the loop and its thread.

    Bounded: a cleanup that hangs or fails does not keep the caller from stopping."""
    if not thread.is_alive():
        return
    try:
        asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - stopping anyway
        pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=timeout_s)
