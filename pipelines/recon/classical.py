"""Classical reconstructions over any :class:`pipelines.recon.operators.Operator`.

* :func:`adjoint_recon`: zero-filled (Cartesian) or density-compensated adjoint (non-Cartesian): the baseline.
* :func:`cg_sense`: conjugate gradient on ``(A^H D A + lam I) x = A^H D y`` (Pruessmann et al. 2001), per slice.
* :func:`l1_wavelet`: FISTA (Beck & Teboulle 2009) on ``1/2 ||D^1/2 (A x - y)||^2 + lam ||W x||_1`` with an
  orthonormal Haar wavelet W in torch and cycle spinning (a new random shift each iteration), which removes
  Haar's blocky artefacts at no extra cost and keeps everything on the operator's device.

Scale: the operators are built so that ``||A^H D A|| ~ 1`` (RSS-normalised maps, orthonormal FFT, DCF scaled as
in :mod:`pipelines.recon.dcf`); ``lam`` of CG-SENSE is therefore relative to the operator norm, and ``lam`` of
L1 is relative to the largest magnitude of ``A^H D y`` of each slice, so neither depends on the data's units.
All return complex64 images [B, ny, nx].
"""

from __future__ import annotations

import torch

from pipelines.recon.operators import Operator, max_eigenvalue

CG_LAMBDA = 1e-2
CG_ITERATIONS = 15
L1_LAMBDA = 2e-3
L1_ITERATIONS = 40


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real part of <a, b> per batch element, shaped [B, 1, 1] to broadcast over images."""
    return (a.conj() * b).real.sum(dim=(-2, -1), keepdim=True)


def adjoint_recon(op: Operator, y: torch.Tensor) -> torch.Tensor:
    """Zero-filled / density-compensated adjoint ``A^H D y``."""
    return op.adjoint(y, dcf=True)


def cg_sense(
    op: Operator,
    y: torch.Tensor,
    lam: float = CG_LAMBDA,
    iterations: int = CG_ITERATIONS,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
) -> torch.Tensor:
    """CG on ``(A^H D A + lam I) x = A^H D y``; each slice of the batch has its own step sizes and stops at
    relative residual ``tol`` (the others go on). Few iterations also act as regularisation (early stopping)."""
    b = op.adjoint(y, dcf=True)
    x = torch.zeros_like(b) if x0 is None else x0.clone().to(b.dtype)
    r = b - (op.normal(x) + lam * x)
    p = r.clone()
    rr = _dot(r, r)
    stop = tol**2 * _dot(b, b)
    for _ in range(int(iterations)):
        active = rr > stop
        if not bool(active.any()):
            break
        q = op.normal(p) + lam * p
        alpha = torch.where(active, rr / torch.clamp(_dot(p, q), min=1e-30), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * q
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / torch.clamp(rr, min=1e-30), torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_new
    return x


# ---- wavelets ------------------------------------------------------------------------------------------------------
_S = 2.0**-0.5


def haar2(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Orthonormal 2D Haar transform of x [..., ny, nx] (both divisible by 2**levels), Mallat layout in place."""
    out = x.clone()
    ny, nx = x.shape[-2:]
    for _ in range(levels):
        band = out[..., :ny, :nx]
        a, b = band[..., 0::2, :], band[..., 1::2, :]
        band = torch.cat([(a + b) * _S, (a - b) * _S], dim=-2)
        a, b = band[..., 0::2], band[..., 1::2]
        out[..., :ny, :nx] = torch.cat([(a + b) * _S, (a - b) * _S], dim=-1)
        ny, nx = ny // 2, nx // 2
    return out


def ihaar2(c: torch.Tensor, levels: int) -> torch.Tensor:
    """Inverse of :func:`haar2`."""
    out = c.clone()
    ny, nx = c.shape[-2:]
    sizes = [(ny >> i, nx >> i) for i in range(levels)][::-1]
    for h, w in sizes:
        band = out[..., :h, :w]
        lo, hi = band[..., : w // 2], band[..., w // 2 :]
        band = torch.stack([(lo + hi) * _S, (lo - hi) * _S], dim=-1).reshape(*band.shape)
        lo, hi = band[..., : h // 2, :], band[..., h // 2 :, :]
        band = torch.stack([(lo + hi) * _S, (lo - hi) * _S], dim=-2).reshape(*band.shape)
        out[..., :h, :w] = band
    return out


def _levels(shape: tuple[int, int], wanted: int = 4) -> int:
    n = wanted
    while n > 0 and (shape[0] % (1 << n) or shape[1] % (1 << n)):
        n -= 1
    return n


def _soft(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    mag = z.abs()
    return z * torch.clamp(1 - t / torch.clamp(mag, min=1e-30), min=0)


def _wavelet_prox(x: torch.Tensor, t: torch.Tensor, levels: int, shift: tuple[int, int]) -> torch.Tensor:
    """Soft-threshold the detail coefficients of a shifted Haar transform (coarsest approximation kept)."""
    xs = torch.roll(x, shifts=shift, dims=(-2, -1))
    c = haar2(xs, levels)
    ny, nx = x.shape[-2] >> levels, x.shape[-1] >> levels
    coarse = c[..., :ny, :nx].clone()
    c = _soft(c, t)
    c[..., :ny, :nx] = coarse
    return torch.roll(ihaar2(c, levels), shifts=(-shift[0], -shift[1]), dims=(-2, -1))


def l1_wavelet(
    op: Operator,
    y: torch.Tensor,
    lam: float = L1_LAMBDA,
    iterations: int = L1_ITERATIONS,
    levels: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """FISTA with a Haar-wavelet L1 penalty; ``lam`` relative to max |A^H D y| of each slice."""
    b = op.adjoint(y, dcf=True)
    levels = _levels((b.shape[-2], b.shape[-1]), levels)
    step = 1.0 / (1.05 * max_eigenvalue(op, b))
    thresh = lam * b.abs().amax(dim=(-2, -1), keepdim=True) * step
    rng = torch.Generator().manual_seed(seed)
    x = b * step  # one gradient step from zero: a scaled adjoint
    z, t = x, 1.0
    for _ in range(int(iterations)):
        shift = tuple(int(s) for s in torch.randint(0, 1 << levels, (2,), generator=rng))
        x_new = _wavelet_prox(z - step * (op.normal(z) - b), thresh, levels, shift)  # type: ignore[arg-type]
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x
