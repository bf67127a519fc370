"""DICOM C-STORE SCP against real DCMTK peers (echoscu, storescu) on loopback, with the real site config."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom._config
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RawDataStorage
from pynetdicom import AE

from node.config import parse_config
from node.ingest.dicom_scp import DicomSCP
from node.ingest.units import Admission, IngestUnit, unit_from_disk
from pipelines.io.dicom_reader import image_study_from_dicom
from pipelines.io.ismrmrd_dicom import embedded_ismrmrd, wrap_ismrmrd_in_raw_data
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.physics.sequences import MRFSequence, fisp_sequence
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.dicom_frames import write_dicom_frames
from pipelines.sim.mrd_writer import write_ismrmrd

pytestmark = pytest.mark.integration

STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
NODE_AE = "RECONNODE"
N_FRAMES = 6

if not (os.path.exists(STORESCU) and os.path.exists(ECHOSCU)):
    pytest.skip("DCMTK (storescu, echoscu) is not installed", allow_module_level=True)


# ---- fixtures and helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study():
    s = fisp_sequence()
    seq = MRFSequence(f"fisp{N_FRAMES}", s.flip_angles_deg[:N_FRAMES], s.tr_ms[:N_FRAMES], s.te_ms[:N_FRAMES],
                      ti_ms=s.ti_ms)
    return simulate_study("brain", seq, AcquisitionSettings(coils=2, snr=float("inf")), matrix=16)


@pytest.fixture(scope="module")
def frames(study, tmp_path_factory) -> list[Path]:
    return write_dicom_frames(study, tmp_path_factory.mktemp("frames"), series_number=100)


def make_config(spool: Path, **over: Any):
    node = {"ae_title": NODE_AE, "dicom_port": 0, "bind": "127.0.0.1", "spool_dir": str(spool),
            "disk_reserve_mb": 0}
    node.update(over.pop("node", {}))
    data = {
        "node": node,
        "sources": [
            {"name": "scanner1", "ae_title": "SCANNER1", "hosts": ["127.0.0.1"], "protocols": ["dicom"]},
            {"name": "far", "ae_title": "FARSCANNER", "hosts": ["10.99.0.0/16"], "protocols": ["dicom"]},
            {"name": "mrdonly", "ae_title": "MRDONLY", "hosts": ["127.0.0.1"], "protocols": ["mrd"]},
        ],
        "grouping": {"default": {"by": "study", "quiet_seconds": 1.0}},
    }
    data.update(over)
    return parse_config(data, check_pipelines=False)


class Recorder:
    """A UnitHandler that records units (and can be told to fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.units: list[IngestUnit] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, unit: IngestUnit) -> Admission:
        with self._lock:
            self.units.append(unit)
        if self.fail:
            raise RuntimeError("job store is down")
        return Admission(f"job-{len(self.units)}", "queued", "test")


