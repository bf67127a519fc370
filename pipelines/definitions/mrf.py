"""The MRF pipelines: fingerprints -> T1, T2 (or FF, T1 water/fat), PD, B1, residual maps.

* ``mrf_maps_from_images``: an MRF image series (DICOM fingerprint frames), matched frame by frame.
* ``mrf``: raw MRF k-space (spiral, radial or Cartesian). The dictionary comes first because its SVD basis defines
  the subspace the images are reconstructed in; the K coefficient images of each slice are then matched against
  the same dictionary in that subspace (never expanded to the frames: 1000 frames of ten 256^2 slices would be
  5.2 GB). Slices are reconstructed one at a time, after coil compression to virtual coils, so memory stays at one
  slice's operator.

Both take the mapping parameters of :data:`MAPPING_PARAMS` (schedule, model, field, estimator, search, mask,
memory), defined once here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipelines.mapping.b1_measured import resample_b1
from pipelines.mapping.dictionary import build_dictionary
from pipelines.mapping.estimators.select import ESTIMATOR_CHOICES
from pipelines.mapping.maps import MODELS, MappingOptions, default_spec, estimate_maps, resolve_model
from pipelines.mapping.matching import DEFAULT_ENERGY
from pipelines.physics.sequences import MRFSequence, get_sequence
from pipelines.recon import llr, tv
from pipelines.recon.fat_subspace import with_fat_directions
from pipelines.recon.ncpdnet import ncpdnet_subspace
from pipelines.recon.raw_prep import coverage_note, te_cycle_aliasing, validate_raw
from pipelines.recon.subspace import (
    COIL_MAPS,
    NonCartesianSubspace,
    SubspaceResult,
    kspace_filter,
    reconstruct,
    slice_operator,
)
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import ImageStudy, PipelineOutput, RawStudy, StudyInfo

# What b1_smooth_mm=-1 means for raw data (pipelines/mapping/b1_field.py; BENCHMARKS.md, "A smooth B1 field").
AUTO_B1_SMOOTH_MM = 20.0

# ---- mapping parameters common to the MRF pipelines ---------------------------------------------------------------
MAPPING_PARAMS: dict[str, Param] = {
    "sequence": Param(
        str,
        "",
        "schedule when the input does not carry it (per-frame DICOM timing, ISMRMRD "
        "sequenceParameters): fisp, t1ff or a JSON file",
    ),
    "model": Param(
        str, "auto", "single (T1, T2) or water_fat (FF, T1 water/fat); auto: water_fat when TE varies", choices=MODELS
    ),
    "field": Param(float, 0.0, "field strength in T for the fat spectrum (0: from the header)"),
    "estimator": Param(
        str,
        "dictionary",
        "map estimator: dictionary matching, a learned network (fc, inn, "
        "blochnet, hybrid) or the per-voxel maximum-likelihood fit (mle, slow)",
        choices=ESTIMATOR_CHOICES,
    ),
    "estimator_weights": Param(str, "", "learned estimator weights (empty: the shipped ones for the schedule)"),
    "search": Param(
        str,
        "fast",
        "dictionary search: fast (coarse-to-fine, the default) or exhaustive (every atom or water/fat pair; the "
        "reference, ~10-30x slower)",
        choices=("fast", "exhaustive"),
    ),
    "b1_smooth_mm": Param(
        float,
        -1.0,
        "single-compartment matching: hold B1 to the voxel-wise B1 smoothed over this many mm (Gaussian sigma) and "
        "match T1 / T2 again (fluid keeps its free match); FISP's T2 and B1 otherwise trade off voxel by voxel. "
        "0: B1 free in every voxel; -1 (auto): 20 for raw data reconstructed with recon=tv (measured there), else 0",
    ),
    "mask_threshold": Param(float, 0.05, "background: PD below this fraction of its 99th percentile"),
    "memory_gb": Param(float, 2.0, "peak memory budget of the matcher"),
}


def _field_T(params: dict[str, Any], study: StudyInfo) -> float:
    return float(params["field"] or study.field_strength_T or 3.0)


def mapping_options(
    params: dict[str, Any],
    *,
    model: str,
    rank: int | None,
    field_T: float,
    energy: float = DEFAULT_ENERGY,
) -> MappingOptions:
    """The :class:`MappingOptions` of resolved :data:`MAPPING_PARAMS` plus what each pipeline decides itself."""
    return MappingOptions(
        model=model,
        rank=rank,
        energy=energy,
        mask_threshold=params["mask_threshold"],
        memory_bytes=int(params["memory_gb"] * 1024**3),
        field_strength_T=field_T,
        estimator=params["estimator"],
        weights=params["estimator_weights"],
        search=params["search"],
        b1_smooth_mm=max(params["b1_smooth_mm"], 0.0),  # raw data: resolve_auto's choice; image series: off
    )


# ---- image series ---------------------------------------------------------------------------------------------------
def sequence_for_images(study: ImageStudy, name_or_path: str) -> MRFSequence:
    """The schedule of an image series: ``--set sequence=...`` when given, else the per-frame DICOM timing."""
    n = study.pixels.shape[0]
    if name_or_path:
        seq = get_sequence(name_or_path)
    elif study.flip_angles_deg is not None and study.tr_ms is not None and study.te_ms is not None:
        seq = MRFSequence("from_dicom", study.flip_angles_deg, study.tr_ms, study.te_ms, ti_ms=study.ti_ms)
        if np.ptp(seq.flip_angles_deg) == 0:
            raise ValueError(
                f"{study.source_path}: every frame has the same FlipAngle "
                f"({seq.flip_angles_deg[0]:g} deg): this is not an MRF schedule; the scanner may "
                "not store per-frame timing, so give it with --set sequence=NAME|path.json"
            )
    else:
        raise ValueError(
            f"{study.source_path}: the instances do not carry per-frame FlipAngle / RepetitionTime / "
            "EchoTime; give the schedule with --set sequence=fisp|t1ff|path.json"
        )
    if seq.n_frames != n:
        raise ValueError(
            f"{study.source_path}: the series has {n} frames but sequence {seq.name!r} has "
            f"{seq.n_frames}; check the series or the --set sequence value"
        )
    return seq


def _mrf_maps_from_images(study: ImageStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    seq = sequence_for_images(study, params["sequence"])
    field = _field_T(params, study.study)
    options = mapping_options(
        params, model=params["model"], rank=params["rank"] or None, field_T=field, energy=params["energy"]
    )
    ctx.log.info(
        "%s: %d frames x %d slices (%dx%d) with sequence %s, model %s, %.1f T, %s data",
        params["estimator"],
        seq.n_frames,
        study.pixels.shape[1],
        *study.pixels.shape[2:],
        seq.name,
        options.model,
        field,
        "magnitude" if study.is_magnitude else "complex",
    )
    maps = estimate_maps(
        study.pixels,
        seq,
        study.geometry,
        options,
        magnitude=study.is_magnitude,
        device=ctx.device,
        cache_dir=ctx.cache_dir,
        progress=ctx.progress,
    )
    return list(maps)  # list is invariant: list[QuantitativeMap] is not a list[PipelineOutput] to mypy


register(
    PipelineSpec(
        name="mrf_maps_from_images",
        input_kind="images",
        summary="MRF image series (DICOM fingerprint frames) -> T1, T2 or FF, PD, B1, residual maps (dictionary "
        "matching or a learned estimator)",
        run=_mrf_maps_from_images,
        params={
            "rank": Param(int, 0, "SVD rank (0: chosen by retained energy)"),
            "energy": Param(float, DEFAULT_ENERGY, "retained energy that chooses the SVD rank"),
            **MAPPING_PARAMS,
        },
    )
)


# ---- raw k-space ----------------------------------------------------------------------------------------------------
RECONS = ("auto", "adjoint", "cgsense", "llr", "tv", "ncpdnet")

# Said in every map the shipped MRF weights produce, so a reader of the DICOM series sees it (model card: trained
# on simulated 64² data only; better than TV there with B1 free, not than TV's default smooth B1, nor at 128²).
SHIPPED_MRF_CAVEAT = (
    "ncpdnet_mrf weights trained on simulated 64x64 spiral FISP only: T2 biased up to 12 %; white matter T2 worse "
    "than the default (recon=tv, B1 held to a smooth field), and at 128x128 grey matter T1 and CSF T2 worse than "
    "the classical reconstructions (tv or cgsense)"
)


def sequence_for_raw(raw: RawStudy, name_or_path: str) -> MRFSequence:
    """The schedule: ``--set sequence=...`` when given, else the one the ISMRMRD header carries."""
    seq = get_sequence(name_or_path) if name_or_path else raw.sequence
    if seq is None:
        raise ValueError(
            f"{raw.source_path or 'input'}: the ISMRMRD header carries no MRF schedule "
            "(sequenceParameters flipAngle_deg / TR / TE per frame); give it with "
            "--set sequence=fisp|t1ff|path.json"
        )
    n_frames = int(raw.frame.max(initial=-1)) + 1
    if n_frames > seq.n_frames:
        raise ValueError(
            f"{raw.source_path or 'input'}: acquisitions reach frame (idx.repetition) {n_frames - 1} "
            f"but schedule {seq.name!r} has {seq.n_frames} frames"
        )
    if n_frames < seq.n_frames:
        raise ValueError(
            f"{raw.source_path or 'input'}: only {n_frames} of the {seq.n_frames} frames of schedule "
            f"{seq.name!r} were received (idx.repetition); the scan looks incomplete"
        )
    return seq


# What ``auto`` means per signal model. The water/fat model's FF lives in thin muscles between bright fat, where
# the Hann filter and CG-SENSE's noise both mix fat into muscle; radial thigh, 64², 4 coils, SNR 30, median muscle
# |FF error| mean / worst (benchmarks/ff_raw.py): CG-SENSE + Hann 8.2 / 24.3 pp, CG-SENSE 5.0 / 12.0, LLR (4x4)
# 2.6 / 6.0, LLR (2x2) 1.8 / 2.8, all with ESPIRiT maps (coupled TV: 1.5 / 2.9 at its best threshold, 0.1; worse at
# the brains' 0.3). For non-Cartesian FISP brains coupled TV without the filter: on held-out band-limited brains it
# beats CG-SENSE + Hann in white matter, grey matter, CSF and the ventricles, T1 and T2, at 64², 128² and 256², at
# 2-2.5x the reconstruction time (BENCHMARKS.md, "Coupled TV"); so does Cartesian FISP (band-limited held-out brains,
# R 5.3 per frame, 128², 8 coils: WM / GM T2 9.7 / 12.2 -> 1.9 / 4.7 %, with the smooth B1 field; "Cartesian FISP"),
# with the low-resolution coil maps NC-PDNet was also trained with.
AUTO = {
    "single": {"recon": "tv", "filter": "none", "coil_maps": "lowres", "llr_block": llr.DEFAULT_BLOCK},
    "water_fat": {"recon": "llr", "filter": "none", "coil_maps": "espirit", "llr_block": 2},
}


def resolve_auto(params: dict[str, Any], model: str) -> dict[str, Any]:
    """``params`` with every ``auto`` (``llr_block`` 0, ``b1_smooth_mm`` -1) replaced by the signal model's choice
    (:data:`AUTO`), Cartesian or not."""
    out = dict(params)
    for name, value in AUTO[model].items():
        if out[name] in ("auto", 0):
            out[name] = value
    if out["recon"] == "ncpdnet" and params["coil_maps"] == "auto":
        out["coil_maps"] = "lowres"
    if params["filter"] == "auto" and out["recon"] in ("cgsense", "adjoint", "llr") and model == "single":
        out["filter"] = "hann"  # what these were measured with; TV removes what the filter was for
    if out["b1_smooth_mm"] < 0:
        # Measured with TV only. CG-SENSE + Hann reads grey matter's voxel-wise B1 +6 % (the filter spreads CSF into
        # the cortex), so a field of it moved 64² GM T1 from 7.2 to 10.2 % (while WM T2 went 9.6 -> 4.8 %).
        out["b1_smooth_mm"] = AUTO_B1_SMOOTH_MM if out["recon"] == "tv" and model == "single" else 0.0
    return out


def _ncpdnet_network(
    raw: RawStudy, seq: MRFSequence, params: dict[str, Any], ctx: RunContext
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
        raise ValueError(
            f"weights {params['weights'] or SHIPPED_MRF!r} carry no MRF subspace basis (anatomical "
            "NC-PDNet weights? use them with --pipeline noncartesian_recon)"
        )
    if basis.shape[0] != seq.n_frames:
        raise ValueError(
            f"the NC-PDNet weights were trained for a {basis.shape[0]}-frame schedule "
            f"({meta.get('sequence')}), this scan has {seq.n_frames} frames ({seq.name})"
        )
    return net, basis.to(ctx.device)


def _measured_b1(raw: RawStudy, params: dict[str, Any], model: str, ctx: RunContext) -> np.ndarray | None:
    """The study's measured B1 map on the maps' voxels (NaN where it has none), or None with the reason logged;
    ``b1_measured=required`` makes the reason an error."""
    choice, measured = params["b1_measured"], raw.b1_measured
    if choice == "off":
        return None
    why = ""
    if measured is None:
        why = "the study has no measured B1 series (route it to the b1_map pipeline)"
    elif model != "single" or params["estimator"] != "dictionary":
        why = "a measured B1 map is used by single-compartment dictionary matching only"
    else:
        try:
            b1 = resample_b1(measured, raw.geometry)
        except ValueError as e:
            why = str(e)
        else:
            covered = float(np.isfinite(b1).mean())
            if covered > 0:
                ctx.log.info(
                    "B1 held at the measured B1 map where it reaches (%.0f %% of the maps' voxels, median %.3f): %s",
                    100 * covered,
                    float(np.nanmedian(b1)),
                    "; ".join(measured.notes),
                )
                return b1
            why = "the B1 series does not reach the maps' slices"
    if choice == "required":
        raise ValueError(f"b1_measured is 'required' but {why}")
    if measured is not None:
        ctx.log.warning("measured B1 map not used: %s", why)
    return None


def _mrf(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    validate_raw(raw, "cartesian" if raw.trajectory_kind == "cartesian" else "noncartesian")
    seq = sequence_for_raw(raw, params["sequence"])
    field = _field_T(params, raw.study)
    model = resolve_model(seq, params["model"])
    params = resolve_auto(params, model)
    sampling_notes = (
        [n for n in (te_cycle_aliasing(raw, seq.te_ms), coverage_note(raw)) if n] if model == "water_fat" else []
    )
    for n in sampling_notes:
        ctx.log.warning("%s", n)
    dictionary = build_dictionary(
        seq,
        default_spec(seq, model, field, complex_data=True),
        device=ctx.device,
        cache_dir=ctx.cache_dir,
        progress=ctx.progress,
        report=ctx.log.info,
    )
    rank = min(params["rank"], dictionary.complex.basis.shape[1])
    basis = dictionary.complex.basis[:, :rank].to(ctx.device)
    fat_note = ""
    if not 0 <= params["fat_directions"] <= 8:
        raise ValueError(f"fat_directions must be between 0 and 8, got {params['fat_directions']}")
    if model == "single" and params["fat_directions"] > 0 and params["recon"] != "ncpdnet":
        # A water dictionary's subspace has no room for fat (scalp, marrow): give its signal directions of its own
        # so that its aliasing does not land in the coefficients that carry T2 (pipelines/recon/fat_subspace.py).
        basis = with_fat_directions(basis, seq, field, params["fat_directions"])
        rank = int(basis.shape[1])
        fat_note = f"subspace: rank {params['rank']} dictionary basis + {params['fat_directions']} fat directions"
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
        op, data = slice_operator(
            raw,
            rows,
            basis,
            ctx.device,
            weighted=params["dcf"],
            coil_energy=params["coil_energy"],
            maps=params["coil_maps"],
        )
        with torch.no_grad():
            if net is not None:
                # _ncpdnet_network rejects Cartesian raw data, so with a network the operator is non-Cartesian.
                assert isinstance(op, NonCartesianSubspace)
                res = SubspaceResult(
                    ncpdnet_subspace(op, torch.as_tensor(data), net).cpu().numpy(),
                    0,
                    [f"NC-PDNet ({net.config.n_iter} unrolled iterations)"]
                    + ([] if params["weights"] else [SHIPPED_MRF_CAVEAT]),
                )
            elif params["recon"] == "llr":
                res = llr.llr_reconstruct(
                    op,
                    data,
                    lam=params["llr_lambda"],
                    block=params["llr_block"],
                    iterations=params["admm_iterations"] or llr.DEFAULT_ITERATIONS,
                    first=params["iterations"],
                )
            elif params["recon"] == "tv":
                res = tv.tv_reconstruct(
                    op,
                    data,
                    lam=params["tv_lambda"],
                    iterations=params["admm_iterations"] or tv.DEFAULT_ITERATIONS,
                    first=params["iterations"],
                )
            else:
                res = reconstruct(op, data, params["recon"], lam=params["lam"], iterations=params["iterations"])
        c = res.coefficients
        if raw.trajectory_kind != "cartesian" and net is None:  # NC-PDNet was trained to the unfiltered truth
            c = kspace_filter(c, params["filter"])
        coefficients[:, i] = c
        notes = (
            res.notes
            + ([fat_note] if fat_note else [])
            + (
                ["coil maps: ESPIRiT on the first coefficient image's k-space"]
                if params["coil_maps"] == "espirit"
                else []
            )
            + (
                [
                    f"{data.shape[0]} virtual coils of {raw.data.shape[1]} (coil compression, "
                    f"{params['coil_energy']:g} of the energy)"
                ]
                if data.shape[0] < raw.data.shape[1]
                else []
            )
        )
        ctx.log.info(
            "slice %d/%d (index %d): %s reconstruction of %d coefficient images in %.1f s (%s)",
            i + 1,
            slices.size,
            int(s),
            params["recon"],
            rank,
            time.perf_counter() - t0,
            "; ".join(notes),
        )
        del op, data
    # Matched in the reconstruction's own subspace, in the coefficient domain: atoms truncated to the same rank
    # as the fingerprints (matching at a higher rank compares atoms' components the data cannot have).
    options = mapping_options(params, model=model, rank=rank, field_T=field)
    b1_map = _measured_b1(raw, params, model, ctx)
    ctx.phase("mapping")
    t0 = time.perf_counter()
    maps = estimate_maps(
        coefficients,
        seq,
        raw.geometry,
        options,
        magnitude=False,
        device=ctx.device,
        cache_dir=ctx.cache_dir,
        progress=ctx.progress,
        basis=basis,
        report=ctx.log.info,
        dictionary=dictionary,  # the one loaded for the basis: not read from the cache a second time
        b1_map=b1_map,
    )
    ctx.log.info("maps of %d slices in %.1f s", slices.size, time.perf_counter() - t0)
    for m in maps:
        m.notes = (
            [f"{raw.trajectory_kind} MRF, {params['recon']} subspace reconstruction (rank {rank})"]
            + notes
            + sampling_notes
            + m.notes
        )
        m.warnings += [n for n in (*sampling_notes, SHIPPED_MRF_CAVEAT) if n in m.notes]
    return list(maps)  # list is invariant: list[QuantitativeMap] is not a list[PipelineOutput] to mypy


register(
    PipelineSpec(
        name="mrf",
        input_kind="raw",
        summary="raw MRF k-space (spiral, radial or Cartesian) -> low-rank subspace reconstruction -> T1, T2 or FF, "
        "PD, B1, residual maps",
        run=_mrf,
        params={
            "recon": Param(
                str,
                "auto",
                "adjoint (subspace back-projection), cgsense (low-rank CG-SENSE), llr (locally low-rank "
                "regularised, ADMM), tv (coupled total variation on the coefficient images, ADMM), ncpdnet "
                "(learned NC-PDNet subspace reconstruction; its own rank and basis) "
                "or auto (tv for single-compartment schedules, spiral, radial or Cartesian; llr for water/fat)",
                choices=RECONS,
            ),
            "weights": Param(str, "", "ncpdnet: a site's own safetensors weights (empty: the shipped ncpdnet_mrf)"),
            "rank": Param(int, 8, "subspace rank K (coefficient images reconstructed and matched)"),
            "fat_directions": Param(
                int,
                2,
                "single-compartment model: temporal directions of fat signals added to the rank-K basis (scalp, "
                "marrow; 0: none), so their aliasing does not bias T2",
            ),
            "filter": Param(
                str,
                "auto",
                "k-space apodisation of non-Cartesian coefficient images (auto: none for tv and water/fat, hann "
                "for the other reconstructions)",
                choices=("auto", "hann", "none"),
            ),
            "lam": Param(float, 1e-3, "Tikhonov weight relative to the largest eigenvalue of A^H A"),
            "iterations": Param(int, 20, "CG iterations (llr, tv: of their first, regularised, solve)"),
            "llr_lambda": Param(
                float,
                llr.DEFAULT_LAMBDA,
                "llr: singular value threshold relative to the largest block singular value of the first solve",
            ),
            "llr_block": Param(
                int,
                0,
                f"llr: block side in pixels, shifted at random every iteration (0: {llr.DEFAULT_BLOCK}, "
                "2 for water/fat)",
            ),
            "tv_lambda": Param(
                float,
                tv.DEFAULT_LAMBDA,
                "tv: threshold relative to the 99th percentile of the first solve's per-pixel gradient norm",
            ),
            "admm_iterations": Param(
                int,
                0,
                f"llr, tv: ADMM iterations (0: {llr.DEFAULT_ITERATIONS} for llr with 5 warm-started CG steps each, "
                f"{tv.DEFAULT_ITERATIONS} for tv with {tv.DEFAULT_INNER})",
            ),
            "dcf": Param(bool, True, "density-weighted least squares (faster convergence for non-Cartesian data)"),
            "coil_maps": Param(
                str,
                "auto",
                "coil sensitivities: espirit (ESPIRiT on the first coefficient image's k-space), lowres "
                "(non-Cartesian: RSS-normalised low-resolution images; Cartesian: the time-averaged image over its "
                "RSS) or auto (espirit for the water/fat model)",
                choices=("auto", *COIL_MAPS),
            ),
            "coil_energy": Param(
                float,
                0.99,
                "coil compression: keep the fewest virtual coils holding this fraction "
                "of the signal energy (1: no compression)",
            ),
            "b1_measured": Param(
                str,
                "auto",
                "a measured B1+ map of the study (a B1 series routed to b1_map): auto uses it where it reaches "
                "(single-compartment dictionary matching), off ignores it, required fails the job without one",
                choices=("auto", "off", "required"),
            ),
            **MAPPING_PARAMS,
        },
    )
)
