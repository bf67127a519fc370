"""Runs one claimed job: :func:`node.run.run_unit` (load the unit, run the pipeline -- one GPU job at a time, CPU
fallback -- and write the results atomically), then mark the job done, requeued or failed. Which jobs run where
and when is the executor's business (:mod:`node.executors`; ``local`` threads by default).

Results of job ``J`` go to ``<spool>/results/J/`` (``maps.npz`` and/or ``images.npz``, ``summary.json``, one DICOM
series per output under ``dicom/``); they are written to ``<spool>/tmp/`` first and renamed into place, so a
result folder is either complete or absent. Each ``on_done`` hook is called as
``hook(job, outputs, out_dir, instances)`` (``instances``: what the DICOM writer returned) after the job is marked
done (egress plugs in here); a failing hook is logged in the job log, the job stays done.

Failures are classified: a deterministic one (unknown pipeline, bad parameters, a template error, an input that
cannot be read, incomplete input, any :class:`PermanentJobError`) fails the job at once, since running it again
would fail the same way; anything else (I/O, memory, CUDA) is retried up to ``node.max_attempts``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node import metrics
from node.config import SiteConfig
from node.cores import CoreShare
from node.jobs import Job, JobStore
from node.run import RunOutcome, RunRequest, run_unit
from node.study_b1 import study_b1_reference
from pipelines.compute import thread_budget

log = logging.getLogger("recon-node.worker")

DoneHook = Callable[[Job, list[Any], Path, list[Any]], None]


class PermanentJobError(Exception):
    """A failure that the same input, route and config reproduce: the job fails at once, without retries."""


# Errors that say the input, the parameters or a template are wrong: deterministic, never retried.
_DETERMINISTIC = (ValueError, TypeError, KeyError, IndexError, LookupError, NotImplementedError)


def is_permanent(e: BaseException, stage: str) -> bool:
    """Whether ``e``, raised while ``stage`` (setup, load, check, run, write), would happen again on a retry."""
    if isinstance(e, PermanentJobError):
        return True
    if isinstance(e, (MemoryError, OSError)) and not isinstance(e, FileNotFoundError):
        return False  # out of memory, disk full, a share that went away: may pass on the next attempt
    if stage in ("setup", "load", "check"):
        return isinstance(e, (*_DETERMINISTIC, FileNotFoundError))
    # in the pipeline and the writer, CUDA and torch report transient trouble as RuntimeError: retry those
    return isinstance(e, _DETERMINISTIC) and not isinstance(e, RuntimeError)


def check_input_complete(job: Job, study: Any, allow_partial: bool) -> str | None:
    """For raw (MRD) input: frames / slices / readouts against the header and schedule. Returns a warning when
    incomplete but allowed; raises :class:`PermanentJobError` when incomplete and the route does not allow it."""
    from pipelines.types import RawStudy

    if not isinstance(study, RawStudy):
        return None
    import ismrmrd.xsd as x

    from node.ingest.units import raw_completeness

    header = x.CreateFromDocument(study.header_xml.encode("utf-8"))
    seq = getattr(study, "sequence", None)
    n_sched = (
        len(seq.flip_angles_deg) if seq is not None and getattr(seq, "flip_angles_deg", None) is not None else None
    )
    problem = raw_completeness(header, study.frame, study.slice, n_sched).problem()
    if problem is None:
        return None
    if allow_partial:
        return f"{problem}; processed anyway (the route allows partial data)"
    raise PermanentJobError(
        f"{problem}; the route {job.route!r} does not allow partial data (send the whole scan, "
        "or set `allow_partial: true` on the route and `recon-node retry` the job)"
    )


@dataclass
class JobResult:
    job_id: str
    state: str  # done, queued (will be retried), failed
    outputs: list[Any] = field(default_factory=list)
    out_dir: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "done"


LogLine = Callable[[str], None]  # takes one formatted line of a job's log ("LEVEL message")


class _JobLogHandler(logging.Handler):
    def __init__(self, write: LogLine) -> None:
        super().__init__(level=logging.INFO)
        self.write = write
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break a job
            pass


def job_logger(job: Job, write: LogLine) -> tuple[logging.Logger, _JobLogHandler]:
    """A logger whose lines go to ``write`` (the node: the job's log in the database) and to the node's log (named
    by job + source). The job itself never holds a database handle: an executor may run it on another machine."""
    lg = logging.Logger(f"job {job.id} [{job.source or '-'}]")
    lg.parent = logging.getLogger("recon-node.job")
    handler = _JobLogHandler(write)
    lg.addHandler(handler)
    return lg, handler


class NodeLost(Exception):
    """The process or machine running a job went away (an executor's worker killed, a cluster node lost): the
    job is retried as after a node death (``node_deaths``), not charged a failed attempt of its own."""


def host_label(device: str) -> str:
    """Where a job ran, for the ``ran_on`` column: ``host cpu``, ``host cuda:0 (NVIDIA H200)``."""
    if device.startswith("cuda"):
        try:
            import torch

            i = torch.cuda.current_device()
            device = f"cuda:{i} ({torch.cuda.get_device_name(i)})"
        except Exception:  # noqa: BLE001 - a label, never a failure
            pass
    return f"{socket.gethostname()} {device}"


def error_text(e: BaseException) -> str:
    """``Type: first line`` of an exception: what goes in the job's error column."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class Worker:
    """Runs one claimed job: ``run_now(job)``. Executors (:mod:`node.executors`) decide where and when; one that
    computes elsewhere overrides :meth:`compute` and keeps the bookkeeping here."""

    def __init__(self, cfg: SiteConfig, store: JobStore) -> None:
        self.cfg = cfg
        self.store = store
        self.on_done: list[DoneHook] = []
        self.gpu_lock = threading.Lock()
        self.cores = CoreShare(thread_budget(cfg.node.threads))
        self._busy = 0
        self._busy_lock = threading.Lock()

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, job: Job | None = None) -> None:
        """A job was (re)queued. A bare worker claims nothing itself; executors wake their claim loop here."""

    def claim_and_run(self, wake: threading.Event, skip_routes: Collection[str] = ()) -> None:
        """One step of an executor's claim loop: claim a queued job (not of ``skip_routes``) and run it; with none
        queued, wait up to a second for ``wake`` (set by :meth:`submit`)."""
        try:
            job = self.store.claim(skip_routes=skip_routes)
        except Exception as e:  # noqa: BLE001 - e.g. database locked for too long; keep serving
            log.error("cannot claim a job from %s: %s", self.store.path, error_text(e))
            job = None
        if job is None:
            wake.wait(1.0)
            wake.clear()
            return
        self.run_now(job)

    def log_line(self, job_id: str, line: str) -> None:
        """Where a job's log lines go: the job's log in the database."""
        self.store.append_log(job_id, line)

    def compute(
        self, job: Job, req: RunRequest, jlog: logging.Logger, check: Callable[[Any], None], stage: list[str]
    ) -> tuple[RunOutcome, str]:
        """Run and write one job here (threads in the node's process) on its share of the node's CPU threads
        (:mod:`node.cores`); returns the outcome and ``ran_on``."""
        with self.cores.job() as n:
            jlog.info("CPU threads: %d of %d (%d job(s) running)", n, self.cores.total, self.cores.running)
            threads = [n]

            def rebalance(phase: str) -> None:
                now = self.cores.apply()
                if now != threads[-1]:
                    jlog.info(
                        "CPU threads: %d of %d for %s (%d job(s) running)",
                        now,
                        self.cores.total,
                        phase,
                        self.cores.running,
                    )
                    threads.append(now)

            outcome = run_unit(
                req, log=jlog, check=check, on_stage=stage.append, gpu_lock=self.gpu_lock, on_phase=rebalance
            )
        return outcome, host_label(outcome.device)

    # ---- one job -------------------------------------------------------------------------------------------
    def run_now(self, job: Job) -> JobResult:
        """Run a job that is already ``running`` (claimed); mark it done / requeued / failed. Never raises."""
        with self._busy_lock:
            self._busy += 1
        jlog, handler = job_logger(job, lambda line: self.log_line(job.id, line))
        t0 = time.perf_counter()
        stage = ["setup"]
        if job.attempts == 1 and job.started is not None:  # created -> first claimed (0 for in-line MRD jobs)
            metrics.STAGE_SECONDS.labels("queue_wait").observe(max(0.0, job.started - job.created))
        try:
            jlog.info(
                "attempt %d (%d failed before, limit %d; node stopped during it %d time(s), limit %d): "
                "pipeline %s on %s unit %s (route %s)",
                job.attempts,
                job.attempts - 1 - job.node_deaths,
                self.cfg.node.max_attempts,
                job.node_deaths,
                self.cfg.node.max_node_deaths,
                job.pipeline,
                job.kind,
                Path(job.unit_path).name,
                job.route,
            )
            try:
                r = next((r for r in self.cfg.routes if r.name == job.route), None)
                allow_partial = bool(r is not None and r.allow_partial)

                def check(study: Any) -> None:
                    note = check_input_complete(job, study, allow_partial)
                    if note:
                        jlog.warning("%s", note)

                node = self.cfg.node
                outcome, ran_on = self.compute(
                    job,
                    RunRequest(
                        input=Path(job.unit_path),
                        pipeline=job.pipeline or "",
                        params=job.params,
                        out_dir=node.results_dir / job.id,
                        job_id=job.id,
                        kind=job.kind,
                        tmp_root=node.tmp_dir,
                        device=node.device,
                        device_fallback=True,
                        cache_dir=node.cache_dir,
                        allow_partial=allow_partial,
                        templates_dir=node.templates_dir,
                        parametric_map=node.parametric_map,
                        summary={"job": job.id, "source": job.source, "route": job.route},
                        b1_reference=study_b1_reference(self.store, job, jlog),
                    ),
                    jlog,
                    check,
                    stage,
                )
            except NodeLost as e:
                state = self.store.node_died(job.id, error_text(e))
                metrics.count_run(state)
                jlog.warning("%s; job is now %s", error_text(e), state)
                if state == "queued":
                    self.submit()
                return JobResult(job.id, state, error=error_text(e))
            except Exception as e:  # noqa: BLE001 - a job's failure must never stop the node
                err = error_text(e)
                permanent = is_permanent(e, stage[-1])
                jlog.error(
                    "failed while %s: %s%s",
                    {
                        "setup": "preparing",
                        "load": "reading the input",
                        "check": "checking the input",
                        "run": "running the pipeline",
                        "write": "writing the results",
                    }[stage[-1]],
                    err,
                    " (deterministic: not retried)" if permanent else "",
                )
                self.log_line(job.id, traceback.format_exc())
                state = self.store.fail(job.id, err, self.cfg.node.max_attempts, permanent=permanent)
                metrics.count_run(state)
                jlog.info(
                    "job is now %s%s",
                    state,
                    " (will be retried)"
                    if state == "queued"
                    else f" after {job.attempts} attempt(s); input kept at {job.unit_path}",
                )
                if state == "queued":
                    self.submit()
                return JobResult(job.id, state, error=err)
            final = outcome.out_dir
            self.store.finish(job.id, final, ran_on=ran_on)
            metrics.count_run("done")
            metrics.observe_stages(outcome.timings)
            jlog.info(
                "done in %.1f s on %s: %d output(s) -> %s",
                time.perf_counter() - t0,
                ran_on,
                len(outcome.outputs),
                final,
            )
            done = self.store.get(job.id) or job
            for hook in list(self.on_done):
                try:
                    hook(done, outcome.outputs, final, outcome.instances)
                except Exception as e:  # noqa: BLE001
                    jlog.error("on_done hook %s failed: %s", getattr(hook, "__name__", hook), error_text(e))
            return JobResult(job.id, "done", outputs=outcome.outputs, out_dir=final)
        finally:
            jlog.removeHandler(handler)
            with self._busy_lock:
                self._busy -= 1