@pytest.fixture
def make_scp(tmp_path):
    started: list[DicomSCP] = []

    def make(spool: Path | None = None, handler: Recorder | None = None, **over: Any) -> tuple[DicomSCP, Recorder]:
        rec = handler or Recorder()
        scp = DicomSCP(make_config(spool or tmp_path / "spool", **over), rec)
        scp.start()
        started.append(scp)
        return scp, rec

    yield make
    for scp in started:
        scp.stop()


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def dcmtk(tool: str, port: int, *args: str, aet: str = "SCANNER1", aec: str = NODE_AE) -> subprocess.CompletedProcess:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([tool, "-aet", aet, "-aec", aec, "-to", "30", "-ta", "30", "-td", "60",
                           "127.0.0.1", str(port), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def stored_files(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.is_file() and p.suffix in (".dcm", ".h5")]


# ---- association checks ----------------------------------------------------------------------------------------
def test_echo_from_a_configured_source(make_scp):
    scp, _ = make_scp()
    out = dcmtk(ECHOSCU, scp.port)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("aet, aec, reason", [
    ("INTRUDER", NODE_AE, "Calling AE Title Not Recognized"),  # unknown AE title
    ("FARSCANNER", NODE_AE, "Calling AE Title Not Recognized"),  # known AE, not from its network
    ("MRDONLY", NODE_AE, "Calling AE Title Not Recognized"),  # source not allowed DICOM
    ("SCANNER1", "SOMEONEELSE", "Called AE Title Not Recognized"),
])
def test_unknown_peers_are_rejected_at_association(make_scp, frames, caplog, aet, aec, reason):
    caplog.set_level(logging.INFO)
    scp, rec = make_scp()
    echo = dcmtk(ECHOSCU, scp.port, aet=aet, aec=aec)
    assert echo.returncode != 0 and "Association Rejected" in echo.stderr and reason in echo.stderr, echo.stderr
    store = dcmtk(STORESCU, scp.port, str(frames[0]), aet=aet, aec=aec)
    assert store.returncode != 0 and "Association Rejected" in store.stderr and reason in store.stderr
    assert stored_files(scp.spool) == [] and rec.units == []
    rejected = [r.getMessage() for r in caplog.records if "association rejected" in r.getMessage()]
    assert len(rejected) == 2 and all(aet in m and "127.0.0.1" in m for m in rejected)


def test_unknown_sources_accepted_when_configured(make_scp, frames):
    scp, rec = make_scp(reject_unknown_sources=False)
    out = dcmtk(STORESCU, scp.port, str(frames[0]), aet="VISITOR")
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: len(rec.units) == 1)
    assert rec.units[0].source == "unknown" and rec.units[0].calling_ae == "VISITOR"


# ---- storing and grouping --------------------------------------------------------------------------------------
def test_series_becomes_one_unit(make_scp, frames, study):
    scp, rec = make_scp()
    out = dcmtk(STORESCU, scp.port, *map(str, frames))
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_for(lambda: len(rec.units) == 1)
    time.sleep(1.5)  # nothing else arrives
    assert len(rec.units) == 1
    unit = rec.units[0]
    first = pydicom.dcmread(frames[0])
    assert unit.kind == "dicom" and unit.source == "scanner1" and unit.n_objects == N_FRAMES
    assert (unit.calling_ae, unit.called_ae, unit.peer) == ("SCANNER1", NODE_AE, "127.0.0.1")
    assert unit.path.parent == scp.spool / "units" and unit.path.is_dir()
    assert unit.attributes == {
        "Modality": "MR", "SOPClassUID": MRImageStorage, "SeriesDescription": first.SeriesDescription,
        "ProtocolName": first.ProtocolName, "StudyInstanceUID": first.StudyInstanceUID,
        "SeriesInstanceUID": first.SeriesInstanceUID}
    names = sorted(p.name for p in unit.path.glob("*.dcm"))
    assert names == sorted(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in frames)
    for f in frames:
        mine = pydicom.dcmread(unit.path / f"{pydicom.dcmread(f).SOPInstanceUID}.dcm")
        assert mine.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, "1.2.840.10008.1.2")
        np.testing.assert_array_equal(mine.pixel_array, pydicom.dcmread(f).pixel_array)
    img = image_study_from_dicom(unit.path)  # the pipeline reader takes the unit folder as it is
    assert img.pixels.shape == (N_FRAMES, 1, 16, 16)
    assert not list((scp.spool / "incoming").rglob("*.dcm")) and not list(scp.spool.rglob("*.tmp"))
    sidecar = json.loads((scp.spool / "units" / f"{unit.path.name}.json").read_text())
    assert sidecar["source"] == "scanner1" and sidecar["n_objects"] == N_FRAMES and sidecar["kind"] == "dicom"


