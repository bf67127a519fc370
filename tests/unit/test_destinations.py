"""Destination plug-ins without a network: the config union (kind -> model, checks worded per kind), the sender's
generic handling of outcomes, STOW-RS answer parsing, and the writer's instance records surviving a restart."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.config import (ConfigError, DicomDestination, DicomwebDestination, FolderDestination, load_config,
                         parse_config, summary)
from node.egress import destinations
from node.egress.destinations import Outcome, SendSettings
from node.egress.destinations.dicomweb import StowRS
from node.egress.dicom_writer import write_outputs
from node.egress.instances import InstanceRecord, read_instance_records, result_instances
from node.egress.outbox import Outbox
from node.egress.sender import Sender
from pipelines.types import Geometry, QuantitativeMap, StudyInfo

STUDY = "1.2.826.0.1.3680043.8.498.41"


def _site(tmp_path, *dests: dict) -> dict:
    return {"node": {"spool_dir": str(tmp_path / "spool")}, "destinations": list(dests),
            "routes": [{"name": "r", "pipeline": "cartesian_frames", "send_to": [d["name"] for d in dests]}]}


def _problems(data: dict) -> dict[str, tuple[str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, check_pipelines=False)
    return {k: (m, h) for k, m, h in ei.value.problems}


def _records(tmp_path, n: int = 3) -> list[InstanceRecord]:
    g = Geometry.centred((4, 4), (40.0, 40.0))
    g.positions = np.array([[-18.0, -18.0, 5.0 * k] for k in range(n)])
    return write_outputs([QuantitativeMap("t1", np.full((n, 4, 4), 900.0), "ms", "T1", g)],
                         StudyInfo(study_instance_uid=STUDY), tmp_path / "dicom", "job-1")


# ---- config: one model per kind ------------------------------------------------------------------------------------
def test_each_kind_loads_from_yaml_and_kind_defaults_to_dicom(tmp_path):
    (tmp_path / "token").write_text("Bearer abc\n")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(_site(
        tmp_path,
        {"name": "pacs", "ae_title": "ORTHANC", "host": "10.0.0.9", "port": 4242},
        {"name": "share", "kind": "folder", "path": "export"},
        {"name": "web", "kind": "dicomweb", "url": "https://vna.example.org/dicom-web/", "auth_token_file": "token",
         "tls_ca": "ca.pem", "timeout_s": 5},
        {"name": "web2", "kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web", "auth_token": "Bearer s3cret"},
    )))
    cfg = load_config(tmp_path / "site.yaml", check_pipelines=False)
    pacs, share, web, web2 = cfg.destinations
    assert isinstance(pacs, DicomDestination) and pacs.kind == "dicom" and pacs.target == "ORTHANC@10.0.0.9:4242"
    assert isinstance(share, FolderDestination) and share.path == tmp_path / "export"
    assert isinstance(web, DicomwebDestination) and web.url == "https://vna.example.org/dicom-web"
    assert (web.auth_token_file, web.tls_ca, web.timeout_s) == (tmp_path / "token", tmp_path / "ca.pem", 5.0)
    text = summary(cfg)
    assert "web: DICOMweb https://vna.example.org/dicom-web, Authorization header" in text
    assert "s3cret" not in text and "s3cret" not in repr(web2) and "s3cret" not in str(web2.model_dump())
    assert web2.auth_token is not None and web2.auth_token.get_secret_value() == "Bearer s3cret"


def test_dicomweb_problems_name_the_key(tmp_path):
    p = _problems(_site(tmp_path, {"name": "web", "kind": "dicomweb"}))
    assert p["destinations[0].url"][0] == "required for a dicomweb destination ('web')"
    assert "DICOMweb root" in p["destinations[0].url"][1]
    p = _problems(_site(tmp_path, {"name": "web", "kind": "dicomweb", "url": "ftp://x/dicom-web"},
                        {"name": "w2", "kind": "dicomweb", "url": "https://u:pw@x/dicom-web"},
                        {"name": "w3", "kind": "dicomweb", "url": "http://x", "host": "x"}))
    assert "not an http:// or https:// URL" in p["destinations[0].url"][0]
    assert "auth_token" in p["destinations[1].url"][0]
    assert p["destinations[2].host"][0] == "a dicomweb destination has no host"
    assert "`kind: dicom`" in p["destinations[2].host"][1]
    (tmp_path / "token").write_text("Bearer t")
    p = _problems(_site(tmp_path, {"name": "web", "kind": "dicomweb", "url": "http://x/dicom-web",
                                   "tls_ca": "/ca.pem", "auth_token": "t", "auth_token_file": str(tmp_path / "token")},
                        {"name": "w2", "kind": "dicomweb", "url": "https://x/dicom-web",
                         "auth_token_file": str(tmp_path / "no"), "tls_ca": "/ca.pem", "tls_verify": False}))
    assert p["destinations[0].tls_ca"][0] == "tls_ca needs an https:// url"
    assert "both auth_token and auth_token_file" in p["destinations[0].auth_token_file"][0]
    assert "is not a readable file" in p["destinations[1].auth_token_file"][0]
    assert "tls_ca would not be used" in p["destinations[1].tls_verify"][0]
    p = _problems(_site(tmp_path, {"name": "x", "kind": "stow", "url": "http://x"}))
    message = p["destinations[0].kind"][0]
    assert "unknown destination kind 'stow'" in message and "dicomweb" in message


def test_every_kind_of_the_union_has_its_module():
    from node.config import DESTINATION_KINDS

    settings = SendSettings()
    samples = {"dicom": DicomDestination(name="a", ae_title="A", host="h", port=1),
               "folder": FolderDestination(name="b", path="/tmp/x"),
               "dicomweb": DicomwebDestination(name="c", url="http://h/dicom-web")}
    assert set(samples) == set(DESTINATION_KINDS)
    for kind, cfg in samples.items():
        dest = destinations.create(cfg, settings)
        assert (dest.kind, dest.name, dest.target) == (kind, cfg.name, cfg.target)
    with pytest.raises(ValueError, match="no destination kind 'ftp'"):
        destinations.create(SimpleNamespace(kind="ftp", name="odd"), settings)  # type: ignore[arg-type]


# ---- the sender: generic over kinds -------------------------------------------------------------------------------
class _Scripted:
    """A destination that answers from a script: per call, a list of states (None: no outcome) or an exception."""

    kind, name, target, audit = "scripted", "s", "nowhere", {}

    def __init__(self, script):
        self.script = list(script)

    def verify(self):
        return None

    def send(self, items):
        step = self.script.pop(0)
        for it, state in zip(items, step, strict=False):
            if isinstance(state, Exception):
                raise state
            if state is not None:
                yield Outcome(it, state, None if state == "sent" else f"scripted {state}", destination_down=False)


def test_sender_records_each_outcome_and_never_leaves_rows_sending(tmp_path):
    records = _records(tmp_path, n=4)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.enqueue(records, "s", "job-1")
    sender = Sender(outbox, [], backoff_base_s=10)
    sender.destinations["s"] = _Scripted([["sent", "failed", "retry", None]])
    assert sender.send_due() == 1
    rows = outbox.items()
    assert [(it.state, it.attempts) for it in rows] == [("sent", 0), ("failed", 1), ("pending", 1), ("pending", 0)]
    assert rows[1].last_error == "scripted failed" and rows[2].last_error == "scripted retry"
    assert [it.id for it in outbox.due()] == [rows[3].id]  # no outcome: due again at once, no attempt counted
    sender.destinations["s"] = _Scripted([[RuntimeError("bug in a plug-in")]])
    assert sender.send_due() == 0
    last = outbox.items()[3]
    assert (last.state, last.attempts) == ("pending", 1) and "bug in a plug-in" in last.last_error
    records[0].path.unlink()
    outbox.mark_retry(rows[0].id, "resend", 0.0)
    sender.send_due()
    assert "no longer exists" in outbox.items()[0].last_error  # checked by the sender, for every kind
    outbox.close()


# ---- STOW-RS answers -------------------------------------------------------------------------------------------------
def _item(uid: str):
    return SimpleNamespace(id=1, job_id="j", path="/x", sop_instance_uid=uid)


def test_stow_answer_decides_per_instance():
    stow = StowRS(DicomwebDestination(name="web", url="http://h/dicom-web"), SendSettings())
    answer = Dataset()
    ok = Dataset()
    ok.ReferencedSOPInstanceUID = "1.1"
    answer.ReferencedSOPSequence = Sequence([ok])
    failed = []
    for uid, reason in (("1.2", 0x0111), ("1.3", 0xA700), ("1.4", 0xC000), ("1.5", 0x0110)):
        f = Dataset()
        f.ReferencedSOPInstanceUID, f.FailureReason = uid, reason
        failed.append(f)
    answer.FailedSOPSequence = Sequence(failed)
    uids = ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]
    got = {o.item.sop_instance_uid: o for o in stow._read_answer([_item(u) for u in uids], answer)}
    assert {u: got[u].state for u in uids} == {"1.1": "sent", "1.2": "sent", "1.3": "retry", "1.4": "failed",
                                               "1.5": "retry", "1.6": "retry"}
    assert "0xC000" in got["1.4"].error
    assert {o.state for o in stow._read_answer([_item("9.9")], Dataset())} == {"sent"}  # 200, empty body
    assert {o.state for o in stow._read_answer([_item("9.9")], None)} == {"retry"}  # unreadable body


# ---- instance records ------------------------------------------------------------------------------------------------
def test_writer_records_match_the_files_and_the_restart_path_reads_the_same(tmp_path):
    records = _records(tmp_path / "result")
    assert [r.path.name for r in records] == ["t1_0001.dcm", "t1_0002.dcm", "t1_0003.dcm"]
    for r in records:
        ds = pydicom.dcmread(r.path, stop_before_pixels=True)
        assert (r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid) == \
            (ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assert result_instances(tmp_path / "result") == read_instance_records(r.path for r in records) == records
    assert result_instances(None) == [] and result_instances(tmp_path / "missing") == []
    (tmp_path / "junk.dcm").write_text("junk")
    with pytest.raises(ValueError, match="not a readable DICOM"):
        read_instance_records([tmp_path / "junk.dcm"])
