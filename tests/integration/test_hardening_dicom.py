"""Issue 15, DICOM side: implicit-VR ISMRMRD, empty UIDs, compressed transfer syntaxes, dataset size limit, TLS
(SCP and C-STORE to a destination), against real DCMTK peers (storescu, echoscu, dcmcjpeg/dcmcjpls/dcmcrle)."""

from __future__ import annotations

import gc
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, MRImageStorage

from node.ingest.dicom_scp import DicomSCP, decodable_transfer_syntaxes
from pipelines.io.ismrmrd_dicom import wrap_ismrmrd_in_raw_data
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.sim.mrd_writer import write_ismrmrd
from tests.integration.test_dicom_scp import (  # noqa: F401 - fixtures
    ECHOSCU,
    NODE_AE,
    N_FRAMES,
    STORESCU,
    Recorder,
    _associate,
    dcmtk,
    frames,
    make_config,
    make_scp,
    stored_files,
    study,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Invalid value for VR UI")]


def _pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


# ---- item 7: ISMRMRD-in-DICOM with implicit VR, empty SOP Instance UID ----------------------------------------------
def test_ismrmrd_in_raw_data_sent_with_implicit_vr(make_scp, study, tmp_path):
    """storescu -xi: the private UL length element arrives without VR (bytes); it used to raise
    ``ValueError: invalid literal for int()``."""
    h5 = write_ismrmrd(study, tmp_path / "raw.h5")
    dcm = tmp_path / "raw.dcm"
    wrap_ismrmrd_in_raw_data(h5).save_as(dcm, enforce_file_format=True)
    scp, rec = make_scp()
    out = dcmtk(STORESCU, scp.port, "-xi", "-v", str(dcm))
    assert out.returncode == 0 and "Implicit" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Received Store Response (Success)" in out.stdout + out.stderr
    assert wait_for(lambda: len(rec.units) == 1)
    unit = rec.units[0]
    assert unit.kind == "mrd" and unit.path.read_bytes() == h5.read_bytes()
    np.testing.assert_array_equal(raw_study_from_hdf5(unit.path).data, raw_study_from_hdf5(h5).data)


BAD_UIDS = ["", "1.2.3\n4", "../../../x", "/etc/x", "1.02.3"]  # > 64 characters: pynetdicom refuses to send


def test_invalid_sop_uids_fail_those_instances_only(make_scp, frames, tmp_path):
    """Instances with an empty / hostile SOP Instance UID between good ones, in one association (pynetdicom as the
    SCU: DCMTK's storescu refuses to send an empty UID itself): each bad one gets 0xC211 naming the problem, the
    association goes on (an empty UID used to leave the request unanswered until the peer aborted), the good ones
    are stored, nothing is written outside the spool."""
    scp, rec = make_scp()
    assoc = _associate(scp.port, MRImageStorage)
    statuses = []
    try:
        for i, bad_uid in enumerate(BAD_UIDS):
            ds = pydicom.dcmread(frames[0])
            ds.SOPInstanceUID = bad_uid
            statuses.append(assoc.send_c_store(ds))
            assert assoc.is_established, f"association lost after SOP Instance UID {bad_uid!r}"
        good = [assoc.send_c_store(pydicom.dcmread(f)) for f in frames[1:3]]
    finally:
        assoc.release()
    for bad_uid, st in zip(BAD_UIDS, statuses):
        assert st is not None and st.Status == 0xC211, (bad_uid, st)
        assert "SOP" in st.ErrorComment and "\n" not in st.ErrorComment, st.ErrorComment
    assert [g.Status for g in good] == [0, 0]
    assert wait_for(lambda: len(rec.units) == 1) and rec.units[0].n_objects == 2
    assert not Path("/etc/x").exists() and not (tmp_path / "x").exists()
    assert all(scp.spool in p.parents for p in stored_files(scp.spool))


def test_hostile_study_uid_is_refused_before_it_names_a_folder(make_scp, frames, tmp_path):
    scp, rec = make_scp()
    ds = pydicom.dcmread(frames[0])
    ds.StudyInstanceUID = "../../../escaped"
    out_file = tmp_path / "hostile.dcm"
    ds.save_as(out_file, enforce_file_format=True)
    out = dcmtk(STORESCU, scp.port, "-v", "--no-halt", str(out_file), str(frames[1]))
    text = out.stdout + out.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in text, text  # DCMTK's name for 0xC2xx
    assert text.count("(Success)") == 1
    assert not list(tmp_path.parent.rglob("escaped*")) and not list(scp.spool.rglob("escaped*"))


# ---- item 8: compressed transfer syntaxes ---------------------------------------------------------------------------
def test_only_decodable_transfer_syntaxes_are_offered():
    ts = decodable_transfer_syntaxes()
    for need in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57",
                 "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"):
        assert need in ts, need
    assert "1.2.840.10008.1.2.4.100" not in ts  # MPEG2: no decoder, not accepted
    assert decodable_transfer_syntaxes(accept_compressed=False) == ts[:4]


