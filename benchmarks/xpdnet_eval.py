"""XPDNet against zero-filled, CG-SENSE and BART ``pics -l1`` on held-out simulated slices, R = 4 and 8.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/xpdnet_eval.py [--slices 8] [--matrix 96] [--weights PATH]

Held-out set: ``pipelines.sim.anatomy.heldout_image(i)`` for i < slices (phantom seeds the training sampler
never draws; the training run's validation uses other indices), 8 jittered birdcage coils (RSS-normalised, so
|image| is the truth), complex noise sigma = 2 % of the peak, one mask per slice and R: equidistant (random
phase) for even slices, variable-density random for odd ones, 8 % central calibration lines (as in training).
Ours: ESPIRiT maps (sigpy) then adjoint (zero-filled) and CG-SENSE with the pipeline's defaults. BART
(Debian ``bart``): ``ecalib -m1 -r <calibration lines> -k 4`` then ``pics -l1 -r 0.01`` (as
benchmarks/recon_vs_bart.py, with ecalib sized to the 8 calibration lines). XPDNet: the
shipped weights, maps from its own central k-space + refinement U-net. PSNR / SSIM on magnitudes after a
least-squares scale against the truth (same for every method); seconds per slice include the coil maps, one
slice at a time, 1 CPU thread (XPDNet also on CUDA when a GPU is present).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recon_vs_bart import psnr_ssim, read_cfl, write_cfl  # noqa: E402
from pipelines.recon.classical import adjoint_recon, cg_sense  # noqa: E402
from pipelines.recon.coil_maps import espirit_maps  # noqa: E402
from pipelines.recon.operators import CartesianSense  # noqa: E402
from pipelines.recon.train_xpdnet import MASK_KINDS, simulate_slice  # noqa: E402
from pipelines.recon.xpdnet import load_xpdnet  # noqa: E402
from pipelines.sim.anatomy import heldout_image  # noqa: E402

CALIB_FRACTION = 0.08
BART = "BART ecalib -m1 -k 4 + pics -l1 -r 0.01"


def heldout_set(n_slices: int, matrix: int, r: int, coils: int = 8, noise: float = 0.02,
                seed: int = 2024) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """[(k-space [C, n, n], mask [n, n], truth |x| [n, n])] for held-out images 0 .. n_slices-1 at R = r."""
    rng = np.random.default_rng(seed + r)
    out = []
    for i in range(n_slices):
        img = heldout_image(i, matrix)
        y, m = simulate_slice(rng, img, coils, r, MASK_KINDS[i % 2], noise)
        out.append((y, m, np.abs(img)))
    return out


def bart_pics(y: np.ndarray, calib: int, env: dict[str, str]) -> np.ndarray:
    """ecalib with the data's calibration block and a 4x4 kernel (its defaults, a 24-line region and a 6x6
    kernel, give garbage maps from 8 calibration lines: 8 dB), then pics -l1 -r 0.01."""
    n = y.shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_cfl(d / "k", y.transpose(2, 1, 0)[:, :, None, :])  # BART: [x, y, z, coils]
        subprocess.run(["bart", "ecalib", "-m1", "-r", str(calib), "-k", "4", str(d / "k"), str(d / "s")],
                       check=True, env=env, capture_output=True)
        subprocess.run(["bart", "pics", "-l1", "-r", "0.01", str(d / "k"), str(d / "s"), str(d / "x")],
                       check=True, env=env, capture_output=True)
        return read_cfl(d / "x").reshape(n, n).T


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--matrix", type=int, default=96)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--weights", default="", help="XPDNet safetensors (empty: shipped xpdnet_small)")
    ap.add_argument("--no-bart", action="store_true")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = load_xpdnet(args.weights or None, "cpu")
    gpu = torch.cuda.is_available()
    model_gpu = load_xpdnet(args.weights or None, "cuda") if gpu else None
    n = args.matrix
    espirit_maps(np.ones((2, 24, 24), np.complex64), calib=16)  # warm-up: sigpy's numba kernels compile once
    with torch.no_grad():  # warm-up of torch's convolution kernels
        model(torch.zeros(1, 2, n, n, dtype=torch.complex64), torch.ones(1, n, n))
    methods = ["zero-filled (ESPIRiT adjoint)", "CG-SENSE (ESPIRiT)", BART,
               f"XPDNet small (n_iter {model.config.n_iter}), CPU"]
    if gpu:
        methods.append("XPDNet small, CUDA")
    if args.no_bart:
        methods.remove(BART)
    rows = []
    r_eff: dict[int, float] = {}
    for r in (4, 8):
        res: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
        data = heldout_set(args.slices, n, r, args.coils)
        r_eff[r] = float(np.mean([n / (m[:, 0] > 0).sum() for _, m, _ in data]))
        for y, mask, truth in data:
            width = int(round(CALIB_FRACTION * n))
            t0 = time.perf_counter()
            maps = espirit_maps(y, calib=width)
            t_maps = time.perf_counter() - t0
            op = CartesianSense(maps[None], mask)
            yt = torch.from_numpy(y[None])
            for name, fn in ((methods[0], adjoint_recon), (methods[1], cg_sense)):
                t0 = time.perf_counter()
                x = fn(op, yt)[0].numpy()
                res[name].append((*psnr_ssim(x, truth), time.perf_counter() - t0 + t_maps))
            if not args.no_bart:
                t0 = time.perf_counter()
                x = bart_pics(y, width, env)
                res[BART].append((*psnr_ssim(x, truth), time.perf_counter() - t0))
            with torch.no_grad():
                t0 = time.perf_counter()
                x = model(yt, torch.from_numpy(mask)[None])[0].numpy()
                res[methods[3]].append((*psnr_ssim(x, truth), time.perf_counter() - t0))
                if model_gpu is not None:
                    yg, mg = yt.cuda(), torch.from_numpy(mask)[None].cuda()
                    model_gpu(yg, mg)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    x = model_gpu(yg, mg)[0].cpu().numpy()
                    torch.cuda.synchronize()
                    res[methods[4]].append((*psnr_ssim(x, truth), time.perf_counter() - t0))
        for m in methods:
            a = np.array(res[m])
            rows.append((r, m, a[:, 0].mean(), a[:, 0].std(), a[:, 1].mean(), a[:, 2].mean()))
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/xpdnet_eval.py " + " ".join(argv if argv is not None
                                                                                     else sys.argv[1:])
    print(f"command: {cmd.strip()}")
    print(f"{args.slices} held-out slices per R, {n}x{n}, {args.coils} coils, noise 2 % of peak, "
          f"equidistant/random masks with {int(round(CALIB_FRACTION * n))} calibration lines, 1 CPU thread"
          f"{', GPU ' + torch.cuda.get_device_name() if gpu else ', no GPU'}\n")
    print("R: the mask's nominal acceleration (every R-th line) before the calibration block is added; "
          + ", ".join(f"R = {r}: {v:.2f} effective (lines / sampled lines)" for r, v in r_eff.items()) + "\n")
    print("| R | method | PSNR (dB) mean ± sd | SSIM | s / slice |\n|---|---|---:|---:|---:|")
    for r, m, p, ps, s, t in rows:
        print(f"| {r} | {m} | {p:.2f} ± {ps:.2f} | {s:.3f} | {t:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
