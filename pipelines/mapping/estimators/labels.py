"""Training labels after Epstein et al. (2022): ground truth, maximum-likelihood fits, or a weighted hybrid.

``gt``      regress the generative parameters: low variance, but biased towards the mean of the training
            distribution where the data are uninformative (the network learns the posterior mean).
``mle``     regress the bounded maximum-likelihood estimate of each noisy training sample (Rician for magnitude
            data, Gaussian for complex data): the network inherits the MLE's low bias and its variance.
``hybrid``  alpha * MLE loss + (1 - alpha) * GT loss: a tunable point on that bias-variance trade-off.

Losses are mean squared errors in the estimator's normalised parameter space, weighted per parameter (Epstein
et al. weight each parameter by the inverse of its training mean so every parameter counts equally; in the
normalised space, where every parameter spans [0, 1], equal weights do the same).
Samples whose MLE label lies on the bound of the fit are dropped from the MLE term, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LABELS = ("gt", "mle", "hybrid")


@dataclass
class TrainingLabels:
    """Targets in physical units, [N, P]; ``mle`` only for the mle / hybrid kinds."""

    kind: str
    gt: torch.Tensor
    mle: torch.Tensor | None = None
    alpha: float = 0.0
    weights: torch.Tensor | None = None  # [P] per-parameter loss weights (default 1)
    mle_valid: torch.Tensor | None = None  # [N] bool: label not on the bound of the fit

    def __post_init__(self) -> None:
        if self.kind not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, not {self.kind!r}")
        if self.kind == "gt":
            self.alpha = 0.0
        elif self.kind == "mle":
            self.alpha = 1.0
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.kind != "gt" and self.mle is None:
            raise ValueError(f"{self.kind} labels need the MLE fits of the training samples")
        if self.mle is not None and self.mle.shape != self.gt.shape:
            raise ValueError(
                f"MLE labels {tuple(self.mle.shape)} and ground truth {tuple(self.gt.shape)} differ in shape"
            )
        if self.weights is not None and self.weights.numel() != self.gt.shape[1]:
            raise ValueError(f"{self.weights.numel()} loss weights for {self.gt.shape[1]} parameters")


def parse_weights(text: str | None, names: tuple[str, ...]) -> torch.Tensor | None:
    """``"t1_ms=2,ff=1"`` -> weights in ``names`` order (unnamed parameters weigh 1)."""
    if not text:
        return None
    w = {n: 1.0 for n in names}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"loss weight {part!r}: expected NAME=VALUE")
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in w:
            raise ValueError(f"loss weight for unknown parameter {k!r} (parameters: {', '.join(names)})")
        try:
            w[k] = float(v)
        except ValueError:
            raise ValueError(f"loss weight {part!r}: {v!r} is not a number") from None
        if w[k] < 0:
            raise ValueError(f"loss weight {part!r} is negative")
    return torch.tensor([w[n] for n in names], dtype=torch.float32)


def label_loss(
    pred_u: torch.Tensor,
    gt_u: torch.Tensor,
    mle_u: torch.Tensor | None,
    alpha: float,
    weights: torch.Tensor | None,
    mle_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * weighted MSE(pred, MLE) + (1 - alpha) * weighted MSE(pred, GT), all in normalised units."""
    w = torch.ones(pred_u.shape[1], device=pred_u.device) if weights is None else weights.to(pred_u.device)
    w = w / w.mean()
    loss = pred_u.new_zeros(())
    if alpha < 1.0:
        loss = loss + (1 - alpha) * (((pred_u - gt_u) ** 2) * w).mean()
    if alpha > 0.0 and mle_u is not None:
        err = ((pred_u - mle_u) ** 2) * w
        if mle_valid is not None:
            keep = mle_valid.to(pred_u.device)
            err = err[keep] if bool(keep.any()) else err[:0]
        loss = loss + alpha * (err.mean() if err.numel() else pred_u.new_zeros(()))
    return loss
