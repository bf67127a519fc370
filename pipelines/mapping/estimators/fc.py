"""DRONE-style fully connected estimator (Cohen, Zhu & Rosen, MRM 2018).

Two hidden layers of 300 units with tanh activations and a sigmoid output (parameters normalised to [0, 1]),
trained with an MSE loss on (optionally noise-augmented) simulated fingerprints. Cohen et al. fed magnitude
fingerprints; here the input is whatever the encoder gives (complex or magnitude, frames or SVD coefficients).
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.mapping.estimators.base import Estimator


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, out_act: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


class FCEstimator(Estimator):
    model_name = "fc"

    def build(self) -> None:
        hidden = int(self.options.setdefault("hidden", 300))
        self.net = mlp([self.encoder.n_features, hidden, hidden, len(self.space.names)], nn.Tanh, nn.Sigmoid())

    def forward_unit(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
