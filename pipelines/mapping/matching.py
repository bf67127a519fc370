"""Dictionary matching (Ma et al., Nature 2013) in an SVD subspace (McGivney et al., IEEE TMI 2014).

Single compartment: the atom with the largest normalised inner product |<d, x>| wins; M0 = <d, x> / ||s||
where s is the un-normalised atom; the fit quality is the relative residual ||x - M0 s|| / ||x||.

Water/fat pairs (two compartments) are matched in :mod:`pipelines.mapping.water_fat`.

Memory: voxels and atoms are processed in chunks sized so the largest temporary stays under ``memory_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.mapping.dictionary import Compression, MRFDictionary

DEFAULT_ENERGY = 1 - 1e-4
DEFAULT_MEMORY_BYTES = 2 * 1024**3
# Working set of one voxels x atoms product. The budget above is a cap; chunks that fit in cache are ~2x
# faster than ones that fill the budget (measured: benchmarks/matching.py).
_WORK_BYTES = 16 * 1024**2


@dataclass
class MatchResult:
    """Per-voxel estimates (numpy, [voxels]); ``ff`` and the fat parameters only for water/fat matching."""

    t1_ms: np.ndarray
    t2_ms: np.ndarray
    b1: np.ndarray
    df_hz: np.ndarray
    m0: np.ndarray  # complex (or real for magnitude data): x ~ m0 * un-normalised atom(s)
    residual: np.ndarray  # ||x - fit|| / ||x||
    rank: int
    ff: np.ndarray | None = None
    t1_fat_ms: np.ndarray | None = None
    t2_fat_ms: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Row norms; complex rows through their real view (35x faster than the complex kernel on CPU)."""
    return (
        torch.linalg.vector_norm(torch.view_as_real(x), dim=(1, 2))
        if x.is_complex()
        else torch.linalg.vector_norm(x, dim=1)
    )


