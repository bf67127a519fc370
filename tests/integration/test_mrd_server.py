"""The MRD server against real loopback peers: a scanner-like stream becomes a done job; malformed streams are
answered with ERR and leave nothing behind; unknown sources are refused; reply_over_mrd sends images back."""

from __future__ import annotations

import dataclasses
import io
import socket
import struct
import time

import ismrmrd
import pytest
from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer

from node.config import parse_config
from node.ingest.mrd_client import send_study
from node.ingest.mrd_server import MRDServer
from node.ingest.units import Admission
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.mrd_writer import build_header, iter_acquisitions, serialize_study, utf8_header, write_ismrmrd
from tests.integration.node_harness import start_node

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def study(short_fisp):
    return simulate_study("brain", short_fisp, AcquisitionSettings(trajectory="cartesian", coils=2, snr=50),
                          matrix=32)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = start_node(tmp_path_factory.mktemp("mrdnode"), {
        "node": {"mrd_idle_timeout_s": 5, "mrd_max_message_mb": 16},
        "routes": [
            {"name": "inline", "match": {"input": "mrd", "protocol_name": "inline"}, "pipeline": "cartesian_frames",
             "params": {"frames": "0,1"}, "reply_over_mrd": True},
            {"name": "raw", "match": {"input": "mrd", "trajectory": "cartesian"}, "pipeline": "cartesian_frames",
             "params": {"frames": "0,5,10"}},
        ]})
    yield n
    assert n.stop() == 0, n.log()


