"""kill -9 campaign (issue 15): a real ``recon-node serve`` is killed at random moments (≥ 10 times) while DICOM
series arrive, jobs run and results go to Orthanc; it is restarted each time.

The modality side (pynetdicom, in this process) behaves like a scanner: it resends only the instances whose
C-STORE was not acknowledged, as soon as the node listens again. Asserted at the end: every instance was
acknowledged, every study has exactly one result series in Orthanc with exactly the expected instances (exactly
once by SOP Instance UID: no second series from a duplicated or split job), no job failed, every outbox row is
sent. Orthanc is down until the 7th kill, so results wait in the outbox across kills. A cheap plugin pipeline (mean
frame, with a pause so kills land in jobs) keeps the run time near a minute and a half.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

from node import uids
from tests.integration.node_harness import start_node
from tests.integration.orthanc_harness import start_orthanc
from tests.integration.test_dicom_scp import frames, study  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

SEED = 1515
N_KILLS = 10
N_STUDIES = 4
QUIET_S = 1.0
RESTART_GRACE_S = 2.5  # a group re-armed after a restart waits this long for the sender's resend (other helper's)
PHASES = ("ingest", "job", "send")
PACS_BACK_AFTER_KILL = 6  # Orthanc comes back after this kill

PLUGIN = '''
import time
import numpy as np
from pipelines.registry import Param, PipelineSpec, register
from pipelines.types import ReconImage


def _run(study, params, ctx):
    time.sleep(params["seconds"])  # room for a kill in the middle of a job
    mean = np.abs(study.pixels).mean(axis=0)
    return [ReconImage("image", mean.astype(np.float32), "mean of the frames", study.geometry)]


register(PipelineSpec(name="kill_mean", input_kind="images", summary="test: pause, then the mean frame", run=_run,
                      params={"seconds": Param(float, 1.0, "pause")}))
'''


def _studies(frames: list[Path], out: Path) -> dict[str, list[pydicom.Dataset]]:
    """N_STUDIES copies of the fingerprint series, each its own patient / study / series / instance UIDs."""
    result = {}
    for s in range(N_STUDIES):
        study_uid = f"1.2.826.0.1.3680043.10.1515.{s + 1}"
        dss = []
        for f in frames:
            ds = pydicom.dcmread(f)
            ds.PatientID = f"KILL{s}"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = f"{study_uid}.1"
            ds.SOPInstanceUID = f"{study_uid}.1.{ds.InstanceNumber}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            dss.append(ds)
        result[study_uid] = dss
    return result


class Modality(threading.Thread):
    """Sends every study, resending only what was not acknowledged, until everything is acknowledged (the node
    is given time to restart between tries)."""

    def __init__(self, node, studies: dict[str, list[pydicom.Dataset]]) -> None:
        super().__init__(daemon=True)
        self.node, self.studies = node, studies
        self.acked: set[str] = set()
        self.busy = threading.Event()
        self.stop_flag = threading.Event()
        self.attempts = 0

    def run(self) -> None:
        ae = AE(ae_title="TEST_SCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for n, dss in enumerate(self.studies.values()):
            if n:
                time.sleep(2.0)  # studies arrive spread out, so kills meet ingest, jobs and sends at once
            while not self.stop_flag.is_set():
                todo = [ds for ds in dss if ds.SOPInstanceUID not in self.acked]
                if not todo:
                    break
                self.attempts += 1
                self.busy.set()
                try:
                    assoc = ae.associate("127.0.0.1", self.node.dicom_port, ae_title=self.node.config["node"]
                                         ["ae_title"])
                    if assoc.is_established:
                        for ds in todo:
                            st = assoc.send_c_store(ds)
                            if st is not None and st.get("Status") == 0:
                                self.acked.add(str(ds.SOPInstanceUID))
                            time.sleep(0.05)  # a scanner's pace: kills land in the middle of a series
                        assoc.release()
                except Exception:  # noqa: BLE001 - the node was killed under us: try again
                    pass
                finally:
                    self.busy.clear()
                time.sleep(0.3)


def _phase(node, modality: Modality) -> str:
    jobs = node.jobs()
    if any(j.state == "running" for j in jobs):
        return "job"
    if any(j.state == "done" for j in jobs):
        return "send"
    return "ingest" if modality.busy.is_set() else "idle"


def test_kill9_campaign_exactly_once_to_orthanc(tmp_path, frames):  # noqa: F811 - fixture
    rng = random.Random(SEED)
    studies = _studies(frames, tmp_path)
    orthanc = start_orthanc(tmp_path)
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "kill_plugin.py").write_text(PLUGIN)
    config = {
        "node": {"plugins": ["kill_plugin"], "max_attempts": 3, "max_node_deaths": 50},
        "grouping": {"default": {"by": "study", "quiet_seconds": QUIET_S},
                     "restart_grace_seconds": RESTART_GRACE_S},
        "destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "egress": {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "poll_interval_s": 0.2},
        "routes": [{"name": "mean", "match": {"input": "dicom"}, "pipeline": "kill_mean", "params": {"seconds": 1.0},
                    "send_to": ["pacs"]}],
    }
    t0 = time.monotonic()
    orthanc.stop()  # the PACS is down for the first kills: finished jobs wait in the outbox (the "send" phase)
    node = start_node(tmp_path, config, env={"PYTHONPATH": str(plugin_dir)})
    modality = Modality(node, studies)
    phases: dict[str, int] = {"ingest": 0, "job": 0, "send": 0, "idle": 0}
    try:
        modality.start()
        for k in range(N_KILLS):
            # Aim each kill at a phase in turn (at most 5 s of waiting for it), then a random short delay.
            target = PHASES[k % len(PHASES)]
            end = time.monotonic() + 5.0
            while time.monotonic() < end and _phase(node, modality) != target:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            phases[_phase(node, modality)] += 1
            node.kill9()
            if k == PACS_BACK_AFTER_KILL:
                orthanc.start()
            node.start()
        modality.join(timeout=60)
        assert not modality.is_alive(), "the modality could not deliver every instance"

        expected = len(studies)

        def delivered() -> bool:
            jobs = node.jobs()
            return len(jobs) >= expected and all(j.state in ("sent", "failed") for j in jobs)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not delivered():
            time.sleep(0.5)
        jobs = node.jobs()
        print(f"\nkill campaign: {N_KILLS} kills survived (phases {phases}), {len(jobs)} jobs, "
              f"{modality.attempts} modality associations, {time.monotonic() - t0:.0f} s")
        assert all(ds.SOPInstanceUID in modality.acked for dss in studies.values() for ds in dss)
        assert [j.state for j in jobs] == ["sent"] * expected, [(j.id, j.state, j.error) for j in jobs]
        assert sorted(j.attributes.get("StudyInstanceUID") for j in jobs) == sorted(studies)
        # Exactly once in Orthanc: one result series per study, one instance each, nothing else.
        instances = orthanc.instances()
        assert len(instances) == expected, instances
        for study_uid in studies:
            series = orthanc.series_of_study(study_uid)
            assert len(series) == 1 and len(series[0]["Instances"]) == 1, series
            sop = orthanc.instance_tags(series[0]["Instances"][0])["SOPInstanceUID"]
            assert uids.is_valid_uid(sop)
        status = node.status_json()
        assert status["counts"].get("failed", 0) == 0
        assert node.stop() == 0
    finally:
        modality.stop_flag.set()
        node.kill9()
        orthanc.stop()
