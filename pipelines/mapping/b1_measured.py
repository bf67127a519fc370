"""A measured B1+ map -- a B1 series of the same study, e.g. a saturation-prepared turbo-FLASH or an AFI -- on the
maps' grid, for matching T1 and T2 at a B1 that the fingerprints did not have to supply.

In FISP a voxel's T2 and B1 trade off along one valley, so what the reconstruction leaves in the coefficients moves
both. The smooth field of :mod:`pipelines.mapping.b1_field` takes that freedom away per voxel, but it is itself
estimated from the fingerprints and inherits their tissue-dependent bias (grey matter reads B1 +2 %, which costs
its T2 ~4 points; BENCHMARKS.md, "What the field costs"). A B1 measured by another sequence has no such bias.

Two steps, both here: :func:`b1_from_series` turns the stored values of a B1 series into relative B1 (1 = the
nominal flip angle) as a ``b1`` map with its geometry; :func:`resample_b1` puts it on another stack's voxels by
patient coordinates (linear in all three directions, NaN where the B1 series does not reach, so those voxels fall
back to the field).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipelines.map_kinds import quantitative_map
from pipelines.mapping.b1_field import smooth_field
from pipelines.types import Geometry, ImageStudy, QuantitativeMap

# Relative B1 outside this range is not a flip angle a body coil produces: background, vessels' inflow, a map's
# own failure (tfl_b1map reads 0 outside the body and saturates at 2x).
B1_PLAUSIBLE = (0.3, 2.0)
# The median over the covered voxels must read within this range of nominal, or `nominal` is the wrong unit.
B1_MEDIAN_PLAUSIBLE = (0.6, 1.5)
# Smoothing of a B1 series (sigma, mm): a simulated series of 4 mm voxels with 3 % noise gave 128² WM / GM T2
# 3.3 / 4.2 % unsmoothed, 2.0 / 3.1 % at 6 mm, 1.9 / 3.0 % at 10 mm (lesions of 8-12 voxels 6.6 % at 6 mm, 7.7 % at
# 10 mm; the true B1: 1.9 / 2.9 %); BENCHMARKS.md, "A measured B1 series in the job".
DEFAULT_SMOOTH_MM = 6.0
# Below this share of a voxel's interpolation weight on valid B1 voxels, the voxel gets no measured B1.
_MIN_WEIGHT = 0.5


def b1_from_series(study: ImageStudy, nominal: float, smooth_mm: float = 0.0) -> QuantitativeMap:
    """Relative B1 (stored value / ``nominal``) of a B1 map series: one image per slice, RescaleSlope /
    RescaleIntercept already applied by the reader, smoothed in-plane with a Gaussian of ``smooth_mm`` (sigma)
    over the measured voxels. ``nominal`` is the stored value of the nominal flip angle:
    100 for a map in percent, 800 for Siemens' tfl_b1map (ten times the flip angle of its nominal 80 degrees), 1
    for a ratio. Values outside :data:`B1_PLAUSIBLE` become NaN (no measured B1 there). ValueError when the series
    is not one image per slice or when its median says that ``nominal`` is in another unit."""
    if not nominal > 0:
        raise ValueError(f"nominal must be the stored value of the nominal flip angle (> 0), got {nominal}")
    if study.pixels.shape[0] != 1:
        raise ValueError(
            f"a B1 map series has one image per slice; this one has {study.pixels.shape[0]} per slice "
            "(a B1 map and its anatomical reference in one series? send the map alone)"
        )
    _check_geometry(study.geometry)
    rel = np.asarray(study.pixels[0], dtype=np.float32) / np.float32(nominal)
    ok = (rel >= B1_PLAUSIBLE[0]) & (rel <= B1_PLAUSIBLE[1])
    if ok.mean() < 0.01:
        raise ValueError(
            f"no voxel of the B1 series reads between {B1_PLAUSIBLE[0]} and {B1_PLAUSIBLE[1]} of nominal "
            f"(stored values up to {float(np.max(study.pixels)):g}; nominal {nominal:g}): is `nominal` right?"
        )
    median = float(np.median(rel[ok]))
    if not B1_MEDIAN_PLAUSIBLE[0] <= median <= B1_MEDIAN_PLAUSIBLE[1]:
        raise ValueError(
            f"the B1 series' median reads {median:.2f} of nominal (stored median {median * nominal:g}, nominal "
            f"{nominal:g}): set `nominal` to the stored value of the nominal flip angle (100 for percent, 800 for "
            "tfl_b1map)"
        )
    data = np.where(ok, rel, np.nan).astype(np.float32)
    if smooth_mm > 0:
        # B1+ varies over centimetres; a B1 scan's noise varies voxel to voxel. Normalised Gaussian smoothing over
        # the measured voxels only, in-plane, and air stays unmeasured.
        dy, dx = study.geometry.pixel_spacing_mm
        for s in range(data.shape[0]):
            data[s] = np.where(
                ok[s], smooth_field(data[s], ok[s].astype(np.float32), (smooth_mm / dy, smooth_mm / dx)), np.nan
            )
    return quantitative_map(
        "b1",
        data,
        study.geometry,
        mask=ok,
        notes=[
            f"measured B1+ of series {_printable(study.study.series_instance_uid) or '?'} "
            f"({_printable(study.study.series_description) or 'no description'}), stored value / {nominal:g}"
        ],
    )


def _printable(text: str, limit: int = 64) -> str:
    """A header string from the network as it may enter a note and a job's log: printable characters only (no
    line breaks to forge log lines with), at most ``limit`` of them (DICOM LO / UI are 64)."""
    return "".join(c if c.isprintable() else "?" for c in str(text or ""))[:limit]


def _check_geometry(g: Geometry) -> None:
    """A B1 series' geometry comes from the network: resampling divides by its spacing and inverts its axes."""
    spacing = np.asarray(g.pixel_spacing_mm, dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise ValueError(f"the B1 series' PixelSpacing {tuple(spacing)} is not two positive numbers")
    o = np.asarray(g.orientation, dtype=np.float64)
    row, col = o[:3], o[3:]
    if not (
        np.all(np.isfinite(o))
        and abs(np.linalg.norm(row) - 1) < 1e-2
        and abs(np.linalg.norm(col) - 1) < 1e-2
        and abs(float(row @ col)) < 1e-2
    ):
        raise ValueError(f"the B1 series' ImageOrientationPatient {tuple(o)} is not two orthogonal unit vectors")
    if not np.all(np.isfinite(np.asarray(g.positions, dtype=np.float64))):
        raise ValueError("the B1 series' ImagePositionPatient is not finite")


def _axes(g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    o = np.asarray(g.orientation, dtype=np.float64)
    row, col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def voxel_centres(g: Geometry) -> np.ndarray:
    """Patient coordinates (mm, LPS) of every voxel centre of ``g``, [slices, y, x, 3]."""
    row, col, _ = _axes(g)
    ny, nx = g.matrix
    dy, dx = g.pixel_spacing_mm
    i = np.arange(ny, dtype=np.float64)[:, None, None] * dy * col
    j = np.arange(nx, dtype=np.float64)[None, :, None] * dx * row
    pos = np.asarray(g.positions, dtype=np.float64).reshape(-1, 3)
    return pos[:, None, None, :] + (i + j)[None]


def resample_b1(b1: QuantitativeMap, target: Geometry) -> np.ndarray:
    """``b1`` (relative, NaN where unmeasured) on ``target``'s voxels, float32 [slices, y, x]; NaN where the B1
    series does not reach (beyond half a voxel or half a slice thickness of its edges) or where less than half of
    the interpolation weight falls on measured voxels. Linear in-plane and between slices (a B1 series' slices
    are thick and few; B1 varies over centimetres). ValueError when the two geometries name different frames of
    reference: the same coordinates would then be different places."""
    src = b1.geometry
    a, b = src.frame_of_reference_uid, target.frame_of_reference_uid
    if a and b and a != b:
        raise ValueError(
            f"the B1 series is in frame of reference {a}, the maps in {b}: the patient may have moved between "
            "them, so the B1 series is not used"
        )
    row, col, normal = _axes(src)
    pos = np.asarray(src.positions, dtype=np.float64).reshape(-1, 3)
    locations = pos @ normal
    order = np.argsort(locations)
    data, pos, locations = b1.data[order], pos[order], locations[order]
    p = voxel_centres(target).reshape(-1, 3)
    loc = p @ normal
    n_src = locations.size
    k = np.interp(loc, locations, np.arange(n_src, dtype=np.float64)) if n_src > 1 else np.zeros_like(loc)
    half = 0.5 * max(float(src.slice_thickness_mm), 1e-3)
    inside = (loc >= locations[0] - half) & (loc <= locations[-1] + half)
    # In-plane coordinates from the nearest source slice's origin (stacks whose slices shift in-plane stay right).
    near = np.clip(np.rint(k).astype(np.int64), 0, n_src - 1)
    d = p - pos[near]
    dy, dx = src.pixel_spacing_mm
    i, j = d @ col / dy, d @ row / dx
    ny, nx = src.matrix
    inside &= (i >= -0.5) & (i <= ny - 0.5) & (j >= -0.5) & (j <= nx - 0.5)
    valid = np.isfinite(data)
    coords = np.stack([k, i, j])
    weight = ndimage.map_coordinates(valid.astype(np.float64), coords, order=1, mode="nearest")
    total = ndimage.map_coordinates(np.where(valid, data, 0.0).astype(np.float64), coords, order=1, mode="nearest")
    ok = inside & (weight >= _MIN_WEIGHT)
    out = np.full(loc.shape, np.nan, np.float32)
    out[ok] = (total[ok] / weight[ok]).astype(np.float32)
    return out.reshape(target.n_slices, *target.matrix)
