"""Learned fingerprint-to-parameter estimators behind one interface (see :mod:`.base`), and the ML fitter.

``fc``        DRONE-style fully connected network (Cohen et al. 2018)
``inn``       invertible network, forward = learned Bloch simulation (Balsiger et al. 2020)
``blochnet``  FC encoder trained through the fixed differentiable EPG decoder (BlochNet)
``hybrid``    NNLS sparse code in a compartment-split dictionary + split MLP (Rensonnet et al. 2021)
``mle``       bounded maximum-likelihood fit per fingerprint (slow reference; Epstein et al. 2022 labels)
"""

from __future__ import annotations

from typing import Any

from pipelines.mapping.estimators.base import Estimator, FitConfig, FitResult, load_estimator
from pipelines.mapping.estimators.blochnet import BlochNetEstimator
from pipelines.mapping.estimators.fc import FCEstimator
from pipelines.mapping.estimators.hybrid import HybridEstimator
from pipelines.mapping.estimators.inn import INNEstimator
from pipelines.mapping.estimators.mle import MLEEstimator

MODEL_CLASSES: dict[str, type[Estimator]] = {
    "fc": FCEstimator,
    "inn": INNEstimator,
    "blochnet": BlochNetEstimator,
    "hybrid": HybridEstimator,
    "mle": MLEEstimator,
}
TRAINABLE = ("fc", "inn", "blochnet", "hybrid")


def create_estimator(model: str, *args: Any, **kwargs: Any) -> Estimator:
    if model not in MODEL_CLASSES:
        raise ValueError(f"unknown estimator {model!r}: use one of {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[model](*args, **kwargs)


__all__ = ["Estimator", "FitConfig", "FitResult", "MODEL_CLASSES", "TRAINABLE", "create_estimator", "load_estimator"]
