"""Executor plug-ins: what runs the node's queued jobs, one module per ``node.executor.kind`` of the site config.

An executor claims queued jobs from the job store and runs each with :meth:`node.worker.Worker.execute` (or its
equivalent elsewhere), and wakes up when the service says a job was queued. The service sees only
:class:`Executor`; ``local`` (threads in the node's process) is the default. A new kind is one module here that
sets ``EXECUTOR`` to its class, plus one model in the ``node.executor`` union of :mod:`node.config`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from node.config import SiteConfig
    from node.jobs import Job, JobStore
    from node.worker import DoneHook, JobResult


class Executor(Protocol):
    on_done: list[DoneHook]

    def start(self) -> None:
        """Start claiming and running queued jobs."""

    def notify(self) -> None:
        """A job was queued: look now instead of at the next poll."""

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming; wait up to ``timeout`` s (default ``node.shutdown_grace_s``). False if jobs still run."""

    def execute(self, job: Job) -> JobResult:
        """Run one already claimed job here and now (the MRD server's in-line replies); never raises."""

    @property
    def busy(self) -> int:
        """Jobs running now."""


def make_executor(cfg: SiteConfig, store: JobStore) -> Executor:
    kind = cfg.node.executor.kind
    module = importlib.import_module(f"{__name__}.{kind}")
    return module.EXECUTOR(cfg, store)
