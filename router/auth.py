"""API keys, plans and daily quotas: who may call the router, and how much.

Keys live in a SQLite file (the manifest's `auth.key_store`), stored as the
sha256 of the key, never the key itself: a key is 32 random bytes, so a fast
hash is enough (slow hashes protect guessable passwords, not random tokens).
The key's public id (`tl_<id>_...`) names it in `tierline keys list|revoke`.

Quotas are per key and UTC day, from the key's plan in the manifest. Every
request is admitted in one `BEGIN IMMEDIATE` transaction that checks and
reserves one call and the request's worst-case tokens (prompt characters + 1 +
max_tokens: an upper bound, as the tokenizer never makes more tokens than characters), so
concurrent requests, other router processes and `tierline keys` never see a
half-counted quota. When the answer comes, the reservation is settled to the
real token count; a request that got no answer gives its reservation back.
Usage is in the file, so it survives a router restart. A request looks its key
up once: the admission transaction is the key check too (a request refused
before it, e.g. for a bad field, checks the key alone, so 401/403 still come first).

A store that cannot answer now (the file write-locked by another process for longer
than BUSY_TIMEOUT_S, NATS KV unreachable) refuses requests as UNAVAILABLE (the requests
queued behind the one that waited for it with it, at once: `Gate._on_store_thread`), which
clients retry (`Gate`); settling never fails a request that has its answer. A stopping router records the
usage of the requests it has ended before it closes the store (`Gate.close`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nats.errors import Error as NatsError

from tierline_shared.config.manifest import PlanConfig
from tierline_shared.transport.messaging import (
    CAS_ATTEMPTS,
    KEYS_BUCKET,
    USAGE_BUCKET,
    KvConflict,
    TierError,
    kv_change,
    kv_entries,
    kv_get,
)
from tierline_shared.wire import PRIORITY_VALUES

KEY_PREFIX = "tl"
BUSY_TIMEOUT_S = 5.0  # waiting for another process's write transaction, at most
KV_TIMEOUT_S = 5.0  # one JetStream KV call of the shared store, at most
SETTLE_TIMEOUT_S = 2.0  # a stopping router waits this long for its settles and give-backs in flight, at most
# what a store raises when it cannot answer now: the SQLite file locked by another process past BUSY_TIMEOUT_S
# (or unreadable, full), JetStream KV unreachable or slower than KV_TIMEOUT_S (TimeoutError: KvKeyStore._run)
STORE_ERRORS = (sqlite3.OperationalError, NatsError, TimeoutError)

log = logging.getLogger("tierline.router.auth")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,            -- public id, part of the key
    hash TEXT NOT NULL UNIQUE,      -- sha256 of the whole key (hex)
    plan TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,       -- unix seconds
    revoked_at REAL                 -- NULL while the key is valid
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL REFERENCES keys(id),
    day TEXT NOT NULL,              -- UTC date, YYYY-MM-DD
    calls INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
"""


class AccessDenied(TierError):
    """A request the router refuses before routing it; `status` is the gRPC status name."""

    def __init__(self, status: str, message: str, retry_after_s: int | None = None):
        super().__init__("router", status, message)
        self.retry_after_s = retry_after_s  # for a used-up quota: seconds until it resets


@dataclass
class KeyRecord:
    id: str
    plan: str
    name: str
    created_at: float
    revoked_at: float | None
    calls_today: int = 0
    tokens_today: int = 0


@dataclass
class Admission:
    """An admitted request: whose it is, which day it counts on, what it reserved."""

    key_id: str
    plan: str
    day: str
    reserved_tokens: int
    priority: int  # proto Priority value the plan allows at most


def hash_key(key: str) -> str:
    # a key is ASCII; a header that is not (an HTTP header decoded with surrogates) simply hashes to no key
    if isinstance(key, HashedKey):
        return str(key)
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


class HashedKey(str):
    """A key known only by its hash, which the store looks it up by: a batch's lines run with the key that
    submitted it (its quota, its revocation) without the router keeping the key itself (router/batch.py).
    Made only by the router from a key it has checked; never from what a client sends."""


def utc_day(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc).date().isoformat()


def next_reset(day: str) -> str:
    """When a day's quota resets: the next UTC midnight, ISO 8601."""
    return f"{dt.date.fromisoformat(day) + dt.timedelta(days=1)}T00:00:00Z"


