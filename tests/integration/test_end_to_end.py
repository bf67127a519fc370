"""The closed loop with real peers: scanner -> node (subprocess) -> maps in a real Orthanc, in the source study.

* DICOM: fingerprint frames sent with DCMTK's storescu -> ``mrf_maps_from_images`` -> Orthanc; series in the
  original study, descriptions and counts right, values (decoded through the Real World Value Mapping) at the
  phantom's tissue ROIs close to the truth.
* MRD: raw MRF -> ``mrf`` -> Orthanc, in the study named by the ISMRMRD header (skipped until ``mrf`` exists).
* Outage: Orthanc down before and killed during sending, restarted seconds later -> every instance arrives once,
  ``recon-node status`` shows the outage (pending, last error) and then every instance sent.

The full FISP dictionary is built once per test session into ``$RECON_NODE_CACHE`` (conftest); the node
subprocess inherits it.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
import torch

from orthanc_harness import free_port, start_orthanc
from pipelines.physics.sequences import fisp_sequence
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.dicom_frames import write_dicom_frames
from node.ingest.mrd_client import send_study
from tests.integration.node_harness import start_node

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"
NODE_AE = "RECON_TEST"
N_RESTART_FRAMES = 300
MAP_SERIES = {"T1 map [ms]", "T2 map [ms]", "Proton density [a.u.]", "B1 relative flip angle [1]",
              "Fit residual [%]"}
TISSUES = ("white_matter", "grey_matter", "csf")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The simulator's EPG on one thread: two OpenMP threads on a busy 2-core machine spin-wait, and the same
    simulation took 289 s instead of 3 s (measured while another job used the other core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def study():
    """32x32 brain, the full FISP schedule (1000 frames), Cartesian, 2 coils, SNR 50."""
    with one_torch_thread():
        return simulate_study("brain", fisp_sequence(), AcquisitionSettings(coils=2, snr=50.0), matrix=32)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A real Orthanc (knowing the node as a modality) and a node whose routes send to it."""
    tmp = tmp_path_factory.mktemp("e2e")
    node_port = free_port()
    orthanc = start_orthanc(tmp, modalities={"RECONNODE": (NODE_AE, "127.0.0.1", node_port)})
    routes = [
        {"name": "frames", "match": {"input": "dicom", "modality": "MR"}, "pipeline": "mrf_maps_from_images",
         "send_to": ["orthanc"]},
        {"name": "raw-cartesian", "match": {"input": "mrd", "protocol_name": "restart"},
         "pipeline": "cartesian_frames", "params": {"frames": ",".join(map(str, range(N_RESTART_FRAMES)))},
         "send_to": ["orthanc"]},
        {"name": "raw-mrf", "match": {"input": "mrd"}, "pipeline": "mrf", "send_to": ["orthanc"]},
    ]
    node = start_node(tmp, {
        "node": {"ae_title": NODE_AE, "dicom_port": node_port, "parametric_map": True},
        "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
        "egress": {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10},
        "grouping": {"default": {"by": "series", "quiet_seconds": 1}},
        "routes": routes,
    })
    yield node, orthanc
    try:
        assert node.stop() == 0, node.log()[-3000:]
    finally:
        orthanc.stop()


def _wait(predicate, timeout: float, what: str, node=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f"\n{node.log()[-3000:]}" if node is not None else ""))


def _decoded(orthanc, instance_id: str) -> np.ndarray:
    ds = pydicom.dcmread(io.BytesIO(orthanc_file(orthanc, instance_id)))
    rw = ds.RealWorldValueMappingSequence[0]
    return ds.pixel_array.astype(np.float64) * float(rw.RealWorldValueSlope) + float(rw.RealWorldValueIntercept)


def orthanc_file(orthanc, instance_id: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance_id}/file", timeout=30) as r:
        return r.read()


def _destination(node) -> dict:
    return node.status_json()["destinations"][0]


def test_dicom_frames_to_maps_in_orthanc(loop, study, tmp_path):
    if not os.path.exists(STORESCU):
        pytest.skip("DCMTK storescu is not installed")
    node, orthanc = loop
    _wait(lambda: _destination(node)["echo_ok"] is True, 30, "the start-up C-ECHO of Orthanc", node)
    files = write_dicom_frames(study, tmp_path / "frames", series_number=3)
    p = subprocess.run([STORESCU, "-aet", "TEST_SCU", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port),
                        *map(str, files)], capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"},
                       timeout=300)
    assert p.returncode == 0, p.stderr
    job = node.wait_job_state("sent", timeout=600)  # the first test of a session may build the dictionary
    assert job.pipeline == "mrf_maps_from_images" and job.send_to == ["orthanc"]

    study_uid = study.study.study_instance_uid
    series = orthanc.series_of_study(study_uid)
    by_desc = {s["MainDicomTags"].get("SeriesDescription"): s for s in series}
    assert MAP_SERIES <= set(by_desc), sorted(by_desc)
    assert {f"{d} float"[:64] for d in MAP_SERIES} <= set(by_desc)  # node.parametric_map: true
    assert len(series) == 10 and all(len(s["Instances"]) == 1 for s in series)
    tags = orthanc.instance_tags(by_desc["T1 map [ms]"]["Instances"][0])
    assert tags["StudyInstanceUID"] == study_uid and tags["PatientID"] == study.study.patient_id
    assert len(tags["SourceImageSequence"]) == 1000  # references the fingerprint frames

    t1 = _decoded(orthanc, by_desc["T1 map [ms]"]["Instances"][0])
    t2 = _decoded(orthanc, by_desc["T2 map [ms]"]["Instances"][0])
    labels = study.truth["labels"]
    for label, name in study.label_names.items():
        if name not in TISSUES:
            continue
        roi = labels == label
        e1 = np.median(t1[roi]) / np.median(study.truth["t1_ms"][roi]) - 1
        e2 = np.median(t2[roi]) / np.median(study.truth["t2_ms"][roi]) - 1
        assert abs(e1) < 0.10, f"{name}: median T1 off by {e1:+.1%}"
        assert abs(e2) < 0.15, f"{name}: median T2 off by {e2:+.1%}"

    status = node.status_json()
    row = next(j for j in status["jobs"] if j["id"] == job.id)
    assert row["state"] == "sent" and row["egress"]["sent"] == row["egress"]["total"] == 10
    dest = status["destinations"][0]
    assert dest["name"] == "orthanc" and dest["failed"] == 0 and dest["sent"] >= 10


