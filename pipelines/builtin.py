"""Registers the pipelines that ship with recon-node (imported lazily by :mod:`pipelines.registry`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.recon.cartesian import reconstruct_frames
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import PipelineOutput, RawStudy, ReconImage


def _cartesian_frames(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    frames = reconstruct_frames(raw)
    if params["frames"] != "all":
        sel = np.unique(np.clip([int(v) for v in str(params["frames"]).split(",")], 0, frames.shape[0] - 1))
        frames = frames[sel]
    n_lines = np.unique(raw.line[raw.frame == 0]).size
    notes = [] if n_lines == raw.matrix[0] else [
        f"zero-filled: {n_lines} of {raw.matrix[0]} lines per frame (aliasing expected)"]
    ctx.log.info("reconstructed %d frames of %dx%d", frames.shape[0], *raw.matrix)
    return [ReconImage(kind="image", data=frames, description="MRF frames (IFFT, coil-combined)",
                       geometry=raw.geometry, notes=notes)]


register(PipelineSpec(
    name="cartesian_frames",
    input_kind="raw",
    summary="Cartesian raw data -> one complex image per frame (zero-filled IFFT, coil combination)",
    run=_cartesian_frames,
    params={"frames": Param(str, "all", "'all' or a comma-separated list of frame indices to keep")},
))
