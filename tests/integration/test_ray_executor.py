"""``node.executor.kind: ray`` on a two-node Ray cluster on loopback (issue 19): studies reach Orthanc exactly once;
a Ray worker killed mid-job is a node death and the job is delivered once; the node killed with a job on the
cluster resumes it after a restart, still once; a route that needs a GPU on a CPU-only cluster waits, queued,
saying so in ``recon-node status``, and runs once a node with a GPU joins.

One cluster for the module (``ray start`` head + one more node, 1 CPU each, temp folder under pytest's tmp; stopped
by pid, never ``ray stop``). Skipped when the ``ray`` extra is not installed."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason='the ray extra is not installed (pip install "recon-node[ray]")')

from orthanc_harness import start_orthanc  # noqa: E402

from node.ingest.mrd_client import send_study  # noqa: E402
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study  # noqa: E402
from tests.integration.node_harness import start_node  # noqa: E402
from tests.integration.ray_harness import start_cluster  # noqa: E402
from tests.integration.test_node_restart import SLOW_PLUGIN  # noqa: E402  (the restart test's slow pipeline)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray-plugins")
    (d / "slow_plugin.py").write_text(textwrap.dedent(SLOW_PLUGIN))
    return d


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("ray") / "t", n_nodes=2, cpus_per_node=1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def study(short_fisp):
    return simulate_study("brain", short_fisp, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50), matrix=32)


def _ray_node(cluster, tmp_path: Path, routes: list[dict], plugin_dir: Path, extra: dict | None = None):
    config = {
        "node": {
            "plugins": ["slow_plugin"],
            "max_attempts": 2,
            "executor": {"kind": "ray", "address": cluster.address, "max_in_flight": 2, "status_interval_s": 1},
        },
        "routes": routes,
        **(extra or {}),
    }
    return start_node(tmp_path, config, env={"PYTHONPATH": str(plugin_dir)})


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_studies_reach_orthanc_once_through_worker_and_node_kills(tmp_path, cluster, plugin_dir, study):
    orthanc = start_orthanc(tmp_path)
    routes = [{"name": "slow", "match": {"input": "mrd"}, "pipeline": "slow_frames", "params": {"seconds": 3},
               "send_to": ["orthanc"]}]
    extra = {
        "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "egress": {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10},
    }
    node = _ray_node(cluster, tmp_path, routes, plugin_dir, extra)
    try:
        def send() -> str:
            said = [o for o in send_study(study, "127.0.0.1", node.mrd_port, timeout=60) if isinstance(o, str)]
            return said[0].split()[1]

        # 1. two studies on the two Ray nodes; the Ray worker of the first killed mid-job: a node death, run again
        first, second = send(), send()
        node.wait_job_state("running", job_id=first, timeout=60, log_has="submitted to Ray")
        pids = _wait(lambda: cluster.worker_pids(f"recon-job {first}"), 60, f"the Ray worker of {first}")
        os.kill(pids[0], signal.SIGKILL)
        for job_id in (first, second):
            node.wait_job_state(("done", "sent"), job_id=job_id, timeout=90)

        # 2. the node (the Ray driver) killed while a job runs on the cluster: resumed after the restart
        third = send()
        node.wait_job_state("running", job_id=third, timeout=60, log_has="submitted to Ray")
        _wait(lambda: cluster.worker_pids(f"recon-job {third}"), 60, f"the Ray worker of {third}")
        node.kill9()
        node.start()

        ids = [first, second, third]
        for job_id in ids:
            node.wait_job_state("sent", job_id=job_id, timeout=120)
        jobs = {j.id: j for j in node.jobs()}
        assert (jobs[first].node_deaths, jobs[first].attempts) == (1, 2), jobs[first].log
        assert "went away" in jobs[first].log
        assert (jobs[second].node_deaths, jobs[second].attempts) == (0, 1), jobs[second].log
        assert (jobs[third].node_deaths, jobs[third].attempts) == (1, 2), jobs[third].log
        assert all("(ray node " in (j.ran_on or "") and " cpu" in (j.ran_on or "") for j in jobs.values()), [
            j.ran_on for j in jobs.values()
        ]

        # every output instance in the PACS exactly once
        expected = sum(
            json.loads((node.spool / "results" / i / "summary.json").read_text())["dicom_files"] for i in ids
        )
        uids = orthanc.sop_instance_uids()
        assert expected > 0 and len(uids) == expected == len(set(uids))

        status = node.status_json()
        assert status["cluster"]["connected"] and len(status["cluster"]["nodes"]) == 2
        text = node.cli("status", "--config", str(node.config_path)).stdout
        assert "ray cluster " in text and "2 node(s)" in text and "RAN ON" in text, text
        assert node.stop() == 0
    finally:
        node.kill9()
        orthanc.stop()


def test_gpu_route_on_a_cpu_cluster_waits_with_a_clear_status_until_a_gpu_node_joins(
    tmp_path, cluster, plugin_dir, study
):
    routes = [{"name": "gpu", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
               "params": {"frames": "0"}, "resources": {"gpu": 1, "cpu": 1}}]
    node = _ray_node(cluster, tmp_path, routes, plugin_dir)
    try:
        said = [o for o in send_study(study, "127.0.0.1", node.mrd_port, timeout=60) if isinstance(o, str)]
        job_id = said[0].split()[1]
        job = _wait(
            lambda: next(
                (j for j in node.jobs() if j.id == job_id and (j.error or "").startswith("waiting for resources: gpu")),
                None,
            ),
            30,
            "the waiting note",
        )
        assert job.state == "queued" and job.attempts == 0
        text = node.cli("status", "--config", str(node.config_path)).stdout
        assert "waiting for resources: gpu" in text and "queued" in text, text
        time.sleep(1.5)  # still waiting, never claimed
        assert [(j.state, j.attempts) for j in node.jobs()] == [("queued", 0)]

        cluster.add_node(cpus=1, gpus=1)  # a node with a GPU joins (declared: torch finds no CUDA and uses the CPU)
        done = node.wait_job_state("done", job_id=job_id, timeout=90)
        assert done.attempts == 1 and done.error is None and "(ray node " in done.ran_on
        assert node.status_json()["cluster"]["total"].get("GPU") == 1
        assert node.stop() == 0
    finally:
        node.kill9()
