"""Locally low-rank (LLR) subspace reconstruction of MRF data by ADMM (Zhao et al., MRM 2018; Assländer et al.,
MRM 2018; Lima da Cruz et al., MRM 2019 "HD-PROST" uses the same local low-rank idea on patches).

The K coefficient images of a small image block (b x b pixels) hold a few tissues only, so the K x b^2 matrix of
the block is close to low rank even where the K images are not (noise and undersampling artefacts are full
rank). We solve

    min_c  1/2 ||D^{1/2} (A c - y)||^2 + lambda * sum_blocks ||B_b(c)||_*

with A the subspace operator of :mod:`pipelines.recon.subspace` (D its density weights, as the ``cgsense`` solve),
B_b the K x b^2 matrix of block b and ||.||_* the nuclear norm, by ADMM on the split c = z (scaled form):

    x <- argmin 1/2 ||D^{1/2}(A x - y)||^2 + rho/2 ||x - z + u||^2      CG on (A^H D A + rho I), warm started
    z <- SVT_{lambda/rho}(x + u)                                         singular value thresholding per block
    u <- u + x - z

The blocks are shifted by a random offset in every iteration (cyclically), which avoids blocking artefacts
(Zhao 2018, Assländer 2018); ``shifts=False`` keeps one fixed tiling, for which the objective above is the one
ADMM minimises (the tests use it).

Scale invariance: rho = ``rho`` x ||A^H D A|| (largest eigenvalue by power iteration), and the threshold
lambda / rho = ``lam`` x (largest block singular value of the first, Tikhonov-regularised, solve), so neither the
data scale nor the operator scale (coils, samples, density weights) changes what ``lam`` means.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.recon.operators import max_eigenvalue
from pipelines.recon.subspace import (
    SubspaceOperator,
    SubspaceResult,
    _as_tensor,
    conjugate_gradient_residual,
    data_term,
    weighted_energy,
)

# Defaults chosen on the 64^2 spiral brain, pixel simulation (benchmarks/mrf_accuracy.md): 4x4 blocks beat 6x6 and
# 8x8 (GM T2 12.8 % against 17.8 / 17.8 %); threshold 0.05 beat 0.1 / 0.2 in every tissue and 0.03 on CSF T2 (7.8
# against 11.1 %) at equal WM / GM error. Used unchanged at 128^2 and on band-limited data.
DEFAULT_BLOCK = 4
DEFAULT_LAMBDA = 0.05  # x the largest block singular value of the first solve
DEFAULT_ITERATIONS = 30
DEFAULT_RHO = 0.05  # x ||A^H D A||: ADMM penalty; also the Tikhonov weight of the first solve


def _blocks(x: torch.Tensor, block: int, shift: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """[K, ny, nx] -> [n_blocks, K, block^2]: rolled by ``shift``, zero-padded to whole blocks."""
    k, ny, nx = x.shape
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(-2, -1))
    py, px = -ny % block, -nx % block
    if py or px:
        x = torch.nn.functional.pad(x, (0, px, 0, py))
    by, bx = x.shape[-2] // block, x.shape[-1] // block
    m = x.reshape(k, by, block, bx, block).permute(1, 3, 0, 2, 4).reshape(by * bx, k, block * block)
    return m, (by, bx)


def _unblocks(
    m: torch.Tensor, grid: tuple[int, int], block: int, shape: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`_blocks`."""
    by, bx = grid
    k = m.shape[1]
    x = m.reshape(by, bx, k, block, block).permute(2, 0, 3, 1, 4).reshape(k, by * block, bx * block)
    x = x[:, : shape[0], : shape[1]]
    return torch.roll(x, shifts=(shift[0], shift[1]), dims=(-2, -1))


