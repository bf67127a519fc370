"""Total-variation (TV) regularised subspace reconstruction of MRF data by ADMM.

The K coefficient images of a tissue are constant inside it, so they share their edges: the coupled (vectorial)
TV of Bresson & Chan (2008), one l2 norm per pixel over all K coefficients and both directions, keeps an edge
where any coefficient has one and removes what varies inside tissues (undersampling aliasing, noise). We solve

    min_c  1/2 ||D^{1/2} (A c - y)||^2 + lambda * sum_pixels ||(G c)_pixel||_2

with A the subspace operator of :mod:`pipelines.recon.subspace` (D its density weights), G the forward differences
along y and x (periodic), ||.||_2 over the 2 x K differences of a pixel, by ADMM on the split z = G c (scaled):

    x <- argmin 1/2 ||D^{1/2}(A x - y)||^2 + rho/2 ||G x - z + u||^2     CG on (A^H D A + rho G^H G), warm started
    z <- shrink_{lambda/rho}(G x + u)                                    per pixel: v * max(0, 1 - t / ||v||)
    u <- u + G x - z

Scale invariance as in :mod:`pipelines.recon.llr`: rho = ``rho`` x ||A^H D A|| / ||G^H G|| (||G^H G|| = 8), and
the threshold lambda / rho = ``lam`` x the 99th percentile of the first (Tikhonov) solve's per-pixel gradient norm,
so neither the data scale nor the operator (coils, samples, density weights) changes what ``lam`` means.
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

# Chosen on one held-out-style brain (seed 9001, band-limited, 64² and 128², benchmarks/mrf_accuracy.py): a larger
# threshold keeps improving white / grey matter (128² WM T2 10.0 / 8.6 / 8.3 % at 0.2 / 0.4 / 0.8) but costs the
# small lesions (8-12 voxels T2 8.4 / 8.5 / 10.1 %, 5-7 voxels 9.3 / 12.7 / 16.0 %); 0.3 is between. 10 or 15
# ADMM iterations gave the same maps as 30 at 64² (within the dictionary's grid steps: WM / GM / CSF T2 10.2 / 13.3 /
# 12.0 and 9.7 / 13.8 / 12.1 against 9.9 / 14.1 / 12.1 %), and 3 CG steps per x-update the same as 5 at 128²
# (9.3 / 11.6 / 8.7 % against 9.4 / 11.2 / 8.9 %); 10 x 3 keeps a 10-slice 256² study near 5 minutes on 2 cores.
DEFAULT_LAMBDA = 0.3  # x the 99th percentile of the first solve's gradient norm
DEFAULT_ITERATIONS = 10
DEFAULT_INNER = 3  # warm-started CG steps per x-update
DEFAULT_RHO = 0.05  # x ||A^H D A|| / ||G^H G||
_GTG_NORM = 8.0  # largest eigenvalue of the periodic 2-D forward-difference G^H G


def gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences of [K, ny, nx] along y and x, periodic: [2, K, ny, nx]."""
    return torch.stack((torch.roll(x, -1, dims=-2) - x, torch.roll(x, -1, dims=-1) - x))


def gradient_adjoint(g: torch.Tensor) -> torch.Tensor:
    """G^H of :func:`gradient`: [2, K, ny, nx] -> [K, ny, nx]."""
    return (torch.roll(g[0], 1, dims=-2) - g[0]) + (torch.roll(g[1], 1, dims=-1) - g[1])


def pixel_norms(g: torch.Tensor) -> torch.Tensor:
    """||.||_2 of each pixel's 2 x K differences: [ny, nx]."""
    return torch.sqrt((g.real**2 + g.imag**2).sum(dim=(0, 1)) if g.is_complex() else (g**2).sum(dim=(0, 1)))


def shrink(g: torch.Tensor, t: float) -> torch.Tensor:
    """The prox of t * sum_pixels ||.||_2 (group soft-thresholding over each pixel's 2 x K differences)."""
    n = pixel_norms(g)
    return g * torch.clamp(1 - t / n.clamp_min(1e-30), min=0.0).to(g.real.dtype)


def tv_norm(x: torch.Tensor) -> float:
    """sum over pixels of the coupled gradient norm of [K, ny, nx]."""
    return float(pixel_norms(gradient(x)).sum())


def tv_reconstruct(
    op: SubspaceOperator,
    y: np.ndarray | torch.Tensor,
    *,
    lam: float = DEFAULT_LAMBDA,
    rho: float = DEFAULT_RHO,
    iterations: int = DEFAULT_ITERATIONS,
    inner: int = DEFAULT_INNER,
    first: int = 20,
    tol: float = 1e-4,
    objective: list[float] | None = None,
) -> SubspaceResult:
    """Coefficient images [K, ny, nx] of ``y`` by coupled-TV-regularised least squares (ADMM; module docstring).

    ``lam``: threshold relative to the 99th percentile of the first solve's per-pixel gradient norm (0: least
    squares); ``rho``: ADMM penalty relative to ||A^H D A|| / ||G^H G||; ``iterations``: ADMM iterations;
    ``inner``: CG iterations per x-update (warm started); ``first``: CG iterations of the first solve
    (A^H D A + rho G^H G) x = A^H D y. ``objective``: receives the objective after the first solve and after every
    iteration.
    """
    if iterations < 0 or inner < 1:
        raise ValueError(f"TV needs iterations >= 0, inner >= 1 (got {iterations}, {inner})")
    y = _as_tensor(y, op.device, torch.complex64)
    rhs = op.adjoint(y, dcf=True)
    rho_abs = rho * float(max_eigenvalue(op, rhs, iterations=6, coupled=True)) / _GTG_NORM

    def system(v: torch.Tensor) -> torch.Tensor:
        return op.normal(v) + rho_abs * gradient_adjoint(gradient(v))

    x, cg_total, r = conjugate_gradient_residual(system, rhs, first, tol)
    sx = rhs - r  # system(x), kept current from CG's residuals: no extra operator application per iteration
    g = gradient(x)
    norms = pixel_norms(g).flatten()
    tau = lam * (float(torch.quantile(norms[:: max(1, norms.numel() // 65536)], 0.99)) if norms.numel() else 0.0)
    lam_abs = tau * rho_abs  # the lambda of the objective
    yy = 0.0
    if objective is not None:
        yy = weighted_energy(op, y)
        objective.append(data_term(op, x, rhs, yy) + lam_abs * tv_norm(x))
    z = shrink(g, tau)
    u = g - z
    for _ in range(int(iterations)):
        b = rhs + rho_abs * gradient_adjoint(z - u)
        r = b - sx
        if float(torch.linalg.vector_norm(r)) > tol * float(torch.linalg.vector_norm(b)):
            d, n_cg, r_left = conjugate_gradient_residual(system, r, inner, tol)
            x = x + d
            sx = sx + (r - r_left)  # system(d) = r - (r - system(d))
            cg_total += n_cg
        g = gradient(x)
        z = shrink(g + u, tau)
        u = u + g - z
        if objective is not None:
            objective.append(data_term(op, x, rhs, yy) + lam_abs * tv_norm(x))
    return SubspaceResult(
        x.cpu().numpy(),
        int(iterations),
        [
            f"coupled-TV ADMM: rank {op.rank}, {iterations} iterations ({cg_total} CG steps), threshold {lam:g} x "
            f"99th percentile of the gradient norm, rho {rho:g} x ||A^H D A|| / 8"
        ],
    )
