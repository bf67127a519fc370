"""Intravoxel incoherent motion (IVIM) signal model, the second forward model of the project.

Bi-exponential diffusion decay (Le Bihan et al., Radiology 1988), in the parameterisation used by
Epstein et al. (2022) for their training-label experiments:

    S(b) = S0 * (f * exp(-b * D*) + (1 - f) * exp(-b * D))

b in s/mm^2, D and D* in mm^2/s, f the perfusion fraction in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The b-values of Epstein et al. (a typical clinical abdominal IVIM protocol), s/mm^2.
EPSTEIN_B_VALUES = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 80.0, 100.0, 200.0, 400.0, 600.0, 800.0)


@dataclass(frozen=True)
class IVIMParameters:
    s0: torch.Tensor  # [B]
    f: torch.Tensor  # [B]
    d: torch.Tensor  # [B] mm^2/s
    d_star: torch.Tensor  # [B] mm^2/s


def ivim_signal(
    b_values: torch.Tensor | np.ndarray | list[float],
    s0: torch.Tensor,
    f: torch.Tensor,
    d: torch.Tensor,
    d_star: torch.Tensor,
) -> torch.Tensor:
    """IVIM signal [B, n_b] for parameter vectors [B]; differentiable in every parameter."""
    d = torch.as_tensor(d)
    b = torch.as_tensor(b_values, dtype=d.dtype, device=d.device)[None, :]
    s0, f, d_star = (torch.as_tensor(x, dtype=d.dtype, device=d.device)[:, None] for x in (s0, f, d_star))
    d = d[:, None]
    return s0 * (f * torch.exp(-b * d_star) + (1 - f) * torch.exp(-b * d))
