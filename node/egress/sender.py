"""Durable PACS egress: an SQLite outbox of (instance, destination) rows and a C-STORE SCU thread that drains it.

Outbox (SQLite, WAL): one row per SOP instance and destination, unique on (sop_instance_uid, destination). Files
are referenced by path (the job's results folder), never copied. States: ``pending`` (waiting for its
``next_attempt_at``), ``sending`` (handed to an association), ``sent``, ``failed`` (cannot ever succeed: the file
is gone or unreadable, the destination is not configured, or ``max_attempts`` ran out). Rows left ``sending`` by a
crash go back to ``pending`` when the outbox is opened again, so nothing is lost; a PACS keys instances by SOP
Instance UID, so the rare resend of an instance it already stored is harmless.

Sender (a thread): every pass takes the due rows, one association per destination, one C-STORE per row. Success
and warning statuses count as sent. An unreachable PACS, a refused or aborted association, a failure status or a
missing response put the row back to ``pending`` with exponential backoff (1 s, 2 s, 4 s ... capped at
``backoff_max_s``). ``verify(name)`` is a C-ECHO; ``destination_status()`` summarises each destination.

Folder destinations (:class:`FolderDestination`, a share a site imports from) go through the same rows: each file
is copied to ``<path>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (temp file in that folder,
fsync, atomic rename, fsync of the folder), so a file under its final name is always complete and a resend
overwrites it with the same bytes. The three path components must be valid DICOM UIDs (digits and dots) and the
resolved path must stay under the destination folder (:func:`node.uids.safe_path_under`); otherwise the row fails
at once with the reason (``../../x``, an absolute path or a newline never become a path). ``verify`` checks that
the folder can be written.

TLS: a destination with ``tls: true`` is reached over DICOM TLS (pynetdicom ``tls_args``): the PACS certificate is
verified against ``tls_ca`` (or the system store) and its host name; ``tls_cert`` / ``tls_key`` are our client
certificate when the PACS asks for one.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node import audit, uids
from node.durable import copy_durably

log = logging.getLogger(__name__)

PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
# C-STORE warning statuses (PS3.4 B.2.3, PS3.7 C): the instance is stored.
_WARNING_STATUSES = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}
_VERIFICATION = "1.2.840.10008.1.1"

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
class Destination:
    """A PACS (C-STORE SCP). The site config's destination entries have the same field names."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def ssl_context(self) -> Any:
        """The client-side TLS context (certificate and host name verified), or None without TLS."""
        if not self.tls:
            return None
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.tls_ca) if self.tls_ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx

    @property
    def target(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class FolderDestination:
    """A folder (e.g. a share a PACS imports from): ``<path>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``."""

    name: str
    path: Path

    @property
    def target(self) -> str:
        return str(self.path)


AnyDestination = Destination | FolderDestination


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
            "UPDATE outbox SET state=?, updated_at=? WHERE state=?", (PENDING, self.clock(), SENDING)).rowcount
        if recovered:
            log.info("outbox %s: %d instance(s) interrupted while sending are pending again", self.path, recovered)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- queueing ----------------------------------------------------------------------------------------------
    def enqueue(self, files: Iterable[str | Path], destination: str, job_id: str) -> int:
        """Queue every file for ``destination``; returns how many rows are new or were re-armed.

        An instance already queued for that destination keeps its row (sent stays sent; pending gets the new
        path; failed goes back to pending with zero attempts).
        """
        now = self.clock()
        rows = []
        for f in files:
            path = Path(f).resolve()
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SOPInstanceUID", "SOPClassUID"])
            except Exception as e:
                raise ValueError(f"job {job_id}: cannot queue {path} for {destination}: not a readable DICOM "
                                 f"file ({type(e).__name__}: {e})") from e
            meta = getattr(ds, "file_meta", None)
            sop = str(ds.get("SOPInstanceUID") or (meta and meta.get("MediaStorageSOPInstanceUID")) or "")
            cls = str(ds.get("SOPClassUID") or (meta and meta.get("MediaStorageSOPClassUID")) or "")
            if not sop or not cls:
                raise ValueError(f"job {job_id}: {path} has no SOP Instance / Class UID; cannot send it")
            ts = str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)) if meta else str(ExplicitVRLittleEndian)
            rows.append((job_id, str(path), sop, cls, ts, destination, now, now, now))
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
                           WHERE state IN ('pending', 'failed')""", row)
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
        sql, args = "SELECT * FROM outbox WHERE 1=1", []
        if destination is not None:
            sql, args = sql + " AND destination=?", args + [destination]
        if job_id is not None:
            sql, args = sql + " AND job_id=?", args + [job_id]
        with self._lock:
            return [_item(r) for r in self._db.execute(sql + " ORDER BY id", args).fetchall()]

    # ---- state changes -----------------------------------------------------------------------------------------
    def mark_sending(self, item_ids: Iterable[int]) -> None:
        self._set_state(item_ids, SENDING)

    def mark_sent(self, item_ids: int | Iterable[int]) -> None:
        ids = [item_ids] if isinstance(item_ids, int) else list(item_ids)
        now = self.clock()
        with self._lock:
            self._db.executemany("UPDATE outbox SET state=?, sent_at=?, updated_at=?, last_error=NULL WHERE id=?",
                                 [(SENT, now, now, i) for i in ids])

    def mark_retry(self, item_id: int, error: str, backoff: float) -> None:
        """Back to pending, one more attempt counted, next try ``backoff`` seconds from now."""
        now = self.clock()
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, next_attempt_at=?, last_error=?, updated_at=? "
                "WHERE id=?", (PENDING, now + backoff, error, now, item_id))

    def mark_failed(self, item_id: int, error: str) -> None:
        now = self.clock()
        with self._lock:
            self._db.execute("UPDATE outbox SET state=?, attempts=attempts+1, last_error=?, updated_at=? WHERE id=?",
                             (FAILED, error, now, item_id))
            row = self._db.execute("SELECT job_id, sop_instance_uid, destination FROM outbox WHERE id=?",
                                   (item_id,)).fetchone()
        if row is not None:  # every way an instance ends undelivered goes through here
            audit.event("egress.failed", "failure", destination=row["destination"], job_id=row["job_id"],
                        sop_uid=str(row["sop_instance_uid"])[:64], reason=error)

    def defer(self, destination: str, until: float) -> None:
        """Hold every pending row of ``destination`` until ``until`` (one retry per backoff, not one per row)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET next_attempt_at=? WHERE destination=? AND state=? "
                             "AND next_attempt_at<?", (until, destination, PENDING, until))

    def _set_state(self, item_ids: Iterable[int], state: str) -> None:
        now = self.clock()
        with self._lock:
            self._db.executemany("UPDATE outbox SET state=?, updated_at=? WHERE id=?",
                                 [(state, now, i) for i in item_ids])

    # ---- per-destination state ---------------------------------------------------------------------------------
    def note_destination(self, name: str, *, success: bool | None = None, error: str | None = None,
                         echo_ok: bool | None = None) -> None:
        now = self.clock()
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (name,))
            if success:
                self._db.execute("UPDATE destination_state SET last_success_at=? WHERE name=?", (now, name))
            if error is not None:
                self._db.execute("UPDATE destination_state SET last_error=?, last_error_at=? WHERE name=?",
                                 (error, now, name))
            if echo_ok is not None:
                self._db.execute("UPDATE destination_state SET echo_ok=?, echo_at=? WHERE name=?",
                                 (int(echo_ok), now, name))

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
    return OutboxItem(id=int(r["id"]), job_id=r["job_id"], path=r["path"], sop_instance_uid=r["sop_instance_uid"],
                      sop_class_uid=r["sop_class_uid"], transfer_syntax_uid=r["transfer_syntax_uid"],
                      destination=r["destination"], state=r["state"], attempts=int(r["attempts"]),
                      next_attempt_at=float(r["next_attempt_at"]), last_error=r["last_error"])


