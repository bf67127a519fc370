"""DICOM frame writer (MR Image Storage per MRF frame) and the DICOM series reader."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from conftest_sim import make_study
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from pipelines.io.dicom_reader import image_study_from_dicom
from pipelines.sim.dicom_frames import MAX_STORED_VALUE, write_dicom_frames

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


@pytest.fixture(scope="module")
def study():
    return make_study("cartesian", patient_name="Müller^Zoë")


@pytest.fixture(scope="module")
def frames_dir(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("frames")
    paths = write_dicom_frames(study, out, series_number=100)
    assert [p.name for p in paths] == [f"frame_{i:04d}.dcm" for i in range(1, 21)]
    return out


def test_instances_carry_study_series_and_timing(study, frames_dir):
    ds = pydicom.dcmread(frames_dir / "frame_0005.dcm")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    info = study.study
    assert str(ds.PatientName) == "Müller^Zoë" and ds.PatientID == info.patient_id
    assert (ds.PatientBirthDate, ds.PatientSex) == (info.patient_birth_date, info.patient_sex)
    assert (ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber) == (
        info.study_instance_uid, info.study_id, info.accession_number)
    assert (ds.StudyDate, ds.StudyTime, str(ds.ReferringPhysicianName)) == (
        info.study_date, info.study_time, info.referring_physician)
    assert ds.FrameOfReferenceUID == info.frame_of_reference_uid
    assert ds.Modality == "MR" and ds.SeriesNumber == 100
    assert ds.InstanceNumber == ds.TemporalPositionIdentifier == ds.AcquisitionNumber == 5
    assert ds.NumberOfTemporalPositions == 20
    assert float(ds.FlipAngle) == pytest.approx(study.sequence.flip_angles_deg[4], rel=1e-12)
    assert float(ds.RepetitionTime) == pytest.approx(study.sequence.tr_ms[4], rel=1e-12)
    assert float(ds.InversionTime) == 40.0 and list(ds.ScanningSequence) == ["GR", "IR"]
    assert float(ds.MagneticFieldStrength) == 3.0
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], study.geometry.positions[0])
    assert ds.AcquisitionTime > ds.StudyTime  # frames are timed after the inversion


def test_uids_are_deterministic(study, frames_dir, tmp_path):
    again = write_dicom_frames(study, tmp_path / "again", series_number=100)
    first = pydicom.dcmread(frames_dir / "frame_0001.dcm")
    second = pydicom.dcmread(again[0])
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    other = pydicom.dcmread(write_dicom_frames(study, tmp_path / "other", series_number=101)[0])
    assert other.SeriesInstanceUID != first.SeriesInstanceUID and other.SOPInstanceUID != first.SOPInstanceUID
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in again}
    assert len(uids) == 20 and all(len(u) <= 64 for u in uids)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dciodvfy_finds_no_errors(frames_dir):
    for name in ("frame_0001.dcm", "frame_0010.dcm", "frame_0020.dcm"):
        out = subprocess.run(["dciodvfy", str(frames_dir / name)], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
        assert "MRImage" in text  # it recognised the IOD
        errors = [line for line in text.splitlines() if "Error" in line]
        assert not errors, "\n".join(errors)


@pytest.mark.skipif(shutil.which("dcm2pnm") is None, reason="DCMTK (dcm2pnm) not installed")
def test_dcm2pnm_renders_png(frames_dir, tmp_path):
    for name in ("frame_0001.dcm", "frame_0020.dcm"):
        png = tmp_path / (name + ".png")
        out = subprocess.run(["dcm2pnm", "--write-png", str(frames_dir / name), str(png)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reader_restores_frames_in_order(study, frames_dir, tmp_path):
    # Shuffle the file names so that order can only come from the DICOM attributes.
    shuffled = tmp_path / "shuffled" / "nested"
    shuffled.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i, src in enumerate(sorted(frames_dir.iterdir())):
        shutil.copy(src, shuffled / f"{rng.permutation(1000)[0]:03d}_{i}.dcm")
    img = image_study_from_dicom(tmp_path / "shuffled")
    assert img.pixels.shape == (20, 1, 32, 32) and img.pixels.dtype == np.float32
    expected = np.abs(study.fingerprints)
    # One series-wide scale: pixels are proportional to |images|, peak at MAX_STORED_VALUE.
    assert img.pixels.max() == MAX_STORED_VALUE
    err = np.abs(img.pixels[:, 0] / img.pixels.max() - expected / expected.max()).max()
    assert err < 1e-3
    seq = study.sequence
    np.testing.assert_allclose(img.flip_angles_deg, seq.flip_angles_deg, rtol=1e-12)
    np.testing.assert_allclose(img.tr_ms, seq.tr_ms, rtol=1e-12)
    np.testing.assert_allclose(img.te_ms, seq.te_ms, rtol=1e-12)
    info = img.study
    for f in ("patient_id", "patient_name", "patient_birth_date", "patient_sex", "study_instance_uid", "study_id",
              "study_date", "study_time", "accession_number", "study_description", "referring_physician",
              "frame_of_reference_uid", "institution_name", "station_name", "protocol_name"):
        assert getattr(info, f) == getattr(study.study, f), f
    assert info.series_number == 100 and info.field_strength_T == 3.0
    g = img.geometry
    assert g.matrix == (32, 32) and g.pixel_spacing_mm == study.geometry.pixel_spacing_mm
    assert g.orientation == study.geometry.orientation and g.slice_thickness_mm == 5.0
    np.testing.assert_allclose(g.positions, study.geometry.positions)
    assert len(img.sop_instance_uids) == 20 and img.sop_class_uid == MRImageStorage
    first = pydicom.dcmread(frames_dir / "frame_0001.dcm")
    assert img.sop_instance_uids[0] == first.SOPInstanceUID


def test_reader_takes_a_single_file(frames_dir):
    img = image_study_from_dicom(frames_dir / "frame_0003.dcm")
    assert img.pixels.shape == (1, 1, 32, 32) and img.flip_angles_deg.shape == (1,)


def test_custom_images_get_their_own_series(study, tmp_path):
    images = np.linspace(0, 1, 20 * 32 * 32, dtype=np.float32).reshape(20, 32, 32)
    paths = write_dicom_frames(study, tmp_path / "lin", images=images, series_number=5)
    img = image_study_from_dicom(tmp_path / "lin")
    np.testing.assert_allclose(img.pixels[:, 0] / MAX_STORED_VALUE, images, atol=0.5 / MAX_STORED_VALUE + 1e-7)
    assert pydicom.dcmread(paths[0]).SeriesNumber == 5


def test_malformed_file_is_named(frames_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(frames_dir, bad_dir)
    (bad_dir / "junk.dcm").write_bytes(b"this is not DICOM at all")
    with pytest.raises(ValueError, match=r"junk\.dcm.*not a DICOM file"):
        image_study_from_dicom(bad_dir)
    # A truncated instance: its pixel data stops half-way.
    trunc_dir = tmp_path / "trunc"
    shutil.copytree(frames_dir, trunc_dir)
    victim = trunc_dir / "frame_0004.dcm"
    victim.write_bytes(victim.read_bytes()[:-700])
    with pytest.raises(ValueError, match=r"frame_0004\.dcm"):
        image_study_from_dicom(trunc_dir)


def test_several_series_are_listed(study, frames_dir, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(frames_dir, two / "a")
    write_dicom_frames(study, two / "b", images=np.abs(study.fingerprints) * 2, series_number=200)
    uid_a = pydicom.dcmread(frames_dir / "frame_0001.dcm").SeriesInstanceUID
    uid_b = pydicom.dcmread(two / "b" / "frame_0001.dcm").SeriesInstanceUID
    with pytest.raises(ValueError, match="2 SeriesInstanceUIDs") as e:
        image_study_from_dicom(two)
    assert uid_a in str(e.value) and uid_b in str(e.value)


def test_empty_or_missing_input(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        image_study_from_dicom(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        image_study_from_dicom(tmp_path / "empty")


def _enhanced_mr(path, n_frames: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A minimal multi-frame Enhanced MR instance, frames stored in reverse temporal order, with rescale."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 4000, size=(n_frames, 8, 6)).astype(np.uint16)
    flips = np.array([10.0, 20.0, 30.0, 40.0])[:n_frames]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.4", "1.2.3.9"
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber = "Enh^Anced", "E1", "MR", 3
    ds.MagneticFieldStrength = "1.5"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8, 6, n_frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = ["2.0", "1.5"], "4.0"
    orient = Dataset()
    orient.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(n_frames):
        t = n_frames - 1 - i  # stored in reverse temporal order
        fg = Dataset()
        content = Dataset()
        content.TemporalPositionIndex = t + 1
        pos = Dataset()
        pos.ImagePositionPatient = ["-5.0", "-7.0", "12.0"]
        timing = Dataset()
        timing.RepetitionTime, timing.FlipAngle = "12.5", str(flips[t])
        echo = Dataset()
        echo.EffectiveEchoTime = 2.5  # FD
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "0.5", "1.0", "US"
        fg.FrameContentSequence, fg.PlanePositionSequence = [content], [pos]
        fg.MRTimingAndRelatedParametersSequence, fg.MREchoSequence = [timing], [echo]
        fg.PixelValueTransformationSequence = [transform]
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = stored[::-1].tobytes()
    ds.save_as(path, enforce_file_format=True)
    return stored, flips


def test_enhanced_mr_multiframe(tmp_path):
    stored, flips = _enhanced_mr(tmp_path / "enh.dcm")
    img = image_study_from_dicom(tmp_path / "enh.dcm")
    assert img.pixels.shape == (4, 1, 8, 6)
    np.testing.assert_allclose(img.pixels[:, 0], stored * 0.5 + 1.0)
    np.testing.assert_array_equal(img.flip_angles_deg, flips)
    np.testing.assert_array_equal(img.tr_ms, 12.5)
    np.testing.assert_array_equal(img.te_ms, 2.5)
    assert img.geometry.pixel_spacing_mm == (2.0, 1.5) and img.geometry.slice_thickness_mm == 4.0
    np.testing.assert_array_equal(img.geometry.positions, [[-5.0, -7.0, 12.0]])
    assert img.study.field_strength_T == 1.5 and img.sop_class_uid == ENHANCED_MR
