"""A measured B1 series on the maps' grid (pipelines/mapping/b1_measured.py): stored values to relative B1, and
resampling by patient coordinates between stacks of different matrix, spacing, orientation and slice thickness."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.mapping.b1_measured import b1_from_series, resample_b1, voxel_centres
from pipelines.map_kinds import quantitative_map
from pipelines.types import Geometry, ImageStudy, StudyInfo


def _linear_b1(p: np.ndarray) -> np.ndarray:
    """A B1 field linear in patient coordinates (mm): linear interpolation must reproduce it exactly."""
    return 1.0 + 0.002 * p[..., 0] - 0.0015 * p[..., 1] + 0.004 * p[..., 2]


def _oblique(matrix: int, spacing: float, thickness: float, n_slices: int, angle_deg: float, shift: np.ndarray):
    a = np.deg2rad(angle_deg)
    row, col = np.array([np.cos(a), np.sin(a), 0.0]), np.array([-np.sin(a), np.cos(a), 0.0])
    normal = np.cross(row, col)
    centre_to_first = -(matrix // 2) * spacing * (row + col)
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * thickness
    positions = shift + centre_to_first + z[:, None] * normal
    return Geometry(
        (matrix, matrix),
        (spacing, spacing),
        thickness,
        orientation=(*row, *col),
        positions=positions,
        frame_of_reference_uid="1.2.3.4",
    )


def test_resampling_reproduces_a_linear_field_and_leaves_what_the_series_misses_empty():
    # B1 series: 48 x 48 at 5 mm (240 mm), 4 slices of 8 mm, rotated 12 degrees and shifted; maps: 64 x 64 at
    # 3.75 mm (240 mm), 3 axial slices of 5 mm inside the B1 slab, one slice 30 mm above it.
    src = _oblique(48, 5.0, 8.0, 4, 12.0, np.array([4.0, -6.0, 2.0]))
    b1 = quantitative_map("b1", _linear_b1(voxel_centres(src)), src)
    target = _oblique(64, 3.75, 5.0, 3, 0.0, np.zeros(3))
    target.positions = np.vstack([target.positions, target.positions[-1] + [0, 0, 30.0]])
    out = resample_b1(b1, target)
    truth = _linear_b1(voxel_centres(target))
    assert out.shape == (4, 64, 64)
    inside = np.isfinite(out[:3])
    # The rotated 240 mm square covers the centre of the 240 mm axial square but not its corners.
    assert 0.6 < inside.mean() < 0.95, inside.mean()
    assert np.all(inside[:, 24:40, 24:40])
    assert not inside[:, 0, 0].any()
    err = np.abs(out[:3][inside] - truth[:3][inside])
    # exact inside the series' voxel centres; within its outer half voxel the edge value is held (nearest)
    assert np.mean(err < 1e-4) > 0.97 and err.max() < 0.02, (np.mean(err < 1e-4), err.max())
    assert np.isnan(out[3]).all()  # 30 mm above a slab of 4 x 8 mm centred on the maps


def test_unmeasured_voxels_do_not_spread_and_edges_keep_their_measured_neighbours():
    g = Geometry.centred((16, 16), (160.0, 160.0), slice_thickness_mm=10.0)
    data = np.full((1, 16, 16), 1.1, np.float32)
    data[0, :, :5] = np.nan  # e.g. air
    b1 = quantitative_map("b1", data, g)
    out = resample_b1(b1, Geometry.centred((64, 64), (160.0, 160.0)))
    measured = np.isfinite(out[0])
    assert np.allclose(out[0][measured], 1.1)
    # The series' voxels at x <= -40 mm are unmeasured, from -30 mm on measured: the maps' voxels get a value from
    # halfway (-35 mm, column 18 of the 2.5 mm grid starting at -80 mm) on, in every row the series covers.
    cols = np.flatnonzero(measured[32])
    assert cols.min() == 18 and cols.max() == 62, cols  # 62: x = 75 mm, the series' outer edge
    assert np.isnan(out[0][:, :18]).all()


def test_frames_of_reference_that_differ_are_refused():
    g = Geometry.centred((8, 8), (80.0, 80.0))
    g.frame_of_reference_uid = "1.2.3"
    b1 = quantitative_map("b1", np.ones((1, 8, 8)), g)
    other = Geometry.centred((8, 8), (80.0, 80.0))
    other.frame_of_reference_uid = "1.2.4"
    with pytest.raises(ValueError, match="frame of reference"):
        resample_b1(b1, other)


def _series(values: np.ndarray) -> ImageStudy:
    return ImageStudy(
        pixels=values.astype(np.float32),
        geometry=Geometry.centred(values.shape[-2:], (80.0, 80.0)),
        study=StudyInfo(series_instance_uid="1.2.9", series_description="tfl_b1map"),
    )


def test_stored_values_become_relative_b1_and_a_wrong_unit_is_named():
    stored = np.zeros((1, 1, 8, 8))
    stored[..., 2:6, 2:6] = 800 * np.linspace(0.85, 1.15, 16).reshape(4, 4)
    b1 = b1_from_series(_series(stored), 800.0)
    assert b1.kind == "b1" and b1.unit == "1"
    assert np.allclose(b1.data[0, 2:6, 2:6], np.linspace(0.85, 1.15, 16).reshape(4, 4), atol=1e-6)
    assert np.isnan(b1.data[0, 0]).all()  # air stored as 0: no measured B1 there
    assert "tfl_b1map" in b1.notes[0]
    hostile = _series(stored)
    hostile.study.series_description = "B1\nINFO forged log line" + "x" * 200
    note = b1_from_series(hostile, 800.0).notes[0]
    assert "\n" not in note and "B1?INFO forged" in note and len(note) < 200
    with pytest.raises(ValueError, match="set `nominal`"):
        b1_from_series(_series(stored), 1600.0)  # reads 0.43 ... 0.58: plausible voxels, an implausible median
    with pytest.raises(ValueError, match="is `nominal` right"):
        b1_from_series(_series(stored), 100.0)  # reads 6.8 ... 9.2: nothing plausible
    with pytest.raises(ValueError, match="one image per slice"):
        b1_from_series(_series(np.concatenate([stored, stored])), 800.0)
    # geometry from the network, checked before anything divides by it or inverts it
    for change, name in (
        ({"pixel_spacing_mm": (0.0, 10.0)}, "PixelSpacing"),
        ({"orientation": (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)}, "ImageOrientationPatient"),
        ({"positions": np.array([[np.nan, 0.0, 0.0]])}, "ImagePositionPatient"),
    ):
        bad = _series(stored)
        for k, v in change.items():
            setattr(bad.geometry, k, v)
        with pytest.raises(ValueError, match=name):
            b1_from_series(bad, 800.0)


def _raw(b1=None, frame_of_reference=None):
    from pipelines.types import RawStudy

    g = Geometry.centred((8, 8), (80.0, 80.0))
    g.frame_of_reference_uid = frame_of_reference
    empty = np.zeros(0, np.int64)
    return RawStudy(
        header_xml="", data=np.zeros((0, 1, 1), np.complex64), trajectory=None, line=empty, frame=empty,
        slice=empty, flags=empty.astype(np.uint64), matrix=(8, 8), fov_mm=(80.0, 80.0), trajectory_kind="spiral",
        study=StudyInfo(), geometry=g, b1_measured=b1,
    )


def test_the_mrf_pipeline_uses_a_measured_map_as_asked_and_says_why_not(caplog):
    """``b1_measured``: auto uses the study's map, falls back with the reason in the job's log (another frame of
    reference, no map, water/fat); required makes that reason the job's error; off ignores the map."""
    import logging

    from pipelines.definitions.mrf import _measured_b1
    from pipelines.registry import RunContext

    g = Geometry.centred((4, 4), (80.0, 80.0))
    g.frame_of_reference_uid = "1.2.3"
    b1 = quantitative_map("b1", np.full((1, 4, 4), 0.9), g, notes=["series 1.2.9"])
    ctx = RunContext(log=logging.getLogger("test_b1"))
    params = {"b1_measured": "auto", "estimator": "dictionary"}
    got = _measured_b1(_raw(b1, "1.2.3"), params, "single", ctx)
    assert got is not None and got.shape == (1, 8, 8) and np.allclose(got, 0.9)
    assert _measured_b1(_raw(b1, "1.2.3"), {**params, "b1_measured": "off"}, "single", ctx) is None
    with caplog.at_level(logging.WARNING, logger="test_b1"):
        assert _measured_b1(_raw(b1, "1.2.4"), params, "single", ctx) is None
        assert _measured_b1(_raw(b1, "1.2.3"), params, "water_fat", ctx) is None
    assert "frame of reference" in caplog.text and "single-compartment" in caplog.text
    assert _measured_b1(_raw(None), params, "single", ctx) is None
    with pytest.raises(ValueError, match="required.*no measured B1 series"):
        _measured_b1(_raw(None), {**params, "b1_measured": "required"}, "single", ctx)
    with pytest.raises(ValueError, match="required.*frame of reference"):
        _measured_b1(_raw(b1, "1.2.4"), {**params, "b1_measured": "required"}, "single", ctx)


