"""Receive-coil sensitivities for the scanner simulator.

The model is the 2D birdcage of ``sigpy.mri.birdcage_maps`` (coils on a ring, magnitude falling as 1/distance,
a phase that winds around each coil), written out here because sigpy divides every pixel by the
root-sum-of-squares (RSS): that removes the receive shading real arrays have (bright periphery, darker
centre), which reconstructions must cope with. Here the maps are scaled by one global factor instead.

Normalisation: the RSS over coils equals 1 at the centre pixel ``(ny // 2, nx // 2)`` (the pixel the
centred DFT treats as the origin). Elsewhere the RSS varies smoothly, rising towards the coils.
"""

from __future__ import annotations

import numpy as np

__all__ = ["birdcage_maps"]

# Keeps a coil that sits inside the field-of-view corners (radius < sqrt(2)) from producing a singularity.
_MIN_DISTANCE = 0.05
# Through-plane phase gradient of each coil's sensitivity (rad per unit of z, times the cosine of its ring angle).
_Z_PHASE_RAD = 2.0


def birdcage_maps(
    n_coils: int, matrix: tuple[int, int], radius: float = 1.5, seed: int | None = None, z: float = 0.0
) -> np.ndarray:
    """Complex64 [coils, y, x] birdcage-like sensitivities, RSS = 1 at the centre pixel.

    ``radius`` is the ring radius relative to half the field of view along each axis (coordinates run
    over [-1, 1) in x and y, as in sigpy). ``seed`` jitters the ring rotation, each coil's angle, distance,
    gain and phase (a less ideal array); ``None`` gives the ideal, symmetric ring. ``n_coils = 1`` is a
    uniform body-coil receive: all ones.

    ``z`` is the slice's distance from the plane of the ring (same units as x and y): the distance to each coil
    includes it, so the sensitivities of a stack of slices differ and fall off away from the ring, and each coil's
    phase drifts through the plane; the maps stay normalised to RSS = 1 at the centre pixel of the ring's plane
    (z = 0), not of this slice. z = 0 gives exactly the 2D maps.
    """
    ny, nx = (int(matrix[0]), int(matrix[1]))
    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    if ny < 1 or nx < 1:
        raise ValueError(f"coil map matrix must be positive, got {matrix}")
    if radius <= 1.0:
        raise ValueError(f"coil ring radius {radius} must be > 1 (the coils sit outside the object)")
    if n_coils == 1:
        return np.ones((1, ny, nx), dtype=np.complex64)

    angles, radii, gains, phases = _ring_layout(n_coils, radius, seed)
    y = (np.arange(ny) - ny / 2.0) / (ny / 2.0)
    x = (np.arange(nx) - nx / 2.0) / (nx / 2.0)
    yy, xx = np.meshgrid(y, x, indexing="ij")

    maps = np.empty((n_coils, ny, nx), dtype=np.complex128)
    in_plane_centre = np.empty(n_coils)  # |sensitivity| at the centre pixel of the ring's plane
    for c in range(n_coils):
        dx = xx - radii[c] * np.cos(angles[c])
        dy = yy - radii[c] * np.sin(angles[c])
        distance = np.maximum(np.hypot(dx, dy), _MIN_DISTANCE)
        in_plane_centre[c] = gains[c] / distance[ny // 2, nx // 2]
        if z != 0.0:
            distance = np.maximum(np.sqrt(dx * dx + dy * dy + z * z), _MIN_DISTANCE)
        # Same phase convention as sigpy: winds around the coil and advances by 2 pi / n_coils per coil.
        phase = np.arctan2(dx, -dy) - c * (2.0 * np.pi / n_coils) + phases[c]
        if z != 0.0:
            # The receive phase also changes through the plane, differently per coil (a symmetric ring would
            # otherwise give slices at +z and -z identical maps).
            phase = phase + _Z_PHASE_RAD * z * np.cos(angles[c])
        maps[c] = gains[c] / distance * np.exp(1j * phase)

    if z == 0.0:
        rss_centre = np.sqrt(np.sum(np.abs(maps[:, ny // 2, nx // 2]) ** 2))
    else:
        rss_centre = np.sqrt(np.sum(in_plane_centre**2))
    return (maps / rss_centre).astype(np.complex64)


def _ring_layout(
    n_coils: int, radius: float, seed: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Angle, distance, gain and extra phase of each coil; jittered when a seed is given."""
    angles = np.arange(n_coils) * (2.0 * np.pi / n_coils)
    radii = np.full(n_coils, float(radius))
    gains = np.ones(n_coils)
    phases = np.zeros(n_coils)
    if seed is None:
        return angles, radii, gains, phases
    rng = np.random.default_rng(seed)
    spacing = 2.0 * np.pi / n_coils
    angles = angles + rng.uniform(0.0, spacing) + rng.uniform(-0.1, 0.1, n_coils) * spacing
    # Never pull a coil inside the object (radius 1).
    radii = np.maximum(radii * rng.uniform(0.95, 1.05, n_coils), 1.0 + _MIN_DISTANCE)
    gains = rng.uniform(0.85, 1.15, n_coils)
    phases = rng.uniform(-np.pi, np.pi, n_coils)
    return angles, radii, gains, phases