def test_raw_mrf_over_mrd_to_maps_in_orthanc(loop, tmp_path):
    node, orthanc = loop
    from dataclasses import replace

    seq = fisp_sequence()
    with one_torch_thread():
        raw = simulate_study("brain", seq, AcquisitionSettings(trajectory="spiral", coils=4, snr=50.0, seed=3),
                             matrix=32)
    raw.study = replace(raw.study, study_instance_uid="1.2.826.0.1.3680043.8.498.4242")  # as a scanner names it
    said = [r for r in send_study(raw, "127.0.0.1", node.mrd_port, timeout=120) if isinstance(r, str)]
    assert len(said) == 1 and said[0].endswith(" queued"), said
    job = node.wait_job_state("sent", job_id=said[0].split()[1], timeout=300)
    assert job.pipeline == "mrf"
    series = orthanc.series_of_study("1.2.826.0.1.3680043.8.498.4242")
    descs = {s["MainDicomTags"].get("SeriesDescription") for s in series}
    assert {"T1 map [ms]", "T2 map [ms]"} <= descs, descs


def test_orthanc_outage_every_instance_arrives_once(loop, study):
    node, orthanc = loop
    from dataclasses import replace

    restart_study = replace(study, study=replace(study.study, protocol_name="restart"))
    before = orthanc.rest("/statistics")["CountInstances"]
    orthanc.stop()  # the PACS is down when the job finishes
    said = [r for r in send_study(restart_study, "127.0.0.1", node.mrd_port, timeout=120) if isinstance(r, str)]
    assert len(said) == 1 and said[0].endswith(" queued"), said
    job_id = said[0].split()[1]
    node.wait_job_state("done", job_id=job_id, timeout=120)

    def outage_visible():
        d = _destination(node)
        return d if d["pending"] >= N_RESTART_FRAMES and d["last_error"] else None

    dest = _wait(outage_visible, 30, "status to show the instances pending with an error", node)
    assert "association" in dest["last_error"] or "connect" in dest["last_error"], dest
    p = node.cli("status", "--config", str(node.config_path))
    assert p.returncode == 0 and "orthanc" in p.stdout and f"0/{N_RESTART_FRAMES} sent" in p.stdout, p.stdout

    time.sleep(2.0)
    orthanc.start()  # back after a few seconds: the sender retries within its 1 s backoff cap
    _wait(lambda: orthanc.rest("/statistics")["CountInstances"] > before, 30, "the first instances to arrive", node)
    orthanc.stop(kill=True)  # and crash it in the middle of the transfer
    time.sleep(1.5)
    orthanc.start()
    job = node.wait_job_state("sent", job_id=job_id, timeout=120)
    assert job.state == "sent"

    assert orthanc.rest("/statistics")["CountInstances"] == before + N_RESTART_FRAMES
    image_series = [s for s in orthanc.series_of_study(study.study.study_instance_uid)
                    if len(s["Instances"]) == N_RESTART_FRAMES]
    assert len(image_series) == 1
    status = node.status_json()
    row = next(j for j in status["jobs"] if j["id"] == job_id)
    assert row["state"] == "sent" and row["egress"] == {**row["egress"], "sent": N_RESTART_FRAMES,
                                                        "total": N_RESTART_FRAMES, "failed": 0}
    assert status["destinations"][0]["pending"] == 0 and status["destinations"][0]["failed"] == 0


def test_folder_path_for_the_readme(tmp_path):
    """The README's claim about folder destinations: <path>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm, durable."""
    from node.egress.dicom_writer import write_outputs
    from node.config import FolderDestination
    from node.egress.outbox import Outbox
    from node.egress.sender import Sender
    from pipelines.types import Geometry, QuantitativeMap, StudyInfo

    g = Geometry.centred((8, 8), (80.0, 80.0))
    info = StudyInfo(study_instance_uid="1.2.826.0.1.3680043.8.498.55", patient_id="P")
    files = write_outputs([QuantitativeMap("t1", np.full((1, 8, 8), 800.0), "ms", "T1", g)], info,
                          tmp_path / "out", "job-folder")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.enqueue(files, "share", "job-folder")
    sender = Sender(outbox, [FolderDestination(name="share", path=tmp_path / "share")])
    assert sender.verify("share") is True
    assert sender.send_due() == 1 and sender.send_due() == 0
    ds = pydicom.dcmread(files[0].path)
    target = tmp_path / "share" / info.study_instance_uid / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert target.read_bytes() == files[0].path.read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    assert sender.destination_status()[0] | {"last_success_at": None} == {
        "name": "share", "kind": "folder", "target": str(tmp_path / "share"), "pending": 0, "sent": 1, "failed": 0,
        "last_error": None, "last_success_at": None, "echo_ok": True}