def _compress(tool: str, frames: list[Path], out_dir: Path, *args: str) -> list[Path]:
    out_dir.mkdir()
    result = []
    for f in frames:
        dst = out_dir / f.name
        if tool == "j2k":  # no DCMTK tool writes JPEG 2000: pydicom + pylibjpeg-openjpeg
            ds = pydicom.dcmread(f)
            if ds.Rows < 64:  # openjpeg's 6 resolution levels need at least 32 x 32 pixels: enlarge 4x
                big = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))
                ds.Rows, ds.Columns = big.shape
                ds.PixelData = big.tobytes()
                (out_dir.parent / "big").mkdir(exist_ok=True)
                ds.save_as(out_dir.parent / "big" / f.name, enforce_file_format=True)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(dst, enforce_file_format=True)
        else:
            p = subprocess.run([tool, *args, str(f), str(dst)], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
        result.append(dst)
    return result


@pytest.mark.parametrize("tool, args, ts, propose", [
    ("dcmcjpeg", ("+e1",), "1.2.840.10008.1.2.4.70", "-xs"),  # JPEG Lossless SV1: what PACS forward
    ("dcmcjpls", (), "1.2.840.10008.1.2.4.80", "-xt"),  # JPEG-LS lossless
    ("dcmcrle", (), "1.2.840.10008.1.2.5", "-xr"),  # RLE
    ("j2k", (), "1.2.840.10008.1.2.4.90", "-xv"),  # JPEG 2000 lossless
])
def test_compressed_series_end_to_end(make_scp, frames, tmp_path, tool, args, ts, propose):
    if tool != "j2k" and not shutil.which(tool):
        pytest.skip(f"{tool} (DCMTK) not installed")
    packed = _compress(tool, frames, tmp_path / "packed", *args)
    assert str(pydicom.dcmread(packed[0]).file_meta.TransferSyntaxUID) == ts
    scp, rec = make_scp()
    # propose the compressed syntax (one context per syntax): the node takes it, no conversion by storescu
    out = dcmtk(STORESCU, scp.port, propose, "-R", "-v", *map(str, packed))
    assert out.returncode == 0 and (out.stdout + out.stderr).count("(Success)") == N_FRAMES, out.stdout + out.stderr
    assert wait_for(lambda: len(rec.units) == 1)
    unit = rec.units[0]
    for f in frames:
        mine = unit.path / f"{pydicom.dcmread(f).SOPInstanceUID}.dcm"
        assert str(pydicom.dcmread(mine).file_meta.TransferSyntaxUID) == ts  # stored as received
        original = tmp_path / "big" / f.name if tool == "j2k" else f
        np.testing.assert_array_equal(_pixels(mine), _pixels(original))  # decoded pixels equal the originals
    from pipelines.io.dicom_reader import image_study_from_dicom

    img = image_study_from_dicom(unit.path)  # the pipeline's reader decodes them too
    assert img.pixels.shape[0] == N_FRAMES


def test_undecodable_transfer_syntax_is_not_accepted(make_scp, frames, tmp_path):
    """With compressed syntaxes switched off, a JPEG Lossless series is refused at the presentation context,
    never acknowledged."""
    packed = _compress("dcmcjpeg", frames[:1], tmp_path / "packed", "+e1")
    scp, rec = make_scp(node={"dicom_accept_compressed": False})
    out = dcmtk(STORESCU, scp.port, "-xs", "-R", str(packed[0]))
    text = out.stdout + out.stderr
    # storescu cannot decompress to a syntax the node accepts without the codec registered: nothing is sent
    assert "(Success)" not in text, text
    assert stored_files(scp.spool) == []


def test_corrupt_compressed_pixels_are_refused(make_scp, frames, tmp_path):
    packed = _compress("dcmcrle", frames[:1], tmp_path / "packed")
    ds = pydicom.dcmread(packed[0])
    raw = bytearray(ds.PixelData)
    raw[-40:] = b"\xff" * 40  # break the RLE segment
    ds.PixelData = bytes(raw)
    ds.save_as(packed[0], enforce_file_format=True)
    scp, rec = make_scp()
    out = dcmtk(STORESCU, scp.port, "-xr", "-R", "-v", str(packed[0]))
    text = out.stdout + out.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in text, text
    assert stored_files(scp.spool) == []


# ---- dataset size limit ---------------------------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _append_private_ob(src: Path, dst: Path, n_bytes: int) -> None:
    """``src`` + a private (7FE1,0010) creator and (7FE1,1000) OB of ``n_bytes`` zeros, written in chunks (the
    test itself must not hold 200 MB)."""
    shutil.copy(src, dst)
    with dst.open("ab") as fh:
        creator = b"BIGDATA "
        fh.write(struct.pack("<HH", 0x7FE1, 0x0010) + b"LO" + struct.pack("<H", len(creator)) + creator)
        fh.write(struct.pack("<HH", 0x7FE1, 0x1000) + b"OB\0\0" + struct.pack("<I", n_bytes))
        chunk = b"\0" * (1 << 20)
        left = n_bytes
        while left:
            fh.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))


