"""Runs jobs: claim, load the unit, run the pipeline (one GPU job at a time, CPU fallback), write results atomically.

Results of job ``J`` go to ``<spool>/results/J/`` (``maps.npz`` and/or ``images.npz``, ``summary.json``, one DICOM
series per output under ``dicom/``); they are written to ``<spool>/tmp/`` first and renamed into place, so a
result folder is either complete or absent. Each ``on_done`` hook is called as ``hook(job, outputs, out_dir)``
after the job is marked done (egress plugs in here); a failing hook is logged in the job log, the job stays done.

Failures are classified: a deterministic one (unknown pipeline, bad parameters, a template error, an input that
cannot be read, incomplete input, any :class:`PermanentJobError`) fails the job at once, since running it again
would fail the same way; anything else (I/O, memory, CUDA) is retried up to ``node.max_attempts``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import SiteConfig
from node.durable import fsync_dir
from node.jobs import Job, JobStore

log = logging.getLogger("recon-node.worker")

DoneHook = Callable[[Job, list[Any], Path], None]


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
    n_sched = len(seq.flip_angles_deg) if seq is not None and getattr(seq, "flip_angles_deg", None) is not None \
        else None
    problem = raw_completeness(header, study.frame, study.slice, n_sched).problem()
    if problem is None:
        return None
    if allow_partial:
        return f"{problem}; processed anyway (the route allows partial data)"
    raise PermanentJobError(f"{problem}; the route {job.route!r} does not allow partial data (send the whole scan, "
                            "or set `allow_partial: true` on the route and `recon-node retry` the job)")


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


class _JobLogHandler(logging.Handler):
    def __init__(self, store: JobStore, job_id: str) -> None:
        super().__init__(level=logging.INFO)
        self.store, self.job_id = store, job_id
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.store.append_log(self.job_id, self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break a job
            pass


def job_logger(store: JobStore, job: Job) -> tuple[logging.Logger, _JobLogHandler]:
    """A logger whose lines go to the job's log in the database and to the node's log (named by job + source)."""
    lg = logging.Logger(f"job {job.id} [{job.source or '-'}]")
    lg.parent = logging.getLogger("recon-node.job")
    handler = _JobLogHandler(store, job.id)
    lg.addHandler(handler)
    return lg, handler


def error_text(e: BaseException) -> str:
    """``Type: first line`` of an exception: what goes in the job's error column."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_unit(kind: str, path: Path, allow_partial: bool = False, jlog: logging.Logger | None = None) -> Any:
    """The job's input as a RawStudy / ImageStudy. ``allow_partial`` (the route's): a DICOM series with fewer
    frames than its instances declare is read anyway (the reader refuses it otherwise -- issue 15 item 4)."""
    if not path.exists():
        raise FileNotFoundError(f"the job's input {path} is missing from the spool (deleted by hand or by retention?)")
    if kind == "mrd":
        from pipelines.io.mrd_reader import raw_study_from_hdf5

        return raw_study_from_hdf5(path)
    from pipelines.io.dicom_reader import image_study_from_dicom

    return image_study_from_dicom(path, allow_partial=allow_partial, logger=jlog)


