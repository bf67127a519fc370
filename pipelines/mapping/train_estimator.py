"""``recon-node train estimator``: train a learned fingerprint-to-map estimator on the node's own sequence.

    recon-node train estimator --model fc|inn|blochnet|hybrid --sequence fisp|t1ff|FILE.json \\
        --labels gt|mle|hybrid [--alpha A] --out weights.safetensors [--steps N] [--seed S] [--device auto]

Training data are simulated with the node's EPG (random parameters over the dictionary's ranges, off its grid)
and cached under ``--cache-dir``; checkpoints go to ``--checkpoint-dir`` (``--resume`` continues a run).
MLE / hybrid labels: a fixed noisy copy of each training sample (``--label-snr``) is fitted by bounded maximum
likelihood (Gaussian for complex data, Rician for magnitude data), initialised at the ground truth as in
Epstein et al.; the network then trains on those noisy samples without further augmentation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.compute import set_threads
from pipelines.mapping.estimators import TRAINABLE, Estimator, FitConfig, create_estimator
from pipelines.mapping.estimators.data import add_noise, default_space, make_training_set
from pipelines.mapping.estimators.labels import LABELS, TrainingLabels, parse_weights
from pipelines.mapping.estimators.mle import mle_for_space
from pipelines.physics.sequences import MRFSequence

log = logging.getLogger("recon_node.train_estimator")


def dictionary_basis(
    seq: MRFSequence, kind: str, field: float, complex_data: bool, cache_dir: str | None
) -> torch.Tensor:
    """The SVD basis of the node's default dictionary for this sequence (built or loaded from its cache)."""
    from pipelines.mapping.dictionary import build_dictionary
    from pipelines.mapping.maps import default_spec

    d = build_dictionary(
        seq,
        default_spec(seq, kind, field, complex_data),
        cache_dir=Path(cache_dir) if cache_dir else None,
        progress=True,
    )
    return (d.complex if complex_data else d.magnitude).basis


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recon-node train estimator", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=TRAINABLE)
    p.add_argument("--sequence", required=True, help="fisp, t1ff or a JSON schedule")
    p.add_argument("--labels", default="gt", choices=LABELS)
    p.add_argument("--alpha", type=float, default=0.5, help="MLE weight of hybrid labels")
    p.add_argument("--loss-weights", default="", help="per-parameter loss weights, e.g. t1_ms=2,ff=1")
    p.add_argument("--out", required=True, help="weights file (.safetensors); a model card .md is written next to it")
    p.add_argument("--signal-model", default="auto", choices=("auto", "single", "water_fat"))
    p.add_argument("--field", type=float, default=3.0, help="field strength (T) for the fat spectrum")
    p.add_argument("--input", default="svd", choices=("svd", "full"), help="SVD coefficients or full fingerprints")
    p.add_argument("--magnitude", action="store_true", help="train for magnitude images (default: complex)")
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--snr-min", type=float, default=20.0, help="noise augmentation: SNR range (log-uniform)")
    p.add_argument("--snr-max", type=float, default=500.0)
    p.add_argument("--no-noise", action="store_true", help="train on clean fingerprints")
    p.add_argument("--label-snr", type=float, default=30.0, help="SNR of the fixed noisy samples MLE labels fit")
    p.add_argument("--mle-steps", type=int, default=100)
    p.add_argument("--option", action="append", default=[], help="architecture option NAME=VALUE (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument(
        "--cache-dir", default="", help="training-set cache (default /tmp/estimators or $RECON_NODE_ESTIMATOR_CACHE)"
    )
    p.add_argument("--dict-cache", default="", help="dictionary cache (default: the node's)")
    p.add_argument("--checkpoint-dir", default="", help="checkpoints and history (default: next to --out)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--no-progress", action="store_true")
    return p


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--option {text!r}: expected NAME=VALUE")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        set_threads(args.threads)
    from pipelines.physics.sequences import get_sequence

    seq = get_sequence(args.sequence)
    space = default_space(seq, args.signal_model, args.field)
    complex_data = not args.magnitude
    if args.labels == "hybrid" and not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must lie in [0, 1], got {args.alpha}")
    t_start = time.perf_counter()
    basis = None
    if args.input == "svd":
        basis = dictionary_basis(seq, space.kind, args.field, complex_data, args.dict_cache or None)
    cache = Path(args.cache_dir) if args.cache_dir else None
    # Stored as coefficients when the input is the subspace and the data complex (noise stays white there).
    store_basis = basis if (basis is not None and complex_data) else None
    ts = make_training_set(seq, space, args.n_train, args.seed, basis=store_basis, cache_dir=cache, progress=True)
    log.info("training set: %d samples of %s (%s)", len(ts), seq.name, ts.info.get("cache"))
    options = dict(_option(o) for o in args.option)
    est = create_estimator(args.model, seq, space, input=args.input, complex_data=complex_data, basis=basis, **options)
    weights = parse_weights(args.loss_weights, space.names)
    signals = ts.signals
    labels = TrainingLabels("gt", ts.params, weights=weights)
    snr = None if args.no_noise else (args.snr_min, args.snr_max)
    if args.labels != "gt":
        g = torch.Generator().manual_seed(args.seed + 7)
        frames_of = None if signals.shape[1] == seq.n_frames else seq.n_frames
        noisy = add_noise(signals, args.label_snr, g, frames_of)
        noise = "gaussian" if complex_data else "rician"
        y = noisy if complex_data else noisy.abs()
        sigma = None
        if noise == "rician":
            sigma = (signals.abs().mean(1) / args.label_snr) / np.sqrt(2)  # per real channel
        t0 = time.perf_counter()
        fit = mle_for_space(seq, space, y, ts.params, basis=store_basis, noise=noise, sigma=sigma, steps=args.mle_steps)
        log.info(
            "MLE labels (%s) for %d samples in %.0f s; %d on a bound (dropped from the MLE term)",
            noise,
            len(ts),
            time.perf_counter() - t0,
            int(fit.on_bound.sum()),
        )
        labels = TrainingLabels(args.labels, ts.params, fit.params, args.alpha, weights, ~fit.on_bound)
        signals = noisy
        snr = None
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f"{out.stem}_run"
    cfg = FitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        snr=snr,
        device=args.device,
        progress=not args.no_progress,
        out_dir=str(ckpt),
        resume=args.resume,
        val_every=args.val_every,
        checkpoint_every=max(args.val_every, 1000),
    )
    res = est.fit(ts.params, signals, labels=labels, config=cfg)
    command = "recon-node train estimator " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {cfg.device}",
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    est.save(out, extra_meta=meta)
    log.info(
        "saved %s after %d steps (%.0f s, best validation loss %.4g)", out, res.steps, res.seconds, res.best_val_loss
    )
    card = write_model_card(out)
    log.info("model card %s", card)
    return 0


