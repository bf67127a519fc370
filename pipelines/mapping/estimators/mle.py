"""Bounded maximum-likelihood fitting, batched on torch (CPU or CUDA): training labels and a slow reference estimator.

Noise models (Epstein et al. 2022):
* ``gaussian`` – complex (or real) Gaussian noise: minimise sum |y - f(theta)|^2;
* ``rician``   – magnitude data: minimise the Rician negative log-likelihood
  -sum [log(m / s^2) - (m^2 + A^2) / (2 s^2) + log I0(m A / s^2)], A = |f(theta)|, s the noise SD per channel.

Bounds are enforced by the parameterisation theta = lo + (hi - lo) sigmoid(z); every sample is an independent
problem (Adam is element-wise, the loss a sum over samples), so a batch of 100k IVIM fits is one tensor program.
The best iterate per sample is kept. ``profile_scale``: an unknown scale (proton density, complex for complex
data: coil phase) multiplies the model and is solved in closed form at every step (variable projection), as
MRF needs. Estimates within ``bound_tol`` of a bound are flagged (Epstein et al. drop them from training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.mapping.estimators.base import Estimator
from pipelines.mapping.estimators.data import ParameterSpace, simulate, simulate_differentiable
from pipelines.physics.sequences import MRFSequence

NOISE_MODELS = ("gaussian", "rician")


@dataclass
class MLEResult:
    params: torch.Tensor  # [N, P]
    nll: torch.Tensor  # [N]
    on_bound: torch.Tensor  # [N] bool


def rician_nll(m: torch.Tensor, a: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rician negative log-likelihood per sample (summed over measurements); m, a >= 0, sigma [N] or scalar."""
    s2 = (sigma**2).reshape(-1, 1) if torch.is_tensor(sigma) and sigma.ndim else sigma**2
    x = m * a / s2
    log_i0 = torch.log(torch.special.i0e(x)) + x  # stable log I0
    return -(torch.log(m.clamp_min(1e-30) / s2) - (m**2 + a**2) / (2 * s2) + log_i0).sum(1)


