"""Issue 15, jobs side: audit log, node deaths counted apart, deterministic failures fail at once, completeness
of raw input, restart re-arm keeps a study in one group, spool/tmp cleaned at start, `retry` / `resend`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from node import audit
from node.config import parse_config
from node.ingest.grouping import QuietWindowGrouper
from node.jobs import JobStore


# ---- audit log --------------------------------------------------------------------------------------------------
@pytest.fixture
def audit_file(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"
    audit.configure(path)
    yield path
    audit.configure(None)


def test_audit_is_a_noop_until_configured(tmp_path):
    audit.configure(None)
    audit.event("job.state", job_id="j-1")  # must not raise, must not write anywhere
    assert audit.configured_path() is None


def test_audit_lines_are_json_without_patient_fields_and_threads_do_not_interleave(audit_file):
    def burst(t: int) -> None:
        for i in range(200):
            audit.event("mrd.connection.accepted", actor_ip="10.0.0.%d" % t, source="scanner", n=i,
                        patient_name="Doe^Jane", PatientBirthDate="19700101", study_uid="1.2.3")

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = audit_file.read_text().splitlines()
    assert len(lines) == 8 * 200
    records = [json.loads(line) for line in lines]  # every line is one whole JSON object
    assert {r["kind"] for r in records} == {"mrd.connection.accepted"}
    assert all(r["outcome"] == "success" and r["time"].endswith("Z") and r["study_uid"] == "1.2.3" for r in records)
    assert "Doe" not in audit_file.read_text() and "19700101" not in audit_file.read_text()
    assert oct(audit_file.stat().st_mode & 0o777) == oct(0o640)


def test_job_state_changes_are_audited(tmp_path, audit_file):
    s = JobStore(tmp_path / "jobs.sqlite", max_attempts=2)
    job, _ = s.create("/u/1", "mrd", "scanner", route="r", pipeline="p")
    s.claim()
    s.fail(job.id, "OSError: disk", 2)
    s.claim()
    s.finish(job.id, "/r")
    s.mark_sent(job.id)
    states = [json.loads(line)["state"] for line in audit_file.read_text().splitlines()
              if json.loads(line)["kind"] == "job.state"]
    assert states == ["queued", "running", "queued", "running", "done", "sent"]


# ---- node deaths vs own errors ----------------------------------------------------------------------------------
def test_node_deaths_do_not_use_up_the_jobs_own_attempts(tmp_path):
    path = tmp_path / "jobs.sqlite"
    s = JobStore(path, max_attempts=1, max_node_deaths=5)
    job, _ = s.create("/u/1", "mrd")
    for kill in range(4):  # the node is killed 4 times while the job runs
        assert s.claim().id == job.id
        s.close()
        s = JobStore(path, max_attempts=1, max_node_deaths=5)
        assert s.recover() == [job.id], f"kill {kill + 1}"
    j = s.get(job.id)
    assert j.state == "queued" and j.node_deaths == 4 and j.attempts == 4
    s.claim()
    s.recover()  # fifth death: the node.max_node_deaths limit stops it
    j = s.get(job.id)
    assert j.state == "failed" and "node.max_node_deaths is 5" in j.error and "5 times" in j.error


def test_own_error_after_node_deaths_names_max_attempts(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite", max_attempts=2, max_node_deaths=5)
    job, _ = s.create("/u/1", "mrd")
    s.claim()
    s.recover()  # one death
    s.claim()
    assert s.fail(job.id, "RuntimeError: CUDA error") == "queued"  # 1 own failure of 2
    s.claim()
    assert s.fail(job.id, "RuntimeError: CUDA error") == "failed"
    j = s.get(job.id)
    assert j.attempts == 3 and j.node_deaths == 1
    assert "node.max_attempts is 2" in j.error and "2 failed attempt(s)" in j.error


def test_permanent_failure_fails_at_once_and_requeue_resets(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite", max_attempts=3)
    job, _ = s.create("/u/1", "mrd", route="old", pipeline="p")
    s.claim()
    assert s.fail(job.id, "ValueError: unknown parameter", permanent=True) == "failed"
    j = s.get(job.id)
    assert j.attempts == 1 and "not retried" in j.error and f"recon-node retry {job.id}" in j.error
    j = s.requeue(job.id, route="new", pipeline="q", params={"a": 1}, send_to=["pacs"])
    assert (j.state, j.attempts, j.node_deaths, j.error, j.route, j.pipeline, j.params, j.send_to) == \
        ("queued", 0, 0, None, "new", "q", {"a": 1}, ["pacs"])
    with pytest.raises(ValueError, match="queued"):
        s.requeue(job.id)


def test_old_database_gets_the_node_deaths_column(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                     "unit_path TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, source TEXT NOT NULL DEFAULT '', route TEXT, "
                     "pipeline TEXT, params TEXT NOT NULL DEFAULT '{}', send_to TEXT NOT NULL DEFAULT '[]', "
                     "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, log TEXT NOT NULL "
                     "DEFAULT '', result_dir TEXT, attributes TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, "
                     "updated REAL NOT NULL, started REAL, finished REAL);"
                     "INSERT INTO jobs (id, unit_path, kind, state, attempts, created, updated) "
                     "VALUES ('j-old', '/u/old', 'mrd', 'running', 1, 0, 0);")
    db.commit()
    db.close()
    s = JobStore(path)
    assert s.recover() == ["j-old"] and s.get("j-old").node_deaths == 1


# ---- worker: deterministic failures, completeness ------------------------------------------------------------------
def _site(tmp_path: Path, routes: list[dict], **node) -> object:
    return parse_config({"node": {"spool_dir": str(tmp_path / "spool"), "disk_reserve_mb": 1, "max_attempts": 3,
                                  **node},
                         "routes": routes}, check_pipelines=False)


@pytest.fixture(scope="module")
def small_study():
    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study

    s = fisp_sequence()
    seq = MRFSequence("fisp12", s.flip_angles_deg[:12], s.tr_ms[:12], s.te_ms[:12], ti_ms=s.ti_ms)
    return simulate_study("brain", seq, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50), matrix=16)


def _unit_file(study, path: Path, keep_frames: int | None = None) -> Path:
    """The study as an ISMRMRD file, optionally with only the first ``keep_frames`` frames' readouts."""
    import h5py

    from pipelines.sim.mrd_writer import write_ismrmrd

    write_ismrmrd(study, path)
    if keep_frames is not None:
        with h5py.File(path, "r+") as f:
            ds = f["dataset"]["data"]
            rows = ds[:]
            keep = rows[rows["head"]["idx"]["repetition"] < keep_frames]
            del f["dataset"]["data"]
            f["dataset"].create_dataset("data", data=keep, maxshape=(None,))
    return path


