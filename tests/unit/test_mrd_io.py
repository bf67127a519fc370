"""MRD writer (header, acquisitions, HDF5, stream, TCP) and MRD reader round trips."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as x
import numpy as np
import pytest
from conftest_sim import make_study
from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer

from node.ingest.mrd_client import send_study
from pipelines.io.mrd_reader import header_xml, raw_study_from_hdf5, raw_study_from_stream
from pipelines.physics.sequences import sequence_from_ismrmrd
from pipelines.sim.mrd_writer import build_header, iter_acquisitions, serialize_study, write_ismrmrd
from pipelines.types import RawStudy

SCHEMA = Path("/usr/share/ismrmrd/schema/ismrmrd.xsd")
KINDS = ["cartesian", "spiral", "radial"]


@pytest.fixture(scope="module", params=["cartesian", "spiral"])
def study(request):
    return make_study(request.param)


@pytest.fixture(scope="module")
def schema():
    xmlschema = pytest.importorskip("xmlschema")
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} not installed (Debian package ismrmrd-schema)")
    return xmlschema.XMLSchema(str(SCHEMA))


def _deserialize(buf: bytes) -> list:
    return list(ProtocolDeserializer(io.BytesIO(buf)).deserialize())


def assert_raw_equal(a: RawStudy, b: RawStudy) -> None:
    assert a.header_xml == b.header_xml
    assert a.data.dtype == b.data.dtype == np.complex64
    assert a.data.tobytes() == b.data.tobytes()
    if a.trajectory is None:
        assert b.trajectory is None
    else:
        assert a.trajectory.tobytes() == b.trajectory.tobytes()
    for f in ("line", "frame", "slice", "flags"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert (a.matrix, a.fov_mm, a.trajectory_kind) == (b.matrix, b.fov_mm, b.trajectory_kind)
    assert a.study == b.study
    ga, gb = a.geometry, b.geometry
    assert (ga.matrix, ga.pixel_spacing_mm, ga.slice_thickness_mm, ga.orientation, ga.frame_of_reference_uid) == (
        gb.matrix, gb.pixel_spacing_mm, gb.slice_thickness_mm, gb.orientation, gb.frame_of_reference_uid)
    np.testing.assert_array_equal(ga.positions, gb.positions)
    assert a.sequence.fingerprint_key() == b.sequence.fingerprint_key()


# ---- header ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_header_validates_against_ismrmrd_schema(kind, schema):
    xml = header_xml(build_header(make_study(kind)))
    schema.validate(xml)  # raises with the offending element


def test_header_with_non_ascii_and_empty_fields_validates(schema):
    s = make_study("spiral", patient_name="Müller^Zoë")
    s.study.accession_number = "ACC-7"  # not an xs:long: must travel as a user parameter only
    s.study.study_date = s.study.study_time = s.study.patient_birth_date = s.study.patient_sex = ""
    h = build_header(s)
    schema.validate(header_xml(h))
    assert h.studyInformation.accessionNumber is None
    assert h.studyInformation.studyDate is None and h.subjectInformation.patientBirthdate is None


def test_header_content(study):
    h = build_header(study)
    n_f, n_r, n_c, n_s = study.kspace.shape
    assert h.version is None  # see build_header: libismrmrd rejects any version but its own minor number
    assert h.acquisitionSystemInformation.receiverChannels == n_c
    assert h.acquisitionSystemInformation.systemVendor == "recon-node simulator"
    assert h.experimentalConditions.H1resonanceFrequency_Hz == round(42.577478e6 * 3.0)
    assert h.measurementInformation.patientPosition.value == "HFS"
    enc = h.encoding[0]
    assert enc.trajectory.value == study.trajectory_kind
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.z) == (32, 32, 1)
    assert enc.reconSpace.fieldOfView_mm.z == 5.0
    assert enc.encodingLimits.repetition.maximum == n_f - 1
    assert enc.encodingLimits.slice.maximum == 0
    if study.trajectory_kind == "cartesian":
        assert enc.encodingLimits.kspace_encoding_step_1.maximum == 31
        assert enc.trajectoryDescription is None
    else:
        assert enc.trajectoryDescription.identifier == "mrf_spiral_vd"
        longs = {p.name: p.value for p in enc.trajectoryDescription.userParameterLong}
        assert longs["n_interleaves"] == int(study.lines.max()) + 1
    doubles = {p.name: p.value for p in h.userParameters.userParameterDouble}
    strings = {p.name: p.value for p in h.userParameters.userParameterString}
    assert doubles["noise_std"] == study.noise_std and doubles["snr"] == study.snr
    assert strings["phantom"] == "random" and strings["accession_number"] == "00123456"
    seq = sequence_from_ismrmrd(h)
    np.testing.assert_array_equal(seq.flip_angles_deg, study.sequence.flip_angles_deg)
    np.testing.assert_array_equal(seq.tr_ms, study.sequence.tr_ms)
    assert seq.ti_ms == 40.0 and seq.name == "test20"


def test_acquisition_headers(study):
    acqs = list(iter_acquisitions(study))
    n_f, n_r, n_c, n_s = study.kspace.shape
    assert len(acqs) == n_f * n_r
    a = acqs[2 * n_r + 1]  # frame 2, readout 1
    assert a.idx.repetition == 2 and a.idx.kspace_encode_step_1 == study.lines[2, 1] and a.idx.slice == 0
    assert a.active_channels == a.available_channels == n_c and a.number_of_samples == n_s
    assert a.data.shape == (n_c, n_s) and np.array_equal(a.data, study.kspace[2, 1])
    if study.trajectory_kind == "cartesian":
        assert a.trajectory_dimensions == 0
    else:
        assert a.trajectory_dimensions == 2 and np.array_equal(a.traj, study.trajectory[2, 1])
    assert a.sample_time_us > 0 and a.scan_counter == 2 * n_r + 1
    assert tuple(a.read_dir) == (1, 0, 0) and tuple(a.phase_dir) == (0, 1, 0) and tuple(a.slice_dir) == (0, 0, 1)
    # Off-centre slice: position is the encoding centre = first pixel + (N // 2) pixels in-plane (32 x 6.875 mm).
    g = study.geometry
    np.testing.assert_allclose(a.position, g.positions[0] + [110, 110, 0], atol=1e-4)
    assert acqs[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) and acqs[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_REPETITION)
    assert acqs[n_r - 1].is_flag_set(ismrmrd.ACQ_LAST_IN_REPETITION)
    assert not acqs[n_r - 1].is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    last = acqs[-1]
    assert last.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT) and last.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
    assert len({a.measurement_uid for a in acqs}) == 1
    stamps = [a.acquisition_time_stamp for a in acqs]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]


# ---- MRD stream --------------------------------------------------------------------------------------------------
def test_stream_round_trip_is_bit_exact(study):
    buf = io.BytesIO()
    n = serialize_study(study, buf, config="mrf_default")
    objs = _deserialize(buf.getvalue())
    assert isinstance(objs[0], ConfigFile) and objs[0] == "mrf_default"
    assert isinstance(objs[1], x.ismrmrdHeader)
    assert header_xml(objs[1]) == header_xml(build_header(study))
    got = objs[2:]
    assert n == len(got) == study.n_frames * study.kspace.shape[1]
    for a, b in zip(iter_acquisitions(study), got, strict=True):
        assert bytes(a.getHead()) == bytes(b.getHead())
        assert a.data.tobytes() == b.data.tobytes() and a.traj.tobytes() == b.traj.tobytes()
        assert (b.idx.repetition, b.idx.kspace_encode_step_1, b.idx.slice) == (
            a.idx.repetition, a.idx.kspace_encode_step_1, a.idx.slice)


def test_stream_carries_non_ascii_patient_name():
    s = make_study("spiral", patient_name="Müller^Zoë")
    buf = io.BytesIO()
    serialize_study(s, buf)
    raw = raw_study_from_stream(_deserialize(buf.getvalue()))
    assert raw.study.patient_name == "Müller^Zoë"


# ---- HDF5 --------------------------------------------------------------------------------------------------------
def test_hdf5_round_trip_is_exact(study, tmp_path):
    path = write_ismrmrd(study, tmp_path / "s.h5")
    raw = raw_study_from_hdf5(path)
    n_f, n_r, n_c, n_s = study.kspace.shape
    assert raw.data.tobytes() == study.kspace.reshape(n_f * n_r, n_c, n_s).tobytes()
    if study.trajectory is None:
        assert raw.trajectory is None
    else:
        assert raw.trajectory.tobytes() == study.trajectory.reshape(n_f * n_r, n_s, 2).tobytes()
    np.testing.assert_array_equal(raw.line, study.lines.reshape(-1))
    np.testing.assert_array_equal(raw.frame, np.repeat(np.arange(n_f), n_r))
    np.testing.assert_array_equal(raw.slice, 0)
    assert raw.trajectory_kind == study.trajectory_kind
    assert raw.matrix == (32, n_s if study.trajectory_kind == "cartesian" else 32)
    assert raw.fov_mm == (220.0, 220.0)
    assert raw.source_path == str(path)
    # Geometry: exact up to the float32 of the acquisition header.
    g, rg = study.geometry, raw.geometry
    assert rg.matrix == g.matrix and rg.pixel_spacing_mm == g.pixel_spacing_mm
    assert rg.slice_thickness_mm == g.slice_thickness_mm and rg.orientation == g.orientation
    np.testing.assert_allclose(rg.positions, g.positions, atol=1e-4)
    assert rg.frame_of_reference_uid == g.frame_of_reference_uid
    expected = dict(vars(study.study), manufacturer="recon-node simulator", series_instance_uid="")
    assert vars(raw.study) == expected
    seq = raw.sequence
    for f in ("flip_angles_deg", "tr_ms", "te_ms"):
        np.testing.assert_array_equal(getattr(seq, f), getattr(study.sequence, f))
    assert (seq.ti_ms, seq.name, seq.readout) == (40.0, "test20", "fisp")


def test_hdf5_readable_by_ismrmrd_dataset(study, tmp_path):
    path = write_ismrmrd(study, tmp_path / "s.h5")
    expected = list(iter_acquisitions(study))
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as ds:
        assert ds.number_of_acquisitions() == len(expected)
        xml = ds.read_xml_header()
        assert x.CreateFromDocument(xml) == build_header(study)
        for i in (0, 7, len(expected) - 1):
            assert ds.read_acquisition(i) == expected[i]


def test_stream_and_hdf5_give_the_same_raw_study(study, tmp_path):
    from_file = raw_study_from_hdf5(write_ismrmrd(study, tmp_path / "s.h5"))
    buf = io.BytesIO()
    serialize_study(study, buf, config="default")
    from_stream = raw_study_from_stream(_deserialize(buf.getvalue()))
    assert from_stream.source_path == ""
    from_stream.source_path = from_file.source_path
    assert_raw_equal(from_stream, from_file)


def test_hdf5_file_streams_like_the_study(study, tmp_path):
    path = write_ismrmrd(study, tmp_path / "s.h5")
    a, b = io.BytesIO(), io.BytesIO()
    serialize_study(study, a)
    serialize_study(path, b)
    assert a.getvalue() == b.getvalue()


@pytest.mark.skipif(shutil.which("ismrmrd_recon_cartesian_2d") is None, reason="Debian ismrmrd-tools not installed")
def test_hdf5_readable_by_the_c_library(tmp_path):
    """libismrmrd 1.8 (Debian) reads our header and acquisitions: its demo recon matches a NumPy recon.

    ``ismrmrd_info`` only prints the library version (it opens no file), so the checks use
    ``ismrmrd_recon_cartesian_2d`` (prints matrix, channels and acquisition count, writes an image into the file)
    and ``ismrmrd_test_xml`` (parses and re-serializes the header with the C++ library).
    """
    assert subprocess.run(["ismrmrd_info"], capture_output=True, cwd=tmp_path).returncode == 0
    s = make_study("cartesian", n_frames=2, n_readouts=32, n_coils=2)
    s.lines[:] = np.arange(32)[None]  # every frame fully sampled
    path = write_ismrmrd(s, tmp_path / "full.h5")
    out = subprocess.run(["ismrmrd_recon_cartesian_2d", str(path)], capture_output=True, text=True, timeout=30,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Number of acquisitions      : 64" in out.stdout
    assert "Encoding Matrix Size        : [32, 32, 1]" in out.stdout
    assert "Number of Channels          : 2" in out.stdout
    with h5py.File(path) as f:
        c_image = np.squeeze(f["dataset/cpp/data"][...]).astype(np.float64)
    # The demo recon overwrites lines repetition after repetition: the image is frame 1's sum of squares.
    k = s.kspace[1].transpose(1, 0, 2)  # [coil, ky, kx]
    coil_images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1))), axes=(-2, -1))
    sos = np.sqrt((np.abs(coil_images) ** 2).sum(0))
    assert np.corrcoef(c_image.ravel(), sos.ravel())[0, 1] > 0.9999

    xml_file = tmp_path / "header.xml"
    xml_file.write_bytes(header_xml(build_header(make_study("spiral", patient_name="Müller^Zoë"))).encode())
    # It writes raw.xml and processed.xml into its working directory: keep them in tmp_path.
    out = subprocess.run(["ismrmrd_test_xml", str(xml_file)], capture_output=True, text=True, timeout=30,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_large_study_writes_fast(tmp_path):
    # 1000 frames x 2 readouts x 8 coils: the bulk writer and reader take well under a second each.
    s = make_study("spiral", n_frames=1000, n_readouts=2, n_coils=8, n_samples=256)
    t0 = time.perf_counter()
    path = write_ismrmrd(s, tmp_path / "big.h5")
    raw = raw_study_from_hdf5(path)
    assert raw.data.shape == (2000, 8, 256)
    assert time.perf_counter() - t0 < 10.0  # generous: this guards against per-acquisition resizing only


def test_noise_scans_are_left_out(tmp_path):
    s = make_study("cartesian")
    path = write_ismrmrd(s, tmp_path / "s.h5")
    noise = ismrmrd.Acquisition.from_array(np.ones((4, 32), np.complex64))
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as ds:
        ds.append_acquisition(noise)  # the bulk-written table stays appendable
    raw = raw_study_from_hdf5(path)
    assert raw.data.shape[0] == s.n_frames * 2
    assert raw.data.tobytes() == s.kspace.reshape(-1, 4, 32).tobytes()


# ---- error paths -------------------------------------------------------------------------------------------------
def test_reader_rejects_a_non_hdf5_file(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("not an HDF5 file")
    with pytest.raises(ValueError, match=r"notes\.h5.*not an ISMRMRD file"):
        raw_study_from_hdf5(p)


def test_reader_rejects_hdf5_without_dataset_group(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_group("images")
    with pytest.raises(ValueError, match=r"other\.h5.*no group /dataset.*images"):
        raw_study_from_hdf5(p)


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        raw_study_from_hdf5(tmp_path / "missing.h5")
    p = tmp_path / "empty.h5"
    with h5py.File(p, "w") as f:
        f.create_group("dataset")
    with pytest.raises(ValueError, match=r"empty\.h5.*no header"):
        raw_study_from_hdf5(p)
    path = write_ismrmrd(make_study("cartesian"), tmp_path / "ok.h5")
    with h5py.File(path, "a") as f:
        del f["dataset/data"]
    with pytest.raises(ValueError, match=r"ok\.h5.*no acquisitions"):
        raw_study_from_hdf5(path)
    # A truncated file: HDF5 cannot open it any more.
    good = write_ismrmrd(make_study("cartesian"), tmp_path / "good.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.h5"):
        raw_study_from_hdf5(cut)


def test_reader_rejects_mixed_sample_counts(tmp_path):
    path = write_ismrmrd(make_study("cartesian"), tmp_path / "s.h5")
    odd = ismrmrd.Acquisition.from_array(np.ones((4, 16), np.complex64))
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as ds:
        ds.append_acquisition(odd)
    with pytest.raises(ValueError, match="sample count"):
        raw_study_from_hdf5(path)


def test_reader_refuses_headers_that_claim_more_samples_than_sent(tmp_path):
    """Sizes in acquisition headers are claims: a file whose headers say 4096 samples a readout while each holds 32
    is refused by name before anything is sized from the claim (4 coils x 4096 x 10^6 rows would be 131 GB)."""
    path = write_ismrmrd(make_study("cartesian"), tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        ds = f["dataset/data"]
        rows = ds[:]
        rows["head"]["number_of_samples"] = 4096
        ds[:] = rows
    with pytest.raises(ValueError, match=r"s\.h5: acquisition 0 holds 128 complex samples, the headers say 4 coils x 4096"):
        raw_study_from_hdf5(path)


def test_reader_holds_the_study_once(tmp_path):
    """Reading a 131 MB study (2000 readouts x 16 coils x 512 samples) grows the reader's peak RSS by little more
    than the samples themselves, in a fresh interpreter. Measured: 1.28x; per-acquisition vectors and their stacked
    copy (the reader before) took 2.25x."""
    path = write_ismrmrd(make_study("spiral", n_frames=1000, n_readouts=2, n_coils=16, n_samples=512), tmp_path / "m.h5")
    # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) size.
    code = (
        "import re, sys\n"
        "from pipelines.io.mrd_reader import raw_study_from_hdf5\n"
        "def hwm():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return int(re.search(r'VmHWM:\\s+(\\d+)', f.read()).group(1)) * 1024\n"
        "base = hwm()\n"
        "raw = raw_study_from_hdf5(sys.argv[1])\n"
        "print((hwm() - base) / raw.data.nbytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.split()[-1])
    print("peak RSS growth / sample bytes", ratio)
    assert 1.0 <= ratio < 1.6, ratio


def test_a_large_study_waits_on_disk_and_is_read_a_slice_at_a_time(tmp_path):
    """With a spill folder (the node's <spool>/tmp) a study larger than SPILL_BYTES is not held: the reader's peak
    RSS does not grow with the study (a fixed ~90 MB of HDF5 blocks and headers; held in memory it grows by 1.28x
    the samples), nor does reading an eighth of the rows at a time; the rows read are exactly those of the
    in-memory reader, and the spill file has no name (nothing is left behind)."""
    import pipelines.io.mrd_reader as reader
    from pipelines.io.disk_rows import DiskRows

    spill = tmp_path / "spill"
    code = (
        "import re, sys\n"
        "from pathlib import Path\n"
        "import pipelines.io.mrd_reader as reader\n"
        "def hwm():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return int(re.search(r'VmHWM:\\s+(\\d+)', f.read()).group(1)) * 1024\n"
        "reader.SPILL_BYTES = 0\n"
        "base = hwm()\n"
        "raw = reader.raw_study_from_hdf5(sys.argv[1], spill_dir=Path(sys.argv[2]))\n"
        "read = hwm() - base\n"
        "n = raw.data.shape[0] // 8\n"
        "for i in range(8):\n"
        "    part = raw.data[i * n:(i + 1) * n]\n"
        "    del part\n"
        "print(type(raw.data).__name__, raw.data.nbytes, read, hwm() - base)\n"
    )
    growth = {}
    for frames in (1000, 2000):
        path = write_ismrmrd(make_study("spiral", n_frames=frames, n_readouts=2, n_coils=16, n_samples=512),
                             tmp_path / f"m{frames}.h5")
        out = subprocess.run([sys.executable, "-c", code, str(path), str(spill)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        kind, nbytes, read, sliced = out.stdout.split()
        assert kind == "DiskRows"
        growth[frames] = (int(nbytes), int(read), int(sliced))
    (n1, r1, s1), (n2, r2, s2) = growth[1000], growth[2000]
    print(f"peak RSS growth reading {n1 / 1e6:.0f} / {n2 / 1e6:.0f} MB of samples: {r1 / 1e6:.0f} / {r2 / 1e6:.0f} MB; "
          f"after reading an eighth at a time {s1 / 1e6:.0f} / {s2 / 1e6:.0f} MB")
    assert r2 - r1 < 0.15 * (n2 - n1) and s2 - s1 < 0.15 * (n2 - n1)  # in memory: 1.28 x (n2 - n1)
    assert r2 < 0.5 * n2 and s2 < 0.5 * n2

    in_memory = raw_study_from_hdf5(path)
    spill_bytes = reader.SPILL_BYTES
    try:
        reader.SPILL_BYTES = 0
        on_disk = raw_study_from_hdf5(path, spill_dir=spill)
        (tmp_path / "a-file").write_text("")
        nowhere = raw_study_from_hdf5(path, spill_dir=tmp_path / "a-file" / "spill")  # cannot: kept in memory
    finally:
        reader.SPILL_BYTES = spill_bytes
    assert isinstance(nowhere.data, np.ndarray)
    assert isinstance(on_disk.data, DiskRows) and on_disk.data.shape == in_memory.data.shape
    assert list(spill.iterdir()) == []  # an unnamed file
    rows = np.flatnonzero(in_memory.frame % 7 == 3)
    np.testing.assert_array_equal(on_disk.data[rows], in_memory.data[rows])
    np.testing.assert_array_equal(on_disk.data[5], in_memory.data[5])
    np.testing.assert_array_equal(np.asarray(on_disk.data), in_memory.data)  # whole, for code that needs it so
    small = raw_study_from_hdf5(path, spill_dir=spill)  # 262 MB, under the threshold: in memory, as before
    assert isinstance(small.data, np.ndarray)


def test_stream_reader_needs_header_and_acquisitions():
    s = make_study("cartesian")
    with pytest.raises(ValueError, match="no ISMRMRD header"):
        raw_study_from_stream(iter_acquisitions(s))
    with pytest.raises(ValueError, match="no acquisitions"):
        raw_study_from_stream([build_header(s)])


# ---- TCP ---------------------------------------------------------------------------------------------------------
class _Server:
    """A one-connection MRD server: receives the whole stream, optionally answers with a TEXT and CLOSE."""

    def __init__(self, answer: bool = True) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.received: list = []
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as rf, conn.makefile("wb") as wf:
            self.received = list(ProtocolDeserializer(rf).deserialize())
            if self.answer:
                ser = ProtocolSerializer(wf)
                n = sum(isinstance(o, ismrmrd.Acquisition) for o in self.received)
                ser.serialize(f"OK {n} acquisitions")
                ser.close()
            else:
                self.release.wait(30)

    def stop(self) -> None:
        self.release.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("from_file", [False, True])
def test_send_study_to_server(from_file, tmp_path):
    s = make_study("spiral")
    server = _Server()
    try:
        target = write_ismrmrd(s, tmp_path / "s.h5") if from_file else s
        reply = send_study(target, "127.0.0.1", server.port, config="mrf_default", timeout=10)
    finally:
        server.stop()
    assert reply == ["OK 40 acquisitions"]
    assert server.received[0] == "mrf_default" and isinstance(server.received[0], ConfigFile)
    got = raw_study_from_stream(server.received)
    assert got.data.tobytes() == s.kspace.reshape(40, 4, 64).tobytes()


def test_send_study_times_out_when_the_server_never_answers():
    server = _Server(answer=False)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"127\.0\.0\.1.*no reply within 0\.5 s"):
            send_study(make_study("cartesian"), "127.0.0.1", server.port, timeout=0.5)
    finally:
        server.stop()
    assert time.monotonic() - t0 < 5.0


def test_send_study_reports_an_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(ConnectionError, match=rf"cannot connect to MRD server 127\.0\.0\.1:{port}"):
            send_study(make_study("cartesian"), "127.0.0.1", port, timeout=2)


def test_send_study_reports_a_server_that_drops_the_stream():
    # The server reads the header, answers ERR and hangs up while ~25 MB of acquisitions are still coming.
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def serve() -> None:
        conn, _ = sock.accept()
        with conn, conn.makefile("rb") as rf, conn.makefile("wb") as wf:
            objs = ProtocolDeserializer(rf).deserialize()
            next(objs), next(objs)  # config, header
            ser = ProtocolSerializer(wf)
            ser.serialize("ERR this node does not take spiral data")
            ser.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    big = make_study("spiral", n_frames=200, n_readouts=2, n_coils=8, n_samples=2048)
    try:
        with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port} dropped the connection after \d+ acq"):
            send_study(big, "127.0.0.1", port, timeout=5)
    finally:
        thread.join(5)
        sock.close()


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed")
def test_reader_takes_a_file_written_by_the_c_library(tmp_path):
    path = tmp_path / "sl.h5"
    out = subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "32", "-c", "2", "-r", "2", "-C",
                          "-o", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    raw = raw_study_from_hdf5(path)
    with h5py.File(path) as f:
        assert f["dataset/data"].shape == (65,)  # 1 noise scan + 2 repetitions x 32 lines
    assert raw.data.shape == (64, 2, 64)  # noise scan left out; readout oversampled x2
    assert raw.matrix == (32, 64) and raw.geometry.matrix == (32, 32) and raw.trajectory is None
    np.testing.assert_array_equal(raw.frame, np.repeat([0, 1], 32))
    np.testing.assert_array_equal(raw.line, np.tile(np.arange(32), 2))
    assert raw.study.institution_name == "ISMRM Synthetic Imaging Lab" and raw.sequence is None


def test_disk_rows_index_as_the_array_does(tmp_path):
    from pipelines.io.disk_rows import RowWriter

    rng = np.random.default_rng(1)
    a = (rng.standard_normal((50, 3, 8)) + 1j * rng.standard_normal((50, 3, 8))).astype(np.complex64)
    w = RowWriter(tmp_path, 2 * 3 * 8)
    w.append(a[:20].view(np.float32).reshape(20, -1))
    w.append(a[20:].view(np.float32).reshape(30, -1))
    d = w.finish(3, 8)
    assert d.shape == a.shape and len(d) == 50 and d.nbytes == a.nbytes
    mask = a[:, 0, 0].real > 0
    for key in (7, -1, slice(None), slice(3, 40, 4), slice(10, 10), [4, 5, 6, 30, 2, 2], np.array([[1, 2], [3, 9]]),
                mask, (slice(5, 9), 1), (np.arange(3), slice(None), slice(2, 4)), (0, 2, 7)):
        np.testing.assert_array_equal(d[key], a[key], err_msg=str(key))
    with pytest.raises(IndexError):
        d[50]
    with pytest.raises(ValueError, match="rows of 48 float32 values"):
        w.append(np.zeros((2, 47), np.float32))


def test_whole_study_sums_in_chunks_match_one_sum(tmp_path, monkeypatch):
    """cartesian_kspace and the frames' mean k-space sum a study a chunk of readouts at a time (it may be on disk):
    the same k-space, to float rounding, as one sum over every readout, from memory and from disk."""
    import pipelines.io.mrd_reader as reader
    import pipelines.recon.cartesian as cartesian
    import pipelines.recon.raw_prep as raw_prep

    path = write_ismrmrd(make_study("cartesian", n_frames=300, n_readouts=4, n_coils=2), tmp_path / "c.h5")
    raw = raw_study_from_hdf5(path)
    monkeypatch.setattr(reader, "SPILL_BYTES", 0)
    on_disk = raw_study_from_hdf5(path, spill_dir=tmp_path)
    want_k, want_mask = raw_prep.cartesian_kspace(raw)
    want_frames = cartesian.reconstruct_frames(raw)
    for module in (raw_prep, cartesian):
        monkeypatch.setattr(module, "ROW_CHUNK", 100)  # 12 chunks of the 1200 readouts
    for study in (raw, on_disk):
        k, mask = raw_prep.cartesian_kspace(study)
        np.testing.assert_allclose(k, want_k, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mask, want_mask)
        np.testing.assert_allclose(cartesian.reconstruct_frames(study), want_frames, rtol=1e-5, atol=1e-5)


def test_the_node_keeps_a_large_study_in_its_tmp_folder(tmp_path, monkeypatch, caplog):
    """run_unit (the node and `recon-node process`) reads a large raw study into the job's tmp folder, says so in
    the job log, and writes the same images as from memory."""
    import logging

    import pipelines.io.mrd_reader as reader
    from node import run

    path = write_ismrmrd(make_study("cartesian", n_frames=20), tmp_path / "c.h5")

    def images(tmp_root, out):
        req = run.RunRequest(input=path, pipeline="cartesian_frames", params={}, out_dir=out, job_id="j-1",
                             dicom=False, device="cpu", tmp_root=tmp_root, kind="mrd")
        run.run_unit(req, log=logging.getLogger("test-job"))
        with np.load(out / "images.npz") as f:
            return {k: f[k] for k in f.files}

    want = images(None, tmp_path / "in-memory")
    assert "wait on disk" not in caplog.text
    monkeypatch.setattr(reader, "SPILL_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="test-job"):
        got = images(tmp_path / "spool-tmp", tmp_path / "on-disk")
    assert f"of raw samples wait on disk (an unnamed file in {tmp_path / 'spool-tmp'})" in caplog.text
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
