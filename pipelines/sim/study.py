"""The simulated scanner's output: everything a writer needs to produce MRD, HDF5 or DICOM test data."""

from __future__ import annotations

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

    @property
    def n_frames(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[2])

    @property
    def matrix(self) -> tuple[int, int]:
        return self.geometry.matrix
