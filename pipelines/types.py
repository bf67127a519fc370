"""Data that travels between the readers, the pipelines and the writers.

Arrays are NumPy here (the pipelines convert to torch internally), so these objects pickle, save and
print without a device attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipelines.io.disk_rows import DiskRows


@dataclass
class Geometry:
    """Patient-space geometry of a stack of 2D slices (DICOM conventions, millimetres, LPS).

    ``positions`` holds ImagePositionPatient (centre of the first transmitted pixel) per slice.
    """

    matrix: tuple[int, int]  # (rows, columns) = (y, x)
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing)
    slice_thickness_mm: float
    orientation: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    positions: np.ndarray = field(default_factory=lambda: np.zeros((1, 3)))  # [slices, 3]
    frame_of_reference_uid: str | None = None

    @property
    def n_slices(self) -> int:
        return int(self.positions.shape[0])

    @property
    def fov_mm(self) -> tuple[float, float]:
        return (self.matrix[0] * self.pixel_spacing_mm[0], self.matrix[1] * self.pixel_spacing_mm[1])

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit normal of the slices: row direction x column direction (DICOM's SliceLocation axis)."""
        o = np.asarray(self.orientation, dtype=np.float64)
        return np.cross(o[:3], o[3:])

    @property
    def slice_locations_mm(self) -> np.ndarray:
        """Position of every slice along :attr:`slice_normal` (mm), in slice order."""
        return np.asarray(self.positions, dtype=np.float64).reshape(-1, 3) @ self.slice_normal

    @classmethod
    def centred(
        cls,
        matrix: tuple[int, int],
        fov_mm: tuple[float, float],
        slice_thickness_mm: float = 5.0,
        n_slices: int = 1,
        slice_gap_mm: float = 0.0,
    ) -> Geometry:
        """Axial slices centred at the isocentre: one, or a stack of ``n_slices`` parallel slices.

        Slices are ``slice_thickness_mm + slice_gap_mm`` apart (centre to centre) along the normal (+z, superior
        for an axial slice in LPS), in increasing z: slice 0 is the most inferior, and the stack's middle sits at
        the isocentre (for an even count, halfway between the two middle slices).
        """
        if n_slices < 1:
            raise ValueError(f"n_slices must be >= 1, got {n_slices}")
        spacing = (fov_mm[0] / matrix[0], fov_mm[1] / matrix[1])
        # DICOM position is the centre of the first pixel. The isocentre is the encoding centre, pixel N//2 of the
        # centred FFT (for even N half a pixel past the middle of the FOV), so the first pixel is N//2 pixels away.
        first = np.array([-(matrix[1] // 2) * spacing[1], -(matrix[0] // 2) * spacing[0], 0.0], dtype=np.float64)
        positions = first[None, :]
        if n_slices > 1:
            step = float(slice_thickness_mm) + float(slice_gap_mm)
            z = (np.arange(n_slices, dtype=np.float64) - (n_slices - 1) / 2.0) * step
            positions = np.repeat(positions, n_slices, axis=0)
            positions[:, 2] = z
        return cls(matrix=matrix, pixel_spacing_mm=spacing, slice_thickness_mm=slice_thickness_mm, positions=positions)


@dataclass
class StudyInfo:
    """Patient and study identifiers carried from the input to every output series."""

    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""  # YYYYMMDD
    patient_sex: str = ""  # M, F, O or ""
    study_instance_uid: str = ""
    study_id: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS
    accession_number: str = ""
    study_description: str = ""
    referring_physician: str = ""
    series_instance_uid: str = ""  # of the source series, when the input is DICOM
    series_number: int = 1
    series_description: str = ""
    protocol_name: str = ""
    frame_of_reference_uid: str = ""
    field_strength_T: float = 3.0
    institution_name: str = ""
    station_name: str = ""
    manufacturer: str = "recon-node"


@dataclass
class QuantitativeMap:
    """One parametric map in its real unit, ready for a DICOM series.

    ``kind`` names the output template and ``unit`` is UCUM; both as in the catalogue of
    :mod:`pipelines.map_kinds` (build maps with :func:`pipelines.map_kinds.quantitative_map`).
    """

    kind: str
    data: np.ndarray  # float32 [slices, y, x]
    unit: str
    description: str
    geometry: Geometry
    mask: np.ndarray | None = None  # bool [slices, y, x]: True where the value was estimated
    notes: list[str] = field(default_factory=list)
    # What a reader of the map must know to trust it (unreliable input, under-trained weights): written into every
    # DICOM instance's ImageComments, where a viewer shows it, besides the notes.
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32)
        if self.data.ndim == 2:
            self.data = self.data[None]
        if self.data.ndim != 3:
            raise ValueError(f"map {self.kind!r} must be [slices, y, x], got shape {self.data.shape}")


@dataclass
class ReconImage:
    """A reconstructed image series (e.g. fingerprint frames or a Cartesian recon)."""

    kind: str
    data: np.ndarray  # complex64 or float32 [frames or slices, y, x]
    description: str
    geometry: Geometry
    notes: list[str] = field(default_factory=list)


PipelineOutput = QuantitativeMap | ReconImage


@dataclass
class RawStudy:
    """Raw MR data as a pipeline sees it: ISMRMRD header plus readouts as arrays.

    One row per ISMRMRD acquisition (readout). ``frame`` is the MRF time point (stored in ``idx.repetition``),
    ``line`` the Cartesian phase-encode line or the non-Cartesian spoke / interleaf (``idx.kspace_encode_step_1``).
    """

    header_xml: str
    # complex64 [acquisitions, coils, samples]; a large study read with a spill folder keeps them on disk (DiskRows:
    # index it by rows, e.g. one slice's, rather than use it whole)
    data: np.ndarray | DiskRows
    trajectory: np.ndarray | None  # float32 [acquisitions, samples, dims] in ISMRMRD units (cycles/FOV * matrix)
    line: np.ndarray  # int [acquisitions]
    frame: np.ndarray  # int [acquisitions]
    slice: np.ndarray  # int [acquisitions]
    flags: np.ndarray  # uint64 [acquisitions]
    matrix: tuple[int, int]  # encoded (y, x)
    fov_mm: tuple[float, float]  # encoded (y, x)
    trajectory_kind: str  # ISMRMRD trajectoryType: cartesian, radial, spiral, other
    study: StudyInfo
    geometry: Geometry
    sequence: Any | None = None  # pipelines.physics.sequences.MRFSequence when the header carries it
    source_path: str = ""
    # A measured B1+ map of the same study (relative, in its own geometry): the node attaches the ``b1_map`` job's
    # output of the study's B1 series; pipelines resample it (pipelines.mapping.b1_measured).
    b1_measured: QuantitativeMap | None = None


@dataclass
class ImageStudy:
    """An image series (e.g. DICOM fingerprint frames) as a pipeline sees it."""

    pixels: np.ndarray  # float32 [frames, slices, y, x] (magnitude unless phase was supplied)
    geometry: Geometry
    study: StudyInfo
    flip_angles_deg: np.ndarray | None = None  # per frame, when the instances carry them
    tr_ms: np.ndarray | None = None
    te_ms: np.ndarray | None = None
    ti_ms: float | None = None  # inversion time of the preparation, when the instances carry one
    is_magnitude: bool = True
    sop_instance_uids: list[str] = field(default_factory=list)  # sources, for references in outputs
    sop_class_uid: str = ""
    source_path: str = ""
