"""kill -9 of the node in the middle of a job: on restart the job completes; nothing lost, nothing duplicated.
Also: a unit stored before the kill but without a job (kill between rename and insert) gets its job."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from node.ingest.mrd_client import send_study
from tests.integration.node_harness import start_node

pytestmark = pytest.mark.integration

SLOW_PLUGIN = '''
"""Test plugin: cartesian_frames after a pause, so a test can kill the node in the middle of a job."""
import time

from pipelines.definitions import get_pipeline
from pipelines.registry import Param, PipelineSpec, register


def _run(raw, params, ctx):
    ctx.log.info("sleeping %.1f s", params["seconds"])
    time.sleep(params["seconds"])
    frames = get_pipeline("cartesian_frames")
    return frames.run(raw, frames.resolve_params({"frames": "0,1"}), ctx)


register(PipelineSpec(name="slow_frames", input_kind="raw", summary="test: sleep, then cartesian_frames",
                      run=_run, params={"seconds": Param(float, 1.0, "pause before the work")}))
'''


def test_kill9_mid_job_then_restart_completes_once(tmp_path, short_fisp):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "slow_plugin.py").write_text(textwrap.dedent(SLOW_PLUGIN))
    study = simulate_study("brain", short_fisp, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50),
                           matrix=32)
    config = {"node": {"plugins": ["slow_plugin"], "max_attempts": 3},
              "routes": [{"name": "slow", "match": {"input": "mrd"}, "pipeline": "slow_frames",
                          "params": {"seconds": 4}}]}
    env = {"PYTHONPATH": str(plugin_dir)}
    node = start_node(tmp_path, config, env=env)
    try:
        said = [o for o in send_study(study, "127.0.0.1", node.mrd_port, timeout=60) if isinstance(o, str)]
        job_id = said[0].split()[1]
        job = node.wait_job_state("running", job_id=job_id, timeout=30, log_has="sleeping")
        assert job.attempts == 1
        node.kill9()
        assert [j.state for j in node.jobs()] == ["running"]  # what the killed node left behind
        # a unit that reached the spool but whose job insert never happened (no sidecar, no row)
        orphan = node.spool / "units" / "mrd-orphan.h5"
        shutil.copy(job.unit_path, orphan)
        node.start()
        done = node.wait_job_state("done", job_id=job_id, timeout=60)
        assert done.attempts == 2 and "was running" not in (done.error or "")
        other = node.wait_job_state("done", count=2, timeout=60)
        jobs = node.jobs()
        assert len(jobs) == 2 and {j.unit_path for j in jobs} == {job.unit_path, str(orphan)}, jobs
        assert other.state == "done"
        assert sorted(p.name for p in (node.spool / "results").iterdir()) == sorted(j.id for j in jobs)
        assert [p for p in (node.spool / "tmp").rglob("*") if p.is_file()] == []  # (the SCP keeps tmp/dicom-rx/)
        assert (node.spool / "results" / job_id / "images.npz").exists()
        assert done.log.count("attempt ") == 2
        st = node.status_json()
        assert st["counts"]["done"] == 2 and st["counts"]["running"] == 0
        assert node.stop() == 0
        assert "stopped" in node.log()
    finally:
        node.kill9()
