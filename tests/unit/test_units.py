"""The ingest contract: the unit's sidecar, rebuilding a unit from the spool, routing attributes, routed once."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from conftest_sim import make_study
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from node.config import parse_config
from node.ingest import attributes, mrd_server
from node.ingest.units import IngestUnit, save_sidecar, sidecar_path, unit_from_disk
from pipelines.sim.mrd_writer import write_ismrmrd


def _dicom_file(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.6"
    ds.Modality = "MR"
    ds.SeriesDescription = "MRF brain"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sidecar_round_trip_for_both_kinds(tmp_path):
    h5 = write_ismrmrd(make_study("cartesian"), tmp_path / "mrd-1.h5")
    folder = _dicom_file(tmp_path / "dicom-1" / "a.dcm").parent
    for unit in (IngestUnit(kind="mrd", path=h5, source="scanner", peer="10.0.0.9",
                            attributes={"trajectory": "cartesian"}, n_objects=40),
                 IngestUnit(kind="dicom", path=folder, source="pacs", calling_ae="MR1", called_ae="RECON",
                            attributes={"Modality": "MR"}, n_objects=1)):
        written = save_sidecar(unit)
        assert written == sidecar_path(unit.path) and written.name == unit.path.name.removesuffix(".h5") + ".json"
        assert unit_from_disk(unit.path) == unit


def test_unit_without_sidecar_is_rebuilt_from_its_data(tmp_path):
    h5 = write_ismrmrd(make_study("radial"), tmp_path / "mrd-2.h5")
    unit = unit_from_disk(h5)
    assert unit is not None and unit.kind == "mrd" and unit.source == ""
    assert unit.attributes["trajectory"] == "radial" and unit.n_objects == 40
    folder = _dicom_file(tmp_path / "dicom-2" / "b.dcm").parent
    unit = unit_from_disk(folder)
    assert unit is not None and unit.kind == "dicom" and unit.n_objects == 1
    assert unit.attributes == {"Modality": "MR", "SOPClassUID": MRImageStorage, "SeriesDescription": "MRF brain",
                               "ProtocolName": "", "StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.4.6"}
    sidecar_path(folder).write_text("{not json")  # a damaged sidecar: rebuilt from the data all the same
    assert unit_from_disk(folder).attributes["Modality"] == "MR"
    assert unit_from_disk(tmp_path / "nothing-here") is None


def test_dicom_attributes_come_from_one_place(tmp_path):
    path = _dicom_file(tmp_path / "c.dcm")
    assert attributes.from_dicom_file(path) == attributes.from_dicom(pydicom.dcmread(path))


def test_the_service_routes_each_unit_once_and_the_mrd_server_never(tmp_path, monkeypatch):
    from node import service as service_mod

    assert not hasattr(mrd_server, "route")  # ingest hands units over; routing is the service's alone
    cfg = parse_config({"node": {"spool_dir": str(tmp_path / "spool"), "disk_reserve_mb": 1},
                        "routes": [{"name": "inline", "match": {"input": "mrd", "protocol_name": "^inline$"},
                                    "pipeline": "no_such_pipeline", "reply_over_mrd": True},
                                   {"name": "queued", "match": {"input": "mrd", "trajectory": "cartesian"},
                                    "pipeline": "no_such_pipeline"}]}, check_pipelines=False)
    calls = []
    real_route = service_mod.route
    monkeypatch.setattr(service_mod, "route", lambda c, u: calls.append(u) or real_route(c, u))
    svc = service_mod.NodeService(cfg)
    try:
        def unit(name: str, **attrs: str) -> IngestUnit:
            path = cfg.node.units_dir / name
            path.write_bytes(b"")
            return IngestUnit(kind="mrd", path=path, source="scanner", attributes=attrs)

        queued = svc.handle_unit(unit("a.h5", trajectory="cartesian"), inline=True)
        assert (queued.state, queued.route, queued.result) == ("queued", "queued", None)
        unrouted = svc.handle_unit(unit("b.h5", trajectory="spiral"))
        assert (unrouted.state, unrouted.route) == ("unrouted", None)
        ran = svc.handle_unit(unit("c.h5", trajectory="cartesian", protocolName="inline"), inline=True)
        assert ran.route == "inline" and ran.result is not None and ran.result.state == ran.state == "failed"
        assert "no_such_pipeline" in ran.result.error
        assert len(calls) == 3
        assert svc.store.get(queued.job_id).state == "queued" and svc.store.get(ran.job_id).state == "failed"
    finally:
        svc.store.close()
        svc.egress.outbox.close()


def test_executor_is_chosen_by_config_kind(tmp_path):
    """The service sees an executor built from ``node.executor.kind``; the local one runs queued jobs in threads."""
    from node.config import parse_config
    from node.executors import make_executor
    from node.executors.local import LocalExecutor
    from node.jobs import JobStore

    cfg = parse_config({"node": {"spool_dir": str(tmp_path), "workers": 2, "executor": {"kind": "local"}},
                        "destinations": [], "routes": []})
    ex = make_executor(cfg, JobStore(tmp_path / "jobs.sqlite"))
    assert isinstance(ex, LocalExecutor) and ex.busy == 0
    ex.start()
    assert len(ex._threads) == 2
    assert ex.stop(timeout=5)
    with pytest.raises(ValueError, match="executor"):
        parse_config({"node": {"spool_dir": str(tmp_path), "executor": {"kind": "cluster"}},
                      "destinations": [], "routes": []})
