"""Executors (issue 19): the job-store pieces a cluster executor needs (``ran_on``, skipping routes it cannot run,
the waiting note, a lost worker as a node death), the ``node.executor`` union and its check, the status line."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from node.config import ConfigError, RayExecutorSettings, parse_config
from node.jobs import JobStore
from node.worker import NodeLost, Worker


def _site(tmp_path: Path, executor: dict | None = None, routes: list[dict] | None = None):
    node = {"spool_dir": str(tmp_path / "spool"), "disk_reserve_mb": 1}
    if executor is not None:
        node["executor"] = executor
    return parse_config({"node": node, "routes": routes or []}, check_pipelines=False)


def test_old_database_gets_the_ran_on_column(tmp_path):
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                     "unit_path TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, source TEXT NOT NULL DEFAULT '', route TEXT, "
                     "pipeline TEXT, params TEXT NOT NULL DEFAULT '{}', send_to TEXT NOT NULL DEFAULT '[]', "
                     "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, log TEXT NOT NULL "
                     "DEFAULT '', result_dir TEXT, attributes TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, "
                     "updated REAL NOT NULL, started REAL, finished REAL);"
                     "INSERT INTO jobs (id, unit_path, kind, state, attempts, created, updated) "
                     "VALUES ('j-old', '/u/old', 'mrd', 'running', 1, 0, 0);")
    db.commit()
    db.close()
    s = JobStore(path)
    assert s.get("j-old").ran_on is None and s.get("j-old").node_deaths == 0
    s.finish("j-old", "/r/old", ran_on="host cpu")
    assert s.get("j-old").ran_on == "host cpu" and s.get("j-old").to_dict()["ran_on"] == "host cpu"
    JobStore(path).close()  # a second open finds the columns there


def test_claim_skips_routes_and_waiting_jobs_carry_a_note(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    gpu, _ = s.create("/u/1", "mrd", route="gpu", pipeline="p")
    cpu, _ = s.create("/u/2", "mrd", route="cpu", pipeline="p")
    assert s.note_waiting([gpu.id, cpu.id], "waiting for resources: gpu (x)") == 2
    assert s.note_waiting([gpu.id], "waiting for resources: gpu (x)") == 0  # unchanged: not rewritten
    assert s.claim(skip_routes={"gpu"}).id == cpu.id
    assert s.get(cpu.id).error is None  # the claim ends the wait, and its note
    assert s.note_waiting([cpu.id], "waiting for resources: gpu (x)") == 0  # a running job is not noted again
    assert s.claim(skip_routes={"gpu"}) is None
    assert s.note_waiting([gpu.id], None) == 1 and s.get(gpu.id).error is None
    assert s.claim().id == gpu.id


def test_a_lost_worker_is_a_node_death_not_a_failed_attempt(tmp_path):
    cfg = _site(tmp_path)
    store = JobStore(tmp_path / "jobs.sqlite", max_attempts=1, max_node_deaths=2)

    class Remote(Worker):
        def compute(self, job, req, jlog, check, stage):
            jlog.warning("computing elsewhere")
            raise NodeLost("the Ray worker running this job went away (WorkerCrashedError: killed)")

    job, _ = store.create("/u/1", "mrd", route="r", pipeline="p")
    result = Remote(cfg, store).run_now(store.claim())
    j = store.get(job.id)
    assert (result.state, j.state, j.attempts, j.node_deaths) == ("queued", "queued", 1, 1)
    assert "went away" in j.error and "(1 of 2 node stops)" in j.error
    assert "computing elsewhere" in j.log  # the job's log went through the executor's callback
    result = Remote(cfg, store).run_now(store.claim())  # max_attempts 1 is not used up by node deaths...
    j = store.get(job.id)
    assert (j.state, j.node_deaths) == ("failed", 2) and "node.max_node_deaths is 2" in j.error  # ...this limit is
    assert store.node_died(job.id, "late") == "failed"  # not running any more: unchanged


def test_executor_kinds_and_the_missing_extra(tmp_path, monkeypatch):
    assert _site(tmp_path).node.executor.kind == "local"
    assert _site(tmp_path, {}).node.executor.kind == "local"
    ray_cfg = _site(tmp_path, {"kind": "ray", "address": "10.0.0.5:6379", "max_in_flight": 8},
                    routes=[{"name": "r", "pipeline": "p", "resources": {"gpu": 1, "cpu": 4, "memory_gb": 16}}])
    assert isinstance(ray_cfg.node.executor, RayExecutorSettings) and ray_cfg.node.executor.max_in_flight == 8
    assert ray_cfg.routes[0].resources.gpu == 1 and ray_cfg.routes[0].resources.memory_gb == 16
    with pytest.raises(ConfigError, match="unknown executor kind"):
        _site(tmp_path, {"kind": "slurm"})
    with pytest.raises(ConfigError, match="gpus"):
        _site(tmp_path, routes=[{"name": "r", "pipeline": "p", "resources": {"gpus": 1}}])

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        _site(tmp_path, {"kind": "ray"})
    key, message, hint = e.value.problems[0]
    assert key == "node.executor.kind" and "ray" in message and 'pip install "recon-node[ray]"' in hint
    _site(tmp_path, {"kind": "local"})  # the default needs no ray


def test_cluster_status_line(tmp_path):
    from node.executors import cluster_status

    assert cluster_status(tmp_path) == (None, None)  # local executor: no file
    (tmp_path / "run").mkdir()
    info = {"time": time.time(), "address": "127.0.0.1:6379", "connected": True, "nodes": [{}, {}],
            "total": {"CPU": 2.0, "GPU": 0.0, "memory": 4 * 2**30, "object_store_memory": 2**30},
            "available": {"CPU": 1.0, "memory": 2 * 2**30, "object_store_memory": 2**29}}
    (tmp_path / "run" / "cluster.json").write_text(json.dumps(info))
    got, line = cluster_status(tmp_path)
    assert got == info
    assert line.startswith("ray cluster 127.0.0.1:6379: 2 node(s); CPU 1/2, GPU 0/0, memory 2/4 GB, object store")
    (tmp_path / "run" / "cluster.json").write_text(json.dumps({"time": 0, "address": "auto", "connected": False,
                                                                "error": "ConnectionError: no cluster"}))
    assert "not connected (ConnectionError: no cluster" in cluster_status(tmp_path)[1]


def test_routes_the_cluster_cannot_run():
    pytest.importorskip("ray", reason='the ray extra is not installed (pip install "recon-node[ray]")')
    from node.executors.ray import missing_resources

    cpu_node = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 8 * 2**30}}
    gpu_node = {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0, "memory": 8 * 2**30}}
    dead_gpu = {**gpu_node, "Alive": False}
    assert missing_resources({"CPU": 1.0}, [cpu_node]) == []
    assert missing_resources({"CPU": 1.0, "GPU": 1.0}, [cpu_node, dead_gpu]) == ["gpu"]
    assert missing_resources({"CPU": 1.0, "GPU": 1.0}, [cpu_node, gpu_node]) == []
    # every resource exists somewhere, but not together on one node
    assert missing_resources({"CPU": 4.0, "GPU": 1.0}, [cpu_node, gpu_node]) == ["cpu", "gpu"]
    assert missing_resources({"CPU": 1.0, "memory": 16.0 * 2**30}, [cpu_node]) == ["memory_gb"]


def test_the_local_executor_records_where_a_job_ran(tmp_path):
    import socket

    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import write_ismrmrd

    s = fisp_sequence()
    seq = MRFSequence("fisp12", s.flip_angles_deg[:12], s.tr_ms[:12], s.te_ms[:12], ti_ms=s.ti_ms)
    study = simulate_study("brain", seq, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50), matrix=16)
    unit = write_ismrmrd(study, tmp_path / "unit.h5")
    cfg = _site(tmp_path, routes=[{"name": "r", "pipeline": "cartesian_frames", "params": {"frames": "0"}}])
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.create(unit, "mrd", route="r", pipeline="cartesian_frames", params={"frames": "0"})
    result = Worker(cfg, store).run_now(store.claim())
    assert result.ok, store.get(job.id).log
    assert store.get(job.id).ran_on == f"{socket.gethostname()} cpu"
