"""Multi-slice simulated studies: distinct anatomy per slice, per-slice geometry from the simulator through ISMRMRD
(file and stream) and the MRD reader into the node's DICOM map series, and the DICOM fingerprint series.

One 3-slice spiral study (48^2, 4 coils, 60 frames, 4 mm slices with a 2 mm gap) serves every test.
"""

from __future__ import annotations

import gc
import weakref

import h5py
import ismrmrd
import ismrmrd.xsd as x
import numpy as np
import pydicom
import pytest

from node.egress.dicom_writer import write_outputs
from pipelines.io.dicom_reader import image_study_from_dicom
from pipelines.io.mrd_reader import raw_study_from_hdf5, raw_study_from_stream
from pipelines.physics.sequences import MRFSequence, fisp_sequence
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.dicom_frames import write_dicom_frames
from pipelines.sim.mrd_writer import build_header, iter_acquisitions, write_ismrmrd
from pipelines.sim.study import MultiSliceStudy, SimulatedStudy
from pipelines.types import QuantitativeMap

N_SLICES, MATRIX, COILS, FRAMES = 3, 48, 4, 60
THICKNESS, GAP, FOV = 4.0, 2.0, 240.0
SLICE_Z_MM = np.array([-6.0, 0.0, 6.0])  # centred stack, (thickness + gap) apart, slice 0 most inferior
FIRST_PIXEL_XY = np.array([-(MATRIX // 2) * FOV / MATRIX] * 2)  # centre of pixel (0, 0); isocentre at pixel N//2


def _bit(flag: int) -> np.uint64:
    return np.uint64(1) << np.uint64(flag - 1)


@pytest.fixture(scope="module")
def seq() -> MRFSequence:
    s = fisp_sequence()
    return MRFSequence("fisp60", s.flip_angles_deg[:FRAMES], s.tr_ms[:FRAMES], s.te_ms[:FRAMES], ti_ms=s.ti_ms)


def _settings(**kw) -> AcquisitionSettings:
    base = dict(trajectory="spiral", coils=COILS, snr=30.0, fov_mm=FOV, slice_thickness_mm=THICKNESS,
                slice_gap_mm=GAP, seed=11)
    return AcquisitionSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def ms(seq) -> MultiSliceStudy:
    study = simulate_study("brain", seq, _settings(), matrix=MATRIX, n_slices=N_SLICES)
    assert isinstance(study, MultiSliceStudy)
    return study


@pytest.fixture(scope="module")
def slices(ms) -> list[SimulatedStudy]:
    """Every slice, simulated once for the tests that compare with the data (tiny here: 3 x 60 x 48^2)."""
    return list(ms.slices())


@pytest.fixture(scope="module")
def h5(ms, tmp_path_factory):
    return write_ismrmrd(ms, tmp_path_factory.mktemp("ms") / "ms.h5")


@pytest.fixture(scope="module")
def raw(h5):
    return raw_study_from_hdf5(h5)


def _expected_positions() -> np.ndarray:
    return np.array([[*FIRST_PIXEL_XY, z] for z in SLICE_Z_MM])


# ---- simulator -----------------------------------------------------------------------------------------------
def test_stack_geometry_is_centred_and_spaced_by_thickness_plus_gap(ms):
    g = ms.geometry
    assert g.n_slices == N_SLICES and ms.n_slices == N_SLICES
    np.testing.assert_allclose(g.positions, _expected_positions(), atol=1e-9)
    np.testing.assert_allclose(g.slice_locations_mm, SLICE_Z_MM, atol=1e-9)
    assert g.slice_thickness_mm == THICKNESS and g.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_each_slice_has_its_own_anatomy_and_coil_maps(ms):
    t1, labels = ms.truth["t1_ms"], ms.truth["labels"]
    assert t1.shape == labels.shape == (N_SLICES, MATRIX, MATRIX)
    assert ms.coil_maps.shape == (N_SLICES, COILS, MATRIX, MATRIX)
    for a in range(N_SLICES):
        for b in range(a + 1, N_SLICES):
            assert np.count_nonzero(t1[a] != t1[b]) > 20, (a, b)
            assert not np.allclose(ms.coil_maps[a], ms.coil_maps[b])
    # The head narrows towards the vertex (+z): fewer object voxels in each more superior slice.
    sizes = [int(m.sum()) for m in ms.truth["mask"]]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    # The canonical lesion reaches +-6 mm from z = 0: only the middle slice shows it. Label ids agree in all slices.
    lesion = next(k for k, v in ms.label_names.items() if v == "lesion")
    assert [bool((labels[s] == lesion).any()) for s in range(N_SLICES)] == [False, True, False]


def test_middle_slice_of_an_odd_stack_is_the_single_slice_study(ms, slices, seq):
    """z = 0 is the canonical slice, bit for bit: the same phantom and coil maps as ``n_slices=1``."""
    single = simulate_study("brain", seq, _settings(snr=float("inf")), matrix=MATRIX)
    assert isinstance(single, SimulatedStudy) and single.slice_index == 0 and single.n_slices == 1
    for key, value in single.truth.items():
        np.testing.assert_array_equal(ms.truth[key][1], value, err_msg=key)
    np.testing.assert_array_equal(ms.coil_maps[1], single.coil_maps)
    np.testing.assert_array_equal(slices[1].fingerprints, single.fingerprints)


def test_slices_are_deterministic_with_one_noise_level(ms, slices, seq):
    again = ms.slice(2)
    np.testing.assert_array_equal(again.kspace, slices[2].kspace)
    assert again.slice_index == 2 and np.allclose(again.position, _expected_positions()[2])
    # One receiver noise level for the stack, set by the SNR on the middle slice's mean object signal.
    mask = ms.truth["mask"][1].astype(bool)
    signal = np.abs(slices[1].fingerprints)[:, mask].mean()
    assert ms.noise_std == pytest.approx(signal / 30.0, rel=1e-5)
    assert ms.frame_peak == pytest.approx(float(np.abs(slices[1].fingerprints).max()), rel=1e-6)
    clean = simulate_study("brain", seq, _settings(snr=float("inf")), matrix=MATRIX, n_slices=N_SLICES)
    noise = {s: slices[s].kspace - clean.slice(s).kspace for s in (0, 2)}
    for s, n in noise.items():
        assert np.sqrt(np.mean(np.abs(n) ** 2)) == pytest.approx(ms.noise_std, rel=0.05), s
    # Each slice draws its own noise, so slices are not copies of each other's noise.
    assert abs(np.vdot(noise[0], noise[2])) < 0.05 * np.vdot(noise[0], noise[0]).real


def test_multislice_needs_a_phantom_name_and_a_positive_count(seq):
    from pipelines.sim.phantoms import make_phantom

    with pytest.raises(ValueError, match="phantom's name"):
        simulate_study(make_phantom("brain", 16), seq, _settings(), matrix=16, n_slices=2)
    with pytest.raises(ValueError, match="n_slices"):
        simulate_study("brain", seq, _settings(), matrix=16, n_slices=0)


# ---- ISMRMRD -----------------------------------------------------------------------------------------------------
def test_ismrmrd_header_and_acquisitions_carry_every_slice(ms, h5):
    with h5py.File(h5, "r") as f:
        header = x.CreateFromDocument(f["dataset/xml"][0])
        heads = f["dataset/data"]["head"]
    limits = header.encoding[0].encodingLimits.slice
    assert (limits.minimum, limits.maximum) == (0, N_SLICES - 1)
    per_slice = FRAMES  # one spiral interleaf per frame
    assert heads.shape[0] == N_SLICES * per_slice
    idx = heads["idx"]["slice"]
    np.testing.assert_array_equal(idx, np.repeat(np.arange(N_SLICES), per_slice))  # slice after slice
    np.testing.assert_array_equal(heads["scan_counter"], np.arange(heads.shape[0]))
    flags = heads["flags"]
    first = np.flatnonzero(flags & _bit(ismrmrd.ACQ_FIRST_IN_SLICE))
    last = np.flatnonzero(flags & _bit(ismrmrd.ACQ_LAST_IN_SLICE))
    np.testing.assert_array_equal(first, np.arange(N_SLICES) * per_slice)
    np.testing.assert_array_equal(last, np.arange(1, N_SLICES + 1) * per_slice - 1)
    assert np.flatnonzero(flags & _bit(ismrmrd.ACQ_LAST_IN_MEASUREMENT)).tolist() == [heads.shape[0] - 1]
    # ISMRMRD position = slice centre (encoding centre, pixel N//2), per slice; the same directions everywhere.
    spacing = FOV / MATRIX
    for s in range(N_SLICES):
        pos = heads["position"][idx == s]
        centre = _expected_positions()[s] + np.array([(MATRIX // 2) * spacing, (MATRIX // 2) * spacing, 0.0])
        np.testing.assert_allclose(pos, np.repeat(centre[None], per_slice, 0), atol=1e-4)
    np.testing.assert_array_equal(heads["read_dir"], np.tile([1, 0, 0], (heads.shape[0], 1)))
    np.testing.assert_array_equal(heads["phase_dir"], np.tile([0, 1, 0], (heads.shape[0], 1)))
    np.testing.assert_array_equal(heads["slice_dir"], np.tile([0, 0, 1], (heads.shape[0], 1)))
    # Slices are acquired one after another: every slice starts after the previous one's whole schedule.
    t = heads["acquisition_time_stamp"].astype(np.int64)
    assert np.all(np.diff(t) >= 0) and t[per_slice] > t[per_slice - 1]


def test_ismrmrd_file_round_trips_per_slice_geometry_and_data(ms, slices, raw):
    g = raw.geometry
    assert g.n_slices == N_SLICES
    np.testing.assert_allclose(g.positions, ms.geometry.positions, atol=1e-3)
    np.testing.assert_allclose(g.orientation, ms.geometry.orientation, atol=1e-6)
    np.testing.assert_allclose(g.pixel_spacing_mm, ms.geometry.pixel_spacing_mm, rtol=1e-6)
    assert g.slice_thickness_mm == pytest.approx(THICKNESS)
    assert g.frame_of_reference_uid == ms.study.frame_of_reference_uid
    np.testing.assert_array_equal(np.unique(raw.slice), np.arange(N_SLICES))
    for s in range(N_SLICES):
        rows = raw.slice == s
        np.testing.assert_array_equal(raw.data[rows], slices[s].kspace.reshape(-1, COILS, raw.data.shape[-1]))
        np.testing.assert_array_equal(raw.frame[rows], np.arange(FRAMES))


def test_mrd_stream_gives_the_same_study_as_the_file(ms, raw):
    streamed = raw_study_from_stream([build_header(ms), *iter_acquisitions(ms)])
    np.testing.assert_array_equal(streamed.geometry.positions, raw.geometry.positions)
    np.testing.assert_array_equal(streamed.slice, raw.slice)
    np.testing.assert_array_equal(streamed.data, raw.data)
    assert streamed.header_xml == raw.header_xml


def test_the_node_counts_every_slice_as_received(ms, raw):
    """The MRD ingest's completeness check (encodingLimits.slice) accepts the stack, and misses a dropped slice."""
    from node.ingest.units import raw_completeness

    header = build_header(ms)
    assert raw_completeness(header, raw.frame, raw.slice, FRAMES).complete
    keep = raw.slice != 2
    partial = raw_completeness(header, raw.frame[keep], raw.slice[keep], FRAMES)
    assert not partial.complete and "2 of 3 slices" in partial.problem()


def test_the_ismrmrd_library_reads_the_file(h5):
    ds = ismrmrd.Dataset(str(h5), "dataset", create_if_needed=False)
    try:
        assert ds.number_of_acquisitions() == N_SLICES * FRAMES
        acq = ds.read_acquisition(FRAMES)  # first readout of slice 1
        assert acq.idx.slice == 1 and acq.isFlagSet(ismrmrd.ACQ_FIRST_IN_SLICE)
        assert acq.position[2] == pytest.approx(SLICE_Z_MM[1], abs=1e-4)
    finally:
        ds.close()


def test_writing_holds_one_slice_at_a_time(seq, tmp_path):
    """write_ismrmrd of a stack never keeps two simulated slices alive (fingerprints are 0.5 GB a slice at 256^2)."""
    ms = simulate_study("brain", seq, _settings(trajectory="cartesian", coils=2), matrix=16, n_slices=N_SLICES)
    alive: list[weakref.ref] = []
    most = [0]
    make = ms.make_slice

    def tracked(s: int) -> SimulatedStudy:
        gc.collect()
        n_alive = sum(r() is not None for r in alive)
        st = make(s)
        alive.append(weakref.ref(st))
        most[0] = max(most[0], n_alive + 1)
        return st

    import dataclasses

    write_ismrmrd(dataclasses.replace(ms, make_slice=tracked), tmp_path / "t.h5")
    assert len(alive) == N_SLICES and most[0] == 1


# ---- DICOM: the node's map series and the simulated fingerprint series --------------------------------------------
def test_map_series_positions_follow_the_raw_geometry(ms, raw, tmp_path):
    """Maps [slices, y, x] with the reader's geometry -> the node's DICOM writer: each slice's instance at its place."""
    t1 = QuantitativeMap("t1", ms.truth["t1_ms"], "ms", "T1 map", raw.geometry)
    files = write_outputs([t1], raw.study, tmp_path, "job-ms")
    dss = [pydicom.dcmread(r.path) for r in files if r.path.parent.name == "t1"]
    assert len(dss) == N_SLICES
    by_number = sorted(dss, key=lambda d: int(d.InstanceNumber))
    for s, ds in enumerate(by_number):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], ms.geometry.positions[s], atol=1e-3)
        assert float(ds.SliceLocation) == pytest.approx(SLICE_Z_MM[s], abs=1e-3)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], ms.geometry.orientation)
        assert float(ds.SliceThickness) == pytest.approx(THICKNESS)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(THICKNESS + GAP)
        # the pixels of instance s are slice s's map (rescaled to real units)
        value = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        np.testing.assert_allclose(value, ms.truth["t1_ms"][s], atol=1.0)
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert {ds.FrameOfReferenceUID for ds in dss} == {ms.study.frame_of_reference_uid}


def test_fingerprint_series_has_each_slice_at_its_position(ms, slices, tmp_path):
    files = write_dicom_frames(ms, tmp_path)
    assert len(files) == N_SLICES * FRAMES
    assert files[0].name == "slice_001_frame_0001.dcm"
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files[:: FRAMES // 3]]
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    for ds in dss:
        s, f = divmod(int(ds.InstanceNumber) - 1, FRAMES)
        assert int(ds.TemporalPositionIdentifier) == f + 1
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], ms.geometry.positions[s], atol=1e-3)
        assert float(ds.SliceLocation) == pytest.approx(SLICE_Z_MM[s], abs=1e-3)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert len(set(uids)) == len(uids)
    # The project's reader stacks them back as [frames, slices, y, x] at the simulated positions.
    img = image_study_from_dicom(tmp_path)
    assert img.pixels.shape == (FRAMES, N_SLICES, MATRIX, MATRIX)
    np.testing.assert_allclose(img.geometry.positions, ms.geometry.positions, atol=1e-3)
    # One scale for the series: frame 10 of every slice is the magnitude of its fingerprints times that scale.
    scale = 4000.0 / ms.frame_peak
    for s in range(N_SLICES):
        expect = np.clip(np.rint(np.abs(slices[s].fingerprints[10]) * scale), 0, 65535)
        np.testing.assert_allclose(img.pixels[10, s], expect, atol=1.0)


def test_cli_simulate_slices(tmp_path, seq):
    from node.cli import main

    seq.save_json(tmp_path / "seq.json")
    out = tmp_path / "s.h5"
    rc = main(["simulate", "--phantom", "thigh", "--matrix", "32", "--coils", "2", "--trajectory", "cartesian",
               "--sequence", str(tmp_path / "seq.json"), "--slices", "2", "--slice-thickness", "3",
               "--slice-gap", "1.5", "--out", str(out), "--dicom-out", str(tmp_path / "frames"), "--quiet"])
    assert rc == 0
    truth = np.load(tmp_path / "s_truth.npz")
    assert truth["t1_ms"].shape == (2, 32, 32) and not np.array_equal(truth["labels"][0], truth["labels"][1])
    np.testing.assert_allclose(truth["slice_positions_mm"][:, 2], [-2.25, 2.25])
    raw = raw_study_from_hdf5(out)
    np.testing.assert_allclose(raw.geometry.positions, truth["slice_positions_mm"], atol=1e-3)
    assert raw.geometry.slice_thickness_mm == pytest.approx(3.0)
    assert len(list((tmp_path / "frames").glob("slice_00[12]_frame_*.dcm"))) == 2 * FRAMES
    img = image_study_from_dicom(tmp_path / "frames")
    np.testing.assert_allclose(img.geometry.positions, truth["slice_positions_mm"], atol=1e-3)
