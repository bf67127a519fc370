"""Locally low-rank (LLR) ADMM subspace reconstruction: block SVT, convergence to the dense solutions, accuracy.

The accuracy test (marked integration: full FISP dictionary) uses thresholds from the measured table in
benchmarks/mrf_accuracy.md (64^2 spiral brain, 8 coils, SNR 30), not from a previous run of this test.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pipelines.recon.llr import (
    DEFAULT_RHO,
    block_nuclear_norm,
    block_svt,
    largest_block_singular_value,
    llr_reconstruct,
)
from pipelines.recon.operators import max_eigenvalue
from pipelines.recon.subspace import CartesianSubspace, NonCartesianSubspace
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.trajectories import mrf_spiral_trajectory


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: with 2 threads on a loaded 2-core machine, thread hand-offs cost 10-20x the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _basis(frames: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((frames, rank)) + 1j * rng.standard_normal((frames, rank)))
    return q.astype(np.complex64)


def _low_rank_blocks(k: int, n: int, block: int, seed: int = 1) -> torch.Tensor:
    """Coefficient images whose every block holds 2 'tissues' (rank <= 2 per block)."""
    g = torch.Generator().manual_seed(seed)
    tissues = torch.randn((4, k), generator=g, dtype=torch.complex64)
    label = torch.randint(0, 4, (n // block, n // block, 2), generator=g)
    weights = torch.rand((n, n), generator=g)
    by = torch.arange(n) // block
    a = tissues[label[by[:, None], by[None, :], 0]]  # [n, n, k]
    b = tissues[label[by[:, None], by[None, :], 1]]
    return (weights[..., None] * a + (1 - weights[..., None]) * b).permute(2, 0, 1).contiguous()


def test_block_svt_equals_explicit_per_block_svd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 10, 12), generator=g, dtype=torch.complex64)  # not a multiple of the block: padded
    block, tau, shift = 4, 0.7, (1, 3)
    out = block_svt(x, tau, block, shift)
    rolled = torch.roll(x, (-shift[0], -shift[1]), dims=(-2, -1))
    padded = torch.zeros((3, 12, 12), dtype=x.dtype)
    padded[:, :10, :12] = rolled
    expect = torch.zeros_like(padded)
    for i in range(0, 12, block):
        for j in range(0, 12, block):
            m = padded[:, i : i + block, j : j + block].reshape(3, -1).numpy().astype(np.complex128)
            u, s, vh = np.linalg.svd(m, full_matrices=False)
            t = (u * np.maximum(s - tau, 0)) @ vh
            expect[:, i : i + block, j : j + block] = torch.from_numpy(t.reshape(3, block, block).astype(np.complex64))
    expect = torch.roll(expect[:, :10, :12], shift, dims=(-2, -1))
    assert torch.allclose(out, expect, atol=1e-5)
    # Nuclear norm: sum of the singular values of the same blocks; the threshold lowers each by at most tau.
    assert block_nuclear_norm(out, block, shift) < block_nuclear_norm(x, block, shift)
    assert torch.equal(block_svt(x, 0.0, block, shift).isclose(x, atol=1e-5), torch.ones_like(x, dtype=torch.bool))


# ---- a tiny problem with a dense matrix -------------------------------------------------------------------------
N, K, FRAMES, COILS, BLOCK = 8, 3, 12, 2, 4


def _tiny_op() -> CartesianSubspace:
    """Cartesian subspace operator, 3 lines per frame: A has full column rank (checked): a unique LS solution."""
    rng = np.random.default_rng(3)
    lines = np.concatenate([rng.choice(N, size=3, replace=False) for _ in range(FRAMES)])
    frame = np.repeat(np.arange(FRAMES), 3)
    return CartesianSubspace(birdcage_maps(COILS, (N, N)), lines, frame, _basis(FRAMES, K))


@functools.cache
def _dense_tiny() -> np.ndarray:
    return _dense(_tiny_op())


def _dense(op: CartesianSubspace) -> np.ndarray:
    n = K * N * N
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=torch.complex64)
        e[j] = 1
        cols.append(op.forward(e.reshape(K, N, N)).flatten().numpy())
    return np.stack(cols, axis=1).astype(np.complex128)


def _data(op: CartesianSubspace, seed: int = 2) -> torch.Tensor:
    c = _low_rank_blocks(K, N, BLOCK)
    y = op.forward(c)
    g = torch.Generator().manual_seed(seed)
    return y + 0.05 * float(y.abs().mean()) * torch.randn(y.shape, generator=g, dtype=torch.complex64)


def test_lambda_zero_is_the_dense_least_squares_solution():
    op = _tiny_op()
    a = _dense_tiny()
    assert np.linalg.matrix_rank(a) == a.shape[1]
    y = _data(op)
    expect = np.linalg.lstsq(a, y.flatten().numpy().astype(np.complex128), rcond=None)[0].reshape(K, N, N)
    res = llr_reconstruct(op, y, lam=0.0, block=BLOCK, iterations=60, inner=5, shifts=False, tol=1e-7)
    err = np.linalg.norm(res.coefficients - expect) / np.linalg.norm(expect)
    assert err < 1e-3, err  # measured 5e-5


def _svt_numpy(x: np.ndarray, tau: float) -> np.ndarray:
    """Block SVT of [K, N, N] on the fixed BLOCK tiling, in numpy (an independent implementation)."""
    b = x.reshape(K, N // BLOCK, BLOCK, N // BLOCK, BLOCK).transpose(1, 3, 0, 2, 4).reshape(-1, K, BLOCK * BLOCK)
    u, s, vh = np.linalg.svd(b, full_matrices=False)
    b = (u * np.maximum(s - tau, 0)[:, None, :]) @ vh
    return b.reshape(N // BLOCK, N // BLOCK, K, BLOCK, BLOCK).transpose(2, 0, 3, 1, 4).reshape(K, N, N)


def _prox_gradient(a: np.ndarray, y: np.ndarray, lam: float, steps: int) -> np.ndarray:
    """Reference minimiser of 1/2||A c - y||^2 + lam sum ||B(c)||_* by FISTA on the dense matrix (float64)."""
    step = 1.0 / np.linalg.norm(a, 2) ** 2
    x = np.zeros(a.shape[1], dtype=np.complex128)
    z, t = x.copy(), 1.0
    for _ in range(steps):
        g = z - step * (a.conj().T @ (a @ z - y))
        xn = _svt_numpy(g.reshape(K, N, N), lam * step).reshape(-1)
        tn = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = xn + (t - 1) / tn * (xn - x)
        x, t = xn, tn
    return x.reshape(K, N, N)


def test_regularised_admm_decreases_the_objective_and_matches_a_dense_solve():
    op = _tiny_op()
    a = _dense_tiny()
    y = _data(op)
    history: list[float] = []
    res = llr_reconstruct(
        op, y, lam=0.1, block=BLOCK, iterations=80, inner=5, shifts=False, tol=1e-7, objective=history
    )
    # The objective decreases from the first (Tikhonov) solve by a clear margin, and (nearly) monotonically
    # after the first iterations.
    assert history[-1] < 0.97 * history[0], history[:3] + history[-1:]
    assert all(b <= a_ * (1 + 1e-4) for a_, b in zip(history[5:], history[6:], strict=False))
    # The same minimiser as FISTA on the dense matrix, with the lambda of the objective the solver minimises:
    # threshold (lam x largest block singular value of the first solve) x rho (DEFAULT_RHO x ||A^H A||).
    first = llr_reconstruct(op, y, lam=0.0, block=BLOCK, iterations=0, tol=1e-7).coefficients
    scale = float(max_eigenvalue(op, op.adjoint(y), iterations=6, coupled=True))
    lam_abs = 0.1 * largest_block_singular_value(torch.from_numpy(first), BLOCK) * DEFAULT_RHO * scale
    ref = _prox_gradient(a, y.flatten().numpy().astype(np.complex128), lam_abs, 500)
    err = np.linalg.norm(res.coefficients - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err  # measured 1.2e-6 (float32 ADMM against float64 FISTA)
    # ... and the regulariser did something: the LS solution is farther from the LLR minimiser.
    ls = np.linalg.lstsq(a, y.flatten().numpy().astype(np.complex128), rcond=None)[0].reshape(K, N, N)
    assert np.linalg.norm(ls - ref) / np.linalg.norm(ref) > 0.03  # measured 0.074


def test_llr_with_shifts_runs_on_a_spiral_operator():
    """Non-Cartesian operator, density weights, random shifts, a matrix that is no multiple of the block."""
    n, frames = 20, 30
    traj = mrf_spiral_trajectory(frames, n, n_interleaves=6)
    k = traj.reshape(-1, 2)
    frame = np.repeat(np.arange(frames), traj.shape[2])
    dcf = np.ones(k.shape[0], dtype=np.float32)
    op = NonCartesianSubspace(birdcage_maps(COILS, (n, n)), k, frame, _basis(frames, K), dcf=dcf)
    y = op.forward(_low_rank_blocks(K, 24, BLOCK)[:, :n, :n])
    res = llr_reconstruct(op, y, lam=0.05, block=8, iterations=5, inner=3)
    assert res.coefficients.shape == (K, n, n) and np.isfinite(res.coefficients).all()
    assert "locally low-rank" in res.notes[0] and "random shifts" in res.notes[0]


# ---- accuracy against the phantom's truth (full FISP dictionary: integration) ------------------------------------
@pytest.mark.integration
def test_llr_accuracy_against_cgsense_hann(dict_cache, tmp_path):
    """64^2 spiral brain, 8 coils, SNR 30, FISP 1000 frames, one interleaf per frame, through the ``mrf`` pipeline.

    Measured (benchmarks/mrf_accuracy.md, pixel simulation, this study), median |T2 error| WM / GM / CSF / lesion:
    CG-SENSE + Hann 11.2 / 13.7 / 26.5 / 21.5 %; LLR without filter 11.2 / 12.8 / 7.8 / 11.7 %; LLR + Hann
    7.9 / 12.8 / 26.5 / 21.5 %. Thresholds: without filter LLR is at least 10 points better on CSF T2 (114
    voxels; the lesion's 8 voxels are too few to assert on), within the issue's WM / GM targets (T1 < 10 %,
    T2 < 15 %) and under 10 / 15 % on CSF T1 / T2; with the Hann filter (the pipeline's default) it is better than
    CG-SENSE + Hann on WM T2 (7.9 vs 11.2 %, the same on band-limited data).
    """
    from pipelines.definitions import get_pipeline
    from pipelines.io.mrd_reader import raw_study_from_hdf5
    from pipelines.physics.sequences import fisp_sequence
    from pipelines.registry import RunContext
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import write_ismrmrd

    study = simulate_study(
        "brain", fisp_sequence(), AcquisitionSettings(trajectory="spiral", coils=8, snr=30), matrix=64
    )
    write_ismrmrd(study, tmp_path / "spiral.h5")
    raw = raw_study_from_hdf5(tmp_path / "spiral.h5")

    def errors(params: dict) -> dict[str, tuple[float, float]]:
        maps = {m.kind: m.data[0] for m in get_pipeline("mrf")(raw, params, RunContext(cache_dir=dict_cache))}
        out = {}
        for label, name in study.label_names.items():
            roi = study.truth["labels"] == label
            if name in ("white_matter", "grey_matter", "csf", "lesion") and roi.any():
                out[name] = tuple(
                    float(np.median(np.abs(maps[q][roi] / study.truth[f"{q}_water_ms"][roi] - 1))) for q in ("t1", "t2")
                )
        return out

    cg = errors({"recon": "cgsense"})
    llr = errors({"recon": "llr", "filter": "none"})
    assert llr["csf"][1] < cg["csf"][1] - 0.10, (llr["csf"], cg["csf"])
    for tissue in ("white_matter", "grey_matter"):
        assert llr[tissue][0] < 0.10 and llr[tissue][1] < 0.15, (tissue, llr[tissue])
    assert llr["csf"][0] < 0.10 and llr["csf"][1] < 0.15, llr["csf"]
    llr_hann = errors({"recon": "llr"})
    assert llr_hann["white_matter"][1] < cg["white_matter"][1], (llr_hann["white_matter"], cg["white_matter"])


def test_scale_invariance():
    """lam and rho are relative: scaling the data scales the solution and changes nothing else."""
    op = _tiny_op()
    y = _data(op)
    a = llr_reconstruct(op, y, lam=0.1, block=BLOCK, iterations=10).coefficients
    b = llr_reconstruct(op, 1000.0 * y, lam=0.1, block=BLOCK, iterations=10).coefficients
    assert np.linalg.norm(b / 1000.0 - a) / np.linalg.norm(a) < 1e-4


def test_bandlimited_simulation_reduces_to_the_simulator_and_differs_from_it_when_finer():
    """oversample=1 is simulate_study bit for bit; a 3x finer object gives other data (the edges' k-space)."""
    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.bandlimited import simulate_bandlimited

    s = fisp_sequence()
    seq = MRFSequence("fisp20", s.flip_angles_deg[:20], s.tr_ms[:20], s.te_ms[:20], ti_ms=s.ti_ms)
    settings = AcquisitionSettings(trajectory="spiral", coils=2, snr=float("inf"))
    ref = simulate_study("brain", seq, settings, matrix=32)
    same = simulate_bandlimited("brain", seq, settings, matrix=32, oversample=1)
    fine = simulate_bandlimited("brain", seq, settings, matrix=32, oversample=3)
    assert np.array_equal(same.kspace, ref.kspace)
    assert np.array_equal(fine.truth["labels"], ref.truth["labels"]) and fine.matrix == (32, 32)
    rel = np.linalg.norm(fine.kspace - ref.kspace) / np.linalg.norm(ref.kspace)
    assert 0.02 < rel < 0.3, rel  # measured 0.11: the same object, up to its pixelation
    # Partial volume: purity 1 inside tissues, below 1 on edges; the 3x finer object has some of each.
    assert np.all(same.truth["purity"] == 1.0)
    purity = fine.truth["purity"]
    assert purity.shape == (32, 32) and purity.min() >= 0 and purity.max() == 1.0
    assert 0.1 < float((purity < 1).mean()) < 0.8


def test_label_purity_counts_fine_pixels():
    from pipelines.sim.bandlimited import label_purity

    coarse = np.array([[1, 2], [3, 3]], np.int16)
    fine = np.array([[1, 1, 2, 3], [1, 0, 2, 2], [3, 3, 3, 3], [3, 3, 1, 3]], np.int16)
    np.testing.assert_allclose(label_purity(coarse, fine), [[0.75, 0.75], [1.0, 0.75]])


def test_fine_to_coarse_conventions():
    """A smooth object drawn 2x / 3x finer, through the same NUFFT and fine_to_coarse, gives the coarse samples."""
    from pipelines.recon.nufft import nufft_forward
    from pipelines.sim.bandlimited import fine_to_coarse

    def blob(n: int) -> np.ndarray:  # pixel centres as make_phantom's grid: (i - (n - 1) / 2) / (n / 2)
        c = (np.arange(n) - (n - 1) / 2) / (n / 2)
        yy, xx = np.meshgrid(c, c, indexing="ij")
        return np.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) / (2 * 0.15**2)).astype(np.complex64)

    k = np.random.default_rng(0).uniform(-12, 12, (300, 2)).astype(np.float32)
    coarse = nufft_forward(blob(32), k)
    for f in (2, 3):
        fine = nufft_forward(blob(32 * f), k) * fine_to_coarse(k, 32, f)
        assert np.linalg.norm(fine - coarse) / np.linalg.norm(coarse) < 1e-5


def test_cartesian_bandlimited_kspace_conventions():
    """Cartesian: a smooth object drawn 2x / 3x finer, cropped from its FFT, gives the coarse grid's FFT; and
    oversample 1 is the simulator's Cartesian data bit for bit."""
    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.bandlimited import _cartesian_kspace, simulate_bandlimited

    def blob(n: int) -> np.ndarray:  # as in test_fine_to_coarse_conventions; [frames=1, n, n]
        c = (np.arange(n) - (n - 1) / 2) / (n / 2)
        yy, xx = np.meshgrid(c, c, indexing="ij")
        return np.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) / (2 * 0.15**2)).astype(np.complex64)[None]

    lines = np.arange(32)[None]
    coarse = _cartesian_kspace(blob(32), np.ones((1, 32, 32), np.complex64), lines, 32, 1)
    for f in (2, 3):
        fine = _cartesian_kspace(blob(32 * f), np.ones((1, 32 * f, 32 * f), np.complex64), lines, 32, f)
        assert np.linalg.norm(fine - coarse) / np.linalg.norm(coarse) < 1e-5

    s = fisp_sequence()
    seq = MRFSequence("fisp20", s.flip_angles_deg[:20], s.tr_ms[:20], s.te_ms[:20], ti_ms=s.ti_ms)
    settings = AcquisitionSettings(trajectory="cartesian", coils=2, snr=float("inf"), acceleration=4.0)
    ref = simulate_study("brain", seq, settings, matrix=32)
    same = simulate_bandlimited("brain", seq, settings, matrix=32, oversample=1)
    assert np.array_equal(same.kspace, ref.kspace)
    fine = simulate_bandlimited("brain", seq, settings, matrix=32, oversample=2)
    rel = np.linalg.norm(fine.kspace - ref.kspace) / np.linalg.norm(ref.kspace)
    assert 0.02 < rel < 0.3, rel
