"""On-disk spool for feedback that could not be delivered, in a stdlib sqlite3 file.

Events are stored as serialized ``FeedbackEvent`` protos keyed by idempotency key, in committed
transactions (WAL, synchronous=FULL), so they survive the app's crash. Resending is idempotent:
the service stores each key at most once, so an event that was in fact stored before the outage
comes back DUPLICATE and leaves the spool.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from flywheel.v1 import feedback_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  idempotency_key TEXT PRIMARY KEY,
  payload BLOB NOT NULL,
  spooled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
  idempotency_key TEXT PRIMARY KEY,
  payload BLOB NOT NULL,
  reason TEXT NOT NULL,
  rejected_at REAL NOT NULL
);
"""


class Spool:
    """A durable FIFO of FeedbackEvents (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def put(self, events: list[feedback_pb2.FeedbackEvent]) -> None:
        """Stores events (an event already spooled under the same key is kept as it was)."""
        rows = [(e.idempotency_key, e.SerializeToString(), time.time()) for e in events]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def peek(self, limit: int) -> list[feedback_pb2.FeedbackEvent]:
        """The oldest ``limit`` events (they stay until ``remove``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT payload FROM events ORDER BY spooled_at, rowid LIMIT ?", (limit,)
            ).fetchall()
        return [feedback_pb2.FeedbackEvent.FromString(row[0]) for row in rows]

    def remove(self, keys: list[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM events WHERE idempotency_key = ?", [(k,) for k in keys])
            self._db.execute("COMMIT")

    def reject(self, event: feedback_pb2.FeedbackEvent, reason: str) -> None:
        """Moves an event the service refuses for good (invalid, key conflict) out of the queue."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?)",
                (event.idempotency_key, event.SerializeToString(), reason, time.time()),
            )
            self._db.execute("DELETE FROM events WHERE idempotency_key = ?", (event.idempotency_key,))
            self._db.execute("COMMIT")

    def rejected(self) -> list[tuple[str, str]]:
        """(idempotency key, reason) of events the service refused."""
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute("SELECT idempotency_key, reason FROM rejected")]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
