"""MRF dictionaries: EPG fingerprints on a parameter grid, compressed by SVD, cached on disk.

A dictionary holds one or more compartments ("water", "fat") that share one temporal basis, so a voxel's
coefficients can be compared with atoms of every compartment (the multi-contribution model of Rensonnet et
al.). Two compressions are kept: complex atoms (for complex images) and magnitude atoms (for magnitude-only
DICOM input), each with the singular values that let the matcher choose its rank by retained energy.

The cache stores the compressed atoms only (atoms x rank, not atoms x frames) and the full singular-value
spectrum: the default 477k-atom FISP dictionary (1000 frames, rank 32, complex and magnitude) is 195 MB on disk
instead of 5.7 GB of atoms, and loads in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.physics.epg import epg_chunked, epg_fat, epg_fisp
from pipelines.physics.sequences import MRFSequence

log = logging.getLogger(__name__)

# Bump when the physics or the stored layout changes: old cache files are then ignored, never misread.
MODEL_VERSION = "epg-fisp-3"
# Components kept at generation; the matcher truncates to the rank it needs. The default FISP dictionary needs
# rank 22 (complex) / 28 (magnitude) at the matcher's default energy 1 - 1e-4; 32 bounds the cache size.
_MAX_RANK = 32
_KEEP_ENERGY = 1 - 1e-8
PARAM_NAMES = ("t1_ms", "t2_ms", "b1", "df_hz")


def geometric_grid(lo: float, hi: float, step_percent: float) -> tuple[float, ...]:
    """Values from lo to hi (inclusive) with a constant relative step: constant relative quantisation error."""
    n = int(np.ceil(np.log(hi / lo) / np.log1p(step_percent / 100))) + 1
    return tuple(float(v) for v in np.geomspace(lo, hi, n))


def linear_grid(lo: float, hi: float, step: float) -> tuple[float, ...]:
    n = int(round((hi - lo) / step)) + 1
    return tuple(float(v) for v in np.round(np.linspace(lo, hi, n), 6))


@dataclass(frozen=True)
class CompartmentGrid:
    """Parameter grid of one compartment; atoms with T2 > T1 are skipped (unphysical)."""

    t1_ms: tuple[float, ...]
    t2_ms: tuple[float, ...]
    b1: tuple[float, ...] = (1.0,)
    df_hz: tuple[float, ...] = (0.0,)

    def combos(self) -> np.ndarray:
        g = np.stack(np.meshgrid(self.t1_ms, self.t2_ms, self.b1, self.df_hz, indexing="ij"), -1).reshape(-1, 4)
        return g[g[:, 1] <= g[:, 0]].astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(getattr(self, k)) for k in PARAM_NAMES}


@dataclass(frozen=True)
class DictionarySpec:
    """What to simulate: compartments with their grids, the field strength (fat spectrum)."""

    compartments: dict[str, CompartmentGrid]
    field_strength_T: float = 3.0
    # Simulate every n-th value of the evenly spaced T1, T2, B1 axes and interpolate the rest (1: all).
    stride: tuple[int, int, int] = (1, 1, 1)

    def key(self, seq: MRFSequence) -> str:
        blob = json.dumps(
            {
                "model": MODEL_VERSION,
                "sequence": seq.fingerprint_key(),
                "field": self.field_strength_T,
                "stride": list(self.stride),
                "compartments": {k: v.to_dict() for k, v in sorted(self.compartments.items())},
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fisp_spec(
    field_strength_T: float = 3.0,
    t1_step_percent: float = 3.0,
    t2_step_percent: float = 3.0,
    b1: tuple[float, ...] = linear_grid(0.7, 1.3, 0.025),
) -> DictionarySpec:
    """Single-compartment FISP grid covering brain and body at 1.5 / 3 T (T1 100-5000 ms, T2 10-2500 ms).

    B1 in 0.025 steps: FISP's T2 and B1 are strongly coupled, and with 0.05 steps the B1 quantisation moved
    grey-matter T2 by -4.7 % noise-free (brain phantom, 3 T); with 0.025 steps the median T2 error in every
    brain ROI is <= 2.9 % at SNR 50. 477k atoms, of which every other T1 and T2 value is simulated and the rest
    interpolated (B1 is not: at long T2 and low B1 the fingerprint bends too fast along B1 for a cubic through
    0.05 steps, 6e-4 in 1 - |<a, b>| at T2 = 1.9 s); cached afterwards.
    """
    return DictionarySpec(
        {
            "water": CompartmentGrid(
                geometric_grid(100, 5000, t1_step_percent), geometric_grid(10, 2500, t2_step_percent), b1
            )
        },
        field_strength_T,
        stride=(2, 2, 1),
    )


def t1ff_spec(field_strength_T: float = 3.0, complex_data: bool = True) -> DictionarySpec:
    """Water/fat grid for the T1-FF sequence (muscle, after Marty & Carlier 2019 and Balsiger et al. 2020).

    Water: T1 300-3000 ms (4 % steps), T2 20-80 ms; fat: T1 250-450 ms, T2 fixed at the literature value
    for the field (Gold et al., AJR 2004: 58 ms at 1.5 T, 68 ms at 3 T) because fat T2 varies little and is
    poorly encoded. Both share B1 (0.75-1.25) and, for complex data, the field offset (+-40 Hz, 10 Hz steps),
    which shifts the water-fat phase at every TE. Magnitude data are insensitive to a common phase, so their
    grid has no field-offset axis.
    """
    b1 = linear_grid(0.75, 1.25, 0.05)
    df = linear_grid(-40, 40, 10) if complex_data else (0.0,)
    t2_fat = 58.0 if field_strength_T < 2.25 else 68.0
    return DictionarySpec(
        {
            "water": CompartmentGrid(geometric_grid(300, 3000, 4.0), (20.0, 35.0, 50.0, 65.0, 80.0), b1, df),
            "fat": CompartmentGrid(linear_grid(250, 450, 25), (t2_fat,), b1, df),
        },
        field_strength_T,
    )


@dataclass
class Compression:
    """Atoms of all compartments in one temporal subspace."""

    # [frames, R] right singular vectors V of the atom matrix D = U S V^H (complex64, float32 for magnitude).
    # A signal s (a row, [frames]) has subspace coefficients s @ V, and <a, s> = conj(a @ V) . (s @ V) for
    # signals in the span: atoms and fingerprints must both be projected this way.
    basis: torch.Tensor
    singular_values: torch.Tensor  # [frames]: the whole spectrum of the stacked normalised atoms (R are kept)
    coeffs: dict[str, torch.Tensor]  # compartment -> [atoms, R] coefficients of the normalised atoms

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank retaining ``energy`` of the total, capped at the stored rank."""
        e = torch.cumsum(self.singular_values.double() ** 2, 0)
        e = e / e[-1]
        r = int(torch.searchsorted(e, torch.tensor(energy, dtype=e.dtype))) + 1
        return int(min(r, self.basis.shape[1]))


