"""Learned / fitted estimators inside the mapping code: fingerprints of the kept voxels -> a MatchResult.

The maps are the same kinds as dictionary matching gives. PD is ||x|| / ||s(theta_hat)|| from an EPG
re-simulation of the estimate; the residual map is the relative fit residual of that re-simulation, except for
the INN, whose own forward pass (the learned Bloch simulation) re-simulates the fingerprint: its residual map is
that forward-backward consistency (Balsiger et al. Sec. 3.3), at no simulation cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.mapping.estimators.base import Estimator
from pipelines.mapping.estimators.data import fat_t2_ms
from pipelines.mapping.estimators.select import resolve_estimator
from pipelines.mapping.matching import MatchResult
from pipelines.physics.sequences import MRFSequence

if TYPE_CHECKING:  # maps imports this module (lazily): a runtime import would be a cycle
    from pipelines.mapping.maps import MappingOptions


def estimate_learned(
    signals: torch.Tensor,
    seq: MRFSequence,
    options: MappingOptions,
    model: str,
    *,
    magnitude: bool,
    device: torch.device | str = "cpu",
) -> MatchResult:
    est = resolve_estimator(
        options.estimator,
        seq,
        weights=options.weights,
        model=model,
        field_strength_T=options.field_strength_T,
        magnitude=magnitude,
        device=device,
    )
    if est.space.kind != model:
        raise ValueError(
            f"the {options.estimator} estimator for {seq.name!r} estimates the {est.space.kind} model, not {model}"
        )
    x = signals if not magnitude else (signals.abs() if signals.is_complex() else signals).float()
    with torch.no_grad():
        p = est.predict(x)
        residual, pd = Estimator.consistency(est, x, p)
        if est.model_name == "inn":
            residual, _ = est.consistency(x, p)
    n = x.shape[0]
    zeros = np.zeros(n, dtype=np.float32)
    notes = [
        f"parameters estimated by the {est.model_name} estimator"
        + (
            f" (weights trained on {est.sequence.name}, {est.train_info.get('labels', 'gt')} labels)"
            if est.model_name != "mle"
            else " (bounded maximum-likelihood fit per voxel)"
        )
    ]
    if est.model_name == "inn":
        notes.append("residual map: consistency of the INN's forward re-simulation of its estimate")
    if magnitude:
        notes.append("estimated from magnitudes: phase was not available")
    if model == "water_fat":
        return MatchResult(
            p["t1_ms"],
            p.get("t2_ms", zeros + 35.0),
            p.get("b1", zeros + 1),
            p.get("df_hz", zeros),
            pd,
            residual,
            0,
            ff=p["ff"],
            t1_fat_ms=p["t1_fat_ms"],
            t2_fat_ms=zeros + fat_t2_ms(est.space.field_strength_T),
            notes=notes,
        )
    return MatchResult(p["t1_ms"], p["t2_ms"], p.get("b1", zeros + 1), zeros, pd, residual, 0, notes=notes)