def held_out_metrics(est: Estimator, n: int = 500, seed: int = 4242) -> dict[str, dict[str, dict[str, float]]]:
    """Median relative / mean absolute error per parameter on fresh random parameters (clean and SNR 30):
    ``{noise label: {parameter: {metric: value}}}``."""
    from pipelines.mapping.estimators.data import simulate

    p = est.space.sample(n, np.random.default_rng(seed))
    x = simulate(est.sequence, est.space, p, chunk=512)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, snr in (("noise-free", float("inf")), ("SNR 30", 30.0)):
        xx = x if snr == float("inf") else add_noise(x, snr, torch.Generator().manual_seed(seed))
        pred = est.predict(xx)
        out[label] = {
            k: {
                "median_rel_err_pct": float(
                    np.median(np.abs(pred[k] - p[:, i].numpy()) / np.maximum(np.abs(p[:, i].numpy()), 1e-6))
                )
                * 100,
                "mae": float(np.mean(np.abs(pred[k] - p[:, i].numpy()))),
            }
            for i, k in enumerate(est.space.names)
        }
    return out


def write_model_card(weights: str | Path) -> Path:
    """``<weights>.md``: data, command, seed, machine, training time and held-out metrics, from the file's metadata."""
    from pipelines.mapping.estimators.base import load_estimator
    from pipelines.weights_io import load_weights

    weights = Path(weights)
    _, meta = load_weights(weights)
    est = load_estimator(weights)
    tr = meta.get("train", {})
    cfg = tr.get("config", {})
    metrics = held_out_metrics(est)
    n_params = sum(p.numel() for p in est.parameters())
    rows = []
    for label, per in metrics.items():
        for k, m in per.items():
            rows.append(f"| {label} | {k} | {m['median_rel_err_pct']:.2f} | {m['mae']:.4g} |")
    space = ", ".join(
        f"{r['name']} [{r['lo']:g}, {r['hi']:g}]{' (log)' if r['log'] else ''}" for r in meta["space"]["ranges"]
    )
    text = (
        f"""# {weights.stem}: {meta["model"]} estimator for the `{meta["sequence"]["name"]}` sequence

**Trained on CPU in this session** (no GPU; {meta.get("machine", "unknown machine")}), shared with other
training jobs, so for a short budget: {tr.get("steps")} steps of batch {cfg.get("batch_size")}, far fewer than the
papers' epochs. Treat these weights as a working baseline, not a converged model.

- Model: `{meta["model"]}` ({n_params} weights and buffers), options `{json.dumps(meta.get("options", {}))}`
- Input: {"SVD coefficients of the dictionary basis" if meta["input"] == "svd" else "full fingerprints"},
  {"complex (real and imaginary parts)" if meta["complex_data"] else "magnitude"}; unit norm, phase aligned,
  standardised
- Parameters (normalised to [0, 1]): {space}; signal model `{meta["space"]["kind"]}`,
  {meta["space"]["field_strength_T"]} T
- Data: {tr.get("n_train")} training / {tr.get("n_val")} validation parameter sets drawn uniformly (log for
  relaxation times) over those ranges, EPG-simulated with the node's physics; noise augmentation
  SNR {cfg.get("snr")} (log-uniform, {cfg.get("clean_fraction")} of each batch clean); labels `{tr.get("labels")}`
- Seed: {cfg.get("seed")}
- Command: `{meta.get("command", "?")}`
- Training time: {tr.get("seconds")} s of optimisation, {meta.get("total_seconds")} s in all (data simulation
  included); best validation loss {tr.get("best_val_loss")}

## Held-out metrics (500 fresh random parameter sets, seed 4242)

| data | parameter | median relative error (%) | mean absolute error |
|---|---|---|---|
"""
        + "\n".join(rows)
        + """

Relative errors of FF and the field offset are large near 0 by construction (division by a value near 0); see
BENCHMARKS.md (benchmarks/estimators_eval.py) for the comparison with dictionary matching.
"""
    )
    card = weights.with_suffix(".md")
    card.write_text(text)
    return card


if __name__ == "__main__":
    raise SystemExit(main())
