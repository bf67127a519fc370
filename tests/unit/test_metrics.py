"""/metrics and /ready without a network peer: the exposition parses, the job gauges are what the database holds,
the counters move by exactly what happened (egress to a folder, a failing job), readiness fails for a disk below
its reserve and for a database that cannot be written.

Counters are process-wide (several nodes in one process add up), so each test compares before and after.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node import metrics
from node.config import parse_config
from node.egress.dicom_writer import write_outputs
from node.egress.egress import Egress
from node.ingest.units import IngestUnit
from node.jobs import STATES, JobStore
from node.service import NodeService
from pipelines.types import Geometry, QuantitativeMap, StudyInfo

STUDY = "1.2.826.0.1.3680043.8.498.77"


def scrape() -> dict[tuple[str, frozenset], float]:
    """Every sample of render(), keyed by (sample name, its labels)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(body.decode("utf-8"))
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _cfg(tmp_path, **node):
    return parse_config(
        {
            "node": {"spool_dir": str(tmp_path / "spool"), "disk_reserve_mb": 1, "mrd_port": 0, "dicom_port": 0,
                     "bind": "127.0.0.1", "workers": 1, "threads": 1, **node},
            "destinations": [{"name": "share", "kind": "folder", "path": str(tmp_path / "share")},
                             {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
            "egress": {"backoff_base_s": 0.1, "backoff_max_s": 0.2, "timeout_s": 2},
            "routes": [{"name": "inline", "match": {"input": "mrd", "protocol_name": "^inline$"},
                        "pipeline": "no_such_pipeline", "reply_over_mrd": True},
                       {"name": "r", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
                        "send_to": ["share"]}],
        },
        check_pipelines=False,
    )


def test_exposition_parses_with_conventional_names_and_the_version():
    families = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    hist = families["recon_node_stage_duration_seconds"]
    assert hist.type == "histogram"
    assert {s.labels["stage"] for s in hist.samples} == set(metrics.STAGES)
    for name in ("recon_node_received_bytes", "recon_node_units_received", "recon_node_units_rejected",
                 "recon_node_job_runs", "recon_node_instances_sent", "recon_node_instances_failed"):
        assert families[name].type == "counter"  # the parser strips _total from a counter family's name
        assert all(s.name.endswith("_total") for s in families[name].samples)
    assert {s.labels["kind"] for s in families["recon_node_received_bytes"].samples} == {"mrd", "dicom"}
    info = families["recon_node_build_info"].samples[0]
    assert info.name == "recon_node_build_info" and info.labels["version"] and info.value == 1
    assert not any(n.endswith("_created") for n in families)
    assert all(n.startswith(("recon_node_", "process_", "python_")) for n in families)


def test_job_gauges_are_the_database_at_scrape_time(tmp_path):
    cfg = _cfg(tmp_path, disk_reserve_mb=3)
    svc = NodeService(cfg)
    try:
        metrics.bind(svc)
        wanted = {"queued": 3, "failed": 2, "unrouted": 1}
        for state, n in wanted.items():
            for i in range(n):
                svc.store.create(tmp_path / f"{state}-{i}.h5", "mrd", state=state)
        svc.store.claim()  # one queued -> running
        s = scrape()
        expect = {st: 0 for st in STATES} | {"queued": 2, "running": 1, "failed": 2, "unrouted": 1}
        assert {st: value(s, "recon_node_jobs", state=st) for st in STATES} == expect
        assert value(s, "recon_node_queue_length") == 2
        assert value(s, "recon_node_spool_reserve_bytes") == 3 * 2**20
        free = shutil.disk_usage(cfg.node.spool_dir).free
        assert abs(value(s, "recon_node_spool_free_bytes") - free) < 64 * 2**20  # other writers share the disk
        assert value(s, "recon_node_egress_pending_instances", destination="share") == 0
        svc.egress.sender.verify("share")  # a folder's check: a write test, passes
        svc.egress.sender.verify("pacs")  # nothing listens on port 1
        s = scrape()
        assert value(s, "recon_node_destination_up", destination="share") == 1
        assert ("recon_node_destination_up", frozenset({("destination", "pacs")})) in s
        assert value(s, "recon_node_destination_up", destination="pacs") == 0
        metrics.unbind(svc)
        assert not any(name == "recon_node_jobs" for name, _ in scrape())
    finally:
        metrics.unbind(svc)
        svc.store.close()
        svc.egress.outbox.close()


def _done_job(store: JobStore, tmp_path, name: str, send_to: list[str]):
    job, _ = store.create(tmp_path / f"{name}.h5", "mrd", "scanner", route="r", pipeline="cartesian_frames",
                          send_to=send_to)
    store.claim()
    result = tmp_path / "spool" / "results" / job.id
    g = Geometry.centred((4, 4), (40.0, 40.0))
    g.positions = np.array([[-18.0, -18.0, 0.0], [-18.0, -18.0, 5.0], [-18.0, -18.0, 10.0]])
    records = write_outputs([QuantitativeMap("t1", np.full((3, 4, 4), 900.0), "ms", "T1", g)],
                            StudyInfo(study_instance_uid=STUDY), result / "dicom", job.id)
    store.finish(job.id, result)
    return store.get(job.id), records


def test_egress_counts_each_instance_sent_retried_failed_and_the_done_to_sent_time(tmp_path):
    cfg = _cfg(tmp_path)
    store = JobStore(cfg.node.database_path)
    egress = Egress(cfg, store)
    results = tmp_path / "spool" / "results"
    try:
        before = scrape()

        def delta(name, **labels):
            return value(scrape(), name, **labels) - value(before, name, **labels)

        one, records = _done_job(store, tmp_path, "one", ["share"])
        egress.on_done(one, [], results / one.id, records)
        assert egress.sender.send_due() == 3 and store.get(one.id).state == "sent"
        took = time.time() - one.finished
        assert delta("recon_node_instances_sent_total", destination="share") == 3
        assert delta("recon_node_stage_duration_seconds_count", stage="egress") == 1
        assert 0 <= delta("recon_node_stage_duration_seconds_sum", stage="egress") <= took

        two, records = _done_job(store, tmp_path, "two", ["share", "pacs"])
        records[2].path.unlink()  # gone before it could be sent: fails, for both destinations
        egress.on_done(two, [], results / two.id, records)
        egress.sender.send_due()  # share takes the other 2; pacs (nothing on port 1) is down: 2 retries
        assert delta("recon_node_instances_sent_total", destination="share") == 3 + 2
        assert delta("recon_node_instances_failed_total", destination="share") == 1
        assert delta("recon_node_instances_failed_total", destination="pacs") == 1
        assert delta("recon_node_instance_retries_total", destination="pacs") == 2
        assert delta("recon_node_instances_sent_total", destination="pacs") == 0
        assert delta("recon_node_stage_duration_seconds_count", stage="egress") == 1  # two is not delivered
        assert store.get(two.id).state == "done"
    finally:
        egress.outbox.close()
        store.close()


def test_units_and_a_failing_job_are_counted_by_the_service(tmp_path):
    cfg = _cfg(tmp_path)
    svc = NodeService(cfg)
    try:
        before = scrape()

        def unit(name: str, **attrs: str) -> IngestUnit:
            path = cfg.node.units_dir / name
            path.write_bytes(b"")
            return IngestUnit(kind="mrd", path=path, source="scanner", attributes=attrs)

        ran = svc.handle_unit(unit("c.h5", protocolName="inline"), inline=True)  # runs now, fails: no pipeline
        assert ran.result is not None and ran.result.state == "failed"
        again = svc.handle_unit(unit("c.h5", protocolName="inline"))  # the same unit: its job, not a new one
        assert again.job_id == ran.job_id
        after = scrape()

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("recon_node_units_received_total", kind="mrd") == 1
        assert delta("recon_node_units_received_total", kind="dicom") == 0
        assert delta("recon_node_job_runs_total", outcome="failed") == 1
        assert delta("recon_node_job_runs_total", outcome="done") == 0
        assert delta("recon_node_stage_duration_seconds_count", stage="queue_wait") == 1  # claimed on creation
        assert delta("recon_node_stage_duration_seconds_sum", stage="queue_wait") == 0
        assert delta("recon_node_stage_duration_seconds_count", stage="reconstruction") == 0  # it never ran
    finally:
        svc.store.close()
        svc.egress.outbox.close()


def _wait(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def started(tmp_path):
    svc = NodeService(_cfg(tmp_path))
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_readiness_names_each_check_and_fails_on_disk_reserve_and_read_only_database(started, monkeypatch):
    svc = started
    # the start-up checks of both destinations run in the background; ready once each was checked
    ready, checks = _wait(lambda: (r := metrics.readiness(svc))[0] and r)
    assert set(checks) == {"listeners", "database", "spool_disk", "destination:share", "destination:pacs"}
    assert checks["database"].startswith("ok") and checks["spool_disk"].startswith("ok")
    assert checks["destination:share"].startswith("ok: folder")
    assert checks["destination:pacs"].startswith("failed: dicom PACS@127.0.0.1:1")  # reported, still ready
    assert f"MRD port {svc.mrd_server.port}" in checks["listeners"]

    free_mb = shutil.disk_usage(svc.cfg.node.spool_dir).free / 2**20
    monkeypatch.setattr(svc.cfg.node, "disk_reserve_mb", int(free_mb) + 10**6)
    ready, checks = metrics.readiness(svc)
    assert not ready and checks["spool_disk"].startswith("failed: spool disk full")
    assert checks["database"].startswith("ok")
    monkeypatch.undo()
    assert metrics.readiness(svc)[0]

    # SQLite's own read-only mode: what a read-only mount or a revoked write permission looks like to it
    svc.store._db.execute("PRAGMA query_only = ON")
    ready, checks = metrics.readiness(svc)
    assert not ready and checks["database"].startswith("failed:") and "readonly" in checks["database"]
    assert checks["spool_disk"].startswith("ok")
    svc.store._db.execute("PRAGMA query_only = OFF")
    assert metrics.readiness(svc)[0]


def test_not_ready_before_start_and_after_stop(tmp_path):
    svc = NodeService(_cfg(tmp_path))
    ready, checks = metrics.readiness(svc)
    assert not ready and checks["listeners"].startswith("failed") and checks["destination:share"] == "not checked yet"
    svc.start()
    svc.stop()
    ready, checks = metrics.readiness(svc)
    assert not ready and checks["listeners"].startswith("failed")


def test_the_pipelines_phases_split_the_run_into_reconstruction_and_mapping(monkeypatch, tmp_path):
    """A pipeline that says ctx.phase("mapping") half-way: the time before goes to reconstruction (raw input),
    the time after to mapping; write and load are timed on their own."""
    import pipelines.definitions as definitions
    from node import run
    from pipelines.registry import PipelineSpec
    from pipelines.types import RawStudy

    def pipeline(study, params, ctx):
        time.sleep(0.15)
        ctx.phase("mapping")
        time.sleep(0.3)
        return []

    spec = PipelineSpec("phases", "raw", "test", pipeline)
    monkeypatch.setattr(definitions, "get_pipeline", lambda name: spec)
    fake = object.__new__(RawStudy)
    fake.study = StudyInfo(study_instance_uid=STUDY)
    monkeypatch.setattr(run, "load_study", lambda *a, **k: (time.sleep(0.05), fake)[1])
    req = run.RunRequest(input=tmp_path / "x.h5", pipeline="phases", params={}, out_dir=tmp_path / "out",
                         job_id="j-1", dicom=False, device="cpu")
    outcome = run.run_unit(req)
    t = outcome.timings
    assert set(t) == {"load", "reconstruction", "mapping", "write"}
    slack = 1.0  # a busy CI machine oversleeps; never undersleeps
    assert 0.15 <= t["reconstruction"] < 0.15 + slack and 0.3 <= t["mapping"] < 0.3 + slack
    assert 0.05 <= t["load"] < 0.05 + slack and t["write"] >= 0
