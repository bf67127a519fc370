"""Training loop and image metrics shared by the unrolled reconstruction networks (XPDNet, NC-PDNet).

The loop knows nothing about MRI: a ``sample_batch(rng, batch_size)`` makes a batch and a
``run_model(model, batch, device)`` turns it into ``(prediction, target)`` real images [B, H, W]. Everything a
long run needs lives in ``out_dir``: ``checkpoint.pt`` (model, optimiser, step, RNG states, history) for
``resume``, ``history.json`` and ``train.log`` with the validation PSNR/SSIM.

The loss is the fastMRI challenge's ``0.98 (1 - SSIM) + 0.02 L1`` (XPDNet used MS-SSIM + L1 with the same
weights; single-scale SSIM is what fits 64-128 pixel training crops).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.compute import select_device, set_threads

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
LOSS_SSIM_WEIGHT = 0.98


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"images must be [B, H, W] or [H, W], got shape {tuple(x.shape)}")
    return x


def _data_range(y: torch.Tensor, data_range: torch.Tensor | float | None) -> torch.Tensor:
    if data_range is None:
        return y.flatten(1).amax(dim=1).clamp_min(1e-12)
    return torch.as_tensor(data_range, dtype=y.dtype, device=y.device).expand(y.shape[0])


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor | float | None = None) -> torch.Tensor:
    """SSIM per image [B] with a 7x7 uniform window, as fastMRI's evaluation (``data_range``: the target's max)."""
    x, y = _as_batch(x).float(), _as_batch(y).float()
    dr = _data_range(y, data_range)[:, None, None, None]
    c1, c2 = (SSIM_K1 * dr) ** 2, (SSIM_K2 * dr) ** 2
    w = torch.ones(1, 1, SSIM_WIN, SSIM_WIN, dtype=x.dtype, device=x.device) / SSIM_WIN**2
    x, y = x[:, None], y[:, None]
    ux, uy = F.conv2d(x, w), F.conv2d(y, w)
    n = SSIM_WIN**2
    cov = n / (n - 1)  # unbiased local (co)variances, as skimage / fastMRI
    vx = cov * (F.conv2d(x * x, w) - ux * ux)
    vy = cov * (F.conv2d(y * y, w) - uy * uy)
    vxy = cov * (F.conv2d(x * y, w) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor | float | None = None) -> torch.Tensor:
    """PSNR per image [B] in dB against the target ``y`` (peak: the target's max unless given)."""
    x, y = _as_batch(x).float(), _as_batch(y).float()
    dr = _data_range(y, data_range)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1).clamp_min(1e-20)
    return 10 * torch.log10(dr**2 / mse)


def ssim_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.98 (1 - SSIM) + 0.02 L1, both images divided by the target's max so every slice weighs the same."""
    pred, target = _as_batch(pred), _as_batch(target)
    scale = target.detach().flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    p, t = pred / scale, target / scale
    s = ssim(p, t, data_range=1.0).mean()
    return LOSS_SSIM_WEIGHT * (1 - s) + (1 - LOSS_SSIM_WEIGHT) * (p - t).abs().mean()


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-4
    optimizer: str = "radam"  # adam | radam
    seed: int = 0
    out_dir: Path = Path("runs/train")
    val_every: int = 100
    checkpoint_every: int = 100
    device: str = "auto"  # auto: CUDA when present
    threads: int = 0  # 0: leave torch's setting
    resume: bool = False
    grad_clip: float = 1.0  # 0: off
    progress: bool = True
    time_limit_s: float = 0.0  # > 0: stop after this many seconds of steps (a lease or a shared machine's budget)
    schedule: str = "constant"  # constant | cosine: lr decays to 0 over steps or time_limit_s, whichever ends first


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    val_psnr: float = float("nan")
    val_ssim: float = float("nan")
    seconds: float = 0.0


SampleFn = Callable[[np.random.Generator, int], Any]
# Generic in the model so that a run function written for one network (NCPDNet, XPDNet) types against it.
ModelT = TypeVar("ModelT", bound=nn.Module)
RunFn = Callable[[ModelT, Any, torch.device], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate(model: ModelT, run_model: RunFn[ModelT], batches: Sequence[Any], device: torch.device) -> dict[str, float]:
    """Mean PSNR / SSIM over every image of ``batches`` (no gradients; the model is put back in train mode)."""
    was_training = model.training
    model.eval()
    p, s = [], []
    with torch.no_grad():
        for b in batches:
            pred, target = run_model(model, b, device)
            p.append(psnr(pred, target).cpu())
            s.append(ssim(pred, target).cpu())
    model.train(was_training)
    return {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean())}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(model.parameters(), lr=cfg.lr)
    raise ValueError(f"optimizer must be adam or radam, not {cfg.optimizer!r}")


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    rng: np.random.Generator,
    history: list[dict[str, float]],
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": history,
        },
        tmp,
    )
    tmp.replace(path)


def train(
    model: ModelT,
    sample_batch: SampleFn,
    run_model: RunFn[ModelT],
    val_set: Sequence[Any],
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    loss_fn: LossFn = ssim_l1_loss,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps; returns the final validation metrics."""
    from tqdm import tqdm

    if cfg.threads:
        set_threads(cfg.threads)
    device = select_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device).train()
    opt = _optimizer(model, cfg)
    history: list[dict[str, float]] = []
    start = 0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        start, history = int(state["step"]), list(state["history"])
        log(f"resumed from {ckpt} at step {start}")
    (out / "config.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, indent=1)
    )
    logf = (out / "train.log").open("a")

    def note(line: str) -> None:
        logf.write(line + "\n")
        logf.flush()
        log(line)

    def validate(done: int, running: float) -> None:
        metrics = evaluate(model, run_model, val_set, device)
        history.append({"step": done, "loss": running, **metrics, "seconds": time.perf_counter() - t0})
        (out / "history.json").write_text(json.dumps(history, indent=1))
        note(f"step {done}: loss {running:.4f}, validation PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")

    t0 = time.perf_counter()
    running = math.nan
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not cfg.progress,
        desc="train",
        dynamic_ncols=True,
    )
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be constant or cosine, not {cfg.schedule!r}")
    done = start
    for step in bar:
        elapsed = time.perf_counter() - t0
        if cfg.time_limit_s and elapsed >= cfg.time_limit_s:
            note(f"time limit of {cfg.time_limit_s:.0f} s reached after {step} steps")
            break
        if cfg.schedule == "cosine":
            # Progress by steps or by the time budget, whichever is further: a run cut short by its lease still
            # ends on a decayed learning rate instead of stopping mid-plateau.
            frac = max(step / cfg.steps, elapsed / cfg.time_limit_s if cfg.time_limit_s else 0.0)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        batch = sample_batch(rng, cfg.batch_size)
        pred, target = run_model(model, batch, device)
        loss = loss_fn(pred, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if val_set and (done % cfg.val_every == 0 or done == cfg.steps):
            validate(done, running)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_checkpoint(ckpt, model, opt, done, rng, history)
    bar.close()
    if done < cfg.steps:  # stopped by the time limit: validate and keep the last step
        if val_set and (not history or history[-1]["step"] != done):
            validate(done, running)
        _save_checkpoint(ckpt, model, opt, done, rng, history)
    logf.close()
    last = history[-1] if history else {}
    return TrainResult(
        steps=done,
        history=history,
        val_psnr=last.get("psnr", math.nan),
        val_ssim=last.get("ssim", math.nan),
        seconds=time.perf_counter() - t0,
    )
