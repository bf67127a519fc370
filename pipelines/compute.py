"""Where computation runs: the one device policy and the one CPU-thread policy of the node, the CLI, the trainers
and the benchmarks (they all used to carry their own copy).
"""

from __future__ import annotations

import logging
import os

import torch


def select_device(
    preference: str | torch.device = "auto", *, fallback_log: logging.Logger | None = None
) -> torch.device:
    """The torch device for ``preference``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    CUDA asked for but absent is an error that says so -- unless ``fallback_log`` is given (a running node, whose
    site config names the device): then the job runs on the CPU and the warning goes there.
    """
    if str(preference) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {str(preference)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        if fallback_log is None:
            raise ValueError(
                f"device {str(preference)!r} was requested but no CUDA GPU is available (use 'auto' or 'cpu')"
            )
        fallback_log.warning("device %s is configured but no CUDA GPU is available; running on CPU", preference)
        return torch.device("cpu")
    return device


def thread_budget(n: int | None = None) -> int:
    """The CPU threads a process may use: ``n``, else ``OMP_NUM_THREADS``, else every core."""
    return max(1, n or int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or (os.cpu_count() or 1))


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU threads to :func:`thread_budget` (``n``). Returns the number set."""
    n = thread_budget(n)
    torch.set_num_threads(n)
    return n
