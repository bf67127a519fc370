"""NUFFT backends on one radial problem: 256x256, 8 coils, 64 spokes x 512 samples, 1 thread, forward + adjoint.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nufft.py [--repeats 5]

Compares the project's FINUFFT torch op (pipelines.recon.nufft.NUFFT, single precision, cached plans) with
sigpy's NUFFT (Kaiser-Bessel gridding, numba) and torchkbnufft (table interpolation in torch). torchkbnufft is
not a project dependency: it is timed in /work/bench-venv (``--only torchkbnufft``, run as a subprocess) when
that environment has it. Also: Toeplitz normal operator vs an explicit NUFFT pair, and the accuracy of each
forward against double-precision FINUFFT. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
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
N, COILS, SPOKES, SAMPLES = 256, 8, 64, 512
BENCH_VENV = Path("/work/bench-venv/bin/python")


def radial_k() -> np.ndarray:
    """Golden-angle spokes through the centre, (kx, ky) cycles/FOV in [-N/2, N/2) (no project import)."""
    theta = np.mod(np.arange(SPOKES) * np.pi / ((1 + 5**0.5) / 2), 2 * np.pi)
    r = (np.arange(SAMPLES) - SAMPLES // 2) * (N / SAMPLES)
    k = np.stack([np.cos(theta)[:, None] * r, np.sin(theta)[:, None] * r], -1).reshape(-1, 2)
    return np.clip(k, -N / 2, N / 2 - 1e-3).astype(np.float32)


def images(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((COILS, N, N)) + 1j * rng.standard_normal((COILS, N, N))).astype(np.complex64)


def best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (plans, numba compilation, tables)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_torchkbnufft(k: np.ndarray, x: np.ndarray, repeats: int) -> dict:
    import torchkbnufft as tkbn

    # torchkbnufft: omega in radians [-pi, pi) ordered like the image axes (y, x); scaling "ortho".
    omega = torch.from_numpy(np.stack([2 * np.pi * k[:, 1] / N, 2 * np.pi * k[:, 0] / N]).astype(np.float32))
    fwd = tkbn.KbNufft(im_size=(N, N))
    adj = tkbn.KbNufftAdjoint(im_size=(N, N))
    xt = torch.from_numpy(x)[None]  # [1, coils, N, N]
    y = fwd(xt, omega, norm="ortho")
    # only every 97th sample travels back (enough for the accuracy column)
    return {"forward": best(lambda: fwd(xt, omega, norm="ortho"), repeats),
            "adjoint": best(lambda: adj(y, omega, norm="ortho"), repeats),
            "y_real": y[0].numpy().real.ravel()[:: 97].tolist(), "y_imag": y[0].numpy().imag.ravel()[:: 97].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["torchkbnufft"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        d = np.load(args.data)
        print(json.dumps(run_torchkbnufft(d["k"], d["x"], args.repeats)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines.recon.nufft import NUFFT, nufft_forward, toeplitz_kernel, toeplitz_normal

    k, x = radial_k(), images()
    ref = nufft_forward(x.astype(np.complex128), k)  # double-precision FINUFFT, eps 1e-6
    rows = []

    t0 = time.perf_counter()
    op = NUFFT(k, (N, N))
    xt = torch.from_numpy(x)
    y = op.forward(xt)
    first = time.perf_counter() - t0
    rows.append(("finufft (torch op, this project)", best(lambda: op.forward(xt), args.repeats),
                 best(lambda: op.adjoint(y), args.repeats), rel(y.numpy(), ref), f"first call incl. plan {first:.3f} s"))

    import sigpy

    ks = np.stack([k[:, 1], k[:, 0]], -1)  # sigpy coord: cycles/FOV, last axis ordered like the image axes
    ys = sigpy.nufft(x, ks)
    rows.append(("sigpy 0.1.27 (KB gridding, numba)", best(lambda: sigpy.nufft(x, ks), args.repeats),
                 best(lambda: sigpy.nufft_adjoint(ys, ks, (COILS, N, N)), args.repeats), rel(ys, ref), ""))

    if BENCH_VENV.exists():
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "d.npz", k=k, x=x)
            res = subprocess.run([str(BENCH_VENV), __file__, "--only", "torchkbnufft", "--data",
                                  str(Path(tmp) / "d.npz"), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode == 0:
            r = json.loads(res.stdout.strip().splitlines()[-1])
            yk = np.array(r["y_real"]) + 1j * np.array(r["y_imag"])
            err = rel(yk, ref.ravel()[::97])
            rows.append(("torchkbnufft 1.5.2 (bench-venv)", r["forward"], r["adjoint"], err,
                         "error column not meaningful: coordinate/scaling convention not matched (timing only)"))
        else:
            rows.append(("torchkbnufft (bench-venv)", float("nan"), float("nan"), float("nan"),
                         "failed: " + res.stderr.strip().splitlines()[-1][:80]))

    print(f"NUFFT {N}x{N}, {COILS} coils, {SPOKES} spokes x {SAMPLES} samples, 1 thread, best of {args.repeats}\n")
    print("| backend | forward (s) | adjoint (s) | fwd rel. error vs FINUFFT double | note |")
    print("|---|---:|---:|---:|---|")
    for name, f, a, e, note in rows:
        print(f"| {name} | {f:.3f} | {a:.3f} | {e:.1e} | {note} |")

    # Toeplitz normal A^H A vs the explicit pair, for one image through all coils (the SENSE normal's core)
    t0 = time.perf_counter()
    kern = toeplitz_kernel(k, (N, N))
    t_kern = time.perf_counter() - t0
    explicit = best(lambda: op.adjoint(op.forward(xt)), args.repeats)
    toep = best(lambda: toeplitz_normal(xt, kern), args.repeats)
    err = float((toeplitz_normal(xt, kern) - op.adjoint(op.forward(xt))).norm() / op.adjoint(op.forward(xt)).norm())
    print(f"\n| normal operator A^H A ({COILS} coils) | seconds |\n|---|---:|")
    print(f"| explicit NUFFT pair | {explicit:.3f} |\n| Toeplitz (2N FFT pair) | {toep:.3f} |")
    print(f"| Toeplitz kernel, once | {t_kern:.3f} |\n\nToeplitz vs explicit relative difference: {err:.1e}")


if __name__ == "__main__":
    main()
