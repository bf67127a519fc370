"""The raw MRF pipeline: ISMRMRD k-space (spiral, radial or Cartesian) -> subspace reconstruction -> maps.

The dictionary comes first because its SVD basis defines the subspace the images are reconstructed in; the
K coefficient images of each slice are then matched against the same dictionary in that subspace (never
expanded to the frames: 1000 frames of ten 256^2 slices would be 5.2 GB). Slices are reconstructed one at a
time, after coil compression to virtual coils, so memory stays at one slice's operator.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipelines.mapping.maps import MODELS, MappingOptions, default_spec, estimate_maps, resolve_model
from pipelines.mapping.dictionary import build_dictionary
from pipelines.physics.sequences import MRFSequence, get_sequence
from pipelines.recon.cartesian import coil_maps_from_mean, ifft2c as ifft2c_np
from pipelines.recon.coil_maps import lowres_maps
from pipelines.recon.dcf import pipe_menon_dcf
from pipelines.recon.raw_prep import validate_raw
from pipelines.recon.ncpdnet import ncpdnet_subspace
from pipelines.recon.subspace import (CartesianSubspace, NonCartesianSubspace, SubspaceResult, _unique_points,
                                      kspace_filter, reconstruct)
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import PipelineOutput, RawStudy

RECONS = ("adjoint", "cgsense", "ncpdnet")
ESTIMATORS = ("dictionary", "fc", "inn", "blochnet", "hybrid", "mle")


def sequence_for_raw(raw: RawStudy, name_or_path: str) -> MRFSequence:
    """The schedule: ``--set sequence=...`` when given, else the one the ISMRMRD header carries."""
    seq = get_sequence(name_or_path) if name_or_path else raw.sequence
    if seq is None:
        raise ValueError(f"{raw.source_path or 'input'}: the ISMRMRD header carries no MRF schedule "
                         "(sequenceParameters flipAngle_deg / TR / TE per frame); give it with "
                         "--set sequence=fisp|t1ff|path.json")
    n_frames = int(raw.frame.max(initial=-1)) + 1
    if n_frames > seq.n_frames:
        raise ValueError(f"{raw.source_path or 'input'}: acquisitions reach frame (idx.repetition) {n_frames - 1} "
                         f"but schedule {seq.name!r} has {seq.n_frames} frames")
    if n_frames < seq.n_frames:
        raise ValueError(f"{raw.source_path or 'input'}: only {n_frames} of the {seq.n_frames} frames of schedule "
                         f"{seq.name!r} were received (idx.repetition); the scan looks incomplete")
    return seq


def compress_coils(data: np.ndarray, energy: float, min_coils: int = 4) -> tuple[np.ndarray, int]:
    """Virtual coils by SVD of the coil covariance (Huang et al., MRI 2008): data [C, ...] -> [V, ...] keeping
    the fewest virtual coils that retain ``energy`` of the signal (all of them with energy >= 1)."""
    c = data.shape[0]
    if energy >= 1 or c <= min_coils:
        return data, c
    flat = data.reshape(c, -1)
    cov = flat @ flat.conj().T
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1].clip(min=0), evecs[:, ::-1]
    cum = np.cumsum(evals) / max(float(evals.sum()), 1e-30)
    v = int(min(c, max(min_coils, np.searchsorted(cum, energy) + 1)))
    return (evecs[:, :v].conj().T @ flat).reshape(v, *data.shape[1:]).astype(data.dtype), v


def slice_operator(raw: RawStudy, rows: np.ndarray, basis: torch.Tensor, device: torch.device,
                   weighted: bool, coil_energy: float = 1.0) -> tuple[Any, np.ndarray]:
    """The subspace operator of one slice and its samples in the operator's layout (virtual coils when
    ``coil_energy`` < 1)."""
    ny, nx = raw.matrix
    frame = raw.frame[rows]
    if raw.trajectory_kind == "cartesian":
        data = raw.data[rows]  # [A, C, nx]
        if coil_energy < 1:
            comp, _ = compress_coils(data.transpose(1, 0, 2), coil_energy)
            data = np.ascontiguousarray(comp.transpose(1, 0, 2))
        mean_k = np.zeros((data.shape[1], ny, nx), dtype=np.complex128)
        counts = np.zeros(ny)
        np.add.at(mean_k.transpose(1, 0, 2), raw.line[rows], data)
        np.add.at(counts, raw.line[rows], 1)
        mean_k /= np.maximum(counts, 1)[None, :, None]
        # Time-averaged image per coil: every line sampled at least once gives a full-resolution reference.
        maps = coil_maps_from_mean(ifft2c_np(mean_k)[None])
        return CartesianSubspace(maps, raw.line[rows], frame, basis, device=device), data
    traj = raw.trajectory[rows][..., :2]  # [A, samples, 2] cycles/FOV
    n_s = traj.shape[1]
    k = traj.reshape(-1, 2)
    frame_of_sample = np.repeat(frame, n_s)
    data = raw.data[rows].transpose(1, 0, 2).reshape(raw.data.shape[1], -1)  # [C, M]
    data, _ = compress_coils(data, coil_energy)
    # Density of the union of all frames, computed on the distinct positions (arms repeat), then shared
    # among the samples that hit the same position.
    points, index = _unique_points(k)
    dcf_u = pipe_menon_dcf(points, (ny, nx))
    multiplicity = np.bincount(index, minlength=points.shape[0])
    dcf = (dcf_u[index] / multiplicity[index]).astype(np.float32)
    maps = lowres_maps(data, k, (ny, nx), dcf)
    op = NonCartesianSubspace(maps, k, frame_of_sample, basis, dcf=dcf if weighted else None, device=device)
    return op, data


# Said in every map the shipped MRF weights produce, so a reader of the DICOM series sees it (model card: CPU-trained).
SHIPPED_MRF_CAVEAT = ("shipped ncpdnet_mrf weights are under-trained (CPU, 825 steps): CSF T1/T2 unreliable; "
                      "recon=cgsense is the validated reconstruction")


def _ncpdnet_network(raw: RawStudy, seq: MRFSequence, params: dict[str, Any], ctx: RunContext
                     ) -> tuple[Any, torch.Tensor]:
    """The MRF NC-PDNet and the subspace basis it was trained in (it travels with the weights)."""
    from pipelines.recon.ncpdnet import SHIPPED_MRF, cached_ncpdnet

    if raw.trajectory_kind == "cartesian":
        raise ValueError("recon=ncpdnet is for non-Cartesian (spiral / radial) MRF; use cgsense for Cartesian data")
    if not params["dcf"]:
        raise ValueError("recon=ncpdnet needs the density compensation (--set dcf=true)")
    net, meta = cached_ncpdnet(params["weights"], SHIPPED_MRF, ctx.device)
    basis = meta.get("basis")
    if basis is None:
        raise ValueError(f"weights {params['weights'] or SHIPPED_MRF!r} carry no MRF subspace basis (anatomical "
                         "NC-PDNet weights? use them with --pipeline noncartesian_recon)")
    if basis.shape[0] != seq.n_frames:
        raise ValueError(f"the NC-PDNet weights were trained for a {basis.shape[0]}-frame schedule "
                         f"({meta.get('sequence')}), this scan has {seq.n_frames} frames ({seq.name})")
    return net, basis.to(ctx.device)


def _mrf(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    validate_raw(raw, "cartesian" if raw.trajectory_kind == "cartesian" else "noncartesian")
    seq = sequence_for_raw(raw, params["sequence"])
    field = params["field"] or raw.study.field_strength_T or 3.0
    model = resolve_model(seq, params["model"])
    dictionary = build_dictionary(seq, default_spec(seq, model, float(field), complex_data=True),
                                  device=ctx.device, cache_dir=ctx.cache_dir, progress=ctx.progress,
                                  report=ctx.log.info)
    rank = min(params["rank"], dictionary.complex.basis.shape[1])
    basis = dictionary.complex.basis[:, :rank].to(ctx.device)
    net = None
    if params["recon"] == "ncpdnet":
        net, basis = _ncpdnet_network(raw, seq, params, ctx)
        rank = int(basis.shape[1])
    slices = np.unique(raw.slice)
    ny, nx = raw.matrix
    # Only K coefficient images per slice are ever held (K x slices x ny x nx complex: 42 MB for 10 slices at 256^2,
    # rank 8); the frames are never formed.
    coefficients = np.empty((rank, slices.size, ny, nx), dtype=np.complex64)
    notes: list[str] = []
    for i, s in enumerate(slices):
        t0 = time.perf_counter()
        rows = np.flatnonzero(raw.slice == s)
        op, data = slice_operator(raw, rows, basis, ctx.device, weighted=params["dcf"],
                                  coil_energy=params["coil_energy"])
        with torch.no_grad():
            if net is not None:
                res = SubspaceResult(ncpdnet_subspace(op, torch.as_tensor(data), net).cpu().numpy(), 0,
                                     [f"NC-PDNet ({net.config.n_iter} unrolled iterations)"]
                                     + ([] if params["weights"] else [SHIPPED_MRF_CAVEAT]))
            else:
                res = reconstruct(op, data, params["recon"], lam=params["lam"], iterations=params["iterations"])
        c = res.coefficients
        if raw.trajectory_kind != "cartesian" and net is None:  # NC-PDNet was trained to the unfiltered truth
            c = kspace_filter(c, params["filter"])
        coefficients[:, i] = c
        notes = res.notes + ([f"{data.shape[0]} virtual coils of {raw.data.shape[1]} (coil compression, "
                              f"{params['coil_energy']:g} of the energy)"] if data.shape[0] < raw.data.shape[1] else [])
        ctx.log.info("slice %d/%d (index %d): %s reconstruction of %d coefficient images in %.1f s (%s)", i + 1,
                     slices.size, int(s), params["recon"], rank, time.perf_counter() - t0, "; ".join(notes))
        del op, data
    # Matched in the reconstruction's own subspace, in the coefficient domain: atoms truncated to the same rank
    # as the fingerprints (matching at a higher rank compares atoms' components the data cannot have).
    options = MappingOptions(model=model, rank=rank, mask_threshold=params["mask_threshold"],
                             memory_bytes=int(params["memory_gb"] * 1024**3), field_strength_T=float(field),
                             estimator=params["estimator"], weights=params["estimator_weights"],
                             search=params["search"])
    t0 = time.perf_counter()
    maps = estimate_maps(coefficients, seq, raw.geometry, options, magnitude=False, device=ctx.device,
                         cache_dir=ctx.cache_dir, progress=ctx.progress, basis=basis, report=ctx.log.info)
    ctx.log.info("maps of %d slices in %.1f s", slices.size, time.perf_counter() - t0)
    for m in maps:
        m.notes = [f"{raw.trajectory_kind} MRF, {params['recon']} subspace reconstruction (rank {rank})"] + notes \
            + m.notes
    return maps


register(PipelineSpec(
    name="mrf",
    input_kind="raw",
    summary="raw MRF k-space (spiral, radial or Cartesian) -> low-rank subspace reconstruction -> T1, T2 or FF, "
            "PD, B1, residual maps",
    run=_mrf,
    params={
        "recon": Param(str, "cgsense", "adjoint (subspace back-projection), cgsense (low-rank CG-SENSE) or "
                       "ncpdnet (learned NC-PDNet subspace reconstruction; its own rank and basis)", choices=RECONS),
        "weights": Param(str, "", "ncpdnet: a site's own safetensors weights (empty: the shipped ncpdnet_mrf)"),
        "estimator": Param(str, "dictionary", "map estimator: dictionary matching, a learned network (fc, inn, "
                           "blochnet, hybrid) or the per-voxel maximum-likelihood fit (mle, slow)", choices=ESTIMATORS),
        "estimator_weights": Param(str, "", "learned estimator weights (empty: the shipped ones for the schedule)"),
        "rank": Param(int, 8, "subspace rank K (coefficient images reconstructed and matched)"),
        "filter": Param(str, "hann", "k-space apodisation of non-Cartesian coefficient images", choices=("hann", "none")),
        "lam": Param(float, 1e-3, "Tikhonov weight relative to the largest eigenvalue of A^H A"),
        "iterations": Param(int, 20, "CG iterations"),
        "dcf": Param(bool, True, "density-weighted least squares (faster convergence for non-Cartesian data)"),
        "sequence": Param(str, "", "schedule when the header lacks it: fisp, t1ff or a JSON file"),
        "model": Param(str, "auto", "single or water_fat (auto: water_fat when TE varies)", choices=MODELS),
        "field": Param(float, 0.0, "field strength in T (0: from the header)"),
        "mask_threshold": Param(float, 0.05, "background: PD below this fraction of its 99th percentile"),
        "memory_gb": Param(float, 2.0, "peak memory budget of the matcher"),
        "search": Param(str, "fast", "dictionary search: fast (coarse-to-fine, the default) or exhaustive (every "
                        "atom; the reference, ~20x slower)", choices=("fast", "exhaustive")),
        "coil_energy": Param(float, 0.99, "coil compression: keep the fewest virtual coils holding this fraction "
                             "of the signal energy (1: no compression)"),
    },
))
