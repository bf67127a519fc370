"""``recon-node train ncpdnet``: train NC-PDNet on simulated non-Cartesian data (anatomical or MRF subspace).

Anatomical tasks (``radial``, ``spiral``, ``mixed``): random brain / thigh images (:mod:`pipelines.sim.anatomy`)
with random birdcage coils and noise, sampled on one fixed undersampled trajectory per kind (as the reference
trains one network per trajectory); the loss is the fastMRI ``0.98 (1 - SSIM) + 0.02 L1`` on |buf[0]|.

MRF task (``mrf``): randomised brain / thigh phantoms through the FISP schedule (``fingerprint_images``), one spiral
interleaf per frame as the ``mrf`` pipeline acquires it, random coils and noise. The target is the true coefficient
images ``c = V^T x`` (ground-truth fingerprints projected on the dictionary's rank-K basis V). The k-space is
simulated through the subspace operator with a higher rank (``--sim-rank``, default 24: the fingerprints keep
well over 99.9 % of their energy there), so the network also sees the signal outside the K-dimensional subspace
that real data carry, at a cost of 24 instead of 1000 NUFFTs per coil. Loss: L1 on the real and imaginary parts
of the K coefficient images, relative to the target's largest value. Why L1 on coefficients: dictionary matching
uses the direction of each voxel's coefficient vector, so every coefficient matters in proportion to its
(complex) error, not through a perceptual image metric; SSIM on magnitudes would discard the phase that carries
T1/T2 information across coefficients, and L1 is less dominated by the few bright CSF voxels than L2.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.compute import select_device, set_threads
from pipelines.recon.coil_maps import lowres_maps
from pipelines.recon.dcf import pipe_menon_dcf
from pipelines.recon.ncpdnet import NCPDNet, NCPDNetConfig, save_ncpdnet, with_maps
from pipelines.recon.operators import NonCartesianSense, SenseChannels, SubspaceChannels
from pipelines.recon.subspace import NonCartesianSubspace, union_dcf
from pipelines.recon.training import TrainConfig, ssim_l1_loss, train
from pipelines.sim.anatomy import heldout_image, random_coil_maps, random_image
from pipelines.sim.trajectories import mrf_spiral_trajectory, radial_trajectory, spiral_full
from pipelines.weights_io import load_weights

TASKS = ("radial", "spiral", "mixed", "mrf")
SPIRAL_INTERLEAVES = 24  # the simulator's fully sampled (centre) variable-density spiral
MRF_INTERLEAVES = 24


# ---- trajectories (shared with the benchmark and tests) -------------------------------------------------------
def anatomical_trajectory(kind: str, matrix: int, spokes: int | None = None, arms: int | None = None) -> np.ndarray:
    """k [M, 2] cycles/FOV: ``radial``: golden-angle spokes of 2N samples (default N/4 spokes: 64 at 256^2,
    32 at 128^2, R ~ 6 against pi/2 N); ``spiral``: every third arm of the simulator's 24-arm variable-density
    spiral (default 8 arms: R = 3 at the centre, 12 at the edge)."""
    if kind == "radial":
        return radial_trajectory(spokes or max(matrix // 4, 1), 2 * matrix, matrix).reshape(-1, 2)
    if kind == "spiral":
        n = arms or SPIRAL_INTERLEAVES // 3
        full = spiral_full(matrix, SPIRAL_INTERLEAVES)
        step = max(SPIRAL_INTERLEAVES // n, 1)
        return full[::step][:n].reshape(-1, 2)
    raise ValueError(f"anatomical trajectory must be radial or spiral, not {kind!r}")


def sense_operator(
    k: np.ndarray, maps: np.ndarray | torch.Tensor, device: torch.device | str = "cpu", toeplitz: bool = True
) -> SenseChannels:
    """NC-PDNet's one-channel operator with the Pipe-Menon DCF of ``k`` (computed once, no gradient)."""
    shape = tuple(np.asarray(maps.shape[-2:]).tolist())
    dcf = pipe_menon_dcf(k, shape)
    return SenseChannels(NonCartesianSense(maps, k, dcf, toeplitz=toeplitz, device=device))


def _with_sense_maps(op: SenseChannels, maps: torch.Tensor) -> SenseChannels:
    inner = copy.copy(op.op)
    inner.maps = maps.to(inner.device, torch.complex64)
    return SenseChannels(inner)


