"""A Ray cluster on loopback for tests and benchmarks: a head and ``n_nodes - 1`` more nodes on this machine.

    cluster = start_cluster(tmp_path / "ray", n_nodes=2)    # RayCluster(address="127.0.0.1:PORT", temp_dir=...)
    ... node config: {"executor": {"kind": "ray", "address": cluster.address}} ...
    cluster.stop()                                          # only this cluster's processes

``stop`` ends the processes whose command line names this cluster's temp folder (every node of a cluster started
here writes its session there) and their children, by pid: never ``ray stop``, which stops every Ray process of
the machine, other people's included. Extra environment for the nodes (``PYTHONPATH`` for plugin pipelines: Ray
workers inherit the raylet's environment) goes in ``env``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    n_nodes: int

    def pids(self) -> list[int]:
        """This cluster's processes (head, raylets, their workers), found by the temp folder in their arguments."""
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
        mine = {int(r[0]) for r in rows if len(r) == 3 and str(self.temp_dir) in r[2]}
        children = {int(r[0]) for r in rows if len(r) >= 2 and int(r[1]) in mine}
        return sorted((mine | children) - {os.getpid()})

    def worker_pids(self, name: str) -> list[int]:
        """Pids of Ray worker processes now running a task whose name contains ``name`` (title ``ray::<name>``)."""
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        mine = set(self.pids())
        return [
            int(line.split(None, 1)[0])
            for line in out.splitlines()
            if line.strip() and "ray::" in line and name in line and int(line.split(None, 1)[0]) in mine
        ]

    def add_node(self, cpus: int = 1, gpus: int = 0) -> None:
        """One more node joins (``gpus`` declared, not checked: on a machine without GPUs torch still finds none, so
        a job scheduled there runs on the CPU; enough to test scheduling)."""
        cmd = [RAY, "start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus)]
        cmd += ["--num-gpus", str(gpus), "--object-store-memory", "200000000"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
        self.n_nodes += 1

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5.0
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = self.pids()
            if not pids:
                return


def start_cluster(
    temp_dir: Path, n_nodes: int = 2, cpus_per_node: int = 1, env: dict[str, str] | None = None
) -> RayCluster:
    """``ray start --head`` on 127.0.0.1 (free port, no dashboard, small object store), then ``n_nodes - 1`` more
    nodes joining it; each node has ``cpus_per_node`` CPUs and no GPU."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    common = ["--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--object-store-memory", "200000000"]
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, n_nodes=n_nodes)
    try:
        head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
        head += ["--include-dashboard", "false", "--temp-dir", str(temp_dir), "--disable-usage-stats", *common]
        subprocess.run(head, check=True, capture_output=True, env=full_env, timeout=120)
        for _ in range(n_nodes - 1):
            worker = [RAY, "start", "--address", cluster.address, "--node-ip-address", "127.0.0.1", *common]
            subprocess.run(worker, check=True, capture_output=True, env=full_env, timeout=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster
