"""A smooth transmit field for single-compartment matching: B1 matched voxel by voxel, smoothed, T1 / T2 matched again.

Why. In FISP the fingerprint's change along B1 is nearly parallel to its change along T2, so whatever error the
reconstruction leaves in a voxel's coefficients moves B1 and T2 together along that valley. On held-out band-limited
brains the raw path's T2 error was mostly this: at 128², 8 coils, white-matter T2 12.6 % with B1 free, 2.2 % with B1
held at the truth, and the same 12.4 % at SNR 1000 as at SNR 30 (the aliasing of one interleaf per frame, not
noise). B1+ varies over centimetres (the RF wavelength in tissue is ~12 cm at 3 T), so a field smoothed over ~2 cm
takes that degree of freedom away from each voxel; BENCHMARKS.md, "A smooth B1 field", has the tables.

Per slice:

1. B1 from the free match (the caller's first pass);
2. the field: that B1 averaged under a Gaussian window (sigma in mm, normalised convolution), weighted by |M0| over the
   voxels the single-compartment model fits (relative residual below :data:`FIT_RESIDUAL`: fat and bone, whose
   water-atom B1 means nothing, are left out); voxels with no weight nearby keep their own B1;
3. T1 and T2 matched again with B1 held at the field (:func:`pipelines.mapping.matching.match_in_field`), except in
   fluid (free T2 above :data:`FLUID_T2_MS`), which keeps its free match.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

# Relative residual ||x - fit|| / ||x|| above which a voxel's B1 does not enter the field. Measured on the brains'
# TV reconstructions (128², seed 9002): white and grey matter, CSF and lesions have 10th percentiles of 0.04-0.07;
# scalp fat's is 0.21, bone's 0.34 (its median 0.22).
FIT_RESIDUAL = 0.15
# Voxels whose free match has a T2 above this keep it (fluid; see maps._in_b1_field). Brain tissue, muscle, fat and
# lesions are below 300 ms; CSF ~2 s.
FLUID_T2_MS = 600.0


def smooth_field(
    b1: np.ndarray,
    weight: np.ndarray,
    sigma_px: tuple[float, float],
    *,
    order: int = 0,
    fallback: np.ndarray | None = None,
) -> np.ndarray:
    """The weighted local polynomial fit of ``b1`` [y, x] (weights ``weight`` >= 0) under a Gaussian window.

    ``order`` 0 (the default) is normalised convolution, a weighted Gaussian average; it is biased by the field's
    curvature, ~sigma^2 / 2 times its Laplacian (a synthetic 64² bump, sigma 20 mm: -0.011 at the peak), which
    ``order`` 2 (local quadratic) removes (-0.0008). On the brains the voxel-wise B1 of each tissue is biased
    itself (grey matter +2 %, CSF +3-5 %: the reconstruction's aliasing), and order 2 followed that more closely:
    grey-matter T2 7.4 -> 8.0 % (128², seed 9002) and 4.1 -> 4.7 % (the clinical study), so 0 is the default.
    Where the weights within ~2 sigma sum to almost nothing (an isolated object, all of it ill-fitting), the
    ``fallback`` (default: ``b1`` itself) is kept."""
    w = np.where(np.isfinite(b1), np.maximum(weight, 0), 0).astype(np.float64)
    v = np.where(w > 0, b1, 0).astype(np.float64)
    ny, nx = b1.shape
    # Coordinates in units of sigma, centred: the moment matrices stay well conditioned.
    yy, xx = np.meshgrid((np.arange(ny) - ny / 2) / sigma_px[0], (np.arange(nx) - nx / 2) / sigma_px[1], indexing="ij")
    terms = [np.ones_like(yy)]
    if order >= 1:
        terms += [yy, xx]
    if order >= 2:
        terms += [yy * yy, yy * xx, xx * xx]

    def smooth(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma_px, mode="constant")

    den = smooth(w)
    enough = den > 1e-3 * (float(den.max()) if den.size else 0.0)
    n = len(terms)
    gram = np.empty((ny, nx, n, n))
    rhs = np.empty((ny, nx, n))
    for i in range(n):
        rhs[..., i] = smooth(w * v * terms[i])
        for k in range(i, n):
            gram[..., i, k] = gram[..., k, i] = smooth(w * terms[i] * terms[k])
    # A small ridge toward the local average keeps one-sided windows (the object's edge) from extrapolating.
    ridge = 1e-3 * den[..., None, None] * np.eye(n)
    ridge[..., 0, 0] = 0
    beta = np.linalg.solve(gram + ridge + 1e-12 * np.eye(n), rhs[..., None])[..., 0]
    fit = sum(beta[..., i] * terms[i] for i in range(n))
    out = np.where(enough, fit, b1 if fallback is None else fallback)
    return np.asarray(out, dtype=np.float32)


def field_weights(m0: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """|M0| where the single-compartment model fits the voxel (residual < :data:`FIT_RESIDUAL`), else 0."""
    return np.where(residual < FIT_RESIDUAL, np.abs(m0), 0.0)
