"""Registers the pipelines that ship with recon-node (imported lazily by :mod:`pipelines.registry`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pipelines.mapping.estimators.select import ESTIMATOR_CHOICES
from pipelines.mapping.maps import MODELS, MappingOptions, estimate_maps
from pipelines.physics.sequences import MRFSequence, get_sequence
from pipelines.recon.cartesian import reconstruct_frames
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import ImageStudy, PipelineOutput, RawStudy, ReconImage


def _cartesian_frames(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    # One slice at a time (k-space of different slices must never be summed), output frame-major: frame 0 of
    # every slice, then frame 1 ... (the DICOM writer's layout for a multi-slice ReconImage).
    slices = np.unique(raw.slice)
    per_slice = []
    for s in slices:
        rows = raw.slice == s
        sub = dataclasses.replace(
            raw, data=raw.data[rows], line=raw.line[rows], frame=raw.frame[rows], slice=raw.slice[rows],
            flags=raw.flags[rows], trajectory=None if raw.trajectory is None else raw.trajectory[rows])
        per_slice.append(reconstruct_frames(sub))
    frames = np.stack(per_slice, axis=1)  # [frames, slices, y, x]
    if params["frames"] != "all":
        sel = np.unique(np.clip([int(v) for v in str(params["frames"]).split(",")], 0, frames.shape[0] - 1))
        frames = frames[sel]
    n_lines = np.unique(raw.line[(raw.frame == 0) & (raw.slice == slices[0])]).size
    notes = [] if n_lines == raw.matrix[0] else [
        f"zero-filled: {n_lines} of {raw.matrix[0]} lines per frame (aliasing expected)"]
    ctx.log.info("reconstructed %d frames x %d slices of %dx%d", frames.shape[0], len(slices), *raw.matrix)
    data = frames[:, 0] if len(slices) == 1 else frames.reshape(-1, *frames.shape[2:])
    return [ReconImage(kind="image", data=data, description="MRF frames (IFFT, coil-combined)",
                       geometry=raw.geometry, notes=notes)]


register(PipelineSpec(
    name="cartesian_frames",
    input_kind="raw",
    summary="Cartesian raw data -> one complex image per frame (zero-filled IFFT, coil combination)",
    run=_cartesian_frames,
    params={"frames": Param(str, "all", "'all' or a comma-separated list of frame indices to keep")},
))


def sequence_for_images(study: ImageStudy, name_or_path: str) -> MRFSequence:
    """The schedule of an image series: ``--set sequence=...`` when given, else the per-frame DICOM timing."""
    n = study.pixels.shape[0]
    if name_or_path:
        seq = get_sequence(name_or_path)
    elif study.flip_angles_deg is not None and study.tr_ms is not None and study.te_ms is not None:
        seq = MRFSequence("from_dicom", study.flip_angles_deg, study.tr_ms, study.te_ms, ti_ms=study.ti_ms)
        if np.ptp(seq.flip_angles_deg) == 0:
            raise ValueError(f"{study.source_path}: every frame has the same FlipAngle "
                             f"({seq.flip_angles_deg[0]:g} deg): this is not an MRF schedule; the scanner may "
                             "not store per-frame timing, so give it with --set sequence=NAME|path.json")
    else:
        raise ValueError(f"{study.source_path}: the instances do not carry per-frame FlipAngle / RepetitionTime / "
                         "EchoTime; give the schedule with --set sequence=fisp|t1ff|path.json")
    if seq.n_frames != n:
        raise ValueError(f"{study.source_path}: the series has {n} frames but sequence {seq.name!r} has "
                         f"{seq.n_frames}; check the series or the --set sequence value")
    return seq


def _mrf_maps_from_images(study: ImageStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    seq = sequence_for_images(study, params["sequence"])
    field = params["field"] or study.study.field_strength_T or 3.0
    options = MappingOptions(model=params["model"], rank=params["rank"] or None, energy=params["energy"],
                             mask_threshold=params["mask_threshold"],
                             memory_bytes=int(params["memory_gb"] * 1024**3), field_strength_T=float(field),
                             estimator=params["estimator"], weights=params["estimator_weights"])
    ctx.log.info("%s: %d frames x %d slices (%dx%d) with sequence %s, model %s, %.1f T, %s data",
                 params["estimator"], seq.n_frames, study.pixels.shape[1], *study.pixels.shape[2:], seq.name,
                 options.model, field,
                 "magnitude" if study.is_magnitude else "complex")
    return estimate_maps(study.pixels, seq, study.geometry, options, magnitude=study.is_magnitude,
                         device=ctx.device, cache_dir=ctx.cache_dir, progress=ctx.progress)


register(PipelineSpec(
    name="mrf_maps_from_images",
    input_kind="images",
    summary="MRF image series (DICOM fingerprint frames) -> T1, T2 or FF, PD, B1, residual maps (dictionary "
            "matching or a learned estimator)",
    run=_mrf_maps_from_images,
    params={
        "sequence": Param(str, "", "schedule when the DICOM lacks per-frame timing: fisp, t1ff or a JSON file"),
        "model": Param(str, "auto", "single (T1, T2) or water_fat (FF, T1 water/fat); auto: water_fat when TE "
                       "varies", choices=MODELS),
        "field": Param(float, 0.0, "field strength in T for the fat spectrum (0: from the DICOM header)"),
        "rank": Param(int, 0, "SVD rank (0: chosen by retained energy)"),
        "energy": Param(float, 1 - 1e-4, "retained energy that chooses the SVD rank"),
        "mask_threshold": Param(float, 0.05, "background: PD below this fraction of its 99th percentile"),
        "memory_gb": Param(float, 2.0, "peak memory budget of the matcher"),
        "estimator": Param(str, "dictionary", "map estimator: dictionary matching, a learned network (fc, inn, "
                           "blochnet, hybrid) or the per-voxel maximum-likelihood fit (mle, slow)",
                           choices=ESTIMATOR_CHOICES),
        "estimator_weights": Param(str, "", "learned estimator weights (empty: the shipped ones for the schedule)"),
    },
))