def fit_mle(
    model: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    init: torch.Tensor,
    *,
    noise: str = "gaussian",
    sigma: torch.Tensor | float | None = None,
    profile_scale: bool = False,
    steps: int = 300,
    lr: float = 0.05,
    bound_tol: float = 1e-3,
    chunk: int | None = None,
) -> MLEResult:
    """Maximum-likelihood parameters [N, P] of ``model`` (theta [n, P] -> signal [n, M]) for data ``y`` [N, M]."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise model must be one of {', '.join(NOISE_MODELS)}, not {noise!r}")
    if noise == "rician" and sigma is None:
        raise ValueError("the Rician likelihood needs the noise standard deviation sigma")
    if init.shape[0] != y.shape[0]:
        raise ValueError(f"{init.shape[0]} initial values for {y.shape[0]} samples")
    if chunk is not None and y.shape[0] > chunk:
        parts = [
            fit_mle(
                model,
                y[i : i + chunk],
                lo,
                hi,
                init[i : i + chunk],
                noise=noise,
                sigma=sigma[i : i + chunk] if torch.is_tensor(sigma) and sigma.ndim else sigma,
                profile_scale=profile_scale,
                steps=steps,
                lr=lr,
                bound_tol=bound_tol,
            )
            for i in range(0, y.shape[0], chunk)
        ]
        return MLEResult(
            torch.cat([p.params for p in parts]),
            torch.cat([p.nll for p in parts]),
            torch.cat([p.on_bound for p in parts]),
        )
    dev = y.device
    lo, hi = lo.to(dev, torch.float32), hi.to(dev, torch.float32)
    u0 = ((init.to(dev, torch.float32) - lo) / (hi - lo)).clamp(1e-4, 1 - 1e-4)
    z = torch.logit(u0).clone().requires_grad_(True)
    sig = None if sigma is None else torch.as_tensor(sigma, dtype=torch.float32, device=dev)
    if noise == "rician":
        y = y.abs() if y.is_complex() else y

    def objective(theta: torch.Tensor) -> torch.Tensor:
        f = model(theta)
        if noise == "rician":
            a = f.abs() if f.is_complex() else f.clamp_min(0)
            if profile_scale:  # least-squares scale of the magnitudes (the Rician optimum is close above the floor)
                c = (a * y).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True).clamp_min(1e-30)
                a = a * c.clamp_min(0)
            assert sig is not None  # fit_mle refused rician noise without sigma
            return rician_nll(y, a, sig)
        if profile_scale:
            ip = (f.conj() * y).sum(1) if f.is_complex() or y.is_complex() else (f * y).sum(1)
            return (y.abs() ** 2).sum(1) - ip.abs() ** 2 / (f.abs() ** 2).sum(1).clamp_min(1e-30)
        return ((y - f).abs() ** 2).sum(1)

    opt = torch.optim.Adam([z], lr=lr)
    best_val = torch.full((y.shape[0],), float("inf"), device=dev)
    best_z = z.detach().clone()
    for it in range(steps + 1):
        for g in opt.param_groups:  # cosine decay to 2 % of lr: coarse moves first, then a fine polish
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * it / max(steps, 1))))
        theta = lo + (hi - lo) * torch.sigmoid(z)
        val = objective(theta)
        with torch.no_grad():
            better = val < best_val
            best_val = torch.where(better, val.detach(), best_val)
            best_z[better] = z.detach()[better]
        if it == steps:
            break
        opt.zero_grad(set_to_none=True)
        val.sum().backward()
        opt.step()
    with torch.no_grad():
        u = torch.sigmoid(best_z)
        theta = lo + (hi - lo) * u
        on_bound = ((u < bound_tol) | (u > 1 - bound_tol)).any(1)
    return MLEResult(theta, best_val, on_bound)


def mle_for_space(
    seq: MRFSequence,
    space: ParameterSpace,
    y: torch.Tensor,
    init: torch.Tensor,
    *,
    basis: torch.Tensor | None = None,
    noise: str = "gaussian",
    sigma: Any = None,
    steps: int = 100,
    lr: float = 0.05,
    chunk: int = 256,
) -> MLEResult:
    """MRF maximum likelihood: EPG model of ``space`` for ``seq``, unknown (complex) scale profiled out.

    The fit runs in the normalised parameter space (log for relaxation times). ``y``: frames, or coefficients in
    ``basis`` (Gaussian only: a projection keeps white Gaussian noise white).
    """
    if noise == "rician" and basis is not None:
        raise ValueError("the Rician likelihood needs magnitude frames, not subspace coefficients")
    b = None if basis is None else basis.to(y.device, torch.complex64)
    lo, hi = torch.zeros(len(space.names)), torch.ones(len(space.names))

    def model(u: torch.Tensor) -> torch.Tensor:
        s = simulate_differentiable(seq, space, space.from_unit(u))
        return s @ b if b is not None else s

    res = fit_mle(
        model,
        y,
        lo,
        hi,
        space.to_unit(init).clamp(0, 1),
        noise=noise,
        sigma=sigma,
        profile_scale=True,
        steps=steps,
        lr=lr,
        chunk=chunk,
    )
    return MLEResult(space.from_unit(res.params), res.nll, res.on_bound)


class MLEEstimator(Estimator):
    """The slow reference: coarse grid search (best normalised inner product), then the bounded ML fit per voxel.

    Complex data: Gaussian likelihood with a complex scale profiled out. Magnitude data: Rician likelihood when
    ``sigma`` is given, else Gaussian on magnitudes. Nothing is trained; ``fit`` is not available.
    """

    model_name = "mle"

    def build(self) -> None:
        from pipelines.mapping.estimators.hybrid import coarse_grid

        self.options.setdefault("steps", 100)
        self.options.setdefault("lr", 0.05)
        self.options.setdefault("chunk", 256)
        grid = torch.cat(list(coarse_grid(self.space).values()))
        if self.space.kind == "water_fat":  # mixtures too: a pure-compartment grid cannot start a fatty voxel
            mixes = []
            for ff in (0.25, 0.5, 0.75):
                g = grid[grid[:, self.space.names.index("ff")] == 0].clone()
                g[:, self.space.names.index("ff")] = ff
                mixes.append(g)
            grid = torch.cat([grid] + mixes)
        self.grid: torch.Tensor  # a buffer: declared for the type checker
        self.register_buffer("grid", grid)
        self._grid_atoms: torch.Tensor | None = None

    def fit(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        raise ValueError("the MLE estimator has nothing to train: use predict()")

    def _atoms(self) -> torch.Tensor:
        if self._grid_atoms is None:
            s = simulate(self.sequence, self.space, self.grid, chunk=512)
            s = s if self.encoder.complex_data else s.abs()
            self._grid_atoms = s / torch.linalg.vector_norm(s, dim=1, keepdim=True).clamp_min(1e-30)
        return self._grid_atoms

    def predict_unit(self, fingerprints: torch.Tensor | np.ndarray, batch_size: int = 4096) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(fingerprints) if not isinstance(fingerprints, torch.Tensor) else fingerprints)
        if x.shape[1] != self.sequence.n_frames:
            raise ValueError(
                f"the MLE fit needs full fingerprints of {self.sequence.n_frames} frames, got {x.shape[1]}"
            )
        x = x.to(torch.complex64) if self.encoder.complex_data else (x.abs() if x.is_complex() else x).float()
        atoms = self._atoms().to(x.device)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xi = x[i : i + batch_size]
            ip = (xi @ atoms.conj().T).abs() if xi.is_complex() else xi @ atoms.T
            init = self.grid[ip.argmax(1)]
            sigma = self.options.get("sigma")
            noise = "rician" if (not self.encoder.complex_data and sigma) else "gaussian"
            res = mle_for_space(
                self.sequence,
                self.space,
                xi,
                init,
                noise=noise,
                sigma=sigma,
                steps=int(self.options["steps"]),
                lr=float(self.options["lr"]),
                chunk=int(self.options["chunk"]),
            )
            out.append(self.space.to_unit(res.params))
        return torch.cat(out).clamp(0, 1)

    def forward_unit(self, features: torch.Tensor) -> torch.Tensor:
        raise ValueError("the MLE estimator works on fingerprints, not features: use predict()")
