"""Start a real ``recon-node serve`` as a subprocess on free loopback ports, for integration tests.

    node = start_node(tmp_path, {"routes": [...]})        # spool, ports, sources filled in when absent
    ... send to node.mrd_port / node.dicom_port ...
    job = node.wait_job_state("done")                     # the first job in that state
    node.stop()                                           # SIGTERM, clean shutdown; or node.kill9()

``config_dict`` is a site config as a dict; ``node`` keys given are kept, missing ones get test defaults
(spool under tmp_path, free ports, bind 127.0.0.1, one worker, small disk reserve). When no ``sources`` are given
a loopback source ``local`` (dicom + mrd, 127.0.0.1) is added. Extra environment (e.g. PYTHONPATH for plugin
pipelines) goes in ``env``.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, config_dict: dict[str, Any]) -> Path:
    cfg = copy.deepcopy(config_dict)
    node = cfg.setdefault("node", {})
    node.setdefault("spool_dir", str(tmp_path / "spool"))
    node.setdefault("bind", "127.0.0.1")
    node.setdefault("mrd_port", free_port())
    node.setdefault("dicom_port", free_port())
    node.setdefault("ae_title", "RECON_TEST")
    node.setdefault("disk_reserve_mb", 1)
    node.setdefault("workers", 1)
    node.setdefault("threads", 1)
    node.setdefault("shutdown_grace_s", 5)
    node.setdefault("cache_dir", os.environ.get("RECON_NODE_CACHE", str(tmp_path / "cache")))
    cfg.setdefault("sources", [{"name": "local", "ae_title": "TEST_SCU", "hosts": ["127.0.0.1"],
                                "protocols": ["dicom", "mrd"]}])
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class NodeProcess:
    def __init__(self, config_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.env = env or {}
        self.spool = Path(config["node"]["spool_dir"])
        self.mrd_port = int(config["node"]["mrd_port"])
        self.dicom_port = int(config["node"]["dicom_port"])
        self.log_path = self.spool.parent / f"node-{config_path.stem}.log"
        self.proc: subprocess.Popen | None = None
        self._log_fh: Any = None
        self.starts = 0

    # ---- process control ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> NodeProcess:
        self.spool.mkdir(parents=True, exist_ok=True)
        run_file = self.spool / "run" / "node.json"
        run_file.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
        self._log_fh = open(self.log_path, "ab")
        self.starts += 1
        self._log_fh.write(f"\n==== start {self.starts} ====\n".encode())
        self._log_fh.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"recon-node serve exited with {self.proc.returncode}:\n{self.log()}")
            if run_file.exists():
                try:
                    info = json.loads(run_file.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:
                    self.mrd_port = int(info["mrd_port"])
                    if info.get("dicom_port"):
                        self.dicom_port = int(info["dicom_port"])
                    return self
            time.sleep(0.1)
        self.kill9()
        raise TimeoutError(f"recon-node serve did not start within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._close_log()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- state ------------------------------------------------------------------------------------------------
    def jobs(self) -> list[Any]:
        """All jobs, read directly from the node's database (fast; safe while the node runs)."""
        from node.jobs import JobStore

        db = Path(self.config["node"].get("database") or self.spool / "jobs.sqlite")
        if not db.exists():
            return []
        store = JobStore(db)
        try:
            return store.list()
        finally:
            store.close()

    def status_json(self) -> dict[str, Any]:
        """``recon-node status --json`` through the CLI, parsed."""
        p = self.cli("status", "--config", str(self.config_path), "--json")
        if p.returncode != 0:
            raise RuntimeError(f"recon-node status failed: {p.stderr}")
        return json.loads(p.stdout)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
        return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=str(REPO))

    def wait_job_state(self, state: str | tuple[str, ...], job_id: str | None = None, timeout: float = 60.0,
                       count: int = 1, log_has: str | None = None) -> Any:
        """Wait until ``count`` jobs (or job ``job_id``) are in ``state`` (and, with ``log_has``, their log holds that
        text: a job turns ``running`` before its worker writes the first line); returns the (first) matching job."""
        states = (state,) if isinstance(state, str) else tuple(state)
        deadline = time.monotonic() + timeout
        jobs: list[Any] = []
        while time.monotonic() < deadline:
            jobs = self.jobs()
            hits = [j for j in jobs if j.state in states and (job_id is None or j.id == job_id)
                    and (log_has is None or log_has in j.log)]
            if len(hits) >= count:
                return hits[0]
            bad = [j for j in jobs if j.state == "failed" and "failed" not in states
                   and (job_id is None or j.id == job_id)]
            if bad:
                raise AssertionError(f"job {bad[0].id} failed: {bad[0].error}\n{bad[0].log}")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the node exited ({self.proc.returncode}) while waiting:\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"no job reached {states} within {timeout} s; jobs: "
                           f"{[(j.id, j.state, j.error) for j in jobs]}\n{self.log()[-4000:]}")


def start_node(tmp_path: Path, config_dict: dict[str, Any], env: dict[str, str] | None = None,
               timeout: float = 90.0) -> NodeProcess:
    """Write the config (test defaults filled in), start ``recon-node serve``, wait until it listens."""
    path = write_config(Path(tmp_path), config_dict)
    cfg = yaml.safe_load(path.read_text())
    return NodeProcess(path, cfg, env=env).start(timeout=timeout)
