"""k-space sampling patterns: Cartesian frame masks, radial and spiral trajectories."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sim.trajectories import (
    GOLDEN_ANGLE_RAD,
    cartesian_frame_masks,
    default_calib_lines,
    mrf_radial_trajectory,
    mrf_spiral_trajectory,
    radial_trajectory,
    spiral_full,
    spiral_interleaf,
)


def _inside_grid(k: np.ndarray, matrix: int) -> None:
    assert k.dtype == np.float32 and k.shape[-1] == 2
    assert np.all(k >= -matrix / 2) and np.all(k < matrix / 2)
    assert np.all(np.hypot(k[..., 0], k[..., 1]) <= matrix / 2)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angle difference folded into (-pi, pi]."""
    return np.angle(np.exp(1j * angle))


# ---------------------------------------------------------------------------------------------------------
# Cartesian
# ---------------------------------------------------------------------------------------------------------


def test_full_sampling_at_r1() -> None:
    for kind in ("equidistant", "random"):
        masks = cartesian_frame_masks(5, 96, 1.0, kind=kind)
        assert masks.shape == (5, 96) and masks.dtype == np.int32
        np.testing.assert_array_equal(masks, np.tile(np.arange(96), (5, 1)))


@pytest.mark.parametrize("kind", ["equidistant", "random"])
@pytest.mark.parametrize("n_lines,acceleration", [(128, 4), (96, 2), (100, 3.3), (64, 8), (127, 4)])
def test_masks_are_rectangular_sorted_unique(kind: str, n_lines: int, acceleration: float) -> None:
    masks = cartesian_frame_masks(9, n_lines, acceleration, kind=kind, seed=4)
    assert masks.dtype == np.int32 and masks.ndim == 2 and masks.shape[0] == 9
    calib = default_calib_lines(n_lines, acceleration)
    centre = n_lines // 2
    for rows in masks:
        assert np.all(np.diff(rows) > 0)  # sorted, hence unique
        assert rows.min() >= 0 and rows.max() < n_lines
        assert centre in rows
        # The whole calibration block is always there.
        block = np.arange(centre - calib // 2, centre - calib // 2 + calib)
        assert np.all(np.isin(block, rows))
    # About n/R lines plus the calibration block (minus the overlap between the two).
    per_frame = masks.shape[1]
    assert n_lines / acceleration - 1 <= per_frame <= n_lines / acceleration + calib + 1


def test_equidistant_r4_pattern() -> None:
    n_lines, r = 128, 4
    masks = cartesian_frame_masks(8, n_lines, r, kind="equidistant")
    calib = default_calib_lines(n_lines, r)
    assert calib == round(0.08 * n_lines)
    assert abs(masks.shape[1] - (n_lines / r + calib)) <= calib  # ~ ny/4 + calib lines
    assert 64 in masks[0]
    centre_block = set(range(64 - calib // 2, 64 - calib // 2 + calib))
    for f, rows in enumerate(masks):
        outside = np.array(sorted(set(rows.tolist()) - centre_block))
        # Outside the calibration block: every 4th row, offset f mod 4.
        assert np.all(outside % r == f % r), f
        assert np.all(np.diff(outside[outside < 64 - calib // 2]) == r)
    # The offset cycles with period R: frames f and f + R are identical, neighbours differ.
    np.testing.assert_array_equal(masks[0], masks[4])
    assert not np.array_equal(masks[0], masks[1])
    # Over one period nearly every row is sampled (only the outermost rows trimmed to equalise counts).
    assert np.unique(masks[:4]).size >= n_lines - r


def test_equidistant_without_calibration_is_plain_every_rth_line() -> None:
    masks = cartesian_frame_masks(4, 64, 4, kind="equidistant", calib_lines=0)
    assert masks.shape == (4, 16)
    for f in range(4):
        np.testing.assert_array_equal(masks[f], np.arange(f, 64, 4))
    assert set(np.concatenate(masks).tolist()) == set(range(64))


def test_random_masks_are_seeded_and_vary_per_frame() -> None:
    a = cartesian_frame_masks(6, 128, 4, kind="random", seed=7)
    b = cartesian_frame_masks(6, 128, 4, kind="random", seed=7)
    c = cartesian_frame_masks(6, 128, 4, kind="random", seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(rows) for rows in a}) == 6
    # Same scan time as the equidistant mask.
    assert a.shape == cartesian_frame_masks(6, 128, 4, kind="equidistant").shape
    # Variable density: the central half of k-space is sampled more densely than the outer half.
    counts = np.bincount(a.ravel(), minlength=128)
    centre_density = counts[32:96].mean()
    outer_density = np.concatenate([counts[:32], counts[96:]]).mean()
    assert centre_density > 1.5 * outer_density > 0


def test_cartesian_validation() -> None:
    with pytest.raises(ValueError):
        cartesian_frame_masks(2, 64, 4, kind="poisson")
    with pytest.raises(ValueError):
        cartesian_frame_masks(2, 64, 4, calib_lines=65)
    with pytest.raises(ValueError):
        cartesian_frame_masks(0, 64, 4)


# ---------------------------------------------------------------------------------------------------------
# Radial
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix,n_samples", [(64, 128), (128, 256), (96, 95)])
def test_radial_spokes_cross_the_centre_and_reach_the_edge(matrix: int, n_samples: int) -> None:
    k = radial_trajectory(13, n_samples, matrix)
    assert k.shape == (13, n_samples, 2)
    _inside_grid(k, matrix)
    np.testing.assert_array_equal(k[:, n_samples // 2], 0.0)
    radius = np.hypot(k[..., 0], k[..., 1])
    assert np.all(radius.max(axis=1) >= matrix / 2 - matrix / n_samples - 1e-4)
    # Straight lines through the origin: every sample is parallel to the spoke direction.
    direction = k[:, -1] / np.linalg.norm(k[:, -1], axis=-1, keepdims=True)
    cross = k[..., 0] * direction[:, None, 1] - k[..., 1] * direction[:, None, 0]
    assert np.abs(cross).max() < 1e-4 * matrix


def test_golden_angle_increments() -> None:
    assert np.rad2deg(GOLDEN_ANGLE_RAD) == pytest.approx(111.24611797498108, abs=1e-10)
    k = radial_trajectory(50, 64, 64, golden=True)
    angles = np.arctan2(k[:, -1, 1], k[:, -1, 0]).astype(np.float64)
    np.testing.assert_allclose(_wrap(np.diff(angles) - GOLDEN_ANGLE_RAD), 0.0, atol=1e-5)
    assert angles[0] == 0.0
    # start_index continues the same series.
    np.testing.assert_allclose(radial_trajectory(10, 64, 64, start_index=40), k[40:], atol=1e-5)


def test_uniform_angles_cover_pi() -> None:
    k = radial_trajectory(16, 64, 64, golden=False)
    angles = np.arctan2(k[:, -1, 1], k[:, -1, 0]).astype(np.float64)
    np.testing.assert_allclose(_wrap(np.diff(angles) - np.pi / 16), 0.0, atol=1e-5)


def test_mrf_radial_continues_golden_angle_across_frames() -> None:
    k = mrf_radial_trajectory(5, 3, 128, 64)
    assert k.shape == (5, 3, 128, 2) and k.dtype == np.float32
    np.testing.assert_array_equal(k.reshape(15, 128, 2), radial_trajectory(15, 128, 64, golden=True))
    first = np.arctan2(k[1, 0, -1, 1], k[1, 0, -1, 0])
    last = np.arctan2(k[0, 2, -1, 1], k[0, 2, -1, 0])
    assert _wrap(first - last - GOLDEN_ANGLE_RAD) == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Spiral
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix", [32, 64, 128, 256])
@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_spiral_arm_runs_from_centre_to_edge(matrix: int, alpha: float) -> None:
    k = spiral_interleaf(matrix, n_interleaves=24, alpha=alpha)
    assert k.ndim == 2 and k.shape[1] == 2
    _inside_grid(k, matrix)
    radius = np.hypot(k[:, 0].astype(np.float64), k[:, 1].astype(np.float64))
    assert radius[0] == 0.0
    assert np.all(np.diff(radius) > 0)
    assert radius[-1] > 0.95 * matrix / 2 and radius.max() < matrix / 2
    # Default sampling: Nyquist along the readout (1 cycle/FOV between samples, equal arc lengths).
    steps = np.linalg.norm(np.diff(k.astype(np.float64), axis=0), axis=-1)
    assert steps.max() <= 1.0 + 1e-3 and steps.min() > 0.9 * steps.max()


def test_spiral_sample_count_and_oversampling() -> None:
    k = spiral_interleaf(64, n_samples=500)
    assert k.shape == (500, 2)
    default = spiral_interleaf(64)
    doubled = spiral_interleaf(64, oversampling=2.0)
    assert abs(doubled.shape[0] - 2 * default.shape[0]) <= 2


def _radial_step_per_turn(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dr/dtheta * 2 pi along the arm: the radius gained by one full turn."""
    kk = k.astype(np.float64)
    radius = np.hypot(kk[:, 0], kk[:, 1])
    theta = np.unwrap(np.arctan2(kk[:, 1], kk[:, 0]))
    return 2 * np.pi * np.diff(radius) / np.diff(theta), radius[1:]


@pytest.mark.parametrize("n_interleaves", [8, 24])
def test_spiral_density_nyquist_at_centre(n_interleaves: int) -> None:
    matrix = 128
    # alpha = 1: Archimedean, arms 1 cycle/FOV apart everywhere when all interleaves are played.
    per_turn, _ = _radial_step_per_turn(spiral_interleaf(matrix, n_interleaves, alpha=1.0, oversampling=4))
    np.testing.assert_allclose(per_turn[5:] / n_interleaves, 1.0, rtol=2e-2)
    # alpha = 4: Nyquist at the centre, 4x coarser at the edge.
    arm = spiral_interleaf(matrix, n_interleaves, alpha=4.0, oversampling=4)
    per_turn, radius = _radial_step_per_turn(arm)
    spacing = per_turn / n_interleaves
    centre = radius < 0.1 * matrix / 2
    assert np.all(np.abs(spacing[centre][3:] - 1.0) < 0.05)
    assert spacing[-5:].mean() == pytest.approx(4.0, rel=0.03)


def test_spiral_full_rotates_arms_evenly() -> None:
    n = 12
    full = spiral_full(64, n)
    arm = spiral_interleaf(64, n)
    assert full.shape == (n, *arm.shape) and full.dtype == np.float32
    _inside_grid(full, 64)
    np.testing.assert_allclose(full[0], arm, atol=1e-5)
    tip = full[:, -1].astype(np.float64)
    angles = np.arctan2(tip[:, 1], tip[:, 0])
    np.testing.assert_allclose(_wrap(np.diff(angles) - 2 * np.pi / n), 0.0, atol=1e-5)
    radius = np.hypot(full[..., 0], full[..., 1])
    np.testing.assert_allclose(radius, radius[:1].repeat(n, axis=0), atol=1e-4)


def test_mrf_spiral_rotates_one_interleaf_per_frame() -> None:
    n_interleaves, n_frames = 24, 30
    k = mrf_spiral_trajectory(n_frames, 64, n_interleaves=n_interleaves)
    arm = spiral_interleaf(64, n_interleaves)
    assert k.shape == (n_frames, 1, arm.shape[0], 2) and k.dtype == np.float32
    _inside_grid(k, 64)
    kk = k[:, 0].astype(np.float64)
    angles = np.arctan2(kk[:, -1, 1], kk[:, -1, 0])
    np.testing.assert_allclose(_wrap(np.diff(angles) - 2 * np.pi / n_interleaves), 0.0, atol=1e-5)
    # Frame f plays interleaf f mod n: the pattern repeats after n_interleaves frames.
    np.testing.assert_allclose(k[n_interleaves], k[0], atol=1e-5)
    np.testing.assert_allclose(k[:, 0], spiral_full(64, n_interleaves)[np.arange(n_frames) % n_interleaves],
                               atol=1e-5)
    # The seed only moves the start of the cycle.
    shifted = mrf_spiral_trajectory(n_frames, 64, n_interleaves=n_interleaves, seed=5)
    np.testing.assert_allclose(shifted[0], k[5], atol=1e-5)
    custom = mrf_spiral_trajectory(3, 64, n_interleaves=n_interleaves, n_samples=321)
    assert custom.shape == (3, 1, 321, 2)
