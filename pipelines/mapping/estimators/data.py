"""Training sets for the learned estimators: random parameters off the dictionary grid, simulated with EPG.

A :class:`ParameterSpace` names what an estimator predicts, the bounds it was trained within and how each
parameter is normalised (log for relaxation times, which span decades). Parameters are drawn uniformly (in the
normalised space), so no value of the dictionary grid is favoured and held-out test parameters are, with
probability one, off the grid.

Noise follows the convention of the simulator and the matching tests: complex Gaussian noise with
E|n|^2 = sigma^2 and sigma = mean |s| / SNR per fingerprint (magnitude data: the magnitude of that, Rician).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.physics.epg import epg_chunked, epg_fisp, epg_water_fat
from pipelines.physics.sequences import MRFSequence

log = logging.getLogger(__name__)

# Fat T2 is not estimated (poorly encoded, varies little): fixed at the literature value, as in t1ff_spec.
FAT_T2_MS = {1.5: 58.0, 3.0: 68.0}


@dataclass(frozen=True)
class ParamRange:
    name: str
    lo: float
    hi: float
    log: bool = False  # normalise log(value): relaxation times

    def to_dict(self) -> dict:
        return {"name": self.name, "lo": self.lo, "hi": self.hi, "log": self.log}


@dataclass(frozen=True)
class ParameterSpace:
    """What is estimated, within which bounds; ``kind`` selects the signal model (single | water_fat)."""

    kind: str
    ranges: tuple[ParamRange, ...]
    field_strength_T: float = 3.0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ranges)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "field_strength_T": self.field_strength_T,
            "ranges": [r.to_dict() for r in self.ranges],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ParameterSpace:
        return cls(d["kind"], tuple(ParamRange(**r) for r in d["ranges"]), float(d.get("field_strength_T", 3.0)))

    # ---- fixed normalisation: every parameter to [0, 1] -----------------------------------------------------
    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = torch.tensor([np.log(r.lo) if r.log else r.lo for r in self.ranges], dtype=like.dtype, device=like.device)
        hi = torch.tensor([np.log(r.hi) if r.log else r.hi for r in self.ranges], dtype=like.dtype, device=like.device)
        is_log = torch.tensor([r.log for r in self.ranges], device=like.device)
        return lo, hi, is_log

    def to_unit(self, p: torch.Tensor) -> torch.Tensor:
        """[N, P] physical -> [N, P] in [0, 1] (log-scaled where ``log``)."""
        lo, hi, is_log = self._bounds(p)
        v = torch.where(is_log, torch.log(p.clamp_min(1e-12)), p)
        return (v - lo) / (hi - lo)

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi, is_log = self._bounds(u)
        v = lo + u * (hi - lo)
        # exp only where log-scaled: exp(450 ms) overflows, and 0 * inf in where's gradient would be NaN.
        return torch.where(is_log, torch.exp(torch.where(is_log, v, torch.zeros_like(v))), v)

    def as_dict(self, p: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        p = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        return {n: p[:, i].astype(np.float32) for i, n in enumerate(self.names)}

    def stack(self, params: dict[str, np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Parameters as [N, P] float32 in this space's order (a dict must name every parameter)."""
        if isinstance(params, dict):
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ValueError(f"parameters lack {', '.join(missing)} (this estimator predicts {self.names})")
            return torch.stack(
                [torch.as_tensor(np.asarray(params[n]), dtype=torch.float32).reshape(-1) for n in self.names], 1
            )
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params, dtype=torch.float32)
        if p.ndim != 2 or p.shape[1] != len(self.names):
            raise ValueError(
                f"parameters must be [N, {len(self.names)}] ({', '.join(self.names)}), got {tuple(p.shape)}"
            )
        return p

    def sample(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """Uniform in the normalised space; T2 <= T1 is enforced by redrawing (unphysical otherwise)."""
        out = np.empty((0, len(self.ranges)), dtype=np.float32)
        while out.shape[0] < n:
            u = torch.as_tensor(rng.random((2 * (n - out.shape[0]) + 8, len(self.ranges))), dtype=torch.float32)
            p = self.from_unit(u).numpy()
            if "t1_ms" in self.names and "t2_ms" in self.names:
                p = p[p[:, self.names.index("t2_ms")] < p[:, self.names.index("t1_ms")]]
            out = np.concatenate([out, p])
        return torch.as_tensor(out[:n])


def fisp_space(field_strength_T: float = 3.0) -> ParameterSpace:
    """T1, T2, B1 over the ranges of the FISP dictionary (fisp_spec)."""
    return ParameterSpace(
        "single",
        (ParamRange("t1_ms", 100.0, 5000.0, True), ParamRange("t2_ms", 10.0, 2500.0, True), ParamRange("b1", 0.7, 1.3)),
        field_strength_T,
    )


def t1ff_space(field_strength_T: float = 3.0) -> ParameterSpace:
    """FF, T1 water, T1 fat, field offset, B1 (+ water T2, a nuisance) over the ranges of t1ff_spec."""
    return ParameterSpace(
        "water_fat",
        (
            ParamRange("ff", 0.0, 1.0),
            ParamRange("t1_ms", 300.0, 3000.0, True),
            ParamRange("t1_fat_ms", 250.0, 450.0),
            ParamRange("df_hz", -40.0, 40.0),
            ParamRange("b1", 0.75, 1.25),
            ParamRange("t2_ms", 20.0, 80.0, True),
        ),
        field_strength_T,
    )


def default_space(seq: MRFSequence, kind: str | None = None, field_strength_T: float = 3.0) -> ParameterSpace:
    """Water/fat for Dixon-like schedules (TE varies), else single compartment (same rule as maps.resolve_model)."""
    if kind is None or kind == "auto":
        kind = "water_fat" if np.ptp(seq.te_ms) > 0.1 else "single"
    if kind == "water_fat":
        return t1ff_space(field_strength_T)
    if kind == "single":
        return fisp_space(field_strength_T)
    raise ValueError(f"unknown signal model {kind!r}: use single or water_fat")


def fat_t2_ms(field_strength_T: float) -> float:
    return FAT_T2_MS[1.5] if field_strength_T < 2.25 else FAT_T2_MS[3.0]


def simulate(
    seq: MRFSequence, space: ParameterSpace, params: torch.Tensor, *, chunk: int = 2048, progress: bool = False
) -> torch.Tensor:
    """Fingerprints [N, frames] complex64 (unit proton density) of parameters [N, P] (no gradient, chunked)."""
    with torch.no_grad():
        return simulate_differentiable(seq, space, params, chunk=chunk, progress=progress)


def simulate_differentiable(
    seq: MRFSequence,
    space: ParameterSpace,
    params: torch.Tensor,
    *,
    chunk: int | None = None,
    progress: bool = False,
    n_states: int | None = None,
) -> torch.Tensor:
    """The same signal model, differentiable in ``params`` (the BlochNet decoder and the MLE fit use this)."""
    names = space.names
    col = {n: params[:, i] for i, n in enumerate(names)}
    fn: Callable[..., torch.Tensor]  # the signal model, called with the tensors of ``args``
    args: tuple[torch.Tensor, ...]
    if space.kind == "single":
        b1 = col.get("b1")
        fn = functools.partial(epg_fisp, seq, n_states=n_states)
        args = (col["t1_ms"], col["t2_ms"], b1 if b1 is not None else torch.ones_like(col["t1_ms"]))
    elif space.kind == "water_fat":
        t2f = torch.full_like(col["ff"], fat_t2_ms(space.field_strength_T))
        fn = functools.partial(epg_water_fat, seq, field_strength_T=space.field_strength_T, n_states=n_states)
        args = (
            col["ff"],
            col["t1_ms"],
            col.get("t2_ms", torch.full_like(col["ff"], 35.0)),
            col["t1_fat_ms"],
            t2f,
            col.get("b1", torch.ones_like(col["ff"])),
            col.get("df_hz", torch.zeros_like(col["ff"])),
        )
    else:
        raise ValueError(f"unknown signal model {space.kind!r}")
    if chunk is None or params.shape[0] <= chunk:
        return fn(*args).to(torch.complex64)
    if "t2_ms" in col:  # sorted by T2: each chunk keeps only the dephasing orders its T2 needs
        order = torch.argsort(col["t2_ms"].detach(), stable=True)
        out = epg_chunked(fn, *(a[order] for a in args), chunk=chunk, progress=progress, desc="EPG")
        res = torch.empty_like(out)
        res[order] = out
        return res.to(torch.complex64)
    return epg_chunked(fn, *args, chunk=chunk, progress=progress, desc="EPG").to(torch.complex64)


def add_noise(
    x: torch.Tensor, snr: torch.Tensor | float, generator: torch.Generator | None = None, n_frames: int | None = None
) -> torch.Tensor:
    """Complex Gaussian noise, sigma = mean |x| / SNR per row (rows with SNR = inf stay clean).

    ``n_frames``: when ``x`` holds subspace coefficients of fingerprints of that many frames, sigma is taken
    from the frame-domain mean magnitude ||x|| / sqrt(frames) (an orthonormal basis keeps the noise white with
    the same sigma per coefficient; mean |s| is replaced by its RMS, within a few percent for fingerprints).
    """
    snr_t = torch.as_tensor(snr, dtype=torch.float32, device=x.device)
    if snr_t.ndim == 0:
        snr_t = snr_t.expand(x.shape[0])
    if n_frames is None:
        level = x.abs().mean(1)
    else:
        level = torch.linalg.vector_norm(x, dim=1) / np.sqrt(n_frames)
    sigma = torch.where(torch.isfinite(snr_t), level / snr_t, torch.zeros_like(level))[:, None]
    if x.is_complex():
        n = torch.complex(
            torch.randn(x.shape, generator=generator, device=x.device),
            torch.randn(x.shape, generator=generator, device=x.device),
        ) / np.sqrt(2)
    else:
        n = torch.randn(x.shape, generator=generator, device=x.device)
    return x + sigma.to(x.real.dtype if x.is_complex() else x.dtype) * n


@dataclass
class TrainingSet:
    """Parameters [N, P] (physical units) and their clean fingerprints or subspace coefficients [N, M]."""

    params: torch.Tensor
    signals: torch.Tensor  # complex64
    space: ParameterSpace
    sequence: MRFSequence
    basis: torch.Tensor | None = None  # [frames, R]: signals are coefficients in this basis when given
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def subset(self, idx: np.ndarray | slice) -> TrainingSet:
        return TrainingSet(self.params[idx], self.signals[idx], self.space, self.sequence, self.basis, self.info)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECON_NODE_ESTIMATOR_CACHE", "/tmp/estimators"))


def make_training_set(
    seq: MRFSequence,
    space: ParameterSpace,
    n: int,
    seed: int,
    *,
    basis: torch.Tensor | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> TrainingSet:
    """``n`` random parameter vectors and their EPG fingerprints (projected on ``basis`` when given), cached.

    Stored as subspace coefficients when a basis is given: 60k FISP fingerprints are 15 MB instead of 480 MB.
    """
    key_src = json.dumps(
        {
            "seq": seq.fingerprint_key(),
            "space": space.to_dict(),
            "n": n,
            "seed": seed,
            "basis": None if basis is None else hashlib.sha256(basis.detach().cpu().numpy().tobytes()).hexdigest()[:16],
            "v": 1,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"trainset-{key}.pt"
    if use_cache and path.exists():
        try:
            d = torch.load(path, weights_only=True)
            return TrainingSet(d["params"], d["signals"], space, seq, basis, {"cache": str(path)})
        except (OSError, RuntimeError, KeyError) as e:
            log.warning("ignoring damaged training-set cache %s (%s)", path, e)
    rng = np.random.default_rng(seed)
    params = space.sample(n, rng)
    chunk = 2048 if space.kind == "single" else 512
    sig = simulate(seq, space, params, chunk=chunk, progress=progress)
    if basis is not None:
        sig = sig @ basis.to(sig.dtype)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"params": params, "signals": sig}, tmp)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not cache the training set at %s: %s", path, e)
    return TrainingSet(params, sig, space, seq, basis, {"cache": str(path)})
