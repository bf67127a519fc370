"""Executor plug-ins: what runs the node's queued jobs, one module per ``node.executor.kind`` of the site config.

The job store (:mod:`node.jobs`) stays the record of every job (state, attempts, node deaths, errors, log); an
executor only decides where and when a job runs. It claims queued jobs from the store and runs each with
:meth:`node.worker.Worker.run_now` (bookkeeping in the node's process; :meth:`~node.worker.Worker.compute` does the
work, here or elsewhere), and is told when the service queues a job (``submit``). Job logs reach the store through
a callback (:meth:`~node.worker.Worker.log_line`), never a database handle inside the job. The service sees only
:class:`Executor`:

- ``local`` (default): ``node.workers`` threads in the node's process (:mod:`node.executors.local`);
- ``ray``: one Ray task per job on a Ray cluster (:mod:`node.executors.ray`; the ``ray`` extra).

A new kind is one module here that sets ``EXECUTOR`` to its class, plus one model in the ``node.executor`` union of
:mod:`node.config`.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from node.config import SiteConfig
    from node.jobs import Job, JobStore
    from node.worker import DoneHook, JobResult


class Executor(Protocol):
    on_done: list[DoneHook]  # completion callbacks: hook(job, outputs, out_dir, instances) after a job is done

    def start(self) -> None:
        """Start claiming and running queued jobs."""

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming; wait up to ``timeout`` s (default ``node.shutdown_grace_s``). False if jobs still run."""

    def submit(self, job: Job | None = None) -> None:
        """A job was queued (``job``, or None: some job): claim it now instead of at the next poll."""

    def run_now(self, job: Job) -> JobResult:
        """Run one already claimed job and wait for it (the MRD server's in-line replies); never raises."""

    @property
    def busy(self) -> int:
        """Jobs running now."""


def make_executor(cfg: SiteConfig, store: JobStore) -> Executor:
    kind = cfg.node.executor.kind
    module = importlib.import_module(f"{__name__}.{kind}")
    return module.EXECUTOR(cfg, store)


def resources_text(total: dict[str, Any], free: dict[str, Any] | None = None) -> str:
    """``CPU 1/2, GPU 0/0, memory 1.2/3.4 GB, object store 0.2/0.4 GB free`` (without ``free``: totals only)."""
    parts = []
    for key, label in (("CPU", "CPU"), ("GPU", "GPU"), ("memory", "memory"), ("object_store_memory", "object store")):
        t = float(total.get(key, 0.0))
        scale, unit = (2**30, " GB") if key in ("memory", "object_store_memory") else (1, "")
        avail = "" if free is None else f"{float(free.get(key, 0.0)) / scale:.3g}/"
        amount = f"{avail}{t / scale:.3g}{unit}"
        parts.append(f"{label} {amount}")
    return ", ".join(parts) + ("" if free is None else " free")


def cluster_status(spool_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """What a cluster executor last wrote to ``<spool>/run/cluster.json`` and a line for people (None, None when
    there is no such file: the local executor). Read by ``recon-node status`` in another process."""
    path = spool_dir / "run" / "cluster.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    age = f"as of {max(0.0, time.time() - float(info.get('time', 0))):.0f} s ago"
    if not info.get("connected"):
        return info, f"ray cluster {info.get('address')}: not connected ({info.get('error')}; {age})"
    line = (
        f"ray cluster {info.get('address')}: {len(info.get('nodes') or [])} node(s); "
        f"{resources_text(info.get('total') or {}, info.get('available') or {})} ({age})"
    )
    return info, line
