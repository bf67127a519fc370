"""The simulated scanner's output: everything a writer needs to produce MRD, HDF5 or DICOM test data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipelines.physics.sequences import MRFSequence
from pipelines.types import Geometry, StudyInfo


@dataclass
class SimulatedStudy:
    """One simulated MRF acquisition of one 2D slice.

    k-space convention: centred, orthonormal DFT of the coil images, so that image-domain noise std equals
    k-space noise std. Non-Cartesian coordinates are in ISMRMRD units: cycles per FOV, in [-N/2, N/2).
    ``kspace[f, r]`` is readout ``r`` of frame ``f``; ``lines[f, r]`` its Cartesian phase-encode row (ky index
    into the [y] axis of the images) or its spoke / interleaf number.

    A slice of a multi-slice study (see :class:`MultiSliceStudy`) carries the geometry of the whole stack
    (``geometry.positions`` [slices, 3]) and its own index into it, ``slice_index`` (its acquisitions'
    ``idx.slice``); a single-slice study has one position and index 0.
    """

    sequence: MRFSequence
    trajectory_kind: str  # cartesian | radial | spiral
    kspace: np.ndarray  # complex64 [frames, readouts, coils, samples]
    trajectory: np.ndarray | None  # float32 [frames, readouts, samples, 2] as (kx, ky); None for Cartesian
    lines: np.ndarray  # int32 [frames, readouts]
    coil_maps: np.ndarray  # complex64 [coils, y, x]
    fingerprints: np.ndarray  # complex64 [frames, y, x]: noiseless object images (PD included), no coils
    noise_std: float
    snr: float
    acceleration: float
    geometry: Geometry
    study: StudyInfo
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # t1_ms, t2_ms, ff_percent, pd, b1, df_hz, labels ...
    label_names: dict[int, str] = field(default_factory=dict)
    phantom_name: str = ""
    field_strength_T: float = 3.0
    seed: int = 0
    slice_index: int = 0

    @property
    def n_slices(self) -> int:
        """Slices of the study this slice belongs to (1 for a single-slice study)."""
        return self.geometry.n_slices

    @property
    def position(self) -> np.ndarray:
        """ImagePositionPatient of this slice (LPS mm)."""
        return np.asarray(self.geometry.positions[self.slice_index], dtype=np.float64)

    @property
    def n_frames(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[2])

    @property
    def matrix(self) -> tuple[int, int]:
        return self.geometry.matrix


@dataclass
class MultiSliceStudy:
    """A simulated multi-slice MRF study: what all slices share, per-slice truth, and the slices on demand.

    The k-space and fingerprint images of a slice are made only when :meth:`slice` / :meth:`slices` asks for
    it (the simulation is deterministic, so asking twice gives the same data), so a 10-slice 256^2 study never
    holds more than one slice's fingerprint images (0.5 GB at 1000 frames) and k-space at a time. Slice ``s`` is
    a :class:`SimulatedStudy` with ``slice_index = s`` and this study's ``geometry`` (one position per slice).

    ``truth`` maps are [slices, y, x] and ``coil_maps`` [slices, coils, y, x]. One ``noise_std`` for all slices,
    as on a scanner (receiver noise does not depend on the anatomy): set by ``snr`` from the mean object signal
    of the reference slice ``reference_slice`` (the middle one). ``frame_peak`` is the largest fingerprint
    magnitude of that slice, a series-wide scale for DICOM fingerprint frames written one slice at a time.
    """

    sequence: MRFSequence
    trajectory_kind: str
    geometry: Geometry
    study: StudyInfo
    truth: dict[str, np.ndarray]
    coil_maps: np.ndarray  # complex64 [slices, coils, y, x]
    noise_std: float
    snr: float
    acceleration: float
    label_names: dict[int, str]
    phantom_name: str
    field_strength_T: float
    seed: int
    reference_slice: int
    frame_peak: float
    lines: np.ndarray  # int32 [frames, readouts]: the same sampling in every slice
    trajectory: np.ndarray | None  # float32 [frames, readouts, samples, 2]; None for Cartesian
    make_slice: Callable[[int], SimulatedStudy] = field(repr=False)

    @property
    def n_readouts(self) -> int:
        return int(self.lines.shape[1])

    @property
    def n_samples(self) -> int:
        return int(self.geometry.matrix[1] if self.trajectory is None else self.trajectory.shape[2])

    @property
    def n_slices(self) -> int:
        return self.geometry.n_slices

    @property
    def n_frames(self) -> int:
        return int(self.sequence.n_frames)

    @property
    def n_coils(self) -> int:
        return int(self.coil_maps.shape[1])

    @property
    def matrix(self) -> tuple[int, int]:
        return self.geometry.matrix

    def slice(self, index: int) -> SimulatedStudy:
        """Simulate slice ``index`` (EPG fingerprints, coil k-space, noise): the same data on every call."""
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} out of range: the study has {self.n_slices} slices")
        return self.make_slice(index)

    def slices(self) -> Iterator[SimulatedStudy]:
        """Every slice in order, one at a time (drop each before taking the next to bound memory)."""
        for s in range(self.n_slices):
            yield self.make_slice(s)
