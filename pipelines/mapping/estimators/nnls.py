"""Batched non-negative least squares on torch (CPU or CUDA): min_w 1/2 ||A w - y||^2 subject to w >= 0.

Accelerated projected gradient (FISTA with the projection on the non-negative orthant, Beck & Teboulle 2009)
on the Gram form: with G = A^T A and b = A^T y every iteration is one [B, n] x [n, n] product, the same for
every fingerprint of the batch, which is what makes a batch of thousands cheap on a GPU. Step 1/L with L the
largest eigenvalue of G. A final active-set polish re-solves the unconstrained least squares on each sample's
support (where it stays non-negative), which removes the residual shrinkage of a finite number of iterations.
"""

from __future__ import annotations

import torch


def nnls(
    a: torch.Tensor,
    y: torch.Tensor,
    *,
    iterations: int = 300,
    polish: bool = True,
    gram: torch.Tensor | None = None,
    lipschitz: float | None = None,
) -> torch.Tensor:
    """Non-negative weights [B, n] for dictionary ``a`` [m, n] and signals ``y`` [B, m] (real)."""
    if a.is_complex() or y.is_complex():
        raise ValueError("nnls works on real data: stack real and imaginary parts first")
    if a.ndim != 2 or y.ndim != 2 or y.shape[1] != a.shape[0]:
        raise ValueError(f"nnls: dictionary {tuple(a.shape)} and signals {tuple(y.shape)} do not match")
    g = a.T @ a if gram is None else gram
    big_l = float(torch.linalg.eigvalsh(g.double()).max()) if lipschitz is None else lipschitz
    b = y @ a
    w = torch.zeros(y.shape[0], a.shape[1], dtype=y.dtype, device=y.device)
    v, t = w, 1.0
    # Gradient G v - b, or A^T (A v - y) when the signal dimension is well below the number of atoms (cheaper).
    primal = a.shape[0] * 2 < a.shape[1]
    for _ in range(iterations):
        grad = ((v @ a.T - y) @ a) if primal else (v @ g - b)
        w_new = (v - grad / big_l).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        v = w_new + ((t - 1) / t_new) * (w_new - w)
        w, t = w_new, t_new
    if polish:
        w = _polish(g, b, w)
    return w


def _polish(g: torch.Tensor, b: torch.Tensor, w: torch.Tensor, max_support: int = 12) -> torch.Tensor:
    """Unconstrained LS on the (at most ``max_support`` largest) support of each sample; kept where >= 0."""
    k = min(max_support, w.shape[1])
    top = torch.topk(w, k, dim=1)
    idx, active = top.indices, top.values > 0
    gs = g[idx[:, :, None], idx[:, None, :]]  # [B, k, k]
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    mask = active[:, :, None] & active[:, None, :]
    gs = torch.where(mask, gs, eye * (~active[:, :, None]))
    bs = torch.where(active, b.gather(1, idx), torch.zeros_like(top.values))
    gs = gs + 1e-6 * eye * gs.diagonal(dim1=1, dim2=2).abs().mean(1, keepdim=True)[:, :, None]
    sol = torch.linalg.solve(gs, bs[:, :, None])[:, :, 0]
    refined = torch.zeros_like(w).scatter(1, idx, torch.where(active, sol, torch.zeros_like(sol)))

    def objective(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ g) * x).sum(1) - (b * x).sum(1)

    # Kept only where feasible and better: a support larger than max_support is left to the iterations.
    ok = (sol >= 0).all(1) & active.any(1) & (objective(refined) <= objective(w))
    out = w.clone()
    out[ok] = refined[ok]
    return out
