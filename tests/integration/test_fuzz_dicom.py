"""DICOM fuzz suite (issue 15): a few hundred malformed datasets, odd UIDs, wrong VRs and huge counts sent with
pynetdicom to one running SCP. Seeded, bounded, loopback.

Asserts: the SCP stays alive (C-ECHO after every batch), every C-STORE gets an answer or the peer-side association
is simply renewed, no unit is made of garbage (every stored instance decodes and has valid UIDs), nothing is
written outside the spool, peak memory stays bounded, and a valid series still becomes a unit afterwards.
The figures (cases tried / accepted / refused / unanswered / unexpected handler errors) are printed for
BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import gc
import logging
import random
import struct
import tempfile
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, RawDataStorage
from pynetdicom import AE

from node import uids
from node.ingest.dicom_scp import DicomSCP
from tests.integration.test_dicom_scp import NODE_AE, N_FRAMES, Recorder, make_config, wait_for
from tests.integration.test_dicom_scp import frames, study  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

SEED = 15
N_CASES = 300
BATCH = 25
MARK = "fuzzescape"  # any path with this name outside the spool would be a traversal

ODD_UIDS = ["", " ", "0", "00", "1.02", "1..2", ".1.2", "1.2.", "1.2.3\n4", "1.2.3\r\n", "1.2\x00.3",
            f"../../../{MARK}", f"/tmp/{MARK}", f"..\\..\\{MARK}", "1.2.3/4", "1." + "9" * 63, "1." + "9" * 200,
            "1.2.3.4 ", "é.1", "1.2.3.4;rm -rf", "%s%s%n", "1.2.840.10008.5.1.4.1.1.4", "2.25." + "1" * 39]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _meta(sop_class: str, sop: str, ts: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    m = FileMetaDataset()
    m.MediaStorageSOPClassUID = sop_class
    m.MediaStorageSOPInstanceUID = sop
    m.TransferSyntaxUID = ts
    return m


def _raw_file(path: Path, body: bytes, sop: str, sop_class: str = MRImageStorage,
              ts: str = ExplicitVRLittleEndian) -> Path:
    """A Part 10 file whose dataset bytes are ``body`` exactly (sent as they are, never decoded by the SCU)."""
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, _meta(sop_class, sop, ts), enforce_standard=True)
        fh.write(body)
    return path


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


class Case:
    """One fuzz case: a dataset (sent encoded by pynetdicom) or a raw file (sent byte for byte)."""

    def __init__(self, name: str, ds: Dataset | None = None, raw: Path | None = None) -> None:
        self.name, self.ds, self.raw = name, ds, raw


def make_cases(template: Dataset, tmp: Path, rng: random.Random) -> list[Case]:
    encoded = pydicom.filebase.DicomBytesIO()
    body_ds = copy.deepcopy(template)
    pydicom.dcmwrite(encoded, body_ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    body = encoded.getvalue()
    cases: list[Case] = []
    kinds = ["uid", "bytes", "truncate", "vr", "length", "count", "nested", "pixels", "raw_ismrmrd", "values"]
    for i in range(N_CASES):
        kind = kinds[i % len(kinds)]
        good_uid = f"1.2.826.0.1.3680043.10.15.{i}"
        if kind == "uid":
            ds = copy.deepcopy(template)
            field = rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
            ds.SOPInstanceUID = good_uid
            setattr(ds, field, rng.choice(ODD_UIDS))
            if field == "SOPInstanceUID" and (not uids.is_valid_uid(ds.SOPInstanceUID)
                                              and len(str(ds.SOPInstanceUID)) > 64):
                ds.SOPInstanceUID = "1.2.3\n4"  # pynetdicom refuses to send > 64 characters
            cases.append(Case(f"{i}:uid:{field}={getattr(ds, field)!r}", ds=ds))
            continue
        if kind == "bytes":  # flip random bytes of the encoded dataset
            b = bytearray(body)
            for _ in range(rng.randint(1, 40)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append(Case(f"{i}:bytes", raw=_raw_file(tmp / f"c{i}.dcm", bytes(b), good_uid)))
            continue
        if kind == "truncate":
            cut = rng.randrange(1, len(body))
            cases.append(Case(f"{i}:truncate@{cut}", raw=_raw_file(tmp / f"c{i}.dcm", body[:cut], good_uid)))
            continue
        if kind == "vr":  # a known tag with a wrong VR / nonsense VR code
            vr = rng.choice([b"US", b"FD", b"SQ", b"XX", b"\0\0", b"OB", b"AT"])
            junk = _element(0x0008, 0x0018, vr, good_uid.encode() + b"\0")  # SOPInstanceUID with a wrong VR
            cases.append(Case(f"{i}:vr:{vr!r}", raw=_raw_file(tmp / f"c{i}.dcm", junk + body[8:], good_uid)))
            continue
        if kind == "length":  # an element that claims far more bytes than follow
            n = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 10**9, 65534])
            junk = body + struct.pack("<HH", 0x7FE1, 0x1000) + b"OB\0\0" + struct.pack("<I", n) + b"short"
            cases.append(Case(f"{i}:length:{n}", raw=_raw_file(tmp / f"c{i}.dcm", junk, good_uid)))
            continue
        if kind == "count":  # huge counts: many private elements / a long multi-valued element
            ds = copy.deepcopy(template)
            ds.SOPInstanceUID = good_uid
            block = ds.private_block(0x0029, "FUZZ", create=True)
            for k in range(rng.choice([200, 240])):
                block.add_new(k + 0x10 if k + 0x10 < 0x100 else 0xFF, "LO", "x" * 60)
            ds.ImageType = ["DERIVED"] * rng.choice([1000, 5000])
            cases.append(Case(f"{i}:count", ds=ds))
            continue
        if kind == "nested":  # deeply nested sequences
            ds = copy.deepcopy(template)
            ds.SOPInstanceUID = good_uid
            inner = Dataset()
            inner.CodeValue = "X"
            for _ in range(rng.choice([20, 60])):
                outer = Dataset()
                outer.ContentSequence = Sequence([inner])
                inner = outer
            ds.ContentSequence = Sequence([inner])
            cases.append(Case(f"{i}:nested", ds=ds))
            continue
        if kind == "pixels":  # pixel module that does not match the pixel data
            ds = copy.deepcopy(template)
            ds.SOPInstanceUID = good_uid
            ds.Rows = rng.choice([0, 1, 65535])
            ds.BitsAllocated = rng.choice([1, 8, 16, 32, 64])
            cases.append(Case(f"{i}:pixels", ds=ds))
            continue
        if kind == "raw_ismrmrd":  # Raw Data Storage carrying junk / a truncated HDF5 signature
            ds = copy.deepcopy(template)
            ds.SOPClassUID = RawDataStorage
            ds.file_meta.MediaStorageSOPClassUID = RawDataStorage
            ds.SOPInstanceUID = good_uid
            del ds.PixelData
            block = ds.private_block(0x0071, "RECON-NODE ISMRMRD", create=True)
            payload = b"\x89HDF\r\n\x1a\n" + rng.randbytes(rng.choice([0, 10, 3000]))
            block.add_new(0x10, "OB", payload)
            block.add_new(0x11, "UL", rng.choice([0, len(payload), 2**32 - 1]))
            cases.append(Case(f"{i}:raw_ismrmrd", ds=ds))
            continue
        # values: odd strings in text elements (control characters, very long, wrong encodings)
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = good_uid
        ds.SeriesDescription = rng.choice(["\x00\x01\x02", "A" * 70000, "../../" + MARK, "\\\\", "é" * 100])
        ds.PatientName = rng.choice(["^^^^", "=" * 200, "\n"])
        cases.append(Case(f"{i}:values", ds=ds))
    return cases


def _ae() -> AE:
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context("1.2.840.10008.1.1")
    for c in (MRImageStorage, RawDataStorage):  # one context per syntax: raw files go out as they are encoded
        ae.add_requested_context(c, ExplicitVRLittleEndian)
        ae.add_requested_context(c, ImplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def test_dicom_fuzz_campaign(frames, tmp_path, monkeypatch, caplog):  # noqa: F811 - fixture
    caplog.set_level(logging.ERROR, logger="node")
    rng = random.Random(SEED)
    template = pydicom.dcmread(frames[0])
    cases = make_cases(template, tmp_path, rng)
    assert len(cases) == N_CASES
    spool = tmp_path / "spool"
    rec = Recorder()
    scp = DicomSCP(make_config(spool, grouping={"default": {"by": "study", "quiet_seconds": 0.5}}), rec)
    scp.start()
    system_tmp = Path(tempfile.gettempdir())
    rx_before = set(system_tmp.glob(".rx-*"))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base_kb = _rss_kb("VmRSS")
    accepted = refused = unanswered = 0
    not_sent: list[str] = []
    try:
        ae = _ae()
        for start in range(0, N_CASES, BATCH):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
            assert assoc.is_established, f"SCP refused an association before case {start}"
            for case in cases[start:start + BATCH]:
                if not assoc.is_established:  # the peer side gave up on the last one: a fresh association
                    unanswered += 1
                    assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
                    assert assoc.is_established
                try:
                    if case.raw is not None:
                        monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
                        status = assoc.send_c_store(case.raw)
                    else:
                        monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", False)
                        status = assoc.send_c_store(case.ds)
                except (ValueError, AttributeError, TypeError, OSError) as e:
                    not_sent.append(f"{case.name}: {type(e).__name__}: {e}"[:160])
                    status = None  # the SCU (pynetdicom) refused to send it: not sent, not counted
                    if not assoc.is_established:
                        unanswered += 1
                    continue
                finally:
                    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", False)
                if status is None or "Status" not in status:
                    unanswered += 1
                elif status.Status == 0:
                    accepted += 1
                else:
                    refused += 1
            if assoc.is_established:
                assoc.release()
            echo = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
            assert echo.is_established and echo.send_c_echo().Status == 0, f"SCP dead after case {start + BATCH}"
            echo.release()
        peak_growth_mb = (_rss_kb("VmHWM") - base_kb) / 1024
        # A valid series still becomes one unit of its own afterwards.
        n_before = len(rec.units)
        ae = _ae()
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
        good = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in frames]
        assoc.release()
        assert good == [0] * N_FRAMES
        study_uid = str(template.StudyInstanceUID)
        assert wait_for(lambda: any(u.attributes.get("StudyInstanceUID") == study_uid and u.n_objects >= N_FRAMES
                                    for u in rec.units[n_before:]), timeout=20)
    finally:
        scp.stop()
    unexpected = [r.getMessage() for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    print(f"\nDICOM fuzz: {N_CASES} cases (seed {SEED}): {accepted} accepted, {refused} refused with a status, "
          f"{unanswered} unanswered, {N_CASES - accepted - refused - unanswered} not sendable by the SCU; "
          f"{len(unexpected)} unexpected handler errors; peak RSS growth {peak_growth_mb:.0f} MB")
    print("\n".join(not_sent[:: max(1, len(not_sent) // 15)]))
    # No unit made of garbage: every stored instance decodes and carries valid UIDs.
    for unit in rec.units:
        for f in unit.path.glob("*.dcm") if unit.path.is_dir() else []:
            ds = pydicom.dcmread(f)
            for _ in ds:
                pass
            assert uids.is_valid_uid(ds.SOPInstanceUID) and uids.is_valid_uid(ds.StudyInstanceUID), f
    # Nothing outside the spool: no traversal target, no received-dataset temp file in the system temp folder.
    assert not list(tmp_path.parent.rglob(f"*{MARK}*")) and not (system_tmp / MARK).exists()
    assert set(system_tmp.glob(".rx-*")) == rx_before
    assert not list(scp.rx_dir.iterdir())
    assert refused >= N_CASES // 3 and accepted + refused + unanswered <= N_CASES
    assert peak_growth_mb < 300, peak_growth_mb
    assert unexpected == [], unexpected[:5]
