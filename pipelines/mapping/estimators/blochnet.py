"""BlochNet-style estimator: an FC encoder trained through a fixed, differentiable EPG decoder (physics-based
decoding, after the BlochNet manuscript in /work/shared/papers/004).

The encoder (three fully connected layers) predicts the normalised parameters; relaxation times are predicted
on a log scale (the normalisation of :class:`ParameterSpace`) and mapped back before decoding. The decoder is
the EPG simulation of the node's own physics (:mod:`pipelines.physics.epg`), with no trainable weights; its
output goes through the same unit-norm / phase-alignment encoding as the input, and the loss is

    L = 1/2 MSE(params_hat, params) + 1/2 w_rec ||decode(params_hat) - clean fingerprint||^2 (unit-norm vectors).

Decoding is the costly part (EPG with autograd), so each step decodes a random subset of the batch
(``decoder_batch``). ``decoder_sequences`` (one per ``sequence_ids`` value) lets a training set mix schedules,
as in BlochNet's out-of-distribution experiment; each sample is decoded with its own schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.mapping.estimators.base import Estimator
from pipelines.mapping.estimators.data import simulate_differentiable
from pipelines.mapping.estimators.fc import mlp
from pipelines.mapping.estimators.labels import TrainingLabels, label_loss
from pipelines.physics.sequences import MRFSequence


class BlochNetEstimator(Estimator):
    model_name = "blochnet"

    def build(self) -> None:
        hidden = int(self.options.setdefault("hidden", 300))
        self.options.setdefault("decoder_batch", 64)
        self.options.setdefault("recon_weight", 1.0)
        # Decode every k-th step only, and truncate the EPG at this many dephasing orders (0: the physics
        # default). Both trade decoder cost for exactness; the inference path never decodes.
        self.options.setdefault("decoder_every", 1)
        self.options.setdefault("decoder_states", 0)
        self._step = 0
        self.net = mlp([self.encoder.n_features, hidden, hidden, len(self.space.names)], nn.ReLU, nn.Sigmoid())
        self.decoder_sequences: list[MRFSequence] | None = None

    def forward_unit(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def decode(self, u: torch.Tensor, seq: MRFSequence) -> torch.Tensor:
        """Normalised parameters -> unit-norm aligned fingerprint vectors through the EPG physics (differentiable)."""
        p = self.space.from_unit(u.clamp(1e-4, 1 - 1e-4))
        k = int(self.options["decoder_states"])
        s = simulate_differentiable(seq, self.space, p, n_states=k or None)
        if not self.encoder.complex_data:
            s = s.abs()
        z, _ = self.encoder.normalise(self.encoder.project(s))
        return z

    def batch_loss(
        self, batch: dict[str, torch.Tensor], labels: TrainingLabels
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pred = self.forward_unit(batch["features"])
        l_emb = label_loss(
            pred, batch["gt_u"], batch.get("mle_u"), labels.alpha, labels.weights, batch.get("mle_valid")
        )
        self._step += 1
        if self._step % int(self.options["decoder_every"]):
            return 0.5 * l_emb, {"embedding": float(l_emb.detach())}
        k = min(int(self.options["decoder_batch"]), pred.shape[0])
        sel = torch.randperm(pred.shape[0], device=pred.device)[:k]
        seqs = self.decoder_sequences or [self.sequence]
        ids = batch.get("seq_id")
        ids = torch.zeros(pred.shape[0], dtype=torch.long) if ids is None else torch.as_tensor(ids)
        ids = ids.to(sel.device)[sel]
        l_rec = pred.new_zeros(())
        for j, seq in enumerate(seqs):
            m = sel[ids == j]
            if m.numel() == 0:
                continue
            zhat = self.decode(pred[m], seq)
            # Relative squared error of the unit-norm signatures (both normalised, so in [0, 4]): every frame
            # weighs by its signal, not by its spread over the training set.
            err = ((self.encoder.split(zhat) - self.encoder.split(batch["z_clean"][m])) ** 2).sum(1)
            l_rec = l_rec + err.sum() / k
        loss = 0.5 * l_emb + 0.5 * float(self.options["recon_weight"]) * l_rec
        return loss, {"embedding": float(l_emb.detach()), "reconstruction": float(l_rec.detach())}
