"""Ray executor vs local threads (issue 19): per-job overhead and the throughput of N small studies.

    OMP_NUM_THREADS=1 python benchmarks/ray_executor.py [--studies 6] [--repeats 5] [--work /tmp/raybench]

What it runs, all in this process as the node would (the executor's own claim threads, the job store, the
driver-side writes), on Ray clusters it starts on loopback and stops by pid (tests/integration/ray_harness.py):

1. **per-job overhead**: a trivial job (``cartesian_frames``, one frame of a 16x16, 12-TR, 2-coil study) run
   ``--repeats`` times with ``run_now`` after one warm-up job, with the local executor and on a 1-node Ray cluster;
   overhead = median Ray wall - median local wall (submission, scheduling, moving input path and outputs through
   Ray's object store, the log lines back).
2. **throughput**: ``--studies`` queued jobs (``cartesian_frames``, all 200 frames of a 32x32, 2-coil study, one
   DICOM series of 200 instances written per job) run by: the local executor with 2 worker threads; Ray, one node
   with 2 CPUs; Ray, two nodes with 1 CPU each. Every setup has 2 job slots on the same 2 cores, so the numbers
   should be about flat: the point is the cost of the machinery, not a speed-up.
3. **memory**: peak RSS of this process (the driver; includes the local runs) and the largest peak (VmHWM) of the
   Ray worker processes.

The summary table at the end is what BENCHMARKS.md records, with the load average printed first (the numbers are
only comparable on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.ray_harness import RayCluster, start_cluster  # noqa: E402


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _units(work: Path, name: str, matrix: int, n_tr: int, copies: int) -> list[Path]:
    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import write_ismrmrd

    s = fisp_sequence()
    seq = MRFSequence(f"fisp{n_tr}", s.flip_angles_deg[:n_tr], s.tr_ms[:n_tr], s.te_ms[:n_tr], ti_ms=s.ti_ms)
    study = simulate_study("brain", seq, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50), matrix=matrix)
    first = write_ismrmrd(study, work / f"{name}-0.h5")
    out = [first]
    for i in range(1, copies):  # one unit path per job (the store keys jobs by unit path)
        out.append(Path(shutil.copy(first, work / f"{name}-{i}.h5")))
    return out


def _config(spool: Path, executor: dict[str, Any], workers: int = 1) -> Any:
    from node.config import parse_config

    return parse_config(
        {
            "node": {
                "spool_dir": str(spool),
                "disk_reserve_mb": 1,
                "workers": workers,
                "threads": 1,
                "executor": executor,
                "shutdown_grace_s": 30,
            },
            "routes": [
                {"name": "tiny", "pipeline": "cartesian_frames", "params": {"frames": "0"}},
                {"name": "small", "pipeline": "cartesian_frames", "params": {"frames": "all"}},
            ],
        },
        check_pipelines=False,
    )


def _executor(cfg: Any) -> Any:
    from node.executors import make_executor
    from node.jobs import JobStore

    for d in (cfg.node.spool_dir, cfg.node.results_dir, cfg.node.tmp_dir):
        d.mkdir(parents=True, exist_ok=True)
    store = JobStore(cfg.node.database_path, max_attempts=1)
    return make_executor(cfg, store), store


def overhead(cfg: Any, units: list[Path], repeats: int) -> dict[str, Any]:
    """Wall time of ``run_now`` on already claimed trivial jobs: the first (cold) and the median of the rest."""
    ex, store = _executor(cfg)
    ex.start()
    walls = []
    try:
        for unit in units[: repeats + 1]:
            job, _ = store.create(
                unit, "mrd", route="tiny", pipeline="cartesian_frames", params={"frames": "0"}, claim=True
            )
            t0 = time.perf_counter()
            result = ex.run_now(job)
            walls.append(time.perf_counter() - t0)
            if not result.ok:
                raise RuntimeError(f"{job.id} {result.state}: {result.error}\n{store.get(job.id).log}")
        ran_on = store.get(job.id).ran_on
    finally:
        ex.stop()
        store.close()
    return {"cold_s": walls[0], "median_s": statistics.median(walls[1:]), "walls_s": walls, "ran_on": ran_on}


def _wait_done(store: Any, n: int) -> dict[str, int]:
    while True:
        counts = store.counts()
        if counts["done"] + counts["failed"] >= n:
            return counts
        time.sleep(0.05)


def throughput(cfg: Any, units: list[Path], warmup: list[Path], cluster: RayCluster | None = None) -> dict[str, Any]:
    """``len(units)`` queued jobs, after ``warmup`` trivial jobs (worker processes started, modules imported); wall
    time from queueing the first until the last is done."""
    ex, store = _executor(cfg)
    ex.start()
    for unit in warmup:
        store.create(unit, "mrd", route="tiny", pipeline="cartesian_frames", params={"frames": "0"})
    ex.submit()
    _wait_done(store, len(warmup))
    peak_worker = 0
    t0 = time.perf_counter()
    try:
        for unit in units:
            store.create(unit, "mrd", route="small", pipeline="cartesian_frames", params={"frames": "all"})
        ex.submit()
        counts = _wait_done(store, len(warmup) + len(units))
        wall = time.perf_counter() - t0
        if counts["failed"]:
            bad = store.list(state="failed")[0]
            raise RuntimeError(f"{bad.id} failed: {bad.error}\n{bad.log}")
        if cluster is not None:
            peak_worker = _worker_peak_rss(cluster)
        jobs = [j for j in store.list() if j.route == "small"]
        per_job = [j.finished - j.started for j in jobs if j.finished and j.started]
        ran_on = sorted({j.ran_on or "" for j in jobs})
    finally:
        ex.stop()
        store.close()
    return {
        "wall_s": wall,
        "studies_per_hour": len(units) / wall * 3600,
        "job_median_s": statistics.median(per_job),
        "ran_on": ran_on,
        "worker_peak_rss_mb": peak_worker / 1024 if peak_worker else None,
    }


def _worker_peak_rss(cluster: RayCluster) -> int:
    """The largest VmHWM (kB) of this cluster's Ray worker processes (not the raylets, agents or GCS)."""
    peak = 0
    for pid in cluster.pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if not cmd.startswith("ray::") or "Agent" in cmd:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/raybench"))
    args = ap.parse_args()
    import ray
    import torch

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} logical CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(f"load average at start: {_load()}", flush=True)
    tiny = _units(args.work, "tiny", matrix=16, n_tr=12, copies=args.repeats + 1 + 2)
    warm = tiny[-2:]  # two warm-up jobs before each throughput run: one per job slot
    small = _units(args.work, "small", matrix=32, n_tr=200, copies=args.studies)
    results: dict[str, Any] = {"load_start": _load()}

    results["overhead_local"] = overhead(_config(args.work / "ov-local", {"kind": "local"}), tiny, args.repeats)
    results["throughput_local"] = throughput(_config(args.work / "tp-local", {"kind": "local"}, workers=2), small, warm)
    print("local done", flush=True)
    for n_nodes, cpus in ((1, 2), (2, 1)):
        tag = f"ray{n_nodes}"
        cluster = start_cluster(args.work / f"ray-{n_nodes}", n_nodes=n_nodes, cpus_per_node=cpus)
        try:
            ray_exec = {"kind": "ray", "address": cluster.address, "max_in_flight": 2, "status_interval_s": 2}
            if n_nodes == 1:
                results["overhead_ray"] = overhead(_config(args.work / "ov-ray", ray_exec), tiny, args.repeats)
            results[f"throughput_{tag}"] = throughput(_config(args.work / f"tp-{tag}", ray_exec), small, warm, cluster)
        finally:
            cluster.stop()
        print(f"{tag} done", flush=True)
    results["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["load_end"] = _load()
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))

    ol, orr = results["overhead_local"], results["overhead_ray"]
    print("\n== per-job overhead: trivial job (cartesian_frames, 1 frame, 16x16), run_now, warm")
    print(f"{'executor':<28}{'cold first job s':>18}{'median s':>12}")
    print(f"{'local (thread)':<28}{ol['cold_s']:>18.3f}{ol['median_s']:>12.3f}")
    print(f"{'ray (1 node)':<28}{orr['cold_s']:>18.3f}{orr['median_s']:>12.3f}")
    print(f"Ray overhead per job (median ray - median local): {orr['median_s'] - ol['median_s']:.3f} s")
    print(
        f"\n== throughput, warm: {args.studies} studies (cartesian_frames, 200 frames, 32x32, 2 coils, 200 DICOM "
        "each), after 2 warm-up jobs"
    )
    print(f"{'executor':<34}{'wall s':>9}{'studies/h':>11}{'job median s':>14}{'worker peak RSS MB':>20}")
    for key, label in (
        ("throughput_local", "local, 2 threads"),
        ("throughput_ray1", "ray, 1 node x 2 CPUs"),
        ("throughput_ray2", "ray, 2 nodes x 1 CPU"),
    ):
        r = results[key]
        rss = f"{r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] else "-"
        print(f"{label:<34}{r['wall_s']:>9.1f}{r['studies_per_hour']:>11.0f}{r['job_median_s']:>14.2f}{rss:>20}")
    print(f"\ndriver (this process) peak RSS: {results['driver_peak_rss_mb']:.0f} MB")
    print(f"load average: start {results['load_start']}, end {results['load_end']}")
    print(f"ran on: {results['throughput_ray2']['ran_on']}")
    print(f"results: {args.work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
