"""Band-limited (continuous-object) MRF data, for evaluating reconstructions honestly.

:func:`pipelines.sim.acquisition.simulate_study` samples the NUFFT of the phantom drawn on the reconstruction's own
matrix: the data then come from a pixelated object whose edges the reconstruction can represent exactly except for
the k-space the trajectory misses (an "inverse crime" in one direction, missing energy in the other: 12 % of the
64^2 brain's norm lies outside the spiral's disk). Here the phantom is drawn ``oversample`` times finer (the same
anatomy: the phantom is defined in continuous coordinates) and its fingerprints are sampled at the scan's k-space
positions, so the data are those of a finer object as a scanner sees it; the truth and labels for scoring stay
on the reconstruction matrix, with ``truth["purity"]`` saying which voxels are partial volumes of the fine object.

Conventions: k in cycles/FOV on the recon matrix N. The fine image of N_f = f N pixels, through the same
orthonormal NUFFT, gives f times the coarse samples (f^2 more pixels, 1/f in the 1/N_f scaling) and places pixel
centres (f - 1)/(2f) coarse pixels off the coarse grid's centre convention, which a linear phase undoes (checked
against the coarse NUFFT of a smooth object to 1e-7).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.physics.sequences import MRFSequence
from pipelines.sim.acquisition import (
    AcquisitionSettings,
    _add_noise,
    _noiseless_kspace,
    _sampling,
    assemble_study,
    fingerprint_images,
    object_noise_std,
)
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import make_phantom
from pipelines.sim.study import SimulatedStudy


def fine_to_coarse(k: np.ndarray, matrix: int, oversample: int) -> np.ndarray:
    """Factors [...] that turn NUFFT samples at k [..., 2] (cycles/FOV) of an image drawn ``oversample`` times finer
    into those of the same object on the ``matrix`` grid's conventions: 1/oversample and a shift of
    (oversample - 1) / (2 oversample) coarse pixels along x and y (pixel centres of :func:`make_phantom`)."""
    s = -(oversample - 1) / (2 * oversample)
    return (np.exp(-2j * np.pi * (k[..., 0] + k[..., 1]) * s / matrix) / oversample).astype(np.complex64)


def simulate_bandlimited(
    phantom: str,
    sequence: MRFSequence,
    settings: AcquisitionSettings,
    *,
    matrix: int = 64,
    oversample: int = 2,
    field_strength_T: float = 3.0,
    randomize: bool = False,
    lesions: Sequence[tuple[float, float, float]] = (),
) -> SimulatedStudy:
    """A single-slice study on ``matrix`` whose k-space is the NUFFT of the phantom drawn at ``oversample * matrix``
    (see the module docstring; Cartesian: the central ``matrix`` lines and columns of its FFT). Truth, labels and
    ``fingerprints`` are on ``matrix``; the noise level follows the simulator's SNR convention (mean object signal /
    SNR, image-domain std = k-space std).

    ``randomize`` draws pose, tissue values, texture, B1 and off-resonance from ``settings.seed`` (held-out
    phantoms); ``lesions`` adds round lesions (see :func:`make_phantom`), the same objects on both grids."""
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    coarse, fine = (
        make_phantom(
            phantom, n, field_strength_T=field_strength_T, seed=settings.seed, randomize=randomize, lesions=lesions
        )
        for n in (matrix, matrix * oversample)
    )
    fine_fp = fingerprint_images(fine, sequence)
    maps_fine = birdcage_maps(settings.coils, fine.pd.shape)
    trajectory, lines, acceleration = _sampling(settings, sequence.n_frames, matrix, matrix)
    if trajectory is None:
        kspace = _cartesian_kspace(fine_fp, maps_fine, lines, matrix, oversample)
    else:
        kspace = _noiseless_kspace(fine_fp, maps_fine, trajectory, lines)
        kspace *= fine_to_coarse(trajectory, matrix, oversample)[:, :, None, :]  # [frames, readouts, 1, samples]
    noise_std = object_noise_std(fine_fp, fine.mask, settings.snr)
    del fine_fp
    _add_noise(kspace, noise_std, np.random.default_rng(settings.seed))
    maps = birdcage_maps(settings.coils, (matrix, matrix))
    fingerprints = fingerprint_images(coarse, sequence)
    study = assemble_study(
        coarse, sequence, settings, kspace, trajectory, lines, maps, fingerprints, noise_std, acceleration
    )
    study.truth["purity"] = label_purity(coarse.labels, fine.labels)
    return study


def _cartesian_kspace(
    fine_fp: np.ndarray, maps_fine: np.ndarray, lines: np.ndarray, matrix: int, oversample: int
) -> np.ndarray:
    """complex64 [frames, lines, coils, matrix]: the fine object's k-space on the coarse Cartesian grid, i.e. the
    central ``matrix`` x ``matrix`` of its FFT (what a scanner's band-limited acquisition of it holds), with the
    :func:`fine_to_coarse` scale and shift; oversample 1 is the simulator's own FFT."""
    nf = matrix * oversample
    lo = nf // 2 - matrix // 2
    k = np.arange(matrix) - matrix // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    factor = fine_to_coarse(np.stack([kx, ky], -1).astype(np.float64), matrix, oversample)  # [ky, kx]
    frames, n_coils = fine_fp.shape[0], maps_fine.shape[0]
    kspace = np.empty((frames, lines.shape[1], n_coils, matrix), dtype=np.complex64)
    for f in range(frames):
        coil_img = maps_fine * fine_fp[f]
        full = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
        grid = full[:, lo : lo + matrix, lo : lo + matrix]
        if oversample > 1:
            grid = grid * factor
        kspace[f] = grid[:, lines[f], :].transpose(1, 0, 2)
    return kspace


def voxel_means(fine: np.ndarray, oversample: int) -> np.ndarray:
    """[..., n, n]: each reconstruction voxel's mean over its ``oversample`` x ``oversample`` fine pixels of images
    [..., f n, f n] (what a perfect reconstruction of band-limited data could at best hold in that voxel)."""
    n = fine.shape[-1] // oversample
    return fine.reshape(*fine.shape[:-2], n, oversample, n, oversample).mean(axis=(-3, -1))


def label_purity(coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """float32 [n, n]: the fraction of each coarse voxel's f x f fine pixels that carry the coarse voxel's label
    (1 inside a tissue, less where the voxel straddles an edge: partial volume the coarse truth does not show)."""
    n, f = coarse.shape[0], fine.shape[0] // coarse.shape[0]
    blocks = fine.reshape(n, f, n, f).transpose(0, 2, 1, 3).reshape(n, n, f * f)
    return (blocks == coarse[:, :, None]).mean(axis=2).astype(np.float32)


def white_matter_lesions(
    phantom: str, matrix: int, seed: int, areas_voxels: Sequence[float], margin_voxels: float = 2.0
) -> list[tuple[float, float, float]]:
    """Round lesions of the given areas (in voxels of ``matrix``) at random places inside the white matter of the
    randomised ``phantom`` of ``seed``, each at least ``margin_voxels`` from other tissue and from each other: the
    ``lesions`` argument of :func:`make_phantom` / :func:`simulate_bandlimited` for small-structure accuracy."""
    from scipy.ndimage import distance_transform_edt

    base = make_phantom(phantom, matrix, seed=seed, randomize=True)
    wm_label = next(k for k, v in base.label_names.items() if v == "white_matter")
    room = distance_transform_edt(base.labels == wm_label)
    rng = np.random.default_rng(seed + 7919)
    half = matrix / 2.0
    out: list[tuple[float, float, float]] = []
    for area in areas_voxels:
        (dx, dy), r_vox = _disc_covering(int(round(area)))
        ok = np.argwhere(room > r_vox + margin_voxels + 1)
        if not len(ok):
            raise ValueError(f"no room for a lesion of {area} voxels in the white matter at {matrix}^2")
        iy, ix = ok[rng.integers(len(ok))]
        out.append(((ix + dx - (matrix - 1) / 2.0) / half, (iy + dy - (matrix - 1) / 2.0) / half, r_vox / half))
        yy, xx = np.ogrid[:matrix, :matrix]
        room[np.hypot(yy - iy, xx - ix) <= 2 * r_vox + margin_voxels + 2] = 0
    return out


def _disc_covering(n: int) -> tuple[tuple[float, float], float]:
    """(centre offset from a pixel centre, radius) in pixels of the roundest disc whose inside holds exactly ``n``
    pixel centres (a disc on a pixel centre only holds 1, 5, 9, 13, ... pixels)."""
    best: tuple[float, tuple[float, float], float] | None = None
    yy, xx = np.mgrid[-8:9, -8:9]
    for off in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.5), (0.25, 0.25), (0.5, 0.25), (0.25, 0.0)):
        d = np.sort(np.hypot(xx - off[0], yy - off[1]).ravel())
        if n < 1 or n >= len(d) or d[n] - d[n - 1] < 1e-6:
            continue
        r = float((d[n - 1] + d[n]) / 2)  # holds the n nearest, not the (n+1)-th
        roundness = abs(np.pi * r * r - n)
        if best is None or roundness < best[0]:
            best = (roundness, off, r)
    if best is None:
        raise ValueError(f"no disc holds exactly {n} pixels")
    return best[1], best[2]
