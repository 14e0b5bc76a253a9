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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tierline_shared.config.manifest import PlanConfig
from tierline_shared.transport.messaging import TierError
from tierline_shared.wire import PRIORITY_VALUES

KEY_PREFIX = "tl"
BUSY_TIMEOUT_S = 5.0  # waiting for another process's write transaction, at most

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
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


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

    def close(self) -> None:
        self._db.close()

    def _tx(self):
        return _Transaction(self._db)

    def create(self, plan: str, name: str = "") -> tuple[str, str]:
        """A new key for a plan: (key id, the key). The key is shown once and never stored."""
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
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
        if key is None:
            raise AccessDenied("UNAUTHENTICATED", "missing API key: send the header 'authorization: Bearer <key>'")
        if not key:
            raise AccessDenied("UNAUTHENTICATED", "malformed authorization header: expected 'Bearer <key>'")
        self.lookups += 1
        row = self._db.execute("SELECT id, plan, revoked_at FROM keys WHERE hash = ?", (hash_key(key),)).fetchone()
        if row is None:
            raise AccessDenied("UNAUTHENTICATED", "unknown API key")
        key_id, plan_name, revoked_at = row
        if revoked_at is not None:
            when = dt.datetime.fromtimestamp(revoked_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise AccessDenied("PERMISSION_DENIED", f"API key {key_id} was revoked at {when}")
        return key_id, plan_name

    def admit(self, key: str | None, plans: dict[str, PlanConfig], reserve_tokens: int,
              now: float | None = None) -> Admission:
        """Check the key and take one call and `reserve_tokens` from today's quota, atomically."""
        day = utc_day(now)
        with self._tx():
            key_id, plan_name = self.lookup(key)
            plan = plans.get(plan_name)
            if plan is None:
                raise AccessDenied("PERMISSION_DENIED", f"API key {key_id} has plan {plan_name!r}, "
                                                        f"which this platform does not offer")
            calls, tokens = self._db.execute("SELECT calls, tokens FROM usage WHERE key_id = ? AND day = ?",
                                             (key_id, day)).fetchone() or (0, 0)
            if calls + 1 > plan.calls_per_day:
                raise AccessDenied("RESOURCE_EXHAUSTED", f"daily quota of {plan.calls_per_day} calls used "
                                                         f"(plan {plan_name}); it resets at {next_reset(day)}",
                                   seconds_to_reset(day, now))
            if tokens + reserve_tokens > plan.tokens_per_day:
                raise AccessDenied("RESOURCE_EXHAUSTED",
                                   f"daily quota of {plan.tokens_per_day} tokens reached ({tokens} used, this "
                                   f"request may need {reserve_tokens}; plan {plan_name}); it resets at "
                                   f"{next_reset(day)}", seconds_to_reset(day, now))
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


class Gate:
    """The router's door: admits or refuses each request, settles its usage afterwards.

    The store's (blocking) SQLite calls run on one thread of their own, so the
    router's event loop never waits on the file, and calls from this process are
    serialised without a lock.
    """

    def __init__(self, store: KeyStore | None, plans: dict[str, PlanConfig]):
        self.store, self.plans = store, plans
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="keystore") if store else None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    async def admit(self, key: str | None, prompt: str, max_tokens: int) -> Admission | None:
        """None when auth is off; raises AccessDenied with the status to answer."""
        if self.store is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.store.admit, key, self.plans, reserve_for(prompt, max_tokens))

    async def check(self, key: str | None) -> None:
        """A valid, unrevoked key, without using quota (status and info calls, refused requests)."""
        if self.store is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.lookup, key)

    async def settle(self, admission: Admission | None, used_tokens: int | None) -> None:
        if admission is None or self.store is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.settle, admission, used_tokens)

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
        if self.store:
            self.store.close()
