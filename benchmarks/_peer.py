"""Helpers shared by the benchmarks: thread-bounded worker subprocesses, and mrpro in a peer venv.

mrpro is *not* a project dependency. The benchmarks that compare against it run it in a separate virtual
environment (default /work/bench-venv, see the docstring of benchmarks/epg.py for how to set it up) by starting the
benchmark script itself with that venv's python and a worker flag; data travel through temporary .npy files and the
worker answers with one JSON line on stdout.

With the CPU torch wheel the torchvision that pip picks for mrpro does not load (``torchvision::nms does not
exist``); only mrpro's brainweb phantom uses it, so :func:`import_mrpro` puts empty stub modules in ``sys.modules``
first. This module imports nothing but the standard library so that both venvs can load it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = "/work/bench-venv/bin/python"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def stub_torchvision() -> None:
    """Make ``import torchvision`` harmless where the installed torchvision cannot load."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken torchvision raises RuntimeError / OSError / ImportError
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
        sys.modules["torchvision.transforms"].functional = sys.modules[  # type: ignore[attr-defined]
            "torchvision.transforms.functional"]


def import_mrpro():
    """``import mrpro`` (after :func:`stub_torchvision`)."""
    stub_torchvision()
    import mrpro

    return mrpro


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """The current environment with every OpenMP / BLAS pool bounded to ``threads`` and the repo importable."""
    env = dict(os.environ)
    for var in _THREAD_VARS:
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def peer_python(path: str | None = None) -> str | None:
    """The peer venv's python if it exists."""
    p = Path(path or DEFAULT_PEER_PYTHON)
    return str(p) if p.exists() else None


def run_json(python: str, script: str | Path, args: list[str], threads: int, timeout: float | None = None) -> dict:
    """Run ``python script *args`` with bounded threads; return the last JSON line it printed (or an error)."""
    try:
        proc = subprocess.run([python, str(script), *args], capture_output=True, text=True, cwd=str(REPO),
                              env=thread_env(threads), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-400:]
        return {"error": f"worker failed (rc {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def maxrss_mib() -> float:
    """``ru_maxrss`` (KiB on Linux) in MiB.

    Caveat: Linux carries ru_maxrss across execve (it starts at the parent's RSS at fork time), so in a worker
    started by a big parent it is a floor, not this process's own peak; :func:`peak_rss_mib` is.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> float:
    """Current resident set size in MiB (VmRSS; 0 where unavailable)."""
    v = _status_kib("VmRSS")
    return v / 1024.0 if v is not None else 0.0


def peak_rss_mib() -> float:
    """Peak RSS of this process's address space in MiB (VmHWM; falls back to ru_maxrss)."""
    v = _status_kib("VmHWM")
    return v / 1024.0 if v is not None else maxrss_mib()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