def _run_job(cfg, store, unit: Path, route: str, pipeline: str, params: dict) -> tuple:
    from node.worker import Worker

    job, _ = store.create(unit, "mrd", "scanner", route=route, pipeline=pipeline, params=params)
    claimed = store.claim()
    assert claimed.id == job.id
    result = Worker(cfg, store).run_now(claimed)
    return result, store.get(job.id)


@pytest.mark.parametrize("pipeline,params,expect", [
    ("no_such_pipeline", {}, "no_such_pipeline"),
    ("cartesian_frames", {"no_such_param": 1}, "no_such_param"),
])
def test_deterministic_failures_are_not_retried(tmp_path, small_study, pipeline, params, expect):
    cfg = _site(tmp_path, [{"name": "r", "pipeline": "cartesian_frames"}])
    store = JobStore(cfg.node.database_path, max_attempts=3)
    unit = _unit_file(small_study, tmp_path / "u.h5")
    result, job = _run_job(cfg, store, unit, "r", pipeline, params)
    assert result.state == "failed" and job.state == "failed" and job.attempts == 1, job.error
    assert expect in job.error and "not retried" in job.error and "deterministic" in job.log


def test_unreadable_input_fails_at_once(tmp_path):
    cfg = _site(tmp_path, [{"name": "r", "pipeline": "cartesian_frames"}])
    store = JobStore(cfg.node.database_path, max_attempts=3)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file at all")
    result, job = _run_job(cfg, store, bad, "r", "cartesian_frames", {})
    assert job.state == "failed" and job.attempts == 1 and "not retried" in job.error


