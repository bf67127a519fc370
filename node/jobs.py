"""Durable job store: one SQLite row per ingested unit (WAL mode, safe across kill -9 and across processes).

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` (after ``max_attempts``), or ``unrouted`` (no route
matched; the input stays in the spool). A done job whose DICOM outputs reached every destination of its route
becomes ``sent`` (egress, see ``node/egress/sender.py``). A unit path creates at most one job: creating it again
returns the existing job, so a retried ingest never duplicates work.

Two limits stop retries, counted apart: the job's own errors (``attempts - node_deaths`` against
``node.max_attempts``; a :class:`permanent <node.worker.PermanentJobError>` error stops at once) and the times the
node died while the job ran (``node_deaths`` against ``node.max_node_deaths``, larger by default: a kill or a power
cut is not the job's fault, but a job that really takes the node down, e.g. by running out of memory, must still
stop being retried). The error of a failed job names the limit that stopped it. Every state change is written to
the audit log (:mod:`node.audit`).
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node import audit

log = logging.getLogger("recon-node.jobs")

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
    node_deaths INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    result_dir TEXT,
    attributes TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    ran_on TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


# A raw job waits for its study's measured B1 map (``b1_map`` jobs of the same StudyInstanceUID): while one is
# queued or running, up to ``pending_until``; while none has come at all, up to ``arrive_until`` (the route's
# ``wait_for_b1_seconds``). A failed B1 job ends the wait: the MRF job runs on the field.
B1_PENDING_WAIT_S = 300.0
_SAME_STUDY = (
    "{uid} IN (json_extract(b.attributes, '$.StudyInstanceUID'), json_extract(b.attributes, '$.studyInstanceUID'))"
)
_B1_JOB = "SELECT 1 FROM jobs b WHERE b.pipeline = 'b1_map' AND " + _SAME_STUDY.format(
    uid="json_extract(j.attributes, '$.b1_wait.study')"
)
_WAITS_FOR_B1 = (
    "(json_extract(j.attributes, '$.b1_wait.study') IS NOT NULL AND ("
    f"(? < json_extract(j.attributes, '$.b1_wait.pending_until') AND EXISTS ({_B1_JOB} AND b.state IN "
    "('queued', 'running'))) "
    f"OR (? < json_extract(j.attributes, '$.b1_wait.arrive_until') AND NOT EXISTS ({_B1_JOB} AND b.state != "
    "'unrouted'))))"
)


def b1_wait(study_uid: str, wait_for_arrival_s: float, now: float) -> dict[str, Any]:
    """The ``b1_wait`` attribute of a raw job that takes its study's measured B1 map (see :meth:`JobStore.claim`)."""
    return {
        "study": study_uid,
        "pending_until": now + max(wait_for_arrival_s, B1_PENDING_WAIT_S),
        "arrive_until": now + wait_for_arrival_s,
    }


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
    node_deaths: int = 0  # times the node stopped (crash, kill) while this job ran; part of ``attempts``
    ran_on: str | None = None  # the machine and device of the last attempt, e.g. ``host cpu``, ``host cuda:0``

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "id",
                "unit_path",
                "kind",
                "source",
                "route",
                "pipeline",
                "params",
                "send_to",
                "state",
                "attempts",
                "node_deaths",
                "error",
                "result_dir",
                "attributes",
                "created",
                "updated",
                "started",
                "finished",
                "ran_on",
            )
        }
        d["log"] = self.log
        return d


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        unit_path=row["unit_path"],
        kind=row["kind"],
        source=row["source"],
        route=row["route"],
        pipeline=row["pipeline"],
        params=json.loads(row["params"] or "{}"),
        send_to=json.loads(row["send_to"] or "[]"),
        state=row["state"],
        attempts=row["attempts"],
        error=row["error"],
        log=row["log"] or "",
        result_dir=row["result_dir"],
        attributes=json.loads(row["attributes"] or "{}"),
        created=row["created"],
        updated=row["updated"],
        started=row["started"],
        finished=row["finished"],
        seq=row["seq"],
        node_deaths=row["node_deaths"] if "node_deaths" in row.keys() else 0,
        ran_on=row["ran_on"] if "ran_on" in row.keys() else None,
    )


