"""Train XPDNet on simulated Cartesian multi-coil data: ``recon-node train xpdnet [options]``.

Each training slice is a fresh randomised brain or thigh phantom (:func:`pipelines.sim.anatomy.random_image`:
random contrast, pose, texture and smooth phase), randomly rotated by a multiple of 90 degrees and flipped,
seen by a random birdcage array (4 to 16 coils, RSS-normalised so the image itself is the SENSE truth), with
complex Gaussian k-space noise of 0.5-3 % of the image peak, undersampled at R = 4 or 8 by an equidistant mask
(random offset) or a variable-density random mask, both with 8 % central calibration lines. Validation uses
held-out phantom seeds (never drawn in training) from an index range the benchmark does not use.

Loss: 0.98 (1 - SSIM) + 0.02 L1 on magnitudes (:func:`pipelines.recon.training.ssim_l1_loss`). The reference
trained with RAdam at lr 1e-4 for 200+ epochs of fastMRI on GPUs; a short CPU run needs a larger step (Adam,
5e-4 by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.recon.operators import fft2c
from pipelines.recon.xpdnet import SHIPPED_NAME, XPDNet, XPDNetConfig, save_xpdnet
from pipelines.sim.anatomy import heldout_image, random_coil_maps, random_image
from pipelines.sim.trajectories import cartesian_frame_masks

ACCELERATIONS = (4, 8)
MASK_KINDS = ("equidistant", "random")
VALIDATION_OFFSET = 10_000  # held-out image indices used for validation; the benchmark uses 0, 1, 2, ...


@dataclass
class Batch:
    y: torch.Tensor  # complex64 [B, C, n, n] undersampled k-space
    mask: torch.Tensor  # float32 [B, n, n]
    target: torch.Tensor  # float32 [B, n, n] |truth|


def cartesian_mask(rng: np.random.Generator, n: int, r: int, kind: str) -> np.ndarray:
    """[n, n] float mask: R-fold equidistant (random phase) or variable-density random rows, 8 % calibration."""
    period = int(np.ceil(r))
    rows = cartesian_frame_masks(period, n, r, kind=kind, seed=int(rng.integers(0, 2**31)))
    m = np.zeros((n, n), np.float32)
    m[rows[int(rng.integers(period))]] = 1.0
    return m


def simulate_slice(
    rng: np.random.Generator, image: np.ndarray, n_coils: int, r: int, kind: str, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """(k-space [C, n, n] complex64 masked, mask [n, n]) of ``image`` with random coils and complex noise."""
    n = image.shape[-1]
    maps = random_coil_maps(rng, n, n_coils)
    k = fft2c(torch.from_numpy(maps * image)).numpy()
    sigma = noise * float(np.abs(image).max()) / np.sqrt(2)
    k = k + sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    mask = cartesian_mask(rng, n, r, kind)
    return (k * mask).astype(np.complex64), mask


def _augment(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    img = np.rot90(img, int(rng.integers(4)))
    return np.ascontiguousarray(img[:, ::-1] if rng.random() < 0.5 else img)


def make_sampler(matrix: int, coils: tuple[int, int] = (4, 16), noise: tuple[float, float] = (0.005, 0.03)):
    def sample(rng: np.random.Generator, batch_size: int) -> Batch:
        n_coils = int(rng.integers(coils[0], coils[1] + 1))  # one coil count per batch (stacked tensors)
        ys, masks, targets = [], [], []
        for _ in range(batch_size):
            img = _augment(rng, random_image(rng, matrix))
            y, m = simulate_slice(
                rng,
                img,
                n_coils,
                int(rng.choice(ACCELERATIONS)),
                str(rng.choice(MASK_KINDS)),
                float(rng.uniform(*noise)),
            )
            ys.append(y)
            masks.append(m)
            targets.append(np.abs(img))
        return Batch(
            torch.from_numpy(np.stack(ys)),
            torch.from_numpy(np.stack(masks)),
            torch.from_numpy(np.stack(targets).astype(np.float32)),
        )

    return sample


def validation_set(
    matrix: int, n_batches: int = 2, batch_size: int = 4, n_coils: int = 8, seed: int = 12345
) -> list[Batch]:
    """Held-out phantoms (indices from VALIDATION_OFFSET), R = 4 and 8, both mask kinds, 2 % noise."""
    rng = np.random.default_rng(seed)
    out, idx = [], VALIDATION_OFFSET
    for _ in range(n_batches):
        ys, masks, targets = [], [], []
        for j in range(batch_size):
            img = heldout_image(idx, matrix)
            idx += 1
            y, m = simulate_slice(rng, img, n_coils, ACCELERATIONS[j % 2], MASK_KINDS[(j // 2) % 2], 0.02)
            ys.append(y)
            masks.append(m)
            targets.append(np.abs(img))
        out.append(
            Batch(
                torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(masks)),
                torch.from_numpy(np.stack(targets).astype(np.float32)),
            )
        )
    return out


def run_model(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pred = model(batch.y.to(device), batch.mask.to(device))
    return pred, batch.target.to(device)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="recon-node train xpdnet", description="Train XPDNet on simulated Cartesian multi-coil data."
    )
    ap.add_argument("--size", default="small", choices=("small", "medium", "big"), help="MWCNN size")
    ap.add_argument("--n-iter", type=int, default=10, help="unrolled iterations (challenge: 25)")
    ap.add_argument("--n-primal", type=int, default=5)
    ap.add_argument("--no-refine-smaps", action="store_true", help="no sensitivity-map refinement U-net")
    ap.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing per iteration")
    ap.add_argument("--matrix", type=int, default=96, help="training image size (square)")
    ap.add_argument("--coils", type=int, nargs=2, default=(4, 16), metavar=("MIN", "MAX"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--optimizer", default="adam", choices=("adam", "radam"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/xpdnet"))
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    ap.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"where to write the trained weights (default OUT_DIR/{SHIPPED_NAME}.safetensors)",
    )
    ap.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    from pipelines.compute import select_device
    from pipelines.recon.training import TrainConfig, train

    args = _parser().parse_args(argv)
    if args.matrix % 4:
        raise ValueError(f"--matrix must be a multiple of 4 (MWCNN pooling), got {args.matrix}")
    cfg = XPDNetConfig(
        n_iter=args.n_iter,
        n_primal=args.n_primal,
        size=args.size,
        refine_smaps=not args.no_refine_smaps,
        checkpoint=args.grad_checkpoint,
    )
    torch.manual_seed(args.seed)
    model = XPDNet(cfg)
    tcfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        out_dir=args.out_dir,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        threads=args.threads,
        resume=args.resume,
        progress=not args.no_progress,
    )
    device = select_device(args.device)
    t0 = time.time()
    result = train(model, make_sampler(args.matrix, tuple(args.coils)), run_model, validation_set(args.matrix), tcfg)
    weights = args.weights or args.out_dir / f"{SHIPPED_NAME}.safetensors"
    command = "recon-node train xpdnet " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    meta: dict[str, Any] = {
        "training": {
            "command": command,
            "seed": args.seed,
            "steps": result.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": args.optimizer,
            "matrix": args.matrix,
            "coils": list(args.coils),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1),
            "val_psnr_db": round(result.val_psnr, 3),
            "val_ssim": round(result.val_ssim, 4),
            "data": "pipelines.sim.anatomy random brain/thigh phantoms, R 4/8 equidistant+random masks",
        },
    }
    save_xpdnet(model.cpu(), weights, meta, half=not args.fp32)
    print(
        f"weights: {weights} ({weights.stat().st_size / 1e6:.1f} MB); validation PSNR {result.val_psnr:.2f} dB, "
        f"SSIM {result.val_ssim:.4f}; {dataclasses.asdict(cfg)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
