"""Classical Cartesian reconstructions vs BART ``ecalib`` + ``pics``, on the same simulated 8-coil k-space.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recon_vs_bart.py [--matrix 256]

Brain phantom proton density (pipelines.sim.phantoms, 256 x 256), 8 birdcage coils normalised to unit RSS (so
the phantom itself is the truth of a SENSE reconstruction), complex noise sigma = 2 % of the peak, equidistant
masks with 24 calibration lines at R = 4 and 8. BART (Debian ``bart``) runs ``ecalib -m1`` then
``pics -l1 -r 0.01`` through its .cfl files with OMP_NUM_THREADS=1. Ours: ESPIRiT maps (sigpy), then adjoint,
CG-SENSE and L1-wavelet (FISTA) with default parameters. PSNR / SSIM on magnitudes after a least-squares
scale against the truth; seconds per slice include the coil maps.
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

from pipelines.recon.classical import adjoint_recon, cg_sense, l1_wavelet  # noqa: E402
from pipelines.recon.coil_maps import espirit_maps  # noqa: E402
from pipelines.recon.operators import CartesianSense, fft2c  # noqa: E402
from pipelines.sim.coils import birdcage_maps  # noqa: E402
from pipelines.sim.phantoms import make_phantom  # noqa: E402
from pipelines.sim.trajectories import cartesian_frame_masks  # noqa: E402


def write_cfl(base: Path, a: np.ndarray) -> None:
    """BART .hdr / .cfl pair: dimensions text, complex64 in Fortran (column-major) order."""
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, a.shape)) + "\n")
    np.asarray(a, dtype=np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


def read_cfl(base: Path) -> np.ndarray:
    dims = [int(v) for v in base.with_suffix(".hdr").read_text().splitlines()[1].split()]
    return np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64).reshape(dims, order="F")


def psnr_ssim(x: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    a, t = np.abs(x), np.abs(truth)
    a = a * (a * t).sum() / (a * a).sum()
    psnr = float(10 * np.log10(t.max() ** 2 / ((a - t) ** 2).mean()))
    return psnr, ssim(a, t, t.max())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float, win: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) with a uniform 7x7 window, K1 = 0.01, K2 = 0.03 (skimage's defaults)."""
    from numpy.lib.stride_tricks import sliding_window_view as sw

    def mean(z: np.ndarray) -> np.ndarray:
        return sw(z, (win, win)).mean(axis=(-2, -1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ma, mb = mean(a), mean(b)
    n = win * win
    va = (mean(a * a) - ma**2) * n / (n - 1)
    vb = (mean(b * b) - mb**2) * n / (n - 1)
    cov = (mean(a * b) - ma * mb) * n / (n - 1)
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(s.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    args = ap.parse_args()
    n, c = args.matrix, args.coils
    truth = make_phantom("brain", n).pd.astype(np.complex64)
    maps = birdcage_maps(c, (n, n)).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0))
    k_full = fft2c(torch.from_numpy(maps * truth)).numpy()
    rng = np.random.default_rng(0)
    sigma = 0.02 * np.abs(truth).max() / np.sqrt(2)
    k_full = k_full + (sigma * (rng.standard_normal(k_full.shape) + 1j * rng.standard_normal(k_full.shape))
                       ).astype(np.complex64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    espirit_maps(k_full[:, : n // 4, : n // 4], calib=16)  # warm-up: sigpy's numba kernels compile once
    print(f"{n}x{n}, {c} coils, noise 2 % of peak, equidistant + 24 calibration lines, 1 thread\n")
    print("| R | method | PSNR (dB) | SSIM | s / slice |\n|---|---|---:|---:|---:|")
    for r in (4, 8):
        mask = np.zeros((n, n), bool)
        mask[cartesian_frame_masks(1, n, r, calib_lines=24)[0]] = True
        y = (k_full * mask).astype(np.complex64)
        t0 = time.perf_counter()
        est = espirit_maps(y, calib=24)
        t_maps = time.perf_counter() - t0
        op = CartesianSense(est[None], mask)
        yt = torch.from_numpy(y[None])
        for name, fn in (("ours: zero-filled adjoint", adjoint_recon), ("ours: CG-SENSE", cg_sense),
                         ("ours: L1-wavelet (FISTA)", l1_wavelet)):
            t0 = time.perf_counter()
            x = fn(op, yt)[0].numpy()
            dt = time.perf_counter() - t0 + t_maps
            p, s = psnr_ssim(x, truth)
            print(f"| {r} | {name} | {p:.2f} | {s:.3f} | {dt:.2f} |")
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            # BART dims: [x(read)=dim0, y=dim1, z, coils]; our array is [coils, y, x]
            write_cfl(d / "k", y.transpose(2, 1, 0)[:, :, None, :])
            t0 = time.perf_counter()
            subprocess.run(["bart", "ecalib", "-m1", str(d / "k"), str(d / "s")], check=True, env=env,
                           capture_output=True)
            subprocess.run(["bart", "pics", "-l1", "-r", "0.01", str(d / "k"), str(d / "s"), str(d / "x")],
                           check=True, env=env, capture_output=True)
            dt = time.perf_counter() - t0
            x = read_cfl(d / "x").reshape(n, n).T  # back to [y, x]
        p, s = psnr_ssim(x, truth)
        print(f"| {r} | BART ecalib -m1 + pics -l1 -r 0.01 | {p:.2f} | {s:.3f} | {dt:.2f} |")


if __name__ == "__main__":
    main()
