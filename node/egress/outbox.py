"""The durable egress outbox: an SQLite table of (instance, destination) rows that the sender drains.

One row per SOP instance and destination, unique on (sop_instance_uid, destination). Files are referenced by path
(the job's results folder), never copied; the row also holds the instance's SOP Class and transfer syntax from
its :class:`~node.egress.instances.InstanceRecord`, so sending needs no second look at the file to plan. States:
``pending`` (waiting for its ``next_attempt_at``), ``sending`` (handed to a destination), ``sent``, ``failed``
(cannot ever succeed: the file is gone or unreadable, the destination is not configured or refused it for good,
or ``max_attempts`` ran out). Rows left ``sending`` by a crash go back to ``pending`` when the outbox is opened
again, so nothing is lost; destinations key instances by SOP Instance UID, so the rare resend is harmless.

SQLite in WAL mode with ``synchronous=FULL``; one connection behind a lock (the sender thread, the worker's
enqueue and status readers share it). ``destination_state`` keeps per destination the last error, the last
success and the last check (:meth:`node.egress.destinations.Destination.verify`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import audit, metrics
from node.egress.instances import InstanceRecord

log = logging.getLogger(__name__)

PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS destination_state (
    name TEXT PRIMARY KEY,
    last_error TEXT,
    last_error_at REAL,
    last_success_at REAL,
    echo_ok INTEGER,
    echo_at REAL
);
"""


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: str
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


