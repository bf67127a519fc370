"""Small hand-built SimulatedStudy objects for the MRD and DICOM I/O tests (no physics: random k-space).

Imported by test_mrd_io.py and test_dicom_frames.py; kept out of conftest.py, which the project lead owns.
"""

from __future__ import annotations

import numpy as np

from pipelines.physics.sequences import MRFSequence
from pipelines.sim.study import SimulatedStudy
from pipelines.types import Geometry, StudyInfo


def small_sequence(n_frames: int = 20) -> MRFSequence:
    t = np.arange(n_frames)
    fa = 10.0 + 50.0 * np.sin(np.pi * (t + 0.5) / n_frames)  # deg, no exact zeros
    tr = 11.0 + 4.0 * (t % 7) / 7.0 + 0.123456789  # ms, many digits to exercise DS formatting
    te = np.full(n_frames, 2.0)
    return MRFSequence(name="test20", flip_angles_deg=fa, tr_ms=tr, te_ms=te, ti_ms=40.0, readout="fisp",
                       description="test schedule")


def study_info(patient_name: str = "Doe^Jane") -> StudyInfo:
    return StudyInfo(
        patient_id="PAT-0042",
        patient_name=patient_name,
        patient_birth_date="19800517",
        patient_sex="F",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1001",
        study_id="S77",
        study_date="20240305",
        study_time="101530",
        accession_number="00123456",
        study_description="MRF brain",
        referring_physician="House^Gregory",
        series_number=7,
        series_description="MRF FISP frames",
        protocol_name="mrf_fisp_2d",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1002",
        field_strength_T=3.0,
        institution_name="Test Hospital",
        station_name="SIMSTATION",
    )


def make_study(
    kind: str = "cartesian",
    n_frames: int = 20,
    n_readouts: int = 2,
    n_coils: int = 4,
    n_samples: int = 64,
    matrix: int = 32,
    seed: int = 0,
    patient_name: str = "Doe^Jane",
) -> SimulatedStudy:
    """Random complex data with the shapes and conventions of a real simulated MRF study."""
    rng = np.random.default_rng(seed)
    if kind == "cartesian":
        n_samples = matrix  # no readout oversampling: samples = x matrix
    shape = (n_frames, n_readouts, n_coils, n_samples)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    if kind == "cartesian":
        lines = rng.integers(0, matrix, size=(n_frames, n_readouts)).astype(np.int32)
        traj = None
    else:
        lines = (np.arange(n_frames * n_readouts).reshape(n_frames, n_readouts) % 24).astype(np.int32)
        traj = rng.uniform(-matrix / 2, matrix / 2, size=(n_frames, n_readouts, n_samples, 2)).astype(np.float32)
    fp = (rng.standard_normal((n_frames, matrix, matrix))
          + 1j * rng.standard_normal((n_frames, matrix, matrix))).astype(np.complex64)
    geometry = Geometry.centred((matrix, matrix), (220.0, 220.0), slice_thickness_mm=5.0)
    geometry.positions = geometry.positions + np.array([[3.0, -12.5, 20.0]])  # off-centre, to test the maths
    info = study_info(patient_name)
    geometry.frame_of_reference_uid = info.frame_of_reference_uid
    coil_maps = np.ones((n_coils, matrix, matrix), dtype=np.complex64) / np.sqrt(n_coils)
    return SimulatedStudy(
        sequence=small_sequence(n_frames),
        trajectory_kind=kind,
        kspace=kspace,
        trajectory=traj,
        lines=lines,
        coil_maps=coil_maps,
        fingerprints=fp,
        noise_std=0.01,
        snr=50.0,
        acceleration=float(matrix) / n_readouts,
        geometry=geometry,
        study=info,
        phantom_name="random",
        field_strength_T=3.0,
        seed=seed,
    )