def seconds_to_reset(day: str, now: float | None = None) -> int:
    midnight = dt.datetime.combine(dt.date.fromisoformat(day) + dt.timedelta(days=1), dt.time(),
                                   tzinfo=dt.timezone.utc)
    return max(1, int(midnight.timestamp() - (time.time() if now is None else now)))


def bearer_token(metadata) -> str | None:
    """The key from `authorization: Bearer <key>` in gRPC metadata (pairs) or HTTP headers (a mapping)."""
    items = metadata.items() if hasattr(metadata, "items") else (metadata or ())
    for name, value in items:
        if name.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class KeyStore:
    """The SQLite file of hashed keys and daily usage; every write is one transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE), so each one is visible as a whole
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        if new:
            os.chmod(self.path, 0o600)  # hashes only, but still nobody else's business
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL, not the default FULL: in WAL mode a commit then needs no fsync (only checkpoints do).
        # A crash of the router (or any process) loses nothing; a power loss or OS crash may lose the
        # last committed transactions (a few calls' usage, a just-made key), never corrupt the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.lookups = 0  # keys looked up by this store (one per admitted or refused request)

    def __str__(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        self._db.close()

    def _tx(self):
        return _Transaction(self._db)

    def create(self, plan: str, name: str = "") -> tuple[str, str]:
        """A new key for a plan: (key id, the key). The key is shown once and never stored."""
        key_id, key = new_key()
        with self._tx():
            self._db.execute("INSERT INTO keys (id, hash, plan, name, created_at) VALUES (?, ?, ?, ?, ?)",
                             (key_id, hash_key(key), plan, name, time.time()))
        return key_id, key

    def revoke(self, key_id: str) -> bool:
        """False when no such key; revoking twice keeps the first time."""
        with self._tx():
            cur = self._db.execute("UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                                   (time.time(), key_id))
        return cur.rowcount == 1

    def list(self, day: str | None = None) -> list[KeyRecord]:
        day = day or utc_day()
        rows = self._db.execute(
            "SELECT k.id, k.plan, k.name, k.created_at, k.revoked_at, COALESCE(u.calls, 0), COALESCE(u.tokens, 0) "
            "FROM keys k LEFT JOIN usage u ON u.key_id = k.id AND u.day = ? ORDER BY k.created_at", (day,))
        return [KeyRecord(*r) for r in rows]

    def lookup(self, key: str | None) -> tuple[str, str]:
        """(key id, plan) of a valid key; AccessDenied for a missing, unknown or revoked one."""
        _presented(key)
        self.lookups += 1
        row = self._db.execute("SELECT id, plan, revoked_at FROM keys WHERE hash = ?", (hash_key(key),)).fetchone()
        if row is None:
            raise AccessDenied("UNAUTHENTICATED", "unknown API key")
        return _valid(*row)

    def admit(self, key: str | None, plans: dict[str, PlanConfig], reserve_tokens: int,
              now: float | None = None) -> Admission:
        """Check the key and take one call and `reserve_tokens` from today's quota, atomically."""
        day = utc_day(now)
        with self._tx():
            key_id, plan_name = self.lookup(key)
            plan = _plan(plans, key_id, plan_name)
            calls, tokens = self._db.execute("SELECT calls, tokens FROM usage WHERE key_id = ? AND day = ?",
                                             (key_id, day)).fetchone() or (0, 0)
            _within(plan, plan_name, calls, tokens, reserve_tokens, day, now)
            self._db.execute("INSERT INTO usage (key_id, day, calls, tokens) VALUES (?, ?, 1, ?) "
                             "ON CONFLICT (key_id, day) DO UPDATE SET calls = calls + 1, tokens = tokens + ?",
                             (key_id, day, reserve_tokens, reserve_tokens))
        return Admission(key_id, plan_name, day, reserve_tokens, PRIORITY_VALUES[plan.priority])

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        """Replace the reservation by the tokens really used; None = no answer: give the call back too."""
        with self._tx():
            if used_tokens is None:
                self._db.execute("UPDATE usage SET calls = calls - 1, tokens = tokens - ? WHERE key_id = ? AND "
                                 "day = ?", (admission.reserved_tokens, admission.key_id, admission.day))
            else:
                self._db.execute("UPDATE usage SET tokens = tokens - ? + ? WHERE key_id = ? AND day = ?",
                                 (admission.reserved_tokens, used_tokens, admission.key_id, admission.day))


