"""A bounded on-disk outbox: telemetry survives NATS outages and agent restarts.

Every telemetry event is written here first (SQLite, the standard library's, one
file) and deleted only once JetStream has acknowledged it, so an event is lost
only when the outbox is full: then the oldest are removed, the way Greengrass's
spooler and Azure IoT Edge's store-and-forward bound theirs, and counted as
`dropped` once they are known to be lost. An event the drain is sending (`peek`
handed it out, its ack not back yet) may be removed by the bound meanwhile; it is
counted only if its ack does not come (`ack_all` settles the batch): JetStream
stored it otherwise, and it was delivered, not dropped. (An agent that dies with a
batch in flight does not count what the bound removed from it: its fate is
unknown.) The sequence number is the event's id; AUTOINCREMENT never reuses one.
Its message id (`message_id`: device, a random nonce made with the file, sequence)
goes out as `Nats-Msg-Id`, so a resend after a lost ack within JetStream's duplicate
window is not stored again, and in the event's body (`msg_id`), so a reader drops a
resend that came after the window (fleet.py: `read_telemetry`): an outbox keeps its
events for as long as the board is offline, longer than any window. The nonce:
JetStream deduplicates across the whole stream, so an id another board can guess
would let it have this board's events acknowledged as duplicates and never stored.
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
        # the batch `peek` handed to the drain last, until `ack_all` settles it, and those of it the bound removed
        # meanwhile (counted as dropped only if their ack does not come)
        self._flight: set[int] = set()
        self._evicted: set[int] = set()
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
        """Store one event (a JSON object); returns its sequence number. Full: the oldest go. Those not in flight
        are counted as dropped now; those the drain is sending are counted when their batch is settled without
        their ack (`ack_all`)."""
        body = json.dumps(event, separators=(",", ":"))
        with self._lock:
            with self._db:
                seq = self._db.execute("INSERT INTO events (body) VALUES (?)", (body,)).lastrowid
                over = self._pending + 1 - self.max_events
                gone: list[int] = []
                if over > 0:  # full: the oldest go first
                    gone = [r[0] for r in self._db.execute("SELECT seq FROM events ORDER BY seq LIMIT ?", (over,))]
                    self._db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in gone])
                    lost = sum(1 for s in gone if s not in self._flight)
                    if lost:
                        self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (lost,))
            # only once the transaction committed
            self._pending += 1 - len(gone)
            self._evicted.update(s for s in gone if s in self._flight)
        return int(seq)

    def peek(self, limit: int = 100) -> list[tuple[int, dict]]:
        """The oldest events still to send, (seq, event), oldest first: the drain's next batch (in flight until
        `ack_all` settles it; a batch never settled counts, at the next peek, what the bound removed of it)."""
        with self._lock:
            if self._flight:
                self._settle(set())
            rows = self._db.execute("SELECT seq, body FROM events ORDER BY seq LIMIT ?", (limit,)).fetchall()
            self._flight = {seq for seq, _ in rows}
        return [(seq, json.loads(body)) for seq, body in rows]

    def ack(self, seq: int) -> None:
        """The event was stored by JetStream: forget it."""
        self.ack_all([seq])

    def ack_all(self, seqs: list[int]) -> None:
        """The events of the batch in flight that JetStream stored: forgotten in one transaction (one
        acknowledged twice counts once). This settles the batch: those of it the bound removed meanwhile and
        not acknowledged here are lost, and counted as dropped."""
        with self._lock:
            if seqs:
                with self._db:
                    deleted = self._db.executemany("DELETE FROM events WHERE seq = ?",
                                                   [(s,) for s in seqs]).rowcount
                self._pending -= deleted
            self._settle(set(seqs))

    def _settle(self, stored: set[int]) -> None:
        """End the flight (the lock held): what the bound removed from it and JetStream did not store is dropped."""
        lost = len(self._evicted - stored)
        self._flight, self._evicted = set(), set()
        if lost:
            with self._db:
                self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (lost,))

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
