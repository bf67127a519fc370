"""Per-frame Cartesian reconstruction: zero-filled inverse FFT and coil combination.

The simplest reconstruction of Cartesian MRF data, used as the image-domain baseline and by the tests that
check the simulator end to end. Learned and iterative reconstructions come with the operator layer.
"""

from __future__ import annotations

import numpy as np

from pipelines.io.disk_rows import ROW_CHUNK
from pipelines.types import RawStudy


def _check_cartesian(raw: RawStudy) -> None:
    src = raw.source_path or "input"
    if raw.trajectory_kind != "cartesian":
        raise ValueError(f"{src}: expected Cartesian data, the header says trajectory {raw.trajectory_kind!r}")
    ny, nx = raw.matrix
    if raw.data.shape[-1] != nx:
        raise ValueError(
            f"{src}: readouts have {raw.data.shape[-1]} samples but the encoded matrix is {nx} wide "
            "(readout oversampling is not supported yet)"
        )
    if raw.line.size and (raw.line.max() >= ny or raw.line.min() < 0):
        raise ValueError(f"{src}: phase-encode index {int(raw.line.max())} is outside the encoded matrix ({ny} lines)")


def grid_cartesian(raw: RawStudy, frames: range | None = None) -> np.ndarray:
    """k-space [frames, coils, ny, nx] (complex64) with unsampled lines zero; one slice."""
    _check_cartesian(raw)
    ny, nx = raw.matrix
    n_frames = int(raw.frame.max(initial=0)) + 1
    frames = frames or range(n_frames)
    k = np.zeros((len(frames), raw.data.shape[1], ny, nx), dtype=np.complex64)
    rows = np.flatnonzero((raw.frame >= frames.start) & (raw.frame < frames.stop))
    k[raw.frame[rows] - frames.start, :, raw.line[rows], :] = raw.data[rows]
    return k


def ifft2c(k: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D inverse FFT over the last two axes (the simulator's forward is its inverse)."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def coil_maps_from_mean(coil_images: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Sensitivities [coils, y, x] from the time-averaged coil images, normalised to unit RSS.

    Averaging all frames gives a high-SNR reference; dividing by its root-sum-of-squares leaves each coil's
    relative sensitivity times the phase of the mean image, which the fingerprint fit absorbs into M0.
    """
    mean = coil_images.mean(axis=0)
    rss = np.sqrt((np.abs(mean) ** 2).sum(axis=0, keepdims=True))
    return (mean / np.maximum(rss, eps)).astype(np.complex64)


def combine_coils(coil_images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """SENSE-1 combination sum_c conj(S_c) x_c / sum_c |S_c|^2 over the coil axis (axis -3)."""
    num = (np.conj(maps) * coil_images).sum(axis=-3)
    den = (np.abs(maps) ** 2).sum(axis=0)
    return (num / np.where(den > 0, den, 1.0)).astype(np.complex64)


def reconstruct_frames(raw: RawStudy, maps: np.ndarray | None = None, chunk: int = 32) -> np.ndarray:
    """Complex frames [frames, y, x]: zero-filled IFFT per frame and coil, then coil combination.

    ``maps`` None estimates sensitivities from the time average (:func:`coil_maps_from_mean`); the mean of
    the coil images is the IFFT of the mean k-space, so frames are gridded a chunk at a time.
    """
    _check_cartesian(raw)
    n_frames = int(raw.frame.max(initial=0)) + 1
    if maps is None:
        ny, nx = raw.matrix
        mean_k = np.zeros((raw.data.shape[1], ny, nx), dtype=np.complex128)
        for lo in range(0, raw.line.size, ROW_CHUNK):  # a chunk at a time: the study may be on disk (DiskRows)
            rows = slice(lo, lo + ROW_CHUNK)
            np.add.at(mean_k.transpose(1, 0, 2), raw.line[rows], raw.data[rows])
        maps = coil_maps_from_mean(ifft2c(mean_k / n_frames)[None])
    out = np.empty((n_frames, *raw.matrix), dtype=np.complex64)
    for i in range(0, n_frames, chunk):
        frames = range(i, min(i + chunk, n_frames))
        out[frames.start : frames.stop] = combine_coils(ifft2c(grid_cartesian(raw, frames)), maps)
    return out
