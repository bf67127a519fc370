"""Water/fat dictionary matching (Rensonnet et al. 2021, eq. 1-4).

Each voxel is the sum of one water and one fat atom that share B1 and the field offset. Water and fat are received
through the same coil phase, so the model is x = e^{i phi} (c_w w + c_f f) with real weights: for a fixed pair the
optimal phase is the leading eigenvector of a 2x2 matrix, so every (voxel, water atom, fat atom) triple is scored in
closed form, elementwise. The winning pair's weights are then made non-negative (NNLS with two unknowns), and
FF = (c_f / ||s_f||) / (c_w / ||s_w|| + c_f / ||s_f||), a proton-density fat fraction.

Search. The pairs form a grid of six axes (water T1, water T2, fat T1, fat T2, B1, field offset; 267k pairs on the
default complex grid). ``search="exhaustive"`` scores all of them. ``"fast"`` (default) scores a coarse sub-grid
(7,200 pairs), keeps the best pair of each of the three best (B1, offset) groups and moves each to its best
neighbour among the 3^5 around it until none is better: 8-9x faster, and as good as the exhaustive pair (to float32
precision) in 99.5 % of voxels (benchmarks/water_fat_matching.py). Its misses lie along the T2-B1 ridge, which is
why the coarse grid keeps every water T2 value and starts from three groups (92.5 % with every 2nd T2 and two).

Magnitude-only data follow the exact non-linear model |x| = c |(1 - FF) s_w + FF s_f| instead: mixture atoms on
an FF grid, then a fine FF search for the winning pair (a linear NNLS on magnitude atoms, which ignores the
water-fat interference that TE cycling creates, was measured at 7.5 points median FF error noise-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.mapping.dictionary import MRFDictionary
from pipelines.mapping.matching import (
    DEFAULT_ENERGY,
    DEFAULT_MEMORY_BYTES,
    SEARCHES,
    MatchResult,
    _as_signals,
    _chunks,
    _norm,
    _prepare,
    _truncated,
    weak_voxels,
)

# Coarse sub-grid of the fast search: every n-th value along water T1, water T2, fat T1, fat T2, B1, field offset
# (the last value of each axis is always kept). Neighbouring water T1 values are 4 % apart on the default grid.
_COARSE = (4, 1, 4, 1, 2, 2)
_CLIMB = 12
_STARTS = 3
# Voxels per pass: their inner products with every atom ([voxels, 30k] complex) stay at ~60 MB.
_VOXEL_CHUNK = 256


def _pair_energy(aw: torch.Tensor, af: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Energy of x explained by x ~ e^{i phi}(c_w w + c_f f) with the best phase and real weights.

    ``aw`` = <w, x>, ``af`` = <f, x> (complex), ``r`` = Re<w, f>, broadcastable. With M = [[1, r], [r, 1]] and
    P u = Re(e^{-i phi} [aw, af]) for u = (cos phi, sin phi), the energy is max_u u^T P^T M^-1 P u: the largest
    eigenvalue of a symmetric 2x2 matrix, (t + |z|) / (2 det) with t = |aw|^2 + |af|^2 - 2 r Re(aw conj af) and
    z = aw^2 + af^2 - 2 r aw af."""
    p11, p12, p21, p22 = aw.real, aw.imag, af.real, af.imag
    a_re, a_im = p11 * p11 - p12 * p12, 2 * p11 * p12  # aw^2
    b_re, b_im = p21 * p21 - p22 * p22, 2 * p21 * p22  # af^2
    m_re, m_im = p11 * p21 - p12 * p22, p11 * p22 + p12 * p21  # aw af
    t = (p11 * p11 + p12 * p12) + (p21 * p21 + p22 * p22) - 2 * r * (p11 * p21 + p12 * p22)
    z_re = a_re + b_re - 2 * r * m_re
    z_im = a_im + b_im - 2 * r * m_im
    return (t + torch.sqrt(z_re * z_re + z_im * z_im)) / (2 * (1 - r * r).clamp_min(1e-6))


