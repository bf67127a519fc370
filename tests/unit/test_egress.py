"""Egress wiring without a network: done jobs -> outbox -> folder destination -> job state ``sent``; status."""

from __future__ import annotations

import numpy as np

from node.config import parse_config
from node.egress.dicom_writer import write_outputs
from node.egress.egress import Egress, read_status
from node.jobs import JobStore
from pipelines.types import Geometry, QuantitativeMap, StudyInfo

STUDY = "1.2.826.0.1.3680043.8.498.31"


def _cfg(tmp_path, send_to=("share",)):
    return parse_config({
        "node": {"spool_dir": str(tmp_path / "spool")},
        "destinations": [{"name": "share", "kind": "folder", "path": str(tmp_path / "share")},
                         {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
        "egress": {"backoff_base_s": 0.1, "backoff_max_s": 0.2},
        "routes": [{"name": "r", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
                    "send_to": list(send_to)}],
    }, check_pipelines=False)


def _done_job(store: JobStore, tmp_path, name: str, send_to: list[str]):
    job, _ = store.create(tmp_path / f"{name}.h5", "mrd", "scanner", route="r", pipeline="cartesian_frames",
                          send_to=send_to)
    store.claim()
    result = tmp_path / "spool" / "results" / job.id
    g = Geometry.centred((4, 4), (40.0, 40.0))
    g.positions = np.array([[-18.0, -18.0, 0.0], [-18.0, -18.0, 5.0]])
    records = write_outputs([QuantitativeMap("t1", np.full((2, 4, 4), 900.0), "ms", "T1", g)],
                            StudyInfo(study_instance_uid=STUDY), result / "dicom", job.id)
    store.finish(job.id, result)
    return store.get(job.id), records


def test_done_job_reaches_the_folder_and_becomes_sent(tmp_path):
    cfg = _cfg(tmp_path)
    store = JobStore(cfg.node.database_path)
    job, records = _done_job(store, tmp_path, "a", ["share"])
    egress = Egress(cfg, store)
    egress.on_done(job, [], tmp_path / "spool" / "results" / job.id, records)
    assert egress.sender.send_due() == 2
    assert store.get(job.id).state == "sent"
    assert len(list((tmp_path / "share" / STUDY).rglob("*.dcm"))) == 2
    dests, per_job = read_status(cfg, [job.id])
    share = next(d for d in dests if d["name"] == "share")
    assert (share["sent"], share["pending"], share["kind"]) == (2, 0, "folder")
    assert per_job[job.id]["sent"] == per_job[job.id]["total"] == 2
    egress.outbox.close()


def test_start_up_queues_done_jobs_a_stopped_node_never_queued(tmp_path):
    cfg = _cfg(tmp_path)
    store = JobStore(cfg.node.database_path)
    job, _ = _done_job(store, tmp_path, "b", ["share"])  # done, then the node died before the on_done hook
    egress = Egress(cfg, store)
    egress.reconcile()
    assert [it.state for it in egress.outbox.items(job_id=job.id)] == ["pending", "pending"]
    egress.sender.send_due()
    assert store.get(job.id).state == "sent"
    egress.outbox.close()


def test_unreachable_destination_keeps_the_job_done_with_pending_rows(tmp_path):
    cfg = _cfg(tmp_path, send_to=("share", "pacs"))
    store = JobStore(cfg.node.database_path)
    job, _ = _done_job(store, tmp_path, "c", ["share", "pacs"])
    egress = Egress(cfg, store)
    egress.enqueue_job(job)
    egress.sender.send_due()  # the folder gets its copies; nothing listens on port 1
    assert store.get(job.id).state == "done"
    dests, per_job = read_status(cfg, [job.id])
    pacs = next(d for d in dests if d["name"] == "pacs")
    assert pacs["pending"] == 2 and pacs["last_error"]
    assert per_job[job.id]["sent"] == 2 and per_job[job.id]["pending"] == 2
    egress.outbox.close()