def test_resend_is_idempotent_and_series_grouping(make_scp, study, frames, tmp_path):
    second = write_dicom_frames(study, tmp_path / "second", images=np.abs(study.fingerprints) * 2,
                                series_number=200)
    grouping = {"default": {"by": "study", "quiet_seconds": 1.0},
                "sources": {"scanner1": {"by": "series", "quiet_seconds": 1.0}}}
    scp, rec = make_scp(grouping=grouping)
    files = [*map(str, frames), *map(str, second), str(frames[0]), str(frames[1])]  # two instances resent
    out = dcmtk(STORESCU, scp.port, *files)
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: len(rec.units) == 2)
    series = {u.attributes["SeriesInstanceUID"]: u for u in rec.units}
    assert set(series) == {pydicom.dcmread(frames[0]).SeriesInstanceUID, pydicom.dcmread(second[0]).SeriesInstanceUID}
    assert [u.n_objects for u in rec.units] == [N_FRAMES, N_FRAMES]


def test_slow_sender_gives_one_unit(make_scp, frames):
    """Three instances 3 s apart, each in its own association, with a 5 s quiet window: one unit."""
    scp, rec = make_scp(grouping={"default": {"by": "study", "quiet_seconds": 5.0}})
    for i, f in enumerate(frames[:3]):
        if i:
            time.sleep(3.0)
        out = dcmtk(STORESCU, scp.port, str(f))
        assert out.returncode == 0, out.stderr
        assert rec.units == []
    assert wait_for(lambda: len(rec.units) == 1, timeout=12)
    time.sleep(0.5)
    assert len(rec.units) == 1 and rec.units[0].n_objects == 3


def test_disk_reserve_refuses_with_out_of_resources(make_scp, frames, caplog):
    scp, rec = make_scp(node={"disk_reserve_mb": 10**12})
    out = dcmtk(STORESCU, scp.port, "-v", str(frames[0]), str(frames[1]))
    text = out.stdout + out.stderr
    assert "Received Store Response (Refused: OutOfResources)" in text, text  # DCMTK's name for 0xA700
    assert stored_files(scp.spool) == []
    assert "0xA700" in caplog.text and "SCANNER1" in caplog.text and "spool disk full" in caplog.text
    time.sleep(1.2)
    assert rec.units == [] and scp.pending_groups() == []


def _associate(port: int, *contexts: str):
    ae = AE(ae_title="SCANNER1")
    for c in contexts:
        ae.add_requested_context(c, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


def test_malformed_datasets_fail_and_the_association_goes_on(make_scp, frames, tmp_path, caplog, monkeypatch):
    scp, rec = make_scp()
    # 1. No StudyInstanceUID.
    ds = pydicom.dcmread(frames[0])
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = "1.2.3.999"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    # 2. A dataset that cannot be decoded: a sequence whose item holds garbage, sent as raw bytes.
    junk = tmp_path / "junk.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.1000"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with junk.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"garbage!" * 3)
    assoc = _associate(scp.port, MRImageStorage)
    try:
        missing = assoc.send_c_store(ds)
        with monkeypatch.context() as m:  # send the file's bytes as they are, without decoding them first
            m.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
            undecodable = assoc.send_c_store(junk)
        good = assoc.send_c_store(pydicom.dcmread(frames[1]))
    finally:
        assoc.release()
    assert missing.Status == 0xC211 and "StudyInstanceUID" in missing.ErrorComment
    assert undecodable.Status == 0xC210 and "decode" in undecodable.ErrorComment
    assert good.Status == 0x0000
    assert "ae=SCANNER1" in caplog.text and "0xC211" in caplog.text and "0xC210" in caplog.text
    assert wait_for(lambda: len(rec.units) == 1) and rec.units[0].n_objects == 1
    assert dcmtk(ECHOSCU, scp.port).returncode == 0  # the server keeps working