def add_noise(y: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Complex Gaussian noise with E|n|^2 = sigma^2 (sigma [B] per example)."""
    s = (sigma / np.sqrt(2)).reshape(-1, *([1] * (y.ndim - 1))).to(y.device)
    n = torch.complex(torch.randn(y.shape, generator=gen), torch.randn(y.shape, generator=gen)).to(y.device)
    return y + s * n


# ---- anatomical data ----------------------------------------------------------------------------------------------
@dataclass
class AnatomyBatch:
    op: SenseChannels
    y: torch.Tensor  # [B, C, M]
    target: torch.Tensor  # [B, ny, nx] complex


class AnatomySampler:
    """Random image x coil maps x noise on the fixed trajectory of each kind."""

    def __init__(
        self, kinds: tuple[str, ...], matrix: int, coils: int, snr: tuple[float, float], device: torch.device
    ) -> None:
        self.matrix, self.coils, self.snr, self.device = matrix, coils, snr, device
        ones = np.ones((coils, matrix, matrix), np.complex64) / np.sqrt(coils)
        self.k = {kind: anatomical_trajectory(kind, matrix) for kind in kinds}
        self.ops = {kind: sense_operator(self.k[kind], ones, device) for kind in kinds}
        self.kinds = kinds

    def make(self, kind: str, images: np.ndarray, maps: np.ndarray, snr: np.ndarray, seed: int) -> AnatomyBatch:
        """Data of ``images`` through the true ``maps``; the network's operator gets the maps a site would have:
        the low-resolution ones estimated from the data (as the ``noncartesian_recon`` pipeline)."""
        x = torch.from_numpy(images).to(self.device)
        with torch.no_grad():
            y = _with_sense_maps(self.ops[kind], torch.from_numpy(maps)).forward(x[:, None])
            # The simulator's convention: noise std = mean |x| in the object / SNR, per coil.
            obj = torch.stack([xi.abs()[xi.abs() > 1e-3 * xi.abs().max()].mean() for xi in x])
            y = add_noise(y, obj / torch.as_tensor(snr, dtype=torch.float32), torch.Generator().manual_seed(seed))
        dcf = self.ops[kind].op.dcf.cpu().numpy()
        est = np.stack([lowres_maps(yi, self.k[kind], (self.matrix, self.matrix), dcf) for yi in y.cpu().numpy()])
        return AnatomyBatch(_with_sense_maps(self.ops[kind], torch.from_numpy(est)), y, x)

    def __call__(self, rng: np.random.Generator, batch_size: int) -> AnatomyBatch:
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        images = np.stack([random_image(rng, self.matrix) for _ in range(batch_size)])
        maps = np.stack([random_coil_maps(rng, self.matrix, self.coils) for _ in range(batch_size)])
        snr = rng.uniform(*self.snr, size=batch_size)
        return self.make(kind, images, maps, snr, int(rng.integers(2**31)))

    def heldout(self, kind: str, n: int, snr: float = 30.0, first: int = 0) -> list[AnatomyBatch]:
        """Held-out examples (phantom seeds training never draws), one per batch, fixed coils and noise."""
        out = []
        for i in range(first, first + n):
            rng = np.random.default_rng(10_000 + i)
            maps = random_coil_maps(rng, self.matrix, self.coils)[None]
            out.append(self.make(kind, heldout_image(i, self.matrix)[None], maps, np.array([snr]), 20_000 + i))
        return out


def run_anatomy(model: NCPDNet, batch: AnatomyBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch.op, batch.y.to(device))[:, 0].abs(), batch.target.to(device).abs()


# ---- MRF data -----------------------------------------------------------------------------------------------------
def mrf_slice_operator(
    k: np.ndarray,
    frame: np.ndarray,
    maps: np.ndarray | torch.Tensor,
    basis: torch.Tensor,
    device: torch.device | str = "cpu",
) -> NonCartesianSubspace:
    """The ``mrf`` pipeline's density-compensated subspace operator (same DCF: Pipe-Menon on the distinct
    positions of the union of all frames, shared among the samples that repeat a position)."""
    ny, nx = (int(n) for n in maps.shape[-2:])
    return NonCartesianSubspace(maps, k, frame, basis, dcf=union_dcf(k, (ny, nx)), device=device)


def mrf_spiral_samples(n_frames: int, matrix: int) -> tuple[np.ndarray, np.ndarray]:
    """k [M, 2] and the frame of each sample for one spiral interleaf per frame (the simulator's default)."""
    traj = mrf_spiral_trajectory(n_frames, matrix, n_interleaves=MRF_INTERLEAVES).astype(np.float32)
    n_s = traj.shape[2]
    return traj.reshape(-1, 2), np.repeat(np.arange(n_frames), n_s)


@dataclass
class MRFBatch:
    op: SubspaceChannels
    y: torch.Tensor  # [B, C, M]
    target: torch.Tensor  # [B, K, ny, nx] complex


class MRFSampler:
    """Random phantom (from a pool of randomised brain / thigh fingerprint images) x flips x coils x noise."""

    def __init__(
        self,
        fingerprints: list[np.ndarray],
        basis_sim: torch.Tensor,
        rank: int,
        matrix: int,
        coils: int,
        snr: tuple[float, float],
        device: torch.device,
    ) -> None:
        self.rank, self.matrix, self.coils, self.snr, self.device = rank, matrix, coils, snr, device
        n_frames = basis_sim.shape[0]
        k, frame = mrf_spiral_samples(n_frames, matrix)
        ones = np.ones((coils, matrix, matrix), np.complex64) / np.sqrt(coils)
        self.sim_op = NonCartesianSubspace(ones, k, frame, basis_sim, device=device)  # forward only
        self.op = mrf_slice_operator(k, frame, ones, basis_sim[:, :rank], device)
        assert self.op.dcf is not None  # mrf_slice_operator always gives the operator its union DCF
        self.k, self.dcf = k, self.op.dcf.cpu().numpy()
        self.op.kernels()
        v = basis_sim.cpu().numpy()
        # Coefficients of every pool fingerprint image on the simulation basis: c = V^T x.
        self.coefs = [np.einsum("tyx,tk->kyx", fp, v).astype(np.complex64) for fp in fingerprints]
        self.signal = [float(np.abs(fp).mean(axis=0)[np.abs(fp).mean(axis=0) > 0].mean()) for fp in fingerprints]

    def make(
        self, index: int, flip: int, maps: np.ndarray, snr: float, seed: int
    ) -> tuple[NonCartesianSubspace, torch.Tensor, torch.Tensor]:
        c = self.coefs[index]
        c = np.rot90(c, k=flip % 4, axes=(-2, -1))
        if flip >= 4:
            c = c[..., ::-1]
        c = torch.from_numpy(np.ascontiguousarray(c)).to(self.device)
        m = torch.from_numpy(maps).to(self.device)
        with torch.no_grad():
            sim = copy.copy(self.sim_op)
            sim.maps = m
            y = sim.forward(c)[None]
            y = add_noise(y, torch.tensor([self.signal[index] / snr]), torch.Generator().manual_seed(seed))[0]
        # The operator gets the maps the mrf pipeline estimates from the data (low resolution, RSS-normalised);
        # the target is then the true coefficients seen through them: c * sum_coils conj(S_est) S_true, which
        # carries the phase and shading those maps leave in any SENSE reconstruction (matching ignores both).
        est = torch.from_numpy(lowres_maps(y.cpu().numpy(), self.k, (self.matrix, self.matrix), self.dcf))
        est = est.to(self.device)
        seen = (est.conj() * m).sum(dim=0)
        return with_maps(self.op, est), y, c[: self.rank] * seen

    def __call__(self, rng: np.random.Generator, batch_size: int) -> MRFBatch:
        items = [
            self.make(
                int(rng.integers(len(self.coefs))),
                int(rng.integers(8)),
                random_coil_maps(rng, self.matrix, self.coils),
                float(rng.uniform(*self.snr)),
                int(rng.integers(2**31)),
            )
            for _ in range(batch_size)
        ]
        return MRFBatch(
            SubspaceChannels([i[0] for i in items]),
            torch.stack([i[1] for i in items]),
            torch.stack([i[2] for i in items]),
        )


def _stack_channels(c: torch.Tensor) -> torch.Tensor:
    """[B, K, ny, nx] complex -> [B, 2K ny, nx] real: one "image" per example for the loop's PSNR / SSIM."""
    b, k, ny, nx = c.shape
    return torch.cat([c.real, c.imag], dim=1).reshape(b, 2 * k * ny, nx)


def run_mrf(model: NCPDNet, batch: MRFBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _stack_channels(model(batch.op, batch.y.to(device))), _stack_channels(batch.target.to(device))


def coefficient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over real and imaginary parts, relative to each example's largest target value."""
    scale = target.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return ((pred - target).abs() / scale).mean()


def coefficient_direction_loss(rank: int) -> Any:
    """``coefficient_l1`` plus the mean per-voxel relative error ||c_pred - c|| / ||c|| over the object.

    Matching reads T1/T2 from each voxel's coefficient *direction*, and the higher coefficients that carry it are
    an order of magnitude below the first: a loss relative to the image maximum barely sees them, and under it
    the network learned to reproduce c_0 and left grey matter and CSF fingerprints wrong (GM T1 35 %, CSF 74 %).
    The relative term weighs every object voxel (PD above 10 % of the maximum) the same, dim CSF as much as WM.
    """

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, rows, nx = target.shape
        p = pred.reshape(b, 2 * rank, rows // (2 * rank), nx)
        t = target.reshape(b, 2 * rank, rows // (2 * rank), nx)
        err = torch.linalg.vector_norm(p - t, dim=1)
        norm = torch.linalg.vector_norm(t, dim=1)
        inside = norm > 0.1 * norm.flatten(1).amax(dim=1)[:, None, None]
        return coefficient_l1(pred, target) + (err / norm.clamp_min(1e-12))[inside].mean()

    return loss


def mrf_fingerprint_pool(seq: Any, n: int, matrix: int, seed: int, log: Any = print) -> list[np.ndarray]:
    """``n`` randomised phantoms (brain and thigh alternately; seeds from the training range) through ``seq``."""
    from pipelines.sim.acquisition import fingerprint_images
    from pipelines.sim.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    pool = []
    t0 = time.perf_counter()
    for i in range(n):
        ph = make_phantom(
            ("brain", "thigh")[i % 2], matrix, field_strength_T=3.0, seed=int(rng.integers(0, 2**31)), randomize=True
        )
        pool.append(fingerprint_images(ph, seq))
        log(f"MRF training phantom {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)")
    return pool


def mrf_basis(seq: Any, cache_dir: str | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``mrf`` pipeline's dictionary basis for ``seq`` at 3 T (complex, all stored columns)."""
    from pipelines.mapping.dictionary import build_dictionary
    from pipelines.mapping.maps import default_spec, resolve_model

    model = resolve_model(seq, "auto")
    d = build_dictionary(
        seq,
        default_spec(seq, model, 3.0, complex_data=True),
        device="cpu",
        cache_dir=Path(cache_dir) if cache_dir else None,
    )
    return d.complex.basis.to(device)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="recon-node train ncpdnet", description="Train NC-PDNet on simulated radial / spiral or MRF subspace data."
    )
    ap.add_argument(
        "--task",
        choices=TASKS,
        default="mixed",
        help="radial, spiral, mixed (radial and spiral batches) or mrf (subspace coefficients)",
    )
    ap.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    ap.add_argument("--run-dir", type=Path, default=None, help="checkpoints and logs (default: next to --out)")
    ap.add_argument("--matrix", type=int, default=None, help="image size (default 128 anatomical, 64 MRF)")
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--snr", type=float, nargs=2, default=(15.0, 60.0), metavar=("LO", "HI"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", choices=("adam", "radam"), default="adam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val", type=int, default=4, help="held-out validation examples")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--n-iter", type=int, default=10)
    ap.add_argument("--n-primal", type=int, default=5)
    ap.add_argument("--n-filters", type=int, default=32)
    ap.add_argument("--explicit", action="store_true", help="residual by the NUFFT pair instead of Toeplitz")
    ap.add_argument("--rank", type=int, default=8, help="MRF: subspace rank K (network channels)")
    ap.add_argument("--sim-rank", type=int, default=24, help="MRF: rank of the basis the k-space is simulated with")
    ap.add_argument("--pool", type=int, default=24, help="MRF: randomised phantoms simulated before training")
    ap.add_argument("--cache", default=None, help="MRF: dictionary cache folder")
    ap.add_argument("--half", action="store_true", help="store the weights in fp16")
    ap.add_argument(
        "--loss",
        choices=("l1", "direction"),
        default="direction",
        help="MRF loss: l1 (coefficients relative to the maximum) or direction (l1 plus the per-voxel "
        "relative coefficient error that matching depends on)",
    )
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (same architecture)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    if args.threads:
        set_threads(args.threads)
    run_dir = args.run_dir or args.out.with_suffix("").with_name(args.out.stem + "_run")
    mrf = args.task == "mrf"
    matrix = args.matrix or (64 if mrf else 128)
    torch.manual_seed(args.seed)
    meta: dict[str, Any] = {
        "task": args.task,
        "matrix": matrix,
        "coils": args.coils,
        "snr": list(args.snr),
        "seed": args.seed,
        "argv": list(argv) if argv is not None else None,
    }
    sampler: MRFSampler | AnatomySampler
    val: list[MRFBatch | AnatomyBatch]
    run: Callable[[NCPDNet, Any, torch.device], tuple[torch.Tensor, torch.Tensor]]
    if mrf:
        from pipelines.physics.sequences import fisp_sequence

        seq = fisp_sequence()
        basis = mrf_basis(seq, args.cache)
        sim_rank = min(args.sim_rank, basis.shape[1])
        if not 1 <= args.rank <= sim_rank:
            raise ValueError(f"--rank {args.rank} must be between 1 and the simulation rank {sim_rank}")
        pool = mrf_fingerprint_pool(seq, args.pool + args.val, matrix, args.seed)
        val_sampler = MRFSampler(
            pool[args.pool :], basis[:, :sim_rank], args.rank, matrix, args.coils, args.snr, device
        )
        sampler = MRFSampler(pool[: args.pool], basis[:, :sim_rank], args.rank, matrix, args.coils, args.snr, device)
        vrng = np.random.default_rng(10_000)
        val = []
        for i in range(args.val):
            op, y, c = val_sampler.make(i, 0, random_coil_maps(vrng, matrix, args.coils), 30.0, 20_000 + i)
            val.append(MRFBatch(SubspaceChannels([op]), y[None], c[None]))
        run, loss = run_mrf, (coefficient_direction_loss(args.rank) if args.loss == "direction" else coefficient_l1)
        n_ch = args.rank
        basis_out = basis[:, : args.rank].cpu()
        meta.update(
            {
                "sequence": seq.name,
                "n_frames": seq.n_frames,
                "rank": args.rank,
                "sim_rank": sim_rank,
                "pool": args.pool,
                "trajectory": f"spiral, one of {MRF_INTERLEAVES} interleaves per frame",
                "loss": "L1 on coefficient real/imag parts, relative to the target max"
                + (" + mean per-voxel relative coefficient error in the object" if args.loss == "direction" else ""),
            }
        )
    else:
        kinds = ("radial", "spiral") if args.task == "mixed" else (args.task,)
        sampler = AnatomySampler(kinds, matrix, args.coils, tuple(args.snr), device)
        per = max(args.val // len(kinds), 1)
        val = [b for j, kind in enumerate(kinds) for b in sampler.heldout(kind, per, first=j * per)]
        run, loss = run_anatomy, ssim_l1_loss
        n_ch = 1
        basis_out = None
        meta.update(
            {
                "kinds": list(kinds),
                "loss": "0.98 (1 - SSIM) + 0.02 L1 on |buf[0]|",
                "trajectories": {kind: {"points": int(sampler.ops[kind].op.nufft.n_points)} for kind in kinds},
            }
        )
    model = NCPDNet(
        NCPDNetConfig(
            n_channels=n_ch,
            n_iter=args.n_iter,
            n_primal=args.n_primal,
            n_filters=args.n_filters,
            toeplitz=not args.explicit,
        )
    )
    if args.init is not None:
        tensors, _ = load_weights(args.init)
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("basis_")})
        meta["init"] = str(args.init)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        out_dir=run_dir,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        device=str(device),
        threads=args.threads,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(
        f"NC-PDNet ({args.task}): {model.n_parameters()} parameters, {matrix}x{matrix}, {args.coils} coils, "
        f"device {device}",
        flush=True,
    )
    result = train(model, sampler, run, val, cfg, loss_fn=loss)
    meta.update(
        {
            "steps": result.steps,
            "val_psnr": result.val_psnr,
            "val_ssim": result.val_ssim,
            "train_seconds": round(result.seconds, 1),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "train_config": json.loads(json.dumps(asdict(cfg), default=str)),
        }
    )
    model.cpu()
    # The MRF basis travels with the network: coefficients only mean something in their own basis.
    path = save_ncpdnet(model, args.out, meta, half=args.half, basis=basis_out)
    print(
        f"wrote {path}: validation PSNR {result.val_psnr:.2f} dB, SSIM {result.val_ssim:.4f}, {result.seconds:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