class KvKeyStore:
    """The same keys and daily usage in JetStream KV, shared by every router of a deployment (`auth.store: nats`).

    Bucket `tierline_keys`: `id.<key id>` -> the key's record (JSON), `hash.<sha256>` -> its id.
    Bucket `tierline_usage`: `<key id>.<UTC day>` -> {"calls", "tokens"}. Every change of usage is a
    compare-and-set on the entry's revision (create when it is new), retried on a conflict, so routers
    on different hosts admit exactly the quota between them, and usage outlives every router. The store
    runs its own NATS connection on an event loop thread, behind the same blocking methods as `KeyStore`.
    Only the operator's identity creates buckets and keys; a router reads keys and updates usage.
    """

    def __init__(self, opts, create_buckets: bool = False):
        from tierline_shared.transport.messaging import connect

        self._create = create_buckets
        self._closing = threading.Lock()  # a call is handed to the loop, or the store closes: never both at once
        self._closed = False
        self._calls: set[concurrent.futures.Future] = set()  # the calls in flight, which close() stops
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-keystore", daemon=True)
        self._thread.start()
        self._keys = self._usage = None
        self.lookups = 0
        try:
            self._nc = self._run(connect(opts, name="tierline-keys", timeout_s=KV_TIMEOUT_S))
        except BaseException:
            self.close()
            raise

    def __str__(self) -> str:
        return f"JetStream KV {KEYS_BUCKET}/{USAGE_BUCKET}"

    def _run(self, coro):
        """`coro` on the store's loop; a store closed before or during the call raises ConnectionClosedError (one
        of STORE_ERRORS: the caller answers UNAVAILABLE) rather than waiting on a loop that no longer runs."""
        from nats.errors import ConnectionClosedError

        with self._closing:
            if self._closed:
                coro.close()  # never scheduled: close it, or Python warns that it was never awaited
                raise ConnectionClosedError
            call = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._calls.add(call)
        try:
            return call.result(timeout=KV_TIMEOUT_S * CAS_ATTEMPTS)
        except concurrent.futures.CancelledError:  # close() stopped it
            raise ConnectionClosedError from None
        except TimeoutError:
            call.cancel()  # not left running on the loop for nobody
            raise
        finally:
            with self._closing:
                self._calls.discard(call)

    def close(self) -> None:
        """Stop the calls in flight (each raises ConnectionClosedError), close the connection, stop and close the
        loop: nothing is left pending, whether NATS is up or unreachable (a KV call then waits up to
        KV_TIMEOUT_S, and nats-py's own tasks would outlive the loop)."""
        from tierline_shared.transport.messaging import stop_loop_thread

        with self._closing:
            if self._closed:
                return
            self._closed = True
            for call in self._calls:
                call.cancel()  # its task is cancelled on the loop, before _close runs there

        async def _close():
            nc = getattr(self, "_nc", None)
            try:
                if nc is not None and not nc.is_closed:
                    await nc.close()  # with NATS gone it can raise (flushing what was buffered: ConnectionResetError)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            finally:  # what is left: the cancelled calls, and what nats-py's close cancelled, or never reached
                left = asyncio.all_tasks() - {asyncio.current_task()}
                for task in left:
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)

        stop_loop_thread(self._loop, self._thread, _close)
        if not self._thread.is_alive():
            self._loop.close()

    async def _buckets(self) -> bool:
        """Bind the buckets (the operator's store creates them); False when there are none yet (no keys)."""
        from nats.js.errors import BucketNotFoundError

        if self._keys is None:
            js = self._nc.jetstream(timeout=KV_TIMEOUT_S)
            try:
                self._keys, self._usage = await js.key_value(KEYS_BUCKET), await js.key_value(USAGE_BUCKET)
            except BucketNotFoundError:
                if not self._create:
                    return False
                # direct gets: a read names its key in the subject (the NATS permissions allow reads by bucket)
                self._keys = await js.create_key_value(bucket=KEYS_BUCKET, history=1, direct=True)
                self._usage = await js.create_key_value(bucket=USAGE_BUCKET, history=1, direct=True)
        return True

    @staticmethod
    async def _get(bucket, key: str):
        return await kv_get(bucket, key)

    async def _change(self, bucket, key: str, change) -> dict:
        """`change(value or None) -> new value`, applied by compare-and-set until no other writer interferes."""
        try:
            return await kv_change(bucket, key, change)
        except KvConflict:
            raise AccessDenied("UNAVAILABLE", f"usage of {key} changed by others {CAS_ATTEMPTS} times in a row; "
                                              "retry") from None

    def create(self, plan: str, name: str = "") -> tuple[str, str]:
        key_id, key = new_key()

        async def work():
            await self._buckets()
            await self._keys.create(f"hash.{hash_key(key)}", key_id.encode())
            await self._keys.create(f"id.{key_id}", json.dumps(
                {"id": key_id, "plan": plan, "name": name, "created_at": time.time(), "revoked_at": None}).encode())

        self._run(work())
        return key_id, key

    def revoke(self, key_id: str) -> bool:
        async def work() -> bool:
            if not await self._buckets() or (await self._get(self._keys, f"id.{key_id}"))[0] is None:
                return False
            await self._change(self._keys, f"id.{key_id}",
                               lambda r: {**r, "revoked_at": r["revoked_at"] or time.time()})
            return True

        return self._run(work())

    def list(self, day: str | None = None) -> list[KeyRecord]:
        day = day or utc_day()

        async def work() -> list[KeyRecord]:
            if not await self._buckets():
                return []
            out = []
            for body in (await kv_entries(self._nc.jetstream(timeout=KV_TIMEOUT_S), KEYS_BUCKET, "id.")).values():
                r = json.loads(body)
                used, _ = await self._get(self._usage, f"{r['id']}.{day}")
                used = used or {"calls": 0, "tokens": 0}
                out.append(KeyRecord(r["id"], r["plan"], r["name"], r["created_at"], r["revoked_at"],
                                     used["calls"], used["tokens"]))
            return sorted(out, key=lambda k: k.created_at)

        return self._run(work())

    async def _lookup(self, key: str | None) -> tuple[str, str]:
        _presented(key)
        self.lookups += 1
        key_id = None
        if await self._buckets():
            from nats.js.errors import KeyNotFoundError

            try:
                key_id = (await self._keys.get(f"hash.{hash_key(key)}")).value.decode()
            except KeyNotFoundError:
                pass
        record = (await self._get(self._keys, f"id.{key_id}"))[0] if key_id else None
        if record is None:
            raise AccessDenied("UNAUTHENTICATED", "unknown API key")
        return _valid(record["id"], record["plan"], record["revoked_at"])

    def lookup(self, key: str | None) -> tuple[str, str]:
        return self._run(self._lookup(key))

    def admit(self, key: str | None, plans: dict[str, PlanConfig], reserve_tokens: int,
              now: float | None = None) -> Admission:
        day = utc_day(now)

        async def work() -> Admission:
            key_id, plan_name = await self._lookup(key)
            plan = _plan(plans, key_id, plan_name)

            def take(used):
                used = used or {"calls": 0, "tokens": 0}
                _within(plan, plan_name, used["calls"], used["tokens"], reserve_tokens, day, now)
                return {"calls": used["calls"] + 1, "tokens": used["tokens"] + reserve_tokens}

            await self._change(self._usage, f"{key_id}.{day}", take)
            return Admission(key_id, plan_name, day, reserve_tokens, PRIORITY_VALUES[plan.priority])

        return self._run(work())

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        def give_back(used):
            used = used or {"calls": 0, "tokens": 0}
            if used_tokens is None:
                return {"calls": used["calls"] - 1, "tokens": used["tokens"] - admission.reserved_tokens}
            return {"calls": used["calls"], "tokens": used["tokens"] - admission.reserved_tokens + used_tokens}

        self._run(self._change(self._usage, f"{admission.key_id}.{admission.day}", give_back))


