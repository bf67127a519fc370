"""The scanner simulator: ground-truth maps -> EPG fingerprints -> coil images -> k-space per frame + noise.

SNR convention: ``snr`` = mean fingerprint magnitude inside the object (over all frames) divided by the
standard deviation of the complex noise per coil, with E|n|^2 = sigma^2 (sigma / sqrt(2) per real channel).
Because the k-space scaling is orthonormal, this is also the per-coil SNR of a fully sampled image.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.physics.epg import epg_chunked, epg_fat, epg_fisp
from pipelines.io.dicom_uids import deterministic_uid
from pipelines.physics.sequences import MRFSequence
from pipelines.recon.nufft import nufft_forward
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import Phantom, make_phantom
from pipelines.sim.study import SimulatedStudy
from pipelines.sim.trajectories import cartesian_frame_masks, mrf_radial_trajectory, mrf_spiral_trajectory
from pipelines.types import Geometry, StudyInfo

log = logging.getLogger(__name__)

TRAJECTORIES = ("cartesian", "radial", "spiral")
SPIRAL_INTERLEAVES = 24  # interleaves of the fully sampled variable-density spiral


@dataclass(frozen=True)
class AcquisitionSettings:
    trajectory: str = "cartesian"
    coils: int = 8
    snr: float = 30.0  # inf: no noise
    acceleration: float | None = None  # None: Cartesian fully sampled, non-Cartesian one readout per frame
    cartesian_mask: str = "equidistant"  # equidistant | random
    fov_mm: float = 240.0
    slice_thickness_mm: float = 5.0
    seed: int = 0


def fingerprint_images(
    phantom: Phantom,
    sequence: MRFSequence,
    *,
    device: str | torch.device = "cpu",
    chunk: int = 2048,
    progress: bool = False,
) -> np.ndarray:
    """Noiseless object images [frames, y, x] (complex64): PD * two-compartment EPG signal per voxel."""
    mask = phantom.mask
    idx = np.flatnonzero(mask)
    out = np.zeros((sequence.n_frames, mask.size), dtype=np.complex64)
    if idx.size == 0:
        return out.reshape(sequence.n_frames, *mask.shape)

    # Sorted by T2 so that each chunk keeps only the dephasing orders its own T2 needs (see default_n_states):
    # one CSF voxel would otherwise set the state count of a whole chunk of white matter.
    idx = idx[np.argsort(np.asarray(phantom.t2_water_ms).ravel()[idx], kind="stable")]

    def vox(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32).ravel()[idx], device=device)

    ff, b1, df = vox(phantom.ff), vox(phantom.b1), vox(phantom.df_hz)
    with torch.no_grad():
        water = _chunked_fisp(sequence, vox(phantom.t1_water_ms), vox(phantom.t2_water_ms), b1, df,
                              chunk, progress)
        sig = (1 - ff)[:, None].to(water.dtype) * water
        fatty = torch.nonzero(ff > 0).flatten()
        if fatty.numel():
            fat = _chunked_fat(sequence, vox(phantom.t1_fat_ms)[fatty], vox(phantom.t2_fat_ms)[fatty],
                               b1[fatty], df[fatty], phantom.field_strength_T, chunk, progress)
            sig[fatty] += ff[fatty, None].to(fat.dtype) * fat
        sig = sig * vox(phantom.pd)[:, None].to(sig.dtype)
    out[:, idx] = sig.T.cpu().numpy()
    return out.reshape(sequence.n_frames, *mask.shape)


def _chunked_fisp(seq, t1, t2, b1, df, chunk, progress):  # type: ignore[no-untyped-def]
    def fn(t1c, t2c, b1c, dfc):  # type: ignore[no-untyped-def]
        return epg_fisp(seq, t1c, t2c, b1c, dfc)

    return epg_chunked(fn, t1, t2, b1, df, chunk=chunk, progress=progress, desc="water EPG")


def _chunked_fat(seq, t1, t2, b1, df, field, chunk, progress):  # type: ignore[no-untyped-def]
    def fn(t1c, t2c, b1c, dfc):  # type: ignore[no-untyped-def]
        return epg_fat(seq, t1c, t2c, b1c, dfc, field_strength_T=field)

    # Six peaks per voxel: keep each call's working set the size of a water chunk.
    return epg_chunked(fn, t1, t2, b1, df, chunk=max(1, chunk // 6), progress=progress, desc="fat EPG")


def _study_info(phantom_name: str, sequence: MRFSequence, field_T: float, seed: int) -> StudyInfo:
    """Deterministic identifiers, so the same simulation gives the same study (idempotent tests)."""
    key = f"recon-node-sim/{phantom_name}/{sequence.name}/{sequence.fingerprint_key()}/{field_T}/{seed}"
    today = _dt.date.today()
    return StudyInfo(
        patient_id=f"SIM{seed:05d}",
        patient_name=f"SIMULATED^{phantom_name.upper()}",
        patient_birth_date="19800101",
        patient_sex="O",
        study_instance_uid=deterministic_uid(key, "study"),
        study_id=f"{seed % 100000}",
        study_date=today.strftime("%Y%m%d"),
        study_time="120000",
        accession_number=f"SIM{seed:07d}"[:16],
        study_description=f"MRF {phantom_name} (simulated)",
        referring_physician="SIMULATOR^RECON-NODE",
        series_instance_uid=deterministic_uid(key, "series"),
        series_number=1,
        series_description=f"MRF {sequence.name} {phantom_name}",
        protocol_name=f"MRF_{sequence.name.upper()}",
        frame_of_reference_uid=deterministic_uid(key, "frame-of-reference"),
        field_strength_T=field_T,
        institution_name="recon-node simulator",
        station_name="SIMSCANNER",
    )


def _readouts_per_frame(kind: str, matrix: int, acceleration: float | None) -> int:
    if kind == "radial":
        full = int(np.ceil(np.pi / 2 * matrix))  # Nyquist for full-diameter spokes
    else:
        full = SPIRAL_INTERLEAVES
    if acceleration is None:
        return 1
    return max(1, int(round(full / acceleration)))


def simulate_study(
    phantom: Phantom | str,
    sequence: MRFSequence,
    settings: AcquisitionSettings = AcquisitionSettings(),
    *,
    matrix: int = 128,
    field_strength_T: float = 3.0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SimulatedStudy:
    """Simulate one MRF slice end to end (see module docstring for the SNR convention)."""
    if settings.trajectory not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {settings.trajectory!r}: use one of {', '.join(TRAJECTORIES)}")
    if settings.coils < 1:
        raise ValueError("coils must be >= 1")
    if not settings.snr > 0:
        raise ValueError("snr must be positive (use inf for noiseless data)")
    if isinstance(phantom, str):
        phantom = make_phantom(phantom, matrix, field_strength_T=field_strength_T, seed=settings.seed)
    ny, nx = phantom.pd.shape
    rng = np.random.default_rng(settings.seed)
    fingerprints = fingerprint_images(phantom, sequence, device=device, progress=progress)
    maps = birdcage_maps(settings.coils, (ny, nx))
    frames = sequence.n_frames

    trajectory = None
    if settings.trajectory == "cartesian":
        r = 1.0 if settings.acceleration is None else float(settings.acceleration)
        lines = cartesian_frame_masks(frames, ny, r, kind=settings.cartesian_mask, seed=settings.seed)
        kspace = np.empty((frames, lines.shape[1], settings.coils, nx), dtype=np.complex64)
        for f in range(frames):
            coil_img = maps * fingerprints[f]
            k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
            kspace[f] = k[:, lines[f], :].transpose(1, 0, 2)
        acceleration = ny / lines.shape[1]
    else:
        per_frame = _readouts_per_frame(settings.trajectory, max(ny, nx), settings.acceleration)
        if settings.trajectory == "radial":
            trajectory = mrf_radial_trajectory(frames, per_frame, 2 * max(ny, nx), max(ny, nx))
            full = np.ceil(np.pi / 2 * max(ny, nx))
        else:
            # Frame f carries interleaves f*per_frame ... : consecutive MRF frames rotate through the spiral.
            arms = mrf_spiral_trajectory(frames * per_frame, max(ny, nx), n_interleaves=SPIRAL_INTERLEAVES)
            trajectory = arms.reshape(frames, per_frame, arms.shape[-2], 2)
            full = SPIRAL_INTERLEAVES
        trajectory = trajectory.astype(np.float32)
        n_samp = trajectory.shape[2]
        kspace = np.empty((frames, per_frame, settings.coils, n_samp), dtype=np.complex64)
        for f in range(frames):
            y = nufft_forward(maps * fingerprints[f], trajectory[f].reshape(-1, 2))  # [coils, per_frame*n_samp]
            kspace[f] = y.reshape(settings.coils, per_frame, n_samp).transpose(1, 0, 2)
        lines = np.arange(frames * per_frame, dtype=np.int32).reshape(frames, per_frame)
        acceleration = float(full / per_frame)

    obj = np.abs(fingerprints)[:, phantom.mask]
    signal = float(obj.mean()) if obj.size else 1.0
    noise_std = 0.0 if np.isinf(settings.snr) else signal / settings.snr
    if noise_std > 0:
        per_channel = np.float32(noise_std / np.sqrt(2))
        # In place, channel by channel: no complex128 temporaries the size of the k-space.
        kspace.real += per_channel * rng.standard_normal(kspace.shape, dtype=np.float32)
        kspace.imag += per_channel * rng.standard_normal(kspace.shape, dtype=np.float32)

    geometry = Geometry.centred((ny, nx), (settings.fov_mm * ny / max(ny, nx), settings.fov_mm * nx / max(ny, nx)),
                                settings.slice_thickness_mm)
    study = _study_info(phantom.name, sequence, phantom.field_strength_T, settings.seed)
    geometry.frame_of_reference_uid = study.frame_of_reference_uid
    truth = phantom.truth()
    truth["mask"] = phantom.mask.astype(np.uint8)
    return SimulatedStudy(
        sequence=sequence,
        trajectory_kind=settings.trajectory,
        kspace=kspace,
        trajectory=trajectory,
        lines=np.asarray(lines, dtype=np.int32),
        coil_maps=maps.astype(np.complex64),
        fingerprints=fingerprints,
        noise_std=float(noise_std),
        snr=float(settings.snr),
        acceleration=float(acceleration),
        geometry=geometry,
        study=study,
        truth=truth,
        label_names=dict(phantom.label_names),
        phantom_name=phantom.name,
        field_strength_T=phantom.field_strength_T,
        seed=settings.seed,
    )
