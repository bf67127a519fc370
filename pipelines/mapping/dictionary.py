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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.physics.epg import epg_chunked, epg_fat, epg_fisp
from pipelines.physics.sequences import MRFSequence

log = logging.getLogger(__name__)

# Bump when the physics or the stored layout changes: old cache files are then ignored, never misread.
MODEL_VERSION = "epg-fisp-2"
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

    def key(self, seq: MRFSequence) -> str:
        blob = json.dumps({
            "model": MODEL_VERSION, "sequence": seq.fingerprint_key(), "field": self.field_strength_T,
            "compartments": {k: v.to_dict() for k, v in sorted(self.compartments.items())},
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fisp_spec(field_strength_T: float = 3.0, t1_step_percent: float = 3.0, t2_step_percent: float = 3.0,
              b1: tuple[float, ...] = linear_grid(0.7, 1.3, 0.025)) -> DictionarySpec:
    """Single-compartment FISP grid covering brain and body at 1.5 / 3 T (T1 100-5000 ms, T2 10-2500 ms).

    B1 in 0.025 steps: FISP's T2 and B1 are strongly coupled, and with 0.05 steps the B1 quantisation moved
    grey-matter T2 by -4.7 % noise-free (brain phantom, 3 T); with 0.025 steps the median T2 error in every
    brain ROI is <= 2.9 % at SNR 50. 477k atoms; ~2.5 min to build on 2 CPU cores, cached afterwards.
    """
    return DictionarySpec({"water": CompartmentGrid(geometric_grid(100, 5000, t1_step_percent),
                                                    geometric_grid(10, 2500, t2_step_percent), b1)},
                          field_strength_T)


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
    return DictionarySpec({
        "water": CompartmentGrid(geometric_grid(300, 3000, 4.0), (20.0, 35.0, 50.0, 65.0, 80.0), b1, df),
        "fat": CompartmentGrid(linear_grid(250, 450, 25), (t2_fat,), b1, df),
    }, field_strength_T)


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

    @property
    def n_atoms(self) -> int:
        return int(sum(p.shape[0] for p in self.params.values()))

    def to(self, device: torch.device | str) -> MRFDictionary:
        def mv(c: Compression) -> Compression:
            return Compression(c.basis.to(device), c.singular_values.to(device),
                               {k: v.to(device) for k, v in c.coeffs.items()})

        return MRFDictionary(self.sequence_key, self.spec_key, self.field_strength_T, self.params,
                             {k: v.to(device) for k, v in self.norms.items()},
                             {k: v.to(device) for k, v in self.magnitude_norms.items()},
                             mv(self.complex), mv(self.magnitude), self.n_frames, self.info)

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
        meta = {"sequence_key": self.sequence_key, "spec_key": self.spec_key, "model": MODEL_VERSION,
                "field": self.field_strength_T, "n_frames": self.n_frames, "compartments": list(self.params),
                "info": self.info}
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file + rename: a killed generation never leaves a half-written cache entry behind.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> MRFDictionary:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("model") != MODEL_VERSION:
                raise ValueError(f"{path}: dictionary of model {meta.get('model')!r}, expected {MODEL_VERSION!r}")
            names = meta["compartments"]

            def comp(kind: str) -> Compression:
                return Compression(torch.from_numpy(z[f"{kind}_basis"]), torch.from_numpy(z[f"{kind}_sv"]),
                                   {n: torch.from_numpy(z[f"{kind}_coeffs_{n}"]) for n in names})

            return cls(meta["sequence_key"], meta["spec_key"], float(meta["field"]),
                       {n: z[f"params_{n}"] for n in names},
                       {n: torch.from_numpy(z[f"norms_{n}"]) for n in names},
                       {n: torch.from_numpy(z[f"mnorms_{n}"]) for n in names},
                       comp("c"), comp("m"), int(meta["n_frames"]), dict(meta.get("info", {})))


def default_cache_dir() -> Path:
    env = os.environ.get("RECON_NODE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recon-node" / "dictionaries"


def simulate_atoms(seq: MRFSequence, grid: CompartmentGrid, compartment: str, field_strength_T: float,
                   device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Fingerprints [atoms, frames] (complex64) of one compartment's grid, in grid order."""
    p = torch.as_tensor(grid.combos(), device=device)
    # Sorted by T2 so each chunk keeps only the dephasing orders its T2 needs (see default_n_states).
    order = torch.argsort(p[:, 1], stable=True)
    q = p[order]

    def water(t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
        return epg_fisp(seq, t1, t2, b1, df if bool(torch.any(df != 0)) else None)

    def fat(t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
        return epg_fat(seq, t1, t2, b1, df, field_strength_T=field_strength_T)

    fn = fat if compartment == "fat" else water
    with torch.no_grad():
        atoms = epg_chunked(fn, q[:, 0], q[:, 1], q[:, 2], q[:, 3], chunk=2048 if compartment != "fat" else 512,
                            progress=progress, desc=f"{compartment} dictionary")
    out = torch.empty_like(atoms)
    out[order] = atoms
    return out


_BASIS_ATOMS = 20000


def _compress(atoms: dict[str, torch.Tensor]) -> Compression:
    """Shared SVD basis of the normalised atoms of every compartment, from their frames x frames Gram matrix.

    The basis is estimated on an evenly strided subset of at most 20k atoms (fingerprints vary smoothly with the
    parameters, so the subset spans the same subspace); every atom is then projected on it.
    """
    first = next(iter(atoms.values()))
    n = first.shape[1]
    total = sum(a.shape[0] for a in atoms.values())
    stride = max(1, -(-total // _BASIS_ATOMS))
    gram = torch.zeros(n, n, dtype=first.dtype, device=first.device)
    for a in atoms.values():
        sub = a[::stride]
        for i in range(0, sub.shape[0], 4096):
            c = sub[i:i + 4096]
            gram += c.T.conj() @ c
    gram = gram.to(torch.complex128 if first.is_complex() else torch.float64)
    evals, evecs = torch.linalg.eigh((gram + gram.T.conj()) / 2)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    energy = torch.cumsum(evals, 0) / evals.sum()
    r = int(min(int(torch.searchsorted(energy, torch.tensor(_KEEP_ENERGY, dtype=energy.dtype))) + 1, _MAX_RANK, n))
    basis = evecs[:, :r].to(first.dtype)
    return Compression(basis, evals.sqrt().float(), {k: a @ basis for k, a in atoms.items()})


def build_dictionary(seq: MRFSequence, spec: DictionarySpec, *, device: torch.device | str = "cpu",
                     cache_dir: Path | str | None = None, use_cache: bool = True,
                     progress: bool = False) -> MRFDictionary:
    """Simulate (or load from the cache) the compressed dictionary of ``spec`` for ``seq``."""
    key = spec.key(seq)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"mrf-{key}.npz"  # the key, not the name: a schedule read from DICOM is named differently
    if use_cache and path.exists():
        try:
            d = MRFDictionary.load(path)
            log.info("dictionary %s loaded from %s (%d atoms)", key, path, d.n_atoms)
            return d.to(device)
        except (ValueError, KeyError, OSError) as e:  # stale or damaged: rebuild, never misread
            log.warning("ignoring cached dictionary %s (%s); regenerating", path, e)
    params, norms, mnorms, atoms_c, atoms_m = {}, {}, {}, {}, {}
    for name, grid in spec.compartments.items():
        atoms = simulate_atoms(seq, grid, name, spec.field_strength_T, device, progress)
        params[name] = grid.combos()
        norms[name] = torch.linalg.vector_norm(atoms, dim=1)
        mag = atoms.abs()
        mnorms[name] = torch.linalg.vector_norm(mag, dim=1)
        atoms_c[name] = atoms / norms[name].clamp_min(1e-12)[:, None]
        atoms_m[name] = mag / mnorms[name].clamp_min(1e-12)[:, None]
    d = MRFDictionary(seq.fingerprint_key(), key, spec.field_strength_T, params, norms, mnorms,
                      _compress(atoms_c), _compress(atoms_m), seq.n_frames,
                      {"sequence": seq.name, "grid": json.dumps({k: v.to_dict() for k, v in spec.compartments.items()})})
    if use_cache:
        try:
            d.save(path)
            log.info("dictionary %s cached at %s", key, path)
        except OSError as e:  # a read-only or full cache disk must not fail the job
            log.warning("could not cache the dictionary at %s: %s", path, e)
    return d
