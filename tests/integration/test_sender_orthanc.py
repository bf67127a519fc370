"""Map series -> durable outbox -> C-STORE -> a real Orthanc: arrival, outages, sender restarts, C-ECHO."""

from __future__ import annotations

import time

import numpy as np
import pytest

from node.config import DicomDestination
from node.egress.dicom_writer import write_outputs
from node.egress.instances import read_instance_records
from node.egress.outbox import Outbox
from node.egress.sender import Sender
from orthanc_harness import free_port, start_orthanc
from pipelines.types import Geometry, QuantitativeMap, ReconImage, StudyInfo

pytestmark = pytest.mark.integration

STUDY_UID = "1.2.826.0.1.3680043.8.498.777"


def _study() -> StudyInfo:
    return StudyInfo(patient_id="PAT-9", patient_name="Test^Orthanc", study_instance_uid=STUDY_UID,
                     study_date="20240301", study_time="090000", study_id="1", accession_number="A9", series_number=2)


def _geometry(n_slices: int, matrix: int = 32) -> Geometry:
    positions = np.array([[-80.0, -80.0, 5.0 * k] for k in range(n_slices)])
    return Geometry(matrix=(matrix, matrix), pixel_spacing_mm=(5.0, 5.0), slice_thickness_mm=5.0,
                    positions=positions, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.778")


def _maps(kinds: dict[str, tuple[str, float]], n_slices: int = 3, seed: int = 0) -> list[QuantitativeMap]:
    rng = np.random.default_rng(seed)
    g = _geometry(n_slices)
    return [QuantitativeMap(k, rng.uniform(0, hi, (n_slices, 32, 32)), unit, f"{k} map", g)
            for k, (unit, hi) in kinds.items()]


def _sender(outbox: Outbox, port: int, **kw) -> Sender:
    kw.setdefault("backoff_max_s", 2.0)
    kw.setdefault("backoff_base_s", 0.25)
    kw.setdefault("poll_interval_s", 0.2)
    kw.setdefault("timeout_s", 10.0)
    return Sender(outbox, [DicomDestination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port)],
                  calling_ae="RECONNODE", **kw)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_map_series_arrive_in_the_source_study(tmp_path):
    orthanc = start_orthanc(tmp_path)
    try:
        outputs = _maps({"t1": ("ms", 3000.0), "ff": ("%", 100.0), "df": ("Hz", 200.0)})
        files = write_outputs(outputs, _study(), tmp_path / "dicom", "job-arrive", parametric_map=True)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        assert outbox.enqueue(files, "pacs", "job-arrive") == len(files)
        assert outbox.enqueue(files, "pacs", "job-arrive") == len(files)  # pending rows re-armed, not duplicated
        sender = _sender(outbox, orthanc.dicom_port)
        assert sender.verify("pacs") is True
        assert sender.send_due() == len(files)
        assert sender.send_due() == 0

        assert len(orthanc.instances()) == len(files)
        series = orthanc.series_of_study(STUDY_UID)
        by_desc = {s["MainDicomTags"].get("SeriesDescription"): s for s in series}
        assert {"T1 map [ms]", "Fat fraction [%]", "Field offset [Hz]"} <= set(by_desc)
        assert len(by_desc["T1 map [ms]"]["Instances"]) == 3
        assert len(series) == 6  # three uint16 series + three float parametric maps
        assert len(orthanc.studies()) == 1

        ff_tags = orthanc.instance_tags(by_desc["Fat fraction [%]"]["Instances"][0])
        assert ff_tags["StudyInstanceUID"] == STUDY_UID and ff_tags["PatientID"] == "PAT-9"
        assert float(ff_tags["RescaleSlope"]) == pytest.approx(0.1)
        rwvm = ff_tags["RealWorldValueMappingSequence"][0]
        assert float(rwvm["RealWorldValueSlope"]) == pytest.approx(0.1)
        assert rwvm["MeasurementUnitsCodeSequence"][0]["CodeValue"] == "%"
        assert rwvm["QuantityDefinitionSequence"][0]["ConceptCodeSequence"][0]["CodeValue"] == "129100"
        t1_tags = orthanc.instance_tags(by_desc["T1 map [ms]"]["Instances"][0])
        assert "RescaleSlope" not in t1_tags  # slope 1 / intercept 0: no modality LUT

        status = {d["name"]: d for d in sender.destination_status()}["pacs"]
        assert (status["pending"], status["sent"], status["failed"]) == (0, len(files), 0)
        assert status["echo_ok"] is True and status["last_success_at"] is not None
    finally:
        orthanc.stop()