def test_oversized_dataset_is_refused_without_memory_growth(make_scp, frames, tmp_path, caplog):
    """A 200 MB private element with dicom_max_dataset_mb 64: refused with 0xA702 and a comment naming the
    setting; the node's peak RSS grows by far less than the dataset (it used to grow by 600 MB); the spool keeps
    no trace of it and a normal instance is stored afterwards on the same association."""
    big = tmp_path / "big.dcm"
    _append_private_ob(frames[0], big, 200 * 2**20)
    ds = pydicom.dcmread(big, stop_before_pixels=True)  # well-formed up to the big element
    assert ds.SOPInstanceUID
    scp, rec = make_scp(node={"dicom_max_dataset_mb": 64})
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) of this process, which runs the SCP
    base = _rss_kb("VmRSS")
    t0 = time.monotonic()
    out = dcmtk(STORESCU, scp.port, "-v", "--no-halt", str(big), str(frames[1]))
    text = out.stdout + out.stderr
    peak_growth_mb = (_rss_kb("VmHWM") - base) / 1024
    print(f"200 MB dataset refused; peak RSS growth {peak_growth_mb:.1f} MB")
    assert "Received Store Response (Refused: OutOfResources)" in text, text  # DCMTK's name for 0xA7xx
    assert "0xA702" in caplog.text and "dicom_max_dataset_mb" in caplog.text
    assert text.count("(Success)") == 1, text
    assert peak_growth_mb < 60, f"peak RSS grew by {peak_growth_mb:.0f} MB for a 200 MB dataset"
    assert time.monotonic() - t0 < 60
    assert max((p.stat().st_size for p in scp.spool.rglob("*") if p.is_file()), default=0) < 2**20
    assert wait_for(lambda: len(rec.units) == 1) and rec.units[0].n_objects == 1
    assert list(scp.rx_dir.iterdir()) == []


# ---- TLS ------------------------------------------------------------------------------------------------------------
def _openssl(*args: str) -> None:
    p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out",
             str(d / "ca.pem"), "-days", "2", "-subj", "/CN=recon-node test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out",
                 str(d / f"{name}.csr"), "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2",
                 "-extfile", str(d / f"{name}.ext"))
    return {"ca": d / "ca.pem", "server": d / "server.pem", "server_key": d / "server.key",
            "client": d / "client.pem", "client_key": d / "client.key"}


