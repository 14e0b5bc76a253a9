"""A bounded on-disk outbox: telemetry survives NATS outages and agent restarts.

Every telemetry event is written here first (SQLite, the standard library's, one
file) and deleted only once JetStream has acknowledged it, so an event is lost
only when the outbox is full: then the oldest are dropped and counted, the way
Greengrass's spooler and Azure IoT Edge's store-and-forward bound theirs. The
sequence number is the event's id; AUTOINCREMENT never reuses one, so a resend
after a lost ack is recognised by JetStream's duplicate window (`Nats-Msg-Id`).
The id also carries a random nonce made with the file (`message_id`): JetStream
deduplicates across the whole stream, so an id another board can guess would let it
have this board's events acknowledged as duplicates and never stored.
The number of events waiting is counted once, when the file is opened, and kept
in memory from then on (one process owns an outbox file), so an append costs one
INSERT, not a table scan.

A file SQLite cannot read (a bad SD card sector, a half-written file) is moved aside
as `outbox.sqlite.corrupt-<unix time>` and a fresh one made: the events in it are
lost, logged and counted (`damaged`), and the board keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("tierline.device")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped', 0);
INSERT OR IGNORE INTO counters VALUES ('damaged', 0);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
NONCE_BYTES = 16  # random bytes of the outbox's message-id nonce (128 bits: not guessable)


class Outbox:
    """Append, peek the oldest, acknowledge; thread-safe (gRPC threads append, the fleet loop sends)."""

    def __init__(self, path: str | Path, max_events: int):
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path, self.max_events = Path(path), max_events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:  # not a database, malformed: the events in it are lost
            aside = self._move_aside()
            log.error("telemetry outbox %s is damaged (%s): moved aside as %s; its events are lost",
                      self.path, exc, aside.name)
            self._db = self._open()
            with self._db:
                self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'damaged'")
        self._pending = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])  # kept from here on
        self.nonce = self._db.execute("SELECT value FROM meta WHERE name = 'nonce'").fetchone()[0]

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False)  # `with self._db`: one transaction
        try:
            db.execute("PRAGMA journal_mode=WAL")  # appends do not block the sender
            # NORMAL, not the default FULL: in WAL mode a commit then needs no fsync (only checkpoints do).
            # An agent crash loses no event; a power loss or OS crash may lose the last few, never the file.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            with db:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('nonce', ?)", (secrets.token_hex(NONCE_BYTES),))
            db.execute("SELECT COUNT(*) FROM events").fetchone()  # reads the table's pages, not only the header
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        """The damaged file (and its WAL and shared-memory files) renamed, kept for a post-mortem."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        return aside

    def message_id(self, device_id: str, seq: int) -> str:
        """The event's `Nats-Msg-Id`: the same on a resend, unguessable by any other board."""
        return f"{device_id}-{self.nonce}-{seq}"

    def append(self, event: dict) -> int:
        """Store one event (a JSON object); returns its sequence number."""
        body = json.dumps(event, separators=(",", ":"))
        with self._lock:
            with self._db:
                seq = self._db.execute("INSERT INTO events (body) VALUES (?)", (body,)).lastrowid
                over = self._pending + 1 - self.max_events
                if over > 0:  # full: the oldest go first, and are counted
                    self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq "
                                     "LIMIT ?)", (over,))
                    self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (over,))
            self._pending += 1 - max(over, 0)  # only once the transaction committed
        return int(seq)

    def peek(self, limit: int = 100) -> list[tuple[int, dict]]:
        """The oldest events still to send, (seq, event), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, body FROM events ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [(seq, json.loads(body)) for seq, body in rows]

    def ack(self, seq: int) -> None:
        """The event was stored by JetStream: forget it."""
        self.ack_all([seq])

    def ack_all(self, seqs: list[int]) -> None:
        """Events stored by JetStream: forgotten in one transaction (one acknowledged twice counts once)."""
        if not seqs:
            return
        with self._lock:
            with self._db:
                deleted = self._db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in seqs]).rowcount
            self._pending -= deleted

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    @property
    def dropped(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0])

    @property
    def damaged(self) -> int:
        """Outbox files found damaged and moved aside (their events lost), since this file was made."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'damaged'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
