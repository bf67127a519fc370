"""The running node: MRD server + DICOM SCP + workers around one job store, wired IngestUnit -> route -> job.

Start-up order: open the audit log, delete leftovers of interrupted writes in ``<spool>/tmp`` (``*.partial``, half
written result folders), open the job store, requeue jobs a killed node left running, give every unit in
``<spool>/units`` that has no job its job (covers a kill between the unit's rename and its job insert), start the
operator console when ``node.http`` is set (first, so a port in use stops the start before any data comes), the
egress (outbox + sender thread; queue done jobs a stopped node had not queued; C-ECHO every destination in the
background), the workers, then the listeners (MRD, MRD over TLS when ``node.mrd_tls_port`` is set, DICOM).
``<spool>/run/node.json`` tells tools (and tests) the pid and the ports in use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import audit, metrics
from node.config import SiteConfig
from node.egress.egress import Egress, summarise
from node.executors import make_executor
from node.ingest.units import Admission, IngestUnit, unit_from_disk
from node.jobs import JobStore
from node.routing import route
from node.study_b1 import wait_attributes
from node.worker import JobResult, error_text
from pipelines.compute import set_threads

if TYPE_CHECKING:
    from node.http.app import ConsoleServer
    from node.ingest.dicom_scp import DicomSCP
    from node.ingest.mrd_server import MRDServer

log = logging.getLogger("recon-node.service")


class NodeService:
    def __init__(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        # Before anything creates a file: umask 027 and the spool's modes 0640/0750 (node.file_group), and the
        # node's UID root (output UIDs unique per node).
        from node import uids
        from node.durable import restrict_permissions

        restrict_permissions([cfg.node.spool_dir], cfg.node.file_group)
        uids.configure(cfg.node.spool_dir, cfg.node.uid_root)
        for d in (cfg.node.spool_dir, cfg.node.units_dir, cfg.node.results_dir, cfg.node.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(
            cfg.node.database_path, max_attempts=cfg.node.max_attempts, max_node_deaths=cfg.node.max_node_deaths
        )
        self.worker = make_executor(cfg, self.store)
        self.egress = Egress(cfg, self.store)
        self.worker.on_done.append(self.egress.on_done)
        self.mrd_server: MRDServer | None = None
        self.mrd_tls_server: MRDServer | None = None
        self.dicom_scp: DicomSCP | None = None
        self.console: ConsoleServer | None = None  # the operator console (node.http), on its own thread
        self._stop = threading.Event()
        self._last_retention = 0.0
        self.started_at: float | None = None  # set when start() begins, None again once stop() begins (/ready)

    # ---- ingest -> route -> job: the one place a unit is routed --------------------------------------------
    def handle_unit(self, unit: IngestUnit, inline: bool = False) -> Admission:
        """The UnitHandler of the ingest servers (and of the start-up rescan): route the unit, record its job,
        wake a worker. ``inline`` (the MRD server, whose scanner waits on the connection): a route with
        ``reply_over_mrd`` runs the job here, on the caller's thread, and the Admission carries its result."""
        r = route(self.cfg, unit)
        attrs = {
            **unit.attributes,
            "peer": unit.peer,
            "calling_ae": unit.calling_ae,
            "called_ae": unit.called_ae,
            "n_objects": unit.n_objects,
        }
        if r is None:
            job, created = self.store.create(
                unit.path,
                unit.kind,
                unit.source,
                attributes=attrs,
                state="unrouted",
                error="no route matches: " + ", ".join(f"{k}={v}" for k, v in unit.attributes.items() if k != "json"),
            )
            if created:
                metrics.UNITS_RECEIVED.labels(unit.kind).inc()
                metrics.UNITS_UNROUTED.labels(unit.kind).inc()
                log.warning(
                    "job %s [%s]: unrouted %s unit %s (%s); input kept",
                    job.id,
                    unit.source or "-",
                    unit.kind,
                    unit.path.name,
                    job.error,
                )
            return Admission(job.id, job.state)
        claim = inline and r.reply_over_mrd
        waits, note = wait_attributes(self.store, r, unit.kind, attrs, inline=claim)
        job, created = self.store.create(
            unit.path,
            unit.kind,
            unit.source,
            route=r.name,
            pipeline=r.pipeline,
            params=r.params,
            send_to=r.send_to,
            attributes={**attrs, **waits},
            error=note,
            claim=claim,
        )
        if created:
            metrics.UNITS_RECEIVED.labels(unit.kind).inc()
            log.info(
                "job %s [%s]: %s unit %s -> route %s, pipeline %s (%s)",
                job.id,
                unit.source or "-",
                unit.kind,
                unit.path.name,
                r.name,
                r.pipeline,
                "running now" if claim else "queued" + (f", {note}" if note else ""),
            )
        else:
            log.info(
                "job %s [%s]: unit %s already has this job (state %s)",
                job.id,
                unit.source or "-",
                unit.path.name,
                job.state,
            )
        if claim:
            if not created or job.state != "running":
                result = JobResult(job.id, job.state, error=job.error or f"job already {job.state}")
            else:
                result = self.worker.run_now(job)
            return Admission(job.id, result.state, r.name, result)
        if job.state == "queued":
            self.worker.submit(job)
        return Admission(job.id, job.state, r.name)

    # ---- start-up ----------------------------------------------------------------------------------------------
    def rescan(self) -> list[str]:
        """Units in the spool without a job get one (a kill between a unit's rename and its job insert)."""
        known = self.store.unit_paths()
        created = []
        for path in sorted(self.cfg.node.units_dir.iterdir()):
            if path.name.startswith(".") or path.name.endswith((".json", ".partial")) or str(path) in known:
                continue
            unit = unit_from_disk(path)
            if unit is None:
                continue
            log.warning(
                "unit %s [%s] was stored before the node stopped but had no job; creating it",
                path.name,
                unit.source or "-",
            )
            created.append(self.handle_unit(unit).job_id)
        return created

    def clean_tmp(self) -> int:
        """Delete what interrupted writes left in ``<spool>/tmp`` (nothing there is ever acknowledged: MRD units
        and results are renamed out of it only when complete). Runs before any listener or worker starts."""
        removed = 0
        tmp = self.cfg.node.tmp_dir
        for p in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
            except OSError as e:
                log.warning("cannot remove the leftover %s: %s", p, e)
        if removed:
            log.info("removed %d leftover(s) of interrupted writes from %s", removed, tmp)
        return removed

    def start(self) -> None:
        self.started_at = time.time()
        metrics.bind(self)
        if self.cfg.node.audit_log is not None:
            audit.configure(self.cfg.node.audit_log)
        audit.event("node.start", pid=os.getpid(), ae_title=self.cfg.node.ae_title)
        n = set_threads(self.cfg.node.threads)
        self.clean_tmp()
        requeued = self.store.recover()
        for job_id in requeued:
            log.warning("job %s: was running when the node stopped; queued again", job_id)
        self.rescan()
        counts = self.store.counts()
        log.info(
            "job store %s: %s; torch threads %d",
            self.cfg.node.database_path,
            ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "empty",
            n,
        )
        if self.cfg.node.http is not None:  # first of the listeners: a port in use stops the start before data comes
            from node.http.app import ConsoleServer

            self.console = ConsoleServer(self).start()
        self.egress.start()
        self.worker.start()
        from node.ingest.mrd_server import MRDServer, tls_server_context

        def handle_mrd(unit: IngestUnit) -> Admission:
            return self.handle_unit(unit, inline=True)

        slots = threading.BoundedSemaphore(self.cfg.node.mrd_max_connections)  # shared by plain and TLS
        self.mrd_server = MRDServer(self.cfg, handle_mrd, slots=slots).start()
        if self.cfg.node.mrd_tls_port is not None:
            self.mrd_tls_server = MRDServer(
                self.cfg,
                handle_mrd,
                tls_context=tls_server_context(self.cfg),
                port=self.cfg.node.mrd_tls_port,
                slots=slots,
            ).start()
        from node.ingest.dicom_scp import DicomSCP

        self.dicom_scp = DicomSCP(self.cfg, self.handle_unit)
        # groups found on disk at start wait this long for the rest of their study (issue 15, item 5); set before
        # start(), which re-arms them
        grouper = self.dicom_scp.grouper
        grouper.restart_grace = max(grouper.restart_grace, self.cfg.grouping.restart_grace_seconds)
        self.dicom_scp.start()
        self._write_run_file(self.mrd_server.port)

    def _write_run_file(self, mrd_port: int) -> None:
        run = self.cfg.node.spool_dir / "run"
        run.mkdir(exist_ok=True)
        info = {
            "pid": os.getpid(),
            "started": time.time(),
            "mrd_port": mrd_port,
            "mrd_tls_port": self.mrd_tls_server.port if self.mrd_tls_server is not None else None,
            "dicom_port": self.dicom_scp.port if self.dicom_scp is not None else None,
            "http_port": self.console.port if self.console is not None else None,
            "config": str(self.cfg.path) if self.cfg.path else None,
        }
        tmp = run / "node.json.partial"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, run / "node.json")

    def stop(self) -> None:
        self.started_at = None  # not ready from now on
        log.info("stopping: no new connections; waiting up to %g s for running jobs", self.cfg.node.shutdown_grace_s)
        if self.console is not None:
            self.console.stop()
        for server in (self.mrd_server, self.mrd_tls_server):
            if server is not None:
                server.stop()
        if self.dicom_scp is not None:
            try:
                self.dicom_scp.stop()
            except Exception as e:  # noqa: BLE001
                log.error("DICOM SCP did not stop cleanly: %s", error_text(e))
        if not self.worker.stop():
            log.warning("jobs still running at shutdown; they will be resumed when the node starts again")
        self.egress.stop()  # rows not yet delivered stay in the outbox and are sent after the next start
        (self.cfg.node.spool_dir / "run" / "node.json").unlink(missing_ok=True)
        metrics.unbind(self)
        log.info("stopped")
        audit.event("node.stop", pid=os.getpid())

    # ---- housekeeping ------------------------------------------------------------------------------------------
    def apply_retention(self) -> int:
        """Delete inputs and results of jobs done more than ``retention.days`` ago (rows stay for the record)."""
        limit = time.time() - self.cfg.retention.days * 86400
        removed = 0
        for job in self.store.list(state="done") + self.store.list(state="sent"):
            if job.finished is None or job.finished > limit:
                continue
            if summarise(self.egress.outbox.job_counts([job.id]).get(job.id, {}))["pending"]:
                continue  # still being delivered: its files must stay until the destination has them
            for p in (Path(job.unit_path), Path(job.result_dir) if job.result_dir else None):
                if p is None or not p.exists():
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                    p.with_suffix(".json").unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("retention: removed %d inputs/results older than %g days", removed, self.cfg.retention.days)
        return removed

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM / SIGINT; stop cleanly."""

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                if time.time() - self._last_retention > 3600:
                    self._last_retention = time.time()
                    try:
                        self.apply_retention()
                    except Exception as e:  # noqa: BLE001
                        log.error("retention failed: %s", error_text(e))
        finally:
            self.stop()
