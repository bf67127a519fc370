"""Read one DICOM image series (e.g. MRF fingerprint frames) into an :class:`ImageStudy`.

Input: a folder (searched recursively) or a single file. Accepted:

* single-frame images (MR Image Storage and any other image SOP class with plain pixel data), one per frame and
  slice. Slices are told apart by their position along the slice normal; frames are ordered by
  TemporalPositionIdentifier, else AcquisitionNumber, else InstanceNumber (then acquisition time).
* multi-frame Enhanced MR images: frames and slices from the per-frame functional groups (FrameContent's
  TemporalPositionIndex / InStackPositionNumber, PlanePosition, MR Timing and Related Parameters, MR Echo,
  Pixel Value Transformation).

Rules (errors are ValueError and name the file or the series):

* A file that is not DICOM, or that cannot be decoded, is an error naming the file -- a spool folder holding junk
  means something upstream went wrong, and silently skipping it would hide that. Hidden files (names starting
  with ".") and DICOMDIR are skipped; DICOM objects without pixel data (e.g. structured reports) are skipped with
  a warning.
* Exactly one SeriesInstanceUID; several are listed in the error.
* Every slice must have the same number of frames.
* Completeness (issue 15: a 96-of-120-frame series and a 3-frame subset became maps): when the instances say how
  many temporal positions the series has (NumberOfTemporalPositions) or how many images the acquisition has
  (ImagesInAcquisition), a folder with fewer frames / images, or with gaps in TemporalPositionIdentifier, raises
  :class:`IncompleteSeriesError` naming what is missing -- unless ``allow_partial=True`` (a route's
  ``allow_partial: true``), which logs a warning and reads what arrived. A single file is read as it is.

Output: ``pixels`` float32 [frames, slices, y, x] with RescaleSlope / RescaleIntercept applied when present;
``flip_angles_deg`` / ``tr_ms`` / ``te_ms`` when every frame carries them (one value per frame, from the first
slice), else None; geometry from the first frame of each slice (slices ordered along the normal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.types import Geometry, ImageStudy, StudyInfo

log = logging.getLogger(__name__)

_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


@dataclass
class _Frame:
    """One 2D image of the series with what is needed to place it."""

    source: str
    pixels: np.ndarray  # float32 [y, x]
    position: np.ndarray  # ImagePositionPatient
    orientation: tuple[float, ...]
    spacing: tuple[float, ...]  # PixelSpacing as stored: (row, column) in a valid file
    thickness: float
    order: tuple[float, ...]  # temporal sort key
    flip: float | None
    tr: float | None
    te: float | None
    sop_uid: str
    expected_frames: int | None = None  # NumberOfTemporalPositions the instance declares
    expected_images: int | None = None  # ImagesInAcquisition the instance declares
    temporal_id: int | None = None  # TemporalPositionIdentifier


class IncompleteSeriesError(ValueError):
    """The series has fewer frames / images than its own instances declare (see the module docstring)."""


def _int(ds: Dataset | None, keyword: str) -> int | None:
    if ds is None:
        return None
    try:
        v = ds.get(keyword)
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset | None, keyword: str) -> float | None:
    if ds is None:
        return None
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _seq_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
    if not files:
        raise ValueError(f"{path}: the folder holds no files")
    return files


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise ValueError(f"{path}: not a DICOM file ({e})") from e
    except Exception as e:  # truncated files raise EOFError, OSError, struct errors ...
        raise ValueError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from e


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder, truncated pixel data ...
        raise ValueError(f"{path}: cannot decode the pixel data ({type(e).__name__}: {e})") from e
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: colour images are not supported (SamplesPerPixel {ds.SamplesPerPixel})")
    return arr


def _single_frames(ds: Dataset, path: Path) -> list[_Frame]:
    arr = _pixels(ds, path).astype(np.float32)
    slope = _float(ds, "RescaleSlope")
    intercept = _float(ds, "RescaleIntercept")
    if slope is not None or intercept is not None:
        arr = arr * np.float32(1.0 if slope is None else slope) + np.float32(intercept or 0.0)
    temporal = ds.get("TemporalPositionIdentifier")
    order = tuple(
        float(v) if v not in (None, "") else np.inf
        for v in (temporal, ds.get("AcquisitionNumber"), ds.get("InstanceNumber"))
    ) + (_time_seconds(ds.get("AcquisitionTime") or ds.get("ContentTime")),)
    return [
        _Frame(
            source=str(path),
            pixels=arr,
            position=np.asarray([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]),
            orientation=tuple(float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])),
            spacing=tuple(float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])),
            thickness=_float(ds, "SliceThickness") or 0.0,
            order=order,
            flip=_float(ds, "FlipAngle"),
            tr=_float(ds, "RepetitionTime"),
            te=_float(ds, "EchoTime"),
            sop_uid=str(ds.SOPInstanceUID),
            expected_frames=_int(ds, "NumberOfTemporalPositions"),
            expected_images=_int(ds, "ImagesInAcquisition"),
            temporal_id=_int(ds, "TemporalPositionIdentifier"),
        )
    ]


def _time_seconds(tm: Any) -> float:
    s = str(tm or "").strip()
    if len(s) < 6 or not s[:6].isdigit():
        return np.inf
    return int(s[:2]) * 3600 + int(s[2:4]) * 60 + float(s[4:])


def _enhanced_frames(ds: Dataset, path: Path) -> list[_Frame]:
    """Frames of a multi-frame (Enhanced MR) instance from its shared and per-frame functional groups."""
    arr = _pixels(ds, path).astype(np.float32)
    n = int(ds.get("NumberOfFrames", 1))
    if n == 1 and arr.ndim == 2:
        arr = arr[None]
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * n
    if len(per_frame) != n:
        raise ValueError(f"{path}: {n} frames but {len(per_frame)} per-frame functional groups")

    def group(fg: Dataset | None, keyword: str) -> Dataset | None:
        # A functional group is per-frame or shared; per-frame wins.
        return _seq_item(fg, keyword) or _seq_item(shared, keyword)

    frames = []
    for i in range(n):
        fg = per_frame[i]
        measures = group(fg, "PixelMeasuresSequence")
        plane_pos = group(fg, "PlanePositionSequence")
        plane_ori = group(fg, "PlaneOrientationSequence")
        timing = group(fg, "MRTimingAndRelatedParametersSequence")
        echo = group(fg, "MREchoSequence")
        content = group(fg, "FrameContentSequence")
        transform = group(fg, "PixelValueTransformationSequence")
        img = arr[i]
        slope, intercept = _float(transform, "RescaleSlope"), _float(transform, "RescaleIntercept")
        if slope is not None or intercept is not None:
            img = img * np.float32(1.0 if slope is None else slope) + np.float32(intercept or 0.0)
        temporal = content.get("TemporalPositionIndex") if content is not None else None
        order = (float(temporal) if temporal is not None else float(i), float(i))
        frames.append(
            _Frame(
                source=f"{path} frame {i + 1}",
                pixels=img,
                position=np.asarray([float(v) for v in (plane_pos.ImagePositionPatient if plane_pos else [0, 0, 0])]),
                orientation=tuple(
                    float(v) for v in (plane_ori.ImageOrientationPatient if plane_ori else [1, 0, 0, 0, 1, 0])
                ),
                spacing=tuple(
                    float(v)
                    for v in (
                        measures.PixelSpacing if measures is not None and "PixelSpacing" in measures else [1.0, 1.0]
                    )
                ),
                thickness=_float(measures, "SliceThickness") or 0.0,
                order=order,
                flip=_float(timing, "FlipAngle"),
                tr=_float(timing, "RepetitionTime"),
                te=_float(echo, "EffectiveEchoTime"),
                sop_uid=str(ds.SOPInstanceUID),
            )
        )
    return frames


def _study_info(ds: Dataset) -> StudyInfo:
    def s(keyword: str) -> str:
        v = ds.get(keyword)
        return "" if v is None else str(v)

    info = StudyInfo(
        patient_id=s("PatientID"),
        patient_name=s("PatientName"),
        patient_birth_date=s("PatientBirthDate"),
        patient_sex=s("PatientSex"),
        study_instance_uid=s("StudyInstanceUID"),
        study_id=s("StudyID"),
        study_date=s("StudyDate"),
        study_time=s("StudyTime"),
        accession_number=s("AccessionNumber"),
        study_description=s("StudyDescription"),
        referring_physician=s("ReferringPhysicianName"),
        series_instance_uid=s("SeriesInstanceUID"),
        series_number=int(ds.get("SeriesNumber") or 1),
        series_description=s("SeriesDescription"),
        protocol_name=s("ProtocolName"),
        frame_of_reference_uid=s("FrameOfReferenceUID"),
        institution_name=s("InstitutionName"),
        station_name=s("StationName"),
        manufacturer=s("Manufacturer") or "unknown",
    )
    b0 = _float(ds, "MagneticFieldStrength")
    if b0:
        info.field_strength_T = b0
    return info


def _image_component(ds: Dataset) -> str:
    image_type = list(ds.get("ImageType") or [])
    if str(ds.SOPClassUID) == _ENHANCED_MR:
        return str(ds.get("ComplexImageComponent", "MAGNITUDE")).upper()
    return str(image_type[2]).upper() if len(image_type) > 2 else "M"


def _per_frame(values: list[float | None]) -> np.ndarray | None:
    if not values or any(v is None for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _inversion_time(ds: Dataset) -> float | None:
    """InversionTime (single-frame) or the MR Modifier InversionTimes of an Enhanced MR object, in ms."""
    ti = _float(ds, "InversionTime")
    if ti is not None:
        return ti
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in (ds.get(group) or [])[:1]:
            for mod in item.get("MRModifierSequence") or []:
                times = mod.get("InversionTimes")
                if times:
                    return float(times[0] if isinstance(times, (list, tuple)) or hasattr(times, "__len__") else times)
    return None


def _ranges(ids: list[int]) -> str:
    """1,2,3,7,8 -> '1-3, 7-8' (missing temporal positions, shortened)."""
    out: list[str] = []
    for i in sorted(ids):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = out[-1].split("-")[0] + f"-{i}"
        else:
            out.append(str(i))
    text = ", ".join(out)
    return text if len(text) <= 80 else text[:77] + "..."


def check_complete(root: Path, frames: list[_Frame], per_slice: list[list[_Frame]]) -> None:
    """IncompleteSeriesError when the series has fewer frames / images than its instances declare."""
    hint = (
        "the sender may have been cut off or may still be sending: resend the whole series, or set "
        "allow_partial: true on the route to map what arrived"
    )
    n_frames = len(per_slice[0])
    declared = sorted({f.expected_frames for f in frames if f.expected_frames})
    if len(declared) > 1:
        raise IncompleteSeriesError(
            f"{root}: the instances disagree on NumberOfTemporalPositions ({', '.join(map(str, declared))}); {hint}"
        )
    if declared:
        want = declared[0]
        for s in per_slice:
            have = {f.temporal_id for f in s if f.temporal_id is not None}
            missing = sorted(set(range(1, want + 1)) - have) if have else []
            if len(s) < want or missing:
                raise IncompleteSeriesError(
                    f"{root}: incomplete series: {len(s)} of {want} frames (NumberOfTemporalPositions {want})"
                    + (f"; missing temporal positions {_ranges(missing)}" if missing else "")
                    + f"; {hint}"
                )
    images = sorted({f.expected_images for f in frames if f.expected_images})
    if images and len(frames) < images[-1]:
        raise IncompleteSeriesError(
            f"{root}: incomplete series: {len(frames)} of {images[-1]} images "
            f"({len(per_slice)} slice(s) x {n_frames} frames; ImagesInAcquisition "
            f"{images[-1]}); {hint}"
        )


def image_study_from_dicom(
    path: str | Path, *, allow_partial: bool = False, logger: logging.Logger | None = None
) -> ImageStudy:
    """Read the single image series under ``path`` (folder, recursive, or one file). See the module docstring.

    ``allow_partial``: read a series with fewer frames than it declares (a warning to ``logger``, e.g. the job's
    log, default this module's) instead of refusing it."""
    root = Path(path)
    datasets: list[tuple[Path, Dataset]] = []
    for p in _files(root):
        ds = _read(p)
        if "PixelData" not in ds:
            log.warning("%s: DICOM object without pixel data (SOP class %s) skipped", p, ds.get("SOPClassUID", "?"))
            continue
        datasets.append((p, ds))
    if not datasets:
        raise ValueError(f"{root}: no DICOM images found")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets})
    if len(series) > 1:
        raise ValueError(f"{root}: expected one series, found {len(series)} SeriesInstanceUIDs: {', '.join(series)}")
    sop_classes = sorted({str(ds.SOPClassUID) for _, ds in datasets})
    if len(sop_classes) > 1:
        raise ValueError(f"{root}: the series mixes SOP classes {', '.join(sop_classes)}")

    frames: list[_Frame] = []
    for p, ds in datasets:
        multi = str(ds.SOPClassUID) == _ENHANCED_MR or int(ds.get("NumberOfFrames", 1) or 1) > 1
        frames.extend(_enhanced_frames(ds, p) if multi else _single_frames(ds, p))

    first = frames[0]
    shapes = {f.pixels.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"{root}: images of different sizes in one series: {sorted(shapes)}")
    if len(first.orientation) != 6:
        raise ValueError(f"{root}: ImageOrientationPatient has {len(first.orientation)} values, not 6")
    orientation = np.asarray(first.orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    # Slices: distinct positions along the normal (rounded to 1 um so float noise does not split a slice).
    locations = np.array([round(float(np.dot(f.position, normal)), 3) for f in frames])
    slice_locs = np.unique(locations)
    per_slice = [
        sorted((f for f, loc in zip(frames, locations, strict=True) if loc == sl), key=lambda f: f.order)
        for sl in slice_locs
    ]
    counts = {len(s) for s in per_slice}
    if len(counts) != 1:
        raise ValueError(
            f"{root}: slices have different numbers of frames ({', '.join(str(len(s)) for s in per_slice)})"
        )
    n_frames = counts.pop()
    try:
        if root.is_dir():  # one file named on its own is read as it is: whoever named it chose a subset
            check_complete(root, frames, per_slice)
    except IncompleteSeriesError as e:
        if not allow_partial:
            raise
        (logger or log).warning("%s (allow_partial is set: reading the %d frame(s) that arrived)", e, n_frames)
    pixels = np.stack([np.stack([s[t].pixels for s in per_slice]) for t in range(n_frames)]).astype(np.float32)

    ref = per_slice[0]
    geometry = Geometry(
        matrix=(int(first.pixels.shape[0]), int(first.pixels.shape[1])),
        pixel_spacing_mm=(float(first.spacing[0]), float(first.spacing[1])),
        slice_thickness_mm=float(first.thickness),
        orientation=first.orientation,
        positions=np.stack([s[0].position for s in per_slice]),
        frame_of_reference_uid=str(datasets[0][1].get("FrameOfReferenceUID", "")) or None,
    )
    sop_uids = list(dict.fromkeys(f.sop_uid for s in per_slice for f in s))
    return ImageStudy(
        pixels=pixels,
        geometry=geometry,
        study=_study_info(datasets[0][1]),
        flip_angles_deg=_per_frame([f.flip for f in ref]),
        tr_ms=_per_frame([f.tr for f in ref]),
        te_ms=_per_frame([f.te for f in ref]),
        ti_ms=_inversion_time(datasets[0][1]),
        # ImageType value 3 says which component a scanner stored (M, P, R, I; MAGNITUDE, PHASE ... in Enhanced).
        is_magnitude=_image_component(datasets[0][1]) not in ("P", "PHASE", "R", "REAL", "I", "IMAGINARY"),
        sop_instance_uids=sop_uids,
        sop_class_uid=sop_classes[0],
        source_path=str(root),
    )
