"""Prometheus metrics and readiness of the node: :func:`render` is ``/metrics``, :func:`readiness` is ``/ready``.

One module-level :data:`REGISTRY` (not prometheus_client's global one, so a library that registers there cannot
clash with us). Counters and histograms are process-wide, as Prometheus expects of a process; several nodes in one
process (tests) add up in them, so tests compare before and after. What the database and the disk say is read at
scrape time by a collector over the service :func:`bind` was last given (``NodeService.start``), so
``recon_node_jobs`` is always what the job database holds, also after a restart.

The instrumented places call the metric objects directly: the ingest servers (bytes, receive time, refusals),
``NodeService.handle_unit`` (units), ``Worker.execute`` (queue wait, stage times, run outcomes), the sender and the
outbox (instances sent, retried, failed) and the egress (done -> delivered). docs/operations.md lists every
metric with its meaning and alert examples.
"""

from __future__ import annotations

import logging
import shutil
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.service import NodeService

log = logging.getLogger("recon-node.metrics")

disable_created_metrics()  # no *_created series: Prometheus does not use them, they double the output
REGISTRY = CollectorRegistry()
# what generate_latest writes; prometheus_client >= 0.22 names 1.0.0 its LATEST, which older servers may not know
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Stages of one unit, in order. receive: MRD stream (first byte to stored) or DICOM group (first instance to
# release, the quiet window included); queue_wait: job created -> first claimed; load / reconstruction / mapping /
# write: Worker.execute (reconstruction and mapping as the pipeline reports them, see RunContext.phase);
# egress: job done -> every instance delivered to every destination of its route.
STAGES = ("receive", "queue_wait", "load", "reconstruction", "mapping", "write", "egress")
# 50 ms .. 2 h: a 32x32 Cartesian frame recon takes well under a second, a 10-slice clinical MRF study ~4 minutes,
# a DICOM study's receive includes its quiet window, egress includes PACS outages.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
KINDS = ("mrd", "dicom")
REJECT_REASONS = ("unknown_source", "disk_full", "busy", "invalid", "error")
RUN_OUTCOMES = ("done", "retry", "failed")

STAGE_SECONDS = Histogram(
    "recon_node_stage_duration_seconds",
    "Seconds one unit or job spent in a stage (receive, queue_wait, load, reconstruction, mapping, write, egress)",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "recon_node_received_bytes",
    "Bytes of data accepted, by protocol (mrd: stream bytes read; dicom: stored instance sizes)",
    ["kind"],
    registry=REGISTRY,
)
UNITS_RECEIVED = Counter(
    "recon_node_units_received",
    "Units handed to routing (an MRD stream, a DICOM study/series group), by unit kind",
    ["kind"],
    registry=REGISTRY,
)
UNITS_UNROUTED = Counter(
    "recon_node_units_unrouted",
    "Units no route matched (kept in the spool as unrouted jobs)",
    ["kind"],
    registry=REGISTRY,
)
UNITS_REJECTED = Counter(
    "recon_node_units_rejected",
    "Data refused at the edge, by protocol and reason (mrd: connections/streams; dicom: associations/instances)",
    ["kind", "reason"],
    registry=REGISTRY,
)
JOB_RUNS = Counter(
    "recon_node_job_runs",
    "Job attempts that ended, by outcome (done, retry: queued again, failed: no more attempts)",
    ["outcome"],
    registry=REGISTRY,
)
INSTANCES_SENT = Counter(
    "recon_node_instances_sent", "DICOM instances a destination accepted", ["destination"], registry=REGISTRY
)
INSTANCES_RETRIED = Counter(
    "recon_node_instance_retries",
    "Failed sends that will be retried with backoff (destination down, transient refusal)",
    ["destination"],
    registry=REGISTRY,
)
INSTANCES_FAILED = Counter(
    "recon_node_instances_failed",
    "DICOM instances that will not be delivered (refused for good, file gone, attempts used up)",
    ["destination"],
    registry=REGISTRY,
)
BUILD = Info("recon_node_build", "Version of the running recon-node", registry=REGISTRY)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recon-node")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


BUILD.info({"version": _version()})
for _s in STAGES:
    STAGE_SECONDS.labels(_s)
for _k in KINDS:
    RECEIVED_BYTES.labels(_k)
    UNITS_RECEIVED.labels(_k)
    UNITS_UNROUTED.labels(_k)
    for _r in REJECT_REASONS:
        UNITS_REJECTED.labels(_k, _r)
for _o in RUN_OUTCOMES:
    JOB_RUNS.labels(_o)


def observe_stages(seconds: Mapping[str, float]) -> None:
    """Observe each known stage of ``seconds`` (others, e.g. ``setup``, are ignored)."""
    for stage, s in seconds.items():
        if stage in STAGES:
            STAGE_SECONDS.labels(stage).observe(max(0.0, s))


def count_run(state: str) -> None:
    """A job attempt ended with the job in ``state``: done, queued (a retry follows) or failed."""
    outcome = {"done": "done", "queued": "retry", "failed": "failed"}.get(state)
    if outcome is not None:
        JOB_RUNS.labels(outcome).inc()


# ---- what the service knows at scrape time ---------------------------------------------------------------------
_bound: weakref.ReferenceType[NodeService] | None = None


def bind(service: NodeService) -> None:
    """Report this service's jobs, outbox and spool at scrape time (the last one bound wins)."""
    global _bound
    _bound = weakref.ref(service)
    for d in service.cfg.destinations:  # series at 0 from the start, so rate() and alerts see them
        for c in (INSTANCES_SENT, INSTANCES_RETRIED, INSTANCES_FAILED):
            c.labels(d.name)


def unbind(service: NodeService) -> None:
    global _bound
    if _bound is not None and _bound() is service:
        _bound = None


class _ServiceCollector(Collector):
    def collect(self) -> Iterable[Any]:
        svc = _bound() if _bound is not None else None
        if svc is None:
            return []
        out: list[Any] = []
        try:
            counts = svc.store.counts()
            jobs = GaugeMetricFamily(
                "recon_node_jobs", "Jobs in the job database by state (read at scrape time)", labels=["state"]
            )
            for state, n in counts.items():
                jobs.add_metric([state], n)
            out.append(jobs)
            out.append(
                GaugeMetricFamily("recon_node_queue_length", "Jobs waiting for a worker (queued)", counts["queued"])
            )
            out.append(
                GaugeMetricFamily(
                    "recon_node_workers_busy", "Jobs being run in this process now", getattr(svc.worker, "busy", 0)
                )
            )
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because one source did
            log.warning("metrics: cannot read the job database: %s", e)
        try:
            pending = GaugeMetricFamily(
                "recon_node_egress_pending_instances",
                "Instances in the outbox not yet delivered (pending or being sent), by destination",
                labels=["destination"],
            )
            up = GaugeMetricFamily(
                "recon_node_destination_up",
                "Result of the last check of the destination (C-ECHO, write test, GET): 1 ok, 0 failed",
                labels=["destination"],
            )
            for d in svc.egress.destination_status():
                pending.add_metric([d["name"]], d["pending"])
                if d["echo_ok"] is not None:
                    up.add_metric([d["name"]], 1 if d["echo_ok"] else 0)
            out += [pending, up]
        except Exception as e:  # noqa: BLE001
            log.warning("metrics: cannot read the outbox: %s", e)
        try:
            spool = svc.cfg.node.spool_dir
            out.append(
                GaugeMetricFamily(
                    "recon_node_spool_free_bytes",
                    "Free bytes on the spool's file system",
                    shutil.disk_usage(spool).free,
                )
            )
            out.append(
                GaugeMetricFamily(
                    "recon_node_spool_reserve_bytes",
                    "node.disk_reserve_mb in bytes: below this free space ingest refuses new data",
                    svc.cfg.node.disk_reserve_mb * 2**20,
                )
            )
        except OSError as e:
            log.warning("metrics: cannot read the spool's free space: %s", e)
        return out


REGISTRY.register(_ServiceCollector())


def render() -> tuple[bytes, str]:
    """The node's metrics in the Prometheus text exposition format: ``(body, content type)`` for ``/metrics``.

    Counters and histograms of this process, plus what the job database, the outbox and the spool's disk say now
    (read during this call; a source that cannot be read is left out and logged, the rest is still served).
    """
    return generate_latest(REGISTRY), CONTENT_TYPE


# ---- readiness ---------------------------------------------------------------------------------------------------
def readiness(service: NodeService) -> tuple[bool, dict[str, str]]:
    """Whether the node can take data now, and why: ``(ready, {check: result})`` for ``/ready``.

    Checks: ``listeners`` (started, with the ports), ``database`` (a real write to the job database, committed),
    ``spool_disk`` (free space above ``node.disk_reserve_mb``, the bound below which ingest refuses data) and one
    ``destination:<name>`` per destination (checked at least once since this start; the result is reported, but a
    destination that failed its check does not make the node unready: data is still accepted and queued durably,
    and the outbox delivers it when the destination is back). Each result starts with ``ok`` or ``failed``, or
    says ``not checked yet``.
    """
    checks: dict[str, str] = {}
    ready = True

    started = getattr(service, "started_at", None)
    if started is None or service.mrd_server is None or service.dicom_scp is None:
        ready = False
        checks["listeners"] = "failed: the node is not started"
    else:
        checks["listeners"] = f"ok: MRD port {service.mrd_server.port}, DICOM port {service.dicom_scp.port}"

    try:
        seconds = service.store.probe_write()
        checks["database"] = f"ok: {service.store.path} writable ({seconds * 1000:.0f} ms)"
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        ready = False
        checks["database"] = f"failed: cannot write {service.store.path}: {type(e).__name__}: {e}"

    from node.config import spool_space_problem

    problem = spool_space_problem(service.cfg)
    if problem:
        ready = False
        checks["spool_disk"] = f"failed: {problem}"
    else:
        free = shutil.disk_usage(service.cfg.node.spool_dir).free
        checks["spool_disk"] = (
            f"ok: {free / 2**20:.0f} MB free, node.disk_reserve_mb is {service.cfg.node.disk_reserve_mb} MB"
        )

    try:
        rows = service.egress.outbox.destination_rows()
    except Exception as e:  # noqa: BLE001
        rows = {}
        ready = False
        checks["outbox"] = f"failed: cannot read {service.egress.outbox.path}: {type(e).__name__}: {e}"
    for d in service.cfg.destinations:
        r = rows.get(d.name, {})
        at = r.get("echo_at")
        if started is None or at is None or at < started:
            ready = False
            checks[f"destination:{d.name}"] = "not checked yet"
        elif r.get("echo_ok"):
            checks[f"destination:{d.name}"] = f"ok: {d.kind} {d.target} reachable, checked {time.time() - at:.0f} s ago"
        else:
            checks[f"destination:{d.name}"] = f"failed: {d.kind} {d.target}: {r.get('last_error') or 'check failed'}"
    return ready, checks
