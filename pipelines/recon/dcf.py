"""Density compensation for non-Cartesian sampling: Pipe & Menon (MRM 1999) fixed-point iteration.

``w <- w / (C * (C^T w))``: spread the weights onto an oversampled grid with a positive kernel ``C``
and interpolate back; a sample in a dense region sees many neighbours and is weighted down. FINUFFT's
``spreadinterponly`` mode exposes exactly that spread / interpolate pair (its exponential-of-semicircle kernel
on the 2x grid), so the DCF uses the same library as the NUFFT itself.
"""

from __future__ import annotations

import finufft
import numpy as np
import torch

from pipelines.recon.nufft import FinufftPoints, _as_numpy_points


def pipe_menon_dcf(k: np.ndarray | torch.Tensor, shape: tuple[int, int], n_iter: int = 20) -> np.ndarray:
    """[M] float32, scaled so mean |A^H D A 1| over the image = 1 (as NC-PDNet does).

    ``k`` [..., 2] in cycles/FOV (flattened to [M, 2]); ``shape`` the image grid (ny, nx). With that scaling
    the density-compensated adjoint ``A^H D y`` of fully sampled data has the image's own amplitude, so
    classical solvers and learned networks see data of the same scale whatever the trajectory.
    """
    pts = _as_numpy_points(k)
    ny, nx = int(shape[0]), int(shape[1])
    op = FinufftPoints(pts, (ny, nx), dtype=np.complex128)
    grid = (op.wy, op.wx)
    opts = dict(spreadinterponly=1, upsampfac=2.0, eps=1e-3, nthreads=torch.get_num_threads())
    spread = finufft.Plan(1, (2 * ny, 2 * nx), dtype="complex128", isign=1, **opts)
    interp = finufft.Plan(2, (2 * ny, 2 * nx), dtype="complex128", isign=-1, **opts)
    spread.setpts(*grid)
    interp.setpts(*grid)
    w: np.ndarray = np.ones(pts.shape[0], dtype=np.complex128)
    for _ in range(int(n_iter)):
        density = interp.execute(spread.execute(w)).real
        w = w / np.maximum(density, 1e-12 * density.max())
    w = w.real
    # Scale: the density-compensated adjoint of the data of a constant image has mean magnitude 1.
    ones = np.ones((1, ny, nx), dtype=np.complex128)
    w = w / np.abs(op.adjoint(w[None] * op.forward(ones))).mean()
    return w.astype(np.float32)
