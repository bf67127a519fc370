"""Invertible neural network estimator (Balsiger, Jungo et al., MLMIR 2020), RealNVP coupling blocks.

The network is a bijection of R^D, D the fingerprint feature dimension (real and imaginary parts
concatenated). The forward direction maps parameters (normalised to [0, 1] and zero-padded to D) to the
fingerprint; the inverse maps a fingerprint to the parameters (its first P outputs). Each block splits u into
halves and applies two complementary affine couplings,

    v1 = u1 * exp(s2(u2)) + t2(u2),    v2 = u2 * exp(s1(v1)) + t1(v1),

with subnets Linear(D/2, 128)-ReLU-Linear(128, D/2) and soft-clamped scales s = (2 c / pi) atan(s_raw / c)
(c = 2, as in FrEIA), so exp(s) stays in (e^-2, e^2) and the inverse stays well conditioned. Fixed random
permutations sit between blocks. Loss: MSE(forward(params), fingerprint) + MSE(inverse(noisy fingerprint),
params). Because the forward pass re-simulates the fingerprint from the estimate, it gives a per-voxel
consistency map without any Bloch simulation at inference (:meth:`INNEstimator.consistency`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pipelines.mapping.estimators.base import Estimator, _fit_residual
from pipelines.mapping.estimators.labels import TrainingLabels, label_loss

SCALE_CLAMP = 2.0


class _Coupling(nn.Module):
    """One RealNVP block: two affine couplings, each half conditioned on the other."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.d1 = dim // 2
        self.d2 = dim - self.d1
        # One subnet per coupling predicts both s and t (as FrEIA's GLOWCouplingBlock does).
        self.net2 = nn.Sequential(nn.Linear(self.d2, hidden), nn.ReLU(), nn.Linear(hidden, 2 * self.d1))
        self.net1 = nn.Sequential(nn.Linear(self.d1, hidden), nn.ReLU(), nn.Linear(hidden, 2 * self.d2))
        for net in (self.net1, self.net2):  # start near the identity: stable early training
            last = net[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @staticmethod
    def _st(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_raw, t = out.chunk(2, dim=1)
        return (2 * SCALE_CLAMP / math.pi) * torch.atan(s_raw / SCALE_CLAMP), t

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u1, u2 = u[:, : self.d1], u[:, self.d1 :]
        s2, t2 = self._st(self.net2(u2))
        v1 = u1 * torch.exp(s2) + t2
        s1, t1 = self._st(self.net1(v1))
        v2 = u2 * torch.exp(s1) + t1
        return torch.cat([v1, v2], 1)

    def inverse(self, v: torch.Tensor) -> torch.Tensor:
        v1, v2 = v[:, : self.d1], v[:, self.d1 :]
        s1, t1 = self._st(self.net1(v1))
        u2 = (v2 - t1) * torch.exp(-s1)
        s2, t2 = self._st(self.net2(u2))
        u1 = (v1 - t2) * torch.exp(-s2)
        return torch.cat([u1, u2], 1)


class INN(nn.Module):
    """Coupling blocks with fixed random permutations between them."""

    def __init__(self, dim: int, blocks: int = 2, hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Coupling(dim, hidden) for _ in range(blocks)])
        g = torch.Generator().manual_seed(seed)
        perms = torch.stack([torch.randperm(dim, generator=g) for _ in range(blocks)])
        self.perms: torch.Tensor  # a buffer: declared for the type checker
        self.register_buffer("perms", perms)  # stored with the weights: the permutation is part of the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk, p in zip(self.blocks, self.perms, strict=True):
            x = blk(x)[:, p]
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for blk, p in zip(reversed(self.blocks), reversed(list(self.perms)), strict=True):
            inv = torch.empty_like(p)
            inv[p] = torch.arange(p.numel(), device=p.device)
            assert isinstance(blk, _Coupling)
            y = blk.inverse(y[:, inv])
        return y


class INNEstimator(Estimator):
    model_name = "inn"

    def build(self) -> None:
        dim = self.encoder.n_features
        n_p = len(self.space.names)
        if dim < n_p:
            raise ValueError(f"the INN needs at least as many fingerprint features ({dim}) as parameters ({n_p})")
        self.options.setdefault("blocks", 2)
        self.options.setdefault("hidden", 128)
        self.options.setdefault("perm_seed", 0)
        self.options.setdefault("forward_weight", 1.0)
        self.inn = INN(dim, int(self.options["blocks"]), int(self.options["hidden"]), int(self.options["perm_seed"]))

    def pad(self, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u, u.new_zeros(u.shape[0], self.encoder.n_features - u.shape[1])], 1)

    def forward_unit(self, features: torch.Tensor) -> torch.Tensor:
        return self.inn.inverse(features)[:, : len(self.space.names)]

    def simulate_features(self, u: torch.Tensor) -> torch.Tensor:
        """The learned forward process: normalised parameters [N, P] -> standardised fingerprint features."""
        return self.inn(self.pad(u))

    def batch_loss(
        self, batch: dict[str, torch.Tensor], labels: TrainingLabels
    ) -> tuple[torch.Tensor, dict[str, float]]:
        n_p = len(self.space.names)
        back = self.inn.inverse(batch["features"])
        l_bwd = label_loss(
            back[:, :n_p], batch["gt_u"], batch.get("mle_u"), labels.alpha, labels.weights, batch.get("mle_valid")
        )
        # The forward process maps the generative parameters to the fingerprint; the noisy one is the target, as
        # in Balsiger et al. (noise on y for both directions).
        fwd = self.inn(self.pad(batch["gt_u"]))
        l_fwd = ((fwd - batch["features"]) ** 2).mean()
        loss = l_bwd + float(self.options["forward_weight"]) * l_fwd
        return loss, {"backward": float(l_bwd.detach()), "forward": float(l_fwd.detach())}

    @torch.no_grad()
    def consistency(
        self, fingerprints: torch.Tensor | np.ndarray, params: dict[str, np.ndarray], chunk: int = 16384
    ) -> tuple[np.ndarray, np.ndarray]:
        """Residual against the INN's own forward re-simulation of the estimate (no Bloch simulation).

        The second value is the norm of the input (proton density needs the physical signal scale, which the
        normalised forward process does not model: the mapping code takes PD from an EPG re-simulation).
        """
        self.eval()
        x = torch.as_tensor(np.asarray(fingerprints) if not isinstance(fingerprints, torch.Tensor) else fingerprints)
        u = self.space.to_unit(self.space.stack(params))
        res, nrm = [], []
        for i in range(0, x.shape[0], chunk):
            z, norm = self.encoder.normalise(self.encoder.project(x[i : i + chunk].to(self.device)))
            zhat = self.encoder.unfeatures(self.simulate_features(u[i : i + chunk].to(self.device)))
            r, _ = _fit_residual(z, zhat)
            res.append(r)
            nrm.append(norm)
        return torch.cat(res).cpu().numpy(), torch.cat(nrm).cpu().numpy()