def _destination(name: str, d: Any) -> AnyDestination:
    """A Destination from ours, the site config's (same field names) or an (ae_title, host, port) tuple."""
    if isinstance(d, (Destination, FolderDestination)):
        return d
    if getattr(d, "kind", "dicom") == "folder":
        if getattr(d, "path", None) is None:
            raise ValueError(f"folder destination {name!r} has no path")
        return FolderDestination(str(getattr(d, "name", name) or name), Path(d.path))
    if all(hasattr(d, a) for a in ("ae_title", "host", "port")):
        return Destination(str(getattr(d, "name", name) or name), str(d.ae_title), str(d.host), int(d.port),
                           tls=bool(getattr(d, "tls", False)), tls_ca=getattr(d, "tls_ca", None),
                           tls_cert=getattr(d, "tls_cert", None), tls_key=getattr(d, "tls_key", None))
    try:
        ae_title, host, port = d
        return Destination(name, str(ae_title), str(host), int(port))
    except (TypeError, ValueError) as e:
        raise ValueError(f"destination {name!r}: expected (ae_title, host, port) or an object with those "
                         f"fields, got {d!r}") from e


def _tls_args(dest: Destination) -> tuple[Any, str | None] | None:
    """pynetdicom's ``tls_args`` (context, server host name) for a TLS destination, else None."""
    ctx = dest.ssl_context()
    return None if ctx is None else (ctx, dest.host)


