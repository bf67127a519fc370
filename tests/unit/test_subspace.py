"""The low-rank MRF operators: adjointness, Toeplitz normal against forward/adjoint, and exact recovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.recon.subspace import CartesianSubspace, NonCartesianSubspace, expand, reconstruct
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.trajectories import mrf_spiral_trajectory

N, FRAMES, RANK, COILS = 24, 60, 4, 3


def _basis(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((FRAMES, RANK)) + 1j * rng.standard_normal((FRAMES, RANK))
    q, _ = np.linalg.qr(a)
    return q.astype(np.complex64)


def _coeffs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((RANK, N, N), generator=g, dtype=torch.complex64)


def _spiral_op(dcf: np.ndarray | None = None) -> NonCartesianSubspace:
    traj = mrf_spiral_trajectory(FRAMES, N, n_interleaves=6)  # [frames, 1, samples, 2]: arms repeat every 6
    k = traj.reshape(-1, 2)
    frame = np.repeat(np.arange(FRAMES), traj.shape[2])
    maps = birdcage_maps(COILS, (N, N))
    return NonCartesianSubspace(maps, k, frame, _basis(), dcf=dcf)


def _cartesian_op() -> CartesianSubspace:
    rng = np.random.default_rng(3)
    lines = np.concatenate([rng.choice(N, size=4, replace=False) for _ in range(FRAMES)])
    frame = np.repeat(np.arange(FRAMES), 4)
    return CartesianSubspace(birdcage_maps(COILS, (N, N)), lines, frame, _basis())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("make", [_spiral_op, _cartesian_op], ids=["spiral", "cartesian"])
def test_adjoint_and_normal(make):
    op = make()
    c = _coeffs()
    y = op.forward(c)
    g = torch.Generator().manual_seed(5)
    r = torch.randn(y.shape, generator=g, dtype=torch.complex64)
    lhs = torch.vdot(y.flatten(), r.flatten())
    rhs = torch.vdot(c.flatten(), op.adjoint(r).flatten())
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    # The normal operator (Toeplitz kernels / per-line Gram) equals adjoint(forward(.)).
    assert _rel(op.normal(c), op.adjoint(op.forward(c))) < 1e-4


def test_repeated_arms_are_merged():
    op = _spiral_op()
    # 60 frames cycling through 6 arms: the NUFFT runs on the distinct positions only (all arms also share
    # k = 0, so slightly fewer than a tenth).
    assert op.index.size // 10 - 6 <= op.n_points <= op.index.size // 10


def test_weighted_normal_matches_weighted_adjoint():
    op0 = _spiral_op()
    dcf = np.random.default_rng(2).uniform(0.5, 2.0, op0.index.size).astype(np.float32)
    op = _spiral_op(dcf)
    c = _coeffs(4)
    assert _rel(op.normal(c), op.adjoint(op.forward(c), dcf=True)) < 1e-4


@pytest.mark.parametrize("make", [_spiral_op, _cartesian_op], ids=["spiral", "cartesian"])
def test_cgsense_recovers_subspace_images(make):
    """Noiseless data of coefficient images the sampling determines (the row space of A, so that k-space
    corners no trajectory visits play no part): low-rank CG-SENSE recovers them (the frames to 1 %)."""
    op = make()
    g = torch.Generator().manual_seed(7)
    shape = op.forward(_coeffs()).shape
    c = op.adjoint(torch.randn(shape, generator=g, dtype=torch.complex64))
    y = op.forward(c)
    res = reconstruct(op, y, "cgsense", lam=1e-6, iterations=200, tol=1e-7)
    frames, truth = expand(res.coefficients, op.basis), expand(c.numpy(), op.basis)
    err = np.linalg.norm(frames - truth) / np.linalg.norm(truth)
    assert err < 0.01, f"relative frame error {err:.3%} after {res.iterations} iterations"
    # Back-projection alone is far from it: the solve is doing the work.
    back = expand(reconstruct(op, y, "adjoint").coefficients, op.basis)
    scale = np.vdot(back, truth) / np.vdot(back, back)
    assert np.linalg.norm(scale * back - truth) / np.linalg.norm(truth) > 5 * err
