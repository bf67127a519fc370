"""Issue 15, MRD side, against one running node on loopback: the reference (FIRE) client's NUL-terminated
framing, unknown trajectories, stream / connection / text / disk limits, incomplete raw input, MRD over TLS
(client certificate required), and the audit log of it all."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import ismrmrd
import pytest
from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer

from node.config import parse_config
from node.ingest import mrd_server as mrd_mod
from node.ingest.mrd_server import MRDServer
from node.ingest.units import Admission
from pipelines.sim.mrd_writer import build_header, iter_acquisitions, utf8_header, write_ismrmrd
from tests.integration.node_harness import free_port, start_node

pytestmark = pytest.mark.integration

PATIENT = "Testperson^Audit"


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study():
    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study

    s = fisp_sequence()
    seq = MRFSequence("fisp24", s.flip_angles_deg[:24], s.tr_ms[:24], s.te_ms[:24], ti_ms=s.ti_ms)
    st = simulate_study("brain", seq, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50), matrix=16)
    return dataclasses.replace(st, study=dataclasses.replace(st.study, patient_name=PATIENT))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client (scanner) certificate, via openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=recon-node test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=test-{name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {k: d / v for k, v in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"),
                                   ("client_cert", "client.pem"), ("client_key", "client.key"))}


@pytest.fixture(scope="module")
def node(tmp_path_factory, pki):
    tmp = tmp_path_factory.mktemp("hardmrd")
    n = start_node(tmp, {
        "node": {"mrd_idle_timeout_s": 3, "mrd_max_connections": 3, "mrd_max_stream_s": 6,
                 "mrd_max_stream_mb": 4, "mrd_max_text_messages": 4, "mrd_max_text_kb": 2,
                 "audit_log": str(tmp / "audit" / "audit.jsonl"), "mrd_tls_port": free_port(),
                 "tls": {"cert": str(pki["cert"]), "key": str(pki["key"]), "ca": str(pki["ca"]),
                         "require_client_cert": True}},
        "routes": [
            {"name": "partial_ok", "match": {"input": "mrd", "protocol_name": "^partial_ok$"},
             "pipeline": "cartesian_frames", "params": {"frames": "0"}, "allow_partial": True},
            {"name": "raw", "match": {"input": "mrd"}, "pipeline": "cartesian_frames", "params": {"frames": "0"}},
        ]})
    n.audit_path = tmp / "audit" / "audit.jsonl"
    n.tls_port = int(n.config["node"]["mrd_tls_port"])
    yield n
    assert n.stop() == 0, n.log()


# ---- helpers -----------------------------------------------------------------------------------------------------
def _replies(data: bytes) -> list:
    try:
        return list(ProtocolDeserializer(io.BytesIO(data)).deserialize())
    except EOFError:
        return []


def texts(objs: list) -> list[str]:
    return [o for o in objs if isinstance(o, str)]


def exchange(port: int, payload: bytes, timeout: float = 30.0) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return texts(_replies(b"".join(chunks)))


def fire_client_stream(study, tmp: Path, config: str = "invertcontrast", json_config: str | None = None) -> bytes:
    """The bytes python-ismrmrd-server's client.py sends (its connection.py framing, written anew here):
    CONFIG_FILE = id 1 + name NUL-padded to 1024 bytes; METADATA = id 3 + uint32 length + XML text + NUL;
    TEXT = id 5 + uint32 length + text + NUL; ACQUISITION = id 1008 + Acquisition.serialize_into; CLOSE = id 4.
    The XML is what client.py reads from the file (``Dataset.read_xml_header().decode('utf-8')``)."""
    path = write_ismrmrd(study, tmp / "fire.h5")
    out = bytearray()
    out += struct.pack("<H", 1) + struct.pack("<1024s", config.encode())
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        xml = dset.read_xml_header().decode("utf-8")
        body = ("%s\0" % xml).encode()
        out += struct.pack("<H", 3) + struct.pack("<I", len(body)) + body
        if json_config is not None:
            body = ("%s\0" % json_config).encode()
            out += struct.pack("<H", 5) + struct.pack("<I", len(body)) + body
        for i in range(dset.number_of_acquisitions()):
            out += struct.pack("<H", 1008)
            dset.read_acquisition(i).serialize_into(out.extend)
    out += struct.pack("<H", 4)
    return bytes(out)


def stream_bytes(study, n_acq: int | None = None, repeat: int = 1, texts_: list[str] = (), header=None) -> bytes:
    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    ser.serialize(ConfigFile("default"))
    ser.serialize(header if header is not None else utf8_header(build_header(study)))
    for t in texts_:
        ser.serialize(t)
    for _ in range(repeat):
        for i, acq in enumerate(iter_acquisitions(study)):
            if n_acq is not None and i >= n_acq:
                break
            ser.serialize(acq)
    ser.close()
    return buf.getvalue()


def tmp_files(spool: Path) -> list[Path]:
    """Files left in <spool>/tmp (the DICOM SCP keeps an empty receive folder there)."""
    return [p for p in (spool / "tmp").rglob("*") if p.is_file()]


def audit_records(node) -> list[dict]:
    return [json.loads(line) for line in node.audit_path.read_text().splitlines()]


# ---- 1. the reference client ---------------------------------------------------------------------------------------
def test_reference_fire_client_framing_is_accepted(node, study, tmp_path):
    payload = fire_client_stream(study, tmp_path, json_config='{"parameters": {"config": "invertcontrast"}}')
    said = exchange(node.mrd_port, payload)
    assert len(said) == 1 and said[0].startswith("job ") and said[0].endswith(" queued"), said
    job = node.wait_job_state("done", job_id=said[0].split()[1], timeout=90)
    assert job.attributes["config"] == "invertcontrast" and job.attributes["trajectory"] == "cartesian"
    assert json.loads(job.attributes["json"]) == {"parameters": {"config": "invertcontrast"}}  # NUL stripped
    from pipelines.io.mrd_reader import read_hdf5_header

    assert "\x00" not in read_hdf5_header(job.unit_path)


# ---- 7. unknown trajectory ---------------------------------------------------------------------------------------
def test_unknown_trajectory_is_answered_with_a_clear_err(node, study):
    before = {j.id for j in node.jobs()}
    xml = build_header(study).toXML()
    xml = (xml if isinstance(xml, str) else xml.decode()).replace("<trajectory>cartesian</trajectory>",
                                                                  "<trajectory>zigzag</trajectory>")
    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    ser.serialize(ConfigFile("default"))
    body = xml.encode()
    buf.write(struct.pack("<HI", 3, len(body)) + body)
    for acq in list(iter_acquisitions(study))[:4]:
        ser.serialize(acq)
    ser.close()
    said = exchange(node.mrd_port, buf.getvalue())
    assert len(said) == 1 and said[0].startswith("ERR ") and "'zigzag'" in said[0] and "trajectory" in said[0], said
    assert "AttributeError" not in said[0] and "internal error" not in said[0]
    assert {j.id for j in node.jobs()} == before
    assert tmp_files(node.spool) == []


# ---- 6. limits ---------------------------------------------------------------------------------------------------
def test_trickle_sender_is_dropped_at_the_stream_duration_limit(node, study):
    payload = stream_bytes(study)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", node.mrd_port), timeout=30) as s:
        stop = threading.Event()

        def trickle() -> None:  # one byte every 0.5 s: never idle for node.mrd_idle_timeout_s (3 s)
            for b in payload:
                if stop.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.5)

        t0 = time.monotonic()
        threading.Thread(target=trickle, daemon=True).start()
        s.settimeout(20)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        elapsed = time.monotonic() - t0
        stop.set()
    said = texts(_replies(bytes(got)))
    assert said and said[0].startswith("ERR ") and "node.mrd_max_stream_s (6 s)" in said[0], said
    assert 5.5 < elapsed < 12, elapsed


def test_stream_size_text_count_and_text_size_limits(node, study):
    before = {j.id for j in node.jobs()}
    big = stream_bytes(study, repeat=22)  # > node.mrd_max_stream_mb (4 MB)
    assert len(big) > 4 << 20
    cases = {
        "node.mrd_max_stream_mb (4 MB)": big,
        "node.mrd_max_text_messages (4)": stream_bytes(study, texts_=["note"] * 5),
        "node.mrd_max_text_kb (2 KB)": stream_bytes(study, texts_=["x" * 5000]),
    }
    for expect, payload in cases.items():
        said = exchange(node.mrd_port, payload)
        assert len(said) == 1 and said[0].startswith("ERR ") and expect in said[0], (expect, said)
    assert {j.id for j in node.jobs()} == before
    assert tmp_files(node.spool) == []
    said = exchange(node.mrd_port, stream_bytes(study, texts_=["note"] * 4))  # at the limits: accepted
    assert said[0].endswith("queued"), said


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_concurrent_connections_are_bounded(node, study):
    pid = node.proc.pid
    base = _threads(pid)
    idle = [socket.create_connection(("127.0.0.1", node.mrd_port), timeout=10) for _ in range(3)]
    time.sleep(0.5)  # accepted: each holds a slot while it says nothing
    extra = []
    try:
        for _ in range(30):  # what used to become 30 more threads
            extra.append(socket.create_connection(("127.0.0.1", node.mrd_port), timeout=10))
        answers = []
        for s in extra:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(texts(_replies(data)))
        assert all(a and a[0].startswith("ERR the node is busy") and "node.mrd_max_connections" in a[0]
                   for a in answers), answers[:3]
        assert _threads(pid) <= base + 3 + 1
    finally:
        for s in idle + extra:
            s.close()
    time.sleep(0.5)  # the idle ones saw EOF and left: the slots are free again
    said = exchange(node.mrd_port, stream_bytes(study))
    assert said[0].endswith("queued"), said


def test_free_disk_is_rechecked_during_the_stream(tmp_path, study, monkeypatch):
    cfg = parse_config({"node": {"spool_dir": str(tmp_path / "spool"), "bind": "127.0.0.1", "mrd_port": 0,
                                 "disk_reserve_mb": 1, "mrd_disk_check_mb": 1},
                        "sources": [{"name": "local", "hosts": ["127.0.0.1"], "protocols": ["mrd"]}],
                        "routes": [{"name": "r", "pipeline": "cartesian_frames"}]}, check_pipelines=False)
    calls = []

    def space(_cfg) -> str | None:  # plenty of room when the stream starts, then the disk fills up
        calls.append(1)
        return None if len(calls) == 1 else "spool disk full: 0 MB free in the spool (test)"

    monkeypatch.setattr(mrd_mod, "spool_space_problem", space)
    units: list = []
    server = MRDServer(cfg, lambda unit: units.append(unit) or Admission("j-x", "queued", "r")).start()
    try:
        said = exchange(server.port, stream_bytes(study, repeat=8))
    finally:
        server.stop()
    assert len(said) == 1 and said[0].startswith("ERR spool disk full") and "nothing was stored" in said[0], said
    assert len(calls) >= 2 and units == []
    assert list(cfg.node.units_dir.iterdir()) == [] and tmp_files(cfg.node.spool_dir) == []


# ---- 4. incomplete raw input -------------------------------------------------------------------------------------
def test_incomplete_stream_fails_its_job_unless_the_route_allows_partial(node, study):
    n_r = study.lines.shape[1]
    said = exchange(node.mrd_port, stream_bytes(study, n_acq=3 * n_r))  # a 3-frame subset of 24
    job = node.wait_job_state("failed", job_id=said[0].split()[1], timeout=60)
    assert job.attempts == 1 and "incomplete input: 3 of 24 frames" in job.error and "allow_partial" in job.error
    assert not (node.spool / "results" / job.id).exists()
    ok = dataclasses.replace(study, study=dataclasses.replace(study.study, protocol_name="partial_ok"))
    said = exchange(node.mrd_port, stream_bytes(ok, n_acq=3 * n_r))
    job = node.wait_job_state("done", job_id=said[0].split()[1], timeout=60)
    assert job.route == "partial_ok" and "processed anyway" in job.log


# ---- TLS ---------------------------------------------------------------------------------------------------------
def _tls_exchange(node, pki, payload: bytes, client_cert: bool = True) -> list[str]:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if client_cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(payload)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return texts(_replies(b"".join(chunks)))


def test_mrd_over_tls_with_client_certificate(node, study, pki):
    said = _tls_exchange(node, pki, stream_bytes(study))
    assert len(said) == 1 and said[0].endswith("queued"), said
    job = node.wait_job_state("done", job_id=said[0].split()[1], timeout=90)
    assert job.source == "local"
    before = {j.id for j in node.jobs()}
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # no client certificate: refused
        said = _tls_exchange(node, pki, stream_bytes(study), client_cert=False)
        assert not said  # (TLS 1.3 may only tell us by closing)
        raise ConnectionError("closed without an answer")
    try:  # plain MRD to the TLS port: the handshake fails, no MRD answer (a reset or a bare close)
        said = exchange(node.tls_port, stream_bytes(study), timeout=10)
    except OSError:
        said = []
    assert said == []
    assert {j.id for j in node.jobs()} == before
    deadline = time.monotonic() + 10
    while True:  # the server's side of a failed handshake may finish after the client gave up
        refused = [r for r in audit_records(node) if r["kind"] == "mrd.connection.refused"
                   and "TLS handshake failed" in r.get("reason", "")]
        if len(refused) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(refused) >= 2, refused


# ---- audit -------------------------------------------------------------------------------------------------------
def test_audit_log_records_connections_units_and_jobs_without_patient_names(node, study):
    said = exchange(node.mrd_port, stream_bytes(study))
    node.wait_job_state("done", job_id=said[0].split()[1], timeout=90)
    time.sleep(0.3)
    recs = audit_records(node)
    kinds = {r["kind"] for r in recs}
    assert {"node.start", "mrd.connection.accepted", "unit.stored", "job.state"} <= kinds, kinds
    acc = [r for r in recs if r["kind"] == "mrd.connection.accepted"]
    assert all(r["actor_ip"] == "127.0.0.1" and r["source"] == "local" for r in acc)
    stored = [r for r in recs if r["kind"] == "unit.stored"]
    assert stored and all(r["n_objects"] > 0 and r["unit"].startswith("mrd-") for r in stored)
    assert any(r["kind"] == "job.state" and r["state"] == "done" and r["job_id"] == said[0].split()[1] for r in recs)
    text = node.audit_path.read_text()
    assert PATIENT not in text and "Testperson" not in text


# ---- 5. restart does not split a study -----------------------------------------------------------------------------
def test_study_resent_after_a_kill_stays_one_unit(tmp_path, study):
    """Half a DICOM series, kill -9, restart; the sender comes back later than the quiet time and sends the rest:
    one unit with every instance (before: the first half was released alone and the rest became a second unit)."""
    from pipelines.sim.dicom_frames import write_dicom_frames

    frames = sorted(write_dicom_frames(study, tmp_path / "frames"))
    half = len(frames) // 2
    config = {"grouping": {"default": {"by": "study", "quiet_seconds": 2}, "restart_grace_seconds": 30}}
    (tmp_path / "n").mkdir()
    node = start_node(tmp_path / "n", config)
    env = dict(os.environ, TCP_NODELAY="1")

    def storescu(files: list) -> None:
        out = subprocess.run(["/usr/bin/storescu", "-aet", "TEST_SCU", "-aec", "RECON_TEST", "-to", "30", "-ta", "30",
                              "127.0.0.1", str(node.dicom_port), *map(str, files)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr

    try:
        storescu(frames[:half])
        node.kill9()  # within the 2 s quiet time: the group is still in incoming/
        node.start()
        time.sleep(4)  # the sender backs off for longer than the quiet time
        assert node.jobs() == []  # the re-armed group waits for the rest of its study
        storescu(frames[half:])
        job = node.wait_job_state(("unrouted", "queued", "running", "done", "failed"), timeout=60)
        time.sleep(2)
        jobs = node.jobs()
        assert len(jobs) == 1 and jobs[0].attributes["n_objects"] == len(frames), \
            [(j.id, j.attributes.get("n_objects")) for j in jobs]
        assert job.kind == "dicom"
    finally:
        node.kill9()