def open_key_store(manifest, identity: str):
    """The manifest's key store (`auth.store`): the SQLite file, or JetStream KV as `identity` (the router
    reads keys and counts usage; the operator also creates buckets and keys)."""
    if manifest.auth.store == "nats":
        from tierline_shared.security.identities import OPERATOR
        from tierline_shared.transport.messaging import NatsOptions

        return KvKeyStore(NatsOptions.from_manifest(manifest, identity), create_buckets=identity == OPERATOR)
    return KeyStore(manifest.key_store_path)


def new_key() -> tuple[str, str]:
    """(key id, key): `tl_<id>_<32 random bytes>`."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def _presented(key: str | None) -> None:
    """A request without a key, or with a malformed header, is refused before any lookup."""
    if key is None:
        raise AccessDenied("UNAUTHENTICATED", "missing API key: send the header 'authorization: Bearer <key>'")
    if not key:
        raise AccessDenied("UNAUTHENTICATED", "malformed authorization header: expected 'Bearer <key>'")


def _valid(key_id: str, plan_name: str, revoked_at: float | None) -> tuple[str, str]:
    if revoked_at is not None:
        when = dt.datetime.fromtimestamp(revoked_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise AccessDenied("PERMISSION_DENIED", f"API key {key_id} was revoked at {when}")
    return key_id, plan_name


def _plan(plans: dict[str, PlanConfig], key_id: str, plan_name: str) -> PlanConfig:
    plan = plans.get(plan_name)
    if plan is None:
        raise AccessDenied("PERMISSION_DENIED", f"API key {key_id} has plan {plan_name!r}, "
                                                f"which this platform does not offer")
    return plan


def _within(plan: PlanConfig, plan_name: str, calls: int, tokens: int, reserve_tokens: int, day: str,
            now: float | None) -> None:
    """One more call and `reserve_tokens` more tokens fit today's quota, or RESOURCE_EXHAUSTED."""
    if calls + 1 > plan.calls_per_day:
        raise AccessDenied("RESOURCE_EXHAUSTED", f"daily quota of {plan.calls_per_day} calls used "
                                                 f"(plan {plan_name}); it resets at {next_reset(day)}",
                           seconds_to_reset(day, now))
    if tokens + reserve_tokens > plan.tokens_per_day:
        raise AccessDenied("RESOURCE_EXHAUSTED",
                           f"daily quota of {plan.tokens_per_day} tokens reached ({tokens} used, this "
                           f"request may need {reserve_tokens}; plan {plan_name}); it resets at "
                           f"{next_reset(day)}", seconds_to_reset(day, now))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: the write lock is taken up front."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def reserve_for(prompt: str, max_tokens: int) -> int:
    """Worst-case tokens of a request: one per prompt character, the start token, every completion token."""
    return len(prompt) + 1 + max_tokens