def exchange(port: int, payload: bytes, timeout: float = 30.0) -> list:
    """Send raw bytes, half-close, and return every object the server sent before its CLOSE."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return list(ProtocolDeserializer(io.BytesIO(b"".join(chunks))).deserialize())


def texts(objs: list) -> list[str]:
    return [o for o in objs if isinstance(o, str)]


def test_stream_becomes_a_done_job_with_results(node, study):
    replies = send_study(study, "127.0.0.1", node.mrd_port, timeout=60)
    said = texts(replies)
    assert len(said) == 1 and said[0].startswith("job ") and said[0].endswith(" queued"), said
    job_id = said[0].split()[1]
    job = node.wait_job_state("done", job_id=job_id, timeout=90)
    assert job.route == "raw" and job.pipeline == "cartesian_frames" and job.source == "local"
    assert job.attributes["trajectory"] == "cartesian" and job.attributes["sequence"] == "fisp200"
    out = node.spool / "results" / job_id
    assert (out / "images.npz").exists() and (out / "summary.json").exists()
    assert len(list((out / "dicom").rglob("*.dcm"))) == 3
    from pipelines.io.mrd_reader import raw_study_from_hdf5

    raw = raw_study_from_hdf5(job.unit_path)  # the spooled unit is a complete ISMRMRD file
    assert raw.data.shape == (study.kspace.shape[0] * study.kspace.shape[1], 2, 32)
    assert "pipeline cartesian_frames" in job.log
    status = node.status_json()
    assert status["counts"]["done"] >= 1 and any(j["id"] == job_id for j in status["jobs"])


def _stream_bytes(study, n_acq: int | None = None, header: bool = True, config: bool = True) -> bytes:
    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    if config:
        ser.serialize(ConfigFile("default"))
    if header:
        ser.serialize(utf8_header(build_header(study)))
    for i, acq in enumerate(iter_acquisitions(study)):
        if n_acq is not None and i >= n_acq:
            break
        ser.serialize(acq)
    return buf.getvalue()


def _malformed(study) -> dict[str, tuple[bytes, str]]:
    close = struct.pack("<H", 4)
    full = io.BytesIO()
    serialize_study(study, full)
    whole = full.getvalue()
    acq_only = _stream_bytes(study, n_acq=3, header=False)
    absurd = bytearray(_stream_bytes(study, n_acq=1))
    # the last acquisition's header: number_of_samples (offset 34) and active_channels (38) -> 65535 each
    start = len(absurd) - (340 + 2 * 32 * 8)
    struct.pack_into("<H", absurd, start + 34, 65535)
    struct.pack_into("<H", absurd, start + 38, 65535)
    not_xml = _stream_bytes(study, n_acq=0, header=False) + struct.pack("<HI", 3, 9) + b"not xml!!" + close
    return {
        "truncated": (whole[: len(whole) // 2 + 7], "truncated"),
        "acquisition before header": (acq_only + close, "before the ISMRMRD header"),
        "unknown message id": (_stream_bytes(study, n_acq=2) + struct.pack("<H", 777) + b"\0" * 64, "malformed"),
        "absurd length": (bytes(absurd), "exceeds node.mrd_max_message_mb"),
        "non-XML header": (not_xml, "not valid ISMRMRD XML"),
        "zero acquisitions": (_stream_bytes(study, n_acq=0) + close, "no acquisitions received"),
        "no CLOSE, idle": (b"", ""),
    }


def test_malformed_streams_answer_err_and_leave_nothing(node, study):
    before = {j.id for j in node.jobs()}
    for name, (payload, expect) in _malformed(study).items():
        if name == "no CLOSE, idle":
            # a peer that sends a config and then stalls is dropped after the idle timeout (5 s here)
            with socket.create_connection(("127.0.0.1", node.mrd_port), timeout=30) as s:
                s.sendall(_stream_bytes(study, n_acq=2))
                t0 = time.monotonic()
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            said = texts(list(ProtocolDeserializer(io.BytesIO(data)).deserialize()))
            assert said and said[0].startswith("ERR no data for"), said
            assert time.monotonic() - t0 < 20
            continue
        said = texts(exchange(node.mrd_port, payload))
        assert len(said) == 1 and said[0].startswith("ERR ") and expect in said[0], (name, said)
    assert {j.id for j in node.jobs()} == before
    assert [p for p in (node.spool / "tmp").rglob("*") if p.is_file()] == []  # (the SCP keeps tmp/dicom-rx/)
    # and the server still serves a normal client
    said = texts(send_study(study, "127.0.0.1", node.mrd_port, timeout=60))
    assert said[0].endswith("queued"), said


def test_reply_over_mrd_returns_images(node, study):
    inline = dataclasses.replace(study, study=dataclasses.replace(study.study, protocol_name="MRF_inline"))
    replies = send_study(inline, "127.0.0.1", node.mrd_port, timeout=90)
    images = [o for o in replies if isinstance(o, ismrmrd.Image)]
    said = texts(replies)
    assert said and said[-1].startswith("job ") and said[-1].endswith(" done"), said
    assert len(images) == 2
    assert images[0].image_type == ismrmrd.IMTYPE_MAGNITUDE and images[0].data.shape[-2:] == (32, 32)
    meta = ismrmrd.Meta.deserialize(images[0].attribute_string)
    assert meta["recon_node_kind"] == "image" and meta["recon_node_job"] == said[-1].split()[1]
    job = node.wait_job_state("done", job_id=said[-1].split()[1], timeout=10)
    assert job.route == "inline" and (node.spool / "results" / job.id / "images.npz").exists()


def test_submit_cli_prints_job_queued(node, study, tmp_path):
    path = write_ismrmrd(study, tmp_path / "scan.h5")
    p = node.cli("submit", str(path), "--host", "127.0.0.1", "--port", str(node.mrd_port))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("job ") and "queued" in p.stdout
    job_id = p.stdout.split()[1]
    node.wait_job_state("done", job_id=job_id, timeout=90)
    st = node.cli("status", "--config", str(node.config_path))
    assert st.returncode == 0 and job_id in st.stdout and "done" in st.stdout and "raw" in st.stdout, st.stdout


def test_unknown_source_is_refused_without_reading(tmp_path, study):
    cfg = parse_config({"node": {"spool_dir": str(tmp_path / "spool"), "bind": "127.0.0.1", "mrd_port": 0,
                                 "disk_reserve_mb": 1},
                        "sources": [{"name": "scanner", "hosts": ["10.9.9.9"], "protocols": ["mrd"]}],
                        "routes": [{"name": "r", "pipeline": "cartesian_frames"}]})
    calls = []
    server = MRDServer(cfg, lambda unit: calls.append(unit) or Admission("j-x", "queued", "r")).start()
    try:
        try:
            said = texts(send_study(study, "127.0.0.1", server.port, timeout=30))
        except ConnectionError as e:  # the server stops reading; the reply travels in the error
            said = [str(e)[str(e).index("ERR"):]]
        assert said and said[0].startswith("ERR unknown source 127.0.0.1"), said
        assert calls == [] and list(cfg.node.units_dir.iterdir()) == []
    finally:
        server.stop()


def test_header_declared_ascii_with_utf8_name_is_kept(node, study):
    """ismrmrd 1.15's plain ProtocolSerializer declares encoding="ascii" but sends UTF-8 (e.g. Müller)."""
    named = dataclasses.replace(study, study=dataclasses.replace(study.study, patient_name="Müller^Jürgen"))
    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    ser.serialize(build_header(named))  # not utf8_header: the declaration says ascii
    for i, acq in enumerate(iter_acquisitions(named)):
        if i >= 64:
            break
        ser.serialize(acq)
    ser.close()
    said = texts(exchange(node.mrd_port, buf.getvalue()))
    assert said[0].startswith("job "), said
    job = node.wait_job_state(("done", "failed", "queued", "running"), job_id=said[0].split()[1], timeout=30)
    from pipelines.io.mrd_reader import read_hdf5_header

    xml = read_hdf5_header(job.unit_path)
    assert "Müller^Jürgen" in xml and 'encoding="UTF-8"' in xml
