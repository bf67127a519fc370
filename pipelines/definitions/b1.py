"""``b1_map``: a measured B1+ map series (one image per slice) read as relative B1.

A site routes its B1 series here (e.g. ``series_description: "B1map|tfl_b1"``). The job's ``b1`` map is what the
node then hands to the raw MRF jobs of the same study (``RawStudy.b1_measured``; the ``mrf`` pipeline's
``b1_measured`` parameter), which match T1 and T2 at it instead of at a B1 estimated from the fingerprints
(pipelines/mapping/b1_measured.py). Sent to PACS only when the route names destinations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.mapping.b1_measured import B1_PLAUSIBLE, DEFAULT_SMOOTH_MM, b1_from_series
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import ImageStudy, PipelineOutput


def _b1_map(study: ImageStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    b1 = b1_from_series(study, params["nominal"], params["smooth_mm"])
    covered = np.isfinite(b1.data)
    ctx.log.info(
        "B1 series %s: %d slice(s) of %dx%d at %.2g x %.2g mm, %.0f %% of the voxels between %g and %g of nominal, "
        "median %.3f",
        study.study.series_instance_uid or "?",
        b1.data.shape[0],
        *b1.geometry.matrix,
        *b1.geometry.pixel_spacing_mm,
        100 * float(covered.mean()),
        *B1_PLAUSIBLE,
        float(np.median(b1.data[covered])) if covered.any() else float("nan"),
    )
    return [b1]


register(
    PipelineSpec(
        name="b1_map",
        input_kind="images",
        summary="a measured B1+ map series -> relative B1, used by the raw MRF jobs of the same study",
        run=_b1_map,
        params={
            "smooth_mm": Param(
                float,
                DEFAULT_SMOOTH_MM,
                "in-plane Gaussian smoothing (sigma, mm) over the measured voxels: B1+ varies over centimetres, a B1 "
                "scan's noise voxel to voxel (0: none)",
            ),
            "nominal": Param(
                float,
                100.0,
                "stored value (after RescaleSlope / Intercept) of the nominal flip angle: 100 for a map in percent, "
                "800 for Siemens tfl_b1map (10 x its nominal 80 degrees), 1 for a ratio",
            ),
        },
    )
)
