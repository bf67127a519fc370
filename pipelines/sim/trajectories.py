"""k-space sampling patterns for the scanner simulator: Cartesian frame masks, radial and spiral trajectories.

Units follow ISMRMRD: cycles per field of view, so a matrix of N pixels spans k in [-N/2, N/2) and
``k / N * 2 pi`` are the radians in [-pi, pi) that finufft expects. Arrays carry (kx, ky) on a trailing axis
of 2, float32. Every trajectory here keeps |k| <= N/2 and every coordinate inside [-N/2, N/2).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GOLDEN_ANGLE_RAD",
    "cartesian_frame_masks",
    "default_calib_lines",
    "mrf_radial_trajectory",
    "mrf_spiral_trajectory",
    "radial_angles",
    "radial_trajectory",
    "spiral_full",
    "spiral_interleaf",
]

# Winkelmann et al., IEEE TMI 2007: pi / golden ratio = 111.246... deg between successive full spokes.
GOLDEN_ANGLE_RAD = np.pi / ((1.0 + np.sqrt(5.0)) / 2.0)

# Fraction of lines in the fully sampled centre by default (fastMRI's 4x setting).
_DEFAULT_CALIB_FRACTION = 0.08


# --------------------------------------------------------------------------------------------------------
# Cartesian
# --------------------------------------------------------------------------------------------------------


def default_calib_lines(n_lines: int, acceleration: float) -> int:
    """Calibration lines used when none are requested: all lines at R = 1, else round(8 % of the lines)
    (fastMRI uses 8 % at R = 4), and at least one so that the k-space centre is always sampled."""
    if acceleration <= 1.0:
        return n_lines
    return max(1, int(round(_DEFAULT_CALIB_FRACTION * n_lines)))


def _calib_block(n_lines: int, calib_lines: int) -> np.ndarray:
    """Contiguous rows around the DFT centre ``n_lines // 2`` (always included when calib_lines >= 1)."""
    start = n_lines // 2 - calib_lines // 2
    return np.arange(start, start + calib_lines)


def _equidistant_rows(n_lines: int, acceleration: float, offset: float) -> np.ndarray:
    """Every R-th row from ``offset``; a fractional R spaces rows R apart on average."""
    return np.unique(np.floor(np.arange(offset, n_lines, acceleration)).astype(np.int64))


def _equidistant_union(n_lines: int, acceleration: float, frame: int, calib: np.ndarray) -> np.ndarray:
    # The offset cycles through ceil(R) phases, frame f using phase f mod ceil(R) (fastMRI-style equispaced
    # mask, shifted each frame so successive MRF frames fill different rows).
    period = int(np.ceil(acceleration))
    offset = (frame % period) * acceleration / period
    return np.union1d(_equidistant_rows(n_lines, acceleration, offset), calib)