@dataclass
class MRFDictionary:
    sequence_key: str
    spec_key: str
    field_strength_T: float
    params: dict[str, np.ndarray]  # compartment -> [atoms, 4] (t1_ms, t2_ms, b1, df_hz)
    norms: dict[str, torch.Tensor]  # compartment -> [atoms] L2 norm of the complex atom
    magnitude_norms: dict[str, torch.Tensor]  # compartment -> [atoms] L2 norm of |atom|
    complex: Compression
    magnitude: Compression
    n_frames: int
    info: dict[str, str] = field(default_factory=dict)
    # Derived search structures (the matcher's grid index), built on first use; never saved.
    search_cache: dict[object, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_atoms(self) -> int:
        return int(sum(p.shape[0] for p in self.params.values()))

    def to(self, device: torch.device | str) -> MRFDictionary:
        def mv(c: Compression) -> Compression:
            return Compression(
                c.basis.to(device), c.singular_values.to(device), {k: v.to(device) for k, v in c.coeffs.items()}
            )

        return MRFDictionary(
            self.sequence_key,
            self.spec_key,
            self.field_strength_T,
            self.params,
            {k: v.to(device) for k, v in self.norms.items()},
            {k: v.to(device) for k, v in self.magnitude_norms.items()},
            mv(self.complex),
            mv(self.magnitude),
            self.n_frames,
            self.info,
        )

    def in_basis(self, basis: torch.Tensor) -> MRFDictionary:
        """This dictionary with its complex atoms expressed in another orthonormal temporal basis [frames, K] (a
        reconstruction's: e.g. the leading components plus fat directions), cached on this object.

        A subspace reconstruction only holds what of each voxel's fingerprint lies in its basis, so the atoms must
        be projected onto the same span to be compared with it: coefficients ``a @ B = (a @ V) V^H B``. Mapping
        the coefficients onto the dictionary's own leading components instead compares the data's share of those
        components with the atoms' whole share, which biased water T2 by +4 % (GM) and -6 % (CSF) on exact
        fingerprints with two fat directions (benchmarks/mrf_accuracy.py, the floor row). Complex atoms only: the
        magnitude compression is for magnitude images, which are never coefficients of a reconstruction.

        Caveat, measured: for a basis that drops most of the dictionary's leading components (one fitted to a single
        object), atoms it represents poorly score as well as the true one once normalised by their projected norm
        (benchmarks/mrf_error_budget.py row 6: 128² WM T2 6.0 -> 20.3 %). The bases the pipelines use keep the
        dictionary's leading components (fat directions are added to them), where this does not arise."""
        b = basis.to(device=self.complex.basis.device, dtype=self.complex.basis.dtype)
        key = ("in_basis", hashlib.sha1(b.cpu().numpy().tobytes()).hexdigest())
        hit = self.search_cache.get(key)
        if isinstance(hit, MRFDictionary):
            return hit
        m = self.complex.basis.conj().T @ b  # V^H B [R, K]
        coeffs = {name: a @ m for name, a in self.complex.coeffs.items()}
        stacked = torch.cat(list(coeffs.values()))
        comp = Compression(b, torch.linalg.svdvals(stacked), coeffs)
        out = MRFDictionary(
            self.sequence_key,
            self.spec_key,
            self.field_strength_T,
            self.params,
            self.norms,
            self.magnitude_norms,
            comp,
            self.magnitude,
            self.n_frames,
            {**self.info, "basis": "projected onto a reconstruction basis"},
        )
        held = [k for k in self.search_cache if isinstance(k, tuple) and k[0] == "in_basis"]
        if len(held) >= 4:  # a node sees a handful of reconstruction bases (rank, fat directions, a network's)
            for k in held:
                del self.search_cache[k]
        self.search_cache[key] = out
        return out

    # ---- persistence -------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for kind, comp in (("c", self.complex), ("m", self.magnitude)):
            arrays[f"{kind}_basis"] = comp.basis.cpu().numpy()
            arrays[f"{kind}_sv"] = comp.singular_values.cpu().numpy()
            for name, co in comp.coeffs.items():
                arrays[f"{kind}_coeffs_{name}"] = co.cpu().numpy()
        for name in self.params:
            arrays[f"params_{name}"] = self.params[name]
            arrays[f"norms_{name}"] = self.norms[name].cpu().numpy()
            arrays[f"mnorms_{name}"] = self.magnitude_norms[name].cpu().numpy()
        meta = {
            "sequence_key": self.sequence_key,
            "spec_key": self.spec_key,
            "model": MODEL_VERSION,
            "field": self.field_strength_T,
            "n_frames": self.n_frames,
            "compartments": list(self.params),
            "info": self.info,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file + rename: a killed generation never leaves a half-written cache entry behind.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            # Numeric arrays only: load() reads with allow_pickle=False, so nothing pickled may be written either.
            np.savez(fh, allow_pickle=False, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> MRFDictionary:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("model") != MODEL_VERSION:
                raise ValueError(f"{path}: dictionary of model {meta.get('model')!r}, expected {MODEL_VERSION!r}")
            names = meta["compartments"]

            def comp(kind: str) -> Compression:
                return Compression(
                    torch.from_numpy(z[f"{kind}_basis"]),
                    torch.from_numpy(z[f"{kind}_sv"]),
                    {n: torch.from_numpy(z[f"{kind}_coeffs_{n}"]) for n in names},
                )

            return cls(
                meta["sequence_key"],
                meta["spec_key"],
                float(meta["field"]),
                {n: z[f"params_{n}"] for n in names},
                {n: torch.from_numpy(z[f"norms_{n}"]) for n in names},
                {n: torch.from_numpy(z[f"mnorms_{n}"]) for n in names},
                comp("c"),
                comp("m"),
                int(meta["n_frames"]),
                dict(meta.get("info", {})),
            )


def default_cache_dir() -> Path:
    env = os.environ.get("RECON_NODE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recon-node" / "dictionaries"


_EpgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (t1, t2, b1, df) -> atoms


def _epg_fn(compartment: str, seq: MRFSequence, field_strength_T: float) -> _EpgFn:
    def water(t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
        return epg_fisp(seq, t1, t2, b1, df if bool(torch.any(df != 0)) else None)

    def fat(t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
        return epg_fat(seq, t1, t2, b1, df, field_strength_T=field_strength_T)

    return fat if compartment == "fat" else water


def _simulate(
    seq: MRFSequence,
    p: np.ndarray,
    compartment: str,
    field_strength_T: float,
    device: torch.device | str,
    progress: bool = False,
) -> torch.Tensor:
    """Fingerprints [n, frames] (complex64) of parameter rows p [n, 4], in row order."""
    q = torch.as_tensor(np.asarray(p, dtype=np.float32), device=device)
    # Sorted by T2 so each chunk keeps only the dephasing orders its T2 needs (see default_n_states).
    order = torch.argsort(q[:, 1], stable=True)
    q = q[order]
    with torch.no_grad():
        atoms = epg_chunked(
            _epg_fn(compartment, seq, field_strength_T),
            q[:, 0],
            q[:, 1],
            q[:, 2],
            q[:, 3],
            chunk=2048 if compartment != "fat" else 512,
            progress=progress,
            desc=f"{compartment} dictionary",
        )
    out = torch.empty_like(atoms)
    out[order] = atoms
    return out


def simulate_atoms(
    seq: MRFSequence,
    grid: CompartmentGrid,
    compartment: str,
    field_strength_T: float,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Every fingerprint [atoms, frames] (complex64) of one compartment's grid, in grid order.

    The reference the streaming build is tested against; it holds all atoms, so keep it to small grids.
    """
    return _simulate(seq, grid.combos(), compartment, field_strength_T, device, progress)


_BASIS_ATOMS = 12000
# Rank of the coefficients kept while building: high enough that atoms rebuilt from it (for their magnitudes
# and norms) are exact to float precision; only the first _MAX_RANK are stored.
_BUILD_RANK = 64


# ---- grid axes and cubic interpolation ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """One parameter axis: its fine values and the simulated nodes the fine values are interpolated from.

    With ``stride`` 1 the nodes are the fine values. With stride s > 1 (an evenly spaced axis, geometric or
    linear) the nodes are every s-th fine value, padded by one node beyond each end, so that every fine value
    lies between the two middle nodes of a centred 4-node cubic (Lagrange) stencil.
    """

    fine: np.ndarray
    nodes: np.ndarray
    stride: int
    # [fine, 4] node indices and [fine, 4] weights of each fine value
    index: np.ndarray
    weight: np.ndarray

    @classmethod
    def make(cls, values: tuple[float, ...], stride: int) -> _Axis:
        v = np.asarray(values, dtype=np.float64)
        n = v.size
        kind = _spacing(v)
        if stride <= 1 or kind is None or n < 2 * stride + 1:
            idx = np.arange(n)[:, None].repeat(4, 1)
            w = np.zeros((n, 4))
            w[:, 1] = 1.0
            return cls(v, v, 1, idx, w)
        # node j sits at fine position s * (j - 1): one padding node before the first fine value
        m = -(-(n - 1) // stride) + 3
        pos = stride * (np.arange(m) - 1.0)
        if kind == "geometric":
            ratio = (v[-1] / v[0]) ** (1 / (n - 1))
            nodes = v[0] * ratio**pos
        else:
            step = (v[-1] - v[0]) / (n - 1)
            nodes = v[0] + step * pos
        i = np.arange(n)
        left = i // stride + 1  # node at or just below fine position i
        left = np.minimum(left, m - 3)
        x = i / stride - (left - 1)  # position between node `left` (0) and `left + 1` (1)
        idx = left[:, None] + np.arange(-1, 3)[None, :]
        w = np.stack([_lagrange(x, j) for j in range(4)], 1)
        nodes = nodes.copy()
        exact = x == 0
        nodes_at = left[exact]
        nodes[nodes_at] = v[exact]  # bit-identical node values where a node is a fine value
        return cls(v, nodes, stride, idx, w)


def _spacing(v: np.ndarray) -> str | None:
    if v.size < 3:
        return None
    if np.all(v > 0):
        r = v[1:] / v[:-1]
        if np.allclose(r, r[0], rtol=1e-6, atol=0):
            return "geometric"
    d = np.diff(v)
    if np.allclose(d, d[0], rtol=1e-6, atol=1e-9):
        return "linear"
    return None


def _lagrange(x: np.ndarray, j: int) -> np.ndarray:
    """Weight of node j (at -1, 0, 1, 2) of the cubic through four equispaced nodes, at position x."""
    at = (-1.0, 0.0, 1.0, 2.0)
    out = np.ones_like(x, dtype=np.float64)
    for k in range(4):
        if k != j:
            out *= (x - at[k]) / (at[j] - at[k])
    return out


def _interp_axis(a: torch.Tensor, axis: _Axis, dim: int) -> torch.Tensor:
    """Values on the fine axis from values on the nodes along ``dim``."""
    if axis.stride == 1:
        return a
    idx = torch.as_tensor(axis.index, device=a.device)
    w = torch.as_tensor(axis.weight, device=a.device, dtype=torch.float32)
    a = a.movedim(dim, 0)
    shape = (-1, *([1] * (a.dim() - 1)))
    out = w[:, 0].reshape(shape).to(a.dtype) * a[idx[:, 0]]
    for k in range(1, 4):
        out = out + w[:, k].reshape(shape).to(a.dtype) * a[idx[:, k]]
    return out.movedim(0, dim)


def _basis(atoms: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading right singular vectors [frames, rank] and the singular-value spectrum of normalised atoms."""
    a = atoms / torch.linalg.vector_norm(atoms, dim=1, keepdim=True).clamp_min(1e-12)
    wide = torch.complex128 if a.is_complex() else torch.float64
    gram = torch.zeros(a.shape[1], a.shape[1], dtype=wide, device=a.device)
    for i in range(0, a.shape[0], 4096):
        c = a[i : i + 4096].to(wide)
        gram += c.T.conj() @ c
    evals, evecs = torch.linalg.eigh((gram + gram.T.conj()) / 2)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return evecs[:, :rank].to(a.dtype), evals.sqrt().float()


def _stored_rank(sv: torch.Tensor) -> int:
    e = torch.cumsum(sv.double() ** 2, 0)
    e = e / e[-1]
    return int(min(int(torch.searchsorted(e, torch.tensor(_KEEP_ENERGY, dtype=e.dtype))) + 1, _MAX_RANK, sv.numel()))


@dataclass
class _Built:
    params: np.ndarray
    norms: torch.Tensor
    mnorms: torch.Tensor
    coeffs: torch.Tensor  # complex, normalised atoms, [atoms, R]
    mcoeffs: torch.Tensor  # magnitude, normalised, [atoms, Rm]


@dataclass
class _NodePlan:
    axes: list[_Axis]
    mesh: np.ndarray  # [nodes, 4] every node of the padded rectangular grid
    todo: np.ndarray  # indices into mesh of the nodes to simulate


def _plan(grid: CompartmentGrid, stride: tuple[int, int, int]) -> _NodePlan:
    axes = [_Axis.make(getattr(grid, k), n) for k, n in zip(PARAM_NAMES, (*stride, 1), strict=True)]
    mesh = np.stack(np.meshgrid(*[a.nodes for a in axes], indexing="ij"), -1).reshape(-1, 4)
    # Nodes far on the unphysical side (T2 > T1) are never in a valid atom's stencil (which reaches two node
    # spacings along each axis); skip them.
    margin = 1.0
    for a in axes[:2]:
        if a.stride > 1:
            margin *= (a.nodes[2] / a.nodes[1]) ** 2
    return _NodePlan(axes, mesh, np.flatnonzero(mesh[:, 1] <= mesh[:, 0] * margin * (1 + 1e-6)))


def _build_compartment(
    seq: MRFSequence,
    name: str,
    grid: CompartmentGrid,
    plan: _NodePlan,
    field_strength_T: float,
    basis: torch.Tensor,
    mbasis: torch.Tensor,
    device: torch.device | str,
    report: Callable[[str], None] | None,
) -> _Built:
    """Simulate the nodes chunk by chunk, project them, interpolate to the fine grid slab by slab.

    Peak memory is one chunk of atoms plus the node coefficients at the build rank; the full atom set
    [atoms, frames] never exists.
    """
    axes, mesh, todo = plan.axes, plan.mesh, plan.todo
    n_nodes = tuple(a.nodes.size for a in axes)
    rb = basis.shape[1]
    node_coeffs = torch.zeros((mesh.shape[0], rb), dtype=basis.dtype, device=basis.device)
    chunk = 8192
    q = mesh[todo]
    order = np.argsort(q[:, 1], kind="stable")  # T2-sorted chunks need fewer EPG states
    fn = _epg_fn(name, seq, field_strength_T)
    step = max(1, len(order) // 10)
    next_report = step
    done = 0
    with torch.no_grad():
        for i in range(0, len(order), chunk):
            sel = order[i : i + chunk]
            p = torch.as_tensor(q[sel].astype(np.float32), device=device)
            atoms = epg_chunked(fn, p[:, 0], p[:, 1], p[:, 2], p[:, 3], chunk=2048 if name != "fat" else 512)
            node_coeffs[torch.as_tensor(todo[sel], device=basis.device)] = atoms.to(basis.device) @ basis
            done += len(sel)
            if report is not None and done >= next_report:
                report(f"{name} dictionary: simulated {done}/{len(order)} atoms ({100 * done // len(order)} %)")
                next_report += step
    grid_nodes = node_coeffs.reshape(*n_nodes, rb)
    del node_coeffs
    # Fine values, one (B1, df) slab at a time: [t1, t2, rb] per slab, then the valid atoms of that slab.
    fine = [a.fine for a in axes]
    t1, t2 = np.meshgrid(fine[0], fine[1], indexing="ij")
    valid = (t2 <= t1).reshape(-1)
    params = grid.combos()
    n1, n2, n3, n4 = (f.size for f in fine)
    # position in grid.combos() order (t1, t2, b1, df with df fastest; T2 > T1 dropped)
    full = np.arange(n1 * n2 * n3 * n4).reshape(n1, n2, n3, n4)
    keep = (fine[1][None, :, None, None] <= fine[0][:, None, None, None]) & np.ones((1, 1, n3, n4), bool)
    atom_of: np.ndarray = np.full(full.size, -1, dtype=np.int64)
    atom_of[full[keep]] = np.arange(int(keep.sum()))
    atom_of = atom_of.reshape(n1, n2, n3, n4)
    r = min(_MAX_RANK, rb)
    coeffs = torch.empty((params.shape[0], r), dtype=basis.dtype, device=basis.device)
    mcoeffs = torch.empty((params.shape[0], mbasis.shape[1]), dtype=mbasis.dtype, device=mbasis.device)
    norms = torch.empty(params.shape[0], device=basis.device)
    mnorms = torch.empty(params.shape[0], device=basis.device)
    ax3, ax4 = axes[2], axes[3]
    for i3 in range(n3):
        for i4 in range(n4):
            slab = None
            for k3 in range(4):
                w3 = float(ax3.weight[i3, k3])
                if w3 == 0.0:
                    continue
                for k4 in range(4):
                    w4 = float(ax4.weight[i4, k4])
                    if w4 == 0.0:
                        continue
                    term = grid_nodes[:, :, int(ax3.index[i3, k3]), int(ax4.index[i4, k4])] * (w3 * w4)
                    slab = term if slab is None else slab + term
            assert slab is not None
            slab = _interp_axis(_interp_axis(slab, axes[0], 0), axes[1], 1).reshape(-1, rb)[valid]
            where = torch.as_tensor(atom_of[:, :, i3, i4].reshape(-1)[valid], device=basis.device)
            # Atoms rebuilt in time for their norms and magnitudes (the build rank is exact to float precision).
            atoms = slab @ basis.conj().T
            nrm = torch.linalg.vector_norm(atoms, dim=1).clamp_min(1e-12)
            mag = atoms.abs()
            mnrm = torch.linalg.vector_norm(mag, dim=1).clamp_min(1e-12)
            norms[where], mnorms[where] = nrm, mnrm
            coeffs[where] = slab[:, :r] / nrm[:, None]
            mcoeffs[where] = (mag / mnrm[:, None]) @ mbasis
    return _Built(params, norms, mnorms, coeffs, mcoeffs)


def cached_path(seq: MRFSequence, spec: DictionarySpec, cache_dir: Path | str | None = None) -> Path:
    """Where :func:`build_dictionary` keeps (or finds) the dictionary of ``spec`` for ``seq``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"mrf-{spec.key(seq)}.npz"  # the key, not the name: a schedule read from DICOM is named differently


def build_dictionary(
    seq: MRFSequence,
    spec: DictionarySpec,
    *,
    device: torch.device | str = "cpu",
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> MRFDictionary:
    """Simulate (or load from the cache) the compressed dictionary of ``spec`` for ``seq``.

    Streaming: the temporal bases come from a strided subset of at most 12k atoms; then the atoms are
    simulated chunk by chunk and only their coefficients are kept. With ``spec.stride`` > 1 on an axis only every
    n-th value of that (evenly spaced) axis is simulated and the rest interpolated (cubic, in the coefficients);
    fingerprints are smooth in log T1 and log T2, so this matches direct simulation to ~1e-6 in normalised
    inner product, below the ~3e-5 that separates neighbouring atoms (tests/unit/test_dictionary_build.py).
    ``report`` receives progress lines (the job log); ``progress`` adds tqdm bars on a terminal.
    """
    key = spec.key(seq)
    path = cached_path(seq, spec, cache_dir)
    if use_cache and path.exists():
        try:
            d = MRFDictionary.load(path)
            log.info("dictionary %s loaded from %s (%d atoms)", key, path, d.n_atoms)
            return d.to(device)
        except (ValueError, KeyError, OSError) as e:  # stale or damaged: rebuild, never misread
            log.warning("ignoring cached dictionary %s (%s); regenerating", path, e)
    say = report or (lambda line: log.info("%s", line))
    total = sum(g.combos().shape[0] for g in spec.compartments.values())
    say(f"building the {seq.name} dictionary ({total} atoms, {seq.n_frames} frames); cached for later runs")
    # 1. Bases from an evenly strided subset of the atoms to simulate (with stride > 1 these include nodes
    # just outside the grid, whose coefficients the interpolation needs as exactly as the others).
    plans = {name: _plan(grid, spec.stride) for name, grid in spec.compartments.items()}
    n_sim = sum(p.todo.size for p in plans.values())
    subset = []
    for name, plan in plans.items():
        stride = max(1, -(-n_sim // _BASIS_ATOMS))
        subset.append(_simulate(seq, plan.mesh[plan.todo[::stride]], name, spec.field_strength_T, device))
    sub = torch.cat(subset)
    del subset
    basis, sv = _basis(sub, _BUILD_RANK)
    mbasis_full, msv = _basis(sub.abs(), _MAX_RANK)
    del sub
    mbasis = mbasis_full[:, : _stored_rank(msv)]
    # 2. Every compartment streamed through those bases.
    built = {
        name: _build_compartment(seq, name, grid, plans[name], spec.field_strength_T, basis, mbasis, device, say)
        for name, grid in spec.compartments.items()
    }
    r = _stored_rank(sv)
    d = MRFDictionary(
        seq.fingerprint_key(),
        key,
        spec.field_strength_T,
        {k: b.params for k, b in built.items()},
        {k: b.norms for k, b in built.items()},
        {k: b.mnorms for k, b in built.items()},
        Compression(basis[:, :r].contiguous(), sv, {k: b.coeffs[:, :r].contiguous() for k, b in built.items()}),
        Compression(mbasis, msv, {k: b.mcoeffs for k, b in built.items()}),
        seq.n_frames,
        {
            "sequence": seq.name,
            "grid": json.dumps({k: v.to_dict() for k, v in spec.compartments.items()}),
            "stride": json.dumps(list(spec.stride)),
        },
    )
    say(f"dictionary {key} built: {d.n_atoms} atoms, rank {r} (complex) / {mbasis.shape[1]} (magnitude)")
    if use_cache:
        try:
            d.save(path)
            log.info("dictionary %s cached at %s", key, path)
        except OSError as e:  # a read-only or full cache disk must not fail the job
            log.warning("could not cache the dictionary at %s: %s", path, e)
    return d
