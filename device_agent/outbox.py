"""A bounded on-disk outbox: telemetry survives NATS outages and agent restarts.

Every telemetry event is written here first (SQLite, the standard library's, one
file) and deleted only once JetStream has acknowledged it, so an event is lost
only when the outbox is full: then the oldest are dropped and counted, the way
Greengrass's spooler and Azure IoT Edge's store-and-forward bound theirs. The
sequence number is the event's id; AUTOINCREMENT never reuses one, so a resend
after a lost ack is recognised by JetStream's duplicate window (`Nats-Msg-Id`).
The number of events waiting is counted once, when the file is opened, and kept
in memory from then on (one process owns an outbox file), so an append costs one
INSERT, not a table scan.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped', 0);
"""


class Outbox:
    """Append, peek the oldest, acknowledge; thread-safe (gRPC threads append, the fleet loop sends)."""

    def __init__(self, path: str | Path, max_events: int):
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path, self.max_events = Path(path), max_events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)  # `with self._db`: one transaction
        self._db.execute("PRAGMA journal_mode=WAL")  # appends do not block the sender
        # NORMAL, not the default FULL: in WAL mode a commit then needs no fsync (only checkpoints do).
        # An agent crash loses no event; a power loss or OS crash may lose the last few, never the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._pending = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])  # kept from here on

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
        with self._lock:
            with self._db:
                deleted = self._db.execute("DELETE FROM events WHERE seq = ?", (seq,)).rowcount
            self._pending -= deleted  # an event acknowledged twice counts once

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    @property
    def dropped(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
