"""Numerical 2D phantoms for the scanner simulator: a head ("brain") and a thigh ("thigh").

Every phantom carries two-compartment (water / fat) tissue properties per voxel, plus smooth B1 and
off-resonance fields, so that the EPG water/fat model can simulate fingerprints and the mapping code can be
scored against known truth.

Geometry
    Shapes are defined in continuous normalised coordinates and rasterised by point-sampling the pixel
    centres, so an anatomy looks the same (and ROI area fractions agree) at any matrix size. Pixels are
    assumed square; the unit length is half the *shorter* side of the matrix, so the object always fits and a
    non-square matrix only adds background along its longer side. ``y`` grows downwards (image rows); for
    the head, anterior is at the top.

Tissue values
    Literature relaxation times of the water pool and of fat at 1.5 T and 3 T (see ``_WATER_T1_T2_MS`` and
    ``_FAT_T1_T2_MS`` for the sources). Other field strengths raise ``ValueError``: scanners report e.g.
    2.89 T for a nominal 3 T system, so a field within ``_FIELD_TOLERANCE_T`` of a tabulated one uses that
    table, and anything else is refused rather than silently extrapolated.

Randomisation (training data)
    ``randomize=True`` rotates the anatomy by any angle, scales it by -12..+4 % per axis, shifts it a little,
    resizes the ventricles (x0.8..1.4), perturbs every tissue's water T1/T2 and PD by up to +-12 % and the fat
    T1/T2 (one draw for all fat) likewise, moves each FF by +-15 % relative and +-0.02 absolute, adds a faint
    (+-4 %) smooth texture to the water T1/T2 inside tissues, and draws new smooth B1 and off-resonance
    fields. The same seed gives the same phantom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Phantom", "Tissue", "make_phantom", "supported_field_strengths", "tissue_table"]

# --------------------------------------------------------------------------------------------------------
# Literature values
# --------------------------------------------------------------------------------------------------------

# Water-pool (T1, T2) in ms per nominal field strength.
# * white matter, grey matter, skeletal muscle: Stanisz GJ et al., "T1, T2 relaxation and magnetization
#   transfer in tissue at 3T", MRM 2005;54:507-512 (their table gives 1.5 T and 3 T side by side; one source
#   for both fields keeps the 1.5 T -> 3 T change consistent).
# * CSF T1 ~4.3 s and essentially field independent: Rooney WD et al., "Magnetic field and tissue dependencies
#   of human brain longitudinal 1H2O relaxation in vivo", MRM 2007;57:308-318. CSF T2 2000 ms is a
#   representative value; in vivo reports scatter between ~1.5 and ~2.5 s depending on the method.
# * lesion: an illustrative chronic MS-like lesion, T1 = 1.4 x and T2 = 1.6 x white matter, i.e. in the
#   range by which lesions prolong relaxation relative to normal-appearing white matter. Not from one source.
_LESION_T1_RATIO = 1.4
_LESION_T2_RATIO = 1.6
_WATER_T1_T2_MS: dict[float, dict[str, tuple[float, float]]] = {
    1.5: {
        "white_matter": (884.0, 72.0),
        "grey_matter": (1124.0, 95.0),
        "muscle": (1008.0, 44.0),
        "csf": (4300.0, 2000.0),
    },
    3.0: {
        "white_matter": (1084.0, 69.0),
        "grey_matter": (1820.0, 99.0),
        "muscle": (1412.0, 50.0),
        "csf": (4300.0, 2000.0),
    },
}
for _table in _WATER_T1_T2_MS.values():
    _wm_t1, _wm_t2 = _table["white_matter"]
    _table["lesion"] = (round(_LESION_T1_RATIO * _wm_t1), round(_LESION_T2_RATIO * _wm_t2))

# Fat (T1, T2) in ms: subcutaneous fat, Gold GE et al., "Musculoskeletal MRI at 3.0 T: relaxation times and
# image contrast", AJR 2004;183:343-351 (1.5 T and 3 T). One fat species serves all fatty tissues (scalp,
# subcutaneous and intermuscular fat, marrow, infiltrated muscle): the T1-FF model fits a single T1_fat, as in
# Marty & Carlier, MRM 2019;83:621-634. Values sit inside the 200-400 ms T1_fat range of that sequence.
_FAT_T1_T2_MS: dict[float, tuple[float, float]] = {1.5: (343.0, 58.0), 3.0: (382.0, 68.0)}

# A scanner may report the exact field (2.89 T for a nominal 3 T magnet, 1.494 T for 1.5 T).
_FIELD_TOLERANCE_T = 0.15

# Water-pool relaxation used for the small water fraction of fatty tissues (scalp, subcutaneous fat,
# marrow). Its true value is poorly defined; with FF >= 0.9 it barely contributes to the signal.
_FATTY_TISSUE_WATER = "muscle"

# Proton densities (a.u., water = 1): typical relative water contents (WM ~0.7, GM ~0.8, CSF 1.0) and ~0.9
# for adipose tissue. Muscle PD is mixed with the fat PD according to its FF.
_PD_WATER_TISSUE = {"white_matter": 0.69, "grey_matter": 0.80, "csf": 1.0, "lesion": 0.78, "muscle": 0.75}
_PD_FAT = 0.90

# Muscle fat fractions of the canonical thigh: a graded infiltration as in a myopathy that spares the
# quadriceps and involves the adductors and hamstrings (e.g. Becker / limb-girdle patterns).
_MUSCLE_FF = {
    "rectus_femoris": 0.02,
    "vastus_lateralis": 0.04,
    "vastus_intermedius": 0.06,
    "vastus_medialis": 0.10,
    "sartorius": 0.15,
    "gracilis": 0.20,
    "biceps_femoris": 0.25,
    "semitendinosus": 0.35,
    "semimembranosus": 0.45,
    "adductor_magnus": 0.65,
}


def supported_field_strengths() -> tuple[float, ...]:
    return tuple(sorted(_WATER_T1_T2_MS))


def _nominal_field(field_strength_T: float) -> float:
    nominal = min(_WATER_T1_T2_MS, key=lambda b0: abs(b0 - field_strength_T))
    if abs(nominal - field_strength_T) > _FIELD_TOLERANCE_T:
        supported = ", ".join(f"{b0:g} T" for b0 in supported_field_strengths())
        raise ValueError(
            f"field strength {field_strength_T:g} T has no tissue table; supported: {supported} "
            f"(+-{_FIELD_TOLERANCE_T:g} T). Pick one of those for the phantom."
        )
    return nominal


# --------------------------------------------------------------------------------------------------------
# Tissues
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    """Properties of one labelled region. PD = 0 marks a signal void (cortical bone, skull)."""

    name: str
    t1_water_ms: float
    t2_water_ms: float
    t1_fat_ms: float
    t2_fat_ms: float
    ff: float
    pd: float


def tissue_table(field_strength_T: float) -> dict[str, Tissue]:
    """Every tissue both phantoms use, with canonical values at ``field_strength_T``."""
    b0 = _nominal_field(field_strength_T)
    water = _WATER_T1_T2_MS[b0]
    t1f, t2f = _FAT_T1_T2_MS[b0]

    def water_tissue(name: str, water_name: str | None = None) -> Tissue:
        key = water_name or name
        t1, t2 = water[key]
        return Tissue(name, t1, t2, t1f, t2f, ff=0.0, pd=_PD_WATER_TISSUE[key])

    def fatty_tissue(name: str, ff: float) -> Tissue:
        t1, t2 = water[_FATTY_TISSUE_WATER]
        return Tissue(name, t1, t2, t1f, t2f, ff=ff, pd=_PD_FAT)

    def muscle(name: str) -> Tissue:
        t1, t2 = water["muscle"]
        ff = _MUSCLE_FF[name]
        pd = (1.0 - ff) * _PD_WATER_TISSUE["muscle"] + ff * _PD_FAT
        return Tissue(name, t1, t2, t1f, t2f, ff=ff, pd=pd)

    def void(name: str) -> Tissue:
        # Cortical bone: T2* well below a millisecond, invisible at MRF echo times -> no signal, no truth.
        return Tissue(name, 0.0, 0.0, 0.0, 0.0, ff=0.0, pd=0.0)

    tissues = [
        fatty_tissue("scalp", ff=0.95),
        void("skull"),
        water_tissue("csf"),
        water_tissue("grey_matter"),
        water_tissue("white_matter"),
        water_tissue("lateral_ventricle_left", "csf"),
        water_tissue("lateral_ventricle_right", "csf"),
        water_tissue("lesion"),
        fatty_tissue("subcutaneous_fat", ff=0.92),
        fatty_tissue("intermuscular_fat", ff=0.90),
        void("cortical_bone"),
        fatty_tissue("bone_marrow", ff=0.90),
        *(muscle(name) for name in _MUSCLE_FF),
    ]
    return {t.name: t for t in tissues}


# --------------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """A 2D two-compartment phantom. All maps are float32 [y, x] in real units; labels int16.

    Tissue maps are zero in the background and in signal voids (PD = 0). ``t1_fat_ms`` / ``t2_fat_ms`` carry
    the fat values everywhere inside the object, also where FF = 0, so a simulator can always evaluate the
    fat compartment. ``b1`` and ``df_hz`` are smooth fields defined over the whole field of view.
    """

    name: str
    t1_water_ms: np.ndarray
    t2_water_ms: np.ndarray
    t1_fat_ms: np.ndarray
    t2_fat_ms: np.ndarray
    ff: np.ndarray
    pd: np.ndarray
    b1: np.ndarray
    df_hz: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    field_strength_T: float
    tissues: dict[int, Tissue] = field(default_factory=dict)  # label id -> tissue values used (pre-texture)

    @property
    def matrix(self) -> tuple[int, int]:
        return (int(self.pd.shape[0]), int(self.pd.shape[1]))

    @property
    def mask(self) -> np.ndarray:
        return self.pd > 0

    def apparent_t1_ms(self) -> np.ndarray:
        """Single-compartment T1 truth: the water T1 where FF < 0.5, the fat T1 where fat dominates.

        A one-pool T1 map of a fatty voxel is dominated by the majority pool, so the reference for such maps
        is the majority pool's value; FF >= 0.5 counts as fat.
        """
        return _majority_pool(self.ff, self.t1_water_ms, self.t1_fat_ms, self.mask)

    def apparent_t2_ms(self) -> np.ndarray:
        """Single-compartment T2 truth (same rule as :meth:`apparent_t1_ms`)."""
        return _majority_pool(self.ff, self.t2_water_ms, self.t2_fat_ms, self.mask)

    def truth(self) -> dict[str, np.ndarray]:
        """Reference maps in real units (float32; ``labels`` stays int16 because ids are not quantities)."""
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        return {
            "t1_ms": f32(self.apparent_t1_ms()),
            "t2_ms": f32(self.apparent_t2_ms()),
            "t1_water_ms": f32(self.t1_water_ms),
            "t2_water_ms": f32(self.t2_water_ms),
            "t1_fat_ms": f32(self.t1_fat_ms),
            "t2_fat_ms": f32(self.t2_fat_ms),
            "ff_percent": f32(self.ff * 100.0),
            "pd": f32(self.pd),
            "b1": f32(self.b1),
            "df_hz": f32(self.df_hz),
            "labels": self.labels.astype(np.int16, copy=True),
        }


def _majority_pool(ff: np.ndarray, water: np.ndarray, fat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.where(ff < 0.5, water, fat)
    return np.where(mask, out, 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Shape primitives (normalised coordinates)
# --------------------------------------------------------------------------------------------------------

Grid = tuple[np.ndarray, np.ndarray]  # (x, y) coordinates of the pixel centres in object space


def _pixel_grid(shape: tuple[int, int]) -> Grid:
    ny, nx = shape
    half = min(ny, nx) / 2.0
    y = (np.arange(ny, dtype=np.float64) - (ny - 1) / 2.0) / half
    x = (np.arange(nx, dtype=np.float64) - (nx - 1) / 2.0) / half
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return xx, yy


def _ellipse(
    grid: Grid,
    centre: tuple[float, float],
    semi_axes: tuple[float, float],
    angle_deg: float = 0.0,
    wobble: tuple[float, int, float] | None = None,
) -> np.ndarray:
    """Inside of a (rotated) ellipse; ``wobble`` = (relative amplitude, lobes, phase) bends its boundary
    into a star shape, which gives gyri on the white-matter border and irregular fasciae."""
    x, y = grid
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    dx, dy = x - centre[0], y - centre[1]
    u = (c * dx + s * dy) / semi_axes[0]
    v = (-s * dx + c * dy) / semi_axes[1]
    rho = np.hypot(u, v)
    if wobble is None:
        return rho <= 1.0
    amplitude, lobes, phase = wobble
    return rho <= 1.0 + amplitude * np.cos(lobes * np.arctan2(v, u) + phase)


def _angular_sector(grid: Grid, centre: tuple[float, float], start_deg: float, stop_deg: float) -> np.ndarray:
    """Pixels whose polar angle about ``centre`` lies in [start, stop) (degrees, wrapping allowed)."""
    x, y = grid
    phi = np.rad2deg(np.arctan2(y - centre[1], x - centre[0]))
    return np.mod(phi - start_deg, 360.0) < np.mod(stop_deg - start_deg, 360.0)


def _ray_band(grid: Grid, centre: tuple[float, float], angle_deg: float, half_width: float) -> np.ndarray:
    """A thin band along a ray from ``centre``: the fascia between two neighbouring muscle sectors."""
    x, y = grid
    ux, uy = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    dx, dy = x - centre[0], y - centre[1]
    along = dx * ux + dy * uy
    across = np.abs(dx * uy - dy * ux)
    return (along > 0) & (across <= half_width)


@dataclass
class _Painter:
    """Paints regions in order onto a label image; later regions overwrite earlier ones."""

    grid: Grid
    ids: dict[str, int] = field(default_factory=dict)
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.zeros(self.grid[0].shape, dtype=np.int16)

    def paint(self, name: str, region: np.ndarray) -> None:
        if name not in self.ids:
            self.ids[name] = len(self.ids) + 1
        self.labels[region] = self.ids[name]


# --------------------------------------------------------------------------------------------------------
# Anatomies
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AnatomyOptions:
    pixel_size: float  # normalised units per pixel; thin structures keep at least one pixel
    ventricle_scale: float = 1.0  # > 1 mimics atrophy in randomised heads
    z: float = 0.0  # slice position along the slice normal (normalised units, + = superior / proximal)


def _z_scale(z: float, centre: float, half: float) -> float:
    """In-plane size of an ellipsoid's cross-section at ``z`` relative to its cross-section at z = 0.

    The ellipsoid spans ``centre +- half`` along the slice normal; 0 where the slice misses it. z = 0 returns
    exactly 1 so that the canonical (single-slice) phantom is unchanged to the last bit. For an ellipsoid that
    z = 0 misses, the size is relative to its widest (central) section instead.
    """
    if z == 0.0:
        return 1.0

    def radius(zz: float) -> float:
        return float(np.sqrt(max(0.0, 1.0 - ((zz - centre) / half) ** 2)))

    at_zero = radius(0.0)
    return radius(z) / at_zero if at_zero > 0 else radius(z)


def _section(
    g: Grid,
    z: float,
    z_extent: tuple[float, float],
    centre: tuple[float, float],
    semi_axes: tuple[float, float],
    angle_deg: float = 0.0,
    wobble: tuple[float, int, float] | None = None,
) -> np.ndarray:
    """The cross-section at ``z`` of an ellipsoid whose z = 0 section (or, if z = 0 misses it, its central
    section) is the given 2D ellipse; empty where the slice misses it."""
    s = _z_scale(z, *z_extent)
    if s <= 0.0:
        return np.zeros(g[0].shape, dtype=bool)
    if s != 1.0:
        semi_axes = (semi_axes[0] * s, semi_axes[1] * s)
    return _ellipse(g, centre, semi_axes, angle_deg, wobble)


# Extent of the head's structures along the slice normal, as (centre, half length) in normalised units (one
# unit = half the FOV, 120 mm at the default 240 mm). The canonical slice (z = 0) passes through the lateral
# ventricles; the head reaches ~70 mm above it (vertex) and further below (skull base), the ventricles about
# +-17 mm, the canonical lesion +-6 mm, and a second lesion sits ~20 mm above the canonical slice, so a stack of
# slices shows a shrinking head towards the vertex, ventricles that grow and vanish, and lesions in some slices only.
_BRAIN_Z = {
    "scalp": (-0.15, 0.73),
    "skull": (-0.15, 0.67),
    "csf": (-0.15, 0.64),
    "grey_matter": (-0.15, 0.615),
    "white_matter": (-0.12, 0.50),
    "ventricles": (0.02, 0.14),
    "lesion": (0.0, 0.05),
    "lesion_superior": (0.17, 0.055),
}


def _paint_brain(painter: _Painter, opts: _AnatomyOptions) -> None:
    g, z = painter.grid, opts.z
    painter.paint("scalp", _section(g, z, _BRAIN_Z["scalp"], (0.0, 0.0), (0.74, 0.92)))
    painter.paint("skull", _section(g, z, _BRAIN_Z["skull"], (0.0, 0.0), (0.68, 0.86)))
    painter.paint("csf", _section(g, z, _BRAIN_Z["csf"], (0.0, 0.0), (0.645, 0.825)))
    painter.paint(
        "grey_matter", _section(g, z, _BRAIN_Z["grey_matter"], (0.0, 0.0), (0.62, 0.80), wobble=(0.015, 13, 0.4))
    )
    painter.paint(
        "white_matter", _section(g, z, _BRAIN_Z["white_matter"], (0.0, 0.01), (0.50, 0.67), wobble=(0.05, 9, 0.0))
    )
    vs = opts.ventricle_scale
    # Painted (possibly empty) in every slice, so label ids are the same in every slice of a stack.
    painter.paint(
        "lateral_ventricle_left",
        _section(g, z, _BRAIN_Z["ventricles"], (-0.11, -0.06), (0.065 * vs, 0.24 * vs), angle_deg=-12.0),
    )
    painter.paint(
        "lateral_ventricle_right",
        _section(g, z, _BRAIN_Z["ventricles"], (0.11, -0.06), (0.065 * vs, 0.24 * vs), angle_deg=12.0),
    )
    painter.paint("lesion", _section(g, z, _BRAIN_Z["lesion"], (0.30, -0.30), (0.06, 0.048), angle_deg=30.0))
    if z != 0.0:  # absent from the canonical slice
        painter.paint(
            "lesion", _section(g, z, _BRAIN_Z["lesion_superior"], (-0.22, 0.18), (0.07, 0.055), angle_deg=-20.0)
        )


# Muscle sectors about the femur (degrees; 0 = image right, 90 = down/posterior, -90 = up/anterior).
_THIGH_SECTORS: tuple[tuple[str, float, float], ...] = (
    ("vastus_lateralis", -60.0, 20.0),
    ("biceps_femoris", 20.0, 75.0),
    ("semitendinosus", 75.0, 110.0),
    ("semimembranosus", 110.0, 145.0),
    ("adductor_magnus", 145.0, -155.0),
    ("vastus_medialis", -155.0, -110.0),
    ("vastus_intermedius", -110.0, -60.0),
)
_FEMUR_CENTRE = (0.05, -0.05)


# Thigh along the slice normal: the limb tapers distally (+z = proximal) by this fraction per normalised unit, and
# the sartorius runs obliquely, from antero-lateral proximally to medial distally (shift per unit of z).
_THIGH_TAPER = 0.15
_SARTORIUS_SHIFT = (0.6, -0.3)


def _paint_thigh(painter: _Painter, opts: _AnatomyOptions) -> None:
    g = painter.grid
    z = opts.z
    if z != 0.0:
        s = 1.0 + _THIGH_TAPER * z
        g = (g[0] / s, g[1] / s)
    # Fasciae are ~1-2 mm: keep them at least one pixel wide so they stay connected at coarse matrices.
    fascia = max(0.012, 0.55 * opts.pixel_size)
    painter.paint("subcutaneous_fat", _ellipse(g, (0.0, 0.0), (0.86, 0.76)))
    envelope = _ellipse(g, (0.0, 0.01), (0.74, 0.64), wobble=(0.03, 3, 0.7))
    for name, start, stop in _THIGH_SECTORS:
        painter.paint(name, envelope & _angular_sector(g, _FEMUR_CENTRE, start, stop))
    for _, start, _ in _THIGH_SECTORS:
        painter.paint("intermuscular_fat", envelope & _ray_band(g, _FEMUR_CENTRE, start, fascia))
    # Muscles wrapped in their own fascia: paint a fat rim, then the muscle inside it.
    sartorius = (-0.50, -0.33)
    if z != 0.0:
        sartorius = (sartorius[0] + _SARTORIUS_SHIFT[0] * z, sartorius[1] + _SARTORIUS_SHIFT[1] * z)
    for name, centre, axes, angle in (
        ("rectus_femoris", (0.03, -0.47), (0.16, 0.11), 0.0),
        ("sartorius", sartorius, (0.10, 0.06), 35.0),
        ("gracilis", (-0.63, 0.14), (0.06, 0.11), -10.0),
    ):
        rim = (axes[0] + fascia, axes[1] + fascia)
        painter.paint("intermuscular_fat", _ellipse(g, centre, rim, angle))
        painter.paint(name, _ellipse(g, centre, axes, angle))
    painter.paint("cortical_bone", _ellipse(g, _FEMUR_CENTRE, (0.14, 0.14)))
    painter.paint("bone_marrow", _ellipse(g, _FEMUR_CENTRE, (0.085, 0.085)))


_ANATOMIES: dict[str, Callable[[_Painter, _AnatomyOptions], None]] = {
    "brain": _paint_brain,
    "thigh": _paint_thigh,
}


# --------------------------------------------------------------------------------------------------------
# Smooth fields
# --------------------------------------------------------------------------------------------------------


def _gaussian(grid: Grid, centre: tuple[float, float], sigma: tuple[float, float]) -> np.ndarray:
    x, y = grid
    return np.exp(-0.5 * (((x - centre[0]) / sigma[0]) ** 2 + ((y - centre[1]) / sigma[1]) ** 2))


def _smooth_noise(grid: Grid, rng: np.random.Generator, n_terms: int = 6, max_freq: float = 2.5) -> np.ndarray:
    """A random low-frequency field scaled to [-1, 1]: texture and random field patterns."""
    x, y = grid
    out = np.zeros_like(x)
    for _ in range(n_terms):
        kx, ky = rng.uniform(-max_freq, max_freq, size=2)
        out += rng.uniform(0.5, 1.0) * np.cos(np.pi * (kx * x + ky * y) + rng.uniform(0, 2 * np.pi))
    peak = np.abs(out).max()
    return out / peak if peak > 0 else out


# B1+ inhomogeneity grows with the RF wavelength effect, roughly with B0; 1.5 T deviations are about half.
def _b1_field_scale(b0: float) -> float:
    return 1.0 if b0 >= 3.0 else 0.5


def _b1_canonical(grid: Grid, b0: float) -> np.ndarray:
    # The 3 T "central brightening" of the transmit field: high in the middle, lower at the periphery,
    # plus a slight left-right asymmetry. ~1.12 at the centre, ~0.9 at the edge of the object.
    x, _ = grid
    b1 = 0.90 + 0.22 * _gaussian(grid, (0.0, 0.0), (0.5, 0.55)) + 0.04 * x
    return 1.0 + (b1 - 1.0) * _b1_field_scale(b0)


def _b1_random(grid: Grid, b0: float, rng: np.random.Generator) -> np.ndarray:
    x, y = grid
    base = rng.uniform(0.85, 0.95)
    amplitude = rng.uniform(0.08, 0.25)
    centre = tuple(rng.uniform(-0.2, 0.2, size=2))
    sigma = tuple(rng.uniform(0.35, 0.7, size=2))
    gx, gy = rng.uniform(-0.05, 0.05, size=2)
    b1 = base + amplitude * _gaussian(grid, centre, sigma) + gx * x + gy * y
    b1 = np.clip(b1, 0.75, 1.25)  # by construction rarely active; guards the documented range
    return 1.0 + (b1 - 1.0) * _b1_field_scale(b0)


_DF_LIMIT_HZ = 38.0  # stays inside the +-40 Hz promised to the simulator


def _df_canonical(grid: Grid, name: str, b0: float) -> np.ndarray:
    # Residual shim gradients plus, for the head, the frontal-sinus susceptibility dip; in Hz at 3 T and
    # scaled with B0 (susceptibility shifts are proportional to the field).
    x, y = grid
    df = 8.0 * x - 5.0 * y + 4.0 * (x**2 - y**2)
    if name == "brain":
        df -= 28.0 * _gaussian(grid, (0.0, -0.72), (0.16, 0.12))
    else:
        df += 6.0 * x * y
    return df * (b0 / 3.0)


def _df_random(grid: Grid, b0: float, rng: np.random.Generator) -> np.ndarray:
    x, y = grid
    gx, gy = rng.uniform(-12.0, 12.0, size=2)
    q1, q2 = rng.uniform(-8.0, 8.0, size=2)
    bump = rng.uniform(-30.0, 30.0) * _gaussian(
        grid, tuple(rng.uniform(-0.6, 0.6, size=2)), tuple(rng.uniform(0.1, 0.3, size=2))
    )
    df = gx * x + gy * y + q1 * (x**2 - y**2) + q2 * x * y + bump
    peak = np.abs(df).max()
    if peak > _DF_LIMIT_HZ:  # rescale rather than clip: keeps the field smooth
        df *= _DF_LIMIT_HZ / peak
    return df * (b0 / 3.0)


# Through-plane variation of the fields: the transmit field falls off along the coil axis (Gaussian, sigma in
# normalised units) and the residual shim leaves a z gradient (Hz per normalised unit at 3 T).
_B1_Z_SIGMA = 0.6
_DF_Z_GRADIENT_HZ = 10.0


def _fields_off_centre(b1: np.ndarray, df: np.ndarray, z: float, b0: float) -> tuple[np.ndarray, np.ndarray]:
    """B1 and off-resonance of a slice at ``z`` from those of the z = 0 slice."""
    b1 = (
        1.0
        + (b1 - 1.0) * np.exp(-0.5 * (z / _B1_Z_SIGMA) ** 2)
        - 0.05 * _b1_field_scale(b0) * (1.0 - np.exp(-0.5 * (z / _B1_Z_SIGMA) ** 2))
    )
    df = df + _DF_Z_GRADIENT_HZ * z * (b0 / 3.0)
    return b1, df


# --------------------------------------------------------------------------------------------------------
# Randomisation of tissue values and pose
# --------------------------------------------------------------------------------------------------------

_VALUE_JITTER = 0.12  # +-12 % on relaxation times and PD
_FF_JITTER = 0.15  # relative, plus a small absolute term so FF = 0.02 can move too


def _perturb_tissue(t: Tissue, rng: np.random.Generator, fat_t1: float, fat_t2: float) -> Tissue:
    if t.pd == 0.0:
        return t
    jitter = lambda: rng.uniform(1.0 - _VALUE_JITTER, 1.0 + _VALUE_JITTER)  # noqa: E731
    ff = t.ff
    if ff > 0.0:
        ff = float(np.clip(ff * rng.uniform(1 - _FF_JITTER, 1 + _FF_JITTER) + rng.uniform(-0.02, 0.02), 0, 1))
    return Tissue(
        t.name,
        t.t1_water_ms * jitter(),
        t.t2_water_ms * jitter(),
        fat_t1,
        fat_t2,
        ff=ff,
        pd=float(min(1.0, t.pd * jitter())),
    )


def _random_pose(grid: Grid, rng: np.random.Generator) -> Grid:
    """Object-space coordinates of the pixel centres after a random rotation, scaling and shift."""
    x, y = grid
    theta = rng.uniform(0.0, 2.0 * np.pi)
    sx, sy = rng.uniform(0.88, 1.04, size=2)
    tx, ty = rng.uniform(-0.03, 0.03, size=2)
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = x - tx, y - ty
    # Inverse transform: rotate the pixel grid by -theta, then undo the scaling.
    return (c * dx + s * dy) / sx, (-s * dx + c * dy) / sy


# --------------------------------------------------------------------------------------------------------
# Public constructor
# --------------------------------------------------------------------------------------------------------


def _as_shape(matrix: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(matrix, tuple | list | np.ndarray):
        shape = (int(matrix[0]), int(matrix[1]))
    else:
        shape = (int(matrix), int(matrix))
    if min(shape) < 8:
        raise ValueError(f"phantom matrix {shape} is too small; use at least 8 x 8 pixels")
    return shape


def make_phantom(
    name: str,
    matrix: int | tuple[int, int] = 128,
    field_strength_T: float = 3.0,
    seed: int | None = None,
    randomize: bool = False,
    z: float = 0.0,
    lesions: Sequence[tuple[float, float, float]] = (),
) -> Phantom:
    """Build the ``brain`` or ``thigh`` phantom on a ``matrix`` (int or (ny, nx)) grid.

    ``randomize=False`` gives the canonical phantom (``seed`` is ignored). ``randomize=True`` draws pose,
    tissue values and field patterns from ``np.random.default_rng(seed)``; ``seed=None`` is then
    non-reproducible.

    ``z`` places the slice along the slice normal, in the in-plane normalised units (one unit = half the shorter
    side of the FOV; + is superior for the head, proximal for the thigh). z = 0 is the canonical slice, bit for
    bit; other positions cut the 3D anatomy elsewhere (see ``_BRAIN_Z``, ``_THIGH_TAPER``), with the same label
    ids and, when randomised, the same pose and tissue values for every z of one seed, so a stack of slices is
    one consistent object. B1 falls off and the off-resonance gains a through-plane shim gradient away from z = 0.

    ``lesions``: extra round lesions (x, y, radius) in image coordinates (normalised units as ``z``; the image
    centre is 0), painted last with the ``lesion`` tissue. Defined in continuous coordinates, so the same lesions
    drawn on a finer grid are the same objects (band-limited simulation; lesions of a few voxels).
    """
    if name not in _ANATOMIES:
        raise ValueError(f"unknown phantom {name!r}; choose one of {sorted(_ANATOMIES)}")
    shape = _as_shape(matrix)
    b0 = _nominal_field(field_strength_T)
    pixel_grid = _pixel_grid(shape)
    pixel_size = 2.0 / min(shape)
    rng = np.random.default_rng(seed) if randomize else None

    object_grid = _random_pose(pixel_grid, rng) if rng is not None else pixel_grid
    opts = _AnatomyOptions(
        pixel_size=pixel_size,
        ventricle_scale=float(rng.uniform(0.8, 1.4)) if rng is not None else 1.0,
        z=float(z),
    )
    painter = _Painter(object_grid)
    _ANATOMIES[name](painter, opts)
    for x, y, radius in lesions:
        if not radius > 0:
            raise ValueError(f"lesion radius must be > 0, got {radius}")
        painter.paint("lesion", _ellipse(pixel_grid, (float(x), float(y)), (float(radius), float(radius))))

    table = tissue_table(field_strength_T)
    tissues = {label: table[tissue_name] for tissue_name, label in painter.ids.items()}
    if rng is not None:
        fat_t1, fat_t2 = (v * rng.uniform(1 - _VALUE_JITTER, 1 + _VALUE_JITTER) for v in _FAT_T1_T2_MS[b0])
        tissues = {label: _perturb_tissue(t, rng, fat_t1, fat_t2) for label, t in tissues.items()}

    maps = _tissue_maps(painter.labels, tissues)
    if rng is not None:
        # A faint within-tissue texture, so learned estimators do not see piecewise-constant truth only.
        for key in ("t1_water_ms", "t2_water_ms"):
            maps[key] *= 1.0 + 0.04 * _smooth_noise(pixel_grid, rng)
        b1 = _b1_random(pixel_grid, b0, rng)
        df = _df_random(pixel_grid, b0, rng)
    else:
        b1 = _b1_canonical(pixel_grid, b0)
        df = _df_canonical(pixel_grid, name, b0)
    if z != 0.0:
        b1, df = _fields_off_centre(b1, df, float(z), b0)

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return Phantom(
        name=name,
        t1_water_ms=f32(maps["t1_water_ms"]),
        t2_water_ms=f32(maps["t2_water_ms"]),
        t1_fat_ms=f32(maps["t1_fat_ms"]),
        t2_fat_ms=f32(maps["t2_fat_ms"]),
        ff=f32(maps["ff"]),
        pd=f32(maps["pd"]),
        b1=f32(b1),
        df_hz=f32(np.clip(df, -_DF_LIMIT_HZ, _DF_LIMIT_HZ)),
        labels=painter.labels,
        label_names={label: t.name for label, t in tissues.items()},
        field_strength_T=float(field_strength_T),
        tissues=tissues,
    )


def _tissue_maps(labels: np.ndarray, tissues: dict[int, Tissue]) -> dict[str, np.ndarray]:
    """Look every label up in its tissue's values; label 0 (background) maps to zeros."""
    n = int(max(tissues, default=0)) + 1
    lut = {
        key: np.zeros(n, dtype=np.float64)
        for key in ("t1_water_ms", "t2_water_ms", "t1_fat_ms", "t2_fat_ms", "ff", "pd")
    }
    for label, t in tissues.items():
        for key in lut:
            lut[key][label] = getattr(t, key)
    return {key: table[labels] for key, table in lut.items()}