def _audit(job_id: str, state: str, **fields: Any) -> None:
    audit.event(
        "job.state", outcome="failure" if state == "failed" else "success", job_id=job_id, state=state, **fields
    )


class JobStore:
    """Thread-safe access to the job database (one connection, serialised by a lock; WAL for other processes)."""

    def __init__(self, path: str | Path, max_attempts: int = 3, max_node_deaths: int = 5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.max_node_deaths = max_node_deaths
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
            # databases from before node deaths were counted apart / before ``ran_on`` was recorded
            for col, decl in (("node_deaths", "INTEGER NOT NULL DEFAULT 0"), ("ran_on", "TEXT")):
                if col in cols:
                    continue
                try:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")
                except sqlite3.OperationalError as e:  # another process added it in between
                    if "duplicate column" not in str(e):
                        raise

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
    def create(
        self,
        unit_path: str | Path,
        kind: str,
        source: str = "",
        route: str | None = None,
        pipeline: str | None = None,
        params: dict[str, Any] | None = None,
        send_to: list[str] | None = None,
        attributes: dict[str, Any] | None = None,
        state: str = "queued",
        error: str | None = None,
        claim: bool = False,
    ) -> tuple[Job, bool]:
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
            job_id = f"j-{datetime.now(UTC):%Y%m%d}-{seq:06d}"
            if claim:
                state = "running"
            db.execute(
                "INSERT INTO jobs (seq, id, unit_path, kind, source, route, pipeline, params, send_to, state, "
                "attempts, error, attributes, created, updated, started) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    seq,
                    job_id,
                    unit_path,
                    kind,
                    source,
                    route,
                    pipeline,
                    json.dumps(params or {}, default=str),
                    json.dumps(send_to or []),
                    state,
                    1 if claim else 0,
                    error,
                    json.dumps(attributes or {}, default=str),
                    now,
                    now,
                    now if claim else None,
                ),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        _audit(
            job_id,
            state,
            source=source,
            unit=Path(unit_path).name,
            route=route,
            pipeline=pipeline,
            study_uid=(attributes or {}).get("StudyInstanceUID") or (attributes or {}).get("studyInstanceUID"),
            reason=error,
        )
        return _row_to_job(row), True

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def study_result(self, pipeline: str, study_uid: str) -> Job | None:
        """The latest finished job (done or sent) of ``pipeline`` on a unit of the study ``study_uid`` (DICOM
        ``StudyInstanceUID`` or MRD ``studyInstanceUID``): e.g. the study's measured B1 map for its MRF jobs."""
        return self._one(
            "SELECT * FROM jobs WHERE pipeline = ? AND state IN ('done', 'sent') AND result_dir IS NOT NULL "
            "AND ? IN (json_extract(attributes, '$.StudyInstanceUID'), json_extract(attributes, '$.studyInstanceUID')) "
            "ORDER BY finished DESC, seq DESC LIMIT 1",
            (pipeline, study_uid),
        )

    def study_b1_job(self, study_uid: str, states: Collection[str] = ("queued", "running")) -> Job | None:
        """The oldest ``b1_map`` job of the study ``study_uid`` in one of ``states`` (default: not finished yet)."""
        st = sorted(states)
        return self._one(
            f"SELECT * FROM jobs b WHERE b.pipeline = 'b1_map' AND b.state IN ({','.join('?' * len(st))}) "
            f"AND {_SAME_STUDY.format(uid='?')} ORDER BY b.seq LIMIT 1",
            (*st, study_uid),
        )

    def claim(self, skip_routes: Collection[str] = ()) -> Job | None:
        """Atomically take the oldest queued job that may run now: it becomes ``running`` and its attempts go up by
        one (a note in its error column saying why it waited is cleared).

        ``skip_routes``: leave the jobs of these routes queued (an executor that cannot run them now, e.g. a
        cluster without the GPU the route asks for). A job with a ``b1_wait`` attribute (:func:`b1_wait`) stays
        queued while it waits for its study's B1 map."""
        now = time.time()
        skip = sorted(skip_routes)
        where = f" AND COALESCE(j.route, '') NOT IN ({','.join('?' * len(skip))})" if skip else ""
        with self._tx() as db:
            row = db.execute(
                f"SELECT j.id FROM jobs j WHERE j.state = 'queued'{where} AND NOT {_WAITS_FOR_B1} "
                "ORDER BY j.seq LIMIT 1",
                (*skip, now, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, started=?, updated=?, finished=NULL, "
                "error=CASE WHEN error LIKE 'waiting for %' THEN NULL ELSE error END "
                "WHERE id = ? AND state = 'queued'",
                (now, now, row["id"]),
            )
            out = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        job = _row_to_job(out)
        _audit(job.id, "running", attempts=job.attempts)
        return job

    def finish(self, job_id: str, result_dir: str | Path | None = None, ran_on: str | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='done', error=NULL, result_dir=?, finished=?, updated=?, "
                "ran_on=COALESCE(?, ran_on) WHERE id=?",
                (str(result_dir) if result_dir else None, now, now, ran_on, job_id),
            )
        _audit(job_id, "done", ran_on=ran_on)

    def note_waiting(self, job_ids: Collection[str], note: str | None) -> int:
        """Say why queued jobs wait (e.g. ``waiting for resources: gpu``) in their error column, shown by
        ``recon-node status``; ``None`` clears such a note. Only queued jobs are touched; returns how many changed."""
        ids = list(job_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._tx() as db:
            if note is None:
                return db.execute(
                    f"UPDATE jobs SET error=NULL, updated=? WHERE state='queued' AND error LIKE 'waiting for %' "
                    f"AND id IN ({marks})",
                    (time.time(), *ids),
                ).rowcount
            return db.execute(
                f"UPDATE jobs SET error=?, updated=? WHERE state='queued' AND COALESCE(error, '') != ? "
                f"AND id IN ({marks})",
                (note, time.time(), note, *ids),
            ).rowcount

    def mark_sent(self, job_id: str) -> bool:
        """A done job whose outputs reached all its destinations becomes ``sent``; False if it was not done."""
        now = time.time()
        with self._tx() as db:
            n = db.execute(
                "UPDATE jobs SET state='sent', updated=? WHERE id=? AND state='done'", (now, job_id)
            ).rowcount
        if n:
            _audit(job_id, "sent")
        return bool(n)

    def reopen_delivery(self, job_id: str) -> bool:
        """A ``sent`` job goes back to ``done`` (operator resend: its outputs are queued again)."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE jobs SET state='done', updated=? WHERE id=? AND state='sent'", (time.time(), job_id)
            ).rowcount
        if n:
            _audit(job_id, "done", reason="resend requested")
        return bool(n)

    def fail(self, job_id: str, error: str, max_attempts: int | None = None, permanent: bool = False) -> str:
        """Record a failed attempt: back to ``queued`` while the job's own failures stay below ``max_attempts``,
        else ``failed``; ``permanent`` (the same input would fail the same way) fails it at once. Returns the state.

        The stored error of a failed job says what stopped it (permanent error or ``node.max_attempts``).
        """
        limit = max_attempts or self.max_attempts
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts, node_deaths FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            own = row["attempts"] - row["node_deaths"]
            if permanent:
                state, text = (
                    "failed",
                    f"{error} (not retried: the same input fails the same way; fix the input, "
                    f"the route or the site config, then run `recon-node retry {job_id}`)",
                )
            elif own < limit:
                state, text = "queued", error
            else:
                state, text = "failed", f"{error} (stopped after {own} failed attempt(s): node.max_attempts is {limit})"
            db.execute(
                "UPDATE jobs SET state=?, error=?, updated=?, finished=? WHERE id=?",
                (state, text, now, now if state == "failed" else None, job_id),
            )
        _audit(job_id, state, attempts=row["attempts"], reason=text)
        return state

    def node_died(self, job_id: str, reason: str, max_node_deaths: int | None = None) -> str:
        """The machine running a job went away (an executor's worker process or cluster node was killed): like
        :meth:`recover` for one running job, it counts a node death, not a job error, and the job goes back to
        ``queued`` (``failed`` at ``max_node_deaths``). Returns the new state."""
        limit = max_node_deaths or self.max_node_deaths
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, node_deaths FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["state"] != "running":
                return str(row["state"])
            deaths = row["node_deaths"] + 1
            if deaths >= limit:
                state = "failed"
                error = (
                    f"{reason}: the machine running this job stopped {deaths} times; node.max_node_deaths is "
                    f"{limit}; not retried again - check the job log and the workers' memory, then "
                    f"`recon-node retry {job_id}`"
                )
            else:
                state, error = "queued", f"{reason} ({deaths} of {limit} node stops)"
            db.execute(
                "UPDATE jobs SET state=?, node_deaths=?, error=?, updated=?, finished=? WHERE id=?",
                (state, deaths, error, now, now if state == "failed" else None, job_id),
            )
        _audit(job_id, state, reason=error)
        return state

    def append_log(self, job_id: str, line: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} {ln}\n" for ln in line.rstrip("\n").split("\n"))
        with self._tx() as db:
            db.execute("UPDATE jobs SET log = log || ?, updated=? WHERE id = ?", (text, time.time(), job_id))

    # In the class body below, ``list`` names this method, so later signatures spell the type ``builtins.list``.
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

    def probe_write(self) -> float:
        """Write and commit one row of a tiny table (``node_health``): the readiness check that the database can
        still be written (read-only file system, a full disk, a lock held too long). Returns the seconds it took;
        raises ``sqlite3.Error`` when it cannot write."""
        t0 = time.perf_counter()
        with self._tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS node_health (id INTEGER PRIMARY KEY CHECK (id = 1), checked REAL NOT NULL)"
            )
            db.execute("INSERT OR REPLACE INTO node_health (id, checked) VALUES (1, ?)", (time.time(),))
        return time.perf_counter() - t0

    def unit_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT unit_path FROM jobs").fetchall()}

    def recover(self, max_node_deaths: int | None = None) -> builtins.list[str]:
        """At start-up: jobs left ``running`` by a stopped node count one node death and go back to ``queued``.

        A job during which the node died ``max_node_deaths`` times becomes ``failed`` (it may be what kills the
        node, e.g. by running out of memory), with a reason that names the limit. Node deaths do not use up the
        job's own ``max_attempts``.
        """
        limit = max_node_deaths or self.max_node_deaths
        now = time.time()
        changes: list[tuple[str, str, str | None]] = []
        with self._tx() as db:
            rows = db.execute("SELECT id, node_deaths FROM jobs WHERE state = 'running'").fetchall()
            requeued = []
            for r in rows:
                deaths = r["node_deaths"] + 1
                if deaths >= limit:
                    error = (
                        f"the node stopped during this job {deaths} times (crash, kill or out of memory): "
                        f"node.max_node_deaths is {limit}; not retried again - check the job log and the "
                        f"node's memory, then `recon-node retry {r['id']}`"
                    )
                    db.execute(
                        "UPDATE jobs SET state='failed', node_deaths=?, error=?, updated=?, finished=? WHERE id=?",
                        (deaths, error, now, now, r["id"]),
                    )
                    changes.append((r["id"], "failed", error))
                else:
                    db.execute(
                        "UPDATE jobs SET state='queued', node_deaths=?, updated=? WHERE id=?", (deaths, now, r["id"])
                    )
                    requeued.append(r["id"])
                    changes.append((r["id"], "queued", f"the node stopped during this job ({deaths} of {limit})"))
        for job_id, state, reason in changes:
            _audit(job_id, state, reason=reason)
        return requeued

    def requeue(
        self,
        job_id: str,
        *,
        route: str | None = None,
        pipeline: str | None = None,
        params: dict[str, Any] | None = None,
        send_to: builtins.list[str] | None = None,
    ) -> Job:
        """Put a failed, unrouted (or done) job back in the queue with fresh counts (operator retry).

        ``route``/``pipeline``/``params``/``send_to`` replace the job's when given (re-routed with the current
        site config). A running job is left alone (``ValueError``).
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["state"] in ("running", "queued"):
                raise ValueError(
                    f"job {job_id} is {row['state']}; only a failed, unrouted, done or sent job can be retried"
                )
            sets = ["state='queued'", "attempts=0", "node_deaths=0", "error=NULL", "finished=NULL", "updated=?"]
            args: list[Any] = [now]
            for col, value in (("route", route), ("pipeline", pipeline)):
                if value is not None:
                    sets.append(f"{col}=?")
                    args.append(value)
            if params is not None:
                sets.append("params=?")
                args.append(json.dumps(params, default=str))
            if send_to is not None:
                sets.append("send_to=?")
                args.append(json.dumps(send_to))
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))
            out = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        _audit(job_id, "queued", reason="retry requested")
        return _row_to_job(out)


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