def cut_short_cost(request, seen: dict, reserved: int) -> int:
    """What a stream cut short before its last chunk cost: its prompt's tokens and each choice's completion tokens
    as its chunks last said (`seen`: choice index -> Usage; a tier that says none of the prompt's: as `reserve_for`
    counts them), never more than its reservation; its whole reservation when no chunk said anything (a tier from
    before chunks carried usage)."""
    if not seen:
        return reserved
    prompt = max(u.prompt_tokens for u in seen.values()) or reserve_for(request.prompt, 0)
    return min(reserved, prompt + sum(u.completion_tokens for u in seen.values()))


class Gate:
    """The router's door: admits or refuses each request, settles its usage afterwards.

    The store's (blocking) calls run on one thread of their own, so the router's
    event loop never waits on the file, and calls from this process are serialised
    without a lock. The one place a store's failure becomes a status (`_call`).
    """

    def __init__(self, store: KeyStore | None, plans: dict[str, PlanConfig]):
        self.store, self.plans = store, plans
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="keystore") if store else None
        self._failed: tuple[float, BaseException] | None = None  # (when, what) the store's last failure
        self.unsettled = 0  # answered or failed requests whose usage the store did not record (`settle`)
        self.on_unsettled: Callable[[], None] | None = None  # told of each (the router's metrics)
        # what close() waits for: settles in flight, admissions whose askers left and their give-backs (`admit`)
        self._settling: set[asyncio.Future] = set()

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def _on_store_thread(self, asked: float, method, *args):
        """`method(*args)`, asked at `asked` (monotonic), unless the store failed (STORE_ERRORS) since: then that
        error, at once. The store has one thread: the calls queued behind one that waited BUSY_TIMEOUT_S for a lock
        held elsewhere fail with it, not BUSY_TIMEOUT_S each; a call asked after the failure tries the store again."""
        if self._failed is not None and asked < self._failed[0]:
            raise copy.copy(self._failed[1])
        try:
            return method(*args)
        except STORE_ERRORS as exc:
            self._failed = (time.monotonic(), exc)
            raise

    async def _run(self, method, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._on_store_thread, time.monotonic(),
                                                                method, *args)

    async def _call(self, method, *args):
        """`method(*args)` of the store, on its thread; a store that cannot answer now is UNAVAILABLE (retryable)."""
        try:
            return await self._run(method, *args)
        except STORE_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("API key store %s: %s failed: %s", self.store, method.__name__, reason)
            raise AccessDenied("UNAVAILABLE", f"the API key store is unavailable ({reason}); retry") from None

    async def admit(self, key: str | None, prompt: str, max_tokens: int) -> Admission | None:
        """None when auth is off; raises AccessDenied with the status to answer."""
        if self.store is None:
            return None
        admitting = asyncio.ensure_future(self._call(self.store.admit, key, self.plans,
                                                     reserve_for(prompt, max_tokens)))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:  # its asker went away (a client that hung up) while the store admitted it:
            # a reservation made meanwhile is given back, not kept (and close() waits for both)
            self._pending(admitting).add_done_callback(self._give_back)
            raise

    def _pending(self, future: asyncio.Future) -> asyncio.Future:
        """`future`, held (a task nobody awaits is not kept alive by the loop) and waited for by close() until done."""
        self._settling.add(future)
        future.add_done_callback(self._settling.discard)
        return future

    def _give_back(self, admitting: asyncio.Future) -> None:
        """Settle, as a request with no answer, the admission its asker did not wait for."""
        if admitting.cancelled() or admitting.exception() is not None or admitting.result() is None:
            return
        self._pending(asyncio.ensure_future(self.settle(admitting.result(), None)))

    async def check(self, key: str | None) -> None:
        """A valid, unrevoked key, without using quota (status and info calls, refused requests)."""
        if self.store is None:
            return
        await self._call(self.store.lookup, key)

    async def identify(self, key: str | None) -> tuple[str, HashedKey | None]:
        """Whose valid key this is: its id ("" when auth is off) and the key as the store knows it (its hash),
        for work done later on the key's account (a batch); AccessDenied as `check`."""
        if self.store is None:
            return "", None
        key_id, _ = await self._call(self.store.lookup, key)
        return key_id, HashedKey(hash_key(key))

    async def settle(self, admission: Admission | None, used_tokens: int | None) -> None:
        """Record a request's real usage; never raises, as the request's answer (or its own error) matters more.

        Usage the store cannot record is logged and counted (`unsettled`), not retried: its reservation stays
        counted (the request's worst case, or the call of a request with no answer), so the key is charged too
        much, never too little, whereas a retry of a KV change that timed out but was applied would give the
        reservation back twice."""
        if admission is None or self.store is None:
            return
        # shielded: a second cancel of its caller (a stop) must not leave the reservation counted, unrecorded
        await asyncio.shield(self._pending(asyncio.ensure_future(self._settle(admission, used_tokens))))

    async def _settle(self, admission: Admission, used_tokens: int | None) -> None:
        try:
            await self._run(self.store.settle, admission, used_tokens)
        except Exception as exc:  # noqa: BLE001 - bookkeeping after the fact must not lose the answer
            self.unsettled += 1
            if self.on_unsettled is not None:
                self.on_unsettled()
            kept = (f"no answer, yet its call and {admission.reserved_tokens} reserved tokens stay counted"
                    if used_tokens is None else
                    f"{used_tokens} tokens used, {admission.reserved_tokens} reserved stay counted")
            log.error("usage of API key %s on %s not recorded in %s (%s): %s", admission.key_id, admission.day,
                      self.store, kept, str(exc) or type(exc).__name__,
                      exc_info=not isinstance(exc, (*STORE_ERRORS, AccessDenied)))  # not the store's: a bug

    async def close(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Wait, at most `timeout_s`, for the settles and give-backs in flight, then stop the store's thread and
        close the store. A stopping router ends its requests just before: their settles, and the give-backs of
        admissions whose askers left, are still on their way to the store, and one that came after the store had
        closed was logged and counted unsettled, the key charged a reservation it never used. What is still pending
        after `timeout_s` (a store locked or unreachable for longer) fails that way, as when the store is down."""
        deadline = time.monotonic() + timeout_s
        while self._settling and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._settling), timeout=left)  # a give-back joins once its admission is made
        if self._pool:
            self._pool.shutdown(wait=True)
        if self.store:
            self.store.close()