def test_association_open_holds_the_group(make_scp, frames):
    scp, rec = make_scp()  # quiet time 1 s
    assoc = _associate(scp.port, MRImageStorage)
    try:
        assert assoc.send_c_store(pydicom.dcmread(frames[0])).Status == 0
        time.sleep(2.0)  # longer than the quiet time, association still open
        (pending,) = scp.pending_groups()
        assert rec.units == [] and pending.seconds_until_release is None and pending.open_associations == 1
        assert (pending.source, pending.n_instances) == ("scanner1", 1)
        assert assoc.send_c_store(pydicom.dcmread(frames[1])).Status == 0
    finally:
        assoc.release()
    assert wait_for(lambda: len(rec.units) == 1)
    assert rec.units[0].n_objects == 2


# ---- ISMRMRD wrapped in Raw Data Storage -----------------------------------------------------------------------
def test_raw_data_storage_with_ismrmrd(make_scp, study, tmp_path):
    h5 = write_ismrmrd(study, tmp_path / "raw.h5")
    ds = wrap_ismrmrd_in_raw_data(h5)
    assert ds.SOPClassUID == RawDataStorage and embedded_ismrmrd(ds) == h5.read_bytes()
    dcm = tmp_path / "raw.dcm"
    ds.save_as(dcm, enforce_file_format=True)
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(dcm)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]
        assert "RawData" in v.stdout + v.stderr and not errors, v.stdout + v.stderr
    scp, rec = make_scp()
    out = dcmtk(STORESCU, scp.port, str(dcm))
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: len(rec.units) == 1)
    unit = rec.units[0]
    assert unit.kind == "mrd" and unit.path.suffix == ".h5" and unit.path.parent == scp.spool / "units"
    assert unit.source == "scanner1" and unit.calling_ae == "SCANNER1"
    assert unit.attributes["trajectory"] == "cartesian" and unit.attributes["sequence"] == f"fisp{N_FRAMES}"
    assert unit.attributes["protocolName"] == study.study.protocol_name
    assert unit.path.read_bytes() == h5.read_bytes()
    back, orig = raw_study_from_hdf5(unit.path), raw_study_from_hdf5(h5)
    assert unit.n_objects == back.data.shape[0]
    np.testing.assert_array_equal(back.data, orig.data)
    assert back.study.study_instance_uid == orig.study.study_instance_uid
    assert not list((scp.spool / "incoming").rglob("*.dcm"))


def test_raw_data_with_a_broken_ismrmrd_file_is_refused(make_scp, study, tmp_path):
    h5 = write_ismrmrd(study, tmp_path / "raw.h5")
    ds = wrap_ismrmrd_in_raw_data(h5)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(h5.read_bytes()[:400])  # HDF5 signature, then truncated
    ds_bad = wrap_ismrmrd_in_raw_data(bad, study.study)
    scp, rec = make_scp()
    assoc = _associate(scp.port, RawDataStorage)
    try:
        status = assoc.send_c_store(ds_bad)
    finally:
        assoc.release()
    assert status.Status == 0xC212 and "ISMRMRD" in status.ErrorComment
    assert stored_files(scp.spool) == [] and rec.units == []
    assert ds.SOPInstanceUID != ds_bad.SOPInstanceUID


# ---- restart safety and handler failures -----------------------------------------------------------------------
def test_restart_releases_groups_left_in_incoming(make_scp, frames, tmp_path, caplog):
    spool = tmp_path / "spool"
    study_uid = pydicom.dcmread(frames[0]).StudyInstanceUID
    left = spool / "incoming" / "scanner1" / study_uid
    left.mkdir(parents=True)
    for f in frames[:4]:
        shutil.copy(f, left / f"{pydicom.dcmread(f).SOPInstanceUID}.dcm")
    (left / ".1.2.3.dcm.deadbeef.tmp").write_bytes(b"half an instance")  # killed mid-write
    empty = spool / "incoming" / "scanner1" / "1.2.3.4"
    empty.mkdir()
    caplog.set_level(logging.INFO, logger="node")
    scp, rec = make_scp(spool=spool)
    assert not (left / ".1.2.3.dcm.deadbeef.tmp").exists() and not empty.exists()
    assert f"source=scanner1 group {study_uid}: 4 instances from a previous run" in caplog.text
    assert wait_for(lambda: len(rec.units) == 1)
    unit = rec.units[0]
    assert unit.source == "scanner1" and unit.n_objects == 4
    assert unit.attributes["StudyInstanceUID"] == study_uid


