"""The node's CPU threads shared among the jobs that run at once in its process (``executor: local``).

Each thread that runs torch work has its own OpenMP team, sized by that thread's ``torch.set_num_threads``. Two
workers that each kept the process's full count would run 2 x N threads on N cores (and finufft, which takes the
calling thread's count, as many again). libgomp throttles its spinning once a process's teams outnumber the cores,
so the cost is modest: benchmarks/concurrent_jobs.py, two raw MRF jobs at once on 2 cores, 3.6 -> 3.3 s at 64²
and 8.8 -> 8.6 s at 128² with the share. So every job takes
``threads // running`` (at least 1) when it starts and again at each phase of its pipeline (reconstruction,
mapping): a job alone has every core, two share them, and a job that outlives its neighbour takes the freed cores
back at its next phase. finufft and the matcher read the calling thread's count, so they follow.

Ray tasks are not counted here: each runs in its own worker process with the threads its route asks for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CoreShare:
    """Splits ``total`` CPU threads evenly among the jobs registered with :meth:`job`."""

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self._running = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        return self._running

    def fair(self) -> int:
        """Threads for one job now: the total split among the running jobs (at least 1)."""
        return max(1, self.total // max(1, self._running))

    def apply(self) -> int:
        """Set the calling thread's torch threads to :meth:`fair`; returns it."""
        n = self.fair()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)  # this thread's OpenMP team; other threads keep theirs
        return n

    @contextmanager
    def job(self) -> Iterator[int]:
        """Count the calling thread's job as running for the block; yields its threads (already applied)."""
        with self._lock:
            self._running += 1
        try:
            yield self.apply()
        finally:
            with self._lock:
                self._running -= 1
