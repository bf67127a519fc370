"""``cartesian_frames``: Cartesian raw data -> one complex image per frame (the MRF frames, no model)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pipelines.recon.cartesian import reconstruct_frames
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import PipelineOutput, RawStudy, ReconImage


def _cartesian_frames(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    # One slice at a time (k-space of different slices must never be summed), output frame-major: frame 0 of
    # every slice, then frame 1 ... (the DICOM writer's layout for a multi-slice ReconImage).
    slices = np.unique(raw.slice)
    per_slice = []
    for s in slices:
        rows = raw.slice == s
        sub = dataclasses.replace(
            raw,
            data=raw.data[rows],
            line=raw.line[rows],
            frame=raw.frame[rows],
            slice=raw.slice[rows],
            flags=raw.flags[rows],
            trajectory=None if raw.trajectory is None else raw.trajectory[rows],
        )
        per_slice.append(reconstruct_frames(sub))
    frames = np.stack(per_slice, axis=1)  # [frames, slices, y, x]
    if params["frames"] != "all":
        sel = np.unique(np.clip([int(v) for v in str(params["frames"]).split(",")], 0, frames.shape[0] - 1))
        frames = frames[sel]
    n_lines = np.unique(raw.line[(raw.frame == 0) & (raw.slice == slices[0])]).size
    notes = (
        []
        if n_lines == raw.matrix[0]
        else [f"zero-filled: {n_lines} of {raw.matrix[0]} lines per frame (aliasing expected)"]
    )
    ctx.log.info("reconstructed %d frames x %d slices of %dx%d", frames.shape[0], len(slices), *raw.matrix)
    data = frames[:, 0] if len(slices) == 1 else frames.reshape(-1, *frames.shape[2:])
    return [
        ReconImage(
            kind="image", data=data, description="MRF frames (IFFT, coil-combined)", geometry=raw.geometry, notes=notes
        )
    ]


register(
    PipelineSpec(
        name="cartesian_frames",
        input_kind="raw",
        summary="Cartesian raw data -> one complex image per frame (zero-filled IFFT, coil combination)",
        run=_cartesian_frames,
        params={"frames": Param(str, "all", "'all' or a comma-separated list of frame indices to keep")},
    )
)