def _tls_node(pki: dict[str, Path], require_client_cert: bool) -> dict:
    from tests.integration.node_harness import free_port

    return {"tls": {"cert": str(pki["server"]), "key": str(pki["server_key"]), "ca": str(pki["ca"]),
                    "require_client_cert": require_client_cert}, "dicom_tls_port": free_port()}


def test_tls_scp_with_dcmtk(make_scp, frames, pki):
    scp, rec = make_scp(node=_tls_node(pki, require_client_cert=True))
    assert scp.tls_port and scp.tls_port != scp.port
    tls = ["+tls", str(pki["client_key"]), str(pki["client"]), "+cf", str(pki["ca"])]
    echo = dcmtk(ECHOSCU, scp.tls_port, *tls)
    assert echo.returncode == 0, echo.stderr
    store = dcmtk(STORESCU, scp.tls_port, *tls, *map(str, frames[:3]))
    assert store.returncode == 0, store.stderr
    assert wait_for(lambda: len(rec.units) == 1) and rec.units[0].n_objects == 3
    # No client certificate while one is required: the TLS handshake fails, nothing is stored.
    anon = dcmtk(ECHOSCU, scp.tls_port, "+tla", "+cf", str(pki["ca"]))
    assert anon.returncode != 0
    plain_on_tls = dcmtk(ECHOSCU, scp.tls_port)
    assert plain_on_tls.returncode != 0
    # A client that does not trust our CA refuses the node's certificate.
    untrusted = dcmtk(ECHOSCU, scp.tls_port, "+tla")
    assert untrusted.returncode != 0
    assert dcmtk(ECHOSCU, scp.port).returncode == 0  # the plain port is separate
    assert len(rec.units) == 1


def test_tls_port_with_optional_client_cert(make_scp, frames, pki):
    scp, rec = make_scp(node=_tls_node(pki, require_client_cert=False))
    assert dcmtk(ECHOSCU, scp.tls_port).returncode != 0  # plain DICOM refused on the TLS port
    anon = dcmtk(STORESCU, scp.tls_port, "+tla", "+cf", str(pki["ca"]), str(frames[0]))
    assert anon.returncode == 0, anon.stderr
    assert wait_for(lambda: len(rec.units) == 1)


def test_sender_delivers_over_tls(frames, pki, tmp_path):
    """C-STORE to a destination with ``tls: true`` (our CA): delivered; with the wrong CA: not delivered,
    retried, the error says why."""
    from node.config import parse_config
    from node.egress.instances import read_instance_records
    from node.egress.outbox import Outbox
    from node.egress.sender import Sender

    pacs_rec = Recorder()
    pacs = DicomSCP(make_config(tmp_path / "pacs", node=_tls_node(pki, require_client_cert=True),
                                sources=[{"name": "node", "ae_title": "RECONNODE", "hosts": ["127.0.0.1"],
                                          "protocols": ["dicom"]}]), pacs_rec)
    pacs.start()
    try:
        cfg = parse_config({
            "node": {"spool_dir": str(tmp_path / "spool"), "ae_title": "RECONNODE"},
            "destinations": [
                {"name": "pacs", "ae_title": NODE_AE, "host": "127.0.0.1", "port": pacs.tls_port, "tls": True,
                 "tls_ca": str(pki["ca"]), "tls_cert": str(pki["client"]), "tls_key": str(pki["client_key"])},
                {"name": "wrongca", "ae_title": NODE_AE, "host": "127.0.0.1", "port": pacs.tls_port, "tls": True,
                 "tls_ca": str(pki["client"]), "tls_cert": str(pki["client"]),
                 "tls_key": str(pki["client_key"])},
            ]}, check_pipelines=False)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        sender = Sender(outbox, cfg.destinations, calling_ae="RECONNODE", timeout_s=10)
        outbox.enqueue(read_instance_records(frames[:2]), "pacs", "job-1")
        outbox.enqueue(read_instance_records(frames[2:3]), "wrongca", "job-2")
        assert sender.send_due() == 2
        rows = {it.destination: it for it in outbox.items()}
        assert [it.state for it in outbox.items(destination="pacs")] == ["sent", "sent"]
        assert rows["wrongca"].state == "pending" and rows["wrongca"].attempts == 1
        assert "SSL" in (rows["wrongca"].last_error or "") or "certificate" in (rows["wrongca"].last_error or "") \
            or "no association" in (rows["wrongca"].last_error or ""), rows["wrongca"].last_error
        assert sender.verify("pacs") is True
        outbox.close()
        assert wait_for(lambda: len(pacs_rec.units) == 1) and pacs_rec.units[0].n_objects == 2
    finally:
        pacs.stop()


