"""The operator layer: one protocol for every forward model, one channel view for the unrolled networks, one
power iteration. Torch, complex64, batched, CPU or CUDA.

Every forward model (:class:`CartesianSense`, :class:`NonCartesianSense` here; the MRF subspace operators of
:mod:`pipelines.recon.subspace`) is an :class:`Operator`, which is all the classical solvers need:

* ``forward(x)``: images -> data,
* ``adjoint(y, dcf=False)``: the exact adjoint (``dcf=True`` applies the density compensation first, A^H D y),
* ``normal(x)``: A^H D A x (D = identity for Cartesian data and for non-Cartesian data without a DCF).

SENSE images are [B, ny, nx], independent slices; a subspace operator's K coefficient images [K, ny, nx] of one
slice are coupled by its normal operator. Sensitivity maps are [B or 1, C, ny, nx]; a leading 1 shares the maps
between all images of the batch.

The unrolled networks (XPDNet, NC-PDNet) see any of them as a :class:`ChannelOperator` on complex buffers
[B, n_ch, ny, nx] through one pair of adapters: :class:`SenseChannels` (one channel per slice) and
:class:`SubspaceChannels` (one subspace operator per batch element, its K coefficient images as channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from pipelines.recon.nufft import NUFFT, toeplitz_kernel, toeplitz_normal


class Operator(Protocol):
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor: ...
    def normal(self, x: torch.Tensor) -> torch.Tensor: ...


class ChannelOperator(Protocol):
    """An operator on complex buffers [B, n_ch, ny, nx]; data in the wrapped operator's own layout, batch first."""

    n_channels: int

    @property
    def density_compensated(self) -> bool: ...  # whether adjoint(y, dcf=True) and normal apply a DCF
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor: ...
    def normal(self, x: torch.Tensor) -> torch.Tensor: ...


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

    def __init__(
        self, maps: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, device: torch.device | str | None = None
    ) -> None:
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

    def __init__(
        self,
        maps: np.ndarray | torch.Tensor,
        k: np.ndarray | torch.Tensor,
        dcf: np.ndarray | torch.Tensor | None = None,
        toeplitz: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.maps = _check_maps(_tensor(maps, device, torch.complex64))
        self.device = self.maps.device
        self.shape = (self.maps.shape[-2], self.maps.shape[-1])
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


# ---- channel view for the unrolled networks -------------------------------------------------------------------
class SenseChannels:
    """A SENSE operator (images [B, ny, nx]) seen as a one-channel buffer operator."""

    n_channels = 1

    def __init__(self, op: Operator) -> None:
        self.op: Any = op  # callers reach the wrapped operator's own attributes (dcf, maps, nufft)

    @property
    def density_compensated(self) -> bool:
        return getattr(self.op, "dcf", None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.forward(x[:, 0])

    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor:
        return self.op.adjoint(y, dcf=dcf)[:, None]

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.normal(x[:, 0])[:, None]


class SubspaceChannels:
    """Subspace operators (coefficients [K, ny, nx] of one slice each), one per batch element, seen as a K-channel
    buffer operator: images [B, K, ny, nx], data [B, ...] (each element in its operator's layout)."""

    def __init__(self, ops: Sequence[Any] | Any) -> None:
        self.ops: list[Any] = list(ops) if isinstance(ops, (list, tuple)) else [ops]
        ranks = {int(op.rank) for op in self.ops}
        if len(ranks) != 1:
            raise ValueError(f"the subspace operators of one batch must share their rank, got {sorted(ranks)}")
        self.n_channels = ranks.pop()

    @property
    def density_compensated(self) -> bool:
        return all(getattr(op, "dcf", None) is not None for op in self.ops)

    def _check(self, n: int) -> None:
        if n != len(self.ops):
            raise ValueError(f"batch of {n} but {len(self.ops)} subspace operator(s) (one slice each)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x.shape[0])
        return torch.stack([op.forward(xi) for op, xi in zip(self.ops, x, strict=True)])

    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor:
        self._check(y.shape[0])
        return torch.stack([op.adjoint(yi, dcf=dcf) for op, yi in zip(self.ops, y, strict=True)])

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x.shape[0])
        if x.is_cuda and len(self.ops) > 1 and self._shared_kernels():
            from pipelines.recon.subspace import batched_normal

            return batched_normal(self.ops, x)
        return torch.stack([op.normal(xi) for op, xi in zip(self.ops, x, strict=True)])

    def _shared_kernels(self) -> bool:
        """True when every operator is a copy of one non-Cartesian template whose kernels are already built."""
        first = getattr(self.ops[0], "_kernels", None)
        return first is not None and all(getattr(op, "_kernels", None) is first for op in self.ops[1:])


def channel_operator(op: Any) -> ChannelOperator:
    """The channel view of ``op``: a subspace operator (it has a ``rank`` and a ``basis``) gets
    :class:`SubspaceChannels`, any other operator :class:`SenseChannels`; a channel view is returned as is."""
    if isinstance(op, (SenseChannels, SubspaceChannels)):
        return op
    if hasattr(op, "rank") and hasattr(op, "basis"):
        return SubspaceChannels(op)
    return SenseChannels(op)


# ---- power iteration ------------------------------------------------------------------------------------------
def max_eigenvalue(
    op: Operator, like: torch.Tensor, iterations: int = 15, seed: int = 0, coupled: bool = False
) -> torch.Tensor:
    """Largest eigenvalue of ``A^H D A`` by power iteration: ``||A^H D A x||`` for the unit ``x`` it converges to.

    Per image of a batch like ``like`` [B, ny, nx] (independent slices), shaped [B, 1, 1]; ``coupled=True`` treats
    the whole tensor as one vector (the K coefficient images of a subspace operator), shaped [1, 1, 1]. Used as
    the step size of FISTA and the scale of the Tikhonov weights, where a few per cent of error do no harm.
    """
    if iterations < 1:
        raise ValueError(f"power iteration needs at least one iteration, got {iterations}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(like.shape, generator=g, dtype=torch.complex64).to(like.device)
    dims = tuple(range(x.ndim)) if coupled else (-2, -1)
    for _ in range(int(iterations)):
        y = op.normal(x)
        lam = torch.linalg.vector_norm(y, dim=dims, keepdim=True)
        x = y / lam.clamp_min(1e-30)
    return lam.clamp_min(1e-12)