def test_a_job_result_keeps_each_map_with_its_geometry(tmp_path):
    """maps.npz (node/run.py) round-trips a map's values, unit, notes and geometry: how a raw job gets the
    study's B1 map from the b1_map job's results; a maps.npz without geometry is refused by name."""
    from node.run import _map_meta, load_map

    g = Geometry.centred((4, 6), (40.0, 60.0), slice_thickness_mm=8.0, n_slices=2)
    g.frame_of_reference_uid = "1.2.3"
    m = quantitative_map("b1", np.linspace(0.8, 1.2, 48).reshape(2, 4, 6), g, notes=["series 1.2.9"])
    np.savez(tmp_path / "maps.npz", b1=m.data, b1_unit=np.array(m.unit), b1_meta=np.array(_map_meta(m)))
    back = load_map(tmp_path / "maps.npz", "b1")
    assert np.array_equal(back.data, m.data) and back.unit == "1" and back.notes == ["series 1.2.9"]
    assert back.geometry.matrix == (4, 6) and back.geometry.frame_of_reference_uid == "1.2.3"
    assert np.allclose(back.geometry.positions, g.positions) and back.geometry.slice_thickness_mm == 8.0
    np.savez(tmp_path / "old.npz", b1=m.data, b1_unit=np.array(m.unit))
    with pytest.raises(ValueError, match="no b1 map with its geometry"):
        load_map(tmp_path / "old.npz", "b1")


