"""Pipeline outputs -> DICOM MR image series in the source study.

Minimal writer for the offline path (``recon-node process``): one MR Image Storage series per output, one
instance per slice (maps) or frame (image series), in the source's study (same StudyInstanceUID, patient and
FrameOfReference). Pixels are uint16 with a linear Real World Value Mapping (UCUM unit) so a viewer shows real
units; the stored range is chosen per series so float maps keep about four significant digits.
The template-driven writer (dicom_templates/) builds on this.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from pipelines.io.dicom_uids import deterministic_uid
from pipelines.types import Geometry, PipelineOutput, QuantitativeMap, StudyInfo

SERIES_NUMBER_BASE = 1000
_MAX_STORED = 65000


def _encoding(data: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that real = stored * slope + intercept covers the finite data in uint16."""
    finite = data[np.isfinite(data)]
    lo = float(min(finite.min(initial=0.0), 0.0)) if finite.size else 0.0
    hi = float(finite.max(initial=0.0)) if finite.size else 1.0
    span = max(hi - lo, 1e-12)
    # Integer-valued data in range (e.g. ms maps) keep slope 1: exact, and what a radiologist expects.
    if lo == 0.0 and hi <= _MAX_STORED and np.allclose(finite, np.round(finite), atol=1e-3):
        return 1.0, 0.0
    slope = float(f"{span / _MAX_STORED:.6g}")
    return slope, lo


def _base_dataset(study: StudyInfo, geometry: Geometry, series_uid: str, series_number: int,
                  description: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_instance_uid or deterministic_uid("study", series_uid)
    ds.StudyID = study.study_id
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.study_description
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:64]
    ds.Manufacturer = "recon-node"
    ds.FrameOfReferenceUID = geometry.frame_of_reference_uid or study.frame_of_reference_uid or \
        deterministic_uid("for", ds.StudyInstanceUID)
    ds.PositionReferenceIndicator = ""
    now = datetime.now()
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Laterality = ""
    ds.PatientPosition = ""
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    # Type 2 in the MR Image module: a derived map has no single echo or repetition time.
    ds.RepetitionTime = None
    ds.EchoTime = None
    ds.EchoTrainLength = None
    ds.MagneticFieldStrength = study.field_strength_T
    ds.ImageOrientationPatient = [float(v) for v in geometry.orientation]
    ds.PixelSpacing = [float(v) for v in geometry.pixel_spacing_mm]
    ds.SliceThickness = float(geometry.slice_thickness_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(geometry.matrix[0]), int(geometry.matrix[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds


def write_outputs(outputs: list[PipelineOutput], study: StudyInfo, out_dir: str | Path, job_id: str) -> list[Path]:
    """Write every output as its own series; UIDs derive from ``job_id`` + kind, so a rerun overwrites."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for number, output in enumerate(outputs, start=1):
        written += write_series(output, study, out_dir / output.kind, job_id,
                                series_number=SERIES_NUMBER_BASE + 10 * number)
    return written


def write_series(output: PipelineOutput, study: StudyInfo, out_dir: Path, job_id: str,
                 series_number: int) -> list[Path]:
    data = output.data
    if np.iscomplexobj(data):
        data = np.abs(data)
    data = np.nan_to_num(np.asarray(data, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    unit = output.unit if isinstance(output, QuantitativeMap) else "1"
    slope, intercept = _encoding(data)
    stored = np.clip(np.round((data - intercept) / slope), 0, 65535).astype(np.uint16)
    geometry = output.geometry
    series_uid = deterministic_uid(job_id, output.kind, "series")
    description = f"{output.description} [{unit}]" if unit not in ("1", "") else output.description
    base = _base_dataset(study, geometry, series_uid, series_number, description)
    # The MR Image IOD has no modality LUT, so the window is in stored values.
    hi = float(np.percentile(stored, 99.5)) if stored.size else 1.0
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(stored.shape[0]):
        ds = Dataset()
        ds.update(base)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = deterministic_uid(job_id, output.kind, "instance", i)
        ds.InstanceNumber = i + 1
        pos = geometry.positions[min(i, geometry.n_slices - 1)]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.SliceLocation = float(pos[2])
        ds.WindowCenter = f"{max(hi, 2.0) / 2:.6g}"
        ds.WindowWidth = f"{max(hi, 2.0):.6g}"
        rw = Dataset()
        rw.RealWorldValueFirstValueMapped = 0
        rw.RealWorldValueLastValueMapped = 65535
        rw.RealWorldValueSlope = slope
        rw.RealWorldValueIntercept = intercept
        rw.LUTExplanation = output.description[:64]
        rw.LUTLabel = output.kind[:16]
        code = Dataset()
        code.CodeValue = unit
        code.CodingSchemeDesignator = "UCUM"
        code.CodingSchemeVersion = "1.4"
        code.CodeMeaning = unit
        rw.MeasurementUnitsCodeSequence = Sequence([code])
        ds.RealWorldValueMappingSequence = Sequence([rw])
        ds.PixelData = stored[i].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = out_dir / f"{output.kind}_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