def test_outage_while_sending_every_instance_arrives_once(tmp_path):
    orthanc = start_orthanc(tmp_path)
    sender = None
    try:
        g = _geometry(1)
        frames = ReconImage("image", np.random.default_rng(1).uniform(0, 1, (120, 32, 32)), "MRF frames", g)
        files = write_outputs([frames], _study(), tmp_path / "dicom", "job-outage")
        late = write_outputs(_maps({"residual": ("%", 30.0)}, n_slices=1), _study(), tmp_path / "late", "job-outage")
        outbox = Outbox(tmp_path / "outbox.sqlite")
        outbox.enqueue(files, "pacs", "job-outage")
        sender = _sender(outbox, orthanc.dicom_port)

        def sent() -> int:
            return outbox.counts().get("pacs", {}).get("sent", 0)

        sender.start()
        _wait(lambda: sent() >= 10, 30, "the first instances to arrive")
        at_stop = sent()
        orthanc.stop(kill=True)  # the PACS vanishes in the middle of the association
        print(f"Orthanc killed after {at_stop} of {len(files)} instances")
        outbox.enqueue(late, "pacs", "job-outage")
        sender.wake()
        _wait(lambda: any(it.attempts > 0 for it in outbox.items()), 15, "a failed attempt while Orthanc is down")
        time.sleep(4.0)  # a few backoff rounds (capped at 2 s) against a dead port
        assert sent() < len(files) + len(late)
        orthanc.start()
        _wait(lambda: sent() == len(files) + len(late), 30, "every instance to be sent after the restart")
        assert len(orthanc.instances()) == len(files) + len(late)
        counts = outbox.counts()["pacs"]
        assert counts == {"sent": len(files) + len(late)}
        assert max(it.attempts for it in outbox.items()) >= 2
        status = sender.destination_status()[0]
        assert status["failed"] == 0 and status["pending"] == 0 and status["last_error"]
    finally:
        if sender is not None:
            sender.stop()
        orthanc.stop()


def test_a_new_sender_resumes_the_outbox_and_echo_reports_reachability(tmp_path):
    port = free_port()
    orthanc = start_orthanc(tmp_path, dicom_port=port)
    orthanc.stop()
    try:
        files = write_outputs(_maps({"t2": ("ms", 300.0), "pd": ("1", 1.2)}), _study(), tmp_path / "dicom", "job-resume")
        db = tmp_path / "outbox.sqlite"
        outbox = Outbox(db)
        outbox.enqueue(files, "pacs", "job-resume")
        first = _sender(outbox, port)
        assert first.verify("pacs") is False
        assert first.send_due() == 0  # PACS down: every row back to pending with a backoff
        items = outbox.items()
        assert all(it.state == "pending" and it.attempts == 1 and it.last_error for it in items)
        assert all(it.next_attempt_at > time.time() for it in items)
        # The node dies in the middle of an association: rows left 'sending'.
        outbox.mark_sending(it.id for it in items[:2])
        outbox.close()

        orthanc.start()
        reopened = Outbox(db)  # recovery: 'sending' -> 'pending'
        assert {it.state for it in reopened.items()} == {"pending"}
        # A clock an hour ahead makes every backoff due now.
        second = _sender(reopened, port, clock=lambda: time.time() + 3600)
        assert second.verify("pacs") is True
        second.start()
        _wait(lambda: reopened.counts()["pacs"].get("sent", 0) == len(files), 30, "the resumed rows to be sent")
        second.stop()
        assert len(orthanc.instances()) == len(files)
        status = second.destination_status()[0]
        assert (status["sent"], status["pending"], status["failed"], status["echo_ok"]) == (len(files), 0, 0, True)
        orthanc.stop()
        assert second.verify("pacs") is False
        assert second.destination_status()[0]["echo_ok"] is False
    finally:
        orthanc.stop()


def test_missing_files_and_unknown_destinations_fail_with_a_reason(tmp_path):
    files = write_outputs(_maps({"t1": ("ms", 3000.0)}, n_slices=2), _study(), tmp_path / "dicom", "job-bad")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.enqueue(files[:1], "pacs", "job-bad")
    outbox.enqueue(files[1:], "elsewhere", "job-bad")
    files[0].path.unlink()
    sender = _sender(outbox, free_port())
    assert sender.send_due() == 0
    errors = {it.destination: (it.state, it.last_error) for it in outbox.items()}
    assert errors["pacs"][0] == "failed" and "no longer exists" in errors["pacs"][1]
    assert errors["elsewhere"][0] == "failed" and "not configured" in errors["elsewhere"][1]
    with pytest.raises(ValueError, match="not a readable DICOM"):
        (tmp_path / "junk.dcm").write_text("junk")
        read_instance_records([tmp_path / "junk.dcm"])