def _pair_weights(aw: torch.Tensor, af: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real weights (c_w, c_f) of the best-phase fit of :func:`_pair_energy`, same shapes: M^-1 P u for the
    leading eigenvector u, with the sign that makes c_w + c_f positive."""
    det = (1 - r * r).clamp_min(1e-6)
    p11, p12, p21, p22 = aw.real, aw.imag, af.real, af.imag
    q11 = p11 * p11 + p21 * p21 - 2 * r * p11 * p21
    q22 = p12 * p12 + p22 * p22 - 2 * r * p12 * p22
    q12 = p11 * p12 + p21 * p22 - r * (p11 * p22 + p21 * p12)
    half_diff = (q11 - q22) / 2
    disc = torch.sqrt(half_diff**2 + q12**2)
    ux, uy = q12, disc - half_diff
    small = (ux.abs() + uy.abs()) < 1e-20
    ux, uy = torch.where(small, torch.ones_like(ux), ux), torch.where(small, torch.zeros_like(uy), uy)
    norm = torch.sqrt(ux**2 + uy**2)
    ux, uy = ux / norm, uy / norm
    bw, bf = p11 * ux + p12 * uy, p21 * ux + p22 * uy
    cw, cf = (bw - r * bf) / det, (bf - r * bw) / det
    flip = (cw + cf) < 0
    return torch.where(flip, -cw, cw), torch.where(flip, -cf, cf)


@dataclass
class _PairGrid:
    """The water and fat atoms on their shared grid, for both searches.

    ``groups``: (water rows, fat rows) per (B1, field offset) value, the pairs the exhaustive search scores.
    ``water_at``/``fat_at``: each compartment's grid (water T1, T2, B1, offset; fat T1, T2, B1, offset) padded by one
    cell of -1 on every side and flattened, so that a neighbour off the grid reads -1; ``water_pos``/``fat_pos``
    give each atom's flat position there. ``steps``: the 3^5 moves as flat offsets into each grid, ``coarse``:
    the coarse sub-grid's (water rows, fat rows) per coarse (B1, offset) value.
    """

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    water_at: torch.Tensor
    fat_at: torch.Tensor
    water_pos: torch.Tensor
    fat_pos: torch.Tensor
    water_steps: torch.Tensor
    fat_steps: torch.Tensor
    coarse: list[tuple[torch.Tensor, torch.Tensor]]


def _coarse_index(n: int, step: int) -> np.ndarray:
    idx = np.arange(0, n, step)
    return idx if idx[-1] == n - 1 else np.append(idx, n - 1)


def _padded(cells: np.ndarray, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lookup of the grid padded by one cell per side, flat position of each cell, strides)."""
    shape = np.array(sizes) + 2
    strides = np.array([int(np.prod(shape[j + 1 :])) for j in range(len(sizes))])
    pos = ((cells + 1) * strides).sum(1)
    lookup = np.full(int(np.prod(shape)), -1, dtype=np.int64)
    lookup[pos] = np.arange(cells.shape[0])
    return lookup, pos, strides


def _pair_grid(dictionary: MRFDictionary, device: torch.device) -> _PairGrid:
    key = ("water_fat_grid", str(device))
    hit = dictionary.search_cache.get(key)
    if isinstance(hit, _PairGrid):
        return hit
    pw, pf = dictionary.params["water"], dictionary.params["fat"]
    # Shared axes: B1 and the field offset must have the same values in both compartments to pair cells.
    shared = [np.union1d(pw[:, j], pf[:, j]) for j in (2, 3)]
    own_w = [np.unique(pw[:, j]) for j in (0, 1)]
    own_f = [np.unique(pf[:, j]) for j in (0, 1)]
    axes_w, axes_f = own_w + shared, own_f + shared
    cell_w = np.stack([np.searchsorted(a, pw[:, j]) for j, a in enumerate(axes_w)], 1)
    cell_f = np.stack([np.searchsorted(a, pf[:, j]) for j, a in enumerate(axes_f)], 1)
    water_at, water_pos, sw = _padded(cell_w, tuple(a.size for a in axes_w))
    fat_at, fat_pos, sf = _padded(cell_f, tuple(a.size for a in axes_f))
    # Moves of -1/0/+1 along every axis with more than one value (a one-value axis never moves).
    sizes = [a.size for a in own_w] + [a.size for a in own_f] + [a.size for a in shared]
    ranges = [[-1, 0, 1] if n > 1 else [0] for n in sizes]
    moves = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 6)
    water_steps = moves[:, [0, 1, 4, 5]] @ sw
    fat_steps = moves[:, [2, 3, 4, 5]] @ sf

    def rows_of(cells: np.ndarray, sel: list[np.ndarray], b: int, d: int) -> np.ndarray:
        hit = np.isin(cells[:, 0], sel[0]) & np.isin(cells[:, 1], sel[1]) & (cells[:, 2] == b) & (cells[:, 3] == d)
        return np.flatnonzero(hit)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)

    groups, coarse = [], []
    all_w = [np.arange(a.size) for a in own_w]
    all_f = [np.arange(a.size) for a in own_f]
    sub_w = [_coarse_index(a.size, s) for a, s in zip(own_w, _COARSE[:2], strict=True)]
    sub_f = [_coarse_index(a.size, s) for a, s in zip(own_f, _COARSE[2:4], strict=True)]
    sub_shared = [_coarse_index(a.size, s) for a, s in zip(shared, _COARSE[4:], strict=True)]
    for b in range(shared[0].size):
        for d in range(shared[1].size):
            w_rows, f_rows = rows_of(cell_w, all_w, b, d), rows_of(cell_f, all_f, b, d)
            if w_rows.size and f_rows.size:
                groups.append((t(w_rows), t(f_rows)))
            if b in sub_shared[0] and d in sub_shared[1]:
                cw_rows, cf_rows = rows_of(cell_w, sub_w, b, d), rows_of(cell_f, sub_f, b, d)
                if cw_rows.size and cf_rows.size:
                    coarse.append((t(cw_rows), t(cf_rows)))
    if not groups:
        raise ValueError("the water and fat grids share no (B1, field offset) value")
    grid = _PairGrid(groups, t(water_at), t(fat_at), t(water_pos), t(fat_pos), t(water_steps), t(fat_steps), coarse)
    dictionary.search_cache[key] = grid
    return grid