def block_svt(x: torch.Tensor, tau: float, block: int = DEFAULT_BLOCK, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Singular value soft-thresholding of every block's K x block^2 matrix (the prox of tau * sum ||.||_*)."""
    m, grid = _blocks(x, block, shift)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s = torch.clamp(s - tau, min=0.0)
    shape = (int(x.shape[-2]), int(x.shape[-1]))
    return _unblocks((u * s.to(u.dtype)[:, None, :]) @ vh, grid, block, shape, shift)


def block_nuclear_norm(x: torch.Tensor, block: int = DEFAULT_BLOCK, shift: tuple[int, int] = (0, 0)) -> float:
    """sum over blocks of the nuclear norm of the K x block^2 matrices."""
    m, _ = _blocks(x, block, shift)
    return float(torch.linalg.svdvals(m).sum())


def largest_block_singular_value(x: torch.Tensor, block: int = DEFAULT_BLOCK) -> float:
    """The largest singular value of any block's K x block^2 matrix (fixed tiling): the scale of ``lam``."""
    m, _ = _blocks(x, block, (0, 0))
    return float(torch.linalg.svdvals(m).max()) if m.numel() else 0.0


def llr_reconstruct(
    op: SubspaceOperator,
    y: np.ndarray | torch.Tensor,
    *,
    lam: float = DEFAULT_LAMBDA,
    rho: float = DEFAULT_RHO,
    block: int = DEFAULT_BLOCK,
    iterations: int = DEFAULT_ITERATIONS,
    inner: int = 5,
    first: int = 20,
    shifts: bool = True,
    seed: int = 0,
    tol: float = 1e-4,
    objective: list[float] | None = None,
) -> SubspaceResult:
    """Coefficient images [K, ny, nx] of ``y`` by LLR-regularised least squares (ADMM; see the module docstring).

    ``lam``: threshold relative to the largest block singular value of the first solve (0: plain least squares
    with the ADMM penalty vanishing at convergence); ``rho``: ADMM penalty relative to ||A^H D A||;
    ``iterations``: ADMM iterations; ``inner``: CG iterations per x-update (warm started); ``first``: CG
    iterations of the first solve (A^H D A + rho I) x = A^H D y. ``objective``: a list that receives the
    objective of the first solve and of x after every iteration, on the fixed tiling (with shifts the regulariser
    ADMM sees changes from one iteration to the next, so the list then only tracks the fixed-tiling value).
    """
    if block < 1 or iterations < 0 or inner < 1:
        raise ValueError(f"LLR needs block >= 1, iterations >= 0, inner >= 1 (got {block}, {iterations}, {inner})")
    y = _as_tensor(y, op.device, torch.complex64)
    rhs = op.adjoint(y, dcf=True)
    scale = float(max_eigenvalue(op, rhs, iterations=6, coupled=True))
    rho_abs = rho * scale

    def system(v: torch.Tensor) -> torch.Tensor:
        return op.normal(v) + rho_abs * v

    x, n_first, r = conjugate_gradient_residual(system, rhs, first, tol)
    sx = rhs - r  # system(x), kept current from CG's residuals: no extra operator application per iteration
    tau = lam * largest_block_singular_value(x, block)
    lam_abs = tau * rho_abs  # the lambda of the objective
    yy = 0.0
    if objective is not None:
        yy = weighted_energy(op, y)
        objective.append(data_term(op, x, rhs, yy) + lam_abs * block_nuclear_norm(x, block))
    gen = np.random.default_rng(seed)
    # The first solve is ADMM's x-update from z = u = 0; its z- and u-updates follow (fixed tiling).
    z = block_svt(x, tau, block)
    u = x - z
    cg_total = n_first
    for _ in range(int(iterations)):
        # x-update, warm started: solve for the correction d of (N + rho I)(x + d) = A^H D y + rho (z - u).
        b = rhs + rho_abs * (z - u)
        r = b - sx
        # A converged x-update is skipped: CG would only chase float32 round-off.
        if float(torch.linalg.vector_norm(r)) > tol * float(torch.linalg.vector_norm(b)):
            d, n_cg, r_left = conjugate_gradient_residual(system, r, inner, tol)
            x = x + d
            sx = sx + (r - r_left)
            cg_total += n_cg
        shift = (int(gen.integers(block)), int(gen.integers(block))) if shifts else (0, 0)
        z = block_svt(x + u, tau, block, shift)
        u = u + x - z
        if objective is not None:
            objective.append(data_term(op, x, rhs, yy) + lam_abs * block_nuclear_norm(x, block))
    return SubspaceResult(
        x.cpu().numpy(),
        int(iterations),
        [
            f"locally low-rank ADMM: rank {op.rank}, {block}x{block} blocks"
            + (" (random shifts)" if shifts else "")
            + f", {iterations} iterations ({cg_total} CG steps), threshold {lam:g} x largest block singular value, "
            f"rho {rho:g} x ||A^H D A||"
        ],
    )
