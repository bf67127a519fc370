"""The simulator end to end: fully sampled Cartesian k-space -> IFFT + coil combination = fingerprint images."""

import numpy as np
import pytest
import torch

from pipelines.physics.epg import epg_water_fat
from pipelines.recon.cartesian import reconstruct_frames
from pipelines.recon.nufft import nufft_adjoint
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.phantoms import make_phantom


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _raw(study):
    from pipelines.io.mrd_reader import raw_study_from_stream
    from pipelines.sim.mrd_writer import build_header, iter_acquisitions

    return raw_study_from_stream([build_header(study), *iter_acquisitions(study)])


def test_fully_sampled_cartesian_reproduces_fingerprints(cartesian_study):
    st = cartesian_study
    raw = _raw(st)
    frames = reconstruct_frames(raw, maps=st.coil_maps)
    assert frames.shape == st.fingerprints.shape
    assert rel_err(frames, st.fingerprints) < 1e-4


def test_estimated_coil_maps_reproduce_fingerprints_up_to_a_voxel_scale(cartesian_study):
    """Without the true maps, the combination equals the fingerprint times one complex number per voxel."""
    st = cartesian_study
    frames = reconstruct_frames(_raw(st))
    mask = st.truth["mask"].astype(bool)
    a, b = frames[:, mask], st.fingerprints[:, mask]
    corr = np.abs((np.conj(a) * b).sum(0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    assert corr.min() > 1 - 1e-6


def test_fingerprints_are_the_epg_of_the_truth(cartesian_study):
    st, ph = cartesian_study, make_phantom("brain", 32)
    mask = ph.mask
    sel = np.flatnonzero(mask)[::7]

    def t(a):
        return torch.as_tensor(a.ravel()[sel], dtype=torch.float64)

    ref = epg_water_fat(st.sequence, t(ph.ff), t(ph.t1_water_ms), t(ph.t2_water_ms), t(ph.t1_fat_ms),
                        t(ph.t2_fat_ms), t(ph.b1), t(ph.df_hz), field_strength_T=3.0).numpy()
    ref = ref * ph.pd.ravel()[sel][:, None]
    got = st.fingerprints.reshape(st.n_frames, -1)[:, sel].T
    assert rel_err(got, ref) < 1e-4


def test_noise_level_matches_the_stated_snr(short_fisp):
    st = simulate_study("brain", short_fisp, AcquisitionSettings(coils=2, snr=20.0, seed=3), matrix=32)
    clean = simulate_study("brain", short_fisp, AcquisitionSettings(coils=2, snr=float("inf"), seed=3), matrix=32)
    noise = st.kspace - clean.kspace
    mask = st.truth["mask"].astype(bool)
    signal = np.abs(clean.fingerprints)[:, mask].mean()
    assert np.sqrt(np.mean(np.abs(noise) ** 2)) == pytest.approx(signal / 20.0, rel=0.02)  # E|n|^2 = sigma^2
    assert st.noise_std == pytest.approx(signal / 20.0, rel=1e-6)


@pytest.mark.parametrize("kind", ["radial", "spiral"])
def test_non_cartesian_kspace_is_the_nufft_of_the_coil_images(short_fisp, kind):
    st = simulate_study("thigh", short_fisp, AcquisitionSettings(trajectory=kind, coils=2, snr=float("inf")),
                        matrix=32)
    assert st.trajectory is not None and np.abs(st.trajectory).max() <= 16
    f = 17
    # Exact DFT of the coil images at this frame's samples.
    k = st.trajectory[f].reshape(-1, 2).astype(np.float64)
    ny, nx = st.matrix
    y, x = np.meshgrid(np.arange(ny) - ny // 2, np.arange(nx) - nx // 2, indexing="ij")
    phase = np.exp(-2j * np.pi * (np.outer(k[:, 0], x.ravel()) / nx + np.outer(k[:, 1], y.ravel()) / ny))
    coil_img = (st.coil_maps * st.fingerprints[f]).reshape(st.n_coils, -1)
    ref = (phase @ coil_img.T).T / np.sqrt(nx * ny)
    got = st.kspace[f].transpose(1, 0, 2).reshape(st.n_coils, -1)
    assert rel_err(got, ref) < 1e-4
    assert nufft_adjoint(got, k, (ny, nx)).shape == (st.n_coils, ny, nx)


def test_simulation_is_reproducible(short_fisp):
    a = simulate_study("brain", short_fisp, AcquisitionSettings(coils=2, snr=30, seed=5), matrix=32)
    b = simulate_study("brain", short_fisp, AcquisitionSettings(coils=2, snr=30, seed=5), matrix=32)
    assert np.array_equal(a.kspace, b.kspace) and a.study.study_instance_uid == b.study.study_instance_uid


def test_bad_settings_are_clear_errors(short_fisp):
    with pytest.raises(ValueError, match="unknown trajectory"):
        simulate_study("brain", short_fisp, AcquisitionSettings(trajectory="rosette"), matrix=16)
    with pytest.raises(ValueError, match="snr must be positive"):
        simulate_study("brain", short_fisp, AcquisitionSettings(snr=0), matrix=16)