def test_transient_failure_is_retried(tmp_path, small_study, monkeypatch):
    from node import run as run_mod

    cfg = _site(tmp_path, [{"name": "r", "pipeline": "cartesian_frames"}])
    store = JobStore(cfg.node.database_path, max_attempts=3)
    unit = _unit_file(small_study, tmp_path / "u.h5")

    def disk_gone(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(run_mod, "_publish", disk_gone)  # the results' rename into place
    result, job = _run_job(cfg, store, unit, "r", "cartesian_frames", {"frames": "0"})
    assert result.state == "queued" and job.state == "queued" and job.attempts == 1


def test_incomplete_raw_input_fails_unless_route_allows_partial(tmp_path, small_study):
    unit = _unit_file(small_study, tmp_path / "partial.h5", keep_frames=9)  # 9 of 12 frames
    cfg = _site(tmp_path, [{"name": "strict", "pipeline": "cartesian_frames"},
                           {"name": "lenient", "pipeline": "cartesian_frames", "allow_partial": True}])
    store = JobStore(cfg.node.database_path, max_attempts=3)
    result, job = _run_job(cfg, store, unit, "strict", "cartesian_frames", {"frames": "0"})
    assert job.state == "failed" and job.attempts == 1
    assert "incomplete input: 9 of 12 frames" in job.error and "allow_partial" in job.error
    assert not (cfg.node.results_dir / job.id).exists()  # nothing made from partial data
    unit2 = _unit_file(small_study, tmp_path / "partial2.h5", keep_frames=9)
    result, job = _run_job(cfg, store, unit2, "lenient", "cartesian_frames", {"frames": "0"})
    assert job.state == "done", job.error
    assert "processed anyway" in job.log and "9 of 12 frames" in job.log


def test_completeness_counts_frames_slices_and_short_frames(small_study):
    import ismrmrd.xsd as x

    from node.ingest.units import raw_completeness
    from pipelines.sim.mrd_writer import build_header

    header = build_header(small_study)
    n_f, n_r = small_study.lines.shape
    frame = np.repeat(np.arange(n_f), n_r)
    sl = np.zeros_like(frame)
    assert raw_completeness(header, frame, sl, n_f).complete
    c = raw_completeness(header, frame[: n_r * 3], sl[: n_r * 3], n_f)  # a 3-frame subset
    assert (c.received_frames, c.expected_frames) == (3, n_f) and "3 of 12 frames" in c.problem()
    c = raw_completeness(header, frame[:-2], sl[:-2], n_f)  # the last frame cut short
    assert c.received_frames == n_f and c.short_frames == 1 and "fewer than" in c.problem()
    header.encoding[0].encodingLimits.slice = x.limitType(minimum=0, maximum=2, center=1)
    c = raw_completeness(header, frame, sl, n_f)
    assert "1 of 3 slices" in c.problem()


# ---- ingest edges ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Failed to convert value")
def test_unknown_trajectory_is_a_header_error(small_study):
    import ismrmrd.xsd as x

    from node.ingest.attributes import HeaderError, from_mrd_header
    from pipelines.sim.mrd_writer import build_header

    xml = build_header(small_study).toXML()
    xml = xml if isinstance(xml, str) else xml.decode()
    bad = xml.replace("<trajectory>cartesian</trajectory>", "<trajectory>zigzag</trajectory>")
    header = x.CreateFromDocument(bad.encode())
    with pytest.raises(HeaderError, match="'zigzag', not one of the ISMRMRD trajectory types"):
        from_mrd_header(header)


def test_restart_rearmed_group_keeps_collecting_the_same_study():
    now = [0.0]
    released = []
    g = QuietWindowGrouper(released.append, clock=lambda: now[0], restart_grace=60)
    g.arm("scanner", "1.2.3", Path("/in/1.2.3"), 5, n_instances=60)  # found on disk after a kill
    now[0] = 20.0  # the sender backs off for 20 s, far beyond the 5 s quiet time
    assert g.poll() == []
    g.hold("scanner", "1.2.3", Path("/in/1.2.3"), 5, association=1)
    for _ in range(60):
        g.touch("scanner", "1.2.3")
    g.association_closed(1)
    now[0] = 26.0
    assert [(r.key, r.n_instances) for r in g.poll()] == [("1.2.3", 120)]  # one unit, the whole study
    assert g.poll() == [] and released and len(released) == 1


def test_start_cleans_spool_tmp(tmp_path):
    from node.service import NodeService

    cfg = _site(tmp_path, [])
    tmp = cfg.node.tmp_dir
    tmp.mkdir(parents=True)
    (tmp / "mrd-x.h5.partial").write_bytes(b"half")
    (tmp / "result-j-1-abcd").mkdir()
    (tmp / "result-j-1-abcd" / "maps.npz").write_bytes(b"half")
    svc = NodeService(cfg)
    try:
        assert svc.clean_tmp() == 2 and list(tmp.iterdir()) == []
    finally:
        svc.store.close()


# ---- CLI retry / resend -------------------------------------------------------------------------------------------
def _write_site(tmp_path: Path, routes: list[dict], destinations: list[dict] | None = None) -> Path:
    import yaml

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"node": {"spool_dir": str(tmp_path / "spool"), "disk_reserve_mb": 1},
                                    "sources": [{"name": "scanner", "hosts": ["127.0.0.1"]}],
                                    "destinations": destinations or [], "routes": routes}))
    return path


