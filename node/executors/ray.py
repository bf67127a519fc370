"""``kind: ray``: every job is one Ray task on a Ray cluster; the node keeps the job store, the log and the writes.

Where what happens, and why:

- **The job store stays the record.** Threads in the node's process (``max_in_flight`` of them) claim queued jobs
  from the store exactly as the local executor does and hand each to Ray as one task (``max_retries=0``: retries
  are the store's business, counted there). A task runs :func:`node.run.compute_unit` (load, check, run the
  pipeline) on whichever Ray node has the route's ``resources`` free, and returns the outputs through Ray's object
  store together with its log lines and the stages it reached.
- **The driver writes the results.** The node (the Ray driver) writes ``<spool>/results/<job>`` itself with
  :func:`node.run.write_results` (temp folder in ``<spool>/tmp`` + rename), marks the job done and queues egress.
  Results are small next to the inputs (maps, a few MB), so moving them through the object store costs little,
  and it buys three things: the Ray nodes need only *read* the spool; a result folder is published only by the
  process that owns the job store, so the done / outbox transition stays one local step; and a task left running
  by a driver that died cannot write anything after the node restarted -- its return value goes to a driver that no
  longer exists (Ray also kills the tasks of a dead driver), while the restarted node requeues the job
  (:meth:`JobStore.recover <node.jobs.JobStore.recover>`) and runs it again; egress stays exactly once by SOP UID.
- **Inputs are read from the spool in place**: the spool must be on a path every Ray node sees at the same place
  (a shared file system; trivially true for a cluster on one machine).
- **A Ray worker that dies mid-job** (killed, out of memory, its node lost) is a node death for the job
  (:class:`node.worker.NodeLost` -> :meth:`JobStore.node_died <node.jobs.JobStore.node_died>`), not a failed
  attempt of its own: the job is queued again and delivered once.
- **A route that no node of the cluster could run** (``resources: {gpu: 1}`` on a CPU-only cluster) is not
  claimed: its jobs stay queued with ``waiting for resources: gpu ...`` in the error column of ``recon-node
  status`` until such a node joins.
- **Status**: the cluster's total and free resources go to ``<spool>/run/cluster.json`` every
  ``status_interval_s``; ``recon-node status`` prints them. Each job's ``ran_on`` names the host, the Ray node
  and the device.

Ray reuses its worker processes between CPU tasks, so module-level caches (dictionaries, network weights) stay warm
from one job to the next on the same worker. GPU jobs are another matter: they run with ``max_calls=1`` (Ray's
default for GPU functions: the worker ends after each one, so that GPU memory is given back and a reused process
never holds a CUDA context for another GPU than the one it is given next), so each GPU job pays a worker start and
its weights' load (a few seconds: see BENCHMARKS.md). The next step is long-lived actors, one per GPU, keyed by
the route's resources, that keep weights and dictionaries resident; it needs eviction of idle actors when another
resource shape is waiting (idle actors hold their CPUs / GPU and would otherwise starve it), which is why it was
not done in the first cut. Only this module imports ``ray`` (the optional ``ray`` extra).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from node.config import RayExecutorSettings, SiteConfig
from node.executors import resources_text
from node.jobs import Job, JobStore
from node.run import Computed, RunOutcome, RunRequest, compute_unit, write_results
from node.worker import NodeLost, Worker, error_text

log = logging.getLogger("recon-node.executor")

# config name -> Ray resource name (memory in bytes)
_RESOURCE_NAMES = {"cpu": "CPU", "gpu": "GPU", "memory_gb": "memory"}


@dataclass
class RayTask:
    """What travels to the Ray worker: the run request (paths on the shared spool), the job, and how to set up."""

    request: RunRequest
    job: Job
    allow_partial: bool
    plugins: list[str]
    threads: int


@dataclass
class RayReply:
    """What comes back: the computed outputs or the error, plus the job's log lines and where it ran."""

    computed: Computed | None = None
    error: BaseException | None = None
    traceback: str = ""
    stages: list[str] = field(default_factory=list)
    logs: list[tuple[int, str]] = field(default_factory=list)
    ran_on: str = ""


