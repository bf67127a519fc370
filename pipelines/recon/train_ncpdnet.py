"""``recon-node train ncpdnet``: train NC-PDNet on simulated non-Cartesian data (anatomical or MRF subspace).

Anatomical tasks (``radial``, ``spiral``, ``mixed``): random brain / thigh images (:mod:`pipelines.sim.anatomy`)
with random birdcage coils and noise, sampled on one fixed undersampled trajectory per kind (as the reference
trains one network per trajectory); the loss is the fastMRI ``0.98 (1 - SSIM) + 0.02 L1`` on |buf[0]|.

MRF task (``mrf``): randomised brain phantoms (with white-matter lesions of ``--lesions`` voxels) and thighs drawn
``--oversample`` times finer than the training matrix, through the FISP schedule (``fingerprint_images``); their
k-space is sampled at the positions of one spiral interleaf per frame, as the ``mrf`` pipeline acquires it
(band-limited data with partial volume at every edge, as the held-out evaluation's
:func:`pipelines.sim.bandlimited.simulate_bandlimited`), through each phantom's own rank-``--sim-rank`` temporal
basis (its fat and CSF included: the network sees the signal outside its own subspace that real data carry, at
24 instead of 1000 NUFFTs per coil). The network's basis is the pipeline's default: the dictionary's rank-K basis
plus ``--fat-directions`` fat directions. The target is each voxel's mean fine-pixel fingerprint on that basis.
Loss: L1 on the real and imaginary parts of the coefficient images, relative to the target's largest value, plus
(``--loss direction``) the per-voxel relative coefficient error. Why L1 on coefficients: dictionary matching uses
the direction of each voxel's coefficient vector, so every coefficient matters in proportion to its (complex)
error, not through a perceptual image metric; SSIM on magnitudes would discard the phase that carries T1/T2
information across coefficients, and L1 is less dominated by the few bright CSF voxels than L2.

On a GPU (``--device cuda --workers N``), CPU processes simulate the examples (each with its ``A^H D y``, so the
GPU needs no NUFFT) while the network trains on batches from a buffer of the latest ones, with the batched
Toeplitz normal operator; ``--time-limit`` bounds the whole run (a lease) and ``--schedule cosine`` decays the
learning rate over it. ``benchmarks/gpu_train_ncpdnet.sh`` is the lease's script.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.compute import select_device, set_threads
from pipelines.recon.coil_maps import lowres_maps
from pipelines.recon.dcf import pipe_menon_dcf
from pipelines.recon.fat_subspace import with_fat_directions
from pipelines.recon.ncpdnet import NCPDNet, NCPDNetConfig, save_ncpdnet, with_maps
from pipelines.recon.operators import NonCartesianSense, SenseChannels, SubspaceChannels
from pipelines.recon.subspace import NonCartesianSubspace, union_dcf
from pipelines.recon.training import TrainConfig, TrainResult, ssim_l1_loss, train
from pipelines.sim.anatomy import heldout_image, random_coil_maps, random_image
from pipelines.sim.bandlimited import fine_to_coarse, voxel_means
from pipelines.sim.coils import birdcage_maps
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
    y: torch.Tensor | None  # [B, C, M]; None where the examples carry their adjoint
    target: torch.Tensor  # [B, K, ny, nx] complex
    rhs: torch.Tensor | None = None  # [B, K, ny, nx] A^H D y, made with the data (by CPU workers)


@dataclass
class MRFExample:
    """One pool phantom, kept as coefficients (its 1000-frame fingerprints would be 131 MB at 2 x 64^2)."""

    sim: np.ndarray  # [Ks, f n, f n] the object drawn f times finer, on its own basis
    basis: np.ndarray  # [T, Ks] that basis: the leading temporal singular vectors of its fine fingerprints
    target: np.ndarray  # [K, n, n] the f x f means of the fine fingerprints on the network's basis
    signal: float  # mean |fingerprint| in the object: the simulator's SNR convention
    outside: float  # fraction of the fine fingerprints' norm outside that basis (logged)


@dataclass(frozen=True)
class MRFDraw:
    """The random choices of one training example, drawn by the trainer (so a run is reproducible however many
    worker processes turn them into data)."""

    index: int  # pool phantom
    flip: int  # 0-7: rotation by 90 degrees x mirror
    coil_radius: float
    coil_seed: int
    snr: float
    noise_seed: int


def _coil_pair(rng: np.random.Generator, matrix: int, oversample: int, coils: int) -> tuple[np.ndarray, np.ndarray]:
    """The same random birdcage sensitivities (RSS-normalised) on the fine and the reconstruction grid."""
    return coil_pair(float(rng.uniform(1.2, 2.0)), int(rng.integers(0, 2**31)), matrix, oversample, coils)


def coil_pair(radius: float, seed: int, matrix: int, oversample: int, coils: int) -> tuple[np.ndarray, np.ndarray]:
    """Birdcage maps of ``radius`` and ``seed`` on the fine [C, f n, f n] and the reconstruction [C, n, n] grid."""
    out = []
    for n in (matrix * oversample, matrix):
        m = birdcage_maps(coils, (n, n), radius=radius, seed=seed)
        out.append((m / np.maximum(np.sqrt((np.abs(m) ** 2).sum(axis=0, keepdims=True)), 1e-12)).astype(np.complex64))
    return out[0], out[1]


def mrf_batch(
    template: NonCartesianSubspace, items: Sequence[tuple[np.ndarray | torch.Tensor, ...]], device: torch.device
) -> MRFBatch:
    """Examples (estimated maps, A^H D y, target) as one batch over copies of ``template`` (shared kernels)."""
    maps, rhs, target = (torch.stack([torch.as_tensor(i[j]) for i in items]).to(device) for j in range(3))
    return MRFBatch(SubspaceChannels([with_maps(template, m) for m in maps]), None, target, rhs)


class MRFSampler:
    """Random pool phantom x flips x coils x noise, one spiral interleaf per frame.

    The k-space is the NUFFT of the phantom drawn ``oversample`` times finer (band-limited, partial volume at
    edges, as :func:`pipelines.sim.bandlimited.simulate_bandlimited`), through each phantom's own rank-Ks basis
    (which holds its fat and CSF, all but ~0.1 % of the norm): the network sees the out-of-subspace signal real
    data carry, and the maps the ``mrf`` pipeline would estimate from those data."""

    def __init__(
        self,
        pool: list[MRFExample],
        basis_net: torch.Tensor,
        matrix: int,
        oversample: int,
        coils: int,
        snr: tuple[float, float],
        device: torch.device,
    ) -> None:
        self.pool, self.matrix, self.oversample = pool, matrix, oversample
        self.coils, self.snr, self.device = coils, snr, device
        n_frames = basis_net.shape[0]
        k, frame = mrf_spiral_samples(n_frames, matrix)
        self.frame = torch.as_tensor(frame, device=device)
        fine = matrix * oversample
        ones_f = np.ones((coils, fine, fine), np.complex64) / np.sqrt(coils)
        ones = np.ones((coils, matrix, matrix), np.complex64) / np.sqrt(coils)
        rank_sim = pool[0].basis.shape[1] if pool else 1
        eye = torch.eye(n_frames, rank_sim, dtype=torch.complex64)
        self.sim_op = NonCartesianSubspace(ones_f, k, frame, eye, device=device)  # forward only, basis per phantom
        self.factor = torch.from_numpy(fine_to_coarse(k, matrix, oversample)).to(device)
        self.op = mrf_slice_operator(k, frame, ones, basis_net, device)
        assert self.op.dcf is not None  # mrf_slice_operator always gives the operator its union DCF
        self.k, self.dcf = k, self.op.dcf.cpu().numpy()
        self.op.kernels()

    def make(
        self, index: int, flip: int, maps: tuple[np.ndarray, np.ndarray], snr: float, seed: int
    ) -> tuple[NonCartesianSubspace, torch.Tensor, torch.Tensor]:
        ex = self.pool[index]

        def oriented(a: np.ndarray) -> torch.Tensor:
            a = np.rot90(a, k=flip % 4, axes=(-2, -1))
            a = a[..., ::-1] if flip >= 4 else a
            return torch.from_numpy(np.array(a)).to(self.device)  # a copy: pool arrays may be read-only maps

        c_sim, target = oriented(ex.sim), oriented(ex.target)
        m_fine, m = (torch.from_numpy(x).to(self.device) for x in maps)
        with torch.no_grad():
            sim = copy.copy(self.sim_op)
            sim.maps = m_fine
            sim.basis = torch.from_numpy(np.array(ex.basis)).to(self.device)
            sim.phi = sim.basis[self.frame]
            y = (sim.forward(c_sim) * self.factor)[None]
            y = add_noise(y, torch.tensor([ex.signal / snr]), torch.Generator().manual_seed(seed))[0]
        # The operator gets the maps the mrf pipeline estimates from the data (low resolution, RSS-normalised);
        # the target is then the true coefficients seen through them: c * sum_coils conj(S_est) S_true, which
        # carries the phase and shading those maps leave in any SENSE reconstruction (matching ignores both).
        est = torch.from_numpy(lowres_maps(y.cpu().numpy(), self.k, (self.matrix, self.matrix), self.dcf))
        est = est.to(self.device)
        seen = (est.conj() * m).sum(dim=0)
        return with_maps(self.op, est), y, target * seen

    def draw(self, rng: np.random.Generator) -> MRFDraw:
        return MRFDraw(
            int(rng.integers(len(self.pool))),
            int(rng.integers(8)),
            float(rng.uniform(1.2, 2.0)),
            int(rng.integers(0, 2**31)),
            float(rng.uniform(*self.snr)),
            int(rng.integers(2**31)),
        )

    def example(self, d: MRFDraw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimated maps [C, n, n], A^H D y [K, n, n], target [K, n, n]) of one draw, as complex64 arrays: all
        the network's training step needs, so the NUFFTs stay where the example is made."""
        maps = coil_pair(d.coil_radius, d.coil_seed, self.matrix, self.oversample, self.coils)
        op, y, target = self.make(d.index, d.flip, maps, d.snr, d.noise_seed)
        with torch.no_grad():
            rhs = op.adjoint(y, dcf=True)
        return tuple(t.cpu().numpy() for t in (op.maps, rhs, target))  # type: ignore[return-value]

    def __call__(self, rng: np.random.Generator, batch_size: int) -> MRFBatch:
        return mrf_batch(self.op, [self.example(self.draw(rng)) for _ in range(batch_size)], self.device)