def test_handler_failure_keeps_the_unit_with_its_sidecar(make_scp, frames, study, tmp_path, caplog):
    spool = tmp_path / "spool"
    failing = Recorder(fail=True)
    scp, _ = make_scp(spool=spool, handler=failing)
    assert dcmtk(STORESCU, scp.port, str(frames[0]), str(frames[1])).returncode == 0
    h5 = write_ismrmrd(study, tmp_path / "raw.h5")
    dcm = tmp_path / "raw.dcm"
    wrap_ismrmrd_in_raw_data(h5).save_as(dcm, enforce_file_format=True)
    assert dcmtk(STORESCU, scp.port, str(dcm)).returncode == 0
    assert wait_for(lambda: len(failing.units) == 2)
    assert "job store is down" in caplog.text and "stays in the spool" in caplog.text
    assert dcmtk(ECHOSCU, scp.port).returncode == 0  # still serving
    scp.stop()
    # Both units stay, each with the sidecar from which the service's start-up rescan rebuilds it.
    kept = sorted(p for p in (spool / "units").iterdir() if not p.name.endswith(".json"))
    assert sorted(p.suffix for p in kept) == ["", ".h5"]
    for path in kept:
        unit = unit_from_disk(path)
        original = next(u for u in failing.units if u.path == path)
        assert unit == original
    assert [u.n_objects for u in failing.units if u.kind == "dicom"] == [2]


def test_whole_node_creates_a_job_for_a_dicom_series(tmp_path, frames):
    """recon-node serve with a route for the series: storescu -> unit -> job (a cheap plugin pipeline)."""
    from tests.integration.node_harness import start_node

    plugin = tmp_path / "plugins" / "scp_test_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "import numpy as np\n"
        "from pipelines.registry import PipelineSpec, register\n"
        "from pipelines.types import ReconImage\n\n"
        "def _run(study, params, ctx):\n"
        "    mean = np.abs(study.pixels).mean(axis=0)\n"
        "    return [ReconImage('image', mean.astype(np.float32), 'mean of the frames', study.geometry)]\n\n"
        "register(PipelineSpec(name='scp_test_mean', input_kind='images', summary='test: mean frame', run=_run))\n")
    config = {
        "node": {"ae_title": NODE_AE, "plugins": ["scp_test_plugin"]},
        "sources": [{"name": "scanner1", "ae_title": "SCANNER1", "hosts": ["127.0.0.1"],
                     "protocols": ["dicom", "mrd"]}],
        "grouping": {"default": {"by": "series", "quiet_seconds": 1.0}},
        "routes": [{"name": "mrf-frames", "match": {"input": "dicom", "modality": "MR"},
                    "pipeline": "scp_test_mean"}],
    }
    node = start_node(tmp_path, config, env={"PYTHONPATH": str(plugin.parent)})
    try:
        out = dcmtk(STORESCU, node.dicom_port, *map(str, frames))
        assert out.returncode == 0, out.stderr
        job = node.wait_job_state("done", timeout=60)  # the plugin pipeline takes a fraction of a second
        assert job.source == "scanner1" and job.pipeline == "scp_test_mean" and job.route == "mrf-frames"
        status = node.status_json()
        (entry,) = status["jobs"]
        assert entry["state"] == "done" and entry["pipeline"] == "scp_test_mean"
        assert entry["source"] == "scanner1" and Path(entry["unit_path"]).parent == node.spool / "units"
        assert len(list(Path(entry["unit_path"]).glob("*.dcm"))) == N_FRAMES
    finally:
        code = node.stop()
    assert code == 0, node.log()[-3000:]
