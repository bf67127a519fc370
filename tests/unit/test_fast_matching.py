"""Coarse-to-fine matching against the exhaustive reference, and coefficient-domain matching against frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.mapping.dictionary import CompartmentGrid, DictionarySpec, build_dictionary, geometric_grid, linear_grid
from pipelines.mapping.maps import MappingOptions, estimate_maps
from pipelines.mapping.matching import match
from pipelines.physics.epg import epg_fisp
from pipelines.physics.sequences import get_sequence
from pipelines.recon.subspace import expand
from pipelines.types import Geometry

# The default FISP schedule and grid steps (3 % T1/T2, 0.05 B1 here) over a brain range: ~60k atoms, large enough
# for the fast search and quick to build (interpolated, as the default dictionary).
GRID = CompartmentGrid(geometric_grid(300, 3000, 3), geometric_grid(20, 600, 3), linear_grid(0.8, 1.2, 0.05))
SPEC = DictionarySpec({"water": GRID}, stride=(2, 2, 1))


@pytest.fixture(scope="module")
def fisp():
    return get_sequence("fisp")


@pytest.fixture(scope="module")
def big_dict(fisp, dict_cache):
    return build_dictionary(fisp, SPEC, cache_dir=dict_cache)


def _held_out(seq, n: int, snr: float, seed: int):
    """Noisy fingerprints of random tissues (log-uniform T1 350-2800 ms, T2 25-min(T1, 550) ms, B1 0.85-1.15)."""
    rng = np.random.default_rng(seed)
    t1 = np.exp(rng.uniform(np.log(350), np.log(2800), n))
    t2 = np.exp(rng.uniform(np.log(25), np.log(np.minimum(t1, 550)), n))
    b1 = rng.uniform(0.85, 1.15, n)
    x = epg_fisp(seq, torch.tensor(t1, dtype=torch.float32), torch.tensor(t2, dtype=torch.float32),
                 torch.tensor(b1, dtype=torch.float32))
    x = x * torch.exp(1j * torch.tensor(rng.uniform(-3, 3, n), dtype=torch.float32))[:, None]
    g = torch.Generator().manual_seed(seed)
    sigma = float(x.abs().pow(2).mean().sqrt()) / snr
    x = x + sigma / np.sqrt(2) * (torch.randn(x.shape, generator=g) + 1j * torch.randn(x.shape, generator=g))
    return x.to(torch.complex64), t1, t2


def _errors(r, t1, t2):
    return np.median(np.abs(r.t1_ms / t1 - 1)), np.median(np.abs(r.t2_ms / t2 - 1))


def _scores(d, x, r, res):
    """|<a, x>| of each voxel's picked atom, from the dictionary's own coefficients (independent of the matcher)."""
    row = {v: i for i, v in enumerate(map(tuple, d.params["water"][:, :3].tolist()))}
    idx = [row[v] for v in zip(res.t1_ms.tolist(), res.t2_ms.tolist(), res.b1.tolist())]
    a = d.complex.coeffs["water"][idx, :r].to(torch.complex128)
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    xr = (x.to(torch.complex128) @ d.complex.basis[:, :r].to(torch.complex128))
    return (xr * a.conj()).sum(1).abs().numpy()


def test_fast_search_agrees_with_exhaustive(big_dict, fisp):
    x, t1, t2 = _held_out(fisp, 2000, snr=30, seed=11)
    assert big_dict.n_atoms > 50000
    ex = match(x, big_dict, search="exhaustive")
    fa = match(x, big_dict, search="fast")
    same = (ex.t1_ms == fa.t1_ms) & (ex.t2_ms == fa.t2_ms) & (ex.b1 == fa.b1)
    # Where the atoms differ, the two scores tie to float32 precision: the exhaustive float32 scan cannot tell
    # them apart either (its own pick flips with the summation order). Scored here in float64.
    se, sf = _scores(big_dict, x, ex.rank, ex), _scores(big_dict, x, fa.rank, fa)
    tie = sf >= se * (1 - 2e-6)
    assert same.mean() >= 0.95 and (same | tie).mean() >= 0.99, (same.mean(), (same | tie).mean())
    (e1, e2), (f1, f2) = _errors(ex, t1, t2), _errors(fa, t1, t2)
    assert f1 <= e1 * 1.02 + 1e-4 and f2 <= e2 * 1.02 + 1e-4, (e1, e2, f1, f2)


def test_fast_search_at_reconstruction_rank_is_not_worse_against_truth(big_dict, fisp):
    """At rank 8 the correlation has flat T2-B1 ridges: the atoms differ, the accuracy must not."""
    x, t1, t2 = _held_out(fisp, 2000, snr=30, seed=12)
    c = x @ big_dict.complex.basis[:, :8]
    ex = match(c, big_dict, coefficients=True, search="exhaustive")
    fa = match(c, big_dict, coefficients=True, search="fast")
    (e1, e2), (f1, f2) = _errors(ex, t1, t2), _errors(fa, t1, t2)
    assert f1 <= e1 * 1.1 + 2e-3 and f2 <= e2 * 1.1 + 2e-3, (e1, e2, f1, f2)


def test_coefficient_domain_equals_expanded_frames(big_dict, fisp):
    x, _, _ = _held_out(fisp, 1500, snr=30, seed=13)
    k = 8
    basis = big_dict.complex.basis[:, :k]
    c = x @ basis  # what a rank-8 subspace reconstruction delivers
    frames = torch.as_tensor(expand(c.T.numpy(), basis).T.copy())  # [voxels, frames] in the span
    a = match(c, big_dict, coefficients=True, search="exhaustive")
    b = match(frames, big_dict, rank=k, search="exhaustive")
    # the same atom up to float ties (frames are the coefficients expanded in float32 and projected back)
    # (at rank 8 some atoms are float-level ties: 0.5 % of voxels flip between neighbours)
    assert np.mean(a.t1_ms == b.t1_ms) >= 0.99 and np.mean(a.t2_ms == b.t2_ms) >= 0.99
    assert np.mean(np.isclose(np.abs(a.m0), np.abs(b.m0), rtol=1e-3)) >= 0.99
    assert np.mean(np.isclose(a.residual, b.residual, atol=1e-3)) >= 0.99


def test_coefficient_maps_equal_frame_maps(big_dict, fisp, dict_cache):
    """estimate_maps on coefficient images [K, slices, y, x] == on the frames they expand to, slice by slice."""
    x, _, _ = _held_out(fisp, 2 * 24 * 24, snr=40, seed=14)
    k = 8
    basis = big_dict.complex.basis[:, :k]
    coeff_img = (x @ basis).T.reshape(k, 2, 24, 24).numpy()
    frames = expand(coeff_img, basis)  # [frames, 2, 24, 24]
    geom = Geometry.centred((24, 24), fov_mm=(220.0, 220.0), slice_thickness_mm=5.0, n_slices=2)
    spec = SPEC
    opts = MappingOptions(model="single", rank=k)
    from_coeffs = estimate_maps(coeff_img, fisp, geom, opts, spec=spec, cache_dir=dict_cache,
                                basis=basis)
    from_frames = estimate_maps(frames, fisp, geom, opts, spec=spec, cache_dir=dict_cache)
    for mc, mf in zip(from_coeffs, from_frames):
        assert mc.kind == mf.kind and mc.data.shape == (2, 24, 24)
        # residual in %: float rounding of the 1000-frame expansion moves it by < 0.1 points
        agree = np.isclose(mc.data, mf.data, rtol=1e-3, atol=0.1 if mc.kind == "residual" else 1e-3).mean()
        assert agree >= 0.99, (mc.kind, agree)


def test_fast_search_on_complex_atoms_and_on_magnitudes(big_dict, fisp):
    """The two other arithmetic paths of the block search: atoms that are not real up to one global phase (each atom
    turned by its own phase: every |<a, x>| is unchanged, so the exhaustive winner is too), and magnitude data
    against magnitude atoms (signed real scores)."""
    import dataclasses

    x, t1, t2 = _held_out(fisp, 800, snr=30, seed=15)
    g = torch.Generator().manual_seed(3)
    comp = big_dict.complex
    turn = torch.exp(2j * np.pi * torch.rand(comp.coeffs["water"].shape[0], generator=g))[:, None]
    turned = dataclasses.replace(big_dict, complex=dataclasses.replace(
        comp, coeffs={"water": comp.coeffs["water"] * turn.to(torch.complex64)}), search_cache={})
    for d, magnitude in ((turned, False), (big_dict, True)):
        ex = match(x, d, search="exhaustive", magnitude=magnitude)
        fa = match(x, d, search="fast", magnitude=magnitude)
        key = (("blocks", "water", magnitude, ex.rank, "cpu"))
        assert d.search_cache[key].phase is None  # the complex (or magnitude) path, not the de-rotated one
        same = (ex.t1_ms == fa.t1_ms) & (ex.t2_ms == fa.t2_ms) & (ex.b1 == fa.b1)
        close = np.isclose(fa.residual, ex.residual, rtol=0, atol=1e-5)  # ties: equal fit to float32 precision
        # Magnitudes carry less information than complex signals (flatter maxima): 97-98 % same atom measured.
        want = 0.95 if magnitude else 0.99
        assert (same | close).mean() >= want, (magnitude, same.mean(), (same | close).mean())
        (e1, e2), (f1, f2) = _errors(ex, t1, t2), _errors(fa, t1, t2)
        assert f1 <= e1 * 1.02 + 1e-4 and f2 <= e2 * 1.02 + 1e-4, (magnitude, e1, e2, f1, f2)
