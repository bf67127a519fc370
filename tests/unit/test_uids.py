"""Issue 15 items 2, 3 and 9: UID validation, folder destinations that cannot be led out of their root, output UIDs
unique per node and deterministic per job, file permissions of spool / results / databases."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from node import uids
from node.config import FolderDestination
from node.egress.dicom_writer import write_outputs
from node.egress.instances import InstanceRecord, read_instance_records
from node.egress.outbox import Outbox
from node.egress.sender import Sender
from pipelines.types import Geometry, QuantitativeMap, StudyInfo

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

HOSTILE = ["../../../x", "/tmp/abs", "1.2.3\n4", "1.2.3/../../4", "", " ", "1..2", "01.2", "1.2.", "a.b",
           "1." + "2" * 63, "1.2\x00.3"]


# ---- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1.2.840.10008.1.2", "0", "2.25.329800735698586629295641978511506172918",
                                   "1." + "2" * 62, "1.2.3\x00", " 1.2.3 "])
def test_valid_uids(value):
    assert uids.validate_uid(value) == value.strip(" \x00")


@pytest.mark.parametrize("value", HOSTILE + [None])
def test_invalid_uids_are_refused_with_the_reason(value):
    with pytest.raises(uids.InvalidUID) as e:
        uids.validate_uid(value, "StudyInstanceUID")
    msg = str(e.value)
    assert "StudyInstanceUID" in msg and "\n" not in msg
    assert not uids.is_valid_uid(value)


@pytest.mark.parametrize("parts", [("..", "x"), ("/etc", "x"), ("a/b",), ("1.2\n3",), ("",)])
def test_safe_path_under_refuses_escapes(tmp_path, parts):
    with pytest.raises(uids.InvalidUID):
        uids.safe_path_under(tmp_path, *parts)


def test_safe_path_under_refuses_a_planted_symlink(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    (root / "1.2.3").symlink_to(tmp_path)  # a link in the share pointing out of it
    with pytest.raises(uids.InvalidUID, match="outside"):
        uids.safe_path_under(root, "1.2.3", "4.5")
    assert uids.safe_path_under(root, "1.2.4", "4.5") == root.resolve() / "1.2.4" / "4.5"


# ---- outputs: study UID from an MRD header, folder destination -------------------------------------------------
def _map(kind: str = "t1") -> QuantitativeMap:
    g = Geometry(matrix=(8, 8), pixel_spacing_mm=(2.0, 2.0), slice_thickness_mm=5.0,
                 orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), positions=np.array([[0.0, 0.0, 0.0]]),
                 frame_of_reference_uid="")
    return QuantitativeMap(kind, np.full((1, 8, 8), 1000.0, np.float32), "ms", f"{kind} map", g)


@pytest.mark.parametrize("bad", HOSTILE[:4])
def test_hostile_study_uid_is_replaced_and_never_becomes_a_path(tmp_path, caplog, bad):
    """The MRD header's studyInstanceUID flows into the output DICOM and from there into a folder destination's
    path: ``../../../x``, an absolute path and a newline used to write outside the share."""
    caplog.set_level(logging.WARNING)
    study = StudyInfo(patient_id="P1", study_instance_uid=bad)
    files = write_outputs([_map()], study, tmp_path / "out", job_id="1", uid_root="2.25.1234")
    ds = pydicom.dcmread(files[0].path)
    assert uids.is_valid_uid(ds.StudyInstanceUID) and ds.StudyInstanceUID != bad
    assert "job 1" in caplog.text and "StudyInstanceUID" in caplog.text and "generated UID" in caplog.text
    share = tmp_path / "deep" / "share"
    share.mkdir(parents=True)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sender = Sender(outbox, [FolderDestination(name="share", path=share)])
    outbox.enqueue(files, "share", "1")
    assert sender.send_due() == 1
    written = [p for p in tmp_path.rglob("*.dcm") if p.is_file() and "out" not in p.parts]
    assert len(written) == 1 and share in written[0].parents
    assert written[0].relative_to(share).parts[0] == ds.StudyInstanceUID
    outbox.close()


def test_folder_destination_refuses_files_with_hostile_uids(tmp_path):
    """Files queued by anyone (not only our writer): a hostile UID fails the row with the reason, nothing is
    written outside -- or inside -- the share."""
    share = tmp_path / "a" / "b" / "share"
    share.mkdir(parents=True)
    files = []
    for i, bad in enumerate(["../../../x", "/tmp/abs-recon-node-test", "1.2.3\n4"]):
        ds = pydicom.Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = f"1.2.3.{i}"
        ds.StudyInstanceUID = bad
        ds.SeriesInstanceUID = "1.2.3.9"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp_path / f"bad{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sender = Sender(outbox, [FolderDestination(name="share", path=share)])
    outbox.enqueue(read_instance_records(files), "share", "7")
    assert sender.send_due() == 0
    items = outbox.items()
    assert [it.state for it in items] == ["failed"] * 3
    assert all("not a DICOM UID" in (it.last_error or "") for it in items)
    assert list(share.iterdir()) == [] and not (tmp_path / "x").exists()
    assert not Path("/tmp/abs-recon-node-test").exists()
    outbox.close()


# ---- output UIDs unique per node ---------------------------------------------------------------------------------
def test_node_root_is_random_persisted_and_reused(tmp_path):
    a = uids.load_or_create_root(tmp_path / "a")
    b = uids.load_or_create_root(tmp_path / "b")
    assert a != b and uids.is_valid_uid(a) and a.startswith("2.25.")
    assert uids.load_or_create_root(tmp_path / "a") == a  # persisted
    assert json.loads((tmp_path / "a" / uids.IDENTITY_FILE).read_text())["uid_root"] == a
    assert uids.load_or_create_root(tmp_path / "c", "1.2.826.0.1.3680043.10.999") == "1.2.826.0.1.3680043.10.999"
    (tmp_path / "a" / uids.IDENTITY_FILE).write_text("{broken")
    with pytest.raises(uids.InvalidUID, match="damaged"):
        uids.load_or_create_root(tmp_path / "a")
    with pytest.raises(uids.InvalidUID):
        uids.load_or_create_root(tmp_path / "d", "1.2.03")


def _series_uids(files: list[InstanceRecord]) -> tuple[set[str], set[str]]:
    dss = [pydicom.dcmread(r.path) for r in files]
    return {d.SeriesInstanceUID for d in dss}, {d.SOPInstanceUID for d in dss}


def test_two_spools_with_the_same_job_ids_give_different_uids(tmp_path):
    """Job ids restart at 1 in every spool: the same job id on two nodes (or after a spool reset) and even the
    same input must not give the same Series / SOP Instance UIDs; a resend of a job gives the same ones."""
    study = StudyInfo(patient_id="P1", study_instance_uid="1.2.3.4")
    roots = [uids.load_or_create_root(tmp_path / f"spool{i}") for i in range(2)]
    run = [write_outputs([_map("t1"), _map("t2")], study, tmp_path / f"out{i}", job_id="1", uid_root=r)
           for i, r in enumerate(roots)]
    (s0, i0), (s1, i1) = _series_uids(run[0]), _series_uids(run[1])
    assert len(s0) == 2 and not s0 & s1 and not i0 & i1
    again = write_outputs([_map("t1"), _map("t2")], study, tmp_path / "again", job_id="1", uid_root=roots[0])
    assert _series_uids(again) == (s0, i0)  # deterministic for a resend of the same job
    other_patient = StudyInfo(patient_id="P2", study_instance_uid="1.2.3.5")
    s2, i2 = _series_uids(write_outputs([_map("t1")], other_patient, tmp_path / "o", job_id="1", uid_root=roots[0]))
    assert not s2 & s0 and not i2 & i0  # same node, same job id (reset spool), other input: other UIDs
    org = write_outputs([_map("t1")], study, tmp_path / "org", job_id="1", uid_root="1.2.826.0.1.3680043.10.999")
    for f in org:
        d = pydicom.dcmread(f.path)
        assert d.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.") and uids.is_valid_uid(d.SOPInstanceUID)


# ---- file permissions (item 9) -------------------------------------------------------------------------------------
CHILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from node.durable import restrict_permissions, write_durably, copy_durably
    from node.jobs import JobStore
    from node.egress.outbox import Outbox
    spool = Path(sys.argv[1])
    restrict_permissions([spool], sys.argv[2] or None)
    (spool / "units" / "u1").mkdir(parents=True)
    write_durably(spool / "units" / "u1" / "a.dcm", b"x")
    copy_durably(spool / "units" / "u1" / "a.dcm", spool / "results" / "1" / "dicom" / "b.dcm")
    import numpy as np
    np.savez(spool / "results" / "1" / "maps.npz", a=np.zeros(2))
    JobStore(spool / "jobs.sqlite").close()
    Outbox(spool / "outbox.sqlite").close()
''')


def test_spool_results_and_databases_are_0640_0750(tmp_path):
    spool = tmp_path / "spool"
    (spool / "old").mkdir(parents=True)
    (spool / "old" / "leftover.dcm").write_bytes(b"old")
    os.chmod(spool / "old" / "leftover.dcm", 0o644)
    os.chmod(spool / "old", 0o755)
    group = str(os.getgid())
    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", CHILD, str(spool), group], capture_output=True, text=True,
                       cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)
    assert p.returncode == 0, p.stderr
    entries = [spool, *spool.rglob("*")]
    names = {e.name for e in entries}
    assert {"jobs.sqlite", "outbox.sqlite", "maps.npz", "a.dcm", "b.dcm", "leftover.dcm"} <= names
    for e in entries:
        mode = stat.S_IMODE(e.stat().st_mode)
        if e.is_dir():
            assert mode & 0o7777 == 0o2750, (e, oct(mode))  # with a group: set-group-ID, so new files get it
        else:
            assert mode & 0o027 == 0 and mode & 0o400, (e, oct(mode))  # at most 0640
        assert e.stat().st_gid == int(group)


@pytest.mark.parametrize("root, ok", [("1.2.826.0.1.3680043.10.999", True), ("1.02.3", False),
                                      ("../x", False), ("1." + "2" * 45, False)])
def test_config_checks_uid_root(tmp_path, root, ok):
    from node.config import ConfigError, parse_config

    data = {"node": {"spool_dir": str(tmp_path), "uid_root": root}}
    if ok:
        assert parse_config(data, check_pipelines=False).node.uid_root == root
    else:
        with pytest.raises(ConfigError, match="node.uid_root"):
            parse_config(data, check_pipelines=False)
