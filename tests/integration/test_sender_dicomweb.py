"""Writer -> durable outbox -> STOW-RS -> a real Orthanc with its DICOMweb plugin: every SOP Instance UID arrives
once (resends and retries after a partial delivery post nothing twice), an outage is retried until Orthanc is
back, a wrong URL or missing credentials fail at once with the cause."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import yaml

from node.config import DicomwebDestination, load_config
from node.egress.dicom_writer import write_outputs
from node.egress.egress import Egress
from node.egress.instances import InstanceRecord
from node.egress.outbox import Outbox
from node.egress.sender import Sender
from node.jobs import JobStore
from orthanc_harness import free_port, start_orthanc
from pipelines.types import Geometry, QuantitativeMap, StudyInfo

pytestmark = pytest.mark.integration

STUDY_UID = "1.2.826.0.1.3680043.8.498.888"


def _records(tmp_path, name: str = "dicom", n_slices: int = 3) -> list[InstanceRecord]:
    positions = np.array([[-80.0, -80.0, 5.0 * k] for k in range(n_slices)])
    g = Geometry(matrix=(16, 16), pixel_spacing_mm=(5.0, 5.0), slice_thickness_mm=5.0, positions=positions,
                 frame_of_reference_uid="1.2.826.0.1.3680043.8.498.889")
    rng = np.random.default_rng(0)
    maps = [QuantitativeMap("t1", rng.uniform(0, 3000, (n_slices, 16, 16)), "ms", "T1", g),
            QuantitativeMap("t2", rng.uniform(0, 300, (n_slices, 16, 16)), "ms", "T2", g)]
    study = StudyInfo(patient_id="PAT-W", patient_name="Test^Web", study_instance_uid=STUDY_UID, series_number=3)
    return write_outputs(maps, study, tmp_path / name, f"job-{name}", parametric_map=True)


def _sender(outbox: Outbox, url: str, **kw) -> Sender:
    dest = DicomwebDestination(name="web", url=url, **kw)
    return Sender(outbox, [dest], backoff_base_s=0.25, backoff_max_s=2.0, poll_interval_s=0.2, timeout_s=10.0)


@pytest.fixture
def posted(monkeypatch) -> Counter:
    """Every SOP Instance UID the node POSTs with STOW-RS, counted (a resend must not post again)."""
    from dicomweb_client import DICOMwebClient

    seen: Counter = Counter()
    original = DICOMwebClient.store_instances

    def spy(self, datasets, *args, **kwargs):
        datasets = list(datasets)
        seen.update(str(ds.SOPInstanceUID) for ds in datasets)
        return original(self, datasets, *args, **kwargs)

    monkeypatch.setattr(DICOMwebClient, "store_instances", spy)
    return seen


def test_a_written_series_arrives_once_and_resends_post_nothing_twice(tmp_path, posted):
    orthanc = start_orthanc(tmp_path, dicomweb=True)
    try:
        records = _records(tmp_path)
        uids = {r.sop_instance_uid for r in records}
        # A partial delivery the outbox never heard of (a crash between the POST and the row update): Orthanc
        # already holds the first two instances.
        for r in records[:2]:
            orthanc.store(r.path)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        outbox.enqueue(records, "web", "job-1")
        sender = _sender(outbox, orthanc.dicomweb_url)
        assert sender.verify("web") is True
        assert sender.send_due() == len(records)
        assert sorted(orthanc.sop_instance_uids()) == sorted(uids)  # exactly those, each once
        assert set(posted) == uids - {r.sop_instance_uid for r in records[:2]}  # already there: not posted
        assert set(posted.values()) == {1}

        # The operator's resend (`recon-node resend`): every row due again; Orthanc has them all, nothing is posted.
        for it in outbox.items():
            outbox.mark_retry(it.id, "resend requested by the operator", 0.0)
        assert sender.send_due() == len(records)
        assert set(posted.values()) == {1}
        assert sorted(orthanc.sop_instance_uids()) == sorted(uids)
        status = sender.destination_status()[0]
        assert (status["kind"], status["target"], status["sent"], status["failed"], status["echo_ok"]) == \
            ("dicomweb", orthanc.dicomweb_url, len(records), 0, True)
        outbox.close()
    finally:
        orthanc.stop()


def test_server_down_is_retried_until_orthanc_is_back(tmp_path, posted):
    orthanc = start_orthanc(tmp_path, dicomweb=True)
    orthanc.stop()
    try:
        records = _records(tmp_path)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        outbox.enqueue(records, "web", "job-2")
        sender = _sender(outbox, orthanc.dicomweb_url)
        assert sender.verify("web") is False
        assert sender.send_due() == 0
        items = outbox.items()
        assert all(it.state == "pending" and it.attempts == 1 for it in items)
        assert all("cannot reach" in (it.last_error or "") for it in items), items[0].last_error
        assert not posted
        orthanc.start()
        sender.start()
        deadline = time.monotonic() + 30
        while outbox.counts()["web"].get("sent", 0) < len(records) and time.monotonic() < deadline:
            time.sleep(0.1)
        sender.stop()
        assert outbox.counts()["web"] == {"sent": len(records)}
        assert Counter(orthanc.sop_instance_uids()) == Counter(r.sop_instance_uid for r in records)
        outbox.close()
    finally:
        orthanc.stop()


def test_wrong_root_and_missing_credentials_fail_with_the_cause(tmp_path):
    orthanc = start_orthanc(tmp_path, dicomweb=True, user=("node", "s3cret-pass"))
    try:
        records = _records(tmp_path, n_slices=1)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        for name in ("wrong-root", "no-token", "good"):
            outbox.enqueue(records, name, "job-3")
        token = orthanc.basic_auth
        sender = Sender(outbox, [
            DicomwebDestination(name="wrong-root", url=orthanc.url + "/dicomweb", auth_token=token),
            DicomwebDestination(name="no-token", url=orthanc.dicomweb_url),
            DicomwebDestination(name="good", url=orthanc.dicomweb_url, auth_token=token)], timeout_s=10.0)
        assert sender.send_due() == len(records)
        wrong = outbox.items(destination="wrong-root")
        assert {it.state for it in wrong} == {"failed"}
        assert "HTTP 404" in wrong[0].last_error and "DICOMweb root" in wrong[0].last_error, wrong[0].last_error
        denied = outbox.items(destination="no-token")
        assert {it.state for it in denied} == {"failed"}
        assert "HTTP 401" in denied[0].last_error and "auth_token" in denied[0].last_error, denied[0].last_error
        assert {it.state for it in outbox.items(destination="good")} == {"sent"}
        assert sorted(orthanc.sop_instance_uids()) == sorted(r.sop_instance_uid for r in records)
        assert sender.verify("no-token") is False and sender.verify("good") is True
        rows = {d["name"]: d for d in sender.destination_status()}
        assert "HTTP 401" in rows["no-token"]["last_error"]
        assert all("s3cret" not in str(it.last_error) for it in outbox.items())
        outbox.close()
    finally:
        orthanc.stop()


def test_a_done_job_reaches_orthanc_through_a_yaml_dicomweb_destination(tmp_path):
    """The node's wiring: site YAML (kind: dicomweb) -> Egress -> job ``sent`` once Orthanc has every instance."""
    orthanc = start_orthanc(tmp_path, dicomweb=True)
    try:
        (tmp_path / "token").write_text("Bearer not-checked-by-orthanc\n")
        (tmp_path / "site.yaml").write_text(yaml.safe_dump({
            "node": {"spool_dir": "spool"},
            "destinations": [{"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url + "/",
                              "auth_token_file": "token", "timeout_s": 10}],
            "egress": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
            "routes": [{"name": "r", "pipeline": "cartesian_frames", "send_to": ["web"]}],
        }))
        cfg = load_config(tmp_path / "site.yaml", check_pipelines=False)
        store = JobStore(cfg.node.database_path)
        job, _ = store.create(tmp_path / "unit.h5", "mrd", "scanner", route="r", pipeline="cartesian_frames",
                              send_to=["web"])
        store.claim()
        result = cfg.node.results_dir / job.id
        records = _records(result, name="dicom", n_slices=2)
        store.finish(job.id, result)
        egress = Egress(cfg, store)
        egress.on_done(store.get(job.id), [], result, records)
        assert egress.verify_all() == {"web": True}
        assert egress.sender.send_due() == len(records)
        assert store.get(job.id).state == "sent"
        assert sorted(orthanc.sop_instance_uids()) == sorted(r.sop_instance_uid for r in records)
        egress.outbox.close()
    finally:
        orthanc.stop()


def test_free_port_is_not_a_dicomweb_server(tmp_path):
    """No server at all (nothing listens): retry, with the reason, and the check says unreachable."""
    records = _records(tmp_path, n_slices=1)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.enqueue(records, "web", "job-4")
    sender = _sender(outbox, f"http://127.0.0.1:{free_port()}/dicom-web")
    assert sender.send_due() == 0 and sender.verify("web") is False
    assert {it.state for it in outbox.items()} == {"pending"}
    assert "cannot reach" in (sender.destination_status()[0]["last_error"] or "")
    outbox.close()
