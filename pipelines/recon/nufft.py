"""The project's one non-uniform FFT, backed by FINUFFT (Barnett et al., SISC 2019).

Conventions shared with :mod:`pipelines.sim.trajectories` and the ISMRMRD files the node reads:
k-space coordinates are (kx, ky) in cycles per FOV, in [-N/2, N/2); images are [..., y, x] with the centre at
index N/2; scaling is the orthonormal one, so on grid points the forward transform equals the centred
orthonormal FFT (``fftshift(fft2(ifftshift(img), norm="ortho"))``).
"""

from __future__ import annotations

import finufft
import numpy as np

_EPS = 1e-6  # ~ float32 round-off; FINUFFT's error is relative to the norm of the input


def _radians(k: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(k, dtype=np.float64).reshape(-1, 2)
    ny, nx = shape
    return 2 * np.pi * k[:, 1] / ny, 2 * np.pi * k[:, 0] / nx  # (y, x) order matches the image axes


def nufft_forward(images: np.ndarray, k: np.ndarray, eps: float = _EPS) -> np.ndarray:
    """Samples [..., M] of the images [..., ny, nx] at the points k [M, 2]."""
    images = np.asarray(images)
    shape = images.shape[-2:]
    lead = images.shape[:-2]
    wy, wx = _radians(k, shape)
    f = np.ascontiguousarray(images.reshape((-1, *shape)), dtype=np.complex128)
    out = finufft.nufft2d2(wy, wx, f, isign=-1, eps=eps)
    out = out / np.sqrt(shape[0] * shape[1])
    return out.reshape((*lead, -1)).astype(np.complex64 if images.dtype != np.complex128 else np.complex128)


def nufft_adjoint(data: np.ndarray, k: np.ndarray, shape: tuple[int, int], eps: float = _EPS) -> np.ndarray:
    """Adjoint of :func:`nufft_forward`: images [..., ny, nx] from samples [..., M]."""
    data = np.asarray(data)
    lead = data.shape[:-1]
    wy, wx = _radians(k, shape)
    c = np.ascontiguousarray(data.reshape((-1, data.shape[-1])), dtype=np.complex128)
    out = finufft.nufft2d1(wy, wx, c, n_modes=tuple(shape), isign=+1, eps=eps)
    out = out / np.sqrt(shape[0] * shape[1])
    return out.reshape((*lead, *shape)).astype(np.complex64 if data.dtype != np.complex128 else np.complex128)
