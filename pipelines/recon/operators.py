"""Multi-coil SENSE forward models in torch (complex64, batched over slices, CPU or CUDA).

Every operator has the same three methods, which is all the classical solvers and unrolled networks need:

* ``forward(x)``: images [B, ny, nx] -> k-space data,
* ``adjoint(y, dcf=False)``: the exact adjoint (``dcf=True`` applies the density compensation first, A^H D y),
* ``normal(x)``: A^H D A x (D = identity for Cartesian data and for non-Cartesian data without a DCF).

Sensitivity maps are [B or 1, C, ny, nx]; a leading 1 shares the maps between all images of the batch (e.g. the
K subspace coefficient images of one MRF slice).
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.recon.nufft import NUFFT, toeplitz_kernel, toeplitz_normal


def _tensor(a: np.ndarray | torch.Tensor, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes (``fftshift(fft2(ifftshift(x), norm="ortho"))``)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(k, norm="ortho"), dim=(-2, -1))


def _check_maps(maps: torch.Tensor) -> torch.Tensor:
    if maps.ndim == 3:
        maps = maps[None]
    if maps.ndim != 4:
        raise ValueError(f"sensitivity maps must be [B or 1, coils, ny, nx], got shape {tuple(maps.shape)}")
    return maps


class CartesianSense:
    """Cartesian multi-coil SENSE: ``y = M F (S x)``, F the centred orthonormal FFT, M the sampling mask.

    ``mask`` [..., ny, nx] (broadcast against [B, C, ny, nx]) may be bool or real weights: a 0/1 mask gives the
    textbook operator; averaged acquisitions can pass their counts' square roots. The mask is applied once in
    ``forward`` and once in ``adjoint``, so ``normal`` uses ``mask**2``.
    """

    def __init__(self, maps: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
                 device: torch.device | str | None = None) -> None:
        self.maps = _check_maps(_tensor(maps, device, torch.complex64))
        self.device = self.maps.device
        self.mask = _tensor(mask, self.device, torch.float32)
        self.shape = tuple(self.maps.shape[-2:])
        if tuple(self.mask.shape[-2:]) != self.shape:
            raise ValueError(f"mask grid {tuple(self.mask.shape[-2:])} differs from the maps' {self.shape}")

    def _coil_mask(self) -> torch.Tensor:
        # [ny, nx] and [1|B, 1, ny, nx] broadcast as they are; [B, ny, nx] needs a coil axis.
        return self.mask[:, None] if self.mask.ndim == 3 else self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ny, nx] -> k-space [B, C, ny, nx] (zeros where unsampled)."""
        return fft2c(self.maps * x[:, None]) * self._coil_mask()

    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor:
        """k-space [B, C, ny, nx] -> images [B, ny, nx]; ``dcf`` is accepted for symmetry (no-op)."""
        return (self.maps.conj() * ifft2c(y * self._coil_mask())).sum(dim=1)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.forward(x))


class NonCartesianSense:
    """Non-Cartesian multi-coil SENSE: ``y_c = A (S_c x)`` with A the NUFFT at points k [M, 2] (cycles/FOV).

    ``dcf`` [M] (e.g. :func:`pipelines.recon.dcf.pipe_menon_dcf`) weights the data in ``adjoint(y, dcf=True)``
    and in ``normal``: the solvers then minimise ``||D^1/2 (A S x - y)||^2``, which converges much faster than
    the unweighted problem for radial and spiral sampling. ``toeplitz=True`` computes ``normal`` as one
    zero-padded FFT pair per coil with a precomputed kernel instead of a NUFFT pair (see ``benchmarks/nufft.py``).
    """

    def __init__(self, maps: np.ndarray | torch.Tensor, k: np.ndarray | torch.Tensor,
                 dcf: np.ndarray | torch.Tensor | None = None, toeplitz: bool = True,
                 device: torch.device | str | None = None) -> None:
        self.maps = _check_maps(_tensor(maps, device, torch.complex64))
        self.device = self.maps.device
        self.shape = tuple(self.maps.shape[-2:])
        self.nufft = NUFFT(k, self.shape, device=self.device)
        self.dcf = None if dcf is None else _tensor(dcf, self.device, torch.float32).reshape(-1)
        if self.dcf is not None and self.dcf.numel() != self.nufft.n_points:
            raise ValueError(f"dcf has {self.dcf.numel()} weights but k has {self.nufft.n_points} points")
        self.kernel = toeplitz_kernel(k, self.shape, self.dcf, device=self.device) if toeplitz else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ny, nx] -> samples [B, C, M]."""
        return self.nufft.forward(self.maps * x[:, None])

    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor:
        """samples [B, C, M] -> images [B, ny, nx]; ``dcf=True``: A^H D y."""
        if dcf and self.dcf is not None:
            y = y * self.dcf
        return (self.maps.conj() * self.nufft.adjoint(y)).sum(dim=1)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H D A x (D = identity without a DCF)."""
        if self.kernel is None:
            return self.adjoint(self.forward(x), dcf=True)
        return (self.maps.conj() * toeplitz_normal(self.maps * x[:, None], self.kernel)).sum(dim=1)