@dataclass
class _PairAtoms:
    """Both compartments' atoms at one rank (truncated, renormalised), and Re<w, f> of every pair.

    ``rho[i, c]``: water atom i against the fat atom in cell c (fat T1 x fat T2) of i's own (B1, offset);
    ``fat_cell``: each fat atom's c. ``group_rho``/``coarse_rho``: the same per group of the two searches."""

    water: torch.Tensor
    fat: torch.Tensor
    kept_water: torch.Tensor
    kept_fat: torch.Tensor
    rho: torch.Tensor
    fat_cell: torch.Tensor
    group_rho: list[torch.Tensor]
    coarse_rho: list[torch.Tensor]


def _pair_atoms(dictionary: MRFDictionary, grid: _PairGrid, r: int) -> _PairAtoms:
    comp = dictionary.complex
    key = ("water_fat_atoms", r, str(comp.basis.device))
    hit = dictionary.search_cache.get(key)
    if isinstance(hit, _PairAtoms):
        return hit
    (w, kept_w), (f, kept_f) = _truncated(comp.coeffs["water"], r), _truncated(comp.coeffs["fat"], r)
    pf = dictionary.params["fat"]
    own = np.unique(pf[:, :2], axis=0, return_inverse=True)[1].reshape(-1)
    fat_cell = torch.as_tensor(own, device=w.device)
    rho = torch.zeros((w.shape[0], int(own.max()) + 1), device=w.device)
    for wi, fi in grid.groups:
        rho[wi[:, None], fat_cell[fi][None]] = (w[wi].conj() @ f[fi].T).real

    def per_group(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [rho[wi][:, fat_cell[fi]] for wi, fi in groups]

    atoms = _PairAtoms(w, f, kept_w, kept_f, rho, fat_cell, per_group(grid.groups), per_group(grid.coarse))
    dictionary.search_cache[key] = atoms
    return atoms


def _best_in_groups(
    aw: torch.Tensor,
    af: torch.Tensor,
    groups: list[tuple[torch.Tensor, torch.Tensor]],
    rhos: list[torch.Tensor],
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(energy, water row, fat row), each [voxels, keep]: the best pair of each of the ``keep`` groups whose best
    pairs score highest (keep = 1: the best pair of all). ``aw``/``af``: <atom, x> for every atom [voxels, atoms]."""
    n, device = aw.shape[0], aw.device
    best = torch.full((n, keep), -1.0, device=device)
    best_w = torch.zeros((n, keep), dtype=torch.long, device=device)
    best_f = torch.zeros((n, keep), dtype=torch.long, device=device)
    slots = torch.arange(keep, device=device)[None]
    for (wi, fi), rho in zip(groups, rhos, strict=True):
        e = _pair_energy(aw.index_select(1, wi)[:, :, None], af.index_select(1, fi)[:, None, :], rho[None])
        val, flat = e.reshape(n, -1).max(dim=1)
        # This group's best replaces the weakest of the kept ones where it beats it.
        low, slot = best.min(dim=1)
        better = (val > low)[:, None] & (slots == slot[:, None])
        best = torch.where(better, val[:, None], best)
        best_w = torch.where(better, wi[flat // fi.numel()][:, None], best_w)
        best_f = torch.where(better, fi[flat % fi.numel()][:, None], best_f)
    return best, best_w, best_f


def _climb(
    aw: torch.Tensor,
    af: torch.Tensor,
    atoms: _PairAtoms,
    grid: _PairGrid,
    best: torch.Tensor,
    iw: torch.Tensor,
    jf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each voxel's pair to its best grid neighbour (3^5 moves) until none is better, at most _CLIMB times."""
    best, iw, jf = best.clone(), iw.clone(), jf.clone()
    active = torch.arange(aw.shape[0], device=aw.device)
    for _ in range(_CLIMB):
        if active.numel() == 0:
            break
        cw = grid.water_at[grid.water_pos[iw[active]][:, None] + grid.water_steps[None]]  # [v, moves]
        cf = grid.fat_at[grid.fat_pos[jf[active]][:, None] + grid.fat_steps[None]]
        valid = (cw >= 0) & (cf >= 0)
        cw, cf = cw.clamp_min(0), cf.clamp_min(0)
        rho = atoms.rho.take(cw * atoms.rho.shape[1] + atoms.fat_cell.take(cf))
        # Flat takes: indexing rows of aw first would copy them whole (30k atoms per voxel).
        a_w = aw.reshape(-1).take(active[:, None] * aw.shape[1] + cw)
        a_f = af.reshape(-1).take(active[:, None] * af.shape[1] + cf)
        e = _pair_energy(a_w, a_f, rho).masked_fill(~valid, -1.0)
        val, k = e.max(dim=1)
        moved = val > best[active] * (1 + 1e-6)
        best[active] = torch.where(moved, val, best[active])
        iw[active] = torch.where(moved, cw.gather(1, k[:, None])[:, 0], iw[active])
        jf[active] = torch.where(moved, cf.gather(1, k[:, None])[:, 0], jf[active])
        active = active[moved]
    return best, iw, jf


def _search(
    xr: torch.Tensor, atoms: _PairAtoms, grid: _PairGrid, exhaustive: bool, weak: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(explained energy, water row, fat row) of the best pair per voxel. Voxels flagged ``weak`` (background the
    maps mask) take the best pair of one coarse (B1, offset) group: no full GEMM, no climb."""
    out = [torch.empty(xr.shape[0], device=xr.device)] + [
        torch.empty(xr.shape[0], dtype=torch.long, device=xr.device) for _ in range(2)
    ]
    wc, fc = atoms.water.conj().T, atoms.fat.conj().T
    if weak is not None and bool(weak.any()):
        groups, rhos = (grid.coarse, atoms.coarse_rho) if grid.coarse else (grid.groups, atoms.group_rho)
        (wi, fi), rho = groups[len(groups) // 2], rhos[len(groups) // 2]
        rows = torch.nonzero(weak)[:, 0]
        xw = xr[rows]
        one = [(torch.arange(wi.numel(), device=xr.device), torch.arange(fi.numel(), device=xr.device))]
        e, iw, jf = _best_in_groups(xw @ wc[:, wi], xw @ fc[:, fi], one, [rho], 1)
        for o, t in zip(out, (e[:, 0], wi[iw[:, 0]], fi[jf[:, 0]]), strict=True):
            o[rows] = t
        xr_rows = torch.nonzero(~weak)[:, 0]
    else:
        xr_rows = None
    xs = xr if xr_rows is None else xr[xr_rows]
    for v0 in _chunks(xs.shape[0], _VOXEL_CHUNK):
        xc = xs[v0 : v0 + _VOXEL_CHUNK]
        aw, af = xc @ wc, xc @ fc  # every atom's <atom, x>: one GEMM, then the pairs only gather
        if exhaustive or not grid.coarse:
            found = [t[:, 0] for t in _best_in_groups(aw, af, grid.groups, atoms.group_rho, 1)]
        else:
            # Climb from the best coarse pair of each of the _STARTS best (B1, offset) groups; keep the best end.
            e, iw, jf = _best_in_groups(aw, af, grid.coarse, atoms.coarse_rho, _STARTS)
            # Fewer coarse groups than starts: the empty slots (energy -1, rows 0 that need not share a group)
            # start from the best pair instead.
            top, empty = e.argmax(1, keepdim=True), e < 0
            starts = [torch.where(empty, t.gather(1, top), t) for t in (e, iw, jf)]
            ends = [_climb(aw, af, atoms, grid, *(t[:, k] for t in starts)) for k in range(_STARTS)]
            pick = torch.stack([end[0] for end in ends], 1).argmax(1, keepdim=True)
            found = [torch.stack([end[j] for end in ends], 1).gather(1, pick)[:, 0] for j in range(3)]
        at = slice(v0, v0 + xc.shape[0]) if xr_rows is None else xr_rows[v0 : v0 + xc.shape[0]]
        for o, t in zip(out, found, strict=True):
            o[at] = t
    return out[0], out[1], out[2]


def match_water_fat(
    x: torch.Tensor | np.ndarray,
    dictionary: MRFDictionary,
    *,
    magnitude: bool = False,
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    coefficients: bool = False,
    search: str = "fast",
    coarse_below: float = 0.0,
) -> MatchResult:
    """Best (water atom, fat atom) pair with its weights per fingerprint; see the module docstring.

    ``coefficients=True``: ``x`` holds complex coefficients [voxels, K] in the dictionary's basis (see
    :func:`pipelines.mapping.matching.match`). ``search``: ``fast`` (coarse sub-grid, then a climb) or
    ``exhaustive`` (every pair). ``coarse_below`` > 0 (fast search): voxels whose |x| is below that fraction of the
    99th percentile take the best pair of one coarse (B1, offset) group (background the maps will mask).

    Magnitude data cannot be fitted linearly (|c_w s_w + c_f s_f| is not linear in the weights where water and
    fat interfere, which is what the TE cycling of a T1-FF schedule creates): they go to
    :func:`_match_water_fat_magnitude`, which matches mixture atoms on an FF grid and refines FF per voxel.
    """
    if not {"water", "fat"} <= set(dictionary.params):
        raise ValueError("water/fat matching needs a dictionary with 'water' and 'fat' compartments")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {search!r}")
    if magnitude:
        return _match_water_fat_magnitude(x, dictionary, energy=energy, memory_bytes=memory_bytes)
    if coefficients:
        comp, norms = dictionary.complex, dictionary.norms
        device = comp.basis.device
        x = _as_signals(x, False, device)
        r = min(x.shape[1], comp.basis.shape[1]) if rank is None else min(rank, x.shape[1], comp.basis.shape[1])
        x = x[:, :r]
        basis = torch.eye(r, dtype=x.dtype, device=device)  # already in the subspace
    else:
        x, comp, r, norms = _prepare(x, dictionary, False, rank, energy)
        device = comp.basis.device
        basis = comp.basis[:, :r]
    pw, pf = dictionary.params["water"], dictionary.params["fat"]
    grid = _pair_grid(dictionary, device)
    atoms = _pair_atoms(dictionary, grid, r)
    w_all, f_all, kept_w, kept_f = atoms.water, atoms.fat, atoms.kept_water, atoms.kept_fat
    xr = torch.cat([x[v0 : v0 + 4096] @ basis for v0 in _chunks(x.shape[0], 4096)]) if x.shape[0] else x @ basis
    exhaustive = search == "exhaustive"
    best, best_w, best_f = _search(xr, atoms, grid, exhaustive, None if exhaustive else weak_voxels(xr, coarse_below))
    w, f = w_all[best_w], f_all[best_f]
    aw, af = (xr * w.conj()).sum(1), (xr * f.conj()).sum(1)
    cw, cf = _pair_weights(aw, af, (w.conj() * f).sum(1).real)
    cw, cf, explained = _nonnegative(aw, af, cw, cf, best)
    pw_best, pf_best = pw[best_w.cpu().numpy()], pf[best_f.cpu().numpy()]
    nw, nf = norms["water"][best_w] * kept_w[best_w], norms["fat"][best_f] * kept_f[best_f]
    pd_w, pd_f = cw / nw, cf / nf
    total = pd_w + pd_f
    ff = torch.where(total > 0, pd_f / total.clamp_min(1e-30), torch.zeros_like(total))
    x_norm = _norm(x).clamp_min(1e-30)
    resid = torch.sqrt(torch.clamp(1 - explained / x_norm**2, min=0))
    return MatchResult(
        pw_best[:, 0],
        pw_best[:, 1],
        pw_best[:, 2],
        pw_best[:, 3],
        total.cpu().numpy(),
        resid.cpu().numpy(),
        r,
        ff=ff.cpu().numpy(),
        t1_fat_ms=pf_best[:, 0],
        t2_fat_ms=pf_best[:, 1],
    )


def _nonnegative(
    aw: torch.Tensor, af: torch.Tensor, cw: torch.Tensor, cf: torch.Tensor, explained: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enforce c_w, c_f >= 0 for the chosen pair: where one weight is negative, refit the other alone (one atom
    with a free phase: its weight is |<d, x>|)."""
    neg = (cw < 0) | (cf < 0)
    if not bool(neg.any()):
        return cw, cf, explained
    sw, sf = aw.abs(), af.abs()
    water_only = sw >= sf
    cw = torch.where(neg, torch.where(water_only, sw, torch.zeros_like(sw)), cw)
    cf = torch.where(neg, torch.where(water_only, torch.zeros_like(sf), sf), cf)
    explained = torch.where(neg, torch.maximum(sw, sf) ** 2, explained)
    return cw, cf, explained


FF_COARSE_STEP = 0.05
FF_FINE_STEP = 0.0025


def _full_atoms(dictionary: MRFDictionary, compartment: str, index: torch.Tensor) -> torch.Tensor:
    """Un-normalised complex atoms [n, frames] rebuilt from the complex compression (kept to 1 - 1e-8 energy)."""
    comp = dictionary.complex
    return (comp.coeffs[compartment][index] @ comp.basis.conj().T) * dictionary.norms[compartment][index, None]


def _mixtures(sw: torch.Tensor, sf: torch.Tensor, ff: torch.Tensor) -> torch.Tensor:
    """|(1 - FF) s_w + FF s_f| for every water atom, fat atom and FF value: [W, F, K, frames], unit norm."""
    m = ((1 - ff)[None, None, :, None] * sw[:, None, None, :] + ff[None, None, :, None] * sf[None, :, None, :]).abs()
    return m / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-30)


def _match_water_fat_magnitude(
    x: torch.Tensor | np.ndarray, dictionary: MRFDictionary, *, energy: float, memory_bytes: int
) -> MatchResult:
    """Water/fat from magnitudes with the exact model |x| = c |(1 - FF) s_w + FF s_f|.

    1. Mixture atoms on a coarse FF grid (every water/fat pair sharing B1), compressed by their own SVD.
    2. Best (water, fat, FF) per voxel by normalised inner product in that subspace.
    3. FF refined on a fine grid for the winning pair in the full time domain.
    """
    x, _, _, _ = _prepare(x, dictionary, True, None, energy)
    device = x.device
    pw, pf = dictionary.params["water"], dictionary.params["fat"]
    ff_grid = torch.arange(0, 1 + 1e-9, FF_COARSE_STEP, device=device, dtype=torch.float32)
    groups = []
    for key in np.unique(pw[:, 2:4], axis=0):
        w_rows = np.flatnonzero(np.all(pw[:, 2:4] == key, axis=1))
        f_rows = np.flatnonzero(np.all(pf[:, 2:4] == key, axis=1))
        if w_rows.size and f_rows.size:
            wi_t, fi_t = torch.as_tensor(w_rows, device=device), torch.as_tensor(f_rows, device=device)
            groups.append((wi_t, fi_t, _full_atoms(dictionary, "water", wi_t), _full_atoms(dictionary, "fat", fi_t)))
    # 1. A basis for the mixtures: eigenvectors of their Gram matrix.
    n = x.shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for _, _, sw, sf in groups:
        m = _mixtures(sw, sf, ff_grid).reshape(-1, n).double()
        gram += m.T @ m
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    cum = torch.cumsum(evals, 0) / evals.sum()
    r = int(min(int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype))) + 1, n))
    basis = evecs[:, :r].float()
    # 2. Exhaustive search over (pair, coarse FF).
    n_vox = x.shape[0]
    best = torch.full((n_vox,), -1.0, device=device)
    best_w = torch.zeros(n_vox, dtype=torch.long, device=device)
    best_f = torch.zeros(n_vox, dtype=torch.long, device=device)
    best_k = torch.zeros(n_vox, dtype=torch.long, device=device)
    xr = x @ basis
    biggest = max(int(w.numel() * f.numel()) for w, f, _, _ in groups) * ff_grid.numel()
    v_chunk = max(1, min(n_vox, int(memory_bytes // (3 * 4 * biggest))))
    for wi, fi, sw, sf in groups:
        mr = _mixtures(sw, sf, ff_grid).reshape(-1, n) @ basis  # [W*F*K, r]
        for v0 in _chunks(n_vox, v_chunk):
            ip = xr[v0 : v0 + v_chunk] @ mr.T
            val, flat = ip.max(dim=1)
            sl = slice(v0, v0 + ip.shape[0])
            better = val > best[sl]
            k = flat % ff_grid.numel()
            pair = flat // ff_grid.numel()
            best[sl] = torch.where(better, val, best[sl])
            best_w[sl] = torch.where(better, wi[pair // fi.numel()], best_w[sl])
            best_f[sl] = torch.where(better, fi[pair % fi.numel()], best_f[sl])
            best_k[sl] = torch.where(better, k, best_k[sl])
    # 3. Fine FF for the chosen pair, full time domain: FF within one coarse step of the coarse optimum.
    fine = torch.arange(-FF_COARSE_STEP, FF_COARSE_STEP + 1e-9, FF_FINE_STEP, device=device)
    x_norm = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-30)
    ff = torch.empty(n_vox, device=device)
    scale = torch.empty(n_vox, device=device)
    explained = torch.empty(n_vox, device=device)
    for v0 in _chunks(n_vox, 1024):
        sl = slice(v0, v0 + 1024)
        sw = _full_atoms(dictionary, "water", best_w[sl])
        sf = _full_atoms(dictionary, "fat", best_f[sl])
        cand = (ff_grid[best_k[sl]][:, None] + fine[None, :]).clamp(0, 1)  # [v, L]
        mix = ((1 - cand)[..., None] * sw[:, None, :] + cand[..., None] * sf[:, None, :]).abs()
        mnorm = torch.linalg.vector_norm(mix, dim=-1).clamp_min(1e-30)
        ip = (mix * x[sl][:, None, :]).sum(-1) / mnorm
        val, j = ip.max(dim=1)
        rows = torch.arange(val.numel(), device=device)
        ff[sl] = cand[rows, j]
        scale[sl] = val / mnorm[rows, j]  # |x| ~ scale * |(1 - FF) s_w + FF s_f|
        explained[sl] = val.clamp_min(0) ** 2
    resid = torch.sqrt(torch.clamp(1 - explained / x_norm**2, min=0))
    pw_best, pf_best = pw[best_w.cpu().numpy()], pf[best_f.cpu().numpy()]
    notes = ["matched on magnitudes: phase was not available; water/fat from magnitude mixture atoms"]
    return MatchResult(
        pw_best[:, 0],
        pw_best[:, 1],
        pw_best[:, 2],
        pw_best[:, 3],
        scale.cpu().numpy(),
        resid.cpu().numpy(),
        r,
        ff=ff.cpu().numpy(),
        t1_fat_ms=pf_best[:, 0],
        t2_fat_ms=pf_best[:, 1],
        notes=notes,
    )