# ---- data made by CPU worker processes, for a GPU that trains faster than one CPU simulates ----------------------
_WORKER_SAMPLER: MRFSampler | None = None


def _worker_init(pool_file: str, basis_net: np.ndarray, matrix: int, oversample: int, coils: int) -> None:
    global _WORKER_SAMPLER
    set_threads(1)  # one core per worker: FINUFFT and torch follow torch's thread count
    pool = load_pool(Path(pool_file))
    _WORKER_SAMPLER = MRFSampler(
        pool, torch.from_numpy(basis_net), matrix, oversample, coils, (30.0, 30.0), torch.device("cpu")
    )


def _worker_example(d: MRFDraw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _WORKER_SAMPLER is not None  # set by _worker_init in every worker
    return _WORKER_SAMPLER.example(d)


class BufferedMRFSampler:
    """MRF examples made by ``workers`` CPU processes while the network trains on the GPU.

    One example costs ~0.7 s of one core (simulation at twice the matrix, coil maps, A^H D y); a GPU step of a
    batch of 8 costs a few tens of ms. Each step therefore draws its batch from a buffer of the ``capacity``
    latest examples, which the workers keep refreshing: the GPU never waits, and each example is seen about
    (steps x batch) / made times (logged at the end). Workers are spawned (not forked: the parent holds CUDA and
    OpenMP threads) and read the pool from the run directory's memory-mapped file.
    """

    def __init__(
        self,
        draws: MRFSampler,
        pool_file: Path,
        basis_net: torch.Tensor,
        template: NonCartesianSubspace,
        workers: int,
        capacity: int,
        seed: int,
        device: torch.device,
    ) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.draws, self.template, self.capacity, self.device = draws, template, capacity, device
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(str(pool_file), basis_net.cpu().numpy(), draws.matrix, draws.oversample, draws.coils),
        )
        self.rng = np.random.default_rng(seed + 1)  # the draws: independent of the batch choice
        self.pending: list[Any] = [
            self.executor.submit(_worker_example, draws.draw(self.rng)) for _ in range(3 * workers)
        ]
        self.buffer: list[tuple[torch.Tensor, ...]] = []
        self.made = 0

    def _harvest(self, need: int) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        while True:
            done = [f for f in self.pending if f.done()]
            if not done and len(self.buffer) >= need:
                return
            if not done:
                wait(self.pending, return_when=FIRST_COMPLETED)
                continue
            for f in done:
                self.pending.remove(f)
                self.pending.append(self.executor.submit(_worker_example, self.draws.draw(self.rng)))
                item = tuple(torch.from_numpy(a).to(self.device) for a in f.result())
                if len(self.buffer) < self.capacity:
                    self.buffer.append(item)
                else:
                    self.buffer[self.made % self.capacity] = item
                self.made += 1

    def __call__(self, rng: np.random.Generator, batch_size: int) -> MRFBatch:
        self._harvest(batch_size)
        pick = rng.choice(len(self.buffer), size=batch_size, replace=len(self.buffer) < batch_size)
        return mrf_batch(self.template, [self.buffer[int(i)] for i in pick], self.device)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def save_pool(pool: list[MRFExample], folder: Path) -> Path:
    """The pool as stacked ``.npy`` files in ``folder`` (workers memory-map them; a resumed run reuses them)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "sim": np.stack([e.sim for e in pool]),
        "basis": np.stack([e.basis for e in pool]),
        "target": np.stack([e.target for e in pool]),
        "scalars": np.array([[e.signal, e.outside] for e in pool]),
    }
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)
    return folder


def load_pool(folder: Path) -> list[MRFExample]:
    sim, basis, target, scalars = (
        np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("sim", "basis", "target", "scalars")
    )
    return [
        MRFExample(sim[i], basis[i], target[i], float(scalars[i, 0]), float(scalars[i, 1])) for i in range(sim.shape[0])
    ]


def _stack_channels(c: torch.Tensor) -> torch.Tensor:
    """[B, K, ny, nx] complex -> [B, 2K ny, nx] real: one "image" per example for the loop's PSNR / SSIM."""
    b, k, ny, nx = c.shape
    return torch.cat([c.real, c.imag], dim=1).reshape(b, 2 * k * ny, nx)