def test_smoothing_takes_out_the_scan_noise_and_keeps_air_unmeasured():
    """``smooth_mm``: a B1 scan's voxel noise (3 %) shrinks under the default 6 mm Gaussian (4 mm voxels), a field
    linear across the object stays where it is, and air stays unmeasured."""
    from pipelines.mapping.b1_measured import DEFAULT_SMOOTH_MM

    n = 64
    yy, xx = np.mgrid[:n, :n]
    body = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.4 * n) ** 2
    field = 1.0 + 0.2 * (xx - n / 2) / n  # 0.9 ... 1.1 across 256 mm
    noisy = field * (1 + 0.03 * np.random.default_rng(0).standard_normal((n, n)))
    stored = np.where(body, np.rint(800 * noisy), 0)[None, None]
    study = _series(stored)
    study.geometry = Geometry.centred((n, n), (256.0, 256.0))
    raw, smooth = (b1_from_series(study, 800.0, mm).data[0] for mm in (0.0, DEFAULT_SMOOTH_MM))
    assert np.isnan(smooth[~body]).all() and np.isfinite(smooth[body]).all()
    inner = body & ((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.3 * n) ** 2)
    e_raw, e_smooth = (float(np.std(m[inner] - field[inner])) for m in (raw, smooth))
    print(f"B1 error sd: {e_raw:.4f} unsmoothed, {e_smooth:.4f} smoothed")
    assert e_smooth < 0.4 * e_raw and abs(float(np.mean(smooth[inner] - field[inner]))) < 0.002