def _as_signals(x: torch.Tensor | np.ndarray, magnitude: bool, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, device=device)
    flat = torch.view_as_real(x) if x.is_complex() else x
    # A finite sum proves every value finite (20x cheaper than the elementwise test, which runs otherwise).
    if not bool(torch.isfinite(flat.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{int((~torch.isfinite(x)).sum())} fingerprint values are NaN or infinite")
    if magnitude:
        return x.abs().float()
    return x.to(torch.complex64)


def _truncated(coeffs: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms in the first r components, renormalised, and the norm each kept (to rescale M0).

    Without renormalising, the argmax favours atoms the leading components happen to represent well
    (agreement with brute force at the default rank: 83 % -> 94 %, benchmarks/matching.py).
    """
    a = coeffs[:, :r]
    kept = _norm(a).clamp_min(1e-12)
    return a / kept[:, None], kept


def _work_chunks(n_vox: int, n_atoms: int, itemsize: int, memory_bytes: int) -> tuple[int, int]:
    work = max(1024, min(_WORK_BYTES, memory_bytes // 3))
    v_chunk = max(1, min(n_vox, 1024))
    a_chunk = max(1, min(n_atoms, work // (itemsize * v_chunk)))
    return v_chunk, a_chunk


def _prepare(
    x: torch.Tensor | np.ndarray, dictionary: MRFDictionary, magnitude: bool, rank: int | None, energy: float
) -> tuple[torch.Tensor, Compression, int, dict[str, torch.Tensor]]:
    """Checked signals on the dictionary's device, the compression to use, its rank and the atom norms."""
    comp = dictionary.magnitude if magnitude else dictionary.complex
    r = rank if rank is not None else comp.rank_for_energy(energy)
    r = max(1, min(r, comp.basis.shape[1]))
    norms = dictionary.magnitude_norms if magnitude else dictionary.norms
    x = _as_signals(x, magnitude, comp.basis.device)
    if x.shape[-1] != comp.basis.shape[0]:
        raise ValueError(f"fingerprints have {x.shape[-1]} frames but the dictionary has {comp.basis.shape[0]}")
    return x, comp, r, norms


def _chunks(n: int, size: int) -> range:
    return range(0, n, max(1, size))


SEARCHES = ("fast", "exhaustive")
# Grids smaller than this are searched exhaustively: the block pass would not pay for itself.
_FAST_MIN_ATOMS = 20000
# Grid blocks of the fast search (T1, T2, B1 cells: 64 atoms) and how many of them each voxel searches in full:
# where the correlation has long flat ridges (low rank; magnitudes, which drop the phase), more blocks. Measured
# (benchmarks/fast_matching.py, tests/unit/test_fast_matching.py): at rank 8-12, 16 blocks find the exhaustive winner
# (or a float32 tie) in 98 % of voxels, 24 in 99 %+; complex data at rank 24: 16 blocks, 99.8 %; magnitudes on a grid
# with 0.05 B1 steps: 16 blocks left the median T2 error 3.6 % (relative) above the exhaustive search's.
_BLOCK = (4, 4, 4)
_LOW_RANK = 12


def _top_blocks(rank: int, magnitude: bool) -> int:
    return 24 if rank <= _LOW_RANK or magnitude else 16


# Chunk of voxels per block pass: keeps the [voxels, blocks] scores in cache.
_BLOCK_CHUNK = 256


@dataclass
class _BlockIndex:
    """A compartment's atoms in grid blocks of ``_BLOCK`` cells (the groups of Cauley et al. 2015, taken as
    contiguous cells of the regular grid, where neighbouring atoms correlate > 0.998 at the default steps).

    ``table[b]``: the atoms of block b (-1: none); ``blocks[b]``: their truncated coefficients (zero for none);
    ``reps[b]``: the block's leading right singular vector. When every atom is real up to one global phase
    (FISP, and all magnitude atoms) the search runs in real arithmetic on the de-rotated atoms: a real product
    costs a quarter of a complex one, and the block scores need no modulus. ``phase`` is that de-rotation
    (None: the atoms are complex). ``lookup``/``pos``/``strides``: the grid padded by one cell of -1 on each side
    and flattened, for the final hill climb over the 26 neighbours of each winner.
    """

    atoms: torch.Tensor  # [atoms, r] as searched (real or complex)
    table: torch.Tensor  # [blocks, cells] long
    blocks: torch.Tensor  # [blocks, cells, r]
    reps: torch.Tensor  # [blocks, r]
    phase: complex | None
    lookup: torch.Tensor
    pos: torch.Tensor
    neighbours: torch.Tensor  # flat offsets of the 3 x 3 x 3 neighbourhood


def _block_index(dictionary: MRFDictionary, compartment: str, atoms: torch.Tensor, magnitude: bool) -> _BlockIndex:
    cache = dictionary.search_cache
    key = ("blocks", compartment, magnitude, atoms.shape[1], str(atoms.device))
    hit = cache.get(key)
    if isinstance(hit, _BlockIndex):
        return hit
    device = atoms.device
    phase = None
    if atoms.is_complex():
        rot = torch.exp(-0.5j * torch.angle((atoms.to(torch.complex128) ** 2).sum())).to(atoms.dtype)
        turned = atoms * rot
        if float(torch.linalg.vector_norm(turned.imag)) <= 1e-4 * float(torch.linalg.vector_norm(turned.real)):
            atoms, phase = turned.real.contiguous(), complex(rot)
    p = dictionary.params[compartment]
    axes = [np.unique(p[:, j]) for j in range(4)]
    cell = np.stack([np.searchsorted(a, p[:, j]) for j, a in enumerate(axes)], 1)
    size = np.array(_BLOCK + (1,))
    per_axis = (np.array([a.size for a in axes]) + size - 1) // size
    block_of = np.ravel_multi_index((cell // size).T, per_axis)
    used, inverse = np.unique(block_of, return_inverse=True)
    table = np.full((used.size, int(np.prod(size))), -1, dtype=np.int64)
    table[inverse, np.ravel_multi_index((cell % size).T, size)] = np.arange(p.shape[0])
    table_t = torch.as_tensor(table, device=device)
    blocks = atoms[table_t.clamp_min(0)] * (table_t >= 0)[..., None]
    rep = torch.linalg.svd(blocks, full_matrices=False)[2][:, 0, :]
    reps = rep.conj() if rep.is_complex() else rep
    # Real reps point along their block's atoms, so a signed score (magnitude data) ranks blocks correctly.
    if not reps.is_complex():
        reps = reps * torch.sign((blocks @ reps[:, :, None]).sum((1, 2)))[:, None]
    shape = np.array([a.size for a in axes]) + 2
    strides = np.array([int(np.prod(shape[j + 1 :])) for j in range(4)])
    pos = ((cell + 1) * strides).sum(1)
    lookup = np.full(int(np.prod(shape)), -1, dtype=np.int64)
    lookup[pos] = np.arange(p.shape[0])
    steps = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
    neighbours = (steps * strides[:3]).sum(1)
    ix = _BlockIndex(
        atoms,
        table_t,
        blocks.contiguous(),
        reps.contiguous(),
        phase,
        torch.as_tensor(lookup, device=device),
        torch.as_tensor(pos, device=device),
        torch.as_tensor(neighbours, device=device),
    )
    cache[key] = ix
    return ix


def _search_form(xr: torch.Tensor, ix: _BlockIndex) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The voxels as the block search reads them: (y, None) to score <a, y> (complex atoms: its modulus; magnitude
    data: signed), or for a real dictionary and complex data (y1, y2), the de-rotated voxel turned by its own phase
    so that y1 carries most of it: |<a, x>|^2 = (a . y1)^2 + (a . y2)^2 exactly, and a . y1 ranks the blocks."""
    if ix.phase is None or not xr.is_complex():
        return xr, None
    y = xr * ix.phase
    y = y * torch.exp(-0.5j * torch.angle((y * y).sum(1)))[:, None]
    return y.real.contiguous(), y.imag.contiguous()


def _scores(a: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor | None) -> torch.Tensor:
    """Exact match score of atoms ``a`` [v, n, r] against each voxel's own ``y`` [v, r]: |<a, x>|^2 (or <a, x>
    for magnitude data); monotone in the exhaustive search's |<a, x>|."""
    if y2 is not None:  # one pass over the atoms for both parts (the gathered atoms dominate the memory traffic)
        return (a @ torch.stack([y1, y2], 2)).square().sum(2)
    ip = (a.conj() @ y1[:, :, None])[..., 0] if a.is_complex() else (a @ y1[:, :, None])[..., 0]
    return ip.real.square() + ip.imag.square() if ip.is_complex() else ip


def _block_pass(y1: torch.Tensor, y2: torch.Tensor | None, ix: _BlockIndex, top: int) -> torch.Tensor:
    """Best atom per voxel among the ``top`` blocks whose representatives score highest."""
    best = torch.empty(y1.shape[0], dtype=torch.long, device=y1.device)
    reps_t = ix.reps.conj().T if ix.reps.is_complex() else ix.reps.T
    signed = y2 is None and not y1.is_complex()
    for v0 in _chunks(y1.shape[0], _BLOCK_CHUNK):
        sl = slice(v0, v0 + _BLOCK_CHUNK)
        s = y1[sl] @ reps_t
        chosen = (s if signed else s.abs()).topk(min(top, s.shape[1]), dim=1, sorted=False).indices  # [v, top]
        cand = ix.table[chosen].reshape(chosen.shape[0], -1)
        sc = _scores(
            ix.blocks[chosen].reshape(cand.shape[0], cand.shape[1], -1), y1[sl], None if y2 is None else y2[sl]
        )
        best[sl] = cand.gather(1, sc.masked_fill(cand < 0, -math.inf).argmax(1, keepdim=True))[:, 0]
    return best


def _fast(xr: torch.Tensor, ix: _BlockIndex, weak: torch.Tensor | None = None, climb: int = 8) -> torch.Tensor:
    """Block search: score every block by its representative, search the best blocks (16-24, by rank) atom by
    atom, then move each winner to its best grid neighbour until none is better (winners on a block's edge).

    At low rank the correlation has long, flat T2-B1 ridges on which noise moves the maximum, so one block (or one
    coarse atom) is not enough: 16-24 blocks along the ridge find the exhaustive winner or an atom whose score
    equals it to float32 precision. Voxels flagged ``weak`` (background the maps mask) search their best block only.
    """
    y1, y2 = _search_form(xr, ix)
    n = y1.shape[0]
    best = torch.empty(n, dtype=torch.long, device=xr.device)
    strong = torch.arange(n, device=xr.device) if weak is None else torch.nonzero(~weak)[:, 0]
    if weak is not None and bool(weak.any()):
        w = torch.nonzero(weak)[:, 0]
        best[w] = _block_pass(y1[w], None if y2 is None else y2[w], ix, 1)
    y1, y2 = y1[strong], None if y2 is None else y2[strong]
    b = _block_pass(y1, y2, ix, _top_blocks(ix.atoms.shape[1], not xr.is_complex()))
    active = torch.arange(strong.numel(), device=xr.device)
    for _ in range(climb):
        if active.numel() == 0:
            break
        cand = ix.lookup[ix.pos[b[active]][:, None] + ix.neighbours[None]]
        sc = _scores(ix.atoms[cand.clamp_min(0)], y1[active], None if y2 is None else y2[active])
        nxt = cand.gather(1, sc.masked_fill(cand < 0, -math.inf).argmax(1, keepdim=True))[:, 0]
        moved = nxt != b[active]
        b[active] = nxt
        active = active[moved]
    best[strong] = b
    return best


def _exhaustive(xr: torch.Tensor, atoms: torch.Tensor, memory_bytes: int) -> torch.Tensor:
    """Index of the atom with the largest |<a, x>| per voxel: chunked GEMM with a running arg-max (the matcher as
    it was before the fast search, kept as the reference)."""
    n_vox, n_atoms = xr.shape[0], atoms.shape[0]
    v_chunk, a_chunk = _work_chunks(n_vox, n_atoms, 8 if atoms.is_complex() else 4, memory_bytes)
    best_idx = torch.empty(n_vox, dtype=torch.long, device=xr.device)
    for v0 in _chunks(n_vox, v_chunk):
        xc = xr[v0 : v0 + v_chunk]
        bv = torch.full((xc.shape[0],), -1.0, device=xr.device)
        bi = torch.zeros(xc.shape[0], dtype=torch.long, device=xr.device)
        for a0 in _chunks(n_atoms, a_chunk):
            ip = xc @ atoms[a0 : a0 + a_chunk].conj().T  # <d, x> (basis orthonormal)
            val, idx = (ip.abs() if ip.is_complex() else ip).max(dim=1)
            better = val > bv
            bv = torch.where(better, val, bv)
            bi = torch.where(better, idx + a0, bi)
        best_idx[v0 : v0 + v_chunk] = bi
    return best_idx


def _in_components(
    x: torch.Tensor | np.ndarray,
    dictionary: MRFDictionary,
    magnitude: bool,
    rank: int | None,
    energy: float,
    compartment: str,
    coefficients: bool,
) -> tuple[torch.Tensor, torch.Tensor, Compression, int, torch.Tensor]:
    """Fingerprints in the dictionary's first r components [voxels, r], their full norms, the compression, r and
    the compartment's atom norms: what every search compares."""
    comp = dictionary.magnitude if magnitude else dictionary.complex
    norms = (dictionary.magnitude_norms if magnitude else dictionary.norms)[compartment]
    device = comp.basis.device
    if coefficients:
        x = _as_signals(x, magnitude, device)
        if magnitude:
            raise ValueError("coefficient matching takes the complex coefficients of a subspace reconstruction")
        r = min(x.shape[1], comp.basis.shape[1]) if rank is None else min(rank, x.shape[1], comp.basis.shape[1])
        xr_all = x[:, :r]
        x_norm = _norm(x)
    else:
        x, comp, r, _ = _prepare(x, dictionary, magnitude, rank, energy)
        basis = comp.basis[:, :r]
        xr_all = (
            torch.cat([x[v0 : v0 + 4096] @ basis for v0 in _chunks(x.shape[0], 4096)])
            if x.shape[0]
            else torch.zeros((0, r), dtype=basis.dtype, device=device)
        )
        x_norm = _norm(x)
    return xr_all, x_norm, comp, r, norms


def weak_voxels(xr: torch.Tensor, below: float) -> torch.Tensor | None:
    """Voxels [n] whose fingerprint norm is below ``below`` times the 99th percentile of all (None for ``below``
    <= 0): background for sure, which the fast searches only place coarsely."""
    if below <= 0 or xr.shape[0] == 0:
        return None
    mag = _norm(xr)
    return mag < below * torch.quantile(mag[:: max(1, xr.shape[0] // 100000)].float(), 0.99)


def match(
    x: torch.Tensor | np.ndarray,
    dictionary: MRFDictionary,
    *,
    magnitude: bool = False,
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
    compartment: str = "water",
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    search: str = "fast",
    coefficients: bool = False,
    report: Callable[[str], None] | None = None,
    coarse_below: float = 0.0,
) -> MatchResult:
    """Best single atom per fingerprint.

    ``x``: fingerprints [voxels, frames] (complex, or magnitudes), or with ``coefficients=True`` their
    coefficients [voxels, K] in the dictionary's own basis (``x @ basis``, what the subspace reconstruction
    makes): matched at rank K without ever forming the frames.

    ``search="exhaustive"`` scores every atom (the reference, the matcher as it was). ``"fast"`` (default) groups
    the grid into blocks of 4 x 4 x 4 (T1, T2, B1) atoms, scores each block by its leading singular vector, searches
    the 16-24 best blocks atom by atom and hill-climbs from the winner (see :func:`_fast`); on the default FISP
    dictionary it is 25-35x faster than the exhaustive search and picks the same atom, or one whose score ties it
    to float32 precision, with the same median T1/T2 errors against truth (benchmarks/fast_matching.py).
    ``coarse_below`` > 0: voxels whose |x| is below that fraction of the 99th percentile search their best block
    only (background the maps will mask).
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {search!r}")
    xr_all, x_norm, comp, r, norms = _in_components(x, dictionary, magnitude, rank, energy, compartment, coefficients)
    device = comp.basis.device
    atoms, kept = _truncated(comp.coeffs[compartment], r)
    fast = search == "fast" and atoms.shape[0] >= _FAST_MIN_ATOMS and xr_all.shape[0] > 0
    ix = _block_index(dictionary, compartment, atoms, magnitude) if fast else None
    n_vox = xr_all.shape[0]
    best_idx = torch.empty(n_vox, dtype=torch.long, device=device)
    block = 16384
    weak = weak_voxels(xr_all, coarse_below) if ix is not None else None
    for v0 in _chunks(n_vox, block):
        xb = xr_all[v0 : v0 + block]
        best_idx[v0 : v0 + block] = (
            _fast(xb, ix, None if weak is None else weak[v0 : v0 + block])
            if ix is not None
            else _exhaustive(xb, atoms, memory_bytes)
        )
        if report is not None and n_vox > block:
            report(
                f"matching: {min(v0 + block, n_vox)}/{n_vox} voxels ({atoms.shape[0]} atoms, "
                f"{'block' if ix is not None else 'exhaustive'} search)"
            )
    best_ip = (xr_all * atoms[best_idx].conj()).sum(1)
    params = dictionary.params[compartment][best_idx.cpu().numpy()]
    m0 = best_ip / (norms[best_idx] * kept[best_idx]).to(best_ip.dtype)
    resid = torch.sqrt(torch.clamp(1 - (best_ip.abs() / x_norm.clamp_min(1e-30)) ** 2, min=0))
    notes = [] if not magnitude else ["matched on magnitudes: phase was not available"]
    return MatchResult(
        params[:, 0], params[:, 1], params[:, 2], params[:, 3], m0.cpu().numpy(), resid.cpu().numpy(), r, notes=notes
    )


def pd_from_m0(m0: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """|M0| scaled so the 99th percentile inside ``mask`` is 1 (a.u.); returns (pd, scale)."""
    a = np.abs(m0)
    ref = a[mask] if mask is not None and mask.any() else a
    scale = float(np.percentile(ref, 99)) if ref.size else 1.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    return (a / scale).astype(np.float32), scale


@dataclass(frozen=True)
class _ParamGrid:
    """A compartment's atoms on their (T1, T2, B1) grid: ``index[i1, i2, ib]`` is the atom, -1 where none (T2 > T1)."""

    index: torch.Tensor
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    b1: np.ndarray


def _param_grid(dictionary: MRFDictionary, compartment: str) -> _ParamGrid | None:
    """The grid of a compartment whose atoms span T1 x T2 x B1 at one field offset (None otherwise), cached."""
    key = ("param_grid", compartment)
    hit = dictionary.search_cache.get(key)
    if isinstance(hit, _ParamGrid):
        return hit
    p = dictionary.params[compartment]
    if np.unique(p[:, 3]).size != 1:
        return None
    axes = [np.unique(p[:, a]) for a in range(3)]
    pos = [np.searchsorted(axes[a], p[:, a]) for a in range(3)]
    index = np.full([a.size for a in axes], -1, dtype=np.int64)
    index[pos[0], pos[1], pos[2]] = np.arange(p.shape[0])
    grid = _ParamGrid(torch.from_numpy(index).to(dictionary.complex.basis.device), *axes)
    dictionary.search_cache[key] = grid
    return grid


def match_in_field(
    x: torch.Tensor | np.ndarray,
    dictionary: MRFDictionary,
    b1: np.ndarray,
    start: MatchResult,
    *,
    magnitude: bool = False,
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
    coefficients: bool = False,
    window: tuple[int, int] = (6, 16),
) -> MatchResult:
    """T1 and T2 matched again with B1 held at ``b1`` [voxels] (a smooth field; see :mod:`pipelines.mapping.b1_field`).

    Each voxel's atom at its B1 is interpolated linearly between the two nearest B1 grid values (EPG fingerprints
    with B1 between 0.05 steps: median T2 error 2.9 % at the nearest grid B1, 0 interpolated; tests/unit/
    test_b1_field.py), and searched over ``window`` = (T1, T2) grid steps either side of ``start``'s match (3 %
    steps: +-18 % in T1, +-48 % in T2). Returns ``start`` unchanged for a dictionary without a B1 axis.
    """
    compartment = "water"
    grid = _param_grid(dictionary, compartment)
    if grid is None or grid.b1.size < 2:
        return start
    xr, x_norm, comp, r, norms = _in_components(x, dictionary, magnitude, rank, energy, compartment, coefficients)
    device = xr.device
    # Un-normalised atoms in the first r components: interpolation between B1 values is of the signals themselves.
    # ||(1-f) s_lo + f s_hi||^2 from each atom's squared norm and its inner product with its B1 neighbour, so the
    # interpolated atoms are never formed (the complex norm kernel alone took 40 % of the search).
    signals = comp.coeffs[compartment][:, :r] * norms[:, None].to(comp.coeffs[compartment].dtype)
    sq = _norm(signals) ** 2
    nxt = torch.full_like(grid.index, -1)
    nxt[:, :, :-1] = grid.index[:, :, 1:]
    pair = torch.full((signals.shape[0],), -1, dtype=torch.long, device=device)
    has = grid.index >= 0
    pair[grid.index[has]] = nxt[has]
    cross = torch.zeros_like(sq)
    ok = pair >= 0
    cross[ok] = (signals[ok].conj() * signals[pair[ok]]).sum(1).real
    pos = np.interp(np.clip(b1, grid.b1[0], grid.b1[-1]), grid.b1, np.arange(grid.b1.size))
    jb = np.minimum(np.floor(pos).astype(np.int64), grid.b1.size - 2)
    frac = torch.as_tensor(pos - jb, dtype=sq.dtype, device=device)
    jb_t = torch.as_tensor(jb, device=device)
    i1 = torch.as_tensor(np.searchsorted(grid.t1_ms, start.t1_ms.clip(grid.t1_ms[0], grid.t1_ms[-1])), device=device)
    i2 = torch.as_tensor(np.searchsorted(grid.t2_ms, start.t2_ms.clip(grid.t2_ms[0], grid.t2_ms[-1])), device=device)
    o1 = torch.arange(-window[0], window[0] + 1, device=device)
    o2 = torch.arange(-window[1], window[1] + 1, device=device)
    n1, n2, _ = grid.index.shape
    t1 = np.empty(xr.shape[0], np.float32)
    t2 = np.empty(xr.shape[0], np.float32)
    m0 = torch.empty(xr.shape[0], dtype=xr.dtype, device=device)
    best_score = torch.empty(xr.shape[0], dtype=sq.dtype, device=device)
    xc = xr.conj().to(signals.dtype)
    for v0 in _chunks(xr.shape[0], 1024):
        sl = slice(v0, v0 + 1024)
        a1 = (i1[sl, None, None] + o1[None, :, None]).expand(-1, -1, o2.numel())
        a2 = (i2[sl, None, None] + o2[None, None, :]).expand(-1, o1.numel(), -1)
        inside = (a1 >= 0) & (a1 < n1) & (a2 >= 0) & (a2 < n2)
        a1c, a2c = a1.clamp(0, n1 - 1), a2.clamp(0, n2 - 1)
        j = jb_t[sl, None, None].expand_as(a1c)
        lo, hi = grid.index[a1c, a2c, j].flatten(1), grid.index[a1c, a2c, j + 1].flatten(1)
        valid = inside.flatten(1) & (lo >= 0) & (hi >= 0)
        lo, hi = lo.clamp_min(0), hi.clamp_min(0)
        f = frac[sl, None]
        # <s, x> = conj(s^T conj(x)): one batched product per B1 neighbour
        ip = ((1 - f) * (signals[lo] @ xc[sl, :, None])[..., 0] + f * (signals[hi] @ xc[sl, :, None])[..., 0]).conj()
        s2 = (1 - f) ** 2 * sq[lo] + f**2 * sq[hi] + 2 * f * (1 - f) * cross[lo]
        s_norm = s2.clamp_min(1e-30).sqrt()
        score = torch.where(valid, ip.abs() / s_norm, torch.full_like(s_norm, -1.0))
        best = score.argmax(1)
        rows = torch.arange(best.numel(), device=device)
        b_lo = lo[rows, best].cpu().numpy()
        t1[sl], t2[sl] = dictionary.params[compartment][b_lo, 0], dictionary.params[compartment][b_lo, 1]
        m0[sl] = (ip[rows, best] / s2[rows, best]).to(m0.dtype)
        best_score[sl] = score[rows, best]
    resid = torch.sqrt(torch.clamp(1 - (best_score / x_norm.clamp_min(1e-30)) ** 2, min=0))
    return MatchResult(
        t1,
        t2,
        np.asarray(b1, dtype=np.float32),
        start.df_hz,
        m0.cpu().numpy(),
        resid.cpu().numpy(),
        r,
        notes=list(start.notes),
    )