def test_cli_retry_reroutes_a_failed_job(tmp_path, small_study, capsys):
    from node.cli import main

    site = _write_site(tmp_path, [{"name": "fixed", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
                                   "params": {"frames": "0"}}])
    spool = tmp_path / "spool"
    (spool / "units").mkdir(parents=True)
    unit = _unit_file(small_study, spool / "units" / "mrd-1.h5")
    store = JobStore(spool / "jobs.sqlite")
    job, _ = store.create(unit, "mrd", "scanner", route="broken", pipeline="no_such_pipeline")
    store.claim()
    store.fail(job.id, "ValueError: unknown pipeline", permanent=True)
    store.close()
    assert main(["retry", job.id, "--config", str(site)]) == 0
    assert "queued again" in capsys.readouterr().out
    j = JobStore(spool / "jobs.sqlite").get(job.id)
    assert (j.state, j.attempts, j.route, j.pipeline, j.params) == \
        ("queued", 0, "fixed", "cartesian_frames", {"frames": "0"})
    assert main(["retry", job.id, "--config", str(site)]) == 2  # queued already: refused with a reason
    assert "is queued" in capsys.readouterr().err


def test_cli_resend_requeues_delivered_outputs(tmp_path, capsys):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    from node.cli import main
    from node.egress.instances import read_instance_records
    from node.egress.outbox import PENDING, Outbox

    site = _write_site(tmp_path, [{"name": "r", "pipeline": "cartesian_frames", "send_to": ["share"]}],
                       [{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}])
    spool = tmp_path / "spool"
    result = spool / "results" / "j-1" / "dicom" / "t1"
    result.mkdir(parents=True)
    for i in range(3):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.save_as(result / f"{i}.dcm", enforce_file_format=True)
    store = JobStore(spool / "jobs.sqlite")
    job, _ = store.create(spool / "units" / "u", "mrd", "scanner", route="r", pipeline="cartesian_frames",
                          send_to=["share"])
    store.claim()
    store.finish(job.id, result.parent.parent)  # <spool>/results/j-1
    store.mark_sent(job.id)
    store.close()
    outbox = Outbox(spool / "outbox.sqlite")
    outbox.enqueue(read_instance_records(sorted(result.glob("*.dcm"))), "share", job.id)
    outbox.mark_sent([it.id for it in outbox.items(job_id=job.id)])
    outbox.close()
    assert main(["resend", job.id, "--config", str(site)]) == 0, capsys.readouterr().err
    assert "3 instance(s) queued again" in capsys.readouterr().out
    outbox = Outbox(spool / "outbox.sqlite", recover=False)
    items = outbox.items(job_id=job.id)
    assert len(items) == 3 and {it.state for it in items} == {PENDING}  # were SENT, due again
    outbox.close()
    assert JobStore(spool / "jobs.sqlite").get(job.id).state == "done"  # becomes sent again once delivered


def test_audit_reserved_field_names_do_not_clash(audit_file):
    audit.event("unit.stored", kind="mrd", outcome="success", time="x")
    audit.event("mrd.connection.refused", "refused", actor_ip="10.0.0.1")
    a, b = (json.loads(line) for line in audit_file.read_text().splitlines())
    assert (a["kind"], a["object_kind"], a["object_time"], a["outcome"]) == ("unit.stored", "mrd", "x", "success")
    assert (b["kind"], b["outcome"]) == ("mrd.connection.refused", "refused")


def test_mrd_tls_settings_are_checked(tmp_path):
    from node.config import ConfigError

    base = {"spool_dir": str(tmp_path / "spool"), "mrd_tls_port": 9003}
    with pytest.raises(ConfigError) as e:
        parse_config({"node": base}, check_pipelines=False)
    assert ("node.mrd_tls_port", "MRD over TLS needs the node's certificate") == e.value.problems[0][:2]
    with pytest.raises(ConfigError) as e:
        parse_config({"node": {**base, "tls": {"cert": "c.pem", "key": "k.pem", "require_client_cert": True}}},
                     check_pipelines=False)
    assert e.value.problems[0][0] == "node.tls.ca"
    cfg = parse_config({"node": {**base, "tls": {"cert": str(tmp_path / "missing.pem"), "key": "k.pem"}}},
                       check_pipelines=False)
    from node.ingest.mrd_server import tls_server_context

    with pytest.raises(ValueError, match="node.tls: cannot load the certificate"):
        tls_server_context(cfg)
