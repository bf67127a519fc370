"""Which estimator a pipeline runs: ``--set estimator=dictionary|fc|inn|blochnet|hybrid|mle`` (+ ``weights=``).

Learned estimators are tied to the schedule they were trained on and to the kind of input (complex
fingerprints from the raw path, or magnitude images as most DICOM series carry): the shipped weights are found
by the schedule's fingerprint key (not its name: a schedule read back from DICOM is named ``from_dicom``) and
that input kind (``estimator_<model>_<schedule>.safetensors`` for complex, ``..._magnitude.safetensors`` for
magnitude data), and a site's own file (``weights=/path.safetensors``) must have been trained on the same schedule.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from pipelines.mapping.estimators import MODEL_CLASSES, TRAINABLE
from pipelines.mapping.estimators.base import Estimator, load_estimator
from pipelines.mapping.estimators.data import default_space
from pipelines.mapping.estimators.mle import MLEEstimator
from pipelines.physics.sequences import MRFSequence
from pipelines.weights_io import WEIGHTS_DIR, load_weights

ESTIMATOR_CHOICES = ("dictionary",) + tuple(MODEL_CLASSES)


def _meta_key(path: Path) -> tuple[str, bool] | None:
    """(schedule fingerprint key, trained on complex data) of a weights file, from its metadata only."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("recon_node", "{}"))
        return MRFSequence.from_dict(meta["sequence"]).fingerprint_key(), bool(meta["complex_data"])
    except (OSError, ValueError, KeyError):
        return None


def shipped_estimator_path(model: str, seq: MRFSequence, magnitude: bool = False) -> Path:
    """The shipped weights of ``model`` trained on ``seq`` (matched by schedule, not by name) for complex
    fingerprints, or with ``magnitude`` for magnitude images."""
    want = (seq.fingerprint_key(), not magnitude)
    candidates = sorted(WEIGHTS_DIR.glob(f"estimator_{model}_*.safetensors"))
    for path in candidates:
        if _meta_key(path) == want:
            return path
    trained = ", ".join(p.stem.removeprefix(f"estimator_{model}_") for p in candidates) or "none"
    kind = "magnitude" if magnitude else "complex"
    raise ValueError(
        f"no shipped {model} weights for {kind} data of schedule {seq.name!r} (shipped: {trained}); train them "
        f"with `recon-node train estimator --model {model} --sequence FILE.json"
        f"{' --magnitude' if magnitude else ''}` and pass --set weights=PATH"
    )


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float, device: str) -> Estimator:
    return load_estimator(path, device)


def resolve_estimator(
    name: str,
    seq: MRFSequence,
    *,
    weights: str = "",
    model: str = "auto",
    field_strength_T: float = 3.0,
    magnitude: bool = False,
    device: torch.device | str = "cpu",
) -> Estimator:
    """The estimator ``name`` for ``seq``: loaded weights (learned models) or a configured MLE fitter."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATOR_CHOICES)}, not {name!r}")
    if name == "mle":
        space = default_space(seq, None if model == "auto" else model, field_strength_T)
        return MLEEstimator(seq, space, input="full", complex_data=not magnitude).to(device)
    path = Path(weights).expanduser() if weights else shipped_estimator_path(name, seq, magnitude)
    est = _load_cached(str(path), path.stat().st_mtime if path.exists() else 0.0, str(device))
    if est.model_name != name:
        raise ValueError(f"{path} holds a {est.model_name} estimator, not {name}")
    if est.sequence.fingerprint_key() != seq.fingerprint_key():
        raise ValueError(
            f"{path} was trained on schedule {est.sequence.name!r} ({est.sequence.n_frames} frames), "
            f"not on this series' schedule {seq.name!r} ({seq.n_frames} frames)"
        )
    if est.encoder.complex_data and magnitude:
        raise ValueError(
            f"{path} was trained on complex fingerprints; these images are magnitude-only "
            "(train magnitude weights with --magnitude)"
        )
    if model not in ("auto", est.space.kind):
        raise ValueError(f"{path} estimates the {est.space.kind} model, not {model}")
    return est


__all__ = ["ESTIMATOR_CHOICES", "TRAINABLE", "resolve_estimator", "shipped_estimator_path", "load_weights"]
