"""``kind: local`` (the default): ``node.workers`` threads in the node's process claim and run queued jobs."""

from __future__ import annotations

import logging
import threading
import time

from node.config import SiteConfig
from node.jobs import Job, JobStore
from node.worker import Worker

log = logging.getLogger("recon-node.executor")


class LocalExecutor(Worker):
    """Threads around :meth:`Worker.execute`; GPU jobs share the worker's lock (one GPU job at a time)."""

    def __init__(self, cfg: SiteConfig, store: JobStore) -> None:
        super().__init__(cfg, store)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.cfg.node.workers):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: Job | None = None) -> None:
        self._wake.set()  # the claim loop takes queued jobs in order; ``job`` is not needed to find it

    def stop(self, timeout: float | None = None) -> bool:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + (self.cfg.node.shutdown_grace_s if timeout is None else timeout)
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.claim_and_run(self._wake)


EXECUTOR = LocalExecutor
