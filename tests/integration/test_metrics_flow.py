"""One MRD study through an in-process node to a real Orthanc, read back from /metrics: every counter moved by
exactly what happened (bytes on the wire, one unit, one job, each stage once, the instances Orthanc holds), the
job gauge says ``sent``, and /ready reports Orthanc's C-ECHO. When the web console exists (``node/http``), the
same exposition is fetched over HTTP."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from ismrmrd.serialization import ProtocolSerializer
from orthanc_harness import start_orthanc
from prometheus_client.parser import text_string_to_metric_families

from node import metrics
from node.config import parse_config
from node.ingest.mrd_client import send_study
from node.service import NodeService
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.mrd_writer import config_message, stream_objects, utf8_header

pytestmark = pytest.mark.integration

FRAMES = 4  # cartesian_frames keeps frames 0..3: one MR instance each


def scrape(body: bytes | None = None) -> dict[tuple[str, frozenset], float]:
    text = (body if body is not None else metrics.render()[0]).decode("utf-8")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wire_bytes(study) -> int:
    """What send_study writes to the socket: config name, header, acquisitions, CLOSE."""
    buf = io.BytesIO()
    header, acqs = stream_objects(study)
    ser = ProtocolSerializer(buf)
    ser.serialize(config_message("default"))
    ser.serialize(utf8_header(header))
    for acq in acqs:
        ser.serialize(acq)
    ser.close()
    return len(buf.getvalue())


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


TOKEN = "metrics-flow-test-token"


def _console_settings() -> dict:
    """node.http with a bearer token for the scraper, when the console's packages are installed (else none)."""
    from node.config import WEB_MODULES

    if any(importlib.util.find_spec(m) is None for m in WEB_MODULES):
        return {}
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    return {"http": {"port": 0, "tokens": [{"name": "prometheus", "sha256": sha, "role": "viewer"}]}}


@pytest.fixture
def node_and_orthanc(tmp_path, short_fisp):
    orthanc = start_orthanc(tmp_path)
    cfg = parse_config({
        "node": {"spool_dir": str(tmp_path / "spool"), "bind": "127.0.0.1", "mrd_port": 0, "dicom_port": 0,
                 "ae_title": "RECON_TEST", "disk_reserve_mb": 1, "workers": 1, "threads": 1,
                 "shutdown_grace_s": 5, **_console_settings()},
        "sources": [{"name": "local", "hosts": ["127.0.0.1"], "protocols": ["mrd", "dicom"]}],
        "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
        "egress": {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10},
        "grouping": {"default": {"by": "study", "quiet_seconds": 0.5}},
        "routes": [{"name": "frames", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
                    "params": {"frames": ",".join(map(str, range(FRAMES)))}, "send_to": ["orthanc"]}],
    })
    threads = torch.get_num_threads()
    svc = NodeService(cfg)
    svc.start()
    try:
        yield svc, orthanc
    finally:
        svc.stop()
        orthanc.stop()
        torch.set_num_threads(threads)


def test_one_mrd_study_moves_every_counter_by_what_happened(node_and_orthanc, short_fisp):
    svc, orthanc = node_and_orthanc
    study = simulate_study("brain", short_fisp, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50.0),
                           matrix=32)
    before = scrape()
    said = [r for r in send_study(study, "127.0.0.1", svc.mrd_server.port, timeout=60) if isinstance(r, str)]
    assert len(said) == 1 and said[0].endswith(" queued"), said
    job_id = said[0].split()[1]
    _wait(lambda: (j := svc.store.get(job_id)) is not None and j.state == "sent", 60, "the job to be sent")
    after = scrape()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    in_orthanc = len(orthanc.instances())
    assert in_orthanc == FRAMES
    assert delta("recon_node_instances_sent_total", destination="orthanc") == in_orthanc
    assert delta("recon_node_instances_failed_total", destination="orthanc") == 0
    assert delta("recon_node_received_bytes_total", kind="mrd") == wire_bytes(study)
    assert delta("recon_node_received_bytes_total", kind="dicom") == 0
    assert delta("recon_node_units_received_total", kind="mrd") == 1
    assert delta("recon_node_job_runs_total", outcome="done") == 1
    for stage in ("receive", "queue_wait", "load", "reconstruction", "write", "egress"):
        assert delta("recon_node_stage_duration_seconds_count", stage=stage) == 1, stage
    assert delta("recon_node_stage_duration_seconds_count", stage="mapping") == 0  # frames only, no maps
    assert value(after, "recon_node_jobs", state="sent") == 1
    assert sum(value(after, "recon_node_jobs", state=s) for s in ("queued", "running", "done", "failed")) == 0
    assert value(after, "recon_node_queue_length") == 0
    assert value(after, "recon_node_egress_pending_instances", destination="orthanc") == 0
    assert value(after, "recon_node_destination_up", destination="orthanc") == 1

    ready, checks = metrics.readiness(svc)
    assert ready, checks
    assert checks["destination:orthanc"].startswith(f"ok: dicom {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")


