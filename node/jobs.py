"""Durable job store: one SQLite row per ingested unit (WAL mode, safe across kill -9 and across processes).

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` (after ``max_attempts``), or ``unrouted`` (no route
matched; the input stays in the spool). A done job whose DICOM outputs reached every destination of its route
becomes ``sent`` (egress, see ``node/egress/sender.py``). A unit path creates at most one job: creating it again returns the
existing job, so a retried ingest never duplicates work.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "sent", "failed", "unrouted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    unit_path TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    route TEXT,
    pipeline TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    send_to TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    result_dir TEXT,
    attributes TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


@dataclass
class Job:
    id: str
    unit_path: str
    kind: str
    source: str
    route: str | None
    pipeline: str | None
    params: dict[str, Any]
    send_to: list[str]
    state: str
    attempts: int
    error: str | None
    log: str
    result_dir: str | None
    attributes: dict[str, Any]
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    seq: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("id", "unit_path", "kind", "source", "route", "pipeline", "params",
                                            "send_to", "state", "attempts", "error", "result_dir", "attributes",
                                            "created", "updated", "started", "finished")}
        d["log"] = self.log
        return d


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], unit_path=row["unit_path"], kind=row["kind"], source=row["source"], route=row["route"],
        pipeline=row["pipeline"], params=json.loads(row["params"] or "{}"), send_to=json.loads(row["send_to"] or "[]"),
        state=row["state"], attempts=row["attempts"], error=row["error"], log=row["log"] or "",
        result_dir=row["result_dir"], attributes=json.loads(row["attributes"] or "{}"), created=row["created"],
        updated=row["updated"], started=row["started"], finished=row["finished"], seq=row["seq"],
    )


class JobStore:
    """Thread-safe access to the job database (one connection, serialised by a lock; WAL for other processes)."""

    def __init__(self, path: str | Path, max_attempts: int = 3) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- helpers -------------------------------------------------------------------------------------------
    def _tx(self) -> _Tx:
        return _Tx(self)

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return _row_to_job(row) if row else None

    # ---- API -----------------------------------------------------------------------------------------------
    def create(self, unit_path: str | Path, kind: str, source: str = "", route: str | None = None,
               pipeline: str | None = None, params: dict[str, Any] | None = None,
               send_to: list[str] | None = None, attributes: dict[str, Any] | None = None,
               state: str = "queued", error: str | None = None, claim: bool = False) -> tuple[Job, bool]:
        """Insert the job of ``unit_path`` (or return the one that exists): ``(job, created)``.

        ``claim=True`` creates it already ``running`` with one attempt (the caller runs it now).
        """
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        unit_path = str(unit_path)
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE unit_path = ?", (unit_path,)).fetchone()
            if row:
                return _row_to_job(row), False
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            job_id = f"j-{datetime.now(timezone.utc):%Y%m%d}-{seq:06d}"
            if claim:
                state = "running"
            db.execute(
                "INSERT INTO jobs (seq, id, unit_path, kind, source, route, pipeline, params, send_to, state, "
                "attempts, error, attributes, created, updated, started) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (seq, job_id, unit_path, kind, source, route, pipeline, json.dumps(params or {}, default=str),
                 json.dumps(send_to or []), state, 1 if claim else 0, error,
                 json.dumps(attributes or {}, default=str), now, now, now if claim else None))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row), True

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def get_by_unit(self, unit_path: str | Path) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE unit_path = ?", (str(unit_path),))

    def claim(self) -> Job | None:
        """Atomically take the oldest queued job: it becomes ``running`` and its attempts go up by one."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1, started=?, updated=?, finished=NULL "
                       "WHERE id = ? AND state = 'queued'", (now, now, row["id"]))
            out = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _row_to_job(out)

    def finish(self, job_id: str, result_dir: str | Path | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='done', error=NULL, result_dir=?, finished=?, updated=? WHERE id=?",
                       (str(result_dir) if result_dir else None, now, now, job_id))

    def mark_sent(self, job_id: str) -> bool:
        """A done job whose outputs reached all its destinations becomes ``sent``; False if it was not done."""
        now = time.time()
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET state='sent', updated=? WHERE id=? AND state='done'",
                           (now, job_id)).rowcount
        return bool(n)

    def fail(self, job_id: str, error: str, max_attempts: int | None = None) -> str:
        """Record a failed attempt: back to ``queued`` while attempts remain, else ``failed``. Returns the state."""
        limit = max_attempts or self.max_attempts
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            state = "queued" if row["attempts"] < limit else "failed"
            db.execute("UPDATE jobs SET state=?, error=?, updated=?, finished=? WHERE id=?",
                       (state, error, now, now if state == "failed" else None, job_id))
        return state

    def append_log(self, job_id: str, line: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} {ln}\n" for ln in line.rstrip("\n").split("\n"))
        with self._tx() as db:
            db.execute("UPDATE jobs SET log = log || ?, updated=? WHERE id = ?", (text, time.time(), job_id))

    def list(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        sql = "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY seq"
        args: tuple[Any, ...] = (state,) if state else ()
        if limit:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY seq"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_row_to_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def unit_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT unit_path FROM jobs").fetchall()}

    def recover(self, max_attempts: int | None = None) -> list[str]:
        """At start-up: jobs left ``running`` by a stopped node go back to ``queued``.

        A job that was running when the node died ``max_attempts`` times becomes ``failed`` (it may be what
        kills the node), with a reason that says so.
        """
        limit = max_attempts or self.max_attempts
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            requeued = []
            for r in rows:
                if r["attempts"] >= limit:
                    db.execute("UPDATE jobs SET state='failed', error=?, updated=?, finished=? WHERE id=?",
                               (f"the node stopped during this job {r['attempts']} times (crash or kill); "
                                "not retried again - check the job log and the node's memory", now, now, r["id"]))
                else:
                    db.execute("UPDATE jobs SET state='queued', updated=? WHERE id=?", (now, r["id"]))
                    requeued.append(r["id"])
        return requeued

    def requeue(self, job_id: str) -> None:
        """Put a failed (or done) job back in the queue with a fresh attempt count (operator retry)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', attempts=0, error=NULL, updated=? WHERE id=?",
                       (time.time(), job_id))


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the store's lock (rollback on error)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store._db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
