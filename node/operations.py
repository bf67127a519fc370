"""Operator actions on a job, shared by the command line (``recon-node retry`` / ``resend``) and the web console.

Each takes the open job store (and, for a resend, the outbox: the CLI opens its own beside a running node, the
console passes the node's), checks the job's state, changes it, writes one audit line naming the actor, and
returns what happened; a refusal is a ``ValueError`` whose text says why and what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import audit
from node.config import SiteConfig
from node.jobs import Job, JobStore


class JobNotFound(ValueError):
    """No job with that id (the console answers 404)."""


@dataclass
class RetryResult:
    job: Job  # as queued again
    previous_state: str

    def message(self) -> str:
        j = self.job
        return f"job {j.id} queued again (was {self.previous_state}): route {j.route}, pipeline {j.pipeline}" + (
            f", send to {', '.join(j.send_to)}" if j.send_to else ""
        )


@dataclass
class ResendResult:
    job_id: str
    destinations: list[str]
    n_instances: int
    n_rows: int  # outbox rows created or re-armed
    reopened: bool = False  # the job went from sent back to done

    def message(self) -> str:
        return (
            f"job {self.job_id}: {self.n_instances} instance(s) queued again for {', '.join(self.destinations)} "
            f"({self.n_rows} outbox rows re-armed)"
        )


def retry_job(
    cfg: SiteConfig,
    store: JobStore,
    job_id: str,
    *,
    force: bool = False,
    actor: str = "operator",
    who: dict[str, Any] | None = None,
) -> RetryResult:
    """Queue a failed / unrouted job again (a done or sent one with ``force``), routed with the current config.

    ``who``: more audit fields about the actor (e.g. ``actor_ip``)."""
    from node.ingest.units import unit_from_disk
    from node.routing import route

    job = store.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r} in {store.path} (see `recon-node status`)")
    if job.state in ("queued", "running"):
        raise ValueError(
            f"job {job.id} is {job.state}; only a failed or unrouted job is retried (a done or sent job with --force)"
        )
    if job.state in ("done", "sent") and not force:
        raise ValueError(
            f"job {job.id} is {job.state}; add --force to run it again (use `recon-node resend "
            f"{job.id}` to send its outputs again)"
        )
    unit = unit_from_disk(Path(job.unit_path))
    if unit is None:
        raise ValueError(f"job {job.id}: its input {job.unit_path} is no longer in the spool; it cannot be retried")
    if not unit.source:
        unit.source = job.source
    r = route(cfg, unit)
    if r is None:
        raise ValueError(
            f"job {job.id}: no route of {cfg.path or 'the site config'} matches its input "
            f"({', '.join(f'{k}={v}' for k, v in unit.attributes.items() if k != 'json')}); add a route, then retry"
        )
    new = store.requeue(job.id, route=r.name, pipeline=r.pipeline, params=r.params, send_to=r.send_to)
    audit.event("job.retry", job_id=job.id, actor=actor, route=r.name, previous_state=job.state, **(who or {}))
    return RetryResult(new, job.state)


def resend_job(
    cfg: SiteConfig,
    store: JobStore,
    outbox: Any,
    job_id: str,
    *,
    to: list[str] | None = None,
    actor: str = "operator",
    who: dict[str, Any] | None = None,
) -> ResendResult:
    """Queue a done / sent job's DICOM outputs again in ``outbox`` (an :class:`~node.egress.outbox.Outbox`) for
    its destinations (or ``to``), delivered instances too; a sent job goes back to done until they arrive."""
    from node.egress.instances import result_instances
    from node.egress.outbox import SENT

    job = store.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r} in {store.path} (see `recon-node status`)")
    if job.state not in ("done", "sent"):
        raise ValueError(
            f"job {job.id} is {job.state}: only a done or sent job has outputs to resend"
            + (f" (run `recon-node retry {job.id}` first)" if job.state == "failed" else "")
        )
    dests = list(to or job.send_to)
    unknown = [d for d in dests if cfg.destination(d) is None]
    if unknown:
        raise ValueError(f"no destination called {', '.join(unknown)} in {cfg.path or 'the site config'}")
    if not dests:
        raise ValueError(f"job {job.id} has no destinations (its route sends nowhere); name one with --to")
    files = result_instances(job.result_dir)
    if not files:
        raise ValueError(f"job {job.id}: no DICOM outputs under {job.result_dir} (removed by retention?)")
    n = 0
    for dest in dests:
        n += outbox.enqueue(files, dest, job.id)  # new rows, and failed ones re-armed
        for item in outbox.items(destination=dest, job_id=job.id):
            if item.state == SENT:  # delivered before: back to pending, due now
                outbox.mark_retry(item.id, f"resend requested by {actor}", 0.0)
                n += 1
    reopened = store.reopen_delivery(job.id)
    audit.event("job.resend", job_id=job.id, actor=actor, destinations=dests, n_instances=len(files), **(who or {}))
    return ResendResult(job.id, dests, len(files), n, reopened)