class _Lines(logging.Handler):
    def __init__(self, lines: list[tuple[int, str]]) -> None:
        super().__init__(level=logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append((record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - logging must never break a job
            pass


def run_task(task: RayTask) -> RayReply:
    """The body of the Ray task (runs on a Ray worker): set up, compute, never raise; writes nothing."""
    from node.worker import check_input_complete, host_label
    from pipelines.compute import set_threads

    reply = RayReply()
    jlog = logging.Logger(f"job {task.job.id}")
    jlog.addHandler(_Lines(reply.logs))
    try:
        for module in task.plugins:  # site pipelines register themselves on import
            importlib.import_module(module)
        set_threads(task.threads)

        def check(study: Any) -> None:
            note = check_input_complete(task.job, study, task.allow_partial)
            if note:
                jlog.warning("%s", note)

        reply.computed = compute_unit(task.request, log=jlog, check=check, on_stage=reply.stages.append)
        reply.ran_on = host_label(reply.computed.device)
    except Exception as e:  # noqa: BLE001 - sent back; the node classifies it
        reply.traceback = traceback.format_exc()
        try:
            pickle.dumps(e)
            reply.error = e
        except Exception:  # noqa: BLE001 - an exception that cannot travel travels as text
            reply.error = RuntimeError(error_text(e))
    try:
        node_id = ray.get_runtime_context().get_node_id()
        reply.ran_on = f"{reply.ran_on or socket.gethostname()} (ray node {node_id[:8]})"
    except Exception:  # noqa: BLE001 - a label, never a failure
        pass
    return reply


def run_gpu_task(task: RayTask) -> RayReply:
    """:func:`run_task` for jobs with ``gpu > 0``: its own remote function so that it gets Ray's GPU default,
    ``max_calls=1`` (decided when a function is decorated, not by ``.options(num_gpus=...)``)."""
    return run_task(task)


_remote_run_task = ray.remote(run_task)
_remote_run_gpu_task = ray.remote(max_calls=1)(run_gpu_task)


def route_needs(cfg: SiteConfig, route: str | None) -> dict[str, float]:
    """The Ray resources one job of ``route`` asks for."""
    r = next((r for r in cfg.routes if r.name == route), None)
    if r is None:
        return {"CPU": 1.0}
    res = r.resources
    need = {"CPU": float(res.cpu), "GPU": float(res.gpu), "memory": float(res.memory_gb) * 2**30}
    return {k: v for k, v in need.items() if v > 0}


def missing_resources(need: dict[str, float], nodes: list[dict[str, Any]]) -> list[str]:
    """The resources (config names) no single alive node of the cluster has enough of for ``need``; [] when some
    node could run it (maybe later, when it is free)."""
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in need.items()) for res in alive):
        return []
    names = {v: k for k, v in _RESOURCE_NAMES.items()}
    return [names.get(k, k) for k, v in need.items() if not any(res.get(k, 0.0) >= v for res in alive)] or sorted(
        names.get(k, k) for k in need
    )


def _describe(need: dict[str, float]) -> str:
    parts = []
    for k, v in need.items():
        parts.append(f"memory {v / 2**30:g} GB" if k == "memory" else f"{k.lower()} {v:g}")
    return ", ".join(parts)


class RayExecutor(Worker):
    """``max_in_flight`` claim threads; each runs one job at a time as a Ray task and writes its results here."""

    def __init__(self, cfg: SiteConfig, store: JobStore) -> None:
        super().__init__(cfg, store)
        settings = cfg.node.executor
        assert isinstance(settings, RayExecutorSettings)
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._monitor_wake = threading.Event()
        self._connected = threading.Event()
        self._threads: list[threading.Thread] = []
        self._waiting: dict[str, str] = {}  # route -> "waiting for resources: ..." note
        self._lock = threading.Lock()
        self.connect_error: str | None = None

    # ---- Executor ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        t = threading.Thread(target=self._monitor, name="ray-monitor", daemon=True)
        t.start()
        self._threads.append(t)
        for i in range(self.settings.max_in_flight):
            t = threading.Thread(target=self._loop, name=f"ray-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: Job | None = None) -> None:
        self._wake.set()
        self._monitor_wake.set()  # a job of a route the cluster cannot run gets its note now, not in a while

    def stop(self, timeout: float | None = None) -> bool:
        self._stop.set()
        self._wake.set()
        self._monitor_wake.set()
        deadline = time.monotonic() + (self.cfg.node.shutdown_grace_s if timeout is None else timeout)
        # the monitor may hang in ray.init (an address with no cluster): only the claim threads run jobs
        claimers = [t for t in self._threads if t.name != "ray-monitor"]
        for t in claimers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        stopped = not any(t.is_alive() for t in claimers)
        (self.cfg.node.spool_dir / "run" / "cluster.json").unlink(missing_ok=True)  # status: no stale cluster
        if stopped and ray.is_initialized():
            ray.shutdown()
        # else: the jobs still running stay ``running`` in the store; the next start requeues them, and Ray ends
        # the tasks of this driver when its process exits
        return stopped

    # ---- where the work happens -------------------------------------------------------------------------------
    def compute(
        self, job: Job, req: RunRequest, jlog: logging.Logger, check: Any, stage: list[str]
    ) -> tuple[RunOutcome, str]:
        with self._lock:
            waiting = self._waiting.get(job.route or "")
        if waiting:  # only the MRD in-line path gets here with such a job; the claim loop skips them
            raise RuntimeError(waiting)
        if not self._connected.wait(timeout=60.0):
            raise NodeLost(f"not connected to the Ray cluster at {self.settings.address}: {self.connect_error}")
        r = next((r for r in self.cfg.routes if r.name == job.route), None)
        need = route_needs(self.cfg, job.route)
        task = RayTask(
            request=req,
            job=job,
            allow_partial=bool(r is not None and r.allow_partial),
            plugins=list(self.cfg.node.plugins),
            threads=max(1, round(need.get("CPU", 1.0))),  # torch threads = the CPUs Ray gave the task
        )
        options: dict[str, Any] = {
            "num_cpus": need.get("CPU", 0.0),
            "num_gpus": need.get("GPU", 0.0),
            "max_retries": 0,  # the job store counts and retries
            "name": f"recon-job {job.id}",
        }
        if need.get("memory"):
            options["memory"] = int(need["memory"])
        remote = _remote_run_gpu_task if need.get("GPU") else _remote_run_task
        ref = remote.options(**options).remote(task)
        jlog.info("submitted to Ray as task %s (%s)", ref.task_id().hex()[:16], _describe(need))
        try:
            while not ray.wait([ref], timeout=2.0)[0]:
                with self._lock:
                    waiting = self._waiting.get(job.route or "")
                if waiting:  # the nodes that could run it left: the task can only be pending; take it back
                    ray.cancel(ref, force=True)
                    raise NodeLost(f"no node of the Ray cluster can run this job any more: {waiting}")
            reply: RayReply = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the task raised outside run_task's guard (e.g. unpickling)
            raise RuntimeError(f"Ray task failed: {error_text(e.cause or e)}") from None
        except ray.exceptions.RayError as e:  # worker killed, node lost, object lost, cancelled
            raise NodeLost(f"the Ray worker running this job went away ({error_text(e)})") from None
        for level, message in reply.logs:
            jlog.log(level, "%s", message)
        stage.extend(reply.stages)
        if reply.error is not None or reply.computed is None:
            self.log_line(job.id, f"on {reply.ran_on}:\n{reply.traceback}")
            raise reply.error or RuntimeError("the Ray task returned nothing")
        stage.append("write")
        return write_results(req, reply.computed, log=jlog), reply.ran_on

    # ---- threads ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._connected.wait(timeout=1.0):
                continue
            with self._lock:
                skip = set(self._waiting)
            self.claim_and_run(self._wake, skip_routes=skip)

    def _connect(self) -> bool:
        s = self.settings
        again = f" again after: {self.connect_error}" if self.connect_error else ""
        self._write_cluster_file(None, f"connecting{again}")
        runtime_env = dict(s.runtime_env or {})
        if "env_vars" not in runtime_env and os.environ.get("PYTHONPATH"):
            runtime_env["env_vars"] = {"PYTHONPATH": os.environ["PYTHONPATH"]}  # site plugins, like the node
        try:
            ray.init(
                address=s.address,
                namespace=s.namespace,
                runtime_env=runtime_env or None,
                logging_level=logging.WARNING,
                ignore_reinit_error=True,
            )
        except Exception as e:  # noqa: BLE001 - keep queueing; say why nothing runs
            if self.connect_error != error_text(e):
                log.error("cannot connect to the Ray cluster at %s: %s (retrying)", s.address, error_text(e))
            self.connect_error = error_text(e)
            return False
        self.connect_error = None
        log.info("connected to the Ray cluster at %s: %s", s.address, resources_text(ray.cluster_resources()))
        return True

    def _monitor(self) -> None:
        """Connect (retrying), then every ``status_interval_s``: which routes the cluster cannot run, notes on their
        queued jobs, and ``<spool>/run/cluster.json``."""
        while not self._stop.is_set():
            if not self._connected.is_set() and not self._connect():
                self._write_cluster_file(None, self.connect_error)
                self._monitor_wake.wait(5.0)
                self._monitor_wake.clear()
                continue
            try:
                nodes = ray.nodes()
                self._update_waiting(nodes)
                self._write_cluster_file(nodes)
            except Exception as e:  # noqa: BLE001 - status is best effort; jobs keep running
                log.warning("cannot read the Ray cluster's state: %s", error_text(e))
            self._connected.set()  # only now: the claim threads must know which routes to skip before they claim
            self._monitor_wake.wait(self.settings.status_interval_s)
            self._monitor_wake.clear()

    def _update_waiting(self, nodes: list[dict[str, Any]]) -> None:
        waiting: dict[str, str] = {}
        for r in self.cfg.routes:
            need = route_needs(self.cfg, r.name)
            missing = missing_resources(need, nodes)
            if missing:
                waiting[r.name] = (
                    f"waiting for resources: {', '.join(missing)} (route {r.name!r} needs {_describe(need)}; no "
                    f"node of the Ray cluster has it; it runs when one joins)"
                )
        with self._lock:
            before, self._waiting = self._waiting, waiting
        queued = self.store.list(state="queued")
        for route, note in waiting.items():
            if self.store.note_waiting([j.id for j in queued if j.route == route], note):
                log.warning("%s", note)
        cleared = [j.id for j in queued if j.route in before and j.route not in waiting]
        if cleared and self.store.note_waiting(cleared, None):
            self._wake.set()

    def _write_cluster_file(self, nodes: list[dict[str, Any]] | None, error: str | None = None) -> None:
        info: dict[str, Any] = {"time": time.time(), "address": self.settings.address, "connected": nodes is not None}
        if nodes is None:
            info["error"] = error
        else:
            info["nodes"] = [
                {"host": n.get("NodeManagerHostname"), "id": n.get("NodeID"), "resources": n.get("Resources")}
                for n in nodes
                if n.get("Alive")
            ]
            info["total"] = ray.cluster_resources()
            info["available"] = ray.available_resources()
            with self._lock:
                info["waiting"] = dict(self._waiting)
        run = self.cfg.node.spool_dir / "run"
        run.mkdir(exist_ok=True)
        tmp = run / "cluster.json.partial"
        tmp.write_text(json.dumps(info, default=str))
        os.replace(tmp, run / "cluster.json")


EXECUTOR = RayExecutor