def test_dicom_bytes_units_and_refused_mrd_streams_are_counted(node_and_orthanc, short_fisp, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from pipelines.sim.dicom_frames import write_dicom_frames

    svc, _ = node_and_orthanc
    from pipelines.physics.sequences import MRFSequence

    s = short_fisp
    three = MRFSequence("fisp3", s.flip_angles_deg[:3], s.tr_ms[:3], s.te_ms[:3], ti_ms=s.ti_ms)
    study = simulate_study("brain", three, AcquisitionSettings(coils=1, snr=50.0), matrix=16)
    files = write_dicom_frames(study, tmp_path / "frames")  # one MR instance per frame
    before = scrape()

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", svc.dicom_scp.port, ae_title="RECON_TEST")
    assert assoc.is_established
    try:
        for f in files:
            assert assoc.send_c_store(f).Status == 0
    finally:
        assoc.release()
    job = _wait(lambda: next((j for j in svc.store.list() if j.kind == "dicom"), None), 30, "the DICOM unit's job")
    assert job.state == "unrouted"  # the only route takes MRD

    with socket.create_connection(("127.0.0.1", svc.mrd_server.port), timeout=10) as sock:  # not an MRD stream
        sock.sendall(b"\xff\xff this is not MRD")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # the node answers ERR ... and closes
            pass
    _wait(lambda: value(scrape(), "recon_node_units_rejected_total", kind="mrd", reason="invalid")
          > value(before, "recon_node_units_rejected_total", kind="mrd", reason="invalid"), 10, "the refusal")
    after = scrape()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # what the SCP stored: each instance as received, with the file meta pynetdicom wrote in front of it
    stored = sum(p.stat().st_size for p in Path(job.unit_path).glob("*.dcm"))
    assert len(list(Path(job.unit_path).glob("*.dcm"))) == len(files)
    assert delta("recon_node_received_bytes_total", kind="dicom") == stored
    assert stored >= sum(f.stat().st_size for f in files) - 1024 * len(files)  # pixel data and all came
    assert delta("recon_node_received_bytes_total", kind="mrd") == 0
    assert delta("recon_node_units_received_total", kind="dicom") == 1
    assert delta("recon_node_units_unrouted_total", kind="dicom") == 1
    assert delta("recon_node_stage_duration_seconds_count", stage="receive") == 1  # the DICOM group; not the refusal
    assert delta("recon_node_stage_duration_seconds_sum", stage="receive") >= 0.5  # its quiet window at least
    assert delta("recon_node_units_rejected_total", kind="mrd", reason="invalid") == 1
    assert value(after, "recon_node_jobs", state="unrouted") == 1


def test_metrics_and_ready_over_http(node_and_orthanc):
    svc, orthanc = node_and_orthanc
    if getattr(svc, "console", None) is None:
        pytest.skip("the web console's packages are not installed (pip install -e '.[web]')")
    base = f"http://127.0.0.1:{svc.console.port}"
    _wait(lambda: metrics.readiness(svc)[0], 30, "Orthanc's start-up C-ECHO")

    with pytest.raises(urllib.error.HTTPError) as refused:  # /metrics wants a token unless metrics_public
        urllib.request.urlopen(f"{base}/metrics", timeout=10)
    assert refused.value.code == 401

    req = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        over_http = scrape(r.read())
    here = scrape()
    assert value(over_http, "recon_node_jobs", state="queued") == value(here, "recon_node_jobs", state="queued") == 0
    assert value(over_http, "recon_node_destination_up", destination="orthanc") == 1
    assert value(over_http, "recon_node_build_info", version=next(
        dict(k)["version"] for n, k in here if n == "recon_node_build_info")) == 1

    with urllib.request.urlopen(f"{base}/ready", timeout=10) as r:  # no token: /ready tells nothing about patients
        assert r.status == 200
        checks = json.loads(r.read())
    assert checks["destination:orthanc"].startswith("ok") and checks["database"].startswith("ok")
