"""A measured B1+ map series as a scanner sends one, for tests and benchmarks of the measured-B1 path.

:func:`simulate_b1_series` samples a study's true B1 the way a separate low-resolution B1 scan sees it (a
saturation-prepared turbo-FLASH such as Siemens' tfl_b1map: ~4 mm voxels, thick slices, a few percent noise, nothing
in air); :func:`write_b1_series` stores it as an MR Image Storage series the way tfl_b1map does (uint16, ten times
the flip angle of a nominal 80 degrees, so 800 = nominal), which the node's ``b1_map`` pipeline reads back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.io.dicom_uids import deterministic_uid
from pipelines.mapping.b1_measured import voxel_centres
from pipelines.sim.mr_image import mr_image_dataset
from pipelines.types import Geometry, StudyInfo


def simulate_b1_series(
    truth_b1: np.ndarray,
    body: np.ndarray,
    target: Geometry,
    *,
    matrix: int = 64,
    fov_mm: float = 256.0,
    thickness_mm: float = 8.0,
    noise: float = 0.03,
    gain: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, Geometry]:
    """Relative B1 [slices, matrix, matrix] (NaN in air) and its geometry: one slice of ``thickness_mm`` at each of
    ``target``'s slices, same orientation and centre, ``fov_mm`` square. Each voxel is the mean of ``truth_b1``
    ([slices, y, x] on ``target``) over the target voxels whose centres it contains, times ``gain`` (a calibration
    error), with Gaussian noise of ``noise`` (relative); air where under half of those voxels are ``body``."""
    truth_b1 = np.asarray(truth_b1, dtype=np.float64).reshape(target.n_slices, *target.matrix)
    body = np.asarray(body, bool).reshape(truth_b1.shape)
    o = np.asarray(target.orientation, dtype=np.float64)
    row, col = o[:3], o[3:]
    step = fov_mm / matrix
    centres = voxel_centres(target)
    mid = centres[:, target.matrix[0] // 2, target.matrix[1] // 2]  # [slices, 3]
    first = mid - (matrix // 2) * step * (row + col)
    rng = np.random.default_rng(seed)
    out = np.full((target.n_slices, matrix, matrix), np.nan)
    for s in range(target.n_slices):
        d = centres[s].reshape(-1, 3) - first[s]
        i, j = np.rint(d @ col / step).astype(np.int64), np.rint(d @ row / step).astype(np.int64)
        ok = (i >= 0) & (i < matrix) & (j >= 0) & (j < matrix)
        idx = i[ok] * matrix + j[ok]
        count = np.bincount(idx, minlength=matrix * matrix)
        total = np.bincount(idx, truth_b1[s].reshape(-1)[ok], minlength=matrix * matrix)
        tissue = np.bincount(idx, body[s].reshape(-1)[ok].astype(np.float64), minlength=matrix * matrix)
        rel = gain * total / np.maximum(count, 1) * (1 + noise * rng.standard_normal(matrix * matrix))
        out[s] = np.where((count > 0) & (tissue > 0.5 * count), rel, np.nan).reshape(matrix, matrix)
    geometry = Geometry(
        (matrix, matrix),
        (step, step),
        thickness_mm,
        orientation=target.orientation,
        positions=first,
        frame_of_reference_uid=target.frame_of_reference_uid,
    )
    return out.astype(np.float32), geometry


def write_b1_series(
    b1: np.ndarray,
    geometry: Geometry,
    info: StudyInfo,
    out_dir: str | Path,
    *,
    nominal: float = 800.0,
    series_number: int = 40,
    description: str = "tfl_b1map",
) -> list[Path]:
    """One MR Image Storage instance per slice of ``b1`` (relative, NaN in air): stored ``round(nominal x b1)``,
    0 in air, no rescale (as tfl_b1map stores it); the study, patient and frame of reference of ``info``."""
    b1 = np.asarray(b1, dtype=np.float64).reshape(geometry.n_slices, *geometry.matrix)
    stored = np.clip(np.rint(np.nan_to_num(b1, nan=0.0) * nominal), 0, 65535).astype(np.uint16)
    study_uid = info.study_instance_uid or deterministic_uid("study", info.patient_id)
    series_uid = deterministic_uid("b1 series", study_uid, series_number)
    frame_of_ref = info.frame_of_reference_uid or geometry.frame_of_reference_uid or deterministic_uid("for", study_uid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(geometry.n_slices):
        sop_uid = deterministic_uid("b1 instance", series_uid, s)
        ds = mr_image_dataset(
            stored[s],
            sop_uid=sop_uid,
            info=info,
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            description=description,
            frame_of_reference_uid=frame_of_ref,
            geometry=geometry,
            slice_index=s,
            instance_number=s + 1,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "B1", "FLIP ANGLE MAP"]
        ds.ImageComments = f"relative B1 x {nominal:g} (nominal flip angle = {nominal:g})"
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTrainLength = 1
        ds.RepetitionTime = "5000"
        ds.EchoTime = "2.2"
        path = out / f"b1_{s + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
