"""Numerical phantoms and coil sensitivities of the scanner simulator."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import Phantom, make_phantom, supported_field_strengths, tissue_table

NAMES = ("brain", "thigh")
FIELDS = (1.5, 3.0)
MATRICES = (32, 64, (100, 80), 128)
MUSCLES = {
    "rectus_femoris", "vastus_lateralis", "vastus_intermedius", "vastus_medialis", "sartorius", "gracilis",
    "biceps_femoris", "semitendinosus", "semimembranosus", "adductor_magnus",
}
TRUTH_KEYS = {
    "t1_ms", "t2_ms", "t1_water_ms", "t2_water_ms", "t1_fat_ms", "t2_fat_ms", "ff_percent", "pd", "b1",
    "df_hz", "labels",
}


def _ids(p: Phantom) -> dict[str, int]:
    return {name: label for label, name in p.label_names.items()}


def _region_values(p: Phantom, label: int, array: np.ndarray) -> np.ndarray:
    return array[p.labels == label]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("matrix", MATRICES)
def test_shapes_dtypes_and_labels(name: str, field: float, matrix: int | tuple[int, int]) -> None:
    p = make_phantom(name, matrix, field)
    shape = (matrix, matrix) if isinstance(matrix, int) else matrix
    for key in ("t1_water_ms", "t2_water_ms", "t1_fat_ms", "t2_fat_ms", "ff", "pd", "b1", "df_hz"):
        arr = getattr(p, key)
        assert arr.shape == shape and arr.dtype == np.float32, key
        assert np.all(np.isfinite(arr)), key
    assert p.labels.shape == shape and p.labels.dtype == np.int16
    assert p.mask.dtype == bool and p.mask.shape == shape
    present = set(np.unique(p.labels).tolist()) - {0}
    assert present <= set(p.label_names)
    assert 0 not in p.label_names
    assert len(set(p.label_names.values())) == len(p.label_names)  # one id per region name
    assert p.field_strength_T == field

    truth = p.truth()
    assert set(truth) == TRUTH_KEYS
    for key, arr in truth.items():
        assert arr.shape == shape, key
        assert arr.dtype == (np.int16 if key == "labels" else np.float32), key
    np.testing.assert_allclose(truth["ff_percent"], p.ff * 100.0, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field", FIELDS)
def test_canonical_regions_carry_table_values(name: str, field: float) -> None:
    p = make_phantom(name, 128, field)
    table = tissue_table(field)
    for label, tissue_name in p.label_names.items():
        t = table[tissue_name]
        inside = p.labels == label
        assert inside.sum() > 0, f"{tissue_name} missing at 128"
        for key in ("t1_water_ms", "t2_water_ms", "ff", "pd"):
            np.testing.assert_allclose(
                getattr(p, key)[inside], getattr(t, key), rtol=1e-6, err_msg=tissue_name
            )
        if t.pd > 0:
            np.testing.assert_allclose(p.t1_fat_ms[inside], t.t1_fat_ms, rtol=1e-6)
            np.testing.assert_allclose(p.t2_fat_ms[inside], t.t2_fat_ms, rtol=1e-6)


def test_literature_values_are_pinned() -> None:
    # Stanisz et al. MRM 2005 (WM, GM, muscle), Gold et al. AJR 2004 (fat), Rooney et al. MRM 2007 (CSF T1).
    t3, t15 = tissue_table(3.0), tissue_table(1.5)
    assert (t3["white_matter"].t1_water_ms, t3["white_matter"].t2_water_ms) == (1084.0, 69.0)
    assert (t3["grey_matter"].t1_water_ms, t3["grey_matter"].t2_water_ms) == (1820.0, 99.0)
    assert (t15["white_matter"].t1_water_ms, t15["white_matter"].t2_water_ms) == (884.0, 72.0)
    assert (t15["grey_matter"].t1_water_ms, t15["grey_matter"].t2_water_ms) == (1124.0, 95.0)
    assert (t3["vastus_lateralis"].t1_water_ms, t3["vastus_lateralis"].t2_water_ms) == (1412.0, 50.0)
    assert (t15["vastus_lateralis"].t1_water_ms, t15["vastus_lateralis"].t2_water_ms) == (1008.0, 44.0)
    assert (t3["scalp"].t1_fat_ms, t3["scalp"].t2_fat_ms) == (382.0, 68.0)
    assert (t15["scalp"].t1_fat_ms, t15["scalp"].t2_fat_ms) == (343.0, 58.0)
    assert t3["csf"].t1_water_ms == t15["csf"].t1_water_ms == 4300.0
    # T1 lengthens with the field for every tissue that has one.
    for name, t in t3.items():
        if t.pd > 0 and name not in ("csf", "lateral_ventricle_left", "lateral_ventricle_right"):
            assert t.t1_water_ms > t15[name].t1_water_ms, name
            assert t.t1_fat_ms > t15[name].t1_fat_ms, name


def test_brain_anatomy() -> None:
    p = make_phantom("brain", 128)
    ids = _ids(p)
    required = {"scalp", "grey_matter", "white_matter", "csf", "lateral_ventricle_left",
                "lateral_ventricle_right", "lesion"}
    assert required <= set(ids)
    scalp_ff = _region_values(p, ids["scalp"], p.ff)
    assert np.all((scalp_ff >= 0.9) & (scalp_ff <= 1.0))
    wm, lesion = ids["white_matter"], ids["lesion"]
    assert _region_values(p, lesion, p.t1_water_ms).min() > _region_values(p, wm, p.t1_water_ms).max()
    assert _region_values(p, lesion, p.t2_water_ms).min() > _region_values(p, wm, p.t2_water_ms).max()
    # Ventricles sit inside the brain, left and right of the midline.
    ny, nx = p.matrix
    for side, sign in (("lateral_ventricle_left", -1), ("lateral_ventricle_right", 1)):
        _, xs = np.nonzero(p.labels == ids[side])
        assert sign * (xs.mean() - (nx - 1) / 2) > 3
    # Tissue PD in the documented range; the skull is a signal void.
    tissue = p.mask
    assert np.all((p.pd[tissue] >= 0.6) & (p.pd[tissue] <= 1.0))
    if "skull" in ids:
        assert np.all(_region_values(p, ids["skull"], p.pd) == 0)


def test_thigh_anatomy_and_graded_fat() -> None:
    p = make_phantom("thigh", 128)
    ids = _ids(p)
    muscles = {name: label for name, label in ids.items() if name in MUSCLES}
    assert len(muscles) >= 4
    muscle_ff = {}
    for name, label in muscles.items():
        values = _region_values(p, label, p.ff)
        assert values.size > 0, name
        assert np.ptp(values) == 0, f"{name} FF is not uniform"
        muscle_ff[name] = float(values[0])
    distinct = sorted(set(muscle_ff.values()))
    assert len(distinct) >= 4
    assert distinct[0] <= 0.05 and distinct[-1] >= 0.4  # graded from near-normal to strongly infiltrated
    assert all(0.0 <= ff <= 1.0 for ff in distinct)

    subcut = _region_values(p, ids["subcutaneous_fat"], p.ff)
    assert np.all((subcut >= 0.85) & (subcut <= 0.95))
    marrow = _region_values(p, ids["bone_marrow"], p.ff)
    assert marrow.size > 0 and np.all((marrow >= 0.85) & (marrow <= 0.95))
    bone = ids["cortical_bone"]
    assert (p.labels == bone).sum() > 0
    assert np.all(_region_values(p, bone, p.pd) == 0)
    # Cortical bone surrounds the marrow: the marrow centroid is inside the bone ring's bounding box.
    by, bx = np.nonzero(p.labels == bone)
    my, mx = np.nonzero(p.labels == ids["bone_marrow"])
    assert by.min() < my.mean() < by.max() and bx.min() < mx.mean() < bx.max()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field", FIELDS)
def test_background_and_fields(name: str, field: float) -> None:
    for kwargs in ({}, {"randomize": True, "seed": 1}, {"randomize": True, "seed": 2}):
        p = make_phantom(name, 96, field, **kwargs)
        background = p.labels == 0
        assert background.any()
        assert np.all(p.pd[background] == 0)
        assert np.all(p.t1_water_ms[background] == 0) and np.all(p.t2_water_ms[background] == 0)
        assert np.all(p.ff[background] == 0)
        assert np.all((p.ff >= 0) & (p.ff <= 1))
        inside = p.mask
        assert np.all((p.b1[inside] >= 0.7) & (p.b1[inside] <= 1.3))
        assert np.all(np.abs(p.df_hz) <= 50.0)
        # Smooth: neighbouring pixels differ by a small fraction of the field's range.
        assert np.abs(np.diff(p.b1, axis=0)).max() < 0.05 and np.abs(np.diff(p.b1, axis=1)).max() < 0.05
        assert np.abs(np.diff(p.df_hz, axis=1)).max() < 5.0
        assert np.all(p.t1_water_ms[inside] > 0) and np.all(p.t1_fat_ms[inside] > 0)


def test_apparent_values_follow_majority_pool() -> None:
    p = make_phantom("thigh", 128)
    truth = p.truth()
    fat_dominant = p.mask & (p.ff >= 0.5)
    water_dominant = p.mask & (p.ff < 0.5)
    assert fat_dominant.any() and water_dominant.any()
    np.testing.assert_array_equal(truth["t1_ms"][fat_dominant], p.t1_fat_ms[fat_dominant])
    np.testing.assert_array_equal(truth["t2_ms"][water_dominant], p.t2_water_ms[water_dominant])
    assert np.all(truth["t1_ms"][~p.mask] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_randomisation_is_seeded(name: str) -> None:
    a = make_phantom(name, 64, randomize=True, seed=11)
    b = make_phantom(name, 64, randomize=True, seed=11)
    c = make_phantom(name, 64, randomize=True, seed=12)
    for key in ("t1_water_ms", "ff", "pd", "b1", "df_hz", "labels"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    for key in ("t1_water_ms", "b1", "df_hz", "labels"):
        assert not np.array_equal(getattr(a, key), getattr(c, key)), key
    canonical = make_phantom(name, 64)
    assert not np.array_equal(a.labels, canonical.labels)
    # The canonical phantom ignores the seed.
    np.testing.assert_array_equal(make_phantom(name, 64, seed=5).t1_water_ms, canonical.t1_water_ms)


@pytest.mark.parametrize("name", NAMES)
def test_randomised_values_stay_near_the_table(name: str) -> None:
    table = tissue_table(3.0)
    for seed in range(4):
        p = make_phantom(name, 96, randomize=True, seed=seed)
        for label, tissue_name in p.label_names.items():
            ref = table[tissue_name]
            inside = p.labels == label
            if ref.pd == 0 or not inside.any():
                continue
            ratio = p.t1_water_ms[inside] / ref.t1_water_ms
            assert np.all((ratio > 0.8) & (ratio < 1.2)), tissue_name
            assert ref.t1_fat_ms * 0.85 < p.t1_fat_ms[inside].mean() < ref.t1_fat_ms * 1.15


def test_areas_scale_with_matrix() -> None:
    def fraction(name: str, region: str, matrix: int) -> float:
        p = make_phantom(name, matrix)
        return float(np.mean(p.labels == _ids(p)[region]))

    for name, region in (("brain", "white_matter"), ("brain", "grey_matter"), ("thigh", "vastus_lateralis")):
        small, large = fraction(name, region, 64), fraction(name, region, 128)
        assert abs(small - large) / large < 0.05, (name, region, small, large)


def test_non_square_matrix_keeps_the_object_round() -> None:
    square = make_phantom("brain", 80)
    wide = make_phantom("brain", (80, 100))
    # Square pixels: the extra columns are background, the head is the same.
    np.testing.assert_array_equal(wide.labels[:, 10:90], square.labels)
    assert np.all(wide.labels[:, :10] == 0) and np.all(wide.labels[:, 90:] == 0)


def test_field_strength_validation() -> None:
    assert supported_field_strengths() == (1.5, 3.0)
    p = make_phantom("brain", 32, field_strength_T=2.89)  # what a nominal 3 T scanner reports
    np.testing.assert_array_equal(p.t1_water_ms, make_phantom("brain", 32, 3.0).t1_water_ms)
    with pytest.raises(ValueError, match=r"1\.5 T, 3 T"):
        make_phantom("brain", 32, field_strength_T=7.0)
    with pytest.raises(ValueError, match="unknown phantom"):
        make_phantom("liver", 32)


# ---------------------------------------------------------------------------------------------------------
# Coil sensitivities
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix", [(64, 64), (96, 80)])
@pytest.mark.parametrize("seed", [None, 3])
def test_birdcage_maps_normalised_at_centre(matrix: tuple[int, int], seed: int | None) -> None:
    maps = birdcage_maps(8, matrix, seed=seed)
    assert maps.shape == (8, *matrix) and maps.dtype == np.complex64
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))
    assert abs(rss[matrix[0] // 2, matrix[1] // 2] - 1.0) < 1e-3
    # Receive shading as in a real array: brighter towards the coils than at the centre.
    assert rss[0, matrix[1] // 2] > 1.2
    assert np.all(np.isfinite(maps))
    # Each coil sees a different part of the object.
    peaks = {np.unravel_index(np.abs(m).argmax(), m.shape) for m in maps}
    assert len(peaks) == 8


def test_birdcage_maps_seed_and_single_coil() -> None:
    ones = birdcage_maps(1, (32, 48))
    assert ones.shape == (1, 32, 48) and ones.dtype == np.complex64
    np.testing.assert_array_equal(ones, 1.0)
    np.testing.assert_array_equal(birdcage_maps(4, (32, 32), seed=1), birdcage_maps(4, (32, 32), seed=1))
    assert not np.array_equal(birdcage_maps(4, (32, 32), seed=1), birdcage_maps(4, (32, 32), seed=2))
    with pytest.raises(ValueError):
        birdcage_maps(0, (32, 32))
    with pytest.raises(ValueError):
        birdcage_maps(4, (32, 32), radius=0.8)
