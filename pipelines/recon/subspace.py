"""Low-rank (subspace) reconstruction of MRF data (McGivney et al., IEEE TMI 2014; Zhao et al. 2018).

One spiral interleaf or a few Cartesian lines per frame cannot be reconstructed frame by frame. The
fingerprints of real tissues, however, lie close to a K-dimensional subspace spanned by the first right
singular vectors V [frames, K] of the dictionary (``MRFDictionary.complex.basis``). We therefore reconstruct
K coefficient images c_k and model frame t as

    x_t = sum_k conj(V[t, k]) c_k            (the dictionary's convention: coefficients = s @ V)

so that the forward operator of one slice is

    y[coil, sample m of frame t] = F_m( S_coil * sum_k conj(V[t, k]) c_k ),

with F_m the Fourier transform at sample m and S the coil sensitivities. Its adjoint back-projects every
sample weighted by V[t, k] onto coefficient k. The normal operator A^H A mixes coefficients: for each pair
(k, k') it is a Toeplitz (convolution) operator whose point-spread function carries the weights
V[t, k] conj(V[t, k']) of the samples that produced it, so one set of K x K kernels, computed once, replaces
all NUFFTs inside CG (non-Cartesian); for Cartesian data it is a K x K matrix per phase-encode line.

MRF trajectories repeat (the spiral cycles through its interleaves), so samples at identical k-space positions
are merged before any NUFFT: the transforms run on the distinct positions only (24x fewer for the default
spiral), and per-frame data are gathered from / scattered onto them.

The coefficient images go to matching as they are (coefficient-domain matching, pipelines.mapping.maps);
``expand`` forms the frames only where a caller needs them (tests, previews).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.recon.cartesian import coil_maps_from_mean
from pipelines.recon.cartesian import ifft2c as ifft2c_np
from pipelines.recon.coil_maps import espirit_maps_cartesian, espirit_maps_noncartesian, lowres_maps
from pipelines.recon.dcf import pipe_menon_dcf
from pipelines.recon.nufft import NUFFT, toeplitz_kernel
from pipelines.recon.operators import fft2c, ifft2c, max_eigenvalue
from pipelines.types import RawStudy


@dataclass
class SubspaceResult:
    coefficients: np.ndarray  # complex64 [K, y, x]
    iterations: int = 0
    notes: list[str] = field(default_factory=list)


def _as_tensor(a: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, device=device).to(dtype)


def _unique_points(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of k [M, 2] and, per sample, the index of its row (exact equality: repeated arms)."""
    k = np.ascontiguousarray(np.asarray(k, dtype=np.float32).reshape(-1, 2))
    rows = k.view(np.dtype((np.void, k.dtype.itemsize * 2)))[:, 0]
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return k[first], inverse.reshape(-1)


