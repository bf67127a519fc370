"""The scanner simulator: ground-truth maps -> EPG fingerprints -> coil images -> k-space per frame + noise.

SNR convention: ``snr`` = mean fingerprint magnitude inside the object (over all frames) divided by the
standard deviation of the complex noise per coil, with E|n|^2 = sigma^2 (sigma / sqrt(2) per real channel).
Because the k-space scaling is orthonormal, this is also the per-coil SNR of a fully sampled image.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from pipelines.io.dicom_uids import deterministic_uid
from pipelines.physics.epg import epg_chunked, epg_fat, epg_fisp
from pipelines.physics.sequences import MRFSequence
from pipelines.recon.nufft import nufft_forward
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import Phantom, make_phantom
from pipelines.sim.study import MultiSliceStudy, SimulatedStudy
from pipelines.sim.trajectories import cartesian_frame_masks, mrf_radial_trajectory, mrf_spiral_trajectory
from pipelines.types import Geometry, ImageStudy, StudyInfo

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
    slice_gap_mm: float = 0.0  # multi-slice studies: gap between neighbouring slices (centre spacing = thickness + gap)


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
        water = _chunked_fisp(sequence, vox(phantom.t1_water_ms), vox(phantom.t2_water_ms), b1, df, chunk, progress)
        sig = (1 - ff)[:, None].to(water.dtype) * water
        fatty = torch.nonzero(ff > 0).flatten()
        if fatty.numel():
            fat = _chunked_fat(
                sequence,
                vox(phantom.t1_fat_ms)[fatty],
                vox(phantom.t2_fat_ms)[fatty],
                b1[fatty],
                df[fatty],
                phantom.field_strength_T,
                chunk,
                progress,
            )
            sig[fatty] += ff[fatty, None].to(fat.dtype) * fat
        sig = sig * vox(phantom.pd)[:, None].to(sig.dtype)
    out[:, idx] = sig.T.cpu().numpy()
    return out.reshape(sequence.n_frames, *mask.shape)


def magnitude_images(phantom: Phantom, sequence: MRFSequence, snr: float, seed: int = 0) -> np.ndarray:
    """Magnitude images [frames, y, x] (float32) as a scanner exports them: |fingerprints + complex Gaussian
    noise|, noise standard deviation mean object signal / ``snr`` (Rician in the magnitude; ``inf``: no noise)."""
    x = fingerprint_images(phantom, sequence)
    if np.isfinite(snr):
        sigma = float(np.abs(x[:, phantom.mask]).mean()) / snr
        noise = np.random.default_rng(seed).normal(0.0, sigma / np.sqrt(2), (2, *x.shape))
        x = x + (noise[0] + 1j * noise[1]).astype(np.complex64)
    return np.abs(x).astype(np.float32)


def magnitude_study(phantom: Phantom, sequence: MRFSequence, snr: float, seed: int = 0) -> ImageStudy:
    """:func:`magnitude_images` as the image series a scanner would export (240 mm FOV, schedule attached)."""
    ny, nx = phantom.matrix
    return ImageStudy(
        pixels=magnitude_images(phantom, sequence, snr, seed)[:, None],
        geometry=Geometry.centred((ny, nx), (240.0 * ny / max(ny, nx), 240.0 * nx / max(ny, nx))),
        study=StudyInfo(),
        flip_angles_deg=sequence.flip_angles_deg,
        tr_ms=sequence.tr_ms,
        te_ms=sequence.te_ms,
        ti_ms=sequence.ti_ms,
        is_magnitude=True,
    )


def _chunked_fisp(
    seq: MRFSequence, t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor, df: torch.Tensor, chunk: int, progress: bool
) -> torch.Tensor:
    def fn(t1c: torch.Tensor, t2c: torch.Tensor, b1c: torch.Tensor, dfc: torch.Tensor) -> torch.Tensor:
        return epg_fisp(seq, t1c, t2c, b1c, dfc)

    return epg_chunked(fn, t1, t2, b1, df, chunk=chunk, progress=progress, desc="water EPG")


def _chunked_fat(
    seq: MRFSequence,
    t1: torch.Tensor,
    t2: torch.Tensor,
    b1: torch.Tensor,
    df: torch.Tensor,
    field: float,
    chunk: int,
    progress: bool,
) -> torch.Tensor:
    def fn(t1c: torch.Tensor, t2c: torch.Tensor, b1c: torch.Tensor, dfc: torch.Tensor) -> torch.Tensor:
        return epg_fat(seq, t1c, t2c, b1c, dfc, field_strength_T=field)

    # Six peaks per voxel: keep each call's working set the size of a water chunk.
    return epg_chunked(fn, t1, t2, b1, df, chunk=max(1, chunk // 6), progress=progress, desc="fat EPG")


def _study_info(
    phantom_name: str,
    sequence: MRFSequence,
    field_T: float,
    seed: int,
    stack: tuple[int, float, float] | None = None,
) -> StudyInfo:
    """Deterministic identifiers, so the same simulation gives the same study (idempotent tests).

    ``stack`` = (slices, thickness, gap) of a multi-slice study: part of the key, so that a stack and a single
    slice of the same phantom and seed are different studies (UIDs); absent for one slice (UIDs unchanged).
    """
    key = f"recon-node-sim/{phantom_name}/{sequence.name}/{sequence.fingerprint_key()}/{field_T}/{seed}"
    if stack is not None:
        key += f"/stack{stack[0]}x{stack[1]:g}+{stack[2]:g}"
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


def _sampling(
    settings: AcquisitionSettings, frames: int, ny: int, nx: int
) -> tuple[np.ndarray | None, np.ndarray, float]:
    """(trajectory [frames, readouts, samples, 2] float32 or None, lines [frames, readouts], acceleration).

    The same for every slice of a study: a scanner repeats one sampling pattern per slice.
    """
    if settings.trajectory == "cartesian":
        r = 1.0 if settings.acceleration is None else float(settings.acceleration)
        lines = cartesian_frame_masks(frames, ny, r, kind=settings.cartesian_mask, seed=settings.seed)
        return None, lines, ny / lines.shape[1]
    per_frame = _readouts_per_frame(settings.trajectory, max(ny, nx), settings.acceleration)
    if settings.trajectory == "radial":
        trajectory = mrf_radial_trajectory(frames, per_frame, 2 * max(ny, nx), max(ny, nx))
        full = np.ceil(np.pi / 2 * max(ny, nx))
    else:
        # Frame f carries interleaves f*per_frame ... : consecutive MRF frames rotate through the spiral.
        arms = mrf_spiral_trajectory(frames * per_frame, max(ny, nx), n_interleaves=SPIRAL_INTERLEAVES)
        trajectory = arms.reshape(frames, per_frame, arms.shape[-2], 2)
        full = SPIRAL_INTERLEAVES
    lines = np.arange(frames * per_frame, dtype=np.int32).reshape(frames, per_frame)
    return trajectory.astype(np.float32), lines, float(full / per_frame)


def _noiseless_kspace(
    fingerprints: np.ndarray, maps: np.ndarray, trajectory: np.ndarray | None, lines: np.ndarray
) -> np.ndarray:
    """complex64 [frames, readouts, coils, samples]: the coil images of every frame, sampled."""
    frames, _, nx = fingerprints.shape
    n_coils = maps.shape[0]
    if trajectory is None:
        kspace = np.empty((frames, lines.shape[1], n_coils, nx), dtype=np.complex64)
        for f in range(frames):
            coil_img = maps * fingerprints[f]
            k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
            kspace[f] = k[:, lines[f], :].transpose(1, 0, 2)
        return kspace
    per_frame, n_samp = trajectory.shape[1], trajectory.shape[2]
    kspace = np.empty((frames, per_frame, n_coils, n_samp), dtype=np.complex64)
    for f in range(frames):
        y = nufft_forward(maps * fingerprints[f], trajectory[f].reshape(-1, 2))  # [coils, per_frame*n_samp]
        kspace[f] = y.reshape(n_coils, per_frame, n_samp).transpose(1, 0, 2)
    return kspace


def _add_noise(kspace: np.ndarray, noise_std: float, rng: np.random.Generator) -> None:
    if noise_std > 0:
        per_channel = np.float32(noise_std / np.sqrt(2))
        # In place, channel by channel: no complex128 temporaries the size of the k-space.
        kspace.real += per_channel * rng.standard_normal(kspace.shape, dtype=np.float32)
        kspace.imag += per_channel * rng.standard_normal(kspace.shape, dtype=np.float32)


def _check_settings(settings: AcquisitionSettings) -> None:
    if settings.trajectory not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {settings.trajectory!r}: use one of {', '.join(TRAJECTORIES)}")
    if settings.coils < 1:
        raise ValueError("coils must be >= 1")
    if not settings.snr > 0:
        raise ValueError("snr must be positive (use inf for noiseless data)")


@overload
def simulate_study(
    phantom: Phantom | str,
    sequence: MRFSequence,
    settings: AcquisitionSettings = ...,
    *,
    matrix: int = ...,
    field_strength_T: float = ...,
    n_slices: Literal[1] = ...,
    device: str | torch.device = ...,
    progress: bool = ...,
) -> SimulatedStudy: ...


@overload
def simulate_study(
    phantom: Phantom | str,
    sequence: MRFSequence,
    settings: AcquisitionSettings = ...,
    *,
    matrix: int = ...,
    field_strength_T: float = ...,
    n_slices: int,
    device: str | torch.device = ...,
    progress: bool = ...,
) -> SimulatedStudy | MultiSliceStudy: ...


def simulate_study(
    phantom: Phantom | str,
    sequence: MRFSequence,
    settings: AcquisitionSettings = AcquisitionSettings(),
    *,
    matrix: int = 128,
    field_strength_T: float = 3.0,
    n_slices: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SimulatedStudy | MultiSliceStudy:
    """Simulate an MRF acquisition end to end (see module docstring for the SNR convention).

    ``n_slices = 1`` (default): one slice, returned as a :class:`SimulatedStudy` with everything in memory.
    ``n_slices > 1``: a :class:`MultiSliceStudy` of parallel axial slices ``settings.slice_thickness_mm +
    settings.slice_gap_mm`` apart, each cutting the 3D phantom at its own position (``phantom`` must then be a
    name); slices are simulated one at a time when asked for (see :func:`simulate_multislice`).
    """
    _check_settings(settings)
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if n_slices > 1:
        if not isinstance(phantom, str):
            raise ValueError(
                "a multi-slice study needs the phantom's name (each slice cuts the anatomy at its "
                "own position), not one 2D Phantom"
            )
        return simulate_multislice(
            phantom,
            sequence,
            settings,
            n_slices=n_slices,
            matrix=matrix,
            field_strength_T=field_strength_T,
            device=device,
            progress=progress,
        )
    if isinstance(phantom, str):
        phantom = make_phantom(phantom, matrix, field_strength_T=field_strength_T, seed=settings.seed)
    ny, nx = phantom.pd.shape
    rng = np.random.default_rng(settings.seed)
    fingerprints = fingerprint_images(phantom, sequence, device=device, progress=progress)
    maps = birdcage_maps(settings.coils, (ny, nx))
    trajectory, lines, acceleration = _sampling(settings, sequence.n_frames, ny, nx)
    kspace = _noiseless_kspace(fingerprints, maps, trajectory, lines)

    noise_std = object_noise_std(fingerprints, phantom.mask, settings.snr)
    _add_noise(kspace, noise_std, rng)
    return assemble_study(
        phantom, sequence, settings, kspace, trajectory, lines, maps, fingerprints, noise_std, acceleration
    )


def object_noise_std(fingerprints: np.ndarray, mask: np.ndarray, snr: float) -> float:
    """The noise std of the SNR convention: mean object signal (|fingerprints| inside ``mask``) / ``snr``."""
    obj = np.abs(fingerprints)[:, mask]
    signal = float(obj.mean()) if obj.size else 1.0
    return 0.0 if np.isinf(snr) else signal / snr


def assemble_study(
    phantom: Phantom,
    sequence: MRFSequence,
    settings: AcquisitionSettings,
    kspace: np.ndarray,
    trajectory: np.ndarray | None,
    lines: np.ndarray,
    maps: np.ndarray,
    fingerprints: np.ndarray,
    noise_std: float,
    acceleration: float,
) -> SimulatedStudy:
    """A :class:`SimulatedStudy` of ``phantom`` (truth, geometry, UIDs) around simulated samples ``kspace``."""
    ny, nx = phantom.pd.shape
    geometry = Geometry.centred(
        (ny, nx), (settings.fov_mm * ny / max(ny, nx), settings.fov_mm * nx / max(ny, nx)), settings.slice_thickness_mm
    )
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


def simulate_multislice(
    phantom_name: str,
    sequence: MRFSequence,
    settings: AcquisitionSettings = AcquisitionSettings(),
    *,
    n_slices: int,
    matrix: int = 128,
    field_strength_T: float = 3.0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> MultiSliceStudy:
    """A stack of ``n_slices`` parallel axial slices through the 3D phantom, simulated slice by slice.

    Geometry: :meth:`Geometry.centred` with ``n_slices`` and ``settings.slice_gap_mm`` (slice 0 most inferior,
    the stack centred on the isocentre). Slice ``s`` at ``z_s`` mm along the normal shows
    ``make_phantom(..., z=z_s / (FOV / 2))`` (anatomy changes from slice to slice) and has its own coil
    sensitivities (``birdcage_maps(..., z=...)``: the ring sits in the plane z = 0).

    Built here, for all slices: phantoms' truth [slices, y, x], coil maps, and the reference slice's fingerprints
    (only to fix the common noise level and DICOM scale; then dropped). Each slice's fingerprints, k-space and
    noise are made when the slice is asked for; its noise comes from ``default_rng([seed, slice])``.
    """
    _check_settings(settings)
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if settings.slice_thickness_mm <= 0 or settings.slice_gap_mm < 0:
        raise ValueError("slice thickness must be > 0 mm and the slice gap >= 0 mm")
    ny = nx = int(matrix)
    fov = (settings.fov_mm * ny / max(ny, nx), settings.fov_mm * nx / max(ny, nx))
    geometry = Geometry.centred(
        (ny, nx), fov, settings.slice_thickness_mm, n_slices=n_slices, slice_gap_mm=settings.slice_gap_mm
    )
    z_mm = geometry.slice_locations_mm
    # The phantom's unit length is half the shorter side of the FOV; the coils' is half the FOV along each axis.
    z_phantom = z_mm / (min(fov) / 2.0)
    z_coils = z_mm / (max(fov) / 2.0)
    phantoms = [
        make_phantom(phantom_name, matrix, field_strength_T=field_strength_T, seed=settings.seed, z=float(z))
        for z in z_phantom
    ]
    maps = np.stack([birdcage_maps(settings.coils, (ny, nx), z=float(z)) for z in z_coils]).astype(np.complex64)
    trajectory, lines, acceleration = _sampling(settings, sequence.n_frames, ny, nx)
    lines = np.asarray(lines, dtype=np.int32)

    # One noise level for the whole study, from the middle slice (the SNR convention of a single slice applied
    # to it); its fingerprints are simulated once more when the slice itself is made -- the price of never
    # holding two slices' fingerprint images.
    reference = (n_slices - 1) // 2
    ref_fp = fingerprint_images(phantoms[reference], sequence, device=device, progress=progress)
    obj = np.abs(ref_fp)[:, phantoms[reference].mask]
    signal = float(obj.mean()) if obj.size else 1.0
    peak = float(np.abs(ref_fp).max()) if ref_fp.size else 0.0
    del ref_fp, obj
    noise_std = 0.0 if np.isinf(settings.snr) else signal / settings.snr

    phantom0 = phantoms[0]
    info = _study_info(
        phantom_name,
        sequence,
        phantom0.field_strength_T,
        settings.seed,
        stack=(n_slices, settings.slice_thickness_mm, settings.slice_gap_mm),
    )
    geometry.frame_of_reference_uid = info.frame_of_reference_uid
    truths = []
    for ph in phantoms:
        t = ph.truth()
        t["mask"] = ph.mask.astype(np.uint8)
        truths.append(t)
    truth = {k: np.stack([t[k] for t in truths]) for k in truths[0]}
    label_names = dict(phantom0.label_names)

    def make_slice(s: int) -> SimulatedStudy:
        ph = phantoms[s]
        fingerprints = fingerprint_images(ph, sequence, device=device, progress=progress)
        kspace = _noiseless_kspace(fingerprints, maps[s], trajectory, lines)
        _add_noise(kspace, noise_std, np.random.default_rng([settings.seed, s]))
        return SimulatedStudy(
            sequence=sequence,
            trajectory_kind=settings.trajectory,
            kspace=kspace,
            trajectory=trajectory,
            lines=lines,
            coil_maps=maps[s],
            fingerprints=fingerprints,
            noise_std=float(noise_std),
            snr=float(settings.snr),
            acceleration=float(acceleration),
            geometry=geometry,
            study=info,
            truth={k: v[s] for k, v in truth.items()},
            label_names=dict(label_names),
            phantom_name=phantom_name,
            field_strength_T=ph.field_strength_T,
            seed=settings.seed,
            slice_index=s,
        )

    return MultiSliceStudy(
        sequence=sequence,
        trajectory_kind=settings.trajectory,
        geometry=geometry,
        study=info,
        truth=truth,
        coil_maps=maps,
        noise_std=float(noise_std),
        snr=float(settings.snr),
        acceleration=float(acceleration),
        label_names=label_names,
        phantom_name=phantom_name,
        field_strength_T=phantom0.field_strength_T,
        seed=settings.seed,
        reference_slice=reference,
        frame_peak=peak,
        lines=lines,
        trajectory=trajectory,
        make_slice=make_slice,
    )
