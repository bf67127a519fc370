"""The node's egress: done jobs -> durable outbox -> destinations of their route; job state ``sent`` when delivered.

:class:`Egress` owns the :class:`~node.egress.outbox.Outbox` (``<spool>/outbox.sqlite``, next to the job database)
and the :class:`~node.egress.sender.Sender` thread. Its :meth:`Egress.on_done` is the worker hook: every DICOM
instance the job's run wrote (the records :func:`~node.egress.dicom_writer.write_outputs` returned) is queued once
per destination in the route's ``send_to``, then the sender is woken (where no run hands them over, at start-up,
they are read from ``<result>/dicom/**.dcm``). When a pass delivers rows, every touched job whose rows are all
``sent`` becomes ``sent`` in the job store. At start-up :meth:`Egress.reconcile` queues what a stopped node had
finished but not queued (a kill between ``done`` and the enqueue) and catches up job states, so nothing done is
ever left unsent.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from node import metrics
from node.config import SiteConfig
from node.egress.instances import InstanceRecord, result_instances
from node.egress.outbox import FAILED, PENDING, SENDING, SENT, Outbox
from node.egress.sender import Sender
from node.jobs import Job, JobStore

log = logging.getLogger("recon-node.egress")


def summarise(per_dest: dict[str, dict[str, int]]) -> dict[str, int]:
    """{destination: {state: n}} -> {pending, sent, failed, total} over all destinations."""
    out = {"pending": 0, "sent": 0, "failed": 0}
    for c in per_dest.values():
        out["pending"] += c.get(PENDING, 0) + c.get(SENDING, 0)
        out["sent"] += c.get(SENT, 0)
        out["failed"] += c.get(FAILED, 0)
    out["total"] = out["pending"] + out["sent"] + out["failed"]
    return out


class Egress:
    """Outbox + sender of one node (see the module docstring)."""

    def __init__(self, cfg: SiteConfig, store: JobStore) -> None:
        self.cfg = cfg
        self.store = store
        self.outbox = Outbox(cfg.node.outbox_path)
        e = cfg.egress
        self.sender = Sender(
            self.outbox,
            cfg.destinations,
            calling_ae=cfg.node.ae_title,
            backoff_base_s=e.backoff_base_s,
            backoff_max_s=e.backoff_max_s,
            max_attempts=e.max_attempts,
            poll_interval_s=e.poll_interval_s,
            timeout_s=e.timeout_s,
            on_sent=self._delivered,
        )
        self._lock = threading.Lock()

    # ---- life cycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.reconcile()
        self.sender.start()
        if self.cfg.destinations:
            threading.Thread(target=self.verify_all, name="recon-node-echo", daemon=True).start()

    def stop(self) -> None:
        self.sender.stop(timeout=self.cfg.egress.timeout_s)
        if not self.sender.is_alive():  # else the daemon thread still uses it; the process exit closes it
            self.outbox.close()

    def verify_all(self) -> dict[str, bool]:
        """Check every destination (C-ECHO, a write test, a GET); logged and kept for status."""
        out = {}
        for d in self.cfg.destinations:
            try:
                out[d.name] = self.sender.verify(d.name)
            except Exception as e:  # noqa: BLE001 - a check must never stop the node
                log.warning("destination %s: check failed: %s", d.name, e)
                out[d.name] = False
        return out

    # ---- jobs -> outbox -----------------------------------------------------------------------------------------
    def on_done(self, job: Job, outputs: list[Any], out_dir: Path, instances: list[InstanceRecord]) -> None:
        """Worker hook: queue the instances the writer just wrote (paths in ``out_dir``) for every destination
        of the job's route."""
        self.enqueue_job(job, instances)

    def enqueue_job(self, job: Job, instances: list[InstanceRecord] | None = None) -> int:
        """Queue ``instances`` (default: read from the job's results folder) for the job's destinations."""
        if not job.send_to:
            return 0
        files = instances if instances is not None else result_instances(job.result_dir)
        if not files:
            log.info(
                "job %s [%s]: no DICOM outputs; nothing to send to %s",
                job.id,
                job.source or "-",
                ", ".join(job.send_to),
            )
            return 0
        n = 0
        for dest in job.send_to:
            n += self.outbox.enqueue(files, dest, job.id)
        log.info("job %s [%s]: %d file(s) queued for %s", job.id, job.source or "-", len(files), ", ".join(job.send_to))
        self._delivered({job.id})  # a rerun job whose instances were all delivered before
        self.sender.wake()
        return n

    def reconcile(self) -> None:
        """Queue done jobs missing from the outbox for some destination; mark fully delivered jobs ``sent``."""
        done = [j for j in self.store.list(state="done") if j.send_to]
        counts = self.outbox.job_counts(j.id for j in done)
        for job in done:
            have = set(counts.get(job.id, {}))
            missing = [d for d in job.send_to if d not in have]
            if missing:
                log.warning(
                    "job %s [%s]: done but not queued for %s (node stopped in between); queueing now",
                    job.id,
                    job.source or "-",
                    ", ".join(missing),
                )
                files = result_instances(job.result_dir)
                for dest in missing:
                    if files:
                        self.outbox.enqueue(files, dest, job.id)
        self._delivered({j.id for j in done})

    def _delivered(self, job_ids: set[str]) -> None:
        """Sender callback: jobs whose every row (for every destination of the route) is sent become ``sent``."""
        with self._lock:
            counts = self.outbox.job_counts(job_ids)
            for job_id in job_ids:
                job = self.store.get(job_id)
                if job is None or job.state != "done":
                    continue
                per_dest = counts.get(job_id, {})
                s = summarise(per_dest)
                if s["total"] and s["sent"] == s["total"] and set(job.send_to) <= set(per_dest):
                    if self.store.mark_sent(job_id):
                        if job.finished is not None:  # done -> delivered everywhere
                            metrics.STAGE_SECONDS.labels("egress").observe(max(0.0, time.time() - job.finished))
                        log.info(
                            "job %s [%s]: %d instance(s) delivered to %s",
                            job_id,
                            job.source or "-",
                            s["sent"],
                            ", ".join(job.send_to),
                        )

    # ---- status --------------------------------------------------------------------------------------------------
    def destination_status(self) -> list[dict[str, Any]]:
        return self.sender.destination_status()


def read_status(cfg: SiteConfig, job_ids: list[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """For ``recon-node status`` (node running or not): per-destination rows and per-job egress summaries.

    Opens the outbox without touching rows a running sender is working on.
    """
    path = cfg.node.outbox_path
    if not path.exists():
        dests = [
            {
                "name": d.name,
                "kind": d.kind,
                "target": d.target,
                "pending": 0,
                "sent": 0,
                "failed": 0,
                "last_error": None,
                "last_success_at": None,
                "echo_ok": None,
            }
            for d in cfg.destinations
        ]
        return dests, {}
    outbox = Outbox(path, recover=False)
    try:
        dests = Sender(outbox, cfg.destinations).destination_status()
        per_job = {job_id: {**summarise(c), "destinations": c} for job_id, c in outbox.job_counts(job_ids).items()}
    finally:
        outbox.close()
    return dests, per_job
