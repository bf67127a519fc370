"""The MR Image Storage dataset the simulators write: one 16-bit image of one slice with its patient, study, series,
frame of reference and image plane. What differs between the simulated series (MRF frames, a B1 map) -- image type,
comments, the MR acquisition attributes -- is set by their writers on what this returns."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pydicom.valuerep import format_number_as_ds

from pipelines.io.dicom_modules import new_instance, set_patient_and_study
from pipelines.types import Geometry, StudyInfo


def ds_number(value: float) -> str:
    """A DS value: at most 16 characters, keeping the most digits that fit."""
    return format_number_as_ds(float(value))


def mr_image_dataset(
    pixels: np.ndarray,
    *,
    sop_uid: str,
    info: StudyInfo,
    study_uid: str,
    series_uid: str,
    series_number: int,
    description: str,
    frame_of_reference_uid: str,
    geometry: Geometry,
    slice_index: int,
    instance_number: int,
) -> Dataset:
    """An MR image (uint16 ``pixels`` [rows, cols]) of slice ``slice_index`` of ``geometry``, ready to save."""
    ds = new_instance(MRImageStorage, sop_uid, "RECON_NODE_SIM")
    set_patient_and_study(ds, info, study_uid)
    # General series
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.PatientPosition = "HFS"
    # Type 2C (paired body parts); the simulator does not say which part it imaged, so: present and empty.
    ds.Laterality = ""
    # Frame of reference, equipment
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = info.manufacturer or "recon-node"
    ds.InstanceNumber = instance_number
    # Image plane
    o = np.asarray(geometry.orientation, dtype=np.float64)
    position = np.asarray(geometry.positions[slice_index], dtype=np.float64)
    ds.PixelSpacing = [ds_number(v) for v in geometry.pixel_spacing_mm]
    ds.ImageOrientationPatient = [ds_number(v) for v in o]
    ds.ImagePositionPatient = [ds_number(v) for v in position]
    ds.SliceThickness = ds_number(geometry.slice_thickness_mm)
    ds.SliceLocation = ds_number(float(np.dot(position, np.cross(o[:3], o[3:]))))
    # Image pixel
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint16 or pixels.shape != tuple(geometry.matrix):
        raise ValueError(f"pixels must be uint16 {tuple(geometry.matrix)}, got {pixels.dtype} {pixels.shape}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