def source_references(study: Any) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of the instances an ImageStudy came from (none for raw data)."""
    cls = str(getattr(study, "sop_class_uid", "") or "")
    uids = list(getattr(study, "sop_instance_uids", None) or [])
    return [(cls, str(u)) for u in uids if u] if cls else []


def write_results(outputs: list[Any], study_info: Any, final: Path, tmp_root: Path, job_id: str,
                  summary: dict[str, Any], *, references: list[tuple[str, str]] | None = None,
                  templates_dir: Path | None = None, parametric_map: bool = False,
                  jlog: logging.Logger | None = None) -> Path:
    """maps.npz / images.npz, DICOM series and summary.json into ``final``, via a temp folder and a rename.
    ``jlog``: the job's log (warnings about the input's UIDs replaced in the outputs go there).

    ``references`` (source instances), ``templates_dir`` (site templates) and ``parametric_map`` go to
    :func:`node.egress.dicom_writer.write_outputs`.
    """
    import numpy as np

    from node.egress.dicom_writer import write_outputs
    from pipelines.types import QuantitativeMap, ReconImage

    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_root / f"result-{job_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        maps = {o.kind: o.data for o in outputs if isinstance(o, QuantitativeMap)}
        images = {o.kind: o.data for o in outputs if isinstance(o, ReconImage)}
        if maps:
            units = {f"{o.kind}_unit": np.array(o.unit) for o in outputs if isinstance(o, QuantitativeMap)}
            np.savez(tmp / "maps.npz", **maps, **units)
        if images:
            np.savez(tmp / "images.npz", **images)
        files = write_outputs(outputs, study_info, tmp / "dicom", job_id=job_id, references=references,
                              templates_dir=templates_dir, parametric_map=parametric_map, logger=jlog)
        summary = {**summary, "dicom_files": len(files), "outputs": [
            {"kind": o.kind, "shape": list(o.data.shape), "unit": getattr(o, "unit", ""),
             "description": o.description, "notes": list(o.notes)} for o in outputs]}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an earlier attempt got this far before the node stopped; results are deterministic
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class Worker:
    """``cfg.node.workers`` threads that claim and run queued jobs. ``execute(job)`` runs one claimed job."""

    def __init__(self, cfg: SiteConfig, store: JobStore) -> None:
        self.cfg = cfg
        self.store = store
        self.on_done: list[DoneHook] = []
        self.gpu_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()

    # ---- threads -------------------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.cfg.node.workers):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def notify(self) -> None:
        """A job was queued: wake the workers now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming; wait up to ``timeout`` s for running jobs. False when some are still running."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + (self.cfg.node.shutdown_grace_s if timeout is None else timeout)
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def busy(self) -> int:
        return self._busy

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim()
            except Exception as e:  # noqa: BLE001 - e.g. database locked for too long; keep serving
                log.error("cannot claim a job from %s: %s", self.store.path, error_text(e))
                job = None
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self.execute(job)

    # ---- one job -------------------------------------------------------------------------------------------
    def _device(self, jlog: logging.Logger) -> Any:
        import torch

        pref = self.cfg.node.device
        if pref in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda")
        if pref == "cuda":
            jlog.warning("device cuda is configured but no CUDA GPU is available; running on CPU")
        return torch.device("cpu")

    def _run_pipeline(self, spec: Any, study: Any, params: dict[str, Any], jlog: logging.Logger) -> tuple[list[Any], str]:
        import torch

        from pipelines.registry import RunContext

        device = self._device(jlog)
        cache = self.cfg.node.cache_dir
        if device.type == "cuda":
            with self.gpu_lock:
                try:
                    return spec(study, params, RunContext(device=device, cache_dir=cache, log=jlog)), "cuda"
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    jlog.warning("CUDA out of memory, ran on CPU")
        return spec(study, params, RunContext(device=torch.device("cpu"), cache_dir=cache, log=jlog)), "cpu"

    def execute(self, job: Job) -> JobResult:
        """Run a job that is already ``running`` (claimed); mark it done / requeued / failed. Never raises."""
        from pipelines.registry import get_pipeline

        with self._busy_lock:
            self._busy += 1
        jlog, handler = job_logger(self.store, job)
        t0 = time.perf_counter()
        stage = "setup"
        try:
            jlog.info("attempt %d (%d failed before, limit %d; node stopped during it %d time(s), limit %d): "
                      "pipeline %s on %s unit %s (route %s)", job.attempts, job.attempts - 1 - job.node_deaths,
                      self.cfg.node.max_attempts, job.node_deaths, self.cfg.node.max_node_deaths, job.pipeline,
                      job.kind, Path(job.unit_path).name, job.route)
            try:
                spec = get_pipeline(job.pipeline or "")
                params = spec.resolve_params(job.params)
                stage = "load"
                r = next((r for r in self.cfg.routes if r.name == job.route), None)
                study = load_unit(job.kind, Path(job.unit_path), bool(r is not None and r.allow_partial), jlog)
                stage = "check"
                note = check_input_complete(job, study, bool(r is not None and r.allow_partial))
                if note:
                    jlog.warning("%s", note)
                stage = "run"
                outputs, device = self._run_pipeline(spec, study, params, jlog)
                stage = "write"
                final = self.cfg.node.results_dir / job.id
                write_results(outputs, study.study, final, self.cfg.node.tmp_dir, job.id, summary={
                    "job": job.id, "source": job.source, "route": job.route, "pipeline": job.pipeline,
                    "params": params, "device": device, "input": job.unit_path,
                    "seconds": round(time.perf_counter() - t0, 3)}, references=source_references(study),
                    templates_dir=self.cfg.node.templates_dir, parametric_map=self.cfg.node.parametric_map,
                    jlog=jlog)
            except Exception as e:  # noqa: BLE001 - a job's failure must never stop the node
                err = error_text(e)
                permanent = is_permanent(e, stage)
                jlog.error("failed while %s: %s%s", {"setup": "preparing", "load": "reading the input",
                                                    "check": "checking the input", "run": "running the pipeline",
                                                    "write": "writing the results"}[stage], err,
                           " (deterministic: not retried)" if permanent else "")
                self.store.append_log(job.id, traceback.format_exc())
                state = self.store.fail(job.id, err, self.cfg.node.max_attempts, permanent=permanent)
                jlog.info("job is now %s%s", state, " (will be retried)" if state == "queued" else
                          f" after {job.attempts} attempt(s); input kept at {job.unit_path}")
                if state == "queued":
                    self.notify()
                return JobResult(job.id, state, error=err)
            self.store.finish(job.id, final)
            jlog.info("done in %.1f s on %s: %d output(s) -> %s", time.perf_counter() - t0, device, len(outputs), final)
            done = self.store.get(job.id) or job
            for hook in list(self.on_done):
                try:
                    hook(done, outputs, final)
                except Exception as e:  # noqa: BLE001
                    jlog.error("on_done hook %s failed: %s", getattr(hook, "__name__", hook), error_text(e))
            return JobResult(job.id, "done", outputs=outputs, out_dir=final)
        finally:
            jlog.removeHandler(handler)
            with self._busy_lock:
                self._busy -= 1
