"""The one interface of the learned fingerprint-to-parameter estimators: fit / predict / save / load.

Every estimator sees a fingerprint through the same fixed encoding (:class:`FingerprintEncoder`):

1. full frames [N, T] are projected on the dictionary's SVD basis (input ``svd``) or kept (input ``full``);
2. the vector is scaled to unit norm (proton density is a scale factor, not a feature: BlochNet Sec. 4.1.1);
3. complex data: the global phase is removed by rotating the vector so that its component along a fixed
   reference direction (the first singular vector) is real and positive; receive-coil phase is arbitrary;
4. real and imaginary parts are concatenated (Balsiger et al.; magnitude data have one part) and standardised
   with per-feature mean / std measured once on the training set.

Parameters are regressed in a fixed normalised space (:class:`ParameterSpace`: [0, 1], log for relaxation
times). Encoder statistics, basis, parameter bounds, the sequence and the architecture are stored with the
weights, so one safetensors file rebuilds the estimator.
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipelines.compute import select_device
from pipelines.mapping.estimators.data import ParameterSpace, add_noise, simulate
from pipelines.mapping.estimators.labels import TrainingLabels, label_loss
from pipelines.physics.sequences import MRFSequence
from pipelines.weights_io import load_weights, save_weights

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class FingerprintEncoder(nn.Module):
    """Fingerprints (frames or subspace coefficients) -> unit-norm, phase-aligned vectors -> standardised features."""

    def __init__(self, n_frames: int, complex_data: bool, basis: torch.Tensor | None) -> None:
        super().__init__()
        self.n_frames = int(n_frames)
        self.complex_data = bool(complex_data)
        # Buffers, declared so the type checker knows them (nn.Module.__getattr__ is typed Tensor | Module).
        self.basis: torch.Tensor | None
        self.ref: torch.Tensor
        self.mean: torch.Tensor
        self.std: torch.Tensor
        if basis is not None:
            if basis.shape[0] != n_frames:
                raise ValueError(f"basis has {basis.shape[0]} frames, the sequence {n_frames}")
            if not complex_data:
                basis = basis.real if basis.is_complex() else basis
            basis = basis.to(torch.complex64 if complex_data else torch.float32)
            self.register_buffer("basis", basis)
        else:
            self.basis = None
        m = self.in_dim
        ref = torch.zeros(m, dtype=torch.complex64 if complex_data else torch.float32)
        ref[0] = 1
        self.register_buffer("ref", ref)  # first singular vector (svd input: the first coefficient)
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("std", torch.ones(self.n_features))

    @property
    def in_dim(self) -> int:
        return int(self.basis.shape[1]) if self.basis is not None else self.n_frames

    @property
    def n_features(self) -> int:
        return self.in_dim * (2 if self.complex_data else 1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[N, frames] or [N, rank] (already projected) -> [N, in_dim], complex64 or float32."""
        if x.ndim != 2:
            raise ValueError(f"fingerprints must be [N, frames], got shape {tuple(x.shape)}")
        if self.complex_data:
            if not x.is_complex():
                raise ValueError(
                    "this estimator was trained on complex fingerprints; the input is real "
                    "(magnitude data need magnitude-trained weights)"
                )
            x = x.to(torch.complex64)
        else:
            x = (x.abs() if x.is_complex() else x).float()
        if x.shape[1] == self.n_frames:
            return x @ self.basis if self.basis is not None else x
        if self.basis is not None and x.shape[1] == self.basis.shape[1]:
            return x
        raise ValueError(
            f"fingerprints have {x.shape[1]} samples; this estimator expects {self.n_frames} frames"
            + (f" or {self.basis.shape[1]} subspace coefficients" if self.basis is not None else "")
        )

    def normalise(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vectors -> (unit-norm phase-aligned vectors, norms). Differentiable."""
        norm = torch.linalg.vector_norm(c, dim=1)
        z = c / norm.clamp_min(1e-20)[:, None]
        if self.complex_data:
            p = z @ self.ref.conj()
            rot = torch.where(p.abs() > 1e-12, p.conj() / p.abs().clamp_min(1e-12), torch.ones_like(p))
            z = z * rot[:, None]
        return z, norm

    def split(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.real, z.imag], 1) if z.is_complex() else z

    def merge(self, f: torch.Tensor) -> torch.Tensor:
        if not self.complex_data:
            return f
        m = self.in_dim
        return torch.complex(f[:, :m], f[:, m:])

    def features(self, z: torch.Tensor) -> torch.Tensor:
        return (self.split(z) - self.mean) / self.std

    def unfeatures(self, f: torch.Tensor) -> torch.Tensor:
        return self.merge(f * self.std + self.mean)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, unit vectors, norms)."""
        z, norm = self.normalise(self.project(x))
        return self.features(z), z, norm

    def set_reference(self, c: torch.Tensor) -> None:
        """Reference direction: the leading right singular vector of training vectors (full-frame input)."""
        if self.basis is not None:
            return
        _, _, vh = torch.linalg.svd(c[: min(4096, c.shape[0])], full_matrices=False)
        ref = vh[0].conj()
        if self.complex_data:
            self.ref.copy_(ref.to(torch.complex64))
        else:
            self.ref.copy_(ref.float() * torch.sign(ref.float().sum()))

    def set_stats(self, z: torch.Tensor) -> None:
        f = self.split(z)
        self.mean.copy_(f.mean(0))
        # A floor on std: features that barely vary in training (the aligned first coefficient, the imaginary
        # parts of noise-free FISP data) must not be blown up, or a deviation of 1e-4 in real data (EPG state
        # truncation, field offset) reads as several standard deviations.
        self.std.copy_(f.std(0).clamp_min(1e-2 * float(f.std(0).max())))


@dataclass
class FitConfig:
    """How :meth:`Estimator.fit` trains."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    # Noise augmentation: SNR drawn log-uniformly from this range per sample (None: train on the given
    # fingerprints as they are, e.g. the fixed noisy samples MLE labels were fitted to); clean_fraction of
    # each batch stays noise-free.
    snr: tuple[float, float] | None = (20.0, 500.0)
    clean_fraction: float = 0.1
    fixed_noise: bool = False  # one noise draw per sample for the whole run (the hybrid's NNLS is costly)
    val_fraction: float = 0.05
    val_every: int = 250
    device: str = "cpu"
    progress: bool = False
    out_dir: str | None = None  # checkpoint.pt and history.json here
    checkpoint_every: int = 500
    resume: bool = False


@dataclass
class FitResult:
    steps: int
    seconds: float
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


class Estimator(nn.Module, ABC):
    """Base class: an encoder, a network predicting normalised parameters, and the sequence it was trained for."""

    model_name: ClassVar[str] = "base"
    cache_features: ClassVar[bool] = False  # features are costly (hybrid NNLS): computed once per sample

    def __init__(
        self,
        sequence: MRFSequence,
        space: ParameterSpace,
        *,
        input: str = "svd",  # noqa: A002
        complex_data: bool = True,
        basis: torch.Tensor | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if input not in ("svd", "full"):
            raise ValueError(f"input must be 'svd' or 'full', not {input!r}")
        if input == "svd" and basis is None:
            raise ValueError("input 'svd' needs the dictionary's SVD basis (or use input='full')")
        self.sequence = sequence
        self.space = space
        self.input = input
        self.options = dict(options)
        self.encoder = FingerprintEncoder(sequence.n_frames, complex_data, basis if input == "svd" else None)
        self.train_info: dict[str, Any] = {}
        self.build()

    # ---- what each model defines ------------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> None:
        """Create the model's layers (called at the end of ``__init__``)."""

    @abstractmethod
    def forward_unit(self, features: torch.Tensor) -> torch.Tensor:
        """Features [N, F] -> normalised parameters [N, P] (in [0, 1] once clamped)."""

    def input_features(self, z: torch.Tensor) -> torch.Tensor:
        """What the network reads, from unit-norm aligned vectors (default: the standardised encoder features)."""
        return self.encoder.features(z)

    def batch_loss(
        self, batch: dict[str, torch.Tensor], labels: TrainingLabels
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pred = self.forward_unit(batch["features"])
        loss = label_loss(pred, batch["gt_u"], batch.get("mle_u"), labels.alpha, labels.weights, batch.get("mle_valid"))
        return loss, {"label": float(loss.detach())}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors outside the module's state dict (none by default)."""
        return {}

    def prepare_fit(self, signals: torch.Tensor, params: torch.Tensor, device: torch.device) -> None:
        """Hook before training (e.g. the hybrid builds its NNLS dictionary)."""

    # ---- the interface -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.encoder.mean.device

    def fit(
        self,
        params: dict[str, np.ndarray] | np.ndarray | torch.Tensor,
        fingerprints: torch.Tensor | np.ndarray,
        *,
        labels: TrainingLabels | None = None,
        config: FitConfig | None = None,
        sequence_ids: torch.Tensor | None = None,
        log_fn: Any = None,
    ) -> FitResult:
        """Train on ``fingerprints`` [N, frames or rank] simulated from ``params`` (physical units).

        ``labels``: the targets (default ground truth). With MLE labels the fingerprints must be the noisy samples
        that were fitted, and no noise is added (config.snr is ignored). ``config``: default :class:`FitConfig`.
        """
        config = config if config is not None else FitConfig()
        say = log_fn or log.info
        device = select_device(config.device)
        self.to(device)
        gt = self.space.stack(params)
        x = torch.as_tensor(np.asarray(fingerprints) if not isinstance(fingerprints, torch.Tensor) else fingerprints)
        if x.shape[0] != gt.shape[0]:
            raise ValueError(f"{gt.shape[0]} parameter vectors but {x.shape[0]} fingerprints")
        if labels is None:
            labels = TrainingLabels("gt", gt)
        if labels.gt.shape != gt.shape:
            raise ValueError("labels.gt does not match params")
        augment = config.snr is not None and labels.alpha == 0.0
        if config.snr is not None and not augment:
            say("MLE labels belong to fixed noisy samples: noise augmentation is off")
        gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        n = x.shape[0]
        perm = rng.permutation(n)
        n_val = max(1, int(round(config.val_fraction * n))) if n > 20 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        with torch.no_grad():
            c = self.encoder.project(x).cpu()
        # Noise goes on what was given (frames, or coefficients of an orthonormal basis), before projection, so
        # magnitude estimators see Rician noise: |s + n|.
        frames_of = None if x.shape[1] == self.sequence.n_frames else self.sequence.n_frames

        def noisy(rows: np.ndarray | slice, g: torch.Generator, clean_frac: float) -> torch.Tensor:
            xx = x[rows]
            assert config.snr is not None  # only called when augmenting, which needs an SNR range
            lo, hi = config.snr
            snr = torch.exp(torch.empty(xx.shape[0]).uniform_(math.log(lo), math.log(hi), generator=g))
            snr[torch.rand(xx.shape[0], generator=g) < clean_frac] = float("inf")
            return self.encoder.project(add_noise(xx, snr, g, frames_of).to(device))

        with torch.no_grad():
            self.encoder.set_reference(c[tr_idx].to(device))
            z_clean_all, _ = self.encoder.normalise(c.to(device))
            self.encoder.set_stats(z_clean_all[tr_idx])
        self.prepare_fit(c[tr_idx], gt[tr_idx], device)
        gt_u = self.space.to_unit(gt).to(device)
        mle_u = self.space.to_unit(labels.mle).to(device) if labels.mle is not None else None
        mle_valid = labels.mle_valid.to(device) if labels.mle_valid is not None else None
        vgen = torch.Generator().manual_seed(config.seed + 1)
        with torch.no_grad():
            # The validation set: half clean, half at the training noise levels, fixed.
            c_val = noisy(val_idx, vgen, 0.5) if augment else c[val_idx]
            z_val, _ = self.encoder.normalise(c_val.to(device))
            f_val = self._features_chunked(z_val)
        fixed = None
        if augment and (config.fixed_noise or self.cache_features):
            with torch.no_grad():
                zf, _ = self.encoder.normalise(noisy(slice(None), gen, config.clean_fraction))
                fixed = zf
        feat_cache = None
        if self.cache_features:
            with torch.no_grad():
                src = fixed if fixed is not None else z_clean_all
                t0 = time.perf_counter()
                feat_cache = self._features_chunked(src, progress=config.progress)
                say(f"computed input features of {src.shape[0]} samples in {time.perf_counter() - t0:.1f} s")
        opt = torch.optim.Adam(self.trainable_parameters(), lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
        )
        out_dir = Path(config.out_dir) if config.out_dir else None
        start, history = 0, []
        best: tuple[float, dict[str, torch.Tensor] | None] = (float("inf"), None)  # (val loss, state dict)
        ckpt = out_dir / "checkpoint.pt" if out_dir else None
        if ckpt is not None and config.resume and ckpt.exists():
            st = torch.load(ckpt, weights_only=False, map_location=device)
            self.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            start, history = int(st["step"]), list(st["history"])
            best = (float(st["best_loss"]), st["best_state"])
            rng = st["rng"]
            gen.set_state(st["gen"])
            say(f"resumed from {ckpt} at step {start}")
        bar = None
        if config.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.steps, initial=start, desc=f"train {self.model_name}", unit="step")
        t0 = time.perf_counter()
        step = start
        self.train()
        for step in range(start + 1, config.steps + 1):
            idx = rng.choice(tr_idx, size=min(config.batch_size, tr_idx.size), replace=False)
            it = torch.as_tensor(idx, device=device)
            with torch.no_grad():
                if feat_cache is not None:
                    feats = feat_cache[it]
                    z = fixed[it] if fixed is not None else z_clean_all[it]
                elif fixed is not None:
                    z = fixed[it]
                    feats = self.input_features(z)
                elif augment:
                    z, _ = self.encoder.normalise(noisy(idx, gen, config.clean_fraction))
                    feats = self.input_features(z)
                else:
                    z = z_clean_all[it]
                    feats = self.input_features(z)
            batch = {"features": feats, "z": z, "z_clean": z_clean_all[it], "gt_u": gt_u[it], "gt": gt[idx].to(device)}
            if mle_u is not None:
                batch["mle_u"] = mle_u[it]
                if mle_valid is not None:
                    batch["mle_valid"] = mle_valid[it]
            if sequence_ids is not None:
                batch["seq_id"] = sequence_ids[idx]
            loss, parts = self.batch_loss(batch, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), 10.0)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
            if step % config.val_every == 0 or step == config.steps:
                val = self._val_loss(
                    f_val,
                    gt_u[torch.as_tensor(val_idx, device=device)],
                    labels,
                    None if mle_u is None else mle_u[torch.as_tensor(val_idx, device=device)],
                )
                rec = {
                    "step": step,
                    "train_loss": float(loss.detach()),
                    "val_loss": val,
                    "seconds": time.perf_counter() - t0,
                    **{f"train_{k}": v for k, v in parts.items()},
                }
                history.append(rec)
                say(json.dumps(rec))
                if val < best[0]:
                    best = (val, {k: v.detach().clone() for k, v in self.state_dict().items()})
                self.train()
            if ckpt is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "model": self.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step": step,
                        "history": history,
                        "best_loss": best[0],
                        "best_state": best[1],
                        "rng": rng,
                        "gen": gen.get_state(),
                    },
                    ckpt.with_suffix(".tmp"),
                )
                ckpt.with_suffix(".tmp").replace(ckpt)
                (ckpt.parent / "history.json").write_text(json.dumps(history, indent=1))
        if bar is not None:
            bar.close()
        if best[1] is not None:
            self.load_state_dict(best[1])
        self.eval()
        seconds = time.perf_counter() - t0
        self.train_info = {
            "steps": step,
            "seconds": round(seconds, 1),
            "best_val_loss": best[0],
            "n_train": int(tr_idx.size),
            "n_val": int(n_val),
            "labels": labels.kind,
            "alpha": labels.alpha,
            "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        }
        return FitResult(step, seconds, best[0], history)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _features_chunked(self, z: torch.Tensor, chunk: int = 4096, progress: bool = False) -> torch.Tensor:
        starts = range(0, z.shape[0], chunk)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="features", unit="chunk")
        return (
            torch.cat([self.input_features(z[i : i + chunk]) for i in starts]) if z.shape[0] else self.input_features(z)
        )

    @torch.no_grad()
    def _val_loss(
        self, f_val: torch.Tensor, gt_u: torch.Tensor, labels: TrainingLabels, mle_u: torch.Tensor | None
    ) -> float:
        self.eval()
        if f_val.shape[0] == 0:
            return float("nan")
        pred = torch.cat([self.forward_unit(f_val[i : i + 8192]) for i in range(0, f_val.shape[0], 8192)])
        return float(label_loss(pred, gt_u, mle_u, labels.alpha, labels.weights))

    @torch.no_grad()
    def predict_unit(self, fingerprints: torch.Tensor | np.ndarray, batch_size: int = 16384) -> torch.Tensor:
        self.eval()
        x = torch.as_tensor(np.asarray(fingerprints) if not isinstance(fingerprints, torch.Tensor) else fingerprints)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{int((~torch.isfinite(x)).sum())} fingerprint values are NaN or infinite")
        out = []
        for i in range(0, x.shape[0], batch_size):
            z, _ = self.encoder.normalise(self.encoder.project(x[i : i + batch_size].to(self.device)))
            out.append(self.forward_unit(self.input_features(z)).clamp(0, 1))
        return torch.cat(out) if out else torch.zeros(0, len(self.space.names), device=self.device)

    def predict(self, fingerprints: torch.Tensor | np.ndarray, batch_size: int = 16384) -> dict[str, np.ndarray]:
        """Parameters in physical units, one array [N] per name of :attr:`space` (clipped to the trained range)."""
        return self.space.as_dict(self.space.from_unit(self.predict_unit(fingerprints, batch_size)))

    @torch.no_grad()
    def consistency(
        self, fingerprints: torch.Tensor | np.ndarray, params: dict[str, np.ndarray], chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """(relative residual, proton-density scale) of each fingerprint against the EPG re-simulation of its estimate.

        residual = ||x - c s|| / ||x|| with the best complex (or real) scale c, in the estimator's input subspace;
        scale = ||x|| / ||s|| (the estimate's proton density, a.u.).
        """
        x = torch.as_tensor(np.asarray(fingerprints) if not isinstance(fingerprints, torch.Tensor) else fingerprints)
        p = self.space.stack(params)
        res, pd = [], []
        for i in range(0, x.shape[0], chunk):
            cx = self.encoder.project(x[i : i + chunk].to(self.device))
            s = simulate(self.sequence, self.space, p[i : i + chunk].to(self.device))
            cs = self.encoder.project(s if self.encoder.complex_data else s.abs())
            r, scale = _fit_residual(cx, cs)
            res.append(r)
            pd.append(scale)
        return torch.cat(res).cpu().numpy(), torch.cat(pd).cpu().numpy()

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra_meta: dict[str, Any] | None = None, half: bool = False) -> Path:
        tensors = {k: v for k, v in self.state_dict().items()}
        if "encoder.basis" in tensors and tensors["encoder.basis"].is_complex():
            b = tensors.pop("encoder.basis")
            tensors["encoder.basis.real"], tensors["encoder.basis.imag"] = b.real, b.imag
        if tensors["encoder.ref"].is_complex():
            r = tensors.pop("encoder.ref")
            tensors["encoder.ref.real"], tensors["encoder.ref.imag"] = r.real, r.imag
        tensors.update({f"extra.{k}": v for k, v in self.extra_tensors().items()})
        meta = {
            "format": FORMAT_VERSION,
            "kind": "mapping_estimator",
            "model": self.model_name,
            "sequence": self.sequence.to_dict(),
            "space": self.space.to_dict(),
            "input": self.input,
            "complex_data": self.encoder.complex_data,
            "options": self.options,
            "train": self.train_info,
            **(extra_meta or {}),
        }
        return save_weights(path, tensors, meta, half=half)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Estimator:
        basis = None
        if "encoder.basis.real" in tensors:
            basis = torch.complex(tensors["encoder.basis.real"], tensors["encoder.basis.imag"])
        elif "encoder.basis" in tensors:
            basis = tensors["encoder.basis"]
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        est = cls(
            MRFSequence.from_dict(meta["sequence"]),
            ParameterSpace.from_dict(meta["space"]),
            input=meta["input"],
            complex_data=bool(meta["complex_data"]),
            basis=basis,
            **meta.get("options", {}),
            **cls.options_from_extra(extra),
        )
        state = {
            k: v
            for k, v in tensors.items()
            if not k.startswith("extra.") and not k.startswith("encoder.basis") and not k.startswith("encoder.ref")
        }
        if "encoder.ref.real" in tensors:
            state["encoder.ref"] = torch.complex(tensors["encoder.ref.real"], tensors["encoder.ref.imag"])
        else:
            state["encoder.ref"] = tensors["encoder.ref"]
        if basis is not None:
            # Only an 'svd' estimator saves a basis, and the constructor has just registered it as a buffer.
            assert est.encoder.basis is not None
            state["encoder.basis"] = est.encoder.basis
        missing, unexpected = est.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "encoder.basis"]
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the {meta['model']} architecture (missing {missing}, unexpected {unexpected})"
            )
        est.train_info = dict(meta.get("train", {}))
        est.eval()
        return est

    @classmethod
    def options_from_extra(cls, extra: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {}


def _fit_residual(cx: torch.Tensor, cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative residual of x after the best scalar fit of s, and ||x|| / ||s||."""
    nx = torch.linalg.vector_norm(cx, dim=1).clamp_min(1e-30)
    ns = torch.linalg.vector_norm(cs, dim=1).clamp_min(1e-30)
    ip = (cx * cs.conj()).sum(1) if cx.is_complex() else (cx * cs).sum(1)
    cos = (ip.abs() / (nx * ns)).clamp(0, 1)
    return torch.sqrt((1 - cos**2).clamp_min(0)), nx / ns


def load_estimator(path: str | Path, device: torch.device | str = "cpu") -> Estimator:
    """Any estimator written by :meth:`Estimator.save` (the model is named in the file)."""
    from pipelines.mapping.estimators import MODEL_CLASSES

    tensors, meta = load_weights(path)
    if meta.get("kind") != "mapping_estimator":
        raise ValueError(f"{path} does not hold a mapping estimator (kind {meta.get('kind')!r})")
    model = meta.get("model")
    if model not in MODEL_CLASSES:
        raise ValueError(f"{path}: unknown estimator model {model!r}")
    return MODEL_CLASSES[model].from_meta(meta, tensors).to(device)
