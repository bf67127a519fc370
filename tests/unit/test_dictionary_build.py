"""The streaming dictionary build against an in-memory reference, and grid interpolation against direct simulation."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.mapping.dictionary import (
    CompartmentGrid, DictionarySpec, build_dictionary, geometric_grid, linear_grid, simulate_atoms,
)
from pipelines.physics.epg import epg_fisp


def _in_memory(seq, grid):
    """The old build: every atom in memory, basis from the full Gram matrix."""
    atoms = simulate_atoms(seq, grid, "water", 3.0)
    norms = torch.linalg.vector_norm(atoms, dim=1)
    a = (atoms / norms[:, None]).to(torch.complex128)
    evals, evecs = torch.linalg.eigh(a.T.conj() @ a)
    return atoms, norms, evecs.flip(1)


def _subspace_distance(b1: torch.Tensor, b2: torch.Tensor) -> float:
    """Largest norm of a unit vector of span(b2) left outside span(b1) (both orthonormal columns)."""
    p = b1.to(torch.complex128)
    q = b2.to(torch.complex128)
    return float(torch.linalg.matrix_norm(q - p @ (p.T.conj() @ q), ord=2))


def test_streaming_build_equals_in_memory(short_fisp):
    grid = CompartmentGrid(geometric_grid(200, 3000, 8), geometric_grid(20, 1500, 8), linear_grid(0.8, 1.2, 0.1))
    d = build_dictionary(short_fisp, DictionarySpec({"water": grid}), use_cache=False)
    atoms, norms, evecs = _in_memory(short_fisp, grid)
    c = d.complex
    r = c.basis.shape[1]
    # the same subspace: the stored basis spans the in-memory basis's leading components (8: the recon rank)
    assert _subspace_distance(c.basis, evecs[:, :8]) < 1e-5
    # the same atoms: the in-memory atoms projected on the stored basis equal the streamed coefficients
    ref = (atoms / norms[:, None]) @ c.basis
    err = torch.linalg.vector_norm(c.coeffs["water"] - ref, dim=1)
    assert float(err.max()) < 1e-5, float(err.max())
    assert torch.allclose(d.norms["water"], norms, rtol=1e-5)
    assert np.array_equal(d.params["water"], grid.combos())
    assert r <= 32


def test_interpolated_grid_matches_direct_simulation(short_fisp):
    """Every other T1 and T2 simulated, the rest interpolated: checked against EPG directly."""
    grid = CompartmentGrid(geometric_grid(150, 4000, 7), geometric_grid(15, 2000, 7), linear_grid(0.7, 1.3, 0.1))
    d = build_dictionary(short_fisp, DictionarySpec({"water": grid}, stride=(2, 2, 1)), use_cache=False)
    p = d.params["water"]
    rng = np.random.default_rng(0)
    pick = rng.choice(p.shape[0], 3000, replace=False)
    direct = epg_fisp(short_fisp, torch.tensor(p[pick, 0]), torch.tensor(p[pick, 1]), torch.tensor(p[pick, 2]))
    direct = direct / torch.linalg.vector_norm(direct, dim=1, keepdim=True)
    # compared in the stored subspace (its truncation is the same for simulated and interpolated atoms)
    ref = direct @ d.complex.basis
    ref = ref / torch.linalg.vector_norm(ref, dim=1, keepdim=True)
    stored = d.complex.coeffs["water"][pick]
    ip = (stored.conj() * ref).sum(1).abs() / torch.linalg.vector_norm(stored, dim=1)
    # neighbouring atoms of this grid differ by >= 1e-4 in 1 - |<a, b>|; interpolation must be far below that
    assert float((1 - ip).max()) < 1e-5, float((1 - ip).max())
    # magnitude compression too (used for magnitude DICOM input)
    m = d.magnitude.coeffs["water"][pick]
    dm = direct.abs() @ d.magnitude.basis
    dm = dm / torch.linalg.vector_norm(dm, dim=1, keepdim=True)
    ipm = (m * dm).sum(1) / torch.linalg.vector_norm(m, dim=1)
    assert float((1 - ipm).max()) < 1e-5, float((1 - ipm).max())
    # the norms that give M0 (PD)
    dn = torch.linalg.vector_norm(epg_fisp(short_fisp, torch.tensor(p[pick, 0]), torch.tensor(p[pick, 1]),
                                           torch.tensor(p[pick, 2])), dim=1)
    assert torch.allclose(d.norms["water"][pick], dn, rtol=1e-4)
