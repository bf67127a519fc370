"""Write MRF frames of a :class:`SimulatedStudy` as a DICOM MR Image Storage series (one instance per frame).

This is the "image input" a scanner would push over C-STORE when it reconstructs the fingerprint frames itself.

Choices:

* **Pixels.** Magnitude of ``images`` (default ``study.fingerprints``), uint16, with one scale for the whole series:
  ``stored = round(|image| * 4000 / max|images|)``. A series-wide scale keeps the frames comparable to each other,
  which is all fingerprint matching needs (it normalises each voxel's time course). No RescaleSlope/Intercept:
  the MR Image IOD does not include the Modality LUT module, so stored values *are* the pixel values; the scale
  factor is written in ImageComments for humans. BitsStored 16, so any ``images`` fit.
* **Timing.** Per frame: FlipAngle, RepetitionTime, EchoTime from the schedule; InversionTime is the preparation
  TI (the same on every frame: the time from inversion to a frame is TI + the TRs before it, which a reader
  recovers from the TRs). AcquisitionTime/ContentTime advance with the schedule from the study time.
* **Order.** InstanceNumber = TemporalPositionIdentifier = AcquisitionNumber = frame + 1;
  NumberOfTemporalPositions = number of frames.
* **UIDs.** Deterministic, so rerunning a simulation gives the same instances: ``2.25.<uuid5>`` derived from the
  study UID, series number and seed. The SeriesInstanceUID is ``study.study.series_instance_uid`` when set and the
  default images (the fingerprints) are written; any other ``images`` get a derived series UID, so two different
  image sets never share a series.
* **Slices.** A slice of a multi-slice study (``study.slice_index``, ``study.geometry.positions`` [slices, 3]) gets
  its own ImagePositionPatient and SliceLocation (position along the normal row x column), the stack's
  ImageOrientationPatient, and goes into the same series as the other slices: InstanceNumber = slice x frames +
  frame + 1, TemporalPositionIdentifier = frame + 1, files ``slice_001_frame_0001.dcm`` ..., acquisition times
  one whole schedule later per slice. One scale for the whole series then means one ``scale`` passed for every
  slice: :func:`write_dicom_frames` of a :class:`MultiSliceStudy` uses the reference slice's peak
  (``frame_peak``), so other slices may store values a little above 4000 (BitsStored is 16: nothing clips).
  A single-slice study is written exactly as before (``frame_0001.dcm`` ..., its own peak).
* Explicit VR Little Endian, file meta with our implementation class UID, character set ISO_IR 192 (UTF-8) so
  non-ASCII patient names survive.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from pipelines.io.dicom_uids import deterministic_uid
from pipelines.sim.mr_image import ds_number, mr_image_dataset
from pipelines.sim.study import MultiSliceStudy, SimulatedStudy

# Largest stored value: leaves headroom below 4095 so a 12-bit display pipeline never clips.
MAX_STORED_VALUE = 4000


def _frame_times(study: SimulatedStudy, n_frames: int) -> tuple[list[str], str]:
    """Acquisition time of each frame (TM) and the study date, '' where the study has no date/time."""
    d, t = study.study.study_date, study.study.study_time.split(".")[0]
    if not (len(d) == 8 and d.isdigit() and len(t) == 6 and t.isdigit()):
        return [""] * n_frames, d
    start = datetime.strptime(d + t, "%Y%m%d%H%M%S")
    seq = study.sequence
    offsets = (seq.ti_ms or 0.0) + np.concatenate([[0.0], np.cumsum(seq.tr_ms)[: n_frames - 1]])
    if study.slice_index:  # sequential slices: each earlier one took a whole schedule (as in the MRD writer)
        offsets = offsets + study.slice_index * ((seq.ti_ms or 0.0) + float(np.sum(seq.tr_ms)))
    times = [(start + timedelta(milliseconds=float(ms))).strftime("%H%M%S.%f") for ms in offsets]
    return times, d


def write_dicom_frames(
    study: SimulatedStudy | MultiSliceStudy,
    out_dir: str | Path,
    images: np.ndarray | None = None,
    series_number: int = 100,
    scale: float | None = None,
) -> list[Path]:
    """Write one MR Image Storage instance per frame of ``images`` ([frames, y, x], default the fingerprints).

    Returns the written paths (``out_dir/frame_0001.dcm`` ... for a single slice, ``slice_001_frame_0001.dcm``
    ... for a slice of a multi-slice study), in frame order. ``scale``: stored value per unit of |image| (default
    ``MAX_STORED_VALUE / max|images|``). A :class:`MultiSliceStudy` writes every slice into one series, simulating
    one slice at a time, with one scale from ``study.frame_peak``.
    """
    if isinstance(study, MultiSliceStudy):
        if images is not None:
            raise ValueError("images= is for one slice; write a multi-slice study's slices one at a time")
        if scale is None:
            scale = MAX_STORED_VALUE / study.frame_peak if study.frame_peak > 0 else 1.0
        paths: list[Path] = []
        for s in range(study.n_slices):
            paths += write_dicom_frames(study.slice(s), out_dir, series_number=series_number, scale=scale)
        return paths
    default_images = images is None
    imgs = np.abs(np.asarray(study.fingerprints if images is None else images))
    if imgs.ndim == 4 and imgs.shape[1] == 1:
        imgs = imgs[:, 0]
    if imgs.ndim != 3:
        raise ValueError(f"images must be [frames, y, x], got shape {imgs.shape}")
    n_frames, rows, cols = imgs.shape
    g = study.geometry
    if (rows, cols) != tuple(g.matrix):
        raise ValueError(f"images are {rows}x{cols} but the study geometry is {g.matrix[0]}x{g.matrix[1]}")
    seq = study.sequence
    if seq.n_frames != n_frames:
        raise ValueError(f"{n_frames} image frames but the sequence {seq.name!r} has {seq.n_frames}")
    if not np.all(np.isfinite(imgs)):
        raise ValueError("images contain NaN or infinite values")

    if scale is None:
        peak = float(imgs.max())
        scale = MAX_STORED_VALUE / peak if peak > 0 else 1.0
    elif not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    stored = np.clip(np.rint(imgs * scale), 0, 65535).astype(np.uint16)

    info = study.study
    study_uid = info.study_instance_uid or deterministic_uid("study", info.patient_id, study.seed)
    key = (study_uid, series_number, study.seed)
    if default_images and info.series_instance_uid:
        series_uid = info.series_instance_uid
    else:
        series_uid = deterministic_uid("series", *key)
    frame_of_ref = info.frame_of_reference_uid or g.frame_of_reference_uid or deterministic_uid("for", study_uid)
    times, date = _frame_times(study, n_frames)
    b0 = float(study.field_strength_T)
    s_idx, n_slices = study.slice_index, g.n_slices
    if not 0 <= s_idx < n_slices:
        raise ValueError(f"slice_index {s_idx} is outside the geometry's {n_slices} slice positions")
    inversion = seq.ti_ms is not None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    multi = n_slices > 1
    for f in range(n_frames):
        # Single slice: the UIDs and names of before; a stack: the slice is part of both.
        sop_uid = deterministic_uid("instance", *key, s_idx, f) if multi else deterministic_uid("instance", *key, f)
        ds = mr_image_dataset(
            stored[f],
            sop_uid=sop_uid,
            info=info,
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            description=info.series_description or f"MRF {seq.name} frames",
            frame_of_reference_uid=frame_of_ref,
            geometry=g,
            slice_index=s_idx,
            instance_number=s_idx * n_frames + f + 1,
        )
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = times[0].split(".")[0] if times[0] else ""
        ds.SeriesDate = info.study_date
        ds.SeriesTime = info.study_time
        if info.protocol_name:
            ds.ProtocolName = info.protocol_name
        ds.ManufacturerModelName = "MRF simulator"
        if info.institution_name:
            ds.InstitutionName = info.institution_name
        if info.station_name:
            ds.StationName = info.station_name
        ds.SoftwareVersions = "recon-node"
        # General image
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.AcquisitionNumber = f + 1
        ds.AcquisitionDate = date
        ds.AcquisitionTime = times[f]
        ds.ContentDate = date
        ds.ContentTime = times[f]
        ds.ImageComments = (
            f"MRF slice {s_idx + 1}/{n_slices} " if multi else "MRF "
        ) + f"frame {f + 1}/{n_frames}; pixel = |signal| x {scale:.6g} (one scale for the whole series)"
        # MR image
        ds.ScanningSequence = ["GR", "IR"] if inversion else "GR"
        ds.SequenceVariant = "SS"  # FISP: unbalanced steady-state free precession
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = f"mrf_{seq.readout}"
        ds.RepetitionTime = ds_number(seq.tr_ms[f])
        ds.EchoTime = ds_number(seq.te_ms[f])
        if seq.ti_ms is not None:
            ds.InversionTime = ds_number(seq.ti_ms)
        ds.EchoTrainLength = 1
        ds.FlipAngle = ds_number(seq.flip_angles_deg[f])
        ds.VariableFlipAngleFlag = "Y"
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = ds_number(42.577478 * b0)
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = ds_number(b0)
        ds.EchoNumbers = "1"
        ds.AcquisitionMatrix = [0, cols, rows, 0]
        ds.InPlanePhaseEncodingDirection = "COL"
        ds.TemporalPositionIdentifier = f + 1
        ds.NumberOfTemporalPositions = n_frames
        # VOI LUT: the full stored range
        ds.WindowCenter = ds_number(MAX_STORED_VALUE / 2)
        ds.WindowWidth = ds_number(MAX_STORED_VALUE)

        path = out / (f"slice_{s_idx + 1:03d}_frame_{f + 1:04d}.dcm" if multi else f"frame_{f + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