class NonCartesianSubspace:
    """Forward / adjoint / normal operator from K coefficient images to multi-coil samples of every frame.

    ``k`` [M, 2]: all samples of the slice (cycles/FOV), ``frame`` [M]: the frame each sample belongs to,
    ``maps`` [C, ny, nx], ``basis`` [frames, K]; ``dcf`` [M] optional density weights D, giving the weighted
    normal operator A^H D A used by the density-compensated solve.
    """

    def __init__(
        self,
        maps: np.ndarray | torch.Tensor,
        k: np.ndarray,
        frame: np.ndarray,
        basis: np.ndarray | torch.Tensor,
        dcf: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.maps = _as_tensor(maps, self.device, torch.complex64)
        self.shape = (self.maps.shape[-2], self.maps.shape[-1])
        self.basis = _as_tensor(basis, self.device, torch.complex64)
        self.rank = int(self.basis.shape[1])
        points, self.index = _unique_points(k)
        self.n_points = points.shape[0]
        self.points = points
        self.nufft = NUFFT(points, self.shape, device=self.device)
        self.index_t = torch.as_tensor(self.index, device=self.device)
        self.phi = self.basis[torch.as_tensor(np.asarray(frame), device=self.device)]  # [M, K]
        self.dcf = None if dcf is None else _as_tensor(dcf, self.device, torch.float32)
        self._kernels: torch.Tensor | None = None
        self._full: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> NonCartesianSubspace:
        """A copy on ``device`` that keeps the kernels already computed (they cost NUFFTs; moving them does not)."""
        device = torch.device(device)
        new = copy.copy(self)
        new.device = device
        new.maps, new.basis, new.phi = (t.to(device) for t in (self.maps, self.basis, self.phi))
        new.index_t = self.index_t.to(device)
        new.dcf = None if self.dcf is None else self.dcf.to(device)
        new.nufft = self.nufft if self.nufft.device == device else NUFFT(self.points, self.shape, device=device)
        new._kernels = None if self._kernels is None else self._kernels.to(device)
        new._full = None if self._full is None else self._full.to(device)
        return new

    # coefficients [K, ny, nx] -> samples [C, M]
    def forward(self, c: torch.Tensor) -> torch.Tensor:
        z = self.nufft.forward(self.maps[None] * c[:, None])  # [K, C, points]
        z = z[:, :, self.index_t]  # [K, C, M]
        return torch.einsum("kcm,mk->cm", z, self.phi.conj())

    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor:
        if dcf and self.dcf is not None:
            y = y * self.dcf
        w = y[None] * self.phi.T[:, None, :]  # [K, C, M]
        merged = torch.zeros((*w.shape[:2], self.n_points), dtype=w.dtype, device=w.device)
        merged.index_add_(2, self.index_t, w)
        img = self.nufft.adjoint(merged)  # [K, C, ny, nx]
        return (self.maps.conj()[None] * img).sum(dim=1)

    def kernels(self) -> torch.Tensor:
        """Toeplitz kernels [K(K+1)/2, 2ny, 2nx] of the pairs k <= k' (``torch.triu_indices`` order): entry (k, k')
        carries sum_t V[t,k] conj(V[t,k']) (x D).

        The weights of (k', k) are the conjugates of those of (k, k'), so its point-spread function is
        conj(psf(-d)) and its FFT on the 2N grid is the conjugate: only the upper kernels are computed and kept
        (rank 10 at 256^2: 115 MB instead of 210 MB).
        """
        if self._kernels is None:
            iu, ju = torch.triu_indices(self.rank, self.rank)
            merged = torch.zeros((self.n_points, iu.numel()), dtype=self.phi.dtype, device=self.phi.device)
            # A few pairs at a time: the [samples, pairs] weights of all 55 pairs (rank 10) of a 256^2 slice are
            # ~0.5 GB per temporary, the largest allocation of the whole pipeline.
            for p0 in range(0, iu.numel(), 8):
                sel = slice(p0, p0 + 8)
                w = self.phi[:, iu[sel]] * self.phi[:, ju[sel]].conj()  # [M, pairs]
                if self.dcf is not None:
                    w = w * self.dcf[:, None]
                merged[:, sel].index_add_(0, self.index_t, w)
            self._kernels = toeplitz_kernel(self.points, self.shape, merged.T, device=self.device)
        return self._kernels

    def full_kernels(self) -> torch.Tensor:
        """All K x K Toeplitz kernels [K, K, 2ny, 2nx] (the lower ones the conjugates of the upper), for
        :func:`batched_normal`; built from :meth:`kernels` on first use and cached beside them."""
        if self._full is None:
            upper = self.kernels()
            iu, ju = torch.triu_indices(self.rank, self.rank)
            full = torch.empty((self.rank, self.rank, *upper.shape[1:]), dtype=upper.dtype, device=upper.device)
            full[ju, iu] = upper.conj()
            full[iu, ju] = upper  # the diagonal keeps the computed kernel (real up to round-off)
            self._full = full
        return self._full

    def normal(self, c: torch.Tensor) -> torch.Tensor:
        """A^H D A c (D = identity without a DCF), by the K x K Toeplitz kernels: FFT pairs, no NUFFT."""
        upper = self.kernels()
        ny, nx = self.shape
        x = self.maps[None] * c[:, None]  # [K, C, ny, nx]
        xf = torch.fft.fft2(x, s=(2 * ny, 2 * nx))  # zero-padded to the 2N grid
        del x
        # K^2 broadcast multiply-adds instead of einsum("klyx,lcyx->kcyx"): einsum makes this a batched matmul of
        # tiny K x K matrices per pixel, 5-13x slower on CPU (K 8-12, 256^2 grid, one thread).
        yf = torch.zeros_like(xf)
        pair = 0
        for k in range(self.rank):
            for m in range(k, self.rank):
                yf[k].addcmul_(upper[pair], xf[m])
                if m != k:
                    yf[m].addcmul_(upper[pair].conj(), xf[k])
                pair += 1
        del xf
        y = torch.fft.ifft2(yf)[..., :ny, :nx]
        return (self.maps.conj()[None] * y).sum(dim=1)


def batched_normal(ops: Sequence[NonCartesianSubspace], c: torch.Tensor) -> torch.Tensor:
    """A^H D A of B slices [B, K, ny, nx] that share one set of Toeplitz kernels (same trajectory, basis and DCF;
    :func:`pipelines.recon.ncpdnet.with_maps` copies) and differ in their coil maps.

    One FFT pair and one K x K product per pixel for the whole batch, where :meth:`NonCartesianSubspace.normal`
    issues K^2 multiply-adds per slice: on a GPU those small launches, not arithmetic, bound a training step
    (B 8, K 10: ~900 launches per residual). On the CPU the per-slice loop stays faster (see ``normal``).
    """
    first = ops[0]
    if any(op.kernels() is not first.kernels() for op in ops[1:]):
        raise ValueError("batched_normal needs operators that share their Toeplitz kernels (with_maps copies)")
    full = first.full_kernels()
    ny, nx = first.shape
    maps = torch.stack([op.maps for op in ops])  # [B, C, ny, nx]
    xf = torch.fft.fft2(maps[:, None] * c[:, :, None], s=(2 * ny, 2 * nx))  # [B, K, C, 2ny, 2nx]
    yf = torch.einsum("klyx,blcyx->bkcyx", full, xf)
    y = torch.fft.ifft2(yf)[..., :ny, :nx]
    return (maps.conj()[:, None] * y).sum(dim=2)


class CartesianSubspace:
    """The same operator for Cartesian MRF: acquisition a samples phase-encode line ``line[a]`` of frame
    ``frame[a]`` (all readout points). The normal operator is a K x K matrix per line in k-space."""

    def __init__(
        self,
        maps: np.ndarray | torch.Tensor,
        line: np.ndarray,
        frame: np.ndarray,
        basis: np.ndarray | torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.maps = _as_tensor(maps, self.device, torch.complex64)
        self.shape = tuple(self.maps.shape[-2:])
        self.basis = _as_tensor(basis, self.device, torch.complex64)
        self.rank = int(self.basis.shape[1])
        self.line = torch.as_tensor(np.asarray(line), device=self.device, dtype=torch.long)
        self.phi = self.basis[torch.as_tensor(np.asarray(frame), device=self.device)]  # [A, K]
        w = self.phi[:, :, None] * self.phi.conj()[:, None, :]  # [A, K, K]
        self.gram = torch.zeros((self.shape[0], self.rank, self.rank), dtype=w.dtype, device=self.device)
        self.gram.index_add_(0, self.line, w)

    # coefficients [K, ny, nx] -> readouts [A, C, nx]
    def forward(self, c: torch.Tensor) -> torch.Tensor:
        z = fft2c(self.maps[None] * c[:, None])  # [K, C, ny, nx]
        z = z[:, :, self.line, :]  # [K, C, A, nx]
        return torch.einsum("kcax,ak->acx", z, self.phi.conj())

    def adjoint(self, y: torch.Tensor, dcf: bool = False) -> torch.Tensor:
        w = torch.einsum("acx,ak->kcax", y, self.phi)
        grid = torch.zeros((self.rank, y.shape[1], *self.shape), dtype=y.dtype, device=y.device)
        grid.index_add_(2, self.line, w)
        return (self.maps.conj()[None] * ifft2c(grid)).sum(dim=1)

    def normal(self, c: torch.Tensor) -> torch.Tensor:
        z = fft2c(self.maps[None] * c[:, None])  # [K, C, ny, nx]
        z = torch.einsum("ykl,lcyx->kcyx", self.gram, z)
        return (self.maps.conj()[None] * ifft2c(z)).sum(dim=1)


SubspaceOperator = NonCartesianSubspace | CartesianSubspace


def data_term(op: SubspaceOperator, c: torch.Tensor, rhs: torch.Tensor, yy: float) -> float:
    """1/2 ||D^{1/2}(A c - y)||^2 = 1/2 <c, A^H D A c> - Re <c, A^H D y> + 1/2 y^H D y, from the normal operator
    (no NUFFT needed): the data part of the regularised solvers' objectives. ``rhs`` = A^H D y, ``yy`` =
    :func:`weighted_energy` of y."""
    return float(
        0.5 * torch.vdot(c.flatten(), op.normal(c).flatten()).real
        - torch.vdot(c.flatten(), rhs.flatten()).real
        + 0.5 * yy
    )


def weighted_energy(op: SubspaceOperator, y: torch.Tensor) -> float:
    """y^H D y (D the operator's density weights; only non-Cartesian operators carry them)."""
    dcf = getattr(op, "dcf", None)
    return float(torch.vdot(y.flatten(), (y if dcf is None else y * dcf).flatten()).real)


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int, tol: float
) -> tuple[torch.Tensor, int]:
    """CG for one Hermitian positive definite system over the whole tensor (all K coefficients are coupled,
    unlike the per-slice batches of :func:`pipelines.recon.classical.cg_sense`)."""
    x, done, _ = conjugate_gradient_residual(apply, b, iterations, tol)
    return x, done


def conjugate_gradient_residual(
    apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int, tol: float
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """:func:`conjugate_gradient` that also returns its final residual b - apply(x), which ADMM's warm-started
    x-updates use to keep apply(x) up to date without another application of the operator."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(torch.vdot(r.flatten(), r.flatten()).real)
    stop = tol**2 * rr
    done = 0  # iterations run, returned: the loop may stop early
    for n in range(1, int(iterations) + 1):
        done = n
        q = apply(p)
        alpha = rr / max(float(torch.vdot(p.flatten(), q.flatten()).real), 1e-30)
        x = x + alpha * p
        r = r - alpha * q
        rr_new = float(torch.vdot(r.flatten(), r.flatten()).real)
        if rr_new < stop:
            break
        p = r + (rr_new / max(rr, 1e-30)) * p
        rr = rr_new
    return x, done, r


def reconstruct(
    op: SubspaceOperator,
    y: np.ndarray | torch.Tensor,
    method: str = "cgsense",
    *,
    lam: float = 1e-3,
    iterations: int = 20,
    tol: float = 1e-4,
) -> SubspaceResult:
    """Coefficient images [K, ny, nx] from the samples ``y`` (``op.forward``'s layout).

    ``adjoint``: A^H D y (density-compensated back-projection onto the subspace: the low-rank analogue of
    gridding). ``cgsense``: CG on (A^H D A + lam * ||A^H D A|| * I) c = A^H D y, with D the operator's density
    weights (none: plain least squares). ``lam`` is relative to the largest eigenvalue.
    """
    y = _as_tensor(y, op.device, torch.complex64)
    rhs = op.adjoint(y, dcf=True)
    if method == "adjoint":
        return SubspaceResult(rhs.cpu().numpy(), 0, ["subspace back-projection (no iterations)"])
    if method != "cgsense":
        raise ValueError(f"subspace reconstruction {method!r} is not one of adjoint, cgsense")
    # The Tikhonov scale needs only a few power iterations: a 10 % error in it moves lambda by 10 %, well inside
    # its flat optimum.
    reg = lam * float(max_eigenvalue(op, rhs, iterations=6, coupled=True))
    x, n_iter = conjugate_gradient(lambda v: op.normal(v) + reg * v, rhs, iterations, tol)
    # The parameter is a cap: fully sampled Cartesian data converge in one step, so say which happened.
    ran = f"{n_iter} iterations" if n_iter >= iterations else f"converged in {n_iter} of at most {iterations}"
    return SubspaceResult(
        x.cpu().numpy(), n_iter, [f"low-rank CG-SENSE: rank {op.rank}, {ran}, lambda {lam:g} x ||A^H A||"]
    )


def kspace_filter(images: np.ndarray, window: str = "hann") -> np.ndarray:
    """Radial k-space apodisation of images [..., y, x] (the scanner's "raw filter").

    Spiral and radial data cover a disk in k-space and the union of MRF arms undersamples its rim, so the
    least-squares coefficient images carry Gibbs ringing and rim noise; fingerprints mixed by ringing bias T2
    strongly (brain phantom, 64x64, rank 8: white-matter T2 error 33 % unfiltered, 10 % with Hann; see
    BENCHMARKS.md). ``hann`` trades that for a slightly wider point-spread function; ``none`` keeps the data.
    """
    if window == "none":
        return images
    if window != "hann":
        raise ValueError(f"k-space filter {window!r} is not one of hann, none")
    ny, nx = images.shape[-2:]
    ky, kx = np.meshgrid((np.arange(ny) - ny // 2) / (ny / 2), (np.arange(nx) - nx // 2) / (nx / 2), indexing="ij")
    w = 0.5 * (1 + np.cos(np.pi * np.clip(np.sqrt(kx**2 + ky**2), 0, 1)))
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    out = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k * w, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return out.astype(images.dtype)


def expand(coefficients: np.ndarray, basis: np.ndarray | torch.Tensor) -> np.ndarray:
    """Frames [T, ...] from coefficients [K, ...]: x_t = sum_k conj(V[t, k]) c_k."""
    v = np.asarray(basis.cpu().numpy() if isinstance(basis, torch.Tensor) else basis)
    c = coefficients.reshape(coefficients.shape[0], -1)
    return (np.conj(v) @ c).reshape((v.shape[0], *coefficients.shape[1:])).astype(np.complex64)


# ---- one slice of a raw MRF study -----------------------------------------------------------------------------
def compress_coils(data: np.ndarray, energy: float, min_coils: int = 4) -> tuple[np.ndarray, int]:
    """Virtual coils by SVD of the coil covariance (Huang et al., MRI 2008): data [C, ...] -> [V, ...] keeping
    the fewest virtual coils that retain ``energy`` of the signal (all of them with energy >= 1)."""
    c = data.shape[0]
    if energy >= 1 or c <= min_coils:
        return data, c
    flat = data.reshape(c, -1)
    cov = flat @ flat.conj().T
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1].clip(min=0), evecs[:, ::-1]
    cum = np.cumsum(evals) / max(float(evals.sum()), 1e-30)
    v = int(min(c, max(min_coils, np.searchsorted(cum, energy) + 1)))
    return (evecs[:, :v].conj().T @ flat).reshape(v, *data.shape[1:]).astype(data.dtype), v


def union_dcf(k: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Density weights [M] of all samples k [M, 2] of an MRF slice: Pipe-Menon on the distinct positions of the
    union of all frames (arms repeat), shared among the samples that hit the same position."""
    points, index = _unique_points(k)
    dcf_u = pipe_menon_dcf(points, shape)
    multiplicity = np.bincount(index, minlength=points.shape[0])
    return (dcf_u[index] / multiplicity[index]).astype(np.float32)


COIL_MAPS = ("lowres", "espirit")


def slice_operator(
    raw: RawStudy,
    rows: np.ndarray,
    basis: torch.Tensor,
    device: torch.device,
    weighted: bool,
    coil_energy: float = 1.0,
    maps: str = "lowres",
) -> tuple[SubspaceOperator, np.ndarray]:
    """The subspace operator of the acquisitions ``rows`` (one slice) and its samples in the operator's layout
    (virtual coils when ``coil_energy`` < 1); ``weighted``: with the density weights of :func:`union_dcf`.

    ``maps``: ``espirit`` (ESPIRiT on the first coefficient image's k-space, gridded for non-Cartesian data; see
    :mod:`pipelines.recon.coil_maps` for when it matters) or ``lowres``: for non-Cartesian data RSS-normalised
    low-resolution images, for Cartesian data the full-resolution time-averaged image over its RSS."""
    if maps not in COIL_MAPS:
        raise ValueError(f"unknown coil maps {maps!r}: use one of {', '.join(COIL_MAPS)}")
    ny, nx = raw.matrix
    frame = raw.frame[rows]
    if raw.trajectory_kind == "cartesian":
        data = raw.data[rows]  # [A, C, nx]
        if coil_energy < 1:
            comp, _ = compress_coils(data.transpose(1, 0, 2), coil_energy)
            data = np.ascontiguousarray(comp.transpose(1, 0, 2))
        if maps == "espirit":
            first = basis[torch.as_tensor(frame, device=basis.device), 0].cpu().numpy()
            sens = espirit_maps_cartesian(data, raw.line[rows], ny, weights=first)
            return CartesianSubspace(sens, raw.line[rows], frame, basis, device=device), data
        mean_k = np.zeros((data.shape[1], ny, nx), dtype=np.complex128)
        counts = np.zeros(ny)
        np.add.at(mean_k.transpose(1, 0, 2), raw.line[rows], data)
        np.add.at(counts, raw.line[rows], 1)
        mean_k /= np.maximum(counts, 1)[None, :, None]
        # Time-averaged image per coil: every line sampled at least once gives a full-resolution reference.
        sens = coil_maps_from_mean(ifft2c_np(mean_k)[None])
        return CartesianSubspace(sens, raw.line[rows], frame, basis, device=device), data
    if raw.trajectory is None:
        raise ValueError(f"{raw.source_path or 'raw data'}: {raw.trajectory_kind} readouts without trajectory")
    traj = raw.trajectory[rows][..., :2]  # [A, samples, 2] cycles/FOV
    n_s = traj.shape[1]
    k = traj.reshape(-1, 2)
    frame_of_sample = np.repeat(frame, n_s)
    data = raw.data[rows].transpose(1, 0, 2).reshape(raw.data.shape[1], -1)  # [C, M]
    data, _ = compress_coils(data, coil_energy)
    dcf = union_dcf(k, (ny, nx))
    if maps == "espirit":
        first = basis[torch.as_tensor(frame_of_sample, device=basis.device), 0].cpu().numpy()
        sens = espirit_maps_noncartesian(data, k, (ny, nx), dcf, weights=first)
    else:
        sens = lowres_maps(data, k, (ny, nx), dcf)
    op = NonCartesianSubspace(sens, k, frame_of_sample, basis, dcf=dcf if weighted else None, device=device)
    return op, data