def _destinations(given: Mapping[str, Any] | Iterable[Any]) -> dict[str, AnyDestination]:
    if isinstance(given, Mapping):
        return {name: _destination(name, d) for name, d in given.items()}
    out = {}
    for d in given:
        dest = _destination(str(getattr(d, "name", "")), d)
        out[dest.name] = dest
    return out


class Sender(threading.Thread):
    """Drains an :class:`Outbox` to its destinations with C-STORE; see the module docstring."""

    def __init__(self, outbox: Outbox, destinations: Mapping[str, Any] | Iterable[Any],
                 calling_ae: str = "RECONNODE", clock: Callable[[], float] | None = None, *,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0, max_attempts: int | None = None,
                 poll_interval_s: float = 1.0, batch_size: int = 1000, timeout_s: float = 30.0,
                 on_sent: Callable[[set[str]], None] | None = None) -> None:
        """``on_sent(job_ids)`` is called (on the sender thread) after a pass delivered rows of those jobs."""
        super().__init__(name="recon-node-sender", daemon=True)
        self.outbox = outbox
        self.destinations = _destinations(destinations)
        self.calling_ae = calling_ae
        self.clock = clock or outbox.clock
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.on_sent = on_sent
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self._delivered: set[str] = set()

    # ---- thread ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("sender started (calling AE %s, destinations %s)", self.calling_ae, ", ".join(self.destinations))
        while not self._stop_event.is_set():
            try:
                self.send_due()
            except Exception:  # never let the thread die: the outbox keeps the work
                log.exception("sender pass failed; retrying in %.1f s", self.poll_interval_s)
            self._wake.wait(self._sleep_s())
            self._wake.clear()
        log.info("sender stopped")

    def _sleep_s(self) -> float:
        nxt = self.outbox.next_due_at()
        if nxt is None:
            return self.poll_interval_s
        return min(self.poll_interval_s, max(0.0, nxt - self.clock()))

    def wake(self) -> None:
        """Look at the outbox now (call after enqueue)."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop_event.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    # ---- one pass ----------------------------------------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones: base * 2**(attempts-1), capped."""
        return min(self.backoff_base_s * 2 ** max(attempts - 1, 0), self.backoff_max_s)

    def send_due(self) -> int:
        """Send every due row once; returns how many were sent."""
        items = self.outbox.due(self.clock(), limit=self.batch_size)
        groups: dict[str, list[OutboxItem]] = {}
        for it in items:
            groups.setdefault(it.destination, []).append(it)
        sent = 0
        for name, group in groups.items():
            dest = self.destinations.get(name)
            if dest is None:
                for it in group:
                    self.outbox.mark_failed(it.id, f"destination {name!r} is not configured (configured: "
                                                   f"{', '.join(self.destinations) or 'none'}); add it to the "
                                                   "site config and queue the job again")
                continue
            if isinstance(dest, FolderDestination):
                sent += self._copy_group(dest, group)
            else:
                sent += self._send_group(dest, group)
        delivered, self._delivered = self._delivered, set()
        if delivered and self.on_sent is not None:
            try:
                self.on_sent(delivered)
            except Exception:  # noqa: BLE001 - a status callback must not stop the sender
                log.exception("sender: on_sent callback failed")
        return sent

    # ---- folders -----------------------------------------------------------------------------------------------
    def _copy_group(self, dest: FolderDestination, group: list[OutboxItem]) -> int:
        sent = 0
        for it in group:
            src = Path(it.path)
            if not src.is_file():
                self.outbox.mark_failed(it.id, f"job {it.job_id}: file {it.path} no longer exists")
                continue
            try:
                ds = pydicom.dcmread(src, stop_before_pixels=True,
                                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            except Exception as e:
                self.outbox.mark_failed(it.id, f"job {it.job_id}: cannot read {it.path}: {type(e).__name__}: {e}")
                continue
            try:
                # Only validated UIDs become path components, and the result must stay under the folder.
                study = uids.validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
                series = uids.validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
                sop = uids.validate_uid(it.sop_instance_uid, "SOPInstanceUID")
                final = uids.safe_path_under(dest.path, study, series, f"{sop}.dcm")
            except uids.InvalidUID as e:
                error = f"job {it.job_id}: {it.path} not written to {dest.path}: {e}"
                log.error("destination %s: %s", dest.name, error)
                self.outbox.mark_failed(it.id, error)
                continue
            try:
                copy_durably(src, final)
            except OSError as e:
                self._retry(dest, [it], f"cannot write to {dest.path}: {e.strerror or e}")
                continue
            self.outbox.mark_sent(it.id)
            self._delivered.add(it.job_id)
            audit.event("egress.delivered", destination=dest.name, target=str(dest.path), job_id=it.job_id,
                        sop_uid=it.sop_instance_uid)
            sent += 1
        if sent:
            self.outbox.note_destination(dest.name, success=True)
            log.info("destination %s: %d instance(s) copied to %s", dest.name, sent, dest.path)
        return sent

    def _ae(self, contexts: list[tuple[str, list[str]]]) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = min(self.timeout_s, 10.0)
        for cls, syntaxes in contexts:
            ae.add_requested_context(cls, syntaxes)
        return ae

    def _retry(self, dest: AnyDestination, items: list[OutboxItem], error: str, *, whole_destination: bool = False
               ) -> None:
        """Back off ``items``; ``whole_destination``: the PACS itself failed, so hold its other rows as well."""
        longest = 0.0
        for it in items:
            attempts = it.attempts + 1
            if self.max_attempts is not None and attempts >= self.max_attempts:
                self.outbox.mark_failed(it.id, f"{error} (gave up after {attempts} attempts)")
            else:
                longest = max(longest, self.backoff(attempts))
                self.outbox.mark_retry(it.id, error, self.backoff(attempts))
        if whole_destination and longest:
            self.outbox.defer(dest.name, self.clock() + longest)
        self.outbox.note_destination(dest.name, error=error)
        log.warning("destination %s (%s): %s; %d instance(s) will be retried", dest.name, dest.target, error,
                    len(items))

    def _send_group(self, dest: Destination, group: list[OutboxItem]) -> int:
        readable: list[OutboxItem] = []
        for it in group:
            if Path(it.path).is_file():
                readable.append(it)
            else:
                self.outbox.mark_failed(it.id, f"job {it.job_id}: file {it.path} no longer exists")
        if not readable:
            return 0
        # One presentation context per SOP class (at most 128 per association), each with the files' syntaxes.
        by_class: dict[str, set[str]] = {}
        for it in readable:
            by_class.setdefault(it.sop_class_uid, set()).add(it.transfer_syntax_uid)
        classes = sorted(by_class)[:128]
        readable = [it for it in readable if it.sop_class_uid in classes]
        contexts = [(c, sorted(by_class[c] | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})) for c in classes]
        self.outbox.mark_sending(it.id for it in readable)
        ae = self._ae(contexts)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls_args(dest))
        except Exception as e:  # bad host name ...
            self._retry(dest, readable, f"cannot connect: {type(e).__name__}: {e}", whole_destination=True)
            return 0
        if not assoc.is_established:
            why = ("association rejected by" if assoc.is_rejected
                   else "no association (PACS unreachable or aborted) with")
            self._retry(dest, readable, f"{why} {dest.ae_title}@{dest.host}:{dest.port}", whole_destination=True)
            return 0
        sent = 0
        try:
            for n, it in enumerate(readable):
                if not assoc.is_established:
                    self._retry(dest, readable[n:], "association lost while sending", whole_destination=True)
                    break
                try:
                    ds = pydicom.dcmread(it.path)
                except Exception as e:
                    self.outbox.mark_failed(it.id, f"job {it.job_id}: cannot read {it.path}: {type(e).__name__}: {e}")
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except Exception as e:
                    self._retry(dest, [it], f"C-STORE failed: {type(e).__name__}: {e}")
                    continue
                code = int(status.Status) if status is not None and "Status" in status else None
                if code is None:
                    self._retry(dest, [it], "no C-STORE response (connection lost or timed out)")
                elif code == 0x0000 or code in _WARNING_STATUSES:
                    if code:
                        log.info("job %s: %s stored by %s with warning status 0x%04X", it.job_id,
                                 it.sop_instance_uid, dest.name, code)
                    self.outbox.mark_sent(it.id)
                    self._delivered.add(it.job_id)
                    audit.event("egress.delivered", destination=dest.name, target=dest.target, job_id=it.job_id,
                                sop_uid=it.sop_instance_uid, tls=dest.tls)
                    sent += 1
                else:
                    comment = str(status.get("ErrorComment", "") or "")
                    self._retry(dest, [it], f"C-STORE status 0x{code:04X}" + (f" ({comment})" if comment else ""))
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            self.outbox.note_destination(dest.name, success=True)
            log.info("destination %s: %d instance(s) sent", dest.name, sent)
        return sent

    # ---- status ------------------------------------------------------------------------------------------------
    def verify(self, destination: str) -> bool:
        """C-ECHO ``destination``; the result is kept for :meth:`destination_status`."""
        dest = self.destinations.get(destination)
        if dest is None:
            raise ValueError(f"destination {destination!r} is not configured "
                             f"(configured: {', '.join(self.destinations) or 'none'})")
        if isinstance(dest, FolderDestination):
            return self._verify_folder(dest)
        ae = self._ae([(_VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        ok, error = False, None
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls_args(dest))
            if assoc.is_established:
                status = assoc.send_c_echo()
                ok = status is not None and "Status" in status and int(status.Status) == 0
                error = None if ok else "C-ECHO failed"
                assoc.release()
            else:
                error = "association rejected" if assoc.is_rejected else "PACS unreachable (no association)"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        self.outbox.note_destination(dest.name, echo_ok=ok, error=None if ok else f"C-ECHO: {error}")
        (log.info if ok else log.warning)("C-ECHO %s (%s@%s:%d): %s", dest.name, dest.ae_title, dest.host,
                                          dest.port, "ok" if ok else error)
        return ok

    def _verify_folder(self, dest: FolderDestination) -> bool:
        error = None
        try:
            dest.path.mkdir(parents=True, exist_ok=True)
            probe = dest.path / f".recon-node-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            error = f"folder not writable: {e.strerror or e}"
        self.outbox.note_destination(dest.name, echo_ok=error is None,
                                     error=None if error is None else f"check: {error}")
        (log.info if error is None else log.warning)("destination %s (folder %s): %s", dest.name, dest.path,
                                                      "writable" if error is None else error)
        return error is None

    def destination_status(self) -> list[dict[str, Any]]:
        """Per destination: name, pending, sent, failed, last_error, last_success_at, echo_ok."""
        counts = self.outbox.counts()
        rows = self.outbox.destination_rows()
        out = []
        for name in list(self.destinations) + sorted(set(counts) - set(self.destinations)):
            c, r = counts.get(name, {}), rows.get(name, {})
            echo = r.get("echo_ok")
            dest = self.destinations.get(name)
            out.append({
                "name": name,
                "kind": "folder" if isinstance(dest, FolderDestination) else "dicom" if dest else "unknown",
                "target": dest.target if dest else "(not configured)",
                "pending": c.get(PENDING, 0) + c.get(SENDING, 0),
                "sent": c.get(SENT, 0),
                "failed": c.get(FAILED, 0),
                "last_error": r.get("last_error"),
                "last_success_at": r.get("last_success_at"),
                "echo_ok": None if echo is None else bool(echo),
            })
        return out