def test_tls_config_errors_stop_the_scp(tmp_path, pki):
    cfg = make_config(tmp_path / "spool", node={"tls": {"cert": str(pki["server"]), "key": str(pki["ca"])},
                                                "dicom_tls_port": 0})
    scp = DicomSCP(cfg, Recorder())
    with pytest.raises(Exception):  # key does not match the certificate: fail at start, not at first peer
        scp.start()
    scp.stop()
    assert os.path.exists(pki["server"])


# ---- item 4: partial image series -----------------------------------------------------------------------------------
def test_reader_refuses_a_partial_series(frames, tmp_path):
    from pipelines.io.dicom_reader import IncompleteSeriesError, image_study_from_dicom

    for keep, what in ((frames[:-1], f"{N_FRAMES - 1} of {N_FRAMES} frames"), (frames[:3], f"3 of {N_FRAMES}"),
                       (frames[:2] + frames[3:], "missing temporal positions 3")):
        d = tmp_path / f"keep{len(keep)}-{what[:5]}"
        d.mkdir()
        for f in keep:
            shutil.copy(f, d / f.name)
        with pytest.raises(IncompleteSeriesError, match=what) as e:
            image_study_from_dicom(d)
        assert "allow_partial" in str(e.value)
        assert image_study_from_dicom(d, allow_partial=True).pixels.shape[0] == len(keep)
    assert image_study_from_dicom(frames[0].parent).pixels.shape[0] == N_FRAMES  # complete: fine


MEAN_PLUGIN = (
    "import numpy as np\n"
    "from pipelines.registry import PipelineSpec, register\n"
    "from pipelines.types import ReconImage\n\n"
    "def _run(study, params, ctx):\n"
    "    mean = np.abs(study.pixels).mean(axis=0)\n"
    "    return [ReconImage('image', mean.astype(np.float32), 'mean of the frames', study.geometry)]\n\n"
    "register(PipelineSpec(name='hardening_mean', input_kind='images', summary='test: mean frame', run=_run))\n")


def test_partial_series_fails_the_job_unless_the_route_allows_it(tmp_path, frames):
    """A 3-of-6-frame series through a whole node: the job fails at once (no retries) with an error naming the
    missing frames; the same subset from a source whose route has ``allow_partial: true`` becomes a result."""
    from tests.integration.node_harness import start_node

    plugin = tmp_path / "plugins" / "hardening_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(MEAN_PLUGIN)
    config = {
        "node": {"ae_title": NODE_AE, "plugins": ["hardening_plugin"], "max_attempts": 3},
        "sources": [{"name": "strict", "ae_title": "SCANNER1", "hosts": ["127.0.0.1"], "protocols": ["dicom"]},
                    {"name": "lenient", "ae_title": "SCANNER2", "hosts": ["127.0.0.1"], "protocols": ["dicom"]}],
        "grouping": {"default": {"by": "series", "quiet_seconds": 1.0}},
        "routes": [{"name": "strict", "match": {"source": "strict"}, "pipeline": "hardening_mean"},
                   {"name": "lenient", "match": {"source": "lenient"}, "pipeline": "hardening_mean",
                    "allow_partial": True}],
    }
    node = start_node(tmp_path, config, env={"PYTHONPATH": str(plugin.parent)})
    try:
        assert dcmtk(STORESCU, node.dicom_port, *map(str, frames[:3])).returncode == 0
        failed = node.wait_job_state("failed", timeout=60)
        assert failed.attempts == 1 and "3 of 6 frames" in failed.error and "allow_partial" in failed.error
        assert dcmtk(STORESCU, node.dicom_port, *map(str, frames[:3]), aet="SCANNER2").returncode == 0
        assert wait_for(lambda: any(j.route == "lenient" and j.state in ("done", "failed") for j in node.jobs()),
                        timeout=60)
        done = next(j for j in node.jobs() if j.route == "lenient")
        assert done.state == "done", done.error
        assert "3 of 6 frames" in (done.log or "") and "allow_partial is set" in (done.log or "")
    finally:
        assert node.stop() == 0