def _keep_central(rows: np.ndarray, count: int, calib: np.ndarray, n_lines: int) -> np.ndarray:
    """Drop the rows farthest from the centre (never calibration rows) until ``count`` are left."""
    if rows.size <= count:
        return rows
    optional = np.setdiff1d(rows, calib)
    order = np.argsort(np.abs(optional - n_lines // 2), kind="stable")
    keep = optional[order[: count - np.intersect1d(rows, calib).size]]
    return np.sort(np.concatenate([keep, np.intersect1d(rows, calib)]))


def _variable_density_weights(rows: np.ndarray, n_lines: int, sigma: float = 0.35, floor: float = 0.05) -> np.ndarray:
    # Gaussian in the normalised distance from the centre, with a floor so the periphery is never empty.
    distance = (rows - n_lines // 2) / (n_lines / 2.0)
    weights = np.exp(-0.5 * (distance / sigma) ** 2) + floor
    return weights / weights.sum()


def cartesian_frame_masks(
    n_frames: int,
    n_lines: int,
    acceleration: float,
    kind: str = "equidistant",
    calib_lines: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sampled phase-encode rows per frame: int32 [frames, lines_per_frame], sorted, unique per frame.

    * ``acceleration <= 1``: every row in every frame.
    * ``equidistant``: every R-th row with an offset that cycles frame to frame (f mod ceil(R)), united with
      ``calib_lines`` central rows. The union's size depends on how the offset meets the calibration
      block, so every frame keeps the size of the smallest union, dropping its outermost extra rows.
    * ``random``: the calibration rows plus rows drawn without replacement from a Gaussian variable-density
      law centred on the k-space centre, independently per frame from ``default_rng(seed)``.

    Both kinds sample the same number of rows per frame for the same (n_lines, acceleration, calib_lines),
    so they can be compared at equal scan time. ``calib_lines=None`` uses :func:`default_calib_lines`;
    pass 0 for none.
    """
    if n_frames < 1 or n_lines < 1:
        raise ValueError(f"need n_frames >= 1 and n_lines >= 1, got {n_frames} and {n_lines}")
    if not acceleration > 0:
        raise ValueError(f"acceleration must be positive, got {acceleration}")
    if kind not in ("equidistant", "random"):
        raise ValueError(f"unknown Cartesian mask kind {kind!r}; use 'equidistant' or 'random'")
    if acceleration <= 1.0:
        return np.tile(np.arange(n_lines, dtype=np.int32), (n_frames, 1))

    n_calib = default_calib_lines(n_lines, acceleration) if calib_lines is None else int(calib_lines)
    if not 0 <= n_calib <= n_lines:
        raise ValueError(f"calib_lines must be in [0, {n_lines}], got {calib_lines}")
    calib = _calib_block(n_lines, n_calib)

    period = int(np.ceil(acceleration))
    unions = [_equidistant_union(n_lines, acceleration, f, calib) for f in range(period)]
    count = min(u.size for u in unions)

    if kind == "equidistant":
        per_phase = [_keep_central(u, count, calib, n_lines) for u in unions]
        masks = [per_phase[f % period] for f in range(n_frames)]
    else:
        rng = np.random.default_rng(seed)
        candidates = np.setdiff1d(np.arange(n_lines), calib)
        weights = _variable_density_weights(candidates, n_lines)
        n_draw = count - calib.size
        masks = [
            np.sort(np.concatenate([calib, rng.choice(candidates, size=n_draw, replace=False, p=weights)]))
            for _ in range(n_frames)
        ]
    return np.stack(masks).astype(np.int32)


# --------------------------------------------------------------------------------------------------------
# Radial
# --------------------------------------------------------------------------------------------------------


def _clip_to_grid(k: np.ndarray, matrix: int) -> np.ndarray:
    """Float32 coordinates inside [-N/2, N/2): rounding to float32 may land exactly on +N/2."""
    upper = np.nextafter(np.float32(matrix / 2.0), np.float32(0.0))
    return np.clip(k.astype(np.float32), np.float32(-matrix / 2.0), upper)


def _spoke_positions(n_samples: int, matrix: int) -> np.ndarray:
    # Samples N / n_samples apart with sample n_samples // 2 exactly at k = 0: [-N/2, N/2) for even counts.
    return (np.arange(n_samples) - n_samples // 2) * (matrix / n_samples)


def radial_angles(n_spokes: int, golden: bool = True, start_index: int = 0) -> np.ndarray:
    """Spoke angles in radians: golden-angle steps (mod 2 pi) or ``pi / n_spokes`` steps (uniform over pi)."""
    index = np.arange(start_index, start_index + n_spokes, dtype=np.float64)
    step = GOLDEN_ANGLE_RAD if golden else np.pi / n_spokes
    return np.mod(index * step, 2.0 * np.pi)


def radial_trajectory(
    n_spokes: int, n_samples: int, matrix: int, golden: bool = True, start_index: int = 0
) -> np.ndarray:
    """Full-diameter spokes through the centre: float32 [spokes, samples, 2] as (kx, ky).

    Spoke ``i`` lies at angle ``(start_index + i) * 111.246 deg`` (golden) or ``(start_index + i) * pi /
    n_spokes`` (uniform). Sample ``n_samples // 2`` is the k-space centre.
    """
    if n_spokes < 1 or n_samples < 2 or matrix < 2:
        raise ValueError(f"need n_spokes >= 1, n_samples >= 2, matrix >= 2; got {n_spokes}, {n_samples}, {matrix}")
    theta = radial_angles(n_spokes, golden, start_index)
    r = _spoke_positions(n_samples, matrix)
    k = np.stack([np.cos(theta)[:, None] * r, np.sin(theta)[:, None] * r], axis=-1)
    return _clip_to_grid(k, matrix)


def mrf_radial_trajectory(n_frames: int, spokes_per_frame: int, n_samples: int, matrix: int) -> np.ndarray:
    """Golden-angle spokes continuing across frames: float32 [frames, spokes, samples, 2].

    Frame f holds spokes f * spokes_per_frame ... (f + 1) * spokes_per_frame - 1 of one golden-angle series,
    so any window of consecutive frames covers k-space near uniformly.
    """
    k = radial_trajectory(n_frames * spokes_per_frame, n_samples, matrix, golden=True)
    return k.reshape(n_frames, spokes_per_frame, n_samples, 2)


# --------------------------------------------------------------------------------------------------------
# Spiral
# --------------------------------------------------------------------------------------------------------


def _kmax(matrix: int) -> float:
    # Just inside N/2 so that no coordinate of any rotated arm reaches the +N/2 edge.
    return matrix / 2.0 * (1.0 - 1e-4)


def _spiral_angle(r: np.ndarray, n_interleaves: int, alpha: float, kmax: float) -> np.ndarray:
    """Polar angle theta(r) of the variable-density arm.

    With n_interleaves arms 2 pi / n apart, neighbouring arms are spaced radially by
    2 pi / n * dr/dtheta. We ask for a spacing of D(r) = 1 + (alpha - 1) (r / kmax)^2 cycles/FOV: Nyquist
    (1 / FOV) at the centre, alpha-fold coarser at the edge. dtheta/dr = 2 pi / (n D(r)) integrates to
    theta(r) = 2 pi / n * arctan(sqrt(c) r) / sqrt(c) with c = (alpha - 1) / kmax^2
    (Archimedean for alpha = 1).
    """
    c = (alpha - 1.0) / kmax**2
    if c == 0.0:
        return 2.0 * np.pi * r / n_interleaves
    return 2.0 * np.pi / n_interleaves * np.arctan(np.sqrt(c) * r) / np.sqrt(c)


def _spiral_arc_length(r: np.ndarray, theta: np.ndarray) -> np.ndarray:
    z = r * np.exp(1j * theta)
    return np.concatenate([[0.0], np.cumsum(np.abs(np.diff(z)))])


def spiral_interleaf(
    matrix: int,
    n_interleaves: int = 24,
    n_samples: int | None = None,
    oversampling: float = 1.0,
    alpha: float = 4.0,
) -> np.ndarray:
    """One variable-density spiral arm from k = 0 out to |k| just below N/2: float32 [samples, 2].

    ``n_interleaves`` is the number of arms (rotated 2 pi / n_interleaves apart) that together sample the
    k-space centre at Nyquist; ``alpha`` >= 1 is how much coarser the full set samples the edge (alpha = 1:
    uniform density, fully sampled everywhere). A single arm therefore undersamples the centre n_interleaves
    times and the edge n_interleaves * alpha times. Radial spacing law: see :func:`_spiral_angle`.

    Samples are equidistant in arc length, as in a gradient-amplitude-limited readout. Default
    ``n_samples`` puts them ``1 / oversampling`` cycles/FOV apart along the arm (oversampling = 1:
    Nyquist along the readout); an explicit ``n_samples`` overrides ``oversampling``. |k| is strictly
    increasing from exactly 0.
    """
    if matrix < 2 or n_interleaves < 1:
        raise ValueError(f"need matrix >= 2 and n_interleaves >= 1, got {matrix} and {n_interleaves}")
    if alpha < 1.0:
        raise ValueError(f"alpha must be >= 1 (1 = uniform density), got {alpha}")
    if not oversampling > 0:
        raise ValueError(f"oversampling must be positive, got {oversampling}")
    kmax = _kmax(matrix)
    # A fine radial grid for the arc-length integral: well below one cycle/FOV per step even at the edge.
    r_fine = np.linspace(0.0, kmax, 64 * matrix + 1)
    theta_fine = _spiral_angle(r_fine, n_interleaves, alpha, kmax)
    s_fine = _spiral_arc_length(r_fine, theta_fine)
    if n_samples is None:
        n_samples = int(np.ceil(s_fine[-1] * oversampling)) + 1
    if n_samples < 2:
        raise ValueError(f"a spiral arm needs at least 2 samples, got {n_samples}")
    r = np.interp(np.linspace(0.0, s_fine[-1], n_samples), s_fine, r_fine)
    theta = _spiral_angle(r, n_interleaves, alpha, kmax)
    k = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)
    return _clip_to_grid(k, matrix)


def _rotated_arms(arm: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Copies of one arm [samples, 2] rotated counter-clockwise by each angle: [angles, samples, 2]."""
    c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
    kx, ky = arm[None, :, 0].astype(np.float64), arm[None, :, 1].astype(np.float64)
    return np.stack([c * kx - s * ky, s * kx + c * ky], axis=-1)


def spiral_full(
    matrix: int,
    n_interleaves: int = 24,
    n_samples: int | None = None,
    oversampling: float = 1.0,
    alpha: float = 4.0,
) -> np.ndarray:
    """All arms: float32 [n_interleaves, samples, 2], arm i rotated by 2 pi i / n_interleaves."""
    arm = spiral_interleaf(matrix, n_interleaves, n_samples, oversampling, alpha)
    angles = 2.0 * np.pi * np.arange(n_interleaves) / n_interleaves
    return _clip_to_grid(_rotated_arms(arm, angles), matrix)


def mrf_spiral_trajectory(
    n_frames: int,
    matrix: int,
    n_interleaves: int = 24,
    n_samples: int | None = None,
    seed: int = 0,
    oversampling: float = 1.0,
    alpha: float = 4.0,
) -> np.ndarray:
    """One arm per frame, float32 [frames, 1, samples, 2] (Ma et al. 2013, Jiang et al. 2015 MRF).

    Frame f plays interleaf (f + start) mod n_interleaves, i.e. the arm rotated by
    2 pi (f + start) / n_interleaves, so consecutive frames differ by 2 pi / n_interleaves. ``start`` is
    ``seed mod n_interleaves``: seed 0 is the usual convention, other seeds start the cycle elsewhere
    (e.g. different slices or training examples).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    arm = spiral_interleaf(matrix, n_interleaves, n_samples, oversampling, alpha)
    index = (np.arange(n_frames) + seed) % n_interleaves
    angles = 2.0 * np.pi * index / n_interleaves
    return _clip_to_grid(_rotated_arms(arm, angles), matrix)[:, None]
