"""A measured B1 series reaches the raw MRF job of its own study, and no other, through a running node.

The scanner's B1 map (a tfl_b1map-like series, sent with DCMTK's storescu) is routed to ``b1_map``; the raw MRF
stream of the same study (``ismrmrd`` over the MRD port) is reconstructed with B1 held at it, and its B1 map
output reads the measured B1 (here the truth, noise-free) instead of the field estimated from the fingerprints. A
raw stream of another study is matched without it; and a raw job waits for a B1 series sent after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node.ingest.mrd_client import send_study
from pipelines.physics.sequences import fisp_sequence
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.b1_series import simulate_b1_series, write_b1_series
from tests.integration.node_harness import start_node
from tests.integration.test_end_to_end import NODE_AE, STORESCU, one_torch_thread

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.5151"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.5152"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.5153"


def _study_and_b1_series(tmp_path, seed):
    """A 32² spiral MRF study of STUDY and its B1 series (the truth, noise-free), written as DICOM files."""
    if not os.path.exists(STORESCU):
        pytest.skip("DCMTK storescu is not installed")
    with one_torch_thread():
        raw = simulate_study(
            "brain", fisp_sequence(), AcquisitionSettings(trajectory="spiral", coils=4, snr=50.0, seed=seed), matrix=32
        )
    raw.study = replace(raw.study, study_instance_uid=STUDY, frame_of_reference_uid=FRAME_OF_REFERENCE)
    truth, body = raw.truth["b1"], raw.truth["labels"] > 0
    rel, geometry = simulate_b1_series(truth[None], body[None], raw.geometry, matrix=32, fov_mm=240.0, noise=0.0)
    return raw, truth, body, write_b1_series(rel, geometry, raw.study, tmp_path / "b1")


def _node(tmp_path, **mrf_route):
    return start_node(tmp_path, {
        "node": {"ae_title": NODE_AE},
        "grouping": {"default": {"by": "series", "quiet_seconds": 1}},
        "routes": [
            {"name": "b1", "match": {"input": "dicom", "series_description": "tfl_b1map"}, "pipeline": "b1_map",
             "params": {"nominal": 800}},
            {"name": "raw-mrf", "match": {"input": "mrd"}, "pipeline": "mrf", **mrf_route},
        ],
    })


def _storescu(node, files):
    p = subprocess.run([STORESCU, "-aet", "TEST_SCU", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port),
                        *map(str, files)], capture_output=True, text=True,
                       env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)
    assert p.returncode == 0, p.stderr


def test_the_study_b1_series_is_used_by_its_raw_mrf_job_and_no_other(tmp_path):
    raw, truth, body, files = _study_and_b1_series(tmp_path, seed=3)
    node = _node(tmp_path)
    try:
        _storescu(node, files)
        b1_job = node.wait_job_state("done", timeout=120)
        assert b1_job.pipeline == "b1_map" and "B1 series" in b1_job.log, b1_job.log

        results = {}
        for uid in (STUDY, OTHER_STUDY):
            raw.study = replace(raw.study, study_instance_uid=uid)
            said = [r for r in send_study(raw, "127.0.0.1", node.mrd_port, timeout=120) if isinstance(r, str)]
            assert len(said) == 1 and said[0].endswith(" queued"), said
            job = node.wait_job_state("done", job_id=said[0].split()[1], timeout=600)
            with np.load(Path(job.result_dir) / "maps.npz") as f:
                results[uid] = (job, f["b1"][0], f["t1"][0] > 0)
    finally:
        assert node.stop() == 0, node.log()[-3000:]

    job, b1, mapped = results[STUDY]
    other, b1_other, _ = results[OTHER_STUDY]
    assert f"the study's measured B1 map: job {b1_job.id}" in job.log, job.log
    assert "B1 held at the measured B1 map" in job.log, job.log
    assert "measured B1" not in other.log, other.log
    inside = mapped & body
    err = np.median(np.abs(b1[inside] - truth[inside]))
    err_other = np.median(np.abs(b1_other[inside] - truth[inside]))
    print(f"median |B1 error|: with the study's B1 series {err:.4f}, without (smooth field) {err_other:.4f}")
    assert err < 0.005, err  # the measured B1, interpolated
    assert err_other > 2 * err, (err, err_other)


def test_process_takes_a_b1_map_from_a_b1_map_run(tmp_path):
    """Offline, as a physicist checks a study: ``recon-node process`` of the B1 series with ``b1_map``, then of the
    raw data with ``--b1`` its maps.npz and ``b1_measured=required``; the B1 map written is the measured one."""
    from pipelines.sim.mrd_writer import write_ismrmrd
    from tests.integration.test_cli import run

    with one_torch_thread():
        raw = simulate_study(
            "brain", fisp_sequence(), AcquisitionSettings(trajectory="spiral", coils=4, snr=50.0, seed=4), matrix=32
        )
    truth, body = raw.truth["b1"], raw.truth["labels"] > 0
    rel, geometry = simulate_b1_series(truth[None], body[None], raw.geometry, matrix=32, fov_mm=240.0, noise=0.0)
    write_b1_series(rel, geometry, raw.study, tmp_path / "b1")
    write_ismrmrd(raw, tmp_path / "raw.h5")
    run("process", str(tmp_path / "b1"), "--pipeline", "b1_map", "--set", "nominal=800", "--out",
        str(tmp_path / "b1_out"), "--no-dicom", "--quiet")
    p = run("process", str(tmp_path / "raw.h5"), "--pipeline", "mrf", "--b1", str(tmp_path / "b1_out" / "maps.npz"),
            "--set", "b1_measured=required", "--out", str(tmp_path / "out"), "--no-dicom", "--quiet")
    assert "B1 held at the given B1 map" in p.stderr, p.stderr
    with np.load(tmp_path / "out" / "maps.npz") as f:
        b1, mapped = f["b1"][0], f["t1"][0] > 0
    inside = mapped & body
    assert np.median(np.abs(b1[inside] - truth[inside])) < 0.005
    # a B1 file that is not a b1_map result: said, and the job goes on without it -- unless it requires one
    (tmp_path / "bad.npz").write_bytes(b"not a maps.npz")
    p = run("process", str(tmp_path / "raw.h5"), "--pipeline", "mrf", "--b1", str(tmp_path / "bad.npz"), "--set",
            "b1_measured=required", "--out", str(tmp_path / "out2"), "--no-dicom", "--quiet", ok=False)
    assert p.returncode != 0 and "b1_measured is 'required' but the study has no measured B1 series" in p.stderr
    assert "bad.npz cannot be read" in p.stderr, p.stderr


def test_a_raw_job_waits_for_a_b1_series_sent_after_it(tmp_path):
    """A scanner that sends its DICOM at the end of the exam: the raw MRF stream comes first. With the route's
    ``wait_for_b1_seconds`` its job waits, queued and saying so in ``recon-node status``, until the study's B1
    series has come and been processed, and then uses it."""
    raw, truth, body, files = _study_and_b1_series(tmp_path, seed=5)
    node = _node(tmp_path, wait_for_b1_seconds=600)
    try:
        said = [r for r in send_study(raw, "127.0.0.1", node.mrd_port, timeout=120) if isinstance(r, str)]
        assert len(said) == 1 and said[0].endswith(" queued"), said
        job_id = said[0].split()[1]
        time.sleep(3.0)  # the worker polls each second: it would have claimed the job by now
        queued = node.wait_job_state("queued", job_id=job_id)
        assert queued.error.startswith("waiting for the study's B1 series until "), queued.error
        assert "waiting for the study's B1 series" in json.dumps(node.status_json())
        _storescu(node, files)
        job = node.wait_job_state("done", job_id=job_id, timeout=600)
        b1_job = next(j for j in node.jobs() if j.pipeline == "b1_map")
    finally:
        assert node.stop() == 0, node.log()[-3000:]
    assert b1_job.state in ("done", "sent") and job.started >= b1_job.finished
    assert f"the study's measured B1 map: job {b1_job.id}" in job.log, job.log
    assert f"s for the study's B1 map (job {b1_job.id})" in job.log and job.error is None, job.log
    with np.load(Path(job.result_dir) / "maps.npz") as f:
        b1, mapped = f["b1"][0], f["t1"][0] > 0
    inside = mapped & body
    assert np.median(np.abs(b1[inside] - truth[inside])) < 0.005  # the measured B1, not the field