# ---- audit events from the DICOM side -------------------------------------------------------------------------------
def test_audit_lines_for_associations_instances_and_delivery(make_scp, frames, tmp_path):
    import json

    from node import audit
    from node.config import FolderDestination
    from node.egress.instances import read_instance_records
    from node.egress.outbox import Outbox
    from node.egress.sender import Sender

    log_path = tmp_path / "audit.jsonl"
    audit.configure(log_path)
    try:
        scp, rec = make_scp()
        assert dcmtk(ECHOSCU, scp.port, aet="INTRUDER").returncode != 0
        assert dcmtk(STORESCU, scp.port, str(frames[0])).returncode == 0
        bad = pydicom.dcmread(frames[1])
        bad.StudyInstanceUID = "../x"
        assoc = _associate(scp.port, MRImageStorage)
        assert assoc.send_c_store(bad).Status == 0xC211
        assoc.release()
        assert wait_for(lambda: len(rec.units) == 1)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        outbox.enqueue(read_instance_records(frames[:1]), "share", "job-1")
        outbox.enqueue(read_instance_records(frames[1:2]), "gone", "job-2")  # a destination no longer configured: failed, audited
        Sender(outbox, [FolderDestination(name="share", path=tmp_path / "share")]).send_due()
        outbox.close()
    finally:
        audit.configure(None)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    kinds = [(r["kind"], r["outcome"]) for r in lines]
    assert ("dicom.association.refused", "refused") in kinds and ("dicom.association.accepted", "success") in kinds
    assert ("dicom.instance.stored", "success") in kinds and ("dicom.instance.refused", "refused") in kinds
    assert ("egress.delivered", "success") in kinds and ("egress.failed", "failure") in kinds
    refused = next(r for r in lines if r["kind"] == "dicom.association.refused")
    assert refused["actor_ae"] == "INTRUDER" and refused["actor_ip"] == "127.0.0.1"
    stored = next(r for r in lines if r["kind"] == "dicom.instance.stored")
    assert stored["sop_uid"] == pydicom.dcmread(frames[0]).SOPInstanceUID and stored["actor_ae"] == "SCANNER1"
    text = log_path.read_text()
    assert str(pydicom.dcmread(frames[0]).PatientName) not in text  # no patient names


def test_a_peer_announcing_a_giant_pdu_is_cut_off(make_scp, frames):
    """pynetdicom would read a whole PDU into memory as long as its length field says: a peer that ignores the
    maximum PDU length and announces a 300 MB P-DATA-TF is disconnected before it is read; the SCP goes on."""
    import socket

    from pynetdicom import AE as _AE

    scp, rec = make_scp()
    ae = _AE(ae_title="SCANNER1")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
    assert assoc.is_established
    raw: socket.socket = assoc.dul.socket.socket
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kb("VmRSS")
    raw.sendall(struct.pack(">BBL", 0x04, 0, 300 * 2**20) + b"\0" * 65536)  # P-DATA-TF, 300 MB announced
    t0 = time.monotonic()
    while assoc.is_established and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not assoc.is_established  # cut off at once, not after 300 MB
    assert (_rss_kb("VmHWM") - base) / 1024 < 20
    assert dcmtk(STORESCU, scp.port, str(frames[0])).returncode == 0
    assert wait_for(lambda: len(rec.units) == 1)