def run_mrf(model: NCPDNet, batch: MRFBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    y = None if batch.y is None else batch.y.to(device)
    rhs = None if batch.rhs is None else batch.rhs.to(device)
    return _stack_channels(model(batch.op, y, rhs)), _stack_channels(batch.target.to(device))


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


def mrf_pool(
    seq: Any,
    n: int,
    matrix: int,
    oversample: int,
    rank_sim: int,
    basis_net: torch.Tensor,
    seed: int,
    lesions: tuple[float, ...] = (),
    log: Any = print,
    device: torch.device | str = "cpu",
) -> list[MRFExample]:
    """``n`` randomised phantoms (two brains, with white-matter lesions of ``lesions`` voxels, to one thigh; seeds
    from the training range) drawn ``oversample`` times finer than ``matrix``, through ``seq``."""
    from pipelines.sim.acquisition import fingerprint_images
    from pipelines.sim.bandlimited import white_matter_lesions
    from pipelines.sim.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    vn = basis_net.to(device, torch.complex64)
    f = oversample
    pool = []
    t0 = time.perf_counter()
    for i in range(n):
        kind = "thigh" if i % 3 == 2 else "brain"
        s = int(rng.integers(0, 2**31))
        spots: list[tuple[float, float, float]] = []
        sizes = sorted(lesions) if kind == "brain" else []
        while sizes and not spots:
            try:
                spots = white_matter_lesions(kind, matrix, s, sizes)
            except ValueError:  # a thin white matter at this matrix: leave out the largest lesion
                sizes = sizes[:-1]
        ph = make_phantom(kind, matrix * f, field_strength_T=3.0, seed=s, randomize=True, lesions=spots)
        # EPG and the SVD on ``device``: on a GPU a phantom takes well under a second instead of ~15 s of one core.
        chunk = 2048 if torch.device(device).type == "cpu" else 16384  # a GPU is launch-bound at small chunks
        fp = torch.from_numpy(fingerprint_images(ph, seq, device=device, chunk=chunk)).to(device)  # [T, f n, f n]
        flat = fp.reshape(fp.shape[0], -1)
        _, vecs = torch.linalg.eigh(flat @ flat.conj().T)  # left singular vectors U, ascending
        vs = vecs[:, -rank_sim:].flip(1).conj().resolve_conj()  # V = conj(U): x = conj(V) c, c = V^T x
        sim = vs.T @ flat  # [Ks, pixels]
        outside = float(
            torch.linalg.vector_norm(flat - vs.conj() @ sim) / torch.linalg.vector_norm(flat).clamp_min(1e-30)
        )
        target = torch.einsum("tyx,tk->kyx", voxel_means(fp, f), vn)  # type: ignore[arg-type]  # torch works too
        mag = fp.abs().mean(dim=0)
        pool.append(
            MRFExample(
                sim.reshape(rank_sim, *fp.shape[1:]).cpu().numpy(),
                vs.cpu().numpy(),
                target.cpu().numpy(),
                float(mag[mag > 0].mean()),
                outside,
            )
        )
        del fp, flat
        log(
            f"MRF training phantom {i + 1}/{n} ({kind}, {len(spots)} lesions, {outside:.5f} of the norm outside its "
            f"rank-{rank_sim} basis; {time.perf_counter() - t0:.0f} s)"
        )
    return pool


def mrf_basis(seq: Any, cache_dir: str | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``mrf`` pipeline's dictionary basis for ``seq`` at 3 T (complex, all stored columns), built on
    ``device`` (a GPU builds it in seconds where no cache holds it)."""
    from pipelines.mapping.dictionary import build_dictionary
    from pipelines.mapping.maps import default_spec, resolve_model

    model = resolve_model(seq, "auto")
    d = build_dictionary(
        seq,
        default_spec(seq, model, 3.0, complex_data=True),
        device=device,
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
    ap.add_argument(
        "--sim-rank", type=int, default=24, help="MRF: rank of each phantom's own basis the k-space is simulated in"
    )
    ap.add_argument(
        "--fat-directions", type=int, default=2, help="MRF: fat directions after the rank-K basis (as the mrf default)"
    )
    ap.add_argument("--oversample", type=int, default=2, help="MRF: phantoms drawn this many times finer")
    ap.add_argument(
        "--lesions",
        type=float,
        nargs="*",
        default=[3.0, 6.0, 10.0, 30.0],
        help="MRF: white-matter lesion areas (voxels) in every training brain",
    )
    ap.add_argument("--pool", type=int, default=24, help="MRF: randomised phantoms simulated before training")
    ap.add_argument("--cache", default=None, help="MRF: dictionary cache folder")
    ap.add_argument(
        "--basis",
        type=Path,
        default=None,
        help="MRF: the dictionary's complex temporal basis as .npy [frames, rank] (mrf_basis), instead of "
        "building or loading the dictionary",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="MRF: CPU processes that simulate examples while the network trains (a GPU run); 0: in the trainer",
    )
    ap.add_argument("--buffer", type=int, default=2000, help="MRF with --workers: examples kept to draw batches from")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="stop training once this many seconds have passed since the trainer started, simulation included "
        "(a GPU lease's budget; 0: none)",
    )
    ap.add_argument("--pool-device", default=None, help="MRF: where the phantom pool is simulated (default: --device)")
    ap.add_argument(
        "--schedule", choices=("constant", "cosine"), default="constant", help="learning rate over steps / time"
    )
    ap.add_argument("--half", action="store_true", help="store the weights in fp16")
    ap.add_argument(
        "--loss",
        choices=("l1", "direction"),
        default="direction",
        help="MRF loss: l1 (coefficients relative to the maximum) or direction (l1 plus the per-voxel "
        "relative coefficient error that matching depends on)",
    )
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (same architecture)")
    ap.add_argument(
        "--export",
        action="store_true",
        help="write --out from the run directory's last checkpoint, without simulating or training (a run stopped "
        "before --steps)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
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
    sampler: MRFSampler | BufferedMRFSampler | AnatomySampler
    val: list[MRFBatch | AnatomyBatch]
    run: Callable[[NCPDNet, Any, torch.device], tuple[torch.Tensor, torch.Tensor]]
    if mrf:
        from pipelines.physics.sequences import fisp_sequence

        seq = fisp_sequence()
        if args.basis is not None:  # a machine without the dictionary cache (a GPU lease) need not rebuild it
            basis = torch.from_numpy(np.load(args.basis)).to(torch.complex64)
        else:
            basis = mrf_basis(seq, args.cache, device).cpu()
        sim_rank = min(args.sim_rank, basis.shape[1])
        if not 1 <= args.rank <= sim_rank:
            raise ValueError(f"--rank {args.rank} must be between 1 and the simulation rank {sim_rank}")
        # The network's basis is the mrf pipeline's default (rank K + fat directions).
        basis_net = with_fat_directions(basis[:, : args.rank], seq, 3.0, args.fat_directions).cpu()
        lesions = tuple(float(a) for a in args.lesions)
        val = []
        pool: list[MRFExample] = []
        if not args.export:
            # The pool is kept in the run directory: a resumed run (or one with --workers) reads it back.
            folders = (run_dir / "pool", run_dir / "pool_val")
            if args.resume and all((f / "sim.npy").is_file() for f in folders):
                train_pool, val_pool = (load_pool(f) for f in folders)
            else:
                pool = mrf_pool(
                    seq,
                    args.pool + args.val,
                    matrix,
                    args.oversample,
                    sim_rank,
                    basis_net,
                    args.seed,
                    lesions,
                    device=select_device(args.pool_device) if args.pool_device else device,
                )
                train_pool, val_pool = pool[: args.pool], pool[args.pool :]
                for part, folder in zip((train_pool, val_pool), folders, strict=True):
                    if part:
                        save_pool(part, folder)
            pool = train_pool + val_pool
            cpu = torch.device("cpu")
            draws = MRFSampler(train_pool, basis_net, matrix, args.oversample, args.coils, tuple(args.snr), cpu)
            template = draws.op.to(device)  # the training step's operator: kernels computed once, on the CPU
            if device.type == "cuda":
                template.full_kernels()  # batched_normal's, built before the per-example copies share them
            if args.workers > 0:
                sampler = BufferedMRFSampler(
                    draws, folders[0], basis_net, template, args.workers, args.buffer, args.seed, device
                )
            else:
                sampler = draws
                draws.op = template  # batches on the training device
            val_sampler = MRFSampler(val_pool, basis_net, matrix, args.oversample, args.coils, (30.0, 30.0), cpu)
            vrng = np.random.default_rng(10_000)
            for i in range(args.val):
                maps = _coil_pair(vrng, matrix, args.oversample, args.coils)
                d = MRFDraw(i, 0, 0.0, 0, 30.0, 20_000 + i)
                op, y, c = val_sampler.make(d.index, d.flip, maps, d.snr, d.noise_seed)
                with torch.no_grad():
                    rhs = op.adjoint(y, dcf=True)
                val.append(mrf_batch(template, [(op.maps, rhs, c)], device))
        n_ch = int(basis_net.shape[1])
        run, loss = run_mrf, (coefficient_direction_loss(n_ch) if args.loss == "direction" else coefficient_l1)
        basis_out = basis_net.cpu()
        meta.update(
            {
                "sequence": seq.name,
                "n_frames": seq.n_frames,
                "rank": n_ch,
                "dictionary_rank": args.rank,
                "fat_directions": args.fat_directions,
                "sim_rank": sim_rank,
                "oversample": args.oversample,
                "lesions_voxels": list(lesions),
                "pool": args.pool,
                **({"pool_outside_sim_basis": [round(e.outside, 5) for e in pool]} if pool else {}),
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
        # The budget is the whole run's: what simulation took is not left for training (at least one second).
        time_limit_s=max(args.time_limit - (time.perf_counter() - started), 1.0) if args.time_limit else 0.0,
        schedule=args.schedule,
    )
    print(
        f"NC-PDNet ({args.task}): {model.n_parameters()} parameters, {matrix}x{matrix}, {args.coils} coils, "
        f"device {device}",
        flush=True,
    )
    if args.export:
        # A run stopped before --steps (CPU time ran out): its last checkpoint becomes the weights file.
        state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        history = list(state["history"])
        last = history[-1] if history else {}
        result = TrainResult(
            int(state["step"]),
            history,
            float(last.get("psnr", float("nan"))),
            float(last.get("ssim", float("nan"))),
            float(last.get("seconds", float("nan"))),
        )
        meta["exported_from"] = f"{run_dir / 'checkpoint.pt'} at step {result.steps}"
    else:
        try:
            result = train(model, sampler, run, val, cfg, loss_fn=loss)
        finally:
            if isinstance(sampler, BufferedMRFSampler):
                sampler.close()
        if isinstance(sampler, BufferedMRFSampler):
            meta["examples_made"] = sampler.made
            print(f"{sampler.made} examples made by {args.workers} workers for {result.steps} steps", flush=True)
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