class Outbox:
    """The SQLite outbox (thread-safe: one connection behind a lock)."""

    def __init__(self, db_path: str | Path, clock: Callable[[], float] = time.time, *, recover: bool = True) -> None:
        """``recover=False`` for readers beside a running sender (``recon-node status``): rows being sent stay so."""
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if not recover:
            return
        recovered = self._db.execute(
            "UPDATE outbox SET state=?, updated_at=? WHERE state=?", (PENDING, self.clock(), SENDING)
        ).rowcount
        if recovered:
            log.info("outbox %s: %d instance(s) interrupted while sending are pending again", self.path, recovered)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- queueing ----------------------------------------------------------------------------------------------
    def enqueue(self, records: Iterable[InstanceRecord], destination: str, job_id: str) -> int:
        """Queue every instance for ``destination``; returns how many rows are new or were re-armed.

        An instance already queued for that destination keeps its row (sent stays sent; pending gets the new
        path; failed goes back to pending with zero attempts).
        """
        now = self.clock()
        rows = [
            (
                job_id,
                str(Path(r.path).resolve()),
                r.sop_instance_uid,
                r.sop_class_uid,
                r.transfer_syntax_uid,
                destination,
                now,
                now,
                now,
            )
            for r in records
        ]
        changed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = self._db.execute(
                        """INSERT INTO outbox (job_id, path, sop_instance_uid, sop_class_uid, transfer_syntax_uid,
                                               destination, next_attempt_at, created_at, updated_at)
                           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                           ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET
                               path = excluded.path, job_id = excluded.job_id,
                               sop_class_uid = excluded.sop_class_uid,
                               transfer_syntax_uid = excluded.transfer_syntax_uid,
                               attempts = CASE WHEN state = 'failed' THEN 0 ELSE attempts END,
                               next_attempt_at = CASE WHEN state = 'failed' THEN excluded.next_attempt_at
                                                      ELSE next_attempt_at END,
                               state = CASE WHEN state = 'failed' THEN 'pending' ELSE state END,
                               updated_at = excluded.updated_at
                           WHERE state IN ('pending', 'failed')""",
                        row,
                    )
                    changed += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.info("job %s: %d instance(s) queued for %s", job_id, changed, destination)
        return changed

    def due(self, now: float | None = None, limit: int | None = None) -> list[OutboxItem]:
        """Pending rows whose next attempt is due, oldest first."""
        now = self.clock() if now is None else now
        sql = "SELECT * FROM outbox WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at, id"
        args: tuple[Any, ...] = (PENDING, now)
        if limit is not None:
            sql += " LIMIT ?"
            args += (int(limit),)
        with self._lock:
            return [_item(r) for r in self._db.execute(sql, args).fetchall()]

    def next_due_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE state=?", (PENDING,)).fetchone()
        return None if row[0] is None else float(row[0])

    def items(self, destination: str | None = None, job_id: str | None = None) -> list[OutboxItem]:
        sql = "SELECT * FROM outbox WHERE 1=1"
        args: list[str] = []
        if destination is not None:
            sql, args = sql + " AND destination=?", args + [destination]
        if job_id is not None:
            sql, args = sql + " AND job_id=?", args + [job_id]
        with self._lock:
            return [_item(r) for r in self._db.execute(sql + " ORDER BY id", args).fetchall()]

    # ---- state changes -----------------------------------------------------------------------------------------
    def mark_sending(self, item_ids: Iterable[int]) -> None:
        self._set_state(item_ids, SENDING)

    def mark_pending(self, item_ids: Iterable[int]) -> None:
        """Back to pending as they were (no attempt counted): rows a pass handed out but did not get to."""
        self._set_state(item_ids, PENDING)

    def mark_sent(self, item_ids: int | Iterable[int]) -> None:
        ids = [item_ids] if isinstance(item_ids, int) else list(item_ids)
        now = self.clock()
        with self._lock:
            self._db.executemany(
                "UPDATE outbox SET state=?, sent_at=?, updated_at=?, last_error=NULL WHERE id=?",
                [(SENT, now, now, i) for i in ids],
            )

    def mark_retry(self, item_id: int, error: str, backoff: float) -> None:
        """Back to pending, one more attempt counted, next try ``backoff`` seconds from now."""
        now = self.clock()
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, next_attempt_at=?, last_error=?, updated_at=? "
                "WHERE id=?",
                (PENDING, now + backoff, error, now, item_id),
            )

    def mark_failed(self, item_id: int, error: str) -> None:
        now = self.clock()
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, last_error=?, updated_at=? WHERE id=?",
                (FAILED, error, now, item_id),
            )
            row = self._db.execute(
                "SELECT job_id, sop_instance_uid, destination FROM outbox WHERE id=?", (item_id,)
            ).fetchone()
        if row is not None:  # every way an instance ends undelivered goes through here
            metrics.INSTANCES_FAILED.labels(row["destination"]).inc()
            audit.event(
                "egress.failed",
                "failure",
                destination=row["destination"],
                job_id=row["job_id"],
                sop_uid=str(row["sop_instance_uid"])[:64],
                reason=error,
            )

    def defer(self, destination: str, until: float) -> None:
        """Hold every pending row of ``destination`` until ``until`` (one retry per backoff, not one per row)."""
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET next_attempt_at=? WHERE destination=? AND state=? AND next_attempt_at<?",
                (until, destination, PENDING, until),
            )

    def _set_state(self, item_ids: Iterable[int], state: str) -> None:
        now = self.clock()
        with self._lock:
            self._db.executemany(
                "UPDATE outbox SET state=?, updated_at=? WHERE id=?", [(state, now, i) for i in item_ids]
            )

    # ---- per-destination state ---------------------------------------------------------------------------------
    def note_destination(
        self, name: str, *, success: bool | None = None, error: str | None = None, echo_ok: bool | None = None
    ) -> None:
        now = self.clock()
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (name,))
            if success:
                self._db.execute("UPDATE destination_state SET last_success_at=? WHERE name=?", (now, name))
            if error is not None:
                self._db.execute(
                    "UPDATE destination_state SET last_error=?, last_error_at=? WHERE name=?", (error, now, name)
                )
            if echo_ok is not None:
                self._db.execute(
                    "UPDATE destination_state SET echo_ok=?, echo_at=? WHERE name=?", (int(echo_ok), now, name)
                )

    def counts(self) -> dict[str, dict[str, int]]:
        """{destination: {state: count}}."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for r in self._db.execute("SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state"):
                out.setdefault(r[0], {})[r[1]] = int(r[2])
        return out

    def job_counts(self, job_ids: Iterable[str] | None = None) -> dict[str, dict[str, dict[str, int]]]:
        """{job id: {destination: {state: count}}} (all jobs, or those given)."""
        sql = "SELECT job_id, destination, state, COUNT(*) FROM outbox"
        args: list[Any] = []
        if job_ids is not None:
            ids = list(job_ids)
            if not ids:
                return {}
            sql += f" WHERE job_id IN ({','.join('?' * len(ids))})"
            args = ids
        out: dict[str, dict[str, dict[str, int]]] = {}
        with self._lock:
            for r in self._db.execute(sql + " GROUP BY job_id, destination, state", args):
                out.setdefault(r[0], {}).setdefault(r[1], {})[r[2]] = int(r[3])
        return out

    def destination_rows(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {r["name"]: dict(r) for r in self._db.execute("SELECT * FROM destination_state")}


def _item(r: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=int(r["id"]),
        job_id=r["job_id"],
        path=r["path"],
        sop_instance_uid=r["sop_instance_uid"],
        sop_class_uid=r["sop_class_uid"],
        transfer_syntax_uid=r["transfer_syntax_uid"],
        destination=r["destination"],
        state=r["state"],
        attempts=int(r["attempts"]),
        next_attempt_at=float(r["next_attempt_at"]),
        last_error=r["last_error"],
    )
