"""Fingerprint images -> quantitative maps in real units, by dictionary matching.

Used by every MRF pipeline: the image-series pipeline feeds reconstructed frames, the raw-data pipelines feed
subspace-coefficient images. Background (PD below ``mask_threshold`` of the 99th percentile) is set to 0 and
flagged in each map's mask. Kinds and units come from :mod:`pipelines.map_kinds`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipelines.map_kinds import quantitative_map
from pipelines.mapping.b1_field import FLUID_T2_MS, field_weights, smooth_field
from pipelines.mapping.dictionary import DictionarySpec, MRFDictionary, build_dictionary, fisp_spec, t1ff_spec
from pipelines.mapping.matching import DEFAULT_ENERGY, MatchResult, match, match_in_field, pd_from_m0
from pipelines.mapping.water_fat import match_water_fat
from pipelines.physics.sequences import MRFSequence
from pipelines.types import Geometry, QuantitativeMap

MODELS = ("auto", "single", "water_fat")
# Voxels whose fingerprint norm is below this fraction of the mask threshold (relative to the slice's 99th
# percentile) are background for sure and search their best block only (water/fat: the best pair of one coarse
# group): PD = |<a, x>| / ||s|| scales with |x| up to the atom norm, which varies ~3x over brain tissues, so a
# quarter of the threshold leaves margin.
_COARSE_MARGIN = 0.25


@dataclass(frozen=True)
class MappingOptions:
    model: str = "auto"  # auto: water_fat for schedules whose TE varies (Dixon-like), else single
    rank: int | None = None
    energy: float = DEFAULT_ENERGY
    mask_threshold: float = 0.05  # fraction of the 99th-percentile PD below which a voxel is background
    memory_bytes: int = 2 * 1024**3
    field_strength_T: float = 3.0
    # dictionary (matching, the default) or a learned / fitted estimator: fc, inn, blochnet, hybrid, mle
    estimator: str = "dictionary"
    weights: str = ""  # a site's own estimator weights (default: the shipped weights for the schedule)
    search: str = "fast"  # dictionary search: fast (block search; water/fat: coarse grid + climb) or exhaustive
    # Single-compartment matching: hold B1 to a field smoothed over this many mm (pipelines/mapping/b1_field.py);
    # 0: B1 free in every voxel.
    b1_smooth_mm: float = 0.0


def resolve_model(seq: MRFSequence, model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    if model != "auto":
        return model
    return "water_fat" if np.ptp(seq.te_ms) > 0.1 else "single"


def default_spec(seq: MRFSequence, model: str, field_strength_T: float, complex_data: bool) -> DictionarySpec:
    if model == "water_fat":
        return t1ff_spec(field_strength_T, complex_data=complex_data)
    return fisp_spec(field_strength_T)


def estimate_maps(
    fingerprints: np.ndarray | torch.Tensor,
    seq: MRFSequence,
    geometry: Geometry,
    options: MappingOptions = MappingOptions(),
    *,
    magnitude: bool = False,
    spec: DictionarySpec | None = None,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
    progress: bool = False,
    basis: torch.Tensor | None = None,
    report: Callable[[str], None] | None = None,
    dictionary: MRFDictionary | None = None,
    b1_map: np.ndarray | None = None,
) -> list[QuantitativeMap]:
    """Maps from fingerprint images [frames, slices, y, x] (or [frames, y, x]).

    With ``basis`` [frames, K] the input is instead K subspace-coefficient images [K, slices, y, x] in that basis
    (a subspace reconstruction's output, x_t = sum_k conj(V[t, k]) c_k): they are matched in the coefficient
    domain, never expanded to frames (for the learned estimators, which take frames, one slice at a time).
    Slices are matched one at a time, so memory stays at one slice's fingerprints. ``dictionary``: one the caller
    already holds for the same spec (used instead of building or loading it again). ``b1_map`` [slices, y, x] (or
    [y, x]): B1+ given per voxel (a measured map on the maps' grid, :mod:`pipelines.mapping.b1_measured`), which T1
    and T2 are matched at instead of the smooth field of ``options.b1_smooth_mm``; where it is NaN, at that field
    (or free without one). Single-compartment dictionary matching only.
    """
    x = np.asarray(fingerprints) if not isinstance(fingerprints, torch.Tensor) else fingerprints.cpu().numpy()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"fingerprint images must be [frames, slices, y, x], got shape {x.shape}")
    if basis is None and x.shape[0] != seq.n_frames:
        raise ValueError(f"the images have {x.shape[0]} frames but sequence {seq.name!r} has {seq.n_frames}")
    if basis is not None and (basis.shape[0] != seq.n_frames or basis.shape[1] != x.shape[0]):
        raise ValueError(
            f"a basis of shape {tuple(basis.shape)} does not fit {x.shape[0]} coefficient images of "
            f"the {seq.n_frames}-frame sequence {seq.name!r}"
        )
    model = resolve_model(seq, options.model)
    shape = x.shape[1:]
    if b1_map is not None:
        b1_map = np.asarray(b1_map, dtype=np.float32)
        b1_map = b1_map[None] if b1_map.ndim == 2 else b1_map
        if b1_map.shape != shape:
            raise ValueError(f"a B1 map of shape {b1_map.shape} does not fit fingerprint images of {shape}")
        if model != "single" or options.estimator != "dictionary":
            raise ValueError("a given B1 map is used by single-compartment dictionary matching only")
    coeff_map = None
    if options.estimator != "dictionary":
        dictionary = None
    else:
        spec = spec or default_spec(seq, model, options.field_strength_T, complex_data=not magnitude)
        if dictionary is None or dictionary.spec_key != spec.key(seq):
            dictionary = build_dictionary(
                seq, spec, device=device, cache_dir=cache_dir, progress=progress, report=report
            )
        if basis is not None:
            vd = dictionary.complex.basis.to(device)
            k = int(basis.shape[1])
            b = basis.to(device=device, dtype=vd.dtype)
            own = k <= vd.shape[1] and bool(
                torch.allclose(vd[:, :k].T @ b.conj(), torch.eye(k, dtype=vd.dtype, device=device), atol=1e-4)
            )
            if not own:  # another span (fat directions, a network's basis): atoms projected onto it
                dictionary = dictionary.in_basis(b)
                vd = dictionary.complex.basis
            # Coefficients in `basis` -> coefficients in the dictionary's basis: M = V_dict^T conj(V), [R, K]
            # (the identity for the dictionary's own leading components and for a projected dictionary).
            r = min(k, vd.shape[1]) if options.rank is None else min(options.rank, vd.shape[1])
            coeff_map = vd[:, :r].T @ b.conj()
    results: list[MatchResult] = []
    keeps: list[np.ndarray] = []
    for s in range(shape[0]):
        sl = x[:, s].reshape(x.shape[0], -1)
        if not np.all(np.isfinite(sl)):
            bad = int((~np.isfinite(sl)).sum())
            raise ValueError(f"the fingerprint images of slice {s} contain {bad} NaN or infinite values")
        signals = torch.as_tensor(sl.T.copy(), device=device)
        # Voxels with no signal at all are background before matching (and cost nothing).
        energy = torch.linalg.vector_norm(signals.abs() if signals.is_complex() else signals, dim=1)
        keep = energy > 1e-6 * float(energy.max()) if energy.numel() and float(energy.max()) > 0 else energy > 0
        kept = signals[keep]
        if report is not None and shape[0] > 1:
            report(f"mapping slice {s + 1}/{shape[0]}: {int(keep.sum())} voxels")
        if options.estimator != "dictionary":
            from pipelines.mapping.estimators.mapping import estimate_learned

            if basis is not None:  # the learned estimators take frames: this slice's only
                kept = kept.to(torch.complex64) @ basis.to(device=device, dtype=torch.complex64).conj().T
            res = estimate_learned(kept, seq, options, model, magnitude=magnitude, device=device)
        else:
            assert dictionary is not None
            rank = options.rank
            if coeff_map is not None:
                kept = kept.to(torch.complex64) @ coeff_map.T
                rank = coeff_map.shape[0]
            coefficients = coeff_map is not None
            with torch.no_grad():
                res = (
                    match_water_fat(
                        kept,
                        dictionary,
                        magnitude=magnitude,
                        rank=rank,
                        energy=options.energy,
                        memory_bytes=options.memory_bytes,
                        coefficients=coefficients,
                        search=options.search,
                        coarse_below=options.mask_threshold * _COARSE_MARGIN,
                    )
                    if model == "water_fat"
                    else match(
                        kept,
                        dictionary,
                        magnitude=magnitude,
                        rank=rank,
                        energy=options.energy,
                        memory_bytes=options.memory_bytes,
                        coefficients=coefficients,
                        search=options.search,
                        report=report,
                        coarse_below=options.mask_threshold * _COARSE_MARGIN,
                    )
                )
                if model == "single" and (options.b1_smooth_mm > 0 or b1_map is not None):
                    res = _in_b1_field(
                        kept,
                        res,
                        keep.cpu().numpy(),
                        shape[1:],
                        geometry,
                        options,
                        dictionary,
                        magnitude,
                        rank,
                        coefficients,
                        given=None if b1_map is None else b1_map[s],
                    )
        results.append(res)
        keeps.append(keep.cpu().numpy())
    return _to_maps(_concat(results), np.concatenate(keeps), shape, geometry, options, model)


_PER_VOXEL = ("t1_ms", "t2_ms", "b1", "df_hz", "m0", "residual")


def _in_b1_field(
    signals: torch.Tensor,
    first: MatchResult,
    keep: np.ndarray,
    shape: tuple[int, ...],
    geometry: Geometry,
    options: MappingOptions,
    dictionary: MRFDictionary,
    magnitude: bool,
    rank: int | None,
    coefficients: bool,
    given: np.ndarray | None = None,
) -> MatchResult:
    """``first`` matched again with B1 held at its smoothed field, or at ``given`` [y, x] (one slice; see
    :mod:`pipelines.mapping.b1_field`)."""
    if np.unique(dictionary.params["water"][:, 2]).size < 2:
        return first
    field = None
    note = ""
    if given is None or (options.b1_smooth_mm > 0 and not np.isfinite(given.reshape(-1)[keep]).all()):
        img = np.full(shape, np.nan, np.float32)
        img.reshape(-1)[keep] = first.b1
        weight = np.zeros(shape, np.float32)
        weight.reshape(-1)[keep] = field_weights(first.m0, first.residual)
        dy, dx = geometry.pixel_spacing_mm
        sigma_px = (options.b1_smooth_mm / dy, options.b1_smooth_mm / dx)
        field = smooth_field(img, weight, sigma_px).reshape(-1)[keep]
        note = (
            f"B1 held to a smooth field (Gaussian, sigma {options.b1_smooth_mm:g} mm, of the voxel-wise B1 where the "
            "model fits): FISP's T2 and B1 otherwise trade off voxel by voxel"
        )
    if given is not None:
        # A measured map where it has a value; elsewhere the field (when there is one) or the free match.
        measured = given.reshape(-1)[keep]
        covered = np.isfinite(measured)
        field = measured if field is None else np.where(covered, measured, field)
        note = f"B1 held at the given B1 map in {covered.mean():.0%} of the matched voxels" + (
            f", elsewhere at the smooth field (sigma {options.b1_smooth_mm:g} mm)"
            if options.b1_smooth_mm > 0 and not covered.all()
            else ""
        )
    assert field is not None
    # Fluid keeps its free match: at T2 ~2 s FISP barely encodes T2, so a B1 off by 2 % (what the field's
    # neighbours give CSF) moves it ~10 %; measured, 128² CSF T2 8.9 % free, 14.2 % held, 12.1 % at the true B1.
    # Background (well below the PD mask) keeps it too: masked anyway, and half of a slice's search.
    m0 = np.abs(first.m0)
    floor = 0.5 * options.mask_threshold * (float(np.percentile(m0, 99)) if m0.size else 0.0)
    redo = np.flatnonzero((first.t2_ms <= FLUID_T2_MS) & (m0 >= floor) & np.isfinite(field))
    res = replace(first, **{n: getattr(first, n).copy() for n in _PER_VOXEL}, notes=list(first.notes))
    if redo.size:
        part = match_in_field(
            signals[torch.as_tensor(redo, device=signals.device)],
            dictionary,
            field[redo],
            replace(first, **{n: getattr(first, n)[redo] for n in _PER_VOXEL}),
            magnitude=magnitude,
            rank=rank,
            energy=options.energy,
            coefficients=coefficients,
        )
        for n in _PER_VOXEL:
            getattr(res, n)[redo] = getattr(part, n)
    res.notes.append(note)
    return res


def _concat(results: list[MatchResult]) -> MatchResult:
    """One result from per-slice results (voxels in slice order)."""
    if len(results) == 1:
        return results[0]

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in results])

    def cat_optional(name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in results]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    first = results[0]
    return MatchResult(
        cat("t1_ms"),
        cat("t2_ms"),
        cat("b1"),
        cat("df_hz"),
        cat("m0"),
        cat("residual"),
        first.rank,
        ff=cat_optional("ff"),
        t1_fat_ms=cat_optional("t1_fat_ms"),
        t2_fat_ms=cat_optional("t2_fat_ms"),
        notes=first.notes,
    )


def _scatter(values: np.ndarray, keep: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(keep.size, dtype=np.float32)
    out[keep] = values
    return out.reshape(shape)


def _to_maps(
    res: MatchResult, keep: np.ndarray, shape: tuple[int, ...], geometry: Geometry, options: MappingOptions, model: str
) -> list[QuantitativeMap]:
    pd_kept, _ = pd_from_m0(res.m0)
    pd = _scatter(pd_kept, keep, shape)
    mask = pd >= options.mask_threshold

    def qmap(kind: str, values: np.ndarray, description: str | None = None) -> QuantitativeMap:
        data = _scatter(values, keep, shape)
        data[~mask] = 0
        notes = list(res.notes) + [
            f"background (PD < {options.mask_threshold:g} of its 99th percentile) set to 0: {int((~mask).sum())} voxels"
        ]
        return quantitative_map(kind, data, geometry, description=description, mask=mask.copy(), notes=notes)

    maps = [
        qmap("t1", res.t1_ms, "T1 water map" if model == "water_fat" else None),
        qmap("pd", pd_kept),
        qmap("b1", res.b1),
        qmap("residual", res.residual * 100),
    ]
    if model == "water_fat" and res.ff is not None:
        maps.insert(1, qmap("ff", res.ff * 100))
        # Every water/fat fit that gives ff also gives the fat T1 (matching.py and the learned estimators).
        assert res.t1_fat_ms is not None
        maps.insert(2, qmap("t1fat", res.t1_fat_ms))
        if np.any(res.df_hz != 0):
            maps.append(qmap("df", res.df_hz))
    else:
        maps.insert(1, qmap("t2", res.t2_ms))
    return maps
