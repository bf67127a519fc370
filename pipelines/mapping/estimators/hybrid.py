"""Hybrid estimator after Rensonnet, Adam & Macq (2021): sparse NNLS decomposition in a physics-based,
compartment-split dictionary, then one MLP branch per compartment joined by a final MLP.

1. Each fingerprint (unit norm, phase aligned, real and imaginary parts stacked) is projected on a coarse EPG
   dictionary split by compartment (water | fat for water/fat schedules; one compartment otherwise) with
   non-negative least squares (:mod:`pipelines.mapping.estimators.nnls`, batched on torch, CPU or CUDA).
2. The sparse weights of each compartment feed that compartment's MLP branch; the branch outputs are
   concatenated and a final MLP predicts the normalised parameters (FF included for water/fat).

The NNLS features are computed once per training sample (fixed noise draw) because the projection costs far
more than a network step. Approximation, stated: the dictionary atoms are phase-aligned one by one, while a
water/fat mixture is aligned as a whole, so a mixture is a non-negative combination of aligned atoms only up to
a phase difference; the decomposition is then an informative sparse code rather than an exact unmixing
(Rensonnet et al. worked with real diffusion signals, where the issue does not arise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.mapping.estimators.base import Estimator
from pipelines.mapping.estimators.data import ParameterSpace, simulate
from pipelines.mapping.estimators.fc import mlp
from pipelines.mapping.estimators.nnls import nnls


def coarse_grid(space: ParameterSpace) -> dict[str, torch.Tensor]:
    """Coarse parameter grids per compartment, in ``space`` order (fat rows: FF = 1; water rows: FF = 0)."""

    def geo(lo: float, hi: float, n: int) -> np.ndarray:
        return np.geomspace(lo, hi, n)

    r = {x.name: x for x in space.ranges}
    if space.kind == "single":
        t1, t2 = geo(r["t1_ms"].lo, r["t1_ms"].hi, 14), geo(r["t2_ms"].lo, r["t2_ms"].hi, 14)
        b1 = np.linspace(r["b1"].lo, r["b1"].hi, 4)
        g = np.stack(np.meshgrid(t1, t2, b1, indexing="ij"), -1).reshape(-1, 3)
        g = g[g[:, 1] < g[:, 0]]
        cols = {"t1_ms": g[:, 0], "t2_ms": g[:, 1], "b1": g[:, 2]}
        return {"water": _in_order(space, cols, len(g))}
    b1 = np.linspace(r["b1"].lo, r["b1"].hi, 3)
    df = np.linspace(r["df_hz"].lo, r["df_hz"].hi, 5)
    t1w = geo(r["t1_ms"].lo, r["t1_ms"].hi, 8)
    t2w = geo(r["t2_ms"].lo, r["t2_ms"].hi, 3) if "t2_ms" in r else np.array([35.0])
    gw = np.stack(np.meshgrid(t1w, t2w, b1, df, indexing="ij"), -1).reshape(-1, 4)
    t1f = np.linspace(r["t1_fat_ms"].lo, r["t1_fat_ms"].hi, 3)
    gf = np.stack(np.meshgrid(t1f, b1, df, indexing="ij"), -1).reshape(-1, 3)
    mid_f, mid_w = float(np.median(t1f)), 1000.0
    water = {
        "ff": np.zeros(len(gw)),
        "t1_ms": gw[:, 0],
        "t2_ms": gw[:, 1],
        "b1": gw[:, 2],
        "df_hz": gw[:, 3],
        "t1_fat_ms": np.full(len(gw), mid_f),
    }
    fat = {
        "ff": np.ones(len(gf)),
        "t1_fat_ms": gf[:, 0],
        "b1": gf[:, 1],
        "df_hz": gf[:, 2],
        "t1_ms": np.full(len(gf), mid_w),
        "t2_ms": np.full(len(gf), 35.0),
    }
    return {"water": _in_order(space, water, len(gw)), "fat": _in_order(space, fat, len(gf))}


def _in_order(space: ParameterSpace, cols: dict[str, np.ndarray], n: int) -> torch.Tensor:
    return torch.as_tensor(np.stack([cols.get(name, np.zeros(n)) for name in space.names], 1), dtype=torch.float32)


class HybridEstimator(Estimator):
    model_name = "hybrid"
    cache_features = True

    def build(self) -> None:
        atoms = self.options.pop("atoms", None)
        sizes = self.options.pop("atom_sizes", None)
        self.options.setdefault("nnls_iterations", 300)
        self.options.setdefault("branch_hidden", 128)
        if atoms is None:
            atoms, sizes = self._simulate_atoms()
        # Buffers, declared for the type checker (nn.Module.__getattr__ is typed Tensor | Module).
        self.atoms: torch.Tensor
        self.atom_sizes: torch.Tensor
        self.gram: torch.Tensor
        self.register_buffer("atoms", atoms)  # [F_raw, n_atoms]: unit-norm aligned atoms, real/imag stacked
        self.register_buffer("atom_sizes", torch.as_tensor(sizes, dtype=torch.long))
        g = atoms.T @ atoms
        self.register_buffer("gram", g)
        self.lipschitz = float(torch.linalg.eigvalsh(g.double()).max())
        h = int(self.options["branch_hidden"])
        self.branches = nn.ModuleList([mlp([int(n), 2 * h, h], nn.ReLU, nn.ReLU()) for n in sizes])
        self.head = mlp([h * len(sizes), h, len(self.space.names)], nn.ReLU, nn.Sigmoid())

    def _simulate_atoms(self) -> tuple[torch.Tensor, list[int]]:
        cols, sizes = [], []
        for p in coarse_grid(self.space).values():
            s = simulate(self.sequence, self.space, p, chunk=512)
            if not self.encoder.complex_data:
                s = s.abs()
            z, _ = self.encoder.normalise(self.encoder.project(s))
            cols.append(self.encoder.split(z).T)
            sizes.append(int(p.shape[0]))
        return torch.cat(cols, 1).contiguous(), sizes

    def prepare_fit(self, signals: torch.Tensor, params: torch.Tensor, device: torch.device) -> None:
        if self.encoder.basis is None:  # full-frame input: the reference direction was only now fixed
            atoms, _ = self._simulate_atoms()
            self.atoms.copy_(atoms.to(device))
            self.gram.copy_(self.atoms.T @ self.atoms)
            self.lipschitz = float(torch.linalg.eigvalsh(self.gram.double()).max())

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Estimator:
        # The atoms are part of the state dict: pass them in so construction does not re-simulate them.
        meta = {
            **meta,
            "options": {
                **meta.get("options", {}),
                "atoms": tensors["atoms"],
                "atom_sizes": tensors["atom_sizes"].tolist(),
            },
        }
        return super().from_meta(meta, tensors)

    def sparse_code(self, z: torch.Tensor) -> torch.Tensor:
        """NNLS weights [N, n_atoms] of unit-norm aligned vectors."""
        y = self.encoder.split(z)
        return nnls(
            self.atoms, y, iterations=int(self.options["nnls_iterations"]), gram=self.gram, lipschitz=self.lipschitz
        )

    def input_features(self, z: torch.Tensor) -> torch.Tensor:
        return self.sparse_code(z)

    def forward_unit(self, features: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for n, branch in zip(self.atom_sizes.tolist(), self.branches, strict=True):
            outs.append(branch(features[:, start : start + n]))
            start += n
        return self.head(torch.cat(outs, 1))
